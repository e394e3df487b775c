"""Benchmark grids: every method x seed on one dataset, then a summary.

Each run lives in its own folder directly under the benchmark folder
(``SPEC-seedN``). A spec combines an objective with plugins and may carry
options, for ablations: ``midas[modulation_starts=0]+arl[temperature=4]``
runs MIDAS without warm-up and ARL with T = 4 and is reported under its full
spec (a plugin alone, ``arl``, is reported as ``joint+arl``). A
finished run (``metrics.json`` present) is reused on re-runs and an
interrupted one is resumed, so a killed benchmark continues where it
stopped, but only when the folder was trained with the same resolved
settings: a bench re-run with another ``--set`` refuses the folder, naming
the keys that differ. Each run folder is locked while a bench works on it,
so two benches on one ``--out`` never train a run twice (the second waits
and then reuses it). ``results.jsonl`` and ``summary.md`` are rebuilt from
the run folders every time.

The summary compares every method with a baseline (``comparison.py``), paired
by seed. ``linear`` in the methods adds the linear reference
(``linear_reference.py``): not trained by the trainer and kept in no folder,
it is fitted again on every bench (seconds, deterministic), before any run
trains, so data it cannot read stops the bench at once.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Sequence

from ..config import RunConfig, build_config, load_yaml
from ..errors import MMBalanceError
from ..evaluation.figures import known_num_classes
from ..files import FolderLock, atomic_write_text
from ..methods.compose import resolve
from ..methods.spec import spec_string
from ..training.trainer import check_writable, config_mismatch, describe_mismatch, resume_run, train_run
from .comparison import compare, default_baseline, how_to_read, label_of, unpaired_lines
from .linear_reference import NAME as LINEAR, beaten_lines, is_linear, reference_results, split_reference
from .robustness import check_sweep, robustness_report
from .significance import TESTS
from .summary import bar_chart, fmt, headline, markdown_table


def run_name(label: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-")
    return f"{safe}-seed{seed}"


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """A count (5: seeds 0..4) or the seeds themselves ([0, 3, 7]: exactly those), each once."""
    if isinstance(seeds, bool):
        raise MMBalanceError(f"--seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise MMBalanceError(f"--seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    chosen = list(seeds)
    if not chosen or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in chosen):
        raise MMBalanceError(f"--seeds must be a count or a list of seeds >= 0, e.g. 0,3,7; got {chosen!r}")
    repeated = sorted({s for s in chosen if chosen.count(s) > 1})
    if repeated:
        raise MMBalanceError(f"--seeds lists seed {repeated[0]} twice; each seed once")
    return chosen


def plan_runs(dataset: str, methods: list[str], seeds: int | Sequence[int], overrides: list[str],
              config_file=None) -> list[tuple[str, str, RunConfig]]:
    """Resolve every run's config first, so a typo fails before any training."""
    seeds = seed_list(seeds)
    if not methods:
        raise MMBalanceError("--methods is empty; give a comma-separated list such as joint,unimodal")
    plan = []
    labels: dict[str, str] = {}
    for spec in methods:
        label = spec_string(resolve(spec), with_options=True)  # the full spec: objective first, options kept
        if label in labels:
            raise MMBalanceError(f"--methods lists {label!r} twice ('{labels[label]}' and '{spec}'); each method once")
        labels[label] = spec
        for seed in seeds:
            config = build_config(config_file, overrides, dataset=dataset, method=spec, seed=seed)
            plan.append((label, run_name(label, seed), config))
    return plan


def choose_baseline(methods: list[str], baseline: str | None, test: str) -> str:
    """The label every method is compared with: ``baseline`` (a spec) if given, else joint or the first method."""
    if test not in TESTS:
        raise MMBalanceError(f"--test {test!r} is not a test (allowed: {', '.join(TESTS)})")
    labels = [LINEAR if is_linear(m) else spec_string(resolve(m), with_options=True) for m in methods]
    if baseline is None:
        return default_baseline(labels)
    label = LINEAR if is_linear(baseline) else spec_string(resolve(baseline), with_options=True)
    if label not in labels:
        raise MMBalanceError(f"--baseline {baseline!r} is not in --methods ({', '.join(labels)}); compare with one of them")
    return label


