"""Benchmark grids: every method x seed on one dataset, then a summary.

Each run lives in its own folder directly under the benchmark folder
(``METHOD-seedN``). A method may carry its own options, for ablations:
``midas[warmup=false]`` or ``midas[weak_weighting=false;hard_weighting=false]``
runs MIDAS with ``midas.warmup=false`` and is reported under that label. A
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

from ..config import RunConfig, Section, build_config, parse_override, validate_section
from ..registry import METHODS
from ..errors import MMBalanceError
from ..evaluation.robustness import check_sweep, robustness_report
from ..training.checkpoint import atomic_write_text
from ..training.trainer import check_writable, resume_run, train_run
from .summary import bar_chart, fmt, markdown_table


METHOD_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(\[(?P<options>[^\[\]]*)\])?$")


def split_methods(text: str) -> list[str]:
    """Split ``a,b[x=1;y=2],c`` on the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def parse_method(spec: str) -> tuple[str, list[str]]:
    """``midas[warmup=false]`` -> ``('midas', ['midas.warmup=false'])``."""
    match = METHOD_SPEC.match(spec)
    if not match:
        raise MMBalanceError(f"bad method '{spec}': expected NAME or NAME[key=value;key=value]")
    name, options = match["name"], match["options"]
    overrides = []
    for option in (options or "").split(";"):
        if option.strip():
            if "=" not in option:
                raise MMBalanceError(f"bad option '{option}' in '{spec}': expected key=value")
            overrides.append(f"{name}.{option.strip()}")
    return name, overrides


def method_section(spec: str) -> tuple[str, Section]:
    """A method spec's name and its validated options, for use outside a full run config."""
    name, overrides = parse_method(spec)
    values = {key.split(".", 1)[1]: value for key, value in map(parse_override, overrides)}
    return name, validate_section(name, METHODS.get(name).Config, values)


def run_name(label: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "-", label).strip("-")
    return f"{safe}-seed{seed}"


def plan_runs(dataset: str, methods: list[str], seeds: int, overrides: list[str], config_file=None) -> list[tuple[str, str, RunConfig]]:
    """Resolve every run's config first, so a typo fails before any training."""
    if seeds < 1:
        raise MMBalanceError(f"--seeds must be at least 1, got {seeds}")
    if not methods:
        raise MMBalanceError("--methods is empty; give a comma-separated list such as joint,unimodal")
    plan = []
    for spec in methods:
        method, method_overrides = parse_method(spec)
        for seed in range(seeds):
            config = build_config(config_file, overrides + method_overrides, dataset=dataset, method=method, seed=seed)
            plan.append((spec, run_name(spec, seed), config))
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
