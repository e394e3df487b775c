"""One evaluation pass of a method's model over a loader, for every metric at once.

``EvalView`` computes what metrics ask for on first use (features, the
prediction, coalition logits, unimodal heads, misaligned samples), so a
metric set that needs no coalitions costs no coalition passes. The pass
leaves the model and method in the mode it found them, so a method can
evaluate in the middle of training.

On multi-label data (``task="multi_label"``) the metrics score one threshold
(``threshold``, 0.5 by default), or the one that maximises micro-F1 on the
loader's own rows (``choose_threshold``: for the validation split only; the
value then goes to the test split unchanged).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable

import torch
from torch import Tensor

from ..misalignment import draw_sources, misaligned_features
from ..models.readouts import coalition_logits
from ..registry import METRICS
from ..tasks import DEFAULT_THRESHOLD, MULTI_LABEL, SINGLE_LABEL
from .metrics import DEFAULT_METRICS, MULTI_LABEL_METRICS, Metric, MultiLabelClassification, RowMetric

MISALIGNED_SEED = 20251


class EvalView:
    """One batch as the metrics see it; every readout is computed once, on demand."""

    def __init__(self, method, model, batch, modalities: list[str], generator: torch.Generator):
        self.method, self.model, self.batch = method, model, batch
        self.modalities = modalities
        self.generator = generator
        self._coalitions: dict[frozenset, Tensor] = {}

    @property
    def labels(self) -> Tensor:
        return self.batch.labels

    @cached_property
    def features(self) -> dict[str, Tensor]:
        return self.method.encode(self.model, self.batch.inputs)

    @cached_property
    def logits(self) -> Tensor:
        return self.method.predict_from_features(self.model, self.features).float()

    def coalition_logits(self, coalition: Iterable[str]) -> Tensor:
        key = frozenset(coalition)
        if key not in self._coalitions:
            self._coalitions[key] = coalition_logits(lambda f: self.method.fuse(self.model, f), self.features, key).float()
        return self._coalitions[key]

    @cached_property
    def unimodal(self) -> dict[str, Tensor]:
        return {m: z.float() for m, z in self.method.heads(self.model, self.features).items()}

    @cached_property
    def misaligned(self) -> tuple[Tensor, Tensor] | None:
        """(fused logits [K, C], source labels [K, M] or rows [K, M, C]) on misaligned samples drawn with the pass's fixed seed."""
        if len(self.modalities) < 2:
            return None
        sources, _ = draw_sources(self.labels, len(self.modalities), self.generator)
        if len(sources) == 0:
            return self.logits[:0], self.labels[sources]  # [0, M] class ids, or [0, M, C] rows
        swapped = misaligned_features(self.features, sources, self.modalities)
        return self.method.fuse(self.model, swapped).float(), self.labels[sources]


def default_metrics(task: str = SINGLE_LABEL) -> list[Metric]:
    names = MULTI_LABEL_METRICS if task == MULTI_LABEL else DEFAULT_METRICS
    return [METRICS.get(name)() for name in names]


@torch.no_grad()
def evaluate(method, model, loader, device, modalities: list[str], num_classes: int, metrics: list[Metric] | None = None, dist=None,
             *, task: str = SINGLE_LABEL, threshold: float = DEFAULT_THRESHOLD, choose_threshold: bool = False) -> dict[str, Any]:
    """Every metric of ``metrics`` (default: the built-ins of ``task`` and the method's) over ``loader``.

    With several processes each one evaluates its shard and the sums are
    added with one all-reduce (rows are gathered); the shards must not overlap.
    Multi-label metrics score ``threshold``, or with ``choose_threshold`` the
    threshold that maximises micro-F1 on these rows (reported as ``threshold``).
    """
    if metrics is None:
        metrics = default_metrics(task) + list(method.metrics())
    modes = (model.training, method.training)
    model.eval()
    method.eval()
    try:
        for metric in metrics:
            metric.task = task
            metric.reset(modalities, num_classes, device)
        # the same misaligned samples at every evaluation: a fixed seed and the loader's fixed order
        generator = torch.Generator().manual_seed(MISALIGNED_SEED)
        for batch in loader:
            view = EvalView(method, model, batch.to(device), modalities, generator)
            for metric in metrics:
                metric.update(view)
        if dist is not None and dist.enabled:
            reduce_sums(metrics, dist)
            gather_rows(metrics, dist)
        if task == MULTI_LABEL:
            if choose_threshold:
                classification = [m for m in metrics if isinstance(m, MultiLabelClassification)]
                if not classification:
                    raise ValueError("choosing a threshold needs the multilabel_classification metric among the metrics")
                threshold = classification[0].best_threshold()
            for metric in metrics:
                metric.threshold = threshold
        results: dict[str, Any] = {}
        for metric in metrics:
            results.update(metric.compute())
        return results
    finally:
        model.train(modes[0])
        method.train(modes[1])


def gather_rows(metrics: list[Metric], dist) -> None:
    """Every process's rows of every ``RowMetric``, concatenated in process order (one gather)."""
    holders = [m for m in metrics if isinstance(m, RowMetric)]
    if not holders:
        return
    local = [{key: torch.cat(parts) for key, parts in m.rows.items() if parts} for m in holders]
    gathered = dist.gather_objects(local)
    for slot, metric in enumerate(holders):
        keys = dict.fromkeys(key for process in gathered for key in process[slot])
        metric.rows = {key: [process[slot][key] for process in gathered if key in process[slot]] for key in keys}


def reduce_sums(metrics: list[Metric], dist) -> None:
    """Add every metric's sums over processes in one flat all-reduce."""
    tensors = [t for metric in metrics for t in metric.sums.values()]
    if not tensors:
        return
    flat = dist.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
