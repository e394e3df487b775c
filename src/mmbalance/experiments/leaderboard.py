"""The leaderboard: every method on every dataset of a board, ranked on one Markdown page.

A board file (YAML, ``BoardConfig``) lists datasets × methods × seeds; each
dataset is a bench (``bench.py``) whose runs live in ``RUNS/ID/`` with bench's
folder names, so ``mmbalance bench ... --out RUNS/ID`` and the board share
runs. A dataset may also name finished benches as ``sources``: a run found
there with the board's resolved settings (bench's rule: only keys that change
no result may differ) is read, never trained again. Nothing is invented: a
row whose runs do not exist is rendered as "not yet measured", the header
counts how many planned rows are measured, and every derived value is cached
beside the runs with the fingerprint of what it was computed from:

    RUNS/ID/robustness/RUN.json   each run's accuracy under noise on the dominant modality
    RUNS/ID/linear/linear-seedN.json   the linear reference of one seed's split
    RUNS/ID/tune/LABEL-seed0/     the tuning study of a method's tuned row (bench --tune)

The page has one table per dataset, sorted by mean test accuracy: Δ against
joint paired by seed (``comparison.py``), the weak modality's modality-only
accuracy, the robustness AUC (``robustness.py``), and the step time against
joint read from ``benchmarks/step_time.py --json``. A figure ranks the
methods per dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import Field, ValidationError, field_validator

from ..config import RunConfig, Section, load_yaml
from ..errors import ConfigError, MMBalanceError
from ..evaluation.figures import chance_line, known_num_classes, place_legend, pyplot, save_figure, REFERENCE
from ..evaluation.labels import readable
from ..files import atomic_write_json, atomic_write_text
from ..methods.base import Objective
from ..methods.compose import resolve
from ..methods.spec import spec_string
from ..registry import METHODS
from ..training.trainer import config_mismatch, describe_mismatch
from .bench import REUSABLE_KEYS, plan_runs, run_name, run_planned
from .comparison import ALPHA, Comparison, cell, compare, how_to_read, unpaired_lines
from .linear_reference import L2_GRID, NAME as LINEAR, is_linear, reference_results
from .summary import fmt, mean_std

#: in a board's ``methods``: every registered part, objectives as themselves and plugins on joint
REGISTERED = "registered"
BASELINE = "joint"
NOT_MEASURED = "not yet measured"
NOT_AVAILABLE = "—"
TUNED = " (tuned)"
ID_PATTERN = r"[A-Za-z0-9_.-]+"


# -- the board file ---------------------------------------------------------------
class RobustnessSweep(Section):
    """The noise every run's best checkpoint is evaluated under, on the dataset's dominant modality."""

    corruption: str = Field("gaussian", description="a registered corruption (mmbalance list corruptions)")
    levels: list[float] = Field([0.0, 0.5, 1.0, 2.0, 4.0], min_length=1,
                                description="ε values, increasing; the AUC averages accuracy over them")
    fraction: float = Field(0.5, gt=0, le=1, description="share of the test samples corrupted")
    seed: int = Field(0, ge=0, description="seed of the corruption's draw")

    @field_validator("levels")
    @classmethod
    def _increasing(cls, levels: list[float]) -> list[float]:
        if any(v < 0 for v in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError("levels must be >= 0, distinct and increasing")
        return levels


class BoardDataset(Section):
    """One dataset of the board: a bench of the board's methods and seeds, with its own settings."""

    id: str = Field(..., pattern=rf"^{ID_PATTERN}$", description="name of the dataset's run folder and section")
    dataset: str = Field(..., description="a registered dataset")
    title: Optional[str] = Field(None, description="section heading (default: the dataset's name)")
    set: list[str] = Field(default_factory=list, description="bench's --set overrides, e.g. data.views=[fac,mor]")
    weak: str = Field(..., description="the modality joint training under-uses: its modality-only accuracy is a column")
    dominant: str = Field(..., description="the modality the robustness column corrupts")
    linear: bool = Field(False, description="add the linear reference row (vector data only)")
    tune: int = Field(0, ge=0, description="trials of mmbalance tune per method for its tuned row; 0: no tuned rows")
    methods: Optional[list[str]] = Field(None, description="this dataset's methods instead of the board's")
    sources: list[str] = Field(default_factory=list,
                               description="finished bench folders whose runs are read when their settings match")
    step_time_encoder: Optional[str] = Field(
        None, description="the step_time.py setting whose ratios this dataset's column shows; none: '—'")


