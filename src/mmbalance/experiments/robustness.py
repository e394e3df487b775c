"""Accuracy under test-time corruption (CAL.md, "Noise-robustness protocol").

Each run is rebuilt from its folder (config.yaml, best.pt) and its test split
is evaluated through the trainer's own ``evaluate`` with a loader that
corrupts every batch, so a corrupted score is computed exactly like the clean
one. The corruption hits one modality at a time by default; the target
``all`` corrupts every modality at once (CAL's RGB-D setting).

Output folder::

    robustness.md          one table per target: rows = methods (mean ± std over runs), columns = ε, AUC
    robustness.json        every run's accuracy at every (target, ε)
    robustness-TARGET.png  accuracy against ε, one curve per method (std band over runs; also as .pdf)

AUC is the area under accuracy-vs-ε divided by the ε range, i.e. the mean
accuracy over the swept range (with one level: that level's accuracy).
Multi-label runs report micro-F1 in place of accuracy (``metric`` in robustness.json).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import RunConfig
from ..data.base import DataBundle
from ..data.batch import collate
from ..data.corruptions import Corruption, build_corruption
from ..data.loading import load_dataset
from ..errors import MMBalanceError
from ..evaluation.figures import chance_line, place_legend, pyplot, save_figure
from ..evaluation.labels import readable
from .summary import fmt, group_by_method, mean_std
from ..files import atomic_write_json, atomic_write_text
from ..api import load_run as load_run_folder
from ..training.trainer import Trainer, check_writable

ALL_MODALITIES = "all"


def parse_levels(text: str) -> list[float]:
    """``'0,0.5,1'`` -> ``[0.0, 0.5, 1.0]``; distinct, increasing, finite and >= 0."""
    try:
        levels = [float(part) for part in text.split(",")]
    except ValueError:
        raise MMBalanceError(f"bad levels '{text}': expected comma-separated numbers such as 0,0.5,1") from None
    if not all(math.isfinite(v) and v >= 0 for v in levels):
        raise MMBalanceError(f"bad levels '{text}': every level must be a finite number >= 0")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise MMBalanceError(f"bad levels '{text}': levels must be distinct and increasing")
    return levels


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``'gaussian:0,1,2'`` -> ``('gaussian', [0.0, 1.0, 2.0])`` (bench's ``--robust``)."""
    name, sep, levels = text.partition(":")
    if not sep or not name.strip():
        raise MMBalanceError(f"bad --robust '{text}': expected CORRUPTION:LEVELS, e.g. gaussian:0,1,2")
    return name.strip(), parse_levels(levels)


def build_corruptions(name: str, levels: Sequence[float], fraction: float, seed: int, options: dict | None) -> list[Corruption]:
    """One corruption per level; validates the name, options, fraction and seed before any work."""
    if not levels:
        raise MMBalanceError("no corruption levels given")
    return [build_corruption(name, level, fraction, seed, options) for level in levels]


def resolve_targets(requested: Sequence[str] | None, modalities: list[str]) -> dict[str, list[str]]:
    """Target name -> the modalities it corrupts; by default each modality in turn."""
    targets = {}
    for name in requested or modalities:
        if name == ALL_MODALITIES:
            targets[name] = list(modalities)
        elif name in modalities:
            targets[name] = [name]
        else:
            raise MMBalanceError(
                f"unknown modality '{name}' (allowed: {', '.join(modalities)}, or {ALL_MODALITIES} for every one at once)"
            )
    return targets


def check_applicable(corruption: Corruption, bundle: DataBundle, targets: dict[str, list[str]]) -> None:
    """Fail on an incompatible modality (blur on vectors, token_mask on floats) before any evaluation."""
    sample = collate([bundle.test[0]])
    for modalities in targets.values():
        for modality in modalities:
            corruption.check(modality, sample.inputs[modality])


def check_sweep(name: str, levels: Sequence[float], config: RunConfig) -> None:
    """Fail on a bad corruption, level or modality before a benchmark trains anything."""
    corruptions = build_corruptions(name, levels, 0.5, 0, None)
    bundle = load_dataset(config)
    check_applicable(corruptions[-1], bundle, resolve_targets(None, bundle.modalities))


