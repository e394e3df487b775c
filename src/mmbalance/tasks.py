"""What a label is: one class per sample, or a 0/1 vector of classes per sample.

Everything that depends on the kind of label lives here, on plain tensors, so
that datasets, methods, evaluation and the trainer share one definition:

- ``single_label``: labels [N] (int64 class ids); a softmax over the classes;
  the loss is cross-entropy; the prediction is the argmax.
- ``multi_label``: labels [N, C] (float 0/1, several classes may be on); one
  sigmoid per class; the loss is binary cross-entropy per class (mean over
  the classes, then over the samples; optionally a weight on each class's
  positive term); the prediction is every class whose probability reaches
  the threshold (0.5 by default, or chosen on validation).

The task is read from the labels' shape wherever labels are at hand (a 2-d
label tensor is multi-label), and is named by ``DataBundle.task`` and
``ctx.task`` where they are not (e.g. an ensemble's prediction).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
TASKS = (SINGLE_LABEL, MULTI_LABEL)

#: a class is predicted when its probability is at least this (``eval.threshold`` unset)
DEFAULT_THRESHOLD = 0.5
#: the thresholds ``eval.threshold=val`` chooses among (0.01 .. 0.99)
THRESHOLD_GRID = tuple(k / 100 for k in range(1, 100))
#: the ``Batch.extras`` key under which the trainer hands the positive-class weights to the loss
POS_WEIGHT = "pos_weight"

#: the metric model selection reads when ``eval.select=auto``
DEFAULT_SELECTION = {SINGLE_LABEL: "accuracy", MULTI_LABEL: "micro_f1"}
#: the validation metrics ``eval.select`` may name, per task (every one is "higher is better")
SELECTABLE = {
    SINGLE_LABEL: ("accuracy", "macro_f1"),
    MULTI_LABEL: ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "accuracy"),
}


def is_multi_label(labels: Tensor | np.ndarray) -> bool:
    """A label tensor with one row of 0/1 per sample ([N, C]) is multi-label; [N] class ids are not."""
    return labels.ndim == 2


def task_of(labels: Tensor | np.ndarray) -> str:
    return MULTI_LABEL if is_multi_label(labels) else SINGLE_LABEL


# -- loss -------------------------------------------------------------------------------------------
def per_sample_loss(logits: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """[N]: cross-entropy (class ids), or binary cross-entropy averaged over the C classes (0/1 rows).

    ``pos_weight`` [C] (multi-label only) multiplies each class's positive
    term, e.g. #negatives / #positives to balance a rare class.
    """
    if not is_multi_label(labels):
        return F.cross_entropy(logits, labels, reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=pos_weight, reduction="none")
    return bce.mean(dim=-1)


def task_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None, pos_weight: Tensor | None = None) -> Tensor:
    """The mean task loss over the batch, each sample weighted by ``weight`` when given."""
    if weight is None and not is_multi_label(labels):
        return F.cross_entropy(logits, labels)  # the single-label loss exactly as it always was
    per_sample = per_sample_loss(logits, labels, pos_weight)
    return per_sample.mean() if weight is None else (per_sample * weight).mean()


# -- probabilities and predictions ------------------------------------------------------------------
def probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """softmax over classes (single-label) or one sigmoid per class (multi-label)."""
    return logits.sigmoid() if multi_label else logits.softmax(dim=-1)


def label_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """How sure ``logits`` are of ``labels``, per sample (detached, float32), shape of the labels' leading dims.

    Single-label: p[y], the probability of the true class. Multi-label: the
    mean sigmoid probability over the sample's positive labels,
    mean_{c: y_c = 1} σ(z_c); for a sample without any positive label, the
    mean probability that each class is off, mean_c (1 − σ(z_c)). ``logits``
    may have fewer leading dimensions than ``labels`` and are broadcast
    (e.g. fused logits [K, C] against the source labels [K, M, C]).
    """
    logits = logits.detach().float()
    if not labels.is_floating_point():  # class ids: [N] against [N, C], or [K, M] against [K, C]
        p = logits.softmax(dim=-1)
        if labels.ndim == p.ndim - 1:
            return p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return p.gather(-1, labels)
    p = logits.sigmoid()
    while p.ndim < labels.ndim:
        p = p.unsqueeze(-2)
    positive = (labels > 0.5).float()
    count = positive.sum(-1)
    on_positives = (p * positive).sum(-1) / count.clamp_min(1)
    all_off = (1 - p).mean(-1).expand_as(on_positives)
    return torch.where(count > 0, on_positives, all_off)


def exact_matches(logits: Tensor, labels: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """[N] booleans: the argmax is the class (single-label); every class is on exactly when labelled (multi-label)."""
    if not is_multi_label(labels):
        return logits.argmax(dim=-1) == labels
    return ((logits.sigmoid() >= threshold) == (labels > 0.5)).all(dim=-1)


def f1_counts(logits: Tensor, labels: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """[3]: true positives, predicted positives, actual positives over every (sample, class) of a multi-label batch."""
    predicted = logits.sigmoid() >= threshold
    actual = labels > 0.5
    return torch.stack([(predicted & actual).sum(), predicted.sum(), actual.sum()]).double()


def micro_f1_from_counts(true_positive: float, predicted: float, actual: float) -> float:
    """2 TP / (#predicted + #actual); 0 when nothing is predicted and nothing is labelled."""
    denominator = float(predicted) + float(actual)
    return 2 * float(true_positive) / denominator if denominator else 0.0


def choose_threshold(probabilities: Tensor, labels: Tensor, grid: Sequence[float] = THRESHOLD_GRID) -> float:
    """The threshold of ``grid`` whose predictions have the highest micro-F1 on these rows.

    Ties go to the threshold nearest 0.5 (then the lower one), so data that
    cannot tell thresholds apart keep the default. Meant for validation rows
    only: the chosen value is then applied, unchanged, to the test split.
    """
    if probabilities.numel() == 0:
        return DEFAULT_THRESHOLD
    values = torch.tensor(list(grid), dtype=probabilities.dtype, device=probabilities.device)
    flat = probabilities.reshape(-1)
    actual = (labels.reshape(-1) > 0.5)
    # every grid threshold at once: [G, N*C] would be large, so count through the sorted scores
    order = flat.argsort()
    ranked, ranked_actual = flat[order], actual[order].double()
    below = torch.searchsorted(ranked, values, right=False)  # rows scoring below each threshold
    positives_below = torch.cat([ranked_actual.new_zeros(1), ranked_actual.cumsum(0)])[below]
    total_actual = ranked_actual.sum()
    predicted = flat.numel() - below.double()
    true_positive = total_actual - positives_below
    denominator = predicted + total_actual
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp_min(1), torch.zeros_like(denominator))
    best = f1.max()
    candidates = [float(t) for t, score in zip(grid, f1.tolist()) if score >= float(best) - 1e-12]
    return min(candidates, key=lambda t: (abs(t - DEFAULT_THRESHOLD), t))