class BoardConfig(Section):
    """A leaderboard: where it is written, its methods and seeds, and its datasets."""

    output: str = Field("docs/leaderboard.md", description="the Markdown page")
    figure: str = Field("docs/img/leaderboard.png", description="the ranking figure (a PDF is written beside it)")
    runs: str = Field("runs/leaderboard", description="the folder of the board's benches, one per dataset id")
    seeds: int = Field(5, ge=1, description="seeds per method (a seed sets the split)")
    test: Literal["t", "wilcoxon"] = Field("t", description="paired test of the Δ column")
    methods: list[str] = Field([REGISTERED], min_length=1,
                               description=f"method specs; '{REGISTERED}': every registered part")
    step_time: Optional[str] = Field(None, description="JSON written by benchmarks/step_time.py --json")
    robustness: RobustnessSweep = Field(default_factory=RobustnessSweep,
                                        description="the noise sweep of the AUC column (its keys below)")
    datasets: list[BoardDataset] = Field(..., min_length=1, description="the board's datasets (their keys below)")


def load_board(path: str | Path) -> BoardConfig:
    """The board file, validated: unknown keys, bad values and repeated ids are one-line errors."""
    raw = load_yaml(path)
    try:
        board = BoardConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc)}") from None
    ids = [d.id for d in board.datasets]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{path}: dataset id {repeated[0]!r} is used twice; give each dataset its own id")
    for spec in [*board.methods, *(m for d in board.datasets for m in d.methods or [])]:
        if is_linear(spec):
            raise ConfigError(f"{path}: '{LINEAR}' is not a method of the list; set `linear: true` on the datasets it fits")
    return board


def validation_message(exc: ValidationError) -> str:
    """The first error as ``key: problem``, naming the allowed keys for an unknown one."""
    first = exc.errors()[0]
    location = [str(p) for p in first["loc"]]
    key = ".".join(location)
    if first["type"] == "extra_forbidden":
        schema = BoardConfig
        for part in location[:-1]:
            annotation = schema.model_fields[part].annotation if part in schema.model_fields else None
            inner = getattr(annotation, "__args__", (annotation,))[0] if annotation is not None else None
            schema = inner if isinstance(inner, type) and issubclass(inner, Section) else schema
        return f"unknown key '{key}' (allowed keys here: {', '.join(schema.model_fields)})"
    if first["type"] == "missing":
        return f"'{key}' is required"
    return f"invalid value for {key}: {first.get('input')!r} ({first['msg']})"


def registered_methods() -> list[str]:
    """Every registered part as the board runs it: joint, the other objectives, then each plugin on joint."""
    names = METHODS.names()
    objectives = [n for n in names if n != BASELINE and issubclass(METHODS.get(n), Objective)]
    plugins = [f"{BASELINE}+{n}" for n in names if not issubclass(METHODS.get(n), Objective)]
    return [BASELINE, *objectives, *plugins]


def expand_methods(methods: list[str]) -> list[str]:
    """The method specs with ``registered`` expanded; each method once, joint first (the baseline)."""
    specs: list[str] = []
    for spec in methods:
        specs += registered_methods() if spec.strip() == REGISTERED else [spec]
    labels: dict[str, str] = {}
    for spec in specs:
        labels.setdefault(spec_string(resolve(spec), with_options=True), spec)
    ordered = list(labels.values())
    baseline = [s for s in ordered if spec_string(resolve(s), with_options=True) == BASELINE]
    return baseline + [s for s in ordered if s not in baseline]


# -- what a row holds -------------------------------------------------------------
@dataclass
class Row:
    """One line of a dataset's table: a method's runs over the board's seeds (or fewer, so far)."""

    label: str
    kind: Literal["default", "tuned", "linear"]
    planned: int
    results: list[dict] = field(default_factory=list)  # metrics of the runs found, labelled
    sweeps: list[dict] = field(default_factory=list)  # robustness records of the runs that have one
    step_ratio: Optional[float] = None
    note: str = ""

    @property
    def measured(self) -> int:
        return len(self.results)

    @property
    def accuracy(self) -> float:
        return mean_std([r["test"]["accuracy"] for r in self.results])[0]


@dataclass
class DatasetBoard:
    """One dataset of the board, as collected: its rows, where they were read from, what to say about them."""

    entry: BoardDataset
    rows: list[Row]
    folders: list[tuple[Path, str]]  # every folder read, with what was found there
    notes: list[str]
    bench_command: str
    num_classes: Optional[int] = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)


# -- finding runs -----------------------------------------------------------------
def find_run(name: str, config: RunConfig, folders: list[Path], skipped: list[str]) -> Optional[Path]:
    """The first finished ``FOLDER/name`` trained with ``config``'s settings; other settings are noted in ``skipped``."""
    for folder in folders:
        run_dir = folder / name
        if not (run_dir / "metrics.json").is_file() or not (run_dir / "config.yaml").is_file():
            continue
        try:
            stored = RunConfig(load_yaml(run_dir / "config.yaml")).to_dict()
        except MMBalanceError as exc:
            skipped.append(f"`{run_dir}`: its config.yaml is not this version's ({exc})")
            continue
        mismatch = config_mismatch(stored, config.to_dict(), REUSABLE_KEYS)
        if mismatch:
            skipped.append(f"`{run_dir}`: trained with other settings ({describe_mismatch(mismatch, 'the run', 'the board')})")
            continue
        return run_dir
    return None


