"""Benchmark grids: every method x seed on one dataset, then a summary.

Each run lives in its own folder directly under the benchmark folder
(``SPEC-seedN``). A spec combines an objective with plugins and may carry
options, for ablations: ``midas[modulation_starts=0]+arl[temperature=4]``
runs MIDAS without warm-up and ARL with T = 4 and is reported under its full
spec (a plugin alone, ``arl``, is reported as ``joint+arl``). A
finished run (``metrics.json`` present) is skipped on
re-runs and an interrupted one is resumed, so a killed benchmark continues
where it stopped. ``results.jsonl`` and ``summary.md`` are rebuilt from the
run folders every time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..config import RunConfig, build_config
from ..errors import MMBalanceError
from ..files import atomic_write_text
from ..methods.compose import resolve
from ..methods.spec import spec_string
from ..training.trainer import check_writable, resume_run, train_run
from .robustness import check_sweep, robustness_report
from .summary import bar_chart, fmt, markdown_table


def run_name(label: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-")
    return f"{safe}-seed{seed}"


def plan_runs(dataset: str, methods: list[str], seeds: int, overrides: list[str], config_file=None) -> list[tuple[str, str, RunConfig]]:
    """Resolve every run's config first, so a typo fails before any training."""
    if seeds < 1:
        raise MMBalanceError(f"--seeds must be at least 1, got {seeds}")
    if not methods:
        raise MMBalanceError("--methods is empty; give a comma-separated list such as joint,unimodal")
    plan = []
    labels: dict[str, str] = {}
    for spec in methods:
        label = spec_string(resolve(spec), with_options=True)  # the full spec: objective first, options kept
        if label in labels:
            raise MMBalanceError(f"--methods lists {label!r} twice ('{labels[label]}' and '{spec}'); each method once")
        labels[label] = spec
        for seed in range(seeds):
            config = build_config(config_file, overrides, dataset=dataset, method=spec, seed=seed)
            plan.append((label, run_name(label, seed), config))
    return plan


def run_bench(
    dataset: str,
    methods: list[str],
    seeds: int,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    config_file=None,
    quiet: bool = False,
    command: str | None = None,
    log=None,
    robust: tuple[str, list[float]] | None = None,
) -> list[dict]:
    """``robust``: (corruption, levels) for a robustness report over every run, in ``out_dir/robustness``."""
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    plan = plan_runs(dataset, methods, seeds, overrides, config_file)
    if robust:
        check_sweep(*robust, plan[0][2])
    check_writable(out_dir)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    results = []
    for k, (label, name, config) in enumerate(plan, 1):
        run_dir = out_dir / name
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file():
            log(f"[{k}/{len(plan)}] {name}: done earlier, skipped")
            metrics = json.loads(metrics_path.read_text())
        elif (run_dir / "last.pt").is_file():
            log(f"[{k}/{len(plan)}] {name}: resuming")
            metrics = resume_run(run_dir, quiet=quiet)
        else:
            log(f"[{k}/{len(plan)}] {name}: training")
            metrics = train_run(config, run_dir, quiet=quiet)
        metrics["label"] = label
        log(f"[{k}/{len(plan)}] {name}: test accuracy {100 * metrics['test']['accuracy']:.2f}%")
        results.append(metrics)
    write_reports(results, out_dir, dataset, command)
    if robust:
        corruption, levels = robust
        robustness_report([out_dir / name for _, name, _ in plan], corruption, levels, out_dir / "robustness",
                          labels=[label for label, _, _ in plan], command=command, log=log)
    return results


def reference_lines(results: list[dict]) -> list[str]:
    """The dataset's own reference figures, e.g. the synthetic data's Bayes-optimal accuracy."""
    reports = [r.get("dataset_info", {}).get("bayes_accuracy") for r in results]
    if not all(reports):
        return []
    parts = ", ".join(f"{name} {fmt([rep[name] for rep in reports])}" for name in reports[0])
    return [f"Bayes-optimal test accuracy (exact, from the generator; mean ± std over the runs' splits): {parts}.", ""]


def write_reports(results: list[dict], out_dir: Path, dataset: str, command: str | None) -> str:
    lines = [json.dumps(r) for r in results]
    atomic_write_text(out_dir / "results.jsonl", "\n".join(lines) + "\n")
    table = markdown_table(results, "test")
    parts = [f"# Benchmark on `{dataset}`", ""]
    if command:
        parts += ["Command:", "", "```", command, "```", ""]
    parts += [
        "Test split, mean ± std over seeds (accuracies in %). *X only*: the fused head with every",
        "other modality's features zeroed. *X head*: the unimodal head on X's encoder. Imbalance",
        "ratio: M × the largest positive Shapley share (1 = balanced, M = one modality does all).",
        "",
        table,
        "",
        *reference_lines(results),
        "Validation split:",
        "",
        markdown_table(results, "val"),
        "",
    ]
    text = "\n".join(parts)
    atomic_write_text(out_dir / "summary.md", text)
    bar_chart(results, out_dir / "summary.png", "test", title=f"{dataset}: test accuracy, mean ± std")
    return table
