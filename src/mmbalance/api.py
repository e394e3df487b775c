"""The Python API: train, load and benchmark runs without the command line.

Every function here does what the matching ``mmbalance`` command does and
writes the same run folders, so a run trained from Python can be evaluated
from the shell and the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import RunConfig, build_config, load_yaml
from .data.base import DataBundle
from .errors import DataError, MMBalanceError
from .files import atomic_write_bytes

IN_MEMORY_FILE = "data.npz"


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"train.epochs": 2}`` or ``["train.epochs=2"]`` -> ``["train.epochs=2"]`` (values as YAML)."""
    import yaml

    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            if text.endswith("..."):
                text = text[: -len("...")].strip()
            out.append(f"{key}={text}")
        return out
    return list(overrides)


class Run:
    """A run folder: its resolved config, its metrics, and its best checkpoint on demand."""

    def __init__(self, path: str | Path, config: RunConfig, metrics: dict | None = None, bundle: DataBundle | None = None):
        self.path = Path(path)
        self.config = config
        self.metrics = metrics
        self._bundle = bundle
        self._trainer = None
        self._stored_standardisation: dict | None = None

    def __repr__(self) -> str:
        accuracy = self.metrics["test"]["accuracy"] if self.metrics else None
        shown = f", test accuracy {accuracy:.4f}" if accuracy is not None else ""
        return f"Run({str(self.path)!r}, method={self.config.method!r}, dataset={self.config.data.name!r}{shown})"

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def trainer(self):
        """The run's model and method rebuilt with the best checkpoint's weights (built once)."""
        if self._trainer is None:
            from .training import Trainer

            trainer = Trainer(self.config, None, quiet=True, bundle=self._bundle)
            checkpoint = trainer.load_weights(self.path / "best.pt")
            self._stored_standardisation = checkpoint.get("standardisation")
            self._trainer = trainer
        return self._trainer

    @property
    def standardisation(self) -> dict:
        """{modality: Standardisation}: the training statistics the run's inputs were standardised with.

        Read from ``best.pt``; a run saved before checkpoints held them gets
        those of its dataset loaded again (the same split, so the same values).
        """
        from .data.standardise import Standardisation

        trainer = self.trainer
        stored = self._stored_standardisation
        if stored is None:
            return dict(getattr(trainer.bundle, "standardisation", {}))
        if not isinstance(stored, dict) or not all(isinstance(s, dict) and {"mean", "std"} <= set(s) for s in stored.values()):
            raise MMBalanceError(f"{self.path / 'best.pt'} holds standardisation statistics in an unknown layout")
        return {m: Standardisation.from_state(state) for m, state in stored.items()}

    def evaluate(self, split: str = "test") -> dict:
        """Every metric of the best checkpoint on ``split`` (train, val or test)."""
        if split not in ("train", "val", "test"):
            raise MMBalanceError(f"unknown split '{split}' (allowed: train, val, test)")
        return self.trainer.evaluate(split)

    def predict(self, inputs: Mapping[str, Tensor | np.ndarray], batch_size: int = 256, *, standardize: bool = True):
        """The run's predictions (``prediction.Predictions``) for one tensor or array per modality.

        ``probabilities`` [N, C] of the run's own prediction, ``classes``, and
        ``modality_only``: per modality the class the fused head predicts with
        every other modality's features zeroed (as in metrics.json). Inputs are
        as the data file holds them: with ``standardize`` the run's training
        statistics are applied (``False``: the inputs are standardised already).
        """
        from .prediction import check_inputs, predict, standardise_inputs

        trainer = self.trainer
        bundle = trainer.bundle
        if getattr(bundle, "task", "single_label") != "single_label":
            raise MMBalanceError(
                f"predict supports single-label runs only; {self.path} is a {bundle.task} run "
                "(its metrics.json holds the multi-label scores)"
            )
        tensors = check_inputs(inputs, bundle.modalities, bundle.input_shapes, bundle.input_dtypes)
        if standardize:
            tensors = standardise_inputs(tensors, self.standardisation, bundle.input_shapes)
        return predict(trainer.method, trainer.model, tensors, bundle.modalities, bundle.num_classes, trainer.device,
                       batch_size, bundle.class_names)


def _resolve_data_path(config: RunConfig, run_dir: Path) -> RunConfig:
    """A relative ``data.path`` that exists beside the run (in-memory data saved with it) is read from there."""
    path = config.data.path
    if path and not Path(path).is_absolute() and not Path(path).exists() and (run_dir / path).is_file():
        return config.replace(**{"data.path": str(run_dir / path)})
    return config


