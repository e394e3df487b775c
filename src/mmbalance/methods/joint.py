"""Joint training: the fused cross-entropy every method is compared with."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from ..config import Section
from ..registry import METHODS
from .base import Method, StepResult


@METHODS.register("joint")
class Joint(Method):
    """Fused cross-entropy (optionally plus the unimodal heads' losses)."""

    class Config(Section):
        unimodal_weight: float = Field(
            0.0,
            ge=0,
            description="weight of the unimodal heads' losses; 0 trains them as detached probes only",
        )

    def training_step(self, model, batch, ctx):
        features = self.encode(model, batch.inputs)
        logits = self.fuse(model, features)
        fused_loss = F.cross_entropy(logits, batch.labels)
        weight = self.config.unimodal_weight
        if weight > 0:
            heads = self.heads(model, features)
            unimodal_loss = sum(F.cross_entropy(z, batch.labels) for z in heads.values())
            loss = fused_loss + weight * unimodal_loss
        else:
            unimodal_loss = self.probe_loss(model, features, batch.labels)
            loss = fused_loss + unimodal_loss
        return StepResult(loss, logits, {"loss/fused": fused_loss.detach(), "loss/unimodal": unimodal_loss.detach()})