# -- data ------------------------------------------------------------------------------------------
def stratification_key(labels: np.ndarray) -> np.ndarray:
    """One stratum per sample, for the stratified splits: the class (single-label) or the rarest positive label.

    A multi-label row is filed under its least frequent positive class (the
    frequencies of these labels), so rare classes are spread over the splits
    as a stratified split would spread single classes; rows without a positive
    label form one more stratum (C).
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    positive = labels > 0.5
    frequency = positive.sum(axis=0)
    # rarest first: rank classes by frequency (ties by index) and take each row's best-ranked positive
    rank = np.empty(labels.shape[1], dtype=np.int64)
    rank[np.lexsort((np.arange(labels.shape[1]), frequency))] = np.arange(labels.shape[1])
    ranked = np.where(positive, rank[None, :], labels.shape[1])
    best = ranked.argmin(axis=1)
    return np.where(positive.any(axis=1), best, labels.shape[1]).astype(np.int64)


def balanced_pos_weight(labels: Tensor) -> Tensor:
    """[C]: #negatives / #positives of each class in ``labels`` [N, C]; 1 for a class that is never or always on."""
    positive = (labels > 0.5).double().sum(0)
    negative = labels.shape[0] - positive
    usable = (positive > 0) & (negative > 0)
    return torch.where(usable, negative / positive.clamp_min(1), torch.ones_like(positive)).float()


def positive_class_weight(option: float | str | None, train_labels: Tensor) -> Tensor | None:
    """The weights ``train.pos_weight`` asks for: None (off), one number for every class, or ``balanced``."""
    if option is None:
        return None
    if option == "balanced":
        return balanced_pos_weight(train_labels)
    return torch.full((train_labels.shape[1],), float(option))


# -- run options ------------------------------------------------------------------------------------
def selection_metric(option: str, task: str) -> str:
    """The validation metric that picks the best checkpoint: ``eval.select``, with ``auto`` resolved for ``task``."""
    if option == "auto":
        return DEFAULT_SELECTION[task]
    if option not in SELECTABLE[task]:
        raise ConfigError(
            f"invalid value for eval.select: {option!r} on {task.replace('_', '-')} data "
            f"(allowed: auto, {', '.join(SELECTABLE[task])})"
        )
    return option


def check_task_options(pos_weight, threshold, task: str, dataset: str) -> None:
    """Refuse options that only mean something on multi-label data when the data are single-label."""
    if task == MULTI_LABEL:
        return
    for key, value in (("train.pos_weight", pos_weight), ("eval.threshold", threshold)):
        if value is not None:
            raise ConfigError(
                f"{key}={value} applies to multi-label data only; '{dataset}' is single-label (leave {key} unset)"
            )
