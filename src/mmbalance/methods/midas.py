"""MIDAS: the fused model also learns from misaligned samples with confidence-based soft labels.

The loss itself lives in ``mmbalance.misalignment`` (usable without this
trainer); this objective adds what a run needs around it: the warm-up of
the unimodal heads (the epochs before ``modulation_starts``), the aligned
losses, α's update after each optimizer step (pooled across processes) and
the logs. After ``modulation_ends`` (if set) training continues on the
aligned losses alone.

On multi-label data every loss is binary cross-entropy per class and the
confidences are mean sigmoid probabilities of the source's positive labels:
our generalisation, written out in ``mmbalance.misalignment``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Optional

import torch
from pydantic import Field

from ..evaluation.metrics import Metric
from ..misalignment import MisalignmentLoss, misaligned_inputs
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from ..tasks import POS_WEIGHT
from .base import Objective, cross_entropy
from .window import WindowConfig, in_window, window_bounds

STATS = "midas/stats"


def pooled_micro_batches(stats: list[dict]) -> dict:
    """The misaligned-sample statistics of several micro-batches as one batch's: count-weighted means."""
    if len(stats) == 1:
        return stats[0]
    stats = [MisalignmentLoss.pool(s, lambda flat: flat) for s in stats]  # the per-sample means and the count
    count = torch.stack([s["count"] for s in stats])
    total = count.sum()
    pooled = {
        key: sum(s[key] * n for s, n in zip(stats, count)) / total.clamp_min(1e-12)
        for key in stats[0] if key != "count"
    }
    pooled["count"] = total
    return pooled


