"""Training curves of one run, drawn from its metrics.jsonl as PNG files.

Curves: train/validation accuracy, the validation modality-only accuracy of
each modality, the fused model's confidence in each modality's class on
misaligned validation samples, and every per-modality quantity a method logs
(MIDAS's alpha, CAL's weights, ...), one figure per logged family.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from ..errors import MMBalanceError


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


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_history(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in records]
    written: list[Path] = []

    def figure(name: str, title: str, ylabel: str, series: dict[str, list[float]]):
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values in series.items():
            ax.plot(epochs[: len(values)], values, marker="o", markersize=2.5, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("accuracy", "accuracy", "accuracy", {
        "train": [r["train_accuracy"] for r in records],
        "validation": [r["val"]["accuracy"] for r in records],
    })
    modalities = list(records[0]["val"]["modality_accuracy"])
    figure("modality_accuracy", "validation modality-only accuracy", "accuracy",
           {m: [r["val"]["modality_accuracy"][m] for r in records] for m in modalities})
    if "misaligned_confidence" in records[0]["val"]:
        figure("misaligned_confidence", "fused confidence in each modality's class (misaligned val)",
               "normalised confidence",
               {m: [r["val"]["misaligned_confidence"][m] for r in records] for m in modalities})
    for family, keys in method_families(records).items():
        series = {k.split("/")[-1] if len(keys) > 1 else k: [r["method"].get(k, float("nan")) for r in records] for k in keys}
        figure(family.replace("/", "_"), family, family.split("/")[-1], series)
    return written
