"""Joint training: the fused cross-entropy every method is compared with."""

from __future__ import annotations

from pydantic import Field

from ..config import Section
from ..registry import METHODS
from .base import Objective, cross_entropy


@METHODS.register("joint")
class Joint(Objective):
    """Fused cross-entropy (optionally plus the unimodal heads' losses); the default objective."""

    honours_keep = True
    accumulation = True  # loss terms only
    multi_label = True  # every term is the task loss (binary cross-entropy per class on multi-label data)

    class Config(Section):
        unimodal_weight: float = Field(
            0.0,
            ge=0,
            description="weight of the unimodal heads' losses; 0 trains them as detached probes only",
        )

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        weight = self.config.unimodal_weight
        if weight > 0:
            record.unimodal = self.heads(model, features)
            record.add_loss("unimodal", weight * sum(cross_entropy(z, batch) for z in record.unimodal.values()))
        else:
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        return record