@METHODS.register("midas")
class MIDAS(Objective):
    """Misaligned-sample augmentation with confidence soft labels (Hwang et al., NeurIPS 2025)."""

    honours_keep = True
    accumulation = True  # loss terms, and α moved once per optimizer step from every micro-batch's statistics
    multi_label = True  # our generalisation: label vectors mixed by mean sigmoid confidences (misalignment.py)

    class Config(WindowConfig):
        level: Literal["feature", "input"] = Field(
            "feature",
            description="build misaligned samples from the batch's features (cheap) or from its inputs, encoded again",
        )
        modulation_starts: Optional[int] = Field(
            None, ge=0,
            description="first epoch with the fused and misaligned losses; before it only encoders and unimodal "
            "heads train (warm-up); unset: train.epochs / 7, rounded; 0: no warm-up",
        )
        weak_weighting: bool = Field(
            True, description="scale the least confident modality's soft-label term by α, adapted after every step"
        )
        hard_weighting: bool = Field(
            True, description="weigh misaligned samples by how similar the swapped-in feature is to the one it replaced"
        )
        similarity: Literal["cosine", "l2"] = Field("cosine", description="similarity behind the hard-sample weight")
        lam: float = Field(1.0, ge=0, description="weight λ of the misaligned loss")
        eta: float = Field(0.05, ge=0, description="step size η of α's update")
        alpha_rule: Literal["difference", "sign"] = Field(
            "difference", description="α moves by η·Δα (the paper's text) or by η·sign(Δα)"
        )
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="the paper's rules, or the authors' code's (unchecked pairs, ±η ratio rule, capped α, "
            "unimodal loss averaged over modalities)",
        )
        alpha_max: float = Field(10.0, ge=1, description="upper bound of α in the official variant")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options midas`)
    search_space = {
        "lam": FloatRange(0.1, 4.0, log=True),
        "eta": FloatRange(0.005, 0.5, log=True),
        "hard_weighting": Choice([True, False]),
        "similarity": Choice(["cosine", "l2"]),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self.misalignment = MisalignmentLoss(
            self.modalities,
            weak_weighting=config.weak_weighting,
            hard_weighting=config.hard_weighting,
            similarity=config.similarity,
            eta=config.eta,
            alpha_rule=config.alpha_rule,
            variant=config.variant,
            alpha_max=config.alpha_max,
        )

    @classmethod
    def pinned_options(cls, config, epochs):
        return {"modulation_starts": round(epochs / 7)} if config.modulation_starts is None else {}

    def warmup_epochs(self, max_epochs: int) -> int:
        """The epochs before the misaligned training starts (the paper's E_w)."""
        starts = self.config.modulation_starts
        return round(max_epochs / 7) if starts is None else starts

    def in_warmup(self, ctx) -> bool:
        return ctx.epoch < self.warmup_epochs(ctx.max_epochs)

    def misaligning(self, ctx) -> bool:
        return in_window(self.config, ctx.epoch, default_starts=self.warmup_epochs(ctx.max_epochs))

    def setup(self, model, ctx):
        # with modulation_starts unset the warm-up depends on train.epochs: check the window now, not when it starts
        window_bounds(self.config, self.warmup_epochs(ctx.max_epochs))

    def on_epoch_start(self, model, ctx):
        if ctx.epoch == self.warmup_epochs(ctx.max_epochs):
            self.misalignment.reset_alpha()

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        heads = self.heads(model, features)
        unimodal_losses = [cross_entropy(heads[m], batch) for m in self.modalities]
        # the paper sums the unimodal losses; the authors' code averages them over modalities
        unimodal_loss = sum(unimodal_losses) / (len(self.modalities) if self.config.variant == "official" else 1)
        if self.in_warmup(ctx):
            with torch.no_grad():  # for the training accuracy only: the fusion head gets no task loss yet
                logits = self.fuse(model, features)
            record = self.record(model, batch, features, logits=logits, unimodal=heads)
            record.add_loss("unimodal", unimodal_loss)
            return record

        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits, unimodal=heads)
        record.add_loss("fused", cross_entropy(logits, batch))
        record.add_loss("unimodal", unimodal_loss)
        if not self.misaligning(ctx):
            return record
        encode_misaligned = None
        if self.config.level == "input":

            def encode_misaligned(sources):
                return self.encode(model, misaligned_inputs(batch.inputs, sources, self.modalities))

        misaligned_loss, stats = self.misalignment(
            features, heads, batch.labels, partial(self.fuse, model), ctx.generator, misaligned=encode_misaligned,
            pos_weight=batch.extras.get(POS_WEIGHT),
        )
        record.add_loss("misaligned", self.config.lam * misaligned_loss)
        record.shared[STATS] = stats
        record.logs["midas/misaligned_samples"] = stats["count"]
        for slot, m in enumerate(self.modalities):
            record.logs[f"midas/confidence/{m}"] = stats["confidence"][slot]
            record.logs[f"midas/fused_confidence/{m}"] = stats["fused_confidence"][slot]
        return record

    def after_step(self, record, ctx):
        # The paper moves α after each step; every process pools its statistics first so all move alike,
        # and with gradient accumulation the step's micro-batches are pooled too (BASELINES §1.4.7).
        stats = [r.shared[STATS] for r in (ctx.step_records or [record]) if STATS in r.shared]
        if stats:
            self.misalignment.update_alpha(pooled_micro_batches(stats), reduce=ctx.dist.mean)

    def on_epoch_end(self, model, ctx):
        logs = {f"midas/alpha/{m}": float(a) for m, a in zip(self.modalities, self.misalignment.alpha)}
        logs["midas/warmup"] = 1.0 if self.in_warmup(ctx) else 0.0
        return logs

    def metrics(self):
        return [AlphaMetric(self)]


class AlphaMetric(Metric):
    """MIDAS's weak-modality weights α at evaluation time, per modality (``midas/alpha`` in metrics.json)."""

    name = "midas/alpha"

    def __init__(self, midas: MIDAS):
        self.midas = midas

    def compute(self):
        return {"midas/alpha": {m: float(a) for m, a in zip(self.midas.modalities, self.midas.misalignment.alpha)}}
