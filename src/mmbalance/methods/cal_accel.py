"""CAL's contribution-guided gradient acceleration as a plugin, for any objective.

The contribution W and weights ρ of ``methods/contribution.py`` are computed
from the step record (the objective's features, fused head and unimodal
logits; the fused head's single-modality readouts when the objective has no
unimodal heads); inside the modulation window the gradient reaching encoder
m through its output is multiplied by 1 + ρ_m, so the strong modality is
reinforced, not suppressed. ``--method cal`` already does this inside CAL's
objective, so the two are not combined.
"""

from __future__ import annotations

import torch

from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Plugin
from .cal import ROLE
from .contribution import LOGGED, ContributionConfig, ContributionTracker, EpochMeans
from .gradient_scaling import scale_gradient_
from .window import in_window


@METHODS.register("cal_accel")
class CALAcceleration(Plugin):
    """CAL's contribution-guided gradient acceleration (1 + ρ_m on each encoder), for any objective."""

    Config = ContributionConfig

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options cal_accel`)
    search_space = {
        "temperature": FloatRange(1.0, 16.0, log=True),
        "momentum": FloatRange(0.5, 0.99),
        "confidence": Choice(["probability", "ema", "entropy"]),
    }

    defaults = {"train.grad_clip": 40.0}
    exclusive = (ROLE,)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self.tracker = ContributionTracker(config, self.modalities, num_classes)
        self.epoch_means = EpochMeans()

    def on_epoch_start(self, model, ctx):
        self.epoch_means.reset()

    def on_forward(self, record, ctx):
        stats = self.tracker.step(record, ctx.dist)
        if in_window(self.config, ctx.epoch):
            for m, factor in zip(self.modalities, 1 + stats["rho"]):
                scale_gradient_(record.encoder_outputs[m], factor)
        self.epoch_means.add(torch.stack([stats[k] for k in LOGGED]))

    def on_epoch_end(self, model, ctx):
        logs = {"cal_accel/accelerating": float(in_window(self.config, ctx.epoch))}
        logs.update(self.epoch_means.logs("cal_accel", LOGGED, self.modalities, ctx.dist))
        return logs