@dataclass
class CorruptedLoader:
    """A loader whose batches pass through a corruption first."""

    loader: object
    corruption: Corruption
    modalities: list[str]

    def __iter__(self):
        return (self.corruption(batch, self.modalities) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def check_run_folder(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "best.pt").is_file():
        raise MMBalanceError(f"{run_dir} is not a finished run folder (needs config.yaml and best.pt)")


def load_run(run_dir: Path) -> Trainer:
    """The run rebuilt from its config with its best checkpoint loaded."""
    check_run_folder(run_dir)
    return load_run_folder(run_dir).trainer


def run_label(run_dir: Path, config: RunConfig) -> str:
    """The folder name without its ``-seedN`` suffix (bench's naming), else the method."""
    match = re.fullmatch(rf"(.+)-seed{config.seed}", run_dir.name)
    return match[1] if match else config.method


def area_under_curve(levels: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoidal area under accuracy-vs-ε divided by the ε range."""
    if len(levels) == 1:
        return float(accuracies[0])
    area = sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(levels, levels[1:], accuracies, accuracies[1:]))
    return area / (levels[-1] - levels[0])


def score_key(trainer: Trainer) -> str:
    """The score a sweep reports: accuracy, or micro-F1 for a multi-label run."""
    return "micro_f1" if getattr(trainer, "task", "single_label") == "multi_label" else "accuracy"


def evaluate_run(trainer: Trainer, corruptions: list[Corruption], targets: dict[str, list[str]], log: Callable[[str], None]) -> dict:
    """Test accuracy (micro-F1 on multi-label runs) per target and level; ε = 0 is the clean score, computed once."""
    key = score_key(trainer)
    clean = trainer.evaluate("test")[key]
    accuracy: dict[str, list[float]] = {}
    for target, modalities in targets.items():
        row = []
        for corruption in corruptions:
            if corruption.level == 0:
                row.append(clean)
            else:
                corrupted = CorruptedLoader(trainer.test_loader, corruption, modalities)
                row.append(trainer.evaluate_loader(corrupted)[key])
            log(f"  {target} ε={corruption.level:g}: {key.replace('_', '-')} {100 * row[-1]:.2f}%")
        accuracy[target] = row
    return {"metric": key, "clean_accuracy": clean, "accuracy": accuracy}


def robustness_report(
    runs: Sequence[str | Path],
    corruption: str,
    levels: Sequence[float],
    out_dir: str | Path,
    modalities: Sequence[str] | None = None,
    fraction: float = 0.5,
    seed: int = 0,
    options: dict | None = None,
    labels: Sequence[str] | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate every run under the corruption and write the report; everything is checked before writing."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    run_dirs = [Path(r) for r in runs]
    if not run_dirs:
        raise MMBalanceError("no runs given")
    corruptions = build_corruptions(corruption, list(levels), fraction, seed, options)
    for run_dir in run_dirs:
        check_run_folder(run_dir)
    trainer = load_run(run_dirs[0])
    targets = resolve_targets(modalities, trainer.bundle.modalities)
    num_classes = trainer.bundle.num_classes
    check_applicable(corruptions[-1], trainer.bundle, targets)
    check_writable(out_dir)

    records = []
    for k, run_dir in enumerate(run_dirs):
        if k > 0:
            trainer = load_run(run_dir)
            resolve_targets([m for mods in targets.values() for m in mods], trainer.bundle.modalities)
        config = trainer.config
        label = labels[k] if labels else run_label(run_dir, config)
        log(f"[{k + 1}/{len(run_dirs)}] {run_dir}: {corruption} on {', '.join(targets)}")
        record = {"run": str(run_dir), "label": label, "method": config.method, "seed": config.seed}
        record.update(evaluate_run(trainer, corruptions, targets, log))
        record["auc"] = {t: area_under_curve(list(levels), acc) for t, acc in record["accuracy"].items()}
        records.append(record)

    report = {
        "corruption": corruption,
        "options": corruptions[0].config.model_dump(),
        "levels": list(levels),
        "fraction": fraction,
        "seed": seed,
        "split": "test",
        "targets": targets,
        "num_classes": num_classes if records[0]["metric"] == "accuracy" else None,  # no chance level for label sets
        "metric": records[0]["metric"],
        "runs": records,
    }
    atomic_write_json(out_dir / "robustness.json", report)
    atomic_write_text(out_dir / "robustness.md", markdown_report(report, command))
    for target in targets:
        plot_target(report, target, out_dir / f"robustness-{target}.png")
    return report


def markdown_report(report: dict, command: str | None = None) -> str:
    levels = report["levels"]
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items())
    parts = [f"# Robustness to `{report['corruption']}`", ""]
    if command:
        parts += ["Command:", "", "```", command, "```", ""]
    metric = "micro-F1" if report.get("metric") == "micro_f1" else "accuracy"
    parts += [
        f"Test {metric} (%) of each run's best checkpoint with `{report['corruption']}`"
        + (f" ({options})" if options else "")
        + f" applied at level ε to a fraction {report['fraction']:g} of the test samples (seed {report['seed']}),"
        " mean ± std over the runs of each method. AUC: area under accuracy-vs-ε divided by the ε range.",
        "",
    ]
    groups = group_by_method(report["runs"])
    for target, modalities in report["targets"].items():
        parts += [f"## Corrupted: {' + '.join(modalities)}", ""]
        header = ["method", "runs", *[f"ε={v:g}" for v in levels], "AUC"]
        parts += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, runs in groups.items():
            cells = [label, str(len(runs))]
            cells += [fmt([r["accuracy"][target][i] for r in runs]) for i in range(len(levels))]
            cells.append(fmt([r["auc"][target] for r in runs]))
            parts.append("| " + " | ".join(cells) + " |")
        parts += ["", f"![accuracy against ε](robustness-{target}.png) ([PDF](robustness-{target}.pdf))", ""]
    return "\n".join(parts)


def plot_target(report: dict, target: str, path: Path) -> list[Path]:
    """``target_figure`` written as ``path`` (PNG) and its PDF twin; the paths written."""
    return save_figure(target_figure(report, target), path)


def target_figure(report: dict, target: str):
    """Accuracy (%) against ε, one curve per method, a std band where a method has several runs,
    and a chance line where the report knows the number of classes."""
    plt = pyplot()
    levels = report["levels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in group_by_method(report["runs"]).items():
        stats = [mean_std([100 * r["accuracy"][target][i] for r in runs]) for i in range(len(levels))]
        means = [s[0] for s in stats]
        line, = ax.plot(levels, means, marker="o", label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(levels, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(), alpha=0.2)
    chance_line(ax, report.get("num_classes"))
    modalities = " + ".join(report["targets"][target])
    ax.set_xlabel(readable("corruption/level"))
    if report.get("metric") == "micro_f1":
        ax.set_ylabel(f"{readable(report.get('split', 'test'))} micro-F1 (%)")
    else:
        ax.set_ylabel(readable(f"{report.get('split', 'test')}/accuracy"))
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['corruption']} on {modalities} (fraction {report['fraction']:g})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_legend(ax)
    return fig
