"""Evaluation metrics as objects: collect per batch, reduce at the end, gathered across processes.

A ``Metric`` keeps sums (tensors on the evaluation device) that it updates
from each batch's ``EvalView`` and turns into reported values in
``compute``. Sums add across processes, so a sharded evaluation is reduced
with one all-reduce and gives exactly the single-process numbers. Built-in
metrics are registered in ``METRICS`` and run for every method; a part adds
its own through ``Part.metrics()``. A new quantity is one class here or in
the part's file, nothing else.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..misalignment import fused_source_probabilities
from ..registry import METRICS
from .shapley import all_coalitions, imbalance_ratio, shapley_values

if TYPE_CHECKING:
    from .evaluate import EvalView


class Metric:
    """Base: ``reset`` makes the sums, ``update`` adds a batch, ``compute`` reports."""

    name: ClassVar[str] = ""

    def reset(self, modalities: list[str], num_classes: int, device: torch.device) -> None:
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.device = device
        self.sums: dict[str, Tensor] = {}

    def zeros(self, key: str, *shape: int) -> None:
        self.sums[key] = torch.zeros(*shape, dtype=torch.float64, device=self.device)

    def update(self, view: "EvalView") -> None:
        pass

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class SumMetric(Metric):
    """A metric whose state is a fixed set of sums, made in ``init_sums``."""

    def reset(self, modalities, num_classes, device):
        super().reset(modalities, num_classes, device)
        self.init_sums()

    def init_sums(self) -> None:
        raise NotImplementedError


def ratio(numerator: Tensor | float, denominator: Tensor | float) -> float:
    denominator = float(denominator)
    return float(numerator) / denominator if denominator else math.nan


def accuracy(logits: Tensor, labels: Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == labels).float().mean())


def macro_f1_from_counts(true_positive: Tensor, predicted: Tensor, actual: Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    present = (predicted > 0) | (actual > 0)
    if not present.any():
        return 0.0
    precision = true_positive / predicted.clamp_min(1)
    recall = true_positive / actual.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), torch.zeros_like(precision))
    return float(f1[present].mean())


def macro_f1(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    counts = class_counts(predictions, labels, num_classes)
    return macro_f1_from_counts(*counts)


def class_counts(predictions: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: true positives, predicted count, actual count (float64)."""
    def count(values: Tensor) -> Tensor:
        return torch.bincount(values, minlength=num_classes).double()

    return count(predictions[predictions == labels]), count(predictions), count(labels)


@METRICS.register("classification")
class Classification(SumMetric):
    """Accuracy, macro-F1 and the number of samples of the run's prediction."""

    def init_sums(self):
        for key in ("true_positive", "predicted", "actual"):
            self.zeros(key, self.num_classes)

    def update(self, view):
        tp, predicted, actual = class_counts(view.logits.argmax(-1), view.labels, self.num_classes)
        self.sums["true_positive"] += tp
        self.sums["predicted"] += predicted
        self.sums["actual"] += actual

    def compute(self):
        s = self.sums
        total = s["actual"].sum()
        return {
            "accuracy": ratio(s["true_positive"].sum(), total),
            "macro_f1": macro_f1_from_counts(s["true_positive"], s["predicted"], s["actual"]),
            "num_samples": int(total),
        }


@METRICS.register("modality_contribution")
class ModalityContribution(SumMetric):
    """Modality-only accuracy (the fused head with the others zeroed), exact Shapley values, imbalance ratio."""

    def init_sums(self):
        self.coalitions = all_coalitions(self.modalities)
        self.zeros("correct", len(self.coalitions))
        self.zeros("count", 1)

    def update(self, view):
        correct = torch.stack([(view.coalition_logits(c).argmax(-1) == view.labels).sum() for c in self.coalitions])
        self.sums["correct"] += correct.double()
        self.sums["count"] += len(view.labels)

    def compute(self):
        count = self.sums["count"][0]
        value = {c: ratio(k, count) for c, k in zip(self.coalitions, self.sums["correct"])}
        shapley = shapley_values(value, self.modalities)
        return {
            "modality_accuracy": {m: value[frozenset([m])] for m in self.modalities},
            "shapley": shapley,
            "imbalance_ratio": imbalance_ratio(shapley),
        }


@METRICS.register("unimodal_heads")
class UnimodalHeads(SumMetric):
    """Accuracy of each unimodal head on its own encoder."""

    def init_sums(self):
        self.zeros("correct", len(self.modalities))
        self.zeros("count", len(self.modalities))

    def update(self, view):
        heads = view.unimodal
        for k, m in enumerate(self.modalities):
            if m in heads:
                self.sums["correct"][k] += (heads[m].argmax(-1) == view.labels).sum()
                self.sums["count"][k] += len(view.labels)

    def compute(self):
        return {
            "unimodal_accuracy": {
                m: ratio(self.sums["correct"][k], self.sums["count"][k])
                for k, m in enumerate(self.modalities) if self.sums["count"][k] > 0
            }
        }


def misaligned_hits(logits: Tensor, source_labels: Tensor) -> Tensor:
    """Per misaligned sample: are its distinct source labels exactly its top-|distinct| predictions?

    With k distinct source labels a sample counts as correct when every one
    of them ranks among the k highest fused logits; slots sharing a label
    count once (they name the same class).
    """
    ordered = source_labels.sort(dim=1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
    label_logits = logits.gather(1, source_labels)  # [K, M]
    rank = (logits[:, None, :] > label_logits[:, :, None]).sum(dim=2)  # classes strictly above each label
    return (rank < distinct[:, None]).all(dim=1)


@METRICS.register("misalignment")
class Misalignment(SumMetric):
    """MIDAS's diagnostics on misaligned samples, for every method.

    ``misaligned_accuracy``: the share of misaligned samples whose distinct
    source labels are the fused model's top predictions (see
    ``misaligned_hits``); undefined (None) when there are no more classes
    than modalities, where every class fits in the top M and the score would
    be 100 % by construction. ``misaligned_confidence``: per modality, the
    mean fused probability of that slot's source class, normalised over the
    slots; a model that reads only one modality gives that one ~1.
    """

    def init_sums(self):
        self.zeros("hits", 1)
        self.zeros("count", 1)
        self.zeros("confidence", len(self.modalities))

    def update(self, view):
        misaligned = view.misaligned
        if misaligned is None:
            return
        logits, source_labels = misaligned
        if len(logits) == 0:
            return
        probabilities = fused_source_probabilities(logits, source_labels)
        normalised = probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)
        self.sums["hits"] += misaligned_hits(logits.float(), source_labels).sum()
        self.sums["count"] += len(logits)
        self.sums["confidence"] += normalised.double().sum(0)

    def compute(self):
        count = self.sums["count"][0]
        defined = self.num_classes > len(self.modalities)
        return {
            "misaligned_accuracy": ratio(self.sums["hits"][0], count) if defined else None,
            "misaligned_confidence": {m: ratio(self.sums["confidence"][k], count) for k, m in enumerate(self.modalities)},
            "misaligned_samples": int(count),
        }


DEFAULT_METRICS = ("classification", "modality_contribution", "unimodal_heads", "misalignment")