def read_metrics(run_dir: Path, label: str) -> dict:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise MMBalanceError(f"{run_dir / 'metrics.json'} cannot be read as JSON ({exc})") from None
    metrics["label"] = label
    metrics["run_dir"] = str(run_dir)
    return metrics


def fingerprint(path: Path) -> str:
    """What a cached value was computed from: the run's metrics.json changes whenever the run is trained again."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_cache(path: Path, key: dict, fields: tuple[str, ...]) -> Optional[dict]:
    """The cached value stored under ``key``; None when absent, unreadable, incomplete or computed from something else."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or any(f not in stored for f in fields):
        return None
    return stored


# -- robustness, the linear reference, tuned configs, step times ------------------------
def sweep_key(sweep: RobustnessSweep, target: str, run_dir: Path) -> dict:
    return {**sweep.model_dump(), "target": target, "run": str(run_dir), "metrics": fingerprint(run_dir / "metrics.json")}


def robustness_record(run_dir: Path, sweep: RobustnessSweep, target: str, cache: Path, compute: bool,
                      log: Callable[[str], None]) -> Optional[dict]:
    """The run's accuracy under the sweep on ``target`` and its AUC, from the cache or (``compute``) evaluated now."""
    from .robustness import area_under_curve, build_corruptions, check_applicable, evaluate_run, load_run, resolve_targets

    key = sweep_key(sweep, target, run_dir)
    cached = read_cache(cache, key, ("clean_accuracy", "accuracy", "auc"))
    if cached is not None or not compute:
        return cached
    trainer = load_run(run_dir)
    corruptions = build_corruptions(sweep.corruption, sweep.levels, sweep.fraction, sweep.seed, None)
    targets = resolve_targets([target], trainer.bundle.modalities)
    check_applicable(corruptions[-1], trainer.bundle, targets)
    log(f"robustness: {run_dir}: {sweep.corruption} on {target}")
    evaluated = evaluate_run(trainer, corruptions, targets, lambda text: None)
    accuracy = evaluated["accuracy"][target]
    record = {"key": key, "clean_accuracy": evaluated["clean_accuracy"], "accuracy": accuracy,
              "auc": area_under_curve(sweep.levels, accuracy)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, record)
    return record


def linear_key(config: RunConfig) -> dict:
    """What the linear reference of a seed depends on: the data settings and the seed (where the data lives aside)."""
    settings = config.to_dict()
    data = {k: v for k, v in settings["data"].items() if f"data.{k}" not in REUSABLE_KEYS}
    return {"data": data, "dataset": settings.get(config.data.name, {}), "seed": config.seed, "grid": list(L2_GRID)}


def linear_result(config: RunConfig, cache: Path, compute: bool, log: Callable[[str], None]) -> Optional[dict]:
    key = linear_key(config)
    cached = read_cache(cache, key, ("result",))
    if cached is not None:
        return cached["result"]
    if not compute:
        return None
    result = reference_results([config], log)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, {"key": key, "result": result})
    return result


def tunable(label: str, config: RunConfig, overrides: list[str]) -> bool:
    from .tune import fixed_keys, search_space

    return bool(search_space(config, fixed_keys(label, overrides)))


def finished_trials(study_dir: Path) -> int:
    try:
        with open(study_dir / "trials.csv", newline="") as handle:
            return sum(row.get("state") in ("complete", "pruned") for row in csv.DictReader(handle))
    except OSError:
        return 0


