"""Evaluation: run a method's model over a split once, then compute every metric.

``collect_outputs`` does the forward passes (the prediction, the fused head on
every coalition of zeroed modalities, the unimodal heads); the metric
functions are pure functions of those outputs, so they are tested on
hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.multimodal import zero_out
from .shapley import all_coalitions, imbalance_ratio, shapley_values


@dataclass
class Outputs:
    labels: Tensor
    index: Tensor
    logits: Tensor
    coalition_logits: dict[frozenset, Tensor]
    unimodal_logits: dict[str, Tensor]

    def to_cpu_dict(self) -> dict:
        return {
            "labels": self.labels,
            "index": self.index,
            "logits": self.logits,
            "coalition_logits": {tuple(sorted(k)): v for k, v in self.coalition_logits.items()},
            "unimodal_logits": self.unimodal_logits,
        }

    @staticmethod
    def concat(parts: list[dict]) -> "Outputs":
        """Join shards from several processes, dropping padded duplicates by index."""
        index = torch.cat([p["index"] for p in parts])
        order = torch.argsort(index, stable=True)
        keep = torch.ones_like(order, dtype=torch.bool)
        sorted_index = index[order]
        keep[1:] = sorted_index[1:] != sorted_index[:-1]
        rows = order[keep]

        def join(key):
            return torch.cat([p[key] for p in parts])[rows]

        coalitions = parts[0]["coalition_logits"].keys()
        unimodal = parts[0]["unimodal_logits"].keys()
        return Outputs(
            labels=join("labels"),
            index=index[rows],
            logits=join("logits"),
            coalition_logits={
                frozenset(k): torch.cat([p["coalition_logits"][k] for p in parts])[rows] for k in coalitions
            },
            unimodal_logits={m: torch.cat([p["unimodal_logits"][m] for p in parts])[rows] for m in unimodal},
        )


@torch.no_grad()
def collect_outputs(method, model, loader, device, modalities: list[str]) -> Outputs:
    model.eval()
    method.eval()
    coalitions = all_coalitions(modalities)
    labels, index, logits = [], [], []
    coalition_logits: dict[frozenset, list[Tensor]] = {c: [] for c in coalitions}
    unimodal: dict[str, list[Tensor]] = {m: [] for m in modalities}
    for batch in loader:
        batch = batch.to(device)
        features = method.encode(model, batch.inputs)
        logits.append(method.predict_from_features(model, features).float().cpu())
        for coalition in coalitions:
            coalition_logits[coalition].append(method.fuse(model, zero_out(features, coalition)).float().cpu())
        for m, z in method.heads(model, features).items():
            unimodal[m].append(z.float().cpu())
        labels.append(batch.labels.cpu())
        index.append(batch.index.cpu())
    return Outputs(
        labels=torch.cat(labels),
        index=torch.cat(index),
        logits=torch.cat(logits),
        coalition_logits={c: torch.cat(v) for c, v in coalition_logits.items()},
        unimodal_logits={m: torch.cat(v) for m, v in unimodal.items() if v},
    )


def accuracy(logits: Tensor, labels: Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == labels).float().mean())


def macro_f1(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    scores = []
    for c in range(num_classes):
        predicted = predictions == c
        actual = labels == c
        if not predicted.any() and not actual.any():
            continue
        tp = float((predicted & actual).sum())
        precision_den = float(predicted.sum())
        recall_den = float(actual.sum())
        precision = tp / precision_den if precision_den else 0.0
        recall = tp / recall_den if recall_den else 0.0
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores) if scores else 0.0


def compute_metrics(outputs: Outputs, modalities: list[str], num_classes: int) -> dict:
    labels = outputs.labels
    coalition_accuracy = {c: accuracy(z, labels) for c, z in outputs.coalition_logits.items()}
    shapley = shapley_values(coalition_accuracy, modalities)
    return {
        "accuracy": accuracy(outputs.logits, labels),
        "macro_f1": macro_f1(outputs.logits.argmax(dim=-1), labels, num_classes),
        "modality_accuracy": {m: coalition_accuracy[frozenset([m])] for m in modalities},
        "unimodal_accuracy": {m: accuracy(z, labels) for m, z in outputs.unimodal_logits.items()},
        "shapley": shapley,
        "imbalance_ratio": imbalance_ratio(shapley),
        "num_samples": int(labels.numel()),
    }
