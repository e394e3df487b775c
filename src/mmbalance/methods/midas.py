"""MIDAS: the fused model also learns from misaligned samples with confidence-based soft labels.

The loss itself lives in ``mmbalance.misalignment`` (usable without this
trainer); this file adds what a run needs around it: the warm-up of the
unimodal heads, the aligned losses, α's update after each optimizer step
(pooled across processes) and the logs.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Section
from ..misalignment import MisalignmentLoss, misaligned_inputs
from ..registry import METHODS
from .base import Method, StepResult


@METHODS.register("midas")
class MIDAS(Method):
    """Misaligned-sample augmentation with confidence soft labels (Hwang et al., NeurIPS 2025)."""

    class Config(Section):
        level: Literal["feature", "input"] = Field(
            "feature",
            description="build misaligned samples from the batch's features (cheap) or from its inputs, encoded again",
        )
        warmup: bool = Field(
            True, description="train only the encoders and unimodal heads first, so that confidences mean something"
        )
        warmup_epochs: Optional[int] = Field(
            None, ge=0, description="length of the warm-up in epochs; unset: train.epochs / 7, rounded"
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
            description="the paper's rules, or the authors' code's (unchecked pairs, ±η ratio rule, capped α, halved loss)",
        )
        alpha_max: float = Field(10.0, ge=1, description="upper bound of α in the official variant")

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
        self._step_stats: dict | None = None  # from training_step to after_step of the same step only

    def warmup_epochs(self, max_epochs: int) -> int:
        if not self.config.warmup:
            return 0
        if self.config.warmup_epochs is not None:
            return self.config.warmup_epochs
        return round(max_epochs / 7)

    def in_warmup(self, ctx) -> bool:
        return ctx.epoch < self.warmup_epochs(ctx.max_epochs)

    def on_epoch_start(self, model, ctx):
        if ctx.epoch == self.warmup_epochs(ctx.max_epochs):
            self.misalignment.reset_alpha()

    def training_step(self, model, batch, ctx):
        labels = batch.labels
        features = self.encode(model, batch.inputs)
        heads = self.heads(model, features)
        unimodal_loss = sum(F.cross_entropy(heads[m], labels) for m in self.modalities)
        self._step_stats = None
        if self.in_warmup(ctx):
            with torch.no_grad():  # for the training accuracy only: the fusion head gets no task loss yet
                logits = self.fuse(model, features)
            return StepResult(unimodal_loss, logits, {"loss/unimodal": unimodal_loss.detach()})

        logits = self.fuse(model, features)
        fused_loss = F.cross_entropy(logits, labels)
        encode_misaligned = None
        if self.config.level == "input":

            def encode_misaligned(sources):
                return self.encode(model, misaligned_inputs(batch.inputs, sources, self.modalities))

        misaligned_loss, stats = self.misalignment(
            features, heads, labels, partial(self.fuse, model), ctx.generator, misaligned=encode_misaligned
        )
        self._step_stats = stats
        logs = {
            "loss/fused": fused_loss.detach(),
            "loss/unimodal": unimodal_loss.detach(),
            "midas/misaligned_loss": misaligned_loss.detach(),
            "midas/misaligned_samples": stats["count"],
        }
        for slot, m in enumerate(self.modalities):
            logs[f"midas/confidence/{m}"] = stats["confidence"][slot]
            logs[f"midas/fused_confidence/{m}"] = stats["fused_confidence"][slot]
        return StepResult(fused_loss + unimodal_loss + self.config.lam * misaligned_loss, logits, logs)

    def after_step(self, model, ctx):
        # The paper moves α after each step; every process pools its statistics first so all move alike.
        if self._step_stats is not None:
            self.misalignment.update_alpha(self._step_stats, reduce=ctx.dist.mean)
            self._step_stats = None

    def on_epoch_end(self, model, ctx):
        logs = {f"midas/alpha/{m}": float(a) for m, a in zip(self.modalities, self.misalignment.alpha)}
        logs["midas/warmup"] = 1.0 if self.in_warmup(ctx) else 0.0
        return logs
