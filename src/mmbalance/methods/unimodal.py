"""Unimodal training: each modality learns alone, the reference for what it can reach."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Section
from ..errors import ConfigError
from ..models.multimodal import zero_out
from ..registry import METHODS
from ..tasks import MULTI_LABEL, POS_WEIGHT, SINGLE_LABEL, task_loss
from .base import Objective, cross_entropy


@METHODS.register("unimodal")
class Unimodal(Objective):
    """Every encoder trained on its own head, with no gradient between modalities.

    With ``unimodal.modality=all`` (default) one run trains every modality
    separately, so its ``unimodal_accuracy`` is each modality's reference;
    the prediction is the sum of the heads' log-probabilities (a late-fusion
    ensemble). With a modality name, only that modality is used. The fusion
    head is fitted on detached single-modality features so that the
    modality-only accuracy of this run is also a unimodal reference.

    On multi-label data each head is a set of per-class sigmoids and the
    ensemble is their product of experts: its logit for a class is the sum
    of the heads' logits (the single-label sum of log-probabilities, per class).
    """

    accumulation = True  # loss terms only
    multi_label = True  # task losses only; the ensemble sums logits per class on multi-label data

    class Config(Section):
        modality: str = Field("all", description="a modality name, or 'all' to train each one alone")

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if config.modality != "all" and config.modality not in modalities:
            raise ConfigError(
                f"invalid value for unimodal.modality: {config.modality!r} (allowed: all, {', '.join(modalities)})"
            )
        self.selected = list(modalities) if config.modality == "all" else [config.modality]
        self.task = SINGLE_LABEL

    def setup(self, model, ctx):
        self.task = getattr(ctx, "task", SINGLE_LABEL)  # how the heads' predictions combine

    def training_step(self, model, batch, ctx):
        features = self.encode(model, {m: batch.inputs[m] for m in self.selected})
        full = {m: features.get(m, torch.zeros(len(batch), model.feature_dims[m], device=batch.labels.device)) for m in self.modalities}
        heads = self.heads(model, features)
        record = self.record(model, batch, full, unimodal=heads, logits=self._combine(heads))
        for m in self.selected:
            record.add_loss(m, cross_entropy(heads[m], batch))
        detached = {m: f.detach() for m, f in full.items()}
        pos_weight = batch.extras.get(POS_WEIGHT)
        record.add_loss("fusion_probe", sum(
            task_loss(self.fuse(model, zero_out(detached, [m])), batch.labels, pos_weight=pos_weight) for m in self.selected
        ))
        return record

    def _combine(self, heads):
        if self.task == MULTI_LABEL:
            return sum(heads[m] for m in self.selected)
        return sum(F.log_softmax(heads[m], dim=-1) for m in self.selected)

    def encode(self, model, inputs):
        return model.encode(inputs, [m for m in self.modalities if m in inputs])

    def predict_from_features(self, model, features):
        return self._combine(self.heads(model, {m: features[m] for m in self.selected}))
