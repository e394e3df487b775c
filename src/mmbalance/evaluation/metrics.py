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

from ..misalignment import draw_sources, fused_source_probabilities, misaligned_features
from ..models.multimodal import zero_out
from .shapley import all_coalitions, imbalance_ratio, shapley_values


@dataclass
class Outputs:
    labels: Tensor
    index: Tensor
    logits: Tensor
    coalition_logits: dict[frozenset, Tensor]
    unimodal_logits: dict[str, Tensor]
    misaligned_logits: Tensor | None = None  # [K, C] fused logits on misaligned samples
    misaligned_labels: Tensor | None = None  # [K, M] the source label of every slot

    def to_cpu_dict(self) -> dict:
        return {
            "labels": self.labels,
            "index": self.index,
            "logits": self.logits,
            "coalition_logits": {tuple(sorted(k)): v for k, v in self.coalition_logits.items()},
            "unimodal_logits": self.unimodal_logits,
            "misaligned_logits": self.misaligned_logits,
            "misaligned_labels": self.misaligned_labels,
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
            # misaligned samples have no identity to deduplicate: every shard's are kept
            misaligned_logits=_cat_optional([p.get("misaligned_logits") for p in parts]),
            misaligned_labels=_cat_optional([p.get("misaligned_labels") for p in parts]),
        )


def _cat_optional(tensors: list) -> Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


MISALIGNED_SEED = 20251


@torch.no_grad()
def collect_outputs(method, model, loader, device, modalities: list[str]) -> Outputs:
    model.eval()
    method.eval()
    coalitions = all_coalitions(modalities)
    # The same misaligned samples at every evaluation: a fixed seed and the loader's fixed order.
    generator = torch.Generator().manual_seed(MISALIGNED_SEED)
    misaligned_logits: list[Tensor] = []
    misaligned_labels: list[Tensor] = []
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
        sources, _ = draw_sources(batch.labels, len(modalities), generator)
        if len(sources):
            swapped = misaligned_features(features, sources, modalities)
            misaligned_logits.append(method.fuse(model, swapped).float().cpu())
            misaligned_labels.append(batch.labels[sources].cpu())
        labels.append(batch.labels.cpu())
        index.append(batch.index.cpu())
    return Outputs(
        labels=torch.cat(labels),
        index=torch.cat(index),
        logits=torch.cat(logits),
        coalition_logits={c: torch.cat(v) for c, v in coalition_logits.items()},
        unimodal_logits={m: torch.cat(v) for m, v in unimodal.items() if v},
        misaligned_logits=torch.cat(misaligned_logits) if misaligned_logits else torch.zeros(0, model.num_classes),
        misaligned_labels=torch.cat(misaligned_labels) if misaligned_labels else torch.zeros(0, len(modalities), dtype=torch.long),
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


def misaligned_metrics(logits: Tensor, source_labels: Tensor, modalities: list[str]) -> dict:
    """MIDAS's diagnostics on misaligned samples (for any method).

    ``misaligned_accuracy``: a sample counts as correct when every source
    label is among the top-M predictions (M = number of modalities).
    ``misaligned_confidence``: per modality, the mean of the fused model's
    probability of that slot's source class, normalised over the slots'
    classes; a model that reads only one modality gives that one ~1.
    """
    if logits is None or len(logits) == 0:
        return {
            "misaligned_accuracy": float("nan"),
            "misaligned_confidence": {m: float("nan") for m in modalities},
            "misaligned_samples": 0,
        }
    top = logits.topk(min(len(modalities), logits.shape[1]), dim=1).indices  # [K, M]
    hit = (source_labels[:, :, None] == top[:, None, :]).any(dim=2).all(dim=1)
    probabilities = fused_source_probabilities(logits, source_labels)  # [K, M]
    normalised = probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return {
        "misaligned_accuracy": float(hit.float().mean()),
        "misaligned_confidence": {m: float(normalised[:, k].mean()) for k, m in enumerate(modalities)},
        "misaligned_samples": int(len(logits)),
    }


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
        **misaligned_metrics(outputs.misaligned_logits, outputs.misaligned_labels, modalities),
    }
