"""Tables of mean ± std over seeds, as Markdown and as a PNG bar chart."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Iterable


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
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def group_by_method(results: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in results:
        groups.setdefault(r.get("label", r["method"]), []).append(r)
    return groups


def summary_columns(results: list[dict], split: str = "test") -> list[tuple[str, callable]]:
    """Columns: accuracy, macro-F1, every modality-only and unimodal accuracy, imbalance, time."""
    modalities = results[0]["modalities"]
    columns = [
        ("accuracy", lambda r: r[split]["accuracy"]),
        ("macro-F1", lambda r: r[split]["macro_f1"]),
    ]
    for m in modalities:
        columns.append((f"{m} only", lambda r, m=m: r[split]["modality_accuracy"][m]))
    for m in modalities:
        columns.append((f"{m} head", lambda r, m=m: r[split]["unimodal_accuracy"].get(m, math.nan)))
    extra = [k for k in ("misaligned_accuracy",) if k in results[0][split]]
    for key in extra:
        columns.append((key.replace("_", " "), lambda r, key=key: r[split].get(key, math.nan)))
    return columns


def markdown_table(results: list[dict], split: str = "test") -> str:
    columns = summary_columns(results, split)
    header = ["method", "runs", *[c[0] for c in columns], "imbalance ratio", "s/step (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in group_by_method(results).items():
        cells = [method, str(len(runs))]
        cells += [fmt([get(r) for r in runs]) for _, get in columns]
        cells.append(fmt([r[split]["imbalance_ratio"] for r in runs], scale=1.0, digits=2))
        cells.append(fmt([r["seconds_per_step"] for r in runs], scale=1000.0, digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(results: list[dict], path: Path, split: str = "test", title: str = "") -> None:
    """Grouped bars (mean ± std) of accuracy and each modality-only accuracy per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by_method(results)
    modalities = results[0]["modalities"]
    metrics = [("accuracy", lambda r: r[split]["accuracy"])]
    metrics += [(f"{m} only", lambda r, m=m: r[split]["modality_accuracy"][m]) for m in modalities]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) * max(1, len(groups) / 2)), 4))
    for k, (method, runs) in enumerate(groups.items()):
        stats = [mean_std([get(r) for r in runs]) for _, get in metrics]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [100 * s[0] for s in stats], width, yerr=[100 * s[1] for s in stats], capsize=3, label=method)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([name for name, _ in metrics])
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