def load_run(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Run:
    """A finished run folder (config.yaml, best.pt, metrics.json) as a ``Run``.

    ``overrides`` may change only what does not alter the trained model: the
    device, batch sizes, where the data lives (``training.trainer.SAFE_KEYS``).
    """
    import json

    from .config import parse_override
    from .training.trainer import SAFE_KEYS

    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "best.pt").is_file():
        raise MMBalanceError(f"{run_dir} is not a finished run folder (needs config.yaml and best.pt)")
    config = RunConfig(load_yaml(run_dir / "config.yaml"))
    changes = dict(parse_override(text) for text in _override_list(overrides))
    for key in changes:
        if key not in SAFE_KEYS:
            raise MMBalanceError(f"--set {key} cannot change for a finished run (keys that can: {', '.join(SAFE_KEYS)})")
    if changes:
        config = config.replace(**changes)
    config = _resolve_data_path(config, run_dir)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Run(run_dir, config, metrics)


def save_bundle(bundle: DataBundle, path: Path) -> None:
    """An in-memory bundle as an npz file in the layout of the ``npz`` dataset (arrays, label, split)."""
    from .data.npz import RESERVED

    clash = [m for m in bundle.modalities if m in RESERVED]
    if clash:
        raise DataError(f"a modality may not be called '{clash[0]}' (reserved: {', '.join(RESERVED)})")
    splits = [("train", bundle.train), ("val", bundle.val), ("test", bundle.test)]
    for name, part in splits:
        if not hasattr(part, "inputs"):
            raise DataError(f"the {name} split is not in memory; train(data=...) takes a DataBundle.from_tensors(...)")
    arrays = {m: torch.cat([part.inputs[m] for _, part in splits]).numpy() for m in bundle.modalities}
    arrays["label"] = torch.cat([part.labels for _, part in splits]).numpy()
    arrays["split"] = np.array([name for name, part in splits for _ in range(len(part))])
    atomic_write_bytes(path, lambda handle: np.savez(handle, **arrays))


def train(
    dataset: str | None = None,
    method: str = "joint",
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    seed: int | None = None,
    config: str | Path | None = None,
    data: DataBundle | None = None,
    quiet: bool = True,
    overwrite: bool = False,
) -> Run:
    """Train one run into ``out`` and return it (``mmbalance train``).

    ``method`` is a spec (``"midas[lam=0.5]+arl"``); ``overrides`` sets
    config keys (``{"train.epochs": 2}``); ``config`` is a YAML file. With
    ``data`` (a ``DataBundle``, e.g. ``DataBundle.from_tensors(...)``) the
    run trains on those tensors and saves them beside itself as ``data.npz``,
    so ``load_run`` and ``mmbalance eval`` work on it later. A folder that
    holds a run already is refused unless ``overwrite=True``.
    """
    from .training import train_run

    if out is None:
        raise MMBalanceError("train needs out=FOLDER (the run folder)")
    out = Path(out)
    settings = _override_list(overrides)
    if data is not None:
        from .training.trainer import run_files

        if dataset not in (None, "npz"):
            raise MMBalanceError(f"give either dataset={dataset!r} or data=..., not both")
        data.validate()
        if out.exists() and run_files(out) and not overwrite:
            raise MMBalanceError(f"{out} holds a run already ({', '.join(run_files(out))}); pass overwrite=True to replace it")
        out.mkdir(parents=True, exist_ok=True)
        save_bundle(data, out / IN_MEMORY_FILE)
        dataset = "npz"
        # the tensors train as given, so data.npz is read back as it is (not standardised) by load_run and eval
        settings = [f"data.path={IN_MEMORY_FILE}", f"npz.num_classes={data.num_classes}", *settings, "data.standardize=false"]
    run_config = build_config(config, settings, dataset=dataset, method=method, seed=seed)
    metrics = train_run(run_config, out, quiet=quiet, bundle=data, overwrite=overwrite)
    return Run(out, run_config, metrics, bundle=data)


def bench(
    dataset: str,
    methods: Sequence[str] | str,
    seeds: int | Sequence[int] = 5,
    out: str | Path = "runs/bench",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    config: str | Path | None = None,
    quiet: bool = True,
) -> list[dict]:
    """Every method spec × seed on one dataset, with the summary files (``mmbalance bench``); returns the runs' metrics.

    ``seeds``: a count (5: seeds 0..4) or the seeds themselves ([0, 3, 7]).
    """
    from .experiments.bench import run_bench
    from .methods.spec import split_methods

    specs = split_methods(methods) if isinstance(methods, str) else list(methods)
    return run_bench(dataset, specs, seeds, Path(out), _override_list(overrides), config, quiet=quiet,
                     log=None if not quiet else (lambda text: None))