def existing_tuned_config(label: str, base: RunConfig, trials: int, board_dir: Path, overrides: list[str]) -> Optional[RunConfig]:
    """The best config of the method's finished study (bench --tune's folder), or None while it has fewer trials."""
    from .tune import RECORD_FILE, fixed_keys, search_space, study_identity

    study_dir = board_dir / "tune" / run_name(label, base.seed)
    if not (study_dir / "best.yaml").is_file() or finished_trials(study_dir) < trials:
        return None
    try:
        record = json.loads((study_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    identity = study_identity(base, search_space(base, fixed_keys(label, overrides)))
    if record.get("config") != identity["config"] or record.get("space") != identity["space"]:
        return None  # a study of other settings: its best is not this board's
    return RunConfig(load_yaml(study_dir / "best.yaml"))


def load_step_times(path: Optional[str]) -> tuple[dict[tuple[str, str], float], Optional[dict], str]:
    """(encoder setting, method label) -> median step time / joint's; the file's environment; a note when missing."""
    if path is None:
        return {}, None, "no step-time file is configured"
    file = Path(path)
    if not file.is_file():
        return {}, None, f"`{path}` does not exist yet: write it with `python benchmarks/step_time.py --json {path}`"
    try:
        data = json.loads(file.read_text())
        rows = data["results"]
        ratios = {}
        for row in rows:
            try:
                label = spec_string(resolve(row["method"]), with_options=True)
            except MMBalanceError:
                continue  # a method this version no longer knows
            ratios[(row["encoder"], label)] = float(row["ratio_to_joint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MMBalanceError(f"{path} is not a step_time.py --json file ({type(exc).__name__}: {exc})") from None
    return ratios, data.get("environment"), ""


# -- collecting a dataset -------------------------------------------------------------
@dataclass
class Work:
    """What the command may do for a dataset: train missing runs, and compute sweeps and the linear reference."""

    train: bool
    compute: bool
    jobs: int = 1
    quiet: bool = True


def bench_command(entry: BoardDataset, methods: list[str], seeds: int, board_dir: Path) -> str:
    sets = "".join(f" --set '{s}'" for s in entry.set)
    listed = ",".join(methods + ([LINEAR] if entry.linear else []))
    return f"mmbalance bench --dataset {entry.dataset} --methods '{listed}' --seeds {seeds}{sets} --out {board_dir}"


def collect_dataset(board: BoardConfig, entry: BoardDataset, plan: list, work: Work, step_times: dict,
                    log: Callable[[str], None]) -> DatasetBoard:
    """Every planned row of one dataset from the runs that exist (training the missing ones when ``work.train``)."""
    board_dir = Path(board.runs) / entry.id
    methods = expand_methods(entry.methods or board.methods)
    folders = [board_dir, *(Path(s) for s in entry.sources)]
    notes: list[str] = []
    skipped: list[str] = []
    if work.train:
        check_dataset(entry, board.robustness, plan[0][2])

    labels = list(dict.fromkeys(label for label, _, _ in plan))
    rows = {label: Row(label, "default", board.seeds) for label in labels}
    if entry.linear:  # before any training, as bench does: data it cannot read stops the board at once
        rows[LINEAR] = Row(LINEAR, "linear", board.seeds)
        for _, _, config in (p for p in plan if p[0] == labels[0]):  # one config per seed
            cache = board_dir / "linear" / f"{LINEAR}-seed{config.seed}.json"
            result = linear_result(config, cache, work.compute, log)
            if result is not None:
                rows[LINEAR].results.append(result)

    located = locate(plan, folders, skipped)
    if work.train:
        located.update(train_missing([p for p in plan if located[p[1]] is None], board_dir, work, log))

    tuned_plan_rows: list = []
    if entry.tune:
        firsts = {label: config for label, _, config in reversed(plan)}
        tunable_labels = [label for label in labels if tunable(label, firsts[label], entry.set)]
        tuned_plan_rows, unfinished = tuned_rows(entry, plan, tunable_labels, board_dir, work, log)
        for label in tunable_labels:
            note = "study not finished" if label in unfinished else ""
            rows[label + TUNED] = Row(label + TUNED, "tuned", board.seeds, note=note)
        tuned_located = locate(tuned_plan_rows, folders, skipped)
        if work.train:
            tuned_located.update(train_missing([p for p in tuned_plan_rows if tuned_located[p[1]] is None],
                                               board_dir, work, log))
        located.update(tuned_located)

    for label, name, config in [*plan, *tuned_plan_rows]:
        run_dir = located.get(name)
        if run_dir is None:
            continue
        metrics = read_metrics(run_dir, label)
        modalities = metrics.get("modalities", [])
        for role, modality in (("weak", entry.weak), ("dominant", entry.dominant)):
            if modalities and modality not in modalities:
                raise ConfigError(f"dataset '{entry.id}': {role} modality {modality!r} is not one of its runs' "
                                  f"({', '.join(modalities)})")
        rows[label].results.append(metrics)
        cache = board_dir / "robustness" / f"{name}.json"
        record = robustness_record(run_dir, board.robustness, entry.dominant, cache, work.compute, log)
        if record is not None:
            rows[label].sweeps.append(record)
            if abs(record["clean_accuracy"] - metrics["test"]["accuracy"]) > 1e-9:
                notes.append(f"`{run_dir}`: its best checkpoint, evaluated again, gives {100 * record['clean_accuracy']:.2f}% "
                             f"on test, not the {100 * metrics['test']['accuracy']:.2f}% of its metrics.json.")

    encoder = entry.step_time_encoder
    for row in rows.values():
        base = row.label[: -len(TUNED)] if row.kind == "tuned" else row.label
        row.step_ratio = step_times.get((encoder, base)) if encoder and row.kind != "linear" else None

    found = [(folder, sum(str(r.get("run_dir", "")).startswith(str(folder) + os.sep)
                          for row in rows.values() for r in row.results)) for folder in folders]
    described = [(folder, f"{count} runs" if count or folder.is_dir() else "none yet") for folder, count in found]
    notes += [f"Not read, {text}." for text in dict.fromkeys(skipped)]
    waiting = [f"`{row.label}`" for row in rows.values() if row.note and not row.measured]
    if waiting:
        notes.append(f"No study of {entry.tune} finished trials yet (bench --tune's `{board_dir}/tune/`) for "
                     + ", ".join(waiting) + ".")
    section = DatasetBoard(entry, list(rows.values()), described, notes, bench_command(entry, methods, board.seeds, board_dir))
    results = [r for row in section.rows for r in row.results]
    section.comparisons = compare(results, BASELINE, board.test) if results else {}
    first = next((row.results[0] for row in section.rows if row.results and row.kind != "linear"), None)
    section.num_classes = known_num_classes(first, plan[0][2].to_dict())
    return section


def locate(plan: list, folders: list[Path], skipped: list[str]) -> dict[str, Optional[Path]]:
    return {name: find_run(name, config, folders, skipped) for _, name, config in plan}


def train_missing(missing: list, board_dir: Path, work: Work, log: Callable[[str], None]) -> dict[str, Path]:
    """Train (or resume) the missing runs in the board's folder, through bench's own machinery."""
    if not missing:
        return {}
    from ..training.trainer import check_writable
    from .jobs import check_jobs, run_in_processes

    check_jobs(work.jobs)
    check_writable(board_dir)
    if work.jobs > 1:
        run_in_processes(missing, board_dir, work.jobs, log)
    else:
        for k, (label, name, config) in enumerate(missing, 1):
            run_planned(k, len(missing), label, name, config, board_dir, work.quiet, log)
    return {name: board_dir / name for _, name, _ in missing}


def tuned_rows(entry: BoardDataset, plan: list, tunable_labels: list[str], board_dir: Path, work: Work,
               log: Callable[[str], None]) -> tuple[list, set[str]]:
    """The tuned rows' runs (label ``X (tuned)``) and the labels whose study is not finished yet.

    With ``work.train`` the studies run (bench --tune's ``tuned_plan``, same folders); otherwise only
    finished studies count.
    """
    subset = [p for p in plan if p[0] in tunable_labels]
    if work.train and subset:
        from .tune import tuned_plan

        return [p for p in tuned_plan(subset, entry.tune, board_dir, entry.dataset, entry.set, None, work.quiet, log, run_name)
                if p[0].endswith(TUNED)], set()
    rows, missing = [], set()
    for label in tunable_labels:
        configs = [config for row_label, _, config in subset if row_label == label]
        best = existing_tuned_config(label, configs[0], entry.tune, board_dir, entry.set)
        if best is None:
            missing.add(label)
            continue
        rows += [(label + TUNED, run_name(label + TUNED, c.seed), best.replace(seed=c.seed)) for c in configs]
    return rows, missing


def check_dataset(entry: BoardDataset, sweep: RobustnessSweep, config: RunConfig) -> None:
    """Before anything trains: the weak and dominant modalities are the data's, and the sweep fits the dominant one."""
    from ..data.loading import load_dataset
    from .robustness import build_corruptions, check_applicable

    bundle = load_dataset(config)
    for role, name in (("weak", entry.weak), ("dominant", entry.dominant)):
        if name not in bundle.modalities:
            raise ConfigError(f"dataset '{entry.id}': {role} modality {name!r} is not one of {entry.dataset}'s "
                              f"({', '.join(bundle.modalities)})")
    corruptions = build_corruptions(sweep.corruption, sweep.levels, sweep.fraction, sweep.seed, None)
    check_applicable(corruptions[-1], bundle, {entry.dominant: [entry.dominant]})


# -- the whole board --------------------------------------------------------------------
@dataclass
class Board:
    config: BoardConfig
    sections: list[DatasetBoard]
    step_environment: Optional[dict]
    step_note: str


def build_board(board: BoardConfig, *, train: bool, compute: bool, only: Optional[list[str]] = None, jobs: int = 1,
                quiet: bool = True, log: Optional[Callable[[str], None]] = None) -> Board:
    """Collect every dataset; ``only`` (dataset ids) limits training and computing, never what is rendered."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    ids = [d.id for d in board.datasets]
    for name in only or []:
        if name not in ids:
            raise ConfigError(f"--datasets names {name!r}, which is not a dataset of the board (its ids: {', '.join(ids)})")
    # every dataset's plan first, so that a typo anywhere fails before anything trains
    plans = {d.id: plan_runs(d.dataset, expand_methods(d.methods or board.methods), board.seeds, d.set) for d in board.datasets}
    for entry in board.datasets:
        if plans[entry.id][0][0] != BASELINE:
            raise ConfigError(f"dataset '{entry.id}': every row is compared with {BASELINE}; add {BASELINE} to its methods")
    step_times, environment, step_note = load_step_times(board.step_time)
    sections = []
    for entry in board.datasets:
        working = only is None or entry.id in only
        work = Work(train=train and working, compute=compute and working, jobs=jobs, quiet=quiet)
        log(f"{entry.id}: " + ("training what is missing" if work.train else "computing sweeps" if work.compute else "reading"))
        sections.append(collect_dataset(board, entry, plans[entry.id], work, step_times, log))
    return Board(board, sections, environment, step_note)


def write_board(result: Board, regenerate: str, rendered_by: str) -> list[Path]:
    """The figure (PNG and PDF), then the page, each written atomically; the paths written."""
    config = result.config
    output, figure = Path(config.output), Path(config.figure)
    written = []
    ranked = [s for s in result.sections if any(r.measured and r.kind != "linear" for r in s.rows)]  # a ranking of trained methods
    if ranked:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.parent.mkdir(parents=True, exist_ok=True)
        written += save_figure(ranking_figure(ranked, config.seeds), figure)
    text = render(result, regenerate, rendered_by, figure_link(figure, output) if ranked else None)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text)
    return written + [output]


def figure_link(figure: Path, output: Path) -> str:
    return Path(os.path.relpath(figure.resolve(), output.resolve().parent)).as_posix()


# -- the page ---------------------------------------------------------------------------
def counts(sections: list[DatasetBoard]) -> tuple[int, int, int]:
    """(planned rows, rows with every seed measured, rows with some seeds measured)."""
    rows = [row for s in sections for row in s.rows]
    return len(rows), sum(r.measured >= r.planned for r in rows), sum(0 < r.measured < r.planned for r in rows)


def data_dates(sections: list[DatasetBoard]) -> Optional[tuple[str, str]]:
    """The UTC dates of the oldest and newest run used (their metrics.json)."""
    stamps = [Path(r["run_dir"], "metrics.json").stat().st_mtime for s in sections for row in s.rows for r in row.results
              if "run_dir" in r]
    if not stamps:
        return None
    day = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
    return day(min(stamps)), day(max(stamps))


def date_sentence(dates: Optional[tuple[str, str]]) -> str:
    if dates is None:
        return "No run exists yet."
    if dates[0] == dates[1]:
        return f"Data: runs finished on {dates[0]} (UTC)."
    return f"Data: runs finished between {dates[0]} and {dates[1]} (UTC)."


def render(result: Board, regenerate: str, rendered_by: str, figure: Optional[str]) -> str:
    config = result.config
    planned, full, partly = counts(result.sections)
    dates = data_dates(result.sections)
    sweep = config.robustness
    parts = [
        "# Leaderboard", "",
        "Regenerate (trains what is missing, reuses every finished run with the same settings, then writes this page):",
        "", "```", regenerate, "```", "",
    ]
    if rendered_by != regenerate:
        parts += ["This version was rendered with", "", "```", rendered_by, "```", ""]
    parts += [
        f"**{full} of {planned} planned rows measured** (all {config.seeds} seeds each)"
        + (f", {partly} more with some of their seeds" if partly else "")
        + "; every other row says *" + NOT_MEASURED + "*. " + date_sentence(dates),
        "",
        "Test split, accuracies in %, mean ± std over the seeds measured (*seeds*: measured of planned); each table "
        "is sorted by mean test accuracy.",
        "",
        "- " + how_to_read(BASELINE, config.test),
        "- *W only*: the modality-only accuracy of the dataset's weak modality W (the fused head with every other "
        "modality's features zeroed), the one joint training under-uses.",
        f"- *AUC*: test accuracy under `{sweep.corruption}` noise on the dominant modality (a fraction "
        f"{sweep.fraction:g} of the test samples, seed {sweep.seed}), averaged over ε = "
        f"{', '.join(f'{v:g}' for v in sweep.levels)} (area under accuracy-vs-ε over the range; ε = 0 is the clean "
        "accuracy), from each run's best checkpoint (`mmbalance robust`'s evaluation).",
        "- *step ×*: median seconds per training step divided by joint's, timed interleaved with joint by "
        "`benchmarks/step_time.py` in the encoder setting named per dataset " + step_time_source(result)
        + "; a tuned row shows its method's cost at default options; —: no such measurement.",
        "- *linear*: logistic regression on the standardised features of every modality, L2 chosen on validation; "
        "*X (tuned)*: the method with the best options of a `mmbalance tune` study on seed 0's validation split.",
        "",
    ]
    if figure:
        pdf = Path(figure).with_suffix(".pdf").as_posix()
        parts += [f"![methods ranked by test accuracy per dataset]({figure}) (vector: [PDF]({pdf}))", ""]
    parts += ["| dataset | planned rows | measured | partly measured | runs read from |", "|---|---:|---:|---:|---|"]
    for section in result.sections:
        p, f, k = counts([section])
        read = ", ".join(f"`{folder}` ({what})" for folder, what in section.folders)
        parts.append(f"| [{section.entry.id}](#{anchor(section)}) | {p} | {f} | {k} | {read} |")
    parts.append("")
    for section in result.sections:
        parts += render_section(section, config)
    parts += how_it_is_made(result)
    return "\n".join(parts)


def how_it_is_made(result: Board) -> list[str]:
    """The closing section: what the command does, its options and the board file's keys (from their descriptions)."""
    config = result.config

    def keys(schema: type[Section]) -> list[str]:
        return [f"  - `{name}`: {info.description}" for name, info in schema.model_fields.items()]

    step_command = (result.step_environment or {}).get("command")
    parts = [
        "## How this page is made", "",
        "Each dataset of the board file is a bench: its runs are trained through `mmbalance bench`'s own machinery "
        f"into `{config.runs}/ID/` (run folders `METHOD-seedN`, locked while they train). A run is read from there or "
        "from the dataset's `sources` (finished benches) only when it was trained with the board's resolved "
        "settings (only keys that change no result, such as `data.root`, may differ); one trained with other settings "
        "is never read, and the section says so. Each run's robustness sweep and each seed's linear reference are "
        f"cached in `{config.runs}/ID/robustness/` and `{config.runs}/ID/linear/` with the fingerprint of what they "
        "were computed from, so a rerun evaluates only what is new. The page and the figure are written atomically.",
        "",
        "- `--only-existing`: train nothing; rows without runs stay *not yet measured* (sweeps over existing runs and "
        "the linear reference, both evaluation or a seconds-long convex fit, are still computed).",
        "- `--cached-only`: compute nothing either: runs and caches as they are.",
        "- `--datasets ID,...`: train and compute only for these datasets; the page still shows every dataset.",
        "- `--config PATH` (default `benchmarks/leaderboard.yaml`), `--jobs K` (runs at once, as `bench --jobs`), "
        "`--quiet`.",
        "",
        "The board file's keys:", "",
        *[f"- `{name}`: {info.description}" for name, info in BoardConfig.model_fields.items()],
        "- under `robustness`:", *keys(RobustnessSweep),
        "- under each of `datasets`:", *keys(BoardDataset),
        "",
    ]
    if step_command:
        parts += ["The step-time file was written by", "", "```", step_command, "```", ""]
    return parts


def step_time_source(result: Board) -> str:
    if result.step_environment is None:
        return f"({result.step_note})"
    env = result.step_environment
    return (f"(`{result.config.step_time}`, timed on {env.get('device', '?')} with {env.get('torch_threads', '?')} "
            "torch threads; its command is under *How this page is made*)")


def anchor(section: DatasetBoard) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading(section).lower()).replace(" ", "-")


def heading(section: DatasetBoard) -> str:
    return f"{section.entry.id}: {section.entry.title}" if section.entry.title else section.entry.id


def sorted_rows(rows: list[Row]) -> list[Row]:
    measured = sorted((r for r in rows if r.measured), key=lambda r: (-r.accuracy, r.label))
    return measured + [r for r in rows if not r.measured]


def render_section(section: DatasetBoard, config: BoardConfig) -> list[str]:
    entry = section.entry
    p, f, k = counts([section])
    parts = [f"## {heading(section)}", "",
             f"{f} of {p} planned rows measured" + (f", {k} partly" if k else "") + ". The same runs as", "",
             "```", section.bench_command, "```", ""]
    if entry.tune:
        parts += [f"and, for the tuned rows, the same with `--tune {entry.tune}`.", ""]
    if not any(r.measured for r in section.rows):
        listed = ", ".join(f"`{r.label}`" for r in section.rows)
        parts += [f"Nothing measured yet: every planned row is {NOT_MEASURED} ({listed}).", ""]
        return parts + ([f"- {note}" for note in section.notes] + [""] if section.notes else [])
    header = ["#", "method", "seeds", "test accuracy", f"Δ vs {BASELINE}", f"{entry.weak} only",
              f"AUC, noise on {entry.dominant}", "step ×"]
    parts += ["| " + " | ".join(header) + " |", "|---:|---|---:|---|---|---|---|---:|"]
    joint_measured = any(r.label == BASELINE and r.measured for r in section.rows)
    for rank, row in enumerate(sorted_rows(section.rows), 1):
        parts.append("| " + " | ".join(row_cells(row, rank, section, joint_measured)) + " |")
    parts.append("")
    parts += unpaired_lines(section.comparisons)
    if section.notes:
        parts += [f"- {note}" for note in section.notes] + [""]
    return parts


def row_cells(row: Row, rank: int, section: DatasetBoard, joint_measured: bool) -> list[str]:
    step = f"{row.step_ratio:.2f}" if row.step_ratio is not None else NOT_AVAILABLE
    seeds = f"{row.measured}/{row.planned}"
    if not row.measured:
        return ["–", f"`{row.label}`", seeds, NOT_MEASURED, NOT_MEASURED,
                NOT_AVAILABLE if row.kind == "linear" else NOT_MEASURED,
                NOT_AVAILABLE if row.kind == "linear" else NOT_MEASURED, step]
    accuracy = fmt([r["test"]["accuracy"] for r in row.results])
    if row.label == BASELINE:
        delta = "(baseline)"
    elif not joint_measured:
        delta = f"{NOT_MEASURED} (no {BASELINE} runs)"
    else:
        delta = cell(section.comparisons.get(row.label))
    if row.kind == "linear":
        weak = auc = NOT_AVAILABLE
    else:
        weak = fmt([r["test"].get("modality_accuracy", {}).get(section.entry.weak, math.nan) for r in row.results])
        auc = fmt([s["auc"] for s in row.sweeps]) if row.sweeps else NOT_MEASURED
        if row.sweeps and len(row.sweeps) < row.measured:
            auc += f" ({len(row.sweeps)} of {row.measured} runs)"
    return [str(rank), f"`{row.label}`", seeds, accuracy, delta, weak, auc, step]


# -- the figure -------------------------------------------------------------------------
def ranking_figure(sections: list[DatasetBoard], seeds: int):
    """Per dataset, the measured methods by mean test accuracy (± std over seeds), coloured by their Δ against joint."""
    plt = pyplot()
    widest = max(sum(r.measured > 0 for r in s.rows) for s in sections)
    fig, axes = plt.subplots(len(sections), 1, figsize=(max(7.0, 0.32 * widest + 2.5), 3.6 * len(sections)), squeeze=False)
    styles = {
        "baseline": ("black", "D", f"{BASELINE} (baseline)"),
        "better": ("tab:green", "o", f"above {BASELINE} (p < {ALPHA:g})"),
        "worse": ("tab:red", "o", f"below {BASELINE} (p < {ALPHA:g})"),
        "same": ("tab:blue", "o", "no significant difference"),
        "linear": ("0.45", "s", "linear reference"),
    }
    for ax, section in zip(axes[:, 0], sections):
        rows = [r for r in sorted_rows(section.rows) if r.measured]
        seen = set()
        lows, highs = [], []
        for x, row in enumerate(rows):
            mean, std = (100 * v for v in mean_std([r["test"]["accuracy"] for r in row.results]))
            kind = style_of(row, section.comparisons)
            colour, marker, name = styles[kind]
            ax.errorbar([x], [mean], yerr=[std] if row.measured > 1 else None, fmt=marker, color=colour, capsize=3,
                        markersize=5, label=None if kind in seen else name)
            seen.add(kind)
            lows.append(mean - (std if row.measured > 1 else 0))
            highs.append(mean + (std if row.measured > 1 else 0))
        joint = next((r for r in rows if r.label == BASELINE), None)
        if joint is not None:
            ax.axhline(100 * joint.accuracy, color="black", linestyle="--", linewidth=0.8, gid=REFERENCE, zorder=1)
        margin = max(1.0, 0.1 * (max(highs) - min(lows)))
        low, high = max(0.0, min(lows) - margin), min(100.0, max(highs) + margin)
        if section.num_classes and low <= 100 / section.num_classes <= high:
            chance_line(ax, section.num_classes)
        ax.set_ylim(low, high)  # zoomed to the methods: the ranking is the point
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.label for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.7, len(rows) - 0.3)
        ax.set_ylabel(readable("test/accuracy"))
        ax.set_title(f"{heading(section)} (mean ± std over up to {seeds} seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    for ax in axes[:, 0]:
        place_legend(ax)
    return fig


def style_of(row: Row, comparisons: dict[str, Comparison]) -> str:
    if row.label == BASELINE:
        return "baseline"
    if row.kind == "linear":
        return "linear"
    comparison = comparisons.get(row.label)
    if comparison is None or not comparison.significant:
        return "same"
    return "better" if comparison.mean > 0 else "worse"

