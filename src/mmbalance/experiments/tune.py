"""``mmbalance tune``: a seeded search over a method's declared search space, on validation accuracy.

Tuning folder (``--out DIR``)::

    tune.json    what is tuned: the study's name, base config and search space
    study.db     the Optuna study (SQLite), unless --storage names another database
    best.yaml    the best trial's resolved config: mmbalance train --config DIR/best.yaml --out RUN
    trials.csv   one line per trial: number, state, value, epochs, every parameter
    trials.md    the same as a table, with the command and the best trial
    search.png   each trial's value and the best so far (and search.pdf)

The space is every part's ``search_space`` (objective and plugins; with
``tune_train`` also the trainer's lr and weight decay), less the keys the
command fixes itself (a spec's bracketed options and ``--set``): fix an option
by giving it. Every trial trains with the same seed on the same split, in
memory (no run folder: ``study.py``), and its value is the best validation
accuracy over its epochs; the test split is never read. A median pruner stops
a trial whose validation accuracy falls below the median of the earlier trials
at the same epoch.

Rerunning the same command continues the study until it holds N finished
(complete or pruned) trials, so ``--trials 40`` after ``--trials 20`` adds 20;
a trial that a kill interrupted runs again with the same parameters. A
different command on the same folder is refused unless ``overwrite``. With
``storage`` (any database URL Optuna accepts, e.g. ``postgresql://...``)
several machines run one study: each runs the same command with its own
``--out``, and each folder's reports describe the whole study.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..config import RunConfig, TrainConfig, build_config, parse_override
from ..errors import MMBalanceError
from ..extras import require
from ..files import FolderLock, atomic_write_json, atomic_write_text
from ..methods.compose import part_class
from ..methods.spec import parse_spec
from ..search_space import TRAIN_SPACE, Range, check_space
from ..training.checkpoint import differing_keys
from .bench import REUSABLE_KEYS

STUDY_FILE = "study.db"
RECORD_FILE = "tune.json"
OUTPUTS = (RECORD_FILE, STUDY_FILE, "best.yaml", "trials.csv", "trials.md", "search.png", "search.pdf")
#: settings that may differ between the machines of one study (where the data lives, the device, loaders, loggers)
LOCAL_KEYS = REUSABLE_KEYS


def require_optuna():
    return require("optuna", extra="tune", feature="tuning")


def fixed_keys(method: str, overrides: list[str]) -> set[str]:
    """The dotted keys the command sets itself (a spec's bracketed options, ``--set``): never tuned."""
    keys = {f"{part.name}.{key}" for part in parse_spec(method) for key in part.options}
    return keys | {parse_override(text)[0] for text in overrides}


def search_space(config: RunConfig, fixed: set[str] = frozenset(), tune_train: bool = False) -> dict[str, Range]:
    """Dotted key -> range over every part of the run (objective first), checked against each option."""
    sections = [(name, part_class(name).Config, getattr(part_class(name), "search_space", {})) for name in config.parts]
    if tune_train:
        sections.append(("train", TrainConfig, TRAIN_SPACE))
    space: dict[str, Range] = {}
    for section, schema, declared in sections:
        check_space(section, schema, declared)
        space.update({f"{section}.{key}": value for key, value in declared.items() if f"{section}.{key}" not in fixed})
    return space


def study_identity(config: RunConfig, space: dict[str, Range]) -> dict:
    """What makes two commands the same study: the base config (less machine-local keys) and the space."""
    settings = config.to_dict()
    for key in LOCAL_KEYS:
        section, option = key.split(".")
        settings.get(section, {}).pop(option, None)
    identity = {"config": settings, "space": {key: f"{type(value).__name__} {value}" for key, value in space.items()}}
    return json.loads(json.dumps(identity, default=str))  # as tune.json will hold it


def study_name(config: RunConfig, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{config.data.name}-{config.method}-{digest}"


def tune(
    dataset: str | None,
    method: str,
    trials: int,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    config_file=None,
    *,
    seed: int = 0,
    storage: str | None = None,
    tune_train: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict:
    """Run (or continue) the study to ``trials`` finished trials; write its folder; return the best trial.

    Returns ``{"study", "best", "config", "counts"}``: ``best`` is ``{"number",
    "value", "params"}`` (None while no trial completed) and ``config`` its
    resolved RunConfig.
    """
    require_optuna()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise MMBalanceError(f"--trials must be a whole number >= 1, got {trials!r}")
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    log = log or ((lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True)))
    base = build_config(config_file, overrides, dataset=dataset, method=method, seed=seed)
    space = search_space(base, fixed_keys(method, overrides), tune_train)
    if not space:
        raise MMBalanceError(
            f"nothing to tune for '{base.method}': its parts declare no search space, or the command fixes every key "
            "(see: mmbalance list options NAME); --tune-train adds train.lr and train.weight_decay"
        )
    identity = study_identity(base, space)
    name = study_name(base, identity)

    from ..data.loading import load_dataset
    from . import study as studies

    bundle = load_dataset(base)  # data problems surface before the folder is touched
    previous = _check_folder(out_dir, identity, overwrite)
    created = not out_dir.exists()
    lock = FolderLock(out_dir).acquire()
    restore_logging = studies.quiet_optuna()
    try:
        url = storage or f"sqlite:///{(out_dir / STUDY_FILE).resolve()}"
        if overwrite:
            _remove_outputs(out_dir)
            if storage:
                for old in {previous, name} - {None}:
                    studies.delete_study(storage, old)
        try:
            study = studies.open_study(url, name, seed, shared=storage is not None, epochs=base.train.epochs)
        except MMBalanceError:
            if created:
                lock.release()
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        atomic_write_json(out_dir / RECORD_FILE, {"study": name, "storage": "external" if storage else STUDY_FILE,
                                                  "seed": seed, "tune_train": tune_train, **identity})
        if storage is None:  # this folder's lock is held: a running trial there belongs to a killed process
            stale = studies.fail_stale_trials(study)
            if stale:
                log(f"trial {stale[0]} was interrupted; it runs again" if len(stale) == 1 else
                    f"trials {', '.join(map(str, stale))} were interrupted; they run again")
        run = studies.objective(base, space, bundle)

        def report(study, trial):
            done = studies.finished_trials(study)
            shown = " ".join(f"{k}={short_value(v)}" for k, v in trial.params.items())
            if trial.state.name == "COMPLETE":
                best = study.best_trial
                outcome = f"{100 * trial.value:.2f}% (best {100 * best.value:.2f}%, trial {best.number})"
            else:
                outcome = f"pruned after epoch {len(trial.intermediate_values)}"
            log(f"[{done}/{trials}] trial {trial.number}: {shown}: {outcome}")

        while studies.finished_trials(study) < trials:
            study.optimize(run, n_trials=1, callbacks=[report], gc_after_trial=True)
            _write_outputs(study, base, space, out_dir, trials, command, reports=False)
        return _write_outputs(study, base, space, out_dir, trials, command, reports=True) | {"study": name}
    finally:
        restore_logging()
        lock.release()


def _check_folder(out_dir: Path, identity: dict, overwrite: bool) -> str | None:
    """The study name the folder records (None if new); refuse another study's folder, or one with other files."""
    if not out_dir.is_dir():
        return None
    record = out_dir / RECORD_FILE
    others = [p.name for p in out_dir.iterdir() if p.name not in (*OUTPUTS, FolderLock.NAME)]
    if others:
        raise MMBalanceError(
            f"{out_dir} holds files that are not a study's ({', '.join(sorted(others)[:3])}); "
            "tune into an empty folder or a study's own"
        )
    if not record.is_file():
        return None
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        raise MMBalanceError(f"{record} is not a tuning record; tune into another folder") from None
    same = stored.get("config") == identity["config"] and stored.get("space") == identity["space"]
    if not same and not overwrite:
        keys = [key for key, _, _ in differing_keys(stored.get("config", {}), identity["config"])]
        if stored.get("space") != identity["space"]:
            keys.append("the search space")
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise MMBalanceError(
            f"{out_dir} holds a study of other settings (they differ in {shown}); continue it with its own "
            "command, use another --out, or replace it with --overwrite"
        )
    return stored.get("study")


def _remove_outputs(out_dir: Path) -> None:
    for name in OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)


def short_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_outputs(study, base: RunConfig, space: dict, out_dir: Path, trials: int, command: str | None,
                   reports: bool) -> dict:
    """best.yaml, trials.csv and trials.md after every trial; search.png too when ``reports``."""
    from . import study as studies
    from .tune_report import plot_search, write_trials_csv, write_trials_markdown

    rows = studies.trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: (r["value"], -r["number"])) if complete else None
    config = None
    if best is not None:
        config = base.replace(**best["params"])
        header = (f"# best of the tuning study in {out_dir}: trial {best['number']}, "
                  f"validation accuracy {100 * best['value']:.2f}%\n")
        atomic_write_text(out_dir / "best.yaml", header + config.to_yaml())
    keys = list(space)
    title = f"Tuning {base.method} on {base.data.name} (seed {base.seed})"
    write_trials_csv(rows, keys, out_dir / "trials.csv")
    write_trials_markdown(rows, keys, out_dir / "trials.md", title, command, best, trials)
    if reports:
        plot_search(rows, out_dir / "search.png", title)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "fail", "running")}
    summary = None if best is None else {k: best[k] for k in ("number", "value", "params")}
    return {"best": summary, "config": config, "counts": counts}


