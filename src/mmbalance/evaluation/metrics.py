"""Evaluation metrics as objects: collect per batch, reduce at the end, gathered across processes.

A ``Metric`` keeps sums (tensors on the evaluation device) that it updates
from each batch's ``EvalView`` and turns into reported values in
``compute``. Sums add across processes, so a sharded evaluation is reduced
with one all-reduce and gives exactly the single-process numbers. Built-in
metrics are registered in ``METRICS`` and run for every method; a part adds
its own through ``Part.metrics()``. A new quantity is one class here or in
the part's file, nothing else.

Multi-label runs (``tasks.py``) use ``MULTI_LABEL_METRICS``: they keep the
rows of probabilities (``RowMetric``; gathered across processes, so every
number is exact, mAP included) and score them at one threshold, which
``evaluate`` sets on every metric (``Metric.threshold``), chosen on the rows
themselves for ``eval.threshold=val`` on the validation split.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..misalignment import fused_source_probabilities
from ..registry import METRICS
from ..tasks import DEFAULT_THRESHOLD, MULTI_LABEL, SINGLE_LABEL, choose_threshold, micro_f1_from_counts
from .shapley import all_coalitions, imbalance_ratio, shapley_values

if TYPE_CHECKING:
    from .evaluate import EvalView


class Metric:
    """Base: ``reset`` makes the sums, ``update`` adds a batch, ``compute`` reports."""

    name: ClassVar[str] = ""
    #: set by ``evaluate`` before ``update``: single_label or multi_label
    task: str = SINGLE_LABEL
    #: set by ``evaluate`` before ``compute`` on multi-label runs: a class is predicted when its probability reaches it
    threshold: float = DEFAULT_THRESHOLD

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
    slots; a model that reads only one modality gives that one ~1. On
    multi-label data the slot's confidence is the fused model's mean sigmoid
    probability of its source's positive labels, and ``misaligned_accuracy``
    is None (a top-M hit presumes one class per source).
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
        if source_labels.ndim == 2:  # class ids; top-M hits have no multi-label meaning
            self.sums["hits"] += misaligned_hits(logits.float(), source_labels).sum()
        self.sums["count"] += len(logits)
        self.sums["confidence"] += normalised.double().sum(0)

    def compute(self):
        count = self.sums["count"][0]
        defined = self.num_classes > len(self.modalities) and self.task != MULTI_LABEL
        return {
            "misaligned_accuracy": ratio(self.sums["hits"][0], count) if defined else None,
            "misaligned_confidence": {m: ratio(self.sums["confidence"][k], count) for k, m in enumerate(self.modalities)},
            "misaligned_samples": int(count),
        }


# -- multi-label -------------------------------------------------------------------------------------
class RowMetric(Metric):
    """A metric that keeps per-sample rows (CPU float32) instead of sums; ``evaluate`` gathers them across processes.

    Ranking metrics (average precision) and the choice of a threshold need
    every score, which no fixed set of sums holds.
    """

    def reset(self, modalities, num_classes, device):
        super().reset(modalities, num_classes, device)
        self.rows: dict[str, list[Tensor]] = {}

    def add_rows(self, key: str, values: Tensor) -> None:
        self.rows.setdefault(key, []).append(values.detach().float().cpu())

    def stacked(self, key: str, width: int) -> Tensor:
        parts = self.rows.get(key, [])
        return torch.cat(parts) if parts else torch.zeros(0, width)


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """AP = Σ_k (R_k − R_{k−1}) P_k over the distinct scores, highest first (no interpolation).

    P_k and R_k are the precision and recall of predicting every sample
    scoring at least the k-th distinct score, so tied samples enter together
    (the step-wise AP of scikit-learn's ``average_precision_score``). NaN when
    there is no positive.
    """
    total = int(positive.sum())
    if total == 0:
        return math.nan
    order = scores.argsort(descending=True, stable=True)
    ranked, hits = scores[order], positive[order].double()
    true_positive = hits.cumsum(0)
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)[last_of_tie]
    true_positive = true_positive[last_of_tie]
    recall = true_positive / total
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * true_positive / predicted).sum())


def multi_label_scores(probabilities: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """micro/macro/weighted/samples F1, mAP and subset accuracy of probabilities [N, C] against 0/1 rows [N, C].

    A class is predicted when its probability is at least ``threshold``.
    micro-F1 pools every (sample, class) decision; macro-F1 averages the
    per-class F1 over the classes that occur in the labels or the
    predictions (as single-label macro-F1 does); weighted-F1 weighs each
    class's F1 by its number of positives; samples-F1 averages each sample's
    F1 (1 for a sample with no label and no prediction); mAP averages the
    per-class average precision over the classes with a positive;
    ``accuracy`` is the share of samples whose predicted set is exactly
    their label set (subset accuracy).
    """
    actual = labels > 0.5
    predicted = probabilities >= threshold
    hits = predicted & actual
    tp, pred, act = (x.sum(0).double() for x in (hits, predicted, actual))
    per_class = torch.where(pred + act > 0, 2 * tp / (pred + act).clamp_min(1), torch.zeros_like(tp))
    support = act.sum()
    row_hits, row_pred, row_act = (x.sum(1).double() for x in (hits, predicted, actual))
    row_f1 = torch.where(row_pred + row_act > 0, 2 * row_hits / (row_pred + row_act).clamp_min(1), torch.ones_like(row_hits))
    precisions = [average_precision(probabilities[:, k], actual[:, k]) for k in range(probabilities.shape[1])]
    defined = [ap for ap in precisions if not math.isnan(ap)]
    count = probabilities.shape[0]
    return {
        "micro_f1": micro_f1_from_counts(tp.sum(), pred.sum(), act.sum()),
        "macro_f1": macro_f1_from_counts(tp, pred, act),
        "weighted_f1": float((per_class * act).sum() / support) if support > 0 else 0.0,
        "samples_f1": float(row_f1.mean()) if count else math.nan,
        "mAP": sum(defined) / len(defined) if defined else math.nan,
        "accuracy": float((predicted == actual).all(1).double().mean()) if count else math.nan,
    }


def micro_f1(probabilities: Tensor, labels: Tensor, threshold: float) -> float:
    """micro-F1 of probabilities [N, C] against 0/1 rows at ``threshold`` (``multi_label_scores``' first number)."""
    predicted, actual = probabilities >= threshold, labels > 0.5
    return micro_f1_from_counts((predicted & actual).sum(), predicted.sum(), actual.sum())


@METRICS.register("multilabel_classification")
class MultiLabelClassification(RowMetric):
    """The run's prediction on multi-label data: micro/macro/weighted/samples F1, mAP, subset accuracy."""

    def update(self, view):
        self.add_rows("probability", view.logits.sigmoid())
        self.add_rows("label", view.labels)

    def rows_of(self) -> tuple[Tensor, Tensor]:
        return self.stacked("probability", self.num_classes), self.stacked("label", self.num_classes)

    def best_threshold(self) -> float:
        """The threshold maximising micro-F1 on these rows (``tasks.choose_threshold``)."""
        return choose_threshold(*self.rows_of())

    def compute(self):
        probabilities, labels = self.rows_of()
        return {
            **multi_label_scores(probabilities, labels, self.threshold),
            "threshold": self.threshold,
            "num_samples": int(labels.shape[0]),
        }


@METRICS.register("multilabel_modality_contribution")
class MultiLabelModalityContribution(RowMetric):
    """Modality-only micro-F1 (the fused head with the others zeroed), exact Shapley values on micro-F1, imbalance ratio."""

    def reset(self, modalities, num_classes, device):
        super().reset(modalities, num_classes, device)
        self.coalitions = all_coalitions(self.modalities)

    def update(self, view):
        self.add_rows("label", view.labels)
        for k, c in enumerate(self.coalitions):
            self.add_rows(f"coalition{k}", view.coalition_logits(c).sigmoid())

    def compute(self):
        labels = self.stacked("label", self.num_classes)
        value = {
            c: micro_f1(self.stacked(f"coalition{k}", self.num_classes), labels, self.threshold)
            for k, c in enumerate(self.coalitions)
        }
        shapley = shapley_values(value, self.modalities)
        return {
            "modality_micro_f1": {m: value[frozenset([m])] for m in self.modalities},
            "shapley": shapley,
            "imbalance_ratio": imbalance_ratio(shapley),
        }


@METRICS.register("multilabel_unimodal_heads")
class MultiLabelUnimodalHeads(RowMetric):
    """micro-F1 of each unimodal head on its own encoder, at the run's threshold."""

    def update(self, view):
        heads = view.unimodal
        self.add_rows("label", view.labels)
        for m in self.modalities:
            if m in heads:
                self.add_rows(m, heads[m].sigmoid())

    def compute(self):
        labels = self.stacked("label", self.num_classes)
        return {
            "unimodal_micro_f1": {
                m: micro_f1(self.stacked(m, self.num_classes), labels, self.threshold)
                for m in self.modalities if self.rows.get(m)
            }
        }


DEFAULT_METRICS = ("classification", "modality_contribution", "unimodal_heads", "misalignment")
#: the built-in metrics of a multi-label run
MULTI_LABEL_METRICS = (
    "multilabel_classification", "multilabel_modality_contribution", "multilabel_unimodal_heads", "misalignment",
)