def run_bench(
    dataset: str,
    methods: list[str],
    seeds: int | Sequence[int],
    out_dir: str | Path,
    overrides: list[str] | None = None,
    config_file=None,
    quiet: bool = False,
    command: str | None = None,
    log=None,
    robust: tuple[str, list[float]] | None = None,
    tune: int = 0,
    jobs: int = 1,
    baseline: str | None = None,
    test: str = "t",
) -> list[dict]:
    """``robust``: (corruption, levels) for a robustness report over every run, in ``out_dir/robustness``.

    ``tune``: N trials of ``mmbalance tune`` per method first (``tune.tuned_plan``); ``jobs``: runs at
    once, in worker processes (``jobs.py``), with the same folders and reports as one at a time.
    """
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    baseline = choose_baseline(methods, baseline, test)
    methods, linear = split_reference(methods)
    plan = plan_runs(dataset, methods, seeds, overrides, config_file)
    if robust:
        check_sweep(*robust, plan[0][2])
    from .jobs import check_jobs, run_in_processes

    check_jobs(jobs)
    check_writable(out_dir)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    # before any training, so data it cannot read (images, tokens) stops the bench at once
    references = reference_results([c for label, _, c in plan if label == plan[0][0]], log) if linear else []
    if tune:
        from .tune import tuned_plan

        plan = tuned_plan(plan, tune, out_dir, dataset, overrides, config_file, quiet, log, run_name)
        if f"{baseline} (tuned)" in {label for label, _, _ in plan}:
            baseline = f"{baseline} (tuned)"  # compared as it ran
    if jobs > 1:
        results = run_in_processes(plan, out_dir, jobs, log)
    else:
        results = [run_planned(k, len(plan), label, name, config, out_dir, quiet, log)
                   for k, (label, name, config) in enumerate(plan, 1)]
    results += references
    num_classes = known_num_classes(results[0], plan[0][2].to_dict())

    def summarise() -> None:
        with FolderLock(out_dir).acquire(wait=True, on_wait=log):
            write_reports(results, out_dir, dataset, command, baseline, test, num_classes)

    summarise()
    if robust:
        corruption, levels = robust
        robustness_report([out_dir / name for _, name, _ in plan], corruption, levels, out_dir / ROBUSTNESS,
                          labels=[label for label, _, _ in plan], command=command, log=log)
        summarise()  # again, now that summary.md can link the robustness report
    return results


def run_planned(k: int, total: int, label: str, name: str, config: RunConfig, out_dir: Path, quiet: bool, log) -> dict:
    """The k-th run of a bench, under its folder's lock; its metrics, labelled as the bench reports them."""
    run_dir = out_dir / name
    lock = FolderLock(run_dir).acquire(wait=True, on_wait=lambda text: log(f"[{k}/{total}] {text}"))
    try:
        metrics = run_or_reuse(config, run_dir, quiet, lambda text: log(f"[{k}/{total}] {name}: {text}"))
    finally:
        lock.release()
    metrics["label"] = label
    key, words = headline([metrics])
    log(f"[{k}/{total}] {name}: test {words} {100 * metrics['test'][key]:.2f}%")
    return metrics


#: settings that may differ between a bench and a run folder it reuses: they change no result
REUSABLE_KEYS = ("train.num_workers", "train.eval_batch_size", "train.device", "data.root", "data.path", "log.backends", "log.project")