def tuned_plan(plan: list, trials: int, out_dir: Path, dataset: str, overrides: list[str], config_file,
               quiet: bool, log: Callable[[str], None], run_name: Callable[[str, int], str]) -> list:
    """``bench --tune N``: every method tuned with N trials on its first seed's split, then its rows
    replaced by the best config over the same seeds, labelled ``X (tuned)``. A method with nothing
    to tune keeps its rows as they are. The studies live in ``out_dir/tune/LABEL-seedS``."""
    first: dict[str, RunConfig] = {}
    for label, _, config in plan:
        first.setdefault(label, config)
    best: dict[str, RunConfig] = {}
    for label, config in first.items():
        if not search_space(config, fixed_keys(label, overrides)):
            log(f"{label}: declares no search space; runs untuned")
            continue
        folder = out_dir / "tune" / run_name(label, config.seed)
        result = tune(dataset, label, trials, folder, overrides, config_file, seed=config.seed, quiet=quiet,
                      log=lambda text, label=label: log(f"tune {label} {text}"))
        if result["config"] is None:
            raise MMBalanceError(f"no trial of {label} completed in {folder} (see its trials.md); nothing to run")
        best[label] = result["config"]
        log(f"tune {label}: best validation accuracy {100 * result['best']['value']:.2f}% (trial {result['best']['number']})")
    tuned = []
    for label, name, config in plan:
        if label in best:
            tuned_label = f"{label} (tuned)"
            tuned.append((tuned_label, run_name(tuned_label, config.seed), best[label].replace(seed=config.seed)))
        else:
            tuned.append((label, name, config))
    return tuned
