"""One training loop for every method.

The trainer owns data loading, optimisation, checkpoints, evaluation and
logging; the method (an objective and its plugins, see ``methods/base.py``)
owns the loss and any gradient or state manipulation, through hooks.
Nothing here depends on which method runs.

Run folder::

    config.yaml     the resolved configuration
    metrics.jsonl   one line per epoch (train loss/accuracy, validation metrics, method logs)
    last.pt         everything needed to resume, rewritten atomically every epoch
    best.pt         model and method state at the best validation score (accuracy; micro-F1 on
                    multi-label data; ``eval.select``), and the training statistics the dataset
                    standardised inputs with (for ``mmbalance predict``)
    metrics.json    final validation and test metrics of the best checkpoint (``stopped_epoch``: where
                    early stopping ended the run, or null)
    scalars.csv     every per-epoch scalar, one column each (log.backends; also TensorBoard events)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..config import RunConfig
from ..config import load_yaml as load_yaml_file
from ..data.base import DataBundle, carve
from ..data.batch import collate_batch
from ..data.loading import load_dataset, split_seed
from ..data.plan import PlannedDataset
from ..errors import ConfigError, MMBalanceError, NonFiniteLossError
from ..evaluation.evaluate import evaluate
from ..files import FolderLock, atomic_write_json, atomic_write_text
from ..methods.base import check_task_support
from ..methods.compose import Method
from ..methods.record import StepRecord
from ..models.multimodal import MultimodalModel, build_model
from ..models.parameters import ParameterGroups
from ..tasks import (
    DEFAULT_THRESHOLD,
    MULTI_LABEL,
    POS_WEIGHT,
    check_task_options,
    exact_matches,
    f1_counts,
    micro_f1_from_counts,
    positive_class_weight,
    selection_metric,
)
from .accumulation import MicroBatch, check_accumulation, micro_batches, optimizer_steps
from .checkpoint import (
    atomic_save,
    check_state_fits,
    config_fingerprint,
    differing_keys,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .context import TrainContext
from .distributed import DistributedState, ShardedShuffleSampler
from .loggers import RunLoggers, require_extras
from .precision import Precision, check_precision
from .progress import Progress
from .schedules import build_schedule, step_after_epoch, step_after_optimizer
from .teachers import TEACHER_FOLDER, TeacherFit

HELDOUT_SEED_OFFSET = 7919  # the carve's seed differs from the split's, yet is the same for every method
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.json", "best.pt", "last.pt", "scalars.csv")
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's, one per (re)start of the run
#: keys that may differ between a checkpoint and the run that reads it: where the data lives, how it
#: is loaded, the device, and (when resuming) how many epochs to train in all
SAFE_KEYS = ("train.epochs", "train.num_workers", "train.eval_batch_size", "train.device", "data.root", "data.path",
             "log.backends", "log.project")
LAST_CHECKPOINT_KEYS = ("model", "method", "optimizers", "schedulers", "state", "rng", "generator", "config", "history")


def run_files(out_dir: Path) -> list[str]:
    """The files of a run that ``out_dir`` holds already (links included), its teachers' folder too."""
    names = [*RUN_FILES, TEACHER_FOLDER]
    found = [name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    return found + sorted(p.name for p in out_dir.glob(EVENT_FILES))


def epoch_line(record: dict, epochs: int, selection: str = "accuracy") -> str:
    """One plain line per epoch: the loss and the terms it sums, accuracies (and the selection metric), time."""
    terms = {k[len("loss/"):]: v for k, v in record.get("method", {}).items() if k.startswith("loss/")}
    summed = " + ".join(f"{name} {value:.4f}" for name, value in terms.items())
    loss = f"loss {record['train_loss']:.4f}" + (f" ({summed})" if len(terms) > 1 else "")
    selected = f"val {selection} {100 * record['val'][selection]:.2f}%  " if selection != "accuracy" else ""
    return (
        f"epoch {record['epoch']}/{epochs}  {loss}  train acc {100 * record['train_accuracy']:.2f}%  "
        f"val acc {100 * record['val']['accuracy']:.2f}%  {selected}{record['seconds']:.1f}s"
    )


def config_mismatch(stored: dict, current: dict, safe: tuple[str, ...] = SAFE_KEYS) -> list[tuple[str, Any, Any]]:
    """Keys (other than ``safe`` ones) whose values differ between a checkpoint's config and this run's."""
    return [d for d in differing_keys(stored, current) if d[0] not in safe]


def describe_mismatch(differences: list[tuple[str, Any, Any]], first: str, second: str) -> str:
    shown = "; ".join(f"{key}: {a!r} in {first}, {b!r} in {second}" for key, a, b in differences[:3])
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    return shown + more


def with_defaults(stored: dict) -> dict:
    """A checkpoint's config with the defaults of options added since it was written (as they were then)."""
    try:
        return RunConfig(stored).to_dict()
    except MMBalanceError:  # a part or key this version no longer knows: compare as stored
        return stored


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid value for train.device: {name!r} (allowed: auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available (use auto or cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the run folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MMBalanceError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None


def build_method(config: RunConfig, bundle: DataBundle) -> Method:
    return Method.build(config, bundle.modalities, bundle.num_classes)


def heldout_split(bundle: DataBundle, config: RunConfig):
    """(training data, held-out data): the validation split, or a stratified carve of the training split."""
    if config.data.heldout == "val":
        return bundle.train, bundle.val
    return carve(bundle.train, config.data.heldout_fraction, split_seed(config) + HELDOUT_SEED_OFFSET)


class Trainer:
    """Trains one (method, dataset, seed) run into ``out_dir``."""

    def __init__(self, config: RunConfig, out_dir: str | Path | None, quiet: bool = False, bundle: DataBundle | None = None):
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        device_kind = "cuda" if config.train.device.startswith("cuda") or (config.train.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.dist = DistributedState.from_env(device_kind)
        self.device = resolve_device(config.train.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        require_extras(config.log.backends)  # a missing optional logger is one line, before any data is read
        check_precision(config.train.precision, self.device)  # so are a precision the device lacks
        check_accumulation(config.train.accumulate, config.parts)  # and parts that cannot accumulate
        self.precision = Precision(config.train.precision, self.device)
        seed_everything(config.seed)
        self.bundle = bundle if bundle is not None else load_dataset(config)
        # the task (tasks.py) decides the loss, the metrics and what selects the best checkpoint; a part or
        # option that does not fit it is refused here, before anything is built or written
        self.task = getattr(self.bundle, "task", "single_label")
        check_task_support(config.parts, self.task, config.data.name)
        check_task_options(config.train.pos_weight, config.eval.threshold, self.task, config.data.name)
        self.selection_metric = selection_metric(config.eval.select, self.task)
        self.train_data, self.heldout_data = heldout_split(self.bundle, config)
        self.pos_weight = positive_class_weight(config.train.pos_weight, self.train_data.labels)
        if self.pos_weight is not None:
            self.pos_weight = self.pos_weight.to(self.device)
        self._val_threshold: float | None = None  # eval.threshold=val: chosen on the current weights' validation rows
        self.model: MultimodalModel = build_model(
            config.model, self.bundle.modalities, self.bundle.input_shapes, self.bundle.num_classes,
            self.bundle.input_dtypes,
        )
        self.method = build_method(config, self.bundle)
        self.progress = Progress(quiet, self.dist.is_main)
        for m, encoder in self.model.encoders.items():  # model.pretrained: one line per encoder on what was loaded
            if getattr(encoder, "pretrained_report", None) is not None:
                self.progress.epoch_summary(f"{m} encoder: {encoder.pretrained_report.summary()}")
        self._build_loaders()
        self.ctx = TrainContext(
            epoch=0,
            max_epochs=config.train.epochs,
            steps_per_epoch=optimizer_steps(len(self.train_loader), config.train.accumulate),
            device=self.device,
            modalities=self.bundle.modalities,
            num_classes=self.bundle.num_classes,
            generator=torch.Generator().manual_seed(config.seed),
            dist=self.dist,
            make_optimizer=self.make_optimizer,
            train_loader=self.train_loader,
            heldout_loader=self.heldout_loader,
            train_eval_loader=self.train_eval_loader,
            params=ParameterGroups.of(self.model),
            evaluate=self.evaluate_loader,
            manual_step=self.manual_step,
            fit_teacher=TeacherFit(self),
            encode=lambda inputs: self.method.encode(self.model, inputs),
            predict_from_features=lambda features: self.method.predict_from_features(self.model, features),
            task=self.task,
        )
        self.method.setup(self.model, self.ctx)
        self.model.to(self.device)
        self.method.to(self.device)
        self.dist.broadcast_module(self.model)
        self.dist.broadcast_module(self.method)
        self.ctx.params = ParameterGroups.of(self.model, dict(self.method.parts))  # now with what setup added
        self.parameters = self.ctx.params.trainable()
        self.optimizers, self.schedulers = self._configure_optimizers()
        self.ctx.optimizers = self.optimizers
        self.ctx.optimizer = next(iter(self.optimizers.values()))
        self.state: dict[str, Any] = {
            "epoch": 0,
            "global_step": 0,
            "best_epoch": -1,
            "best_val_accuracy": -math.inf,  # the validation accuracy of the best epoch
            "best_val_score": -math.inf,  # its validation score on the selection metric (eval.select)
            "train_seconds": 0.0,
            "step_seconds": 0.0,
            "steps_timed": 0,
            "stopped_epoch": 0,  # the epoch early stopping ended the run after; 0 while it has not
            "early_stop_best": -math.inf,  # the validation score early stopping measures gains from
            "early_stop_epoch": 0,  # the epoch of that accuracy (or of the resume that extended a stopped run)
        }
        self.history: list[dict] = []  # one record per finished epoch: metrics.jsonl, and part of last.pt
        self.loggers: RunLoggers | None = None

    # -- construction --------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """An optimizer with the run's settings (``train.optimizer``, lr, momentum, weight decay)."""
        t = self.config.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def _make_scheduler(self, optimizer):
        """The run's schedule of one optimizer (``training/schedules.py``): warm-up, then train.scheduler."""
        return build_schedule(optimizer, self.config.train, self.ctx.steps_per_epoch)

    def _configure_optimizers(self):
        configured = self.method.configure_optimizers(self.model, self.ctx)
        if configured is None:
            optimizers = {"main": self.make_optimizer(self.parameters)}
            schedulers = None
        else:
            optimizers = dict(configured.get("optimizers") or {})
            schedulers = configured.get("schedulers")
            if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values()):
                raise TypeError("configure_optimizers must return {'optimizers': {name: torch.optim.Optimizer, ...}}")
        t = self.config.train
        if schedulers is not None and (t.warmup_epochs > 0 or t.scheduler == "plateau"):
            asked = f"train.warmup_epochs={t.warmup_epochs}" if t.warmup_epochs > 0 else "train.scheduler=plateau"
            raise ConfigError(
                f"{asked} cannot apply: method '{self.config.method}' sets its own learning-rate schedules; leave it unset"
            )
        if schedulers is None:
            schedulers = {name: self._make_scheduler(opt) for name, opt in optimizers.items()}
        return optimizers, {name: s for name, s in schedulers.items() if s is not None}

    def _loader(self, dataset, batch_size, sampler) -> DataLoader:
        workers = self.config.train.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
        )

    def _build_loaders(self) -> None:
        t = self.config.train
        d = self.dist
        self.train_sampler = ShardedShuffleSampler(len(self.train_data), self.config.seed, d.rank, d.world_size)
        self.train_loader = self._loader(self.train_data, t.batch_size, self.train_sampler)

        def fixed(dataset):
            return self._loader(dataset, t.eval_batch_size, ShardedShuffleSampler(len(dataset), 0, d.rank, d.world_size, shuffle=False, pad=False))

        self.train_eval_loader = fixed(self.train_data)
        self.heldout_loader = fixed(self.heldout_data)
        self.val_loader = fixed(self.bundle.val)
        self.test_loader = fixed(self.bundle.test)

    def _epoch_loader(self, epoch: int) -> DataLoader:
        """The training loader, or this epoch's planned one when a part plans the epoch (``data/plan.py``)."""
        plan = self.method.epoch_plan(self.model, self.ctx)
        if plan is None:
            return self.train_loader
        try:
            plan = plan.check(len(self.train_data), len(self.bundle.modalities))
        except ValueError as error:
            raise MMBalanceError(f"the method's epoch plan is invalid: {error}") from None
        d = self.dist
        sampler = ShardedShuffleSampler(len(plan.rows), self.config.seed, d.rank, d.world_size)
        sampler.set_epoch(epoch)
        return self._loader(PlannedDataset(self.train_data, plan), self.config.train.batch_size, sampler)

    # -- evaluation ----------------------------------------------------------
    def evaluate_loader(self, loader, choose_threshold: bool = False) -> dict:
        """The run's metrics on ``loader`` (sharded across processes); train mode is left as found.

        Always in float32, also when a part evaluates inside a mixed-precision forward pass.
        Multi-label runs score ``eval.threshold``; with ``eval.threshold=val`` the threshold is
        chosen on the validation split (``choose_threshold`` marks that pass) and every other
        loader is scored with the validation split's choice for the current weights.
        """
        threshold = DEFAULT_THRESHOLD
        setting = self.config.eval.threshold
        if self.task == MULTI_LABEL and setting is not None:
            if setting != "val":
                threshold = setting
            elif not choose_threshold:
                threshold = self.validation_threshold()
        choose = choose_threshold and self.task == MULTI_LABEL and setting == "val"
        with self.precision.full():
            metrics = evaluate(self.method, self.model, loader, self.device, self.bundle.modalities, self.bundle.num_classes,
                               dist=self.dist, task=self.task, threshold=threshold, choose_threshold=choose)
        if choose:
            self._val_threshold = metrics["threshold"]
        return metrics

    def validation_threshold(self) -> float:
        """``eval.threshold=val``: the threshold the validation split chooses for the current weights (one pass, cached)."""
        if self._val_threshold is None:
            self.evaluate_loader(self.val_loader, choose_threshold=True)
        return self._val_threshold

    def evaluate(self, split: str) -> dict:
        loaders = {"train": self.train_eval_loader, "val": self.val_loader, "test": self.test_loader}
        return self.evaluate_loader(loaders[split], choose_threshold=split == "val")

    # -- checkpoints ---------------------------------------------------------
    def _write(self, name: str, obj) -> None:
        if self.out_dir is not None and self.dist.is_main:
            atomic_save(obj, self.out_dir / name)

    def _weights(self) -> dict:
        return {"model": self.model.state_dict(), "method": self.method.state_dict()}

    def _standardisation_state(self) -> dict:
        """The training statistics the dataset standardised inputs with, so that prediction can apply them."""
        return {m: fitted.to_state() for m, fitted in getattr(self.bundle, "standardisation", {}).items()}

    def _last_checkpoint(self) -> dict:
        config = self.config.to_dict()
        scaler = self.precision.state_dict()  # float16's gradient scale, so a resumed run scales alike
        return {
            **({"scaler": scaler} if scaler is not None else {}),
            **self._weights(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "state": dict(self.state),
            "rng": rng_state(),
            "generator": self.ctx.generator.get_state(),
            "config": config,
            "fingerprint": config_fingerprint(config),
            "history": list(self.history),
        }

    def _load_weights_from(self, checkpoint: dict, path: Path) -> None:
        stored = checkpoint.get("config")
        if isinstance(stored, dict):
            method = stored.get("method")
            if method != self.config.method:
                raise MMBalanceError(f"{path} was trained with method '{method}', this run's method is '{self.config.method}'")
        check_state_fits(checkpoint["model"], self.model.state_dict(), "model", path)
        check_state_fits(checkpoint["method"], self.method.state_dict(), f"method '{self.config.method}'", path)
        self.model.load_state_dict(checkpoint["model"])
        self.method.load_state_dict(checkpoint["method"])
        self._val_threshold = None  # new weights choose their own validation threshold

    def _restore(self, checkpoint: dict, path: Path) -> None:
        self._load_weights_from(checkpoint, path)
        if set(checkpoint["optimizers"]) != set(self.optimizers) or set(checkpoint["schedulers"]) != set(self.schedulers):
            raise MMBalanceError(
                f"{path} holds optimizers {sorted(checkpoint['optimizers'])} and schedulers {sorted(checkpoint['schedulers'])}, "
                f"this run has {sorted(self.optimizers)} and {sorted(self.schedulers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(checkpoint["schedulers"][name])
        self.precision.load_state_dict(checkpoint.get("scaler"))
        self.state.update(checkpoint["state"])
        if "best_val_score" not in checkpoint["state"]:  # written before selection metrics: it selected on accuracy
            self.state["best_val_score"] = self.state["best_val_accuracy"]
        if self.state["epoch"] > self.config.train.epochs:
            raise MMBalanceError(
                f"train.epochs={self.config.train.epochs} is below the {self.state['epoch']} epochs {path} has trained already"
            )
        stored = checkpoint.get("config")
        stored_epochs = stored.get("train", {}).get("epochs") if isinstance(stored, dict) else None
        if self.state["stopped_epoch"] and isinstance(stored_epochs, int) and self.config.train.epochs > stored_epochs:
            # an early-stopped run extended with more epochs trains on; its patience counts from here
            self.state["stopped_epoch"] = 0
            self.state["early_stop_epoch"] = self.state["epoch"]
        set_rng_state(checkpoint["rng"])
        self.ctx.generator.set_state(checkpoint["generator"])
        self.history = list(checkpoint["history"])

    def load_weights(self, path: Path) -> dict:
        """The model and method weights of a checkpoint (best.pt), checked against this run."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        stored = checkpoint.get("config")
        if isinstance(stored, dict):
            if stored.get("method") != self.config.method:
                raise MMBalanceError(
                    f"{path} was trained with method '{stored.get('method')}', this run's method is '{self.config.method}'"
                )
            mismatch = config_mismatch(with_defaults(stored), self.config.to_dict())
            if mismatch:
                raise MMBalanceError(
                    f"{path} was trained with another configuration than this run's: "
                    + describe_mismatch(mismatch, path.name, "this run")
                )
        self._load_weights_from(checkpoint, path)
        return checkpoint

    # -- one optimisation step -------------------------------------------------
    def _finish_gradients(self, record: StepRecord | None, optimizers=None) -> None:
        """Average across processes, unscale (float16), let every part modulate, clip."""
        self.dist.average_gradients(self.parameters)
        self.precision.unscale(self.optimizers.values() if optimizers is None else optimizers)
        self.method.after_backward(record, self.ctx)
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters if p.grad is not None], self.config.train.grad_clip)

    def manual_step(self, loss: torch.Tensor, record: StepRecord | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """For manual optimisation: backward, averaging, plugins' after_backward, clipping, step.

        Every gradient is then set to None, not only the stepped optimizer's:
        what a sub-step left on other parameters must not leak into the next
        one, and a parameter a sub-step does not reach is skipped by its optimizer.
        """
        optimizer = optimizer or self.ctx.optimizer
        with self.precision.full():  # called inside the forward's autocast: backward and step in float32
            self.precision.backward(loss)
            self._finish_gradients(record, [optimizer])
            self.precision.step([optimizer])
        self._zero_grad()

    def _zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for p in self.parameters:
            p.grad = None

    def train_step(self, batch, micro: MicroBatch | None = None) -> StepRecord:
        """One optimisation step on a batch already on the device; returns what it computed.

        With ``micro`` the batch is one micro-batch of a step (``training/accumulation.py``):
        the first clears the gradients, each adds its weighted share, the last steps.
        """
        manual = self.method.manual_optimization
        first = micro is None or micro.first
        last = micro is None or micro.last
        if first:
            self._zero_grad()
            self.ctx.step_records = []
        with self.precision.forward():
            record = self.method.training_step(self.model, batch, self.ctx)
        self.ctx.step_records.append(record)
        if not manual:
            weight = 1.0 if micro is None else micro.weight
            self.precision.backward(record.loss if weight == 1.0 else record.loss * weight)
        if last:
            if not manual:
                self._finish_gradients(record)
                self.precision.step(self.optimizers.values())
            with self.precision.forward():  # after_step may compute on the step's tensors (LeMDA's augmenter)
                self.method.after_step(record, self.ctx)
            self.ctx.step_records = []
            for schedule in self.schedulers.values():
                step_after_optimizer(schedule)
        return record

    # -- training ------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        self.method.train()
        self.train_sampler.set_epoch(epoch)
        ctx = self.ctx
        ctx.epoch = epoch
        accumulate = self.config.train.accumulate
        ctx.train_loader, ctx.steps_per_epoch = self.train_loader, optimizer_steps(len(self.train_loader), accumulate)
        self._val_threshold = None  # the weights change from here on
        self.method.on_epoch_start(self.model, ctx)
        loader = self._epoch_loader(epoch)
        ctx.train_loader = loader
        ctx.steps_per_epoch = optimizer_steps(len(loader), accumulate)
        plan = micro_batches(len(loader.sampler), loader.batch_size, accumulate)  # one per batch of the loader
        device = self.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        f1_totals = torch.zeros(3, dtype=torch.float64, device=device)  # multi-label: true, predicted, actual positives
        first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # step, loss value
        log_sums: dict[str, torch.Tensor] = {}
        log_counts: dict[str, int] = {}
        bar = self.progress.epoch_bar(loader, epoch, self.config.train.epochs)
        for step, (batch, micro) in enumerate(zip(bar, plan, strict=True)):
            started = time.perf_counter()
            ctx.step_in_epoch = micro.step
            ctx.global_step = self.state["global_step"]
            batch = batch.to(device, non_blocking=True)
            if self.pos_weight is not None:  # train.pos_weight, read by the parts' task loss (methods/base.py)
                batch.extras[POS_WEIGHT] = self.pos_weight
            record = self.train_step(batch, micro)
            loss = record.loss
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.state["step_seconds"] += time.perf_counter() - started  # per optimizer step, its micro-batches summed
            if micro.last:
                self.state["steps_timed"] += 1
                self.state["global_step"] += 1
            # everything below stays on the device: one synchronisation per epoch, not per step
            value = loss.detach().double()
            bad = ~torch.isfinite(value) & (first_bad[0] < 0)
            first_bad = torch.where(bad, torch.stack([torch.tensor(float(step), dtype=torch.float64, device=device), value]), first_bad)
            n = len(batch)
            totals[0] += value * n
            totals[2] += n
            if record.logits is not None:
                totals[1] += exact_matches(record.logits.detach(), batch.labels).sum()
                if self.task == MULTI_LABEL:
                    f1_totals += f1_counts(record.logits.detach(), batch.labels)
            for key, logged in {**record.loss_logs(), **record.logs}.items():
                logged = logged.detach().double() if isinstance(logged, torch.Tensor) else torch.tensor(float(logged), dtype=torch.float64, device=device)
                log_sums[key] = log_sums[key] + logged if key in log_sums else logged.to(device)
                log_counts[key] = log_counts.get(key, 0) + 1
            if self.progress.show:
                self.progress.set_postfix(bar, loss=totals[0].item() / totals[2].item(), acc=totals[1].item() / totals[2].item())
        bad_step, bad_value = first_bad.tolist()
        if bad_step >= 0:
            kept = (
                f"the last good checkpoint (epoch {epoch}) is kept" if epoch > 0
                else "no epoch had finished, so there is no checkpoint and the run folder is removed"
            )
            raise NonFiniteLossError(
                f"non-finite loss ({bad_value}) at epoch {epoch + 1}, step {int(bad_step) + 1}; "
                f"training stopped, {kept}; try a lower train.lr"
            )
        keys = sorted(log_sums)
        logs: dict[str, float] = {}
        if keys:
            means = torch.stack([log_sums[k] / log_counts[k] for k in keys])
            logs = dict(zip(keys, self.dist.mean(means).tolist()))
        totals = self.dist.all_reduce_sum(totals).tolist()
        logs.update(self.method.on_epoch_end(self.model, ctx) or {})
        self.dist.broadcast_module(self.model)  # the schedules step after validation (plateau reads it)
        result = {
            "train_loss": totals[0] / max(totals[2], 1),
            "train_accuracy": totals[1] / max(totals[2], 1),  # multi-label: exact label sets at threshold 0.5
            "method": logs,
        }
        if self.task == MULTI_LABEL:
            result["train_micro_f1"] = micro_f1_from_counts(*self.dist.all_reduce_sum(f1_totals).tolist())
        return result

    def fit(self, resume: bool = False, overwrite: bool = False, locked: bool = False) -> dict:
        """Train to ``train.epochs``, keeping the best validation checkpoint; return final metrics.

        A new run refuses a folder that holds a run already unless
        ``overwrite``; a run that fails before its first checkpoint removes
        what it created, so no half-made run folder is left behind. The
        folder is locked while the run writes there (``locked``: the caller
        holds that lock already).
        """
        writes = self.out_dir is not None and self.dist.is_main
        lock = None
        created_folder = False
        if writes:
            present = run_files(self.out_dir) if self.out_dir.is_dir() else []
            if not resume and present and not overwrite:
                raise MMBalanceError(
                    f"{self.out_dir} holds a run already ({', '.join(present)}); continue it with "
                    f"--resume {self.out_dir}, or replace it with --overwrite"
                )
            created_folder = not self.out_dir.exists()
            check_writable(self.out_dir)
            lock = None if locked else FolderLock(self.out_dir).acquire()
        self.loggers = None
        try:
            if resume and (self.out_dir / "last.pt").is_file():
                path = self.out_dir / "last.pt"
                self._restore(load_checkpoint(path, LAST_CHECKPOINT_KEYS), path)
                self._write_history()  # metrics.jsonl agrees with the checkpoint, whatever a kill left
            elif resume:  # killed while its teachers trained: they continue from their checkpoints
                self._write_history()
            elif writes:
                for name in run_files(self.out_dir):  # --overwrite: the user asked for it
                    path = self.out_dir / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                atomic_write_text(self.out_dir / "config.yaml", self.config.to_yaml())
                self._write_history()
            if writes:
                self.loggers = RunLoggers(self.out_dir, self.config.log.backends, self.config.log.project, self.config.to_dict())
                self.loggers.sync(self.history)
            return self._train_and_finish()
        except BaseException:
            teachers_started = writes and (self.out_dir / TEACHER_FOLDER).is_dir()
            if writes and not resume and self.state["epoch"] == 0 and not teachers_started:
                self._remove_unfinished(created_folder)
            raise
        finally:
            if self.loggers is not None:
                self.loggers.close()
            if lock is not None:
                lock.release()

    def _remove_unfinished(self, created_folder: bool) -> None:
        """A new run that failed before its first checkpoint leaves nothing it wrote (its folder too, if it made it)."""
        for name in run_files(self.out_dir):  # a new run starts from a folder without run files, so these are all its own
            path = self.out_dir / name
            if name == TEACHER_FOLDER:
                continue
            if path.is_file() and not path.is_symlink():
                path.unlink()
        if created_folder:
            (self.out_dir / FolderLock.NAME).unlink(missing_ok=True)
            try:
                self.out_dir.rmdir()
            except OSError:
                pass

    def _train_and_finish(self) -> dict:
        epochs = self.config.train.epochs
        for epoch in range(self.state["epoch"], epochs):
            if self.state["stopped_epoch"]:  # a resumed run that had stopped early (and was not extended)
                break
            started = time.perf_counter()
            record = {"epoch": epoch + 1, "lr": self.ctx.optimizer.param_groups[0]["lr"]}
            record.update(self._train_epoch(epoch))
            self.state["train_seconds"] += time.perf_counter() - started
            val = self.evaluate("val")
            record["val"] = val
            record["seconds"] = time.perf_counter() - started
            self.state["epoch"] = epoch + 1
            self.history.append(record)
            score = val[self.selection_metric]
            if score > self.state["best_val_score"]:
                self.state["best_val_score"] = score
                self.state["best_val_accuracy"] = val["accuracy"]
                self.state["best_epoch"] = epoch + 1
                config = self.config.to_dict()
                self._write("best.pt", {**self._weights(), "epoch": epoch + 1, "config": config,
                                        "fingerprint": config_fingerprint(config),
                                        "standardisation": self._standardisation_state()})
            for schedule in self.schedulers.values():
                step_after_epoch(schedule, score)
            self._check_early_stop(epoch + 1, score)
            self._write("last.pt", self._last_checkpoint())
            self._write_history()
            if self.loggers is not None:
                self.loggers.log(record, self.history)
            self.progress.epoch_summary(epoch_line(record, epochs, self.selection_metric))
            if self.state["stopped_epoch"]:
                t = self.config.train
                self.progress.epoch_summary(
                    f"early stop after epoch {epoch + 1}: validation {self.selection_metric} has not gained more than "
                    f"{t.early_stop_delta:g} for {t.early_stop} epochs; best epoch {self.state['best_epoch']}"
                )
                break
        return self.finish()

    def _check_early_stop(self, epoch: int, val_score: float) -> None:
        """Early stopping (``train.early_stop`` epochs of patience): mark the run stopped after ``epoch``.

        A gain counts when it exceeds ``early_stop_delta``; the run stops once
        ``early_stop`` epochs have passed since the last gain (so a run that
        never improves on its first epoch stops after early_stop + 1 epochs).
        The last epoch of the run is not an early stop.
        """
        t = self.config.train
        if t.early_stop == 0:
            return
        if val_score > self.state["early_stop_best"] + t.early_stop_delta:
            self.state["early_stop_best"] = val_score
            self.state["early_stop_epoch"] = epoch
        elif epoch - self.state["early_stop_epoch"] >= t.early_stop and epoch < t.epochs:
            self.state["stopped_epoch"] = epoch

    def _write_history(self) -> None:
        """metrics.jsonl, rewritten whole from the records (atomic: never torn, never through a link)."""
        if self.out_dir is not None and self.dist.is_main:
            atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def finish(self) -> dict:
        if self.out_dir is not None:
            self.dist.barrier()
            self.load_weights(self.out_dir / "best.pt")
        metrics = {
            "method": self.config.method,
            "parts": list(self.config.parts),
            "dataset": self.config.data.name,
            "seed": self.config.seed,
            "modalities": self.bundle.modalities,
            "num_classes": self.bundle.num_classes,
            "task": self.task,
            "selection_metric": self.selection_metric,
            "best_epoch": self.state["best_epoch"],
            "epochs": self.config.train.epochs,
            "stopped_epoch": self.state["stopped_epoch"] or None,
            "val": self.evaluate("val"),
            "test": self.evaluate("test"),
            "train_seconds": self.state["train_seconds"],
            "seconds_per_step": self.state["step_seconds"] / max(self.state["steps_timed"], 1),
            "world_size": self.dist.world_size,
            "dataset_info": self.bundle.info,
            "device": str(self.device),
        }
        if self.out_dir is not None and self.dist.is_main:
            atomic_write_json(self.out_dir / "metrics.json", metrics)
        return metrics


def train_run(config: RunConfig, out_dir: str | Path, quiet: bool = False, resume: bool = False,
              bundle: DataBundle | None = None, overwrite: bool = False, locked: bool = False) -> dict:
    trainer = Trainer(config, out_dir, quiet=quiet, bundle=bundle)
    try:
        return trainer.fit(resume=resume, overwrite=overwrite, locked=locked)
    finally:
        trainer.dist.shutdown()


def resumable_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The configuration last.pt was trained with, checked against config.yaml, with safe extensions.

    A hand-edited config.yaml is refused (the run would otherwise continue
    with the checkpoint's settings while config.yaml says others), naming the
    keys; ``overrides`` may change only ``SAFE_KEYS`` (``train.epochs`` to
    extend a run), and the result is written back to config.yaml.
    """
    from ..config import load_yaml, parse_override, set_dotted
    from ..methods.compose import part_class

    def pinned(raw: dict) -> dict:
        """The config with every epoch-dependent option resolved: an extension pins them, so compare pinned."""
        config = RunConfig(raw)
        out = config.to_dict()
        for name in config.parts:
            for option, value in part_class(name).pinned_options(config.section(name), config.train.epochs).items():
                out[name][option] = value
        return out

    checkpoint = load_checkpoint(run_dir / "last.pt", LAST_CHECKPOINT_KEYS)
    stored = checkpoint["config"]
    if not isinstance(stored, dict):
        raise MMBalanceError(f"{run_dir / 'last.pt'} is not an mmbalance checkpoint: its config is a {type(stored).__name__}")
    on_disk = RunConfig(load_yaml(run_dir / "config.yaml")).to_dict()
    mismatch = config_mismatch(pinned(stored), pinned(on_disk))
    if mismatch:
        raise MMBalanceError(
            f"{run_dir / 'config.yaml'} differs from the configuration last.pt was trained with ("
            + describe_mismatch(mismatch, "last.pt", "config.yaml")
            + f"); restore it, or change only {', '.join(SAFE_KEYS)} with --resume DIR --set KEY=VALUE"
        )
    raw = {**on_disk}
    changes = [parse_override(text) for text in overrides or []]
    for key, _ in changes:
        if key not in SAFE_KEYS:
            raise MMBalanceError(f"--set {key} cannot change when resuming (keys that can: {', '.join(SAFE_KEYS)})")
    if not changes:
        return RunConfig(raw)
    old = RunConfig(raw)
    for key, value in changes:
        if key == "train.epochs" and value != old.train.epochs:
            if old.train.scheduler == "cosine":
                raise MMBalanceError("train.epochs cannot change with train.scheduler=cosine: its schedule spans the original epochs")
            for name in old.parts:  # parts whose behaviour follows train.epochs keep their schedule
                for option, pinned in part_class(name).pinned_options(old.section(name), old.train.epochs).items():
                    set_dotted(raw, f"{name}.{option}", pinned)
        set_dotted(raw, key, value)
    config = RunConfig(raw)
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    return config


def resume_run(run_dir: str | Path, quiet: bool = False, overrides: list[str] | None = None, locked: bool = False) -> dict:
    run_dir = Path(run_dir)
    teachers_only = not (run_dir / "last.pt").is_file() and (run_dir / TEACHER_FOLDER).is_dir()
    if not (run_dir / "last.pt").is_file() and not teachers_only:
        raise MMBalanceError(f"nothing to resume in {run_dir}: no last.pt (start a new run with --out)")
    if not (run_dir / "config.yaml").is_file():
        raise MMBalanceError(f"cannot resume {run_dir}: its config.yaml is missing")
    if teachers_only:
        if overrides:
            raise MMBalanceError(f"{run_dir} has not finished an epoch yet; resume it without --set")
        config = RunConfig(load_yaml_file(run_dir / "config.yaml"))
        return train_run(config, run_dir, quiet=quiet, resume=True, locked=locked)
    config = resumable_config(run_dir, overrides)
    return train_run(config, run_dir, quiet=quiet, resume=True, locked=locked)