def run_or_reuse(config: RunConfig, run_dir: Path, quiet: bool, log) -> dict:
    """Train the run, resume it, or reuse it when finished, never a folder trained with other settings.

    The caller holds the folder's lock, so two benches on one folder never
    train the same run twice.
    """
    started = any((run_dir / name).exists() for name in ("metrics.json", "last.pt", "teachers"))
    if (run_dir / "config.yaml").is_file() and started:
        existing = RunConfig(load_yaml(run_dir / "config.yaml"))
        mismatch = config_mismatch(existing.to_dict(), config.to_dict(), REUSABLE_KEYS)
        if mismatch:
            raise MMBalanceError(
                f"{run_dir} was trained with other settings than this bench's ("
                + describe_mismatch(mismatch, "the run", "this bench")
                + "); use another --out, or delete that folder to train it again"
            )
        if (run_dir / "metrics.json").is_file():
            log("done earlier with the same settings, reused")
            return json.loads((run_dir / "metrics.json").read_text())
        log("resuming")
        return resume_run(run_dir, quiet=quiet, locked=True)
    log("training")
    return train_run(config, run_dir, quiet=quiet, overwrite=True, locked=True)


def reference_lines(results: list[dict]) -> list[str]:
    """The dataset's own reference figures, e.g. the synthetic data's Bayes-optimal accuracy."""
    reports = [r.get("dataset_info", {}).get("bayes_accuracy") for r in results]
    if not all(reports):
        return []
    parts = ", ".join(f"{name} {fmt([rep[name] for rep in reports])}" for name in reports[0])
    return [f"Bayes-optimal test accuracy (exact, from the generator; mean ± std over the runs' splits): {parts}.", ""]


#: the folder of a bench's robustness report (``--robust``), which summary.md links once it exists
ROBUSTNESS = "robustness"


def robustness_lines(out_dir: Path) -> list[str]:
    report = Path(ROBUSTNESS) / "robustness.md"
    if not (out_dir / report).is_file():
        return []
    return [f"Accuracy under test-time corruption: [{report.as_posix()}]({report.as_posix()}).", ""]


def write_reports(
    results: list[dict], out_dir: Path, dataset: str, command: str | None, baseline: str | None = None, test: str = "t",
    num_classes: int | None = None,
) -> str:
    """results.jsonl, summary.md and summary.png/.pdf; every method is compared with ``baseline`` (default: joint or the first).

    ``num_classes`` (C) draws the chance line at 100/C on the chart; None leaves it out.
    """
    lines = [json.dumps(r) for r in results]
    atomic_write_text(out_dir / "results.jsonl", "\n".join(lines) + "\n")
    baseline = baseline or default_baseline(list(dict.fromkeys(label_of(r) for r in results)))
    key, words = headline(results)  # accuracy, or micro-F1 on multi-label runs: what Δ compares
    comparisons = compare(results, baseline, test, value=lambda r: r["test"][key])
    table = markdown_table(results, "test", comparisons, baseline)
    parts = [f"# Benchmark on `{dataset}`", ""]
    if command:
        parts += ["Command:", "", "```", command, "```", ""]
    seeds = sorted({r["seed"] for r in results if isinstance(r.get("seed"), int)})
    parts += [
        f"Test split, mean ± std over seeds {', '.join(map(str, seeds))} (accuracies in %). *X only*: the fused head with every",
        "other modality's features zeroed. *X head*: the unimodal head on X's encoder. Imbalance",
        "ratio: M × the largest positive Shapley share (1 = balanced, M = one modality does all).",
        *([f"Multi-label: micro-F1, macro-F1 and mAP in %; *X only* and *X head* are micro-F1; Shapley values "
           "on micro-F1.", ""] if key == "micro_f1" else [""]),
        how_to_read(baseline, test, comparisons, words),
        "",
        table,
        "",
        *unpaired_lines(comparisons),
        *beaten_lines(results, test),
        *reference_lines(results),
        f"![test {words} per method](summary.png) (vector: [summary.pdf](summary.pdf))",
        "",
        *robustness_lines(out_dir),
        "Validation split:",
        "",
        markdown_table(results, "val"),
        "",
    ]
    text = "\n".join(parts)
    atomic_write_text(out_dir / "summary.md", text)
    note = f"above the {words} bars: Δ vs {baseline} (points, paired by seed); * p < 0.05, {TESTS[test]}"
    bar_chart(results, out_dir / "summary.png", "test", title=f"{dataset}: test {words}, mean ± std",
              comparisons=comparisons, note=note, num_classes=num_classes)
    return table
