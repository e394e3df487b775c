"""Training curves of one run, drawn from its metrics.jsonl as PNG and PDF files.

Curves: train/validation accuracy, the validation modality-only accuracy of
each modality, the fused model's confidence in each modality's class on
misaligned validation samples, and every quantity a method logs (MIDAS's α,
CAL's weights, the named loss terms, ...), one figure per logged family.
Every figure marks the epoch whose checkpoint the run kept (``best_epoch`` of
metrics.json, once the run has finished); accuracies are in %, with a chance
line where the number of classes is known (figures.py has the conventions,
labels.py the words).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import MMBalanceError
from .figures import best_epoch_line, chance_line, known_num_classes, place_legend, pyplot, save_figure
from .labels import is_accuracy, readable


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MMBalanceError(f"{run_dir} has no metrics.jsonl; is it a run folder?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise MMBalanceError(f"{path} line {number} is not valid JSON") from None
    if not records:
        raise MMBalanceError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def read_json_object(path: Path) -> dict | None:
    """A JSON object file of the run (metrics.json), None when absent (a run still training)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MMBalanceError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise MMBalanceError(f"{path} is not a JSON object")
    return value


def read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from ..config import load_yaml

    config = load_yaml(path)
    return config if isinstance(config, dict) else None


def method_families(records: list[dict]) -> "OrderedDict[str, list[str]]":
    """Group logged keys ``prefix/name/modality`` by ``prefix/name`` (e.g. midas/alpha)."""
    families: OrderedDict[str, list[str]] = OrderedDict()
    for record in records:
        for key in record.get("method", {}):
            parts = key.split("/")
            family = "/".join(parts[:-1]) if len(parts) >= 3 else key
            members = families.setdefault(family, [])
            if key not in members:
                members.append(key)
    return families


@dataclass
class RunHistory:
    """What the curves of one run are drawn from."""

    records: list[dict]
    best_epoch: int | None  # None while the run has not finished (no metrics.json)
    num_classes: int | None  # None where the run does not say: no chance line
    title: str

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunHistory":
        run_dir = Path(run_dir)
        records = read_history(run_dir)
        metrics = read_json_object(run_dir / "metrics.json")
        config = read_config(run_dir / "config.yaml")
        best = (metrics or {}).get("best_epoch")
        best = best if isinstance(best, int) and not isinstance(best, bool) and best >= 1 else None
        source = metrics or config or {}
        dataset = source.get("dataset") or (source.get("data") or {}).get("name")
        title = f"{source['method']} on {dataset}, seed {source.get('seed')}" if source.get("method") and dataset else run_dir.name
        return cls(records, best, known_num_classes(metrics, config), title)

    @property
    def epochs(self) -> list[int]:
        return [r["epoch"] for r in self.records]


def curve_figure(history: RunHistory, key: str, series: dict[str, list[float]]):
    """One figure of values against epochs; ``key`` names the y axis (labels.py) and says if it is an accuracy."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    accuracy = is_accuracy(key)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        shown = [100 * v if accuracy else v for v in values]
        ax.plot(history.epochs[: len(shown)], shown, marker="o", markersize=2.5, label=label)
    if accuracy:
        chance_line(ax, history.num_classes)
        ax.set_ylim(0, 100)
    best_epoch_line(ax, history.best_epoch)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.get_major_formatter().set_useOffset(False)  # values as they are, not "+1" and small differences
    ax.set_xlabel(readable("epoch"))
    ax.set_ylabel(readable(key))
    ax.set_title(history.title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_legend(ax)
    return fig


def value(record: dict, *path: str) -> float:
    """A number nested in a record, NaN (a gap in the curve) where an epoch did not log it."""
    for name in path:
        if not isinstance(record, dict) or name not in record:
            return math.nan
        record = record[name]
    return record if isinstance(record, (int, float)) else math.nan


def run_figures(history: RunHistory) -> Iterator[tuple[str, object]]:
    """(file name without suffix, figure) for every curve of the run, drawn but not saved."""
    records = history.records
    yield "accuracy", curve_figure(history, "accuracy", {
        "training": [value(r, "train_accuracy") for r in records],
        "validation": [value(r, "val", "accuracy") for r in records],
    })
    first_val = records[0].get("val", {})
    modalities = list(first_val.get("modality_accuracy", {}))
    if modalities:
        yield "modality_accuracy", curve_figure(history, "val/modality_accuracy", {
            m: [value(r, "val", "modality_accuracy", m) for r in records] for m in modalities})
    if "misaligned_confidence" in first_val:
        yield "misaligned_confidence", curve_figure(history, "val/misaligned_confidence", {
            m: [value(r, "val", "misaligned_confidence", m) for r in records] for m in first_val["misaligned_confidence"]})
    for family, keys in method_families(records).items():
        # several members (one per modality): the legend names the modality; one: the axis says it all
        series = {(k.split("/")[-1] if len(keys) > 1 else readable(k)): [value(r, "method", k) for r in records]
                  for k in keys}
        yield family.replace("/", "_"), curve_figure(history, family, series)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every curve of the run as PNG and PDF in ``out_dir`` (default: RUN/plots); the paths written."""
    run_dir = Path(run_dir)
    history = RunHistory.read(run_dir)  # a folder that is not a run fails before anything is created
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MMBalanceError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    written: list[Path] = []
    for name, fig in run_figures(history):
        written += save_figure(fig, out_dir / f"{name}.png")
    return written
