"""Tables of mean ± std over seeds, as Markdown and as a bar chart (PNG and PDF).

A value a run does not have (the linear reference has no modality-only
accuracy) is shown as '–'; a single run is shown without '±'. With
comparisons (``comparison.compare``), the test table has a Δ column against
the baseline and the chart marks each method's difference above its bar.
"""

from __future__ import annotations

import math
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from ..evaluation.figures import chance_line, place_legend, pyplot, save_figure
from ..evaluation.labels import readable
from .comparison import MARK, Comparison, cell, column_name, points


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    if len(values) == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def group_by_method(results: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in results:
        groups.setdefault(r.get("label", r["method"]), []).append(r)
    return groups


def is_multi_label(results: list[dict]) -> bool:
    """Whether the runs classified label sets (their metrics.json says ``task: multi_label``)."""
    return bool(results) and results[0].get("task") == "multi_label"


def headline(results: list[dict]) -> tuple[str, str]:
    """(metrics key, words) of the score a table leads with and compares: accuracy, or micro-F1 on multi-label runs."""
    return ("micro_f1", "micro-F1") if is_multi_label(results) else ("accuracy", "accuracy")


def multi_label_columns(results: list[dict], split: str) -> list[tuple[str, callable]]:
    """Multi-label runs: micro-F1, macro-F1, mAP, every modality-only and unimodal micro-F1."""
    modalities = results[0]["modalities"]
    columns = [
        ("micro-F1", lambda r: r[split]["micro_f1"]),
        ("macro-F1", lambda r: r[split]["macro_f1"]),
        ("mAP", lambda r: r[split].get("mAP", math.nan)),
    ]
    for m in modalities:
        columns.append((f"{m} only", lambda r, m=m: r[split].get("modality_micro_f1", {}).get(m, math.nan)))
    for m in modalities:
        columns.append((f"{m} head", lambda r, m=m: r[split].get("unimodal_micro_f1", {}).get(m, math.nan)))
    return columns


def summary_columns(results: list[dict], split: str = "test") -> list[tuple[str, callable]]:
    """Columns: accuracy, macro-F1, every modality-only and unimodal accuracy, imbalance, time (F1s: multi-label)."""
    if is_multi_label(results):
        return multi_label_columns(results, split)
    modalities = results[0]["modalities"]
    columns = [
        ("accuracy", lambda r: r[split]["accuracy"]),
        ("macro-F1", lambda r: r[split]["macro_f1"]),
    ]
    for m in modalities:
        columns.append((f"{m} only", lambda r, m=m: r[split].get("modality_accuracy", {}).get(m, math.nan)))
    for m in modalities:
        columns.append((f"{m} head", lambda r, m=m: r[split].get("unimodal_accuracy", {}).get(m, math.nan)))
    extra = [k for k in ("misaligned_accuracy",) if any(k in r[split] for r in results)]
    for key in extra:
        columns.append((key.replace("_", " "), lambda r, key=key: r[split].get(key, math.nan)))
    return columns


def markdown_table(
    results: list[dict], split: str = "test", comparisons: dict[str, Comparison] | None = None, baseline: str | None = None
) -> str:
    """One row per method; with ``comparisons`` and their ``baseline``, a Δ column after the accuracy."""
    columns = summary_columns(results, split)
    names = [c[0] for c in columns]
    if comparisons is not None:
        names.insert(1, column_name(baseline))
    header = ["method", "runs", *names, "imbalance ratio", "ms/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in group_by_method(results).items():
        cells = [method, str(len(runs))]
        cells += [fmt([get(r) for r in runs]) for _, get in columns]
        if comparisons is not None:
            cells.insert(3, cell(comparisons.get(method)))
        cells.append(fmt([r[split].get("imbalance_ratio", math.nan) for r in runs], scale=1.0, digits=2))
        cells.append(fmt([r.get("seconds_per_step", math.nan) for r in runs], scale=1000.0, digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(
    results: list[dict],
    path: Path,
    split: str = "test",
    title: str = "",
    comparisons: dict[str, Comparison] | None = None,
    note: str = "",
    num_classes: int | None = None,
) -> list[Path]:
    """``bar_figure`` written as ``path`` (PNG) and its PDF twin; the paths written."""
    return save_figure(bar_figure(results, split, title, comparisons, note, num_classes), path)


def bar_figure(
    results: list[dict],
    split: str = "test",
    title: str = "",
    comparisons: dict[str, Comparison] | None = None,
    note: str = "",
    num_classes: int | None = None,
):
    """Grouped bars (mean ± std) of accuracy and each modality-only accuracy per method, in %.

    Error bars only for a method with more than one run; a chance line at
    100/C where C is known. With ``comparisons``, each method's accuracy bar
    carries its Δ against the baseline in points, marked when significant;
    ``note`` (under the title) says how to read it.
    """
    plt = pyplot()
    groups = group_by_method(results)
    modalities = results[0]["modalities"]
    key, words = headline(results)  # micro-F1 and modality-only micro-F1 on multi-label runs
    only = "modality_micro_f1" if is_multi_label(results) else "modality_accuracy"
    if is_multi_label(results):
        num_classes = None  # no 100/C chance level for label sets
    metrics = [(words, lambda r: r[split][key])]
    metrics += [(f"{m} only", lambda r, m=m: r[split].get(only, {}).get(m, math.nan)) for m in modalities]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) * max(1, len(groups) / 2)), 4))
    for k, (method, runs) in enumerate(groups.items()):
        stats = [mean_std([get(r) for r in runs]) for _, get in metrics]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        heights = [100 * s[0] for s in stats]
        errors = [100 * s[1] for s in stats] if len(runs) > 1 else None  # one run: no spread to draw
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=method)
        comparison = (comparisons or {}).get(method)
        if comparison is not None and comparison.p is not None:
            text = points(comparison.mean) + (MARK if comparison.significant else "")
            top = heights[0] + (errors[0] if errors else 0)
            ax.annotate(text, (xs[0], min(top, 100)), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([name for name, _ in metrics])
    chance_line(ax, num_classes)
    ax.set_ylabel(readable(f"{split}/accuracy") if key == "accuracy" else f"{readable(split)} {words} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title + ("\n" + textwrap.fill(note, 80) if note else ""), fontsize=9 if note else None)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    place_legend(ax)
    return fig
