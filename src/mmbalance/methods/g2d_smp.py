"""G²D's Sequential Modality Prioritization as a plugin, for any objective.

SMP (Rakib & Bagavathi, ICCV 2025; BASELINES-2025 §2) needs frozen unimodal
teachers' confidence on each batch, ρ_m = Σ_i p(l^T_m)_i[y_i]. The plugin
trains its own teachers inside the run (``UnimodalTeachers``, the recipe
and options of ``g2d``, ``umt`` and ``ume``: one per modality, best
held-out epoch, ``ctx.fit_teacher``, ``RUN/teachers/unimodal_M.pt``). When
the objective publishes confidences of its own teachers in
``record.shared["teacher_confidence"]``, those are used instead.
Inside its window it keeps only the least confident modality's encoder
learning: κ = 1 for argmin ρ (every modality tied at the minimum), 0 for
the others, and the gradients of every encoder with κ = 0 are multiplied by
κ (options and rule as in ``g2d.py``). ``g2d`` applies the same rule itself
(``g2d.smp=true``), so ``g2d+g2d_smp`` is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import METHODS
from ..search_space import Choice
from .base import Plugin
from .g2d import (
    CONFIDENCE,
    ROLE,
    SMPConfig,
    check_freezable,
    prioritize_gradients_,
    smp_active,
    smp_coefficients,
    smp_pinned,
    teacher_confidence,
    teacher_pinned,
)
from .unimodal_teachers import TeacherConfig, UnimodalTeachers, check_teacher_config, teacher_epochs


def published_confidence(record, part: str) -> Tensor | None:
    """The objective's ρ [M] from ``record.shared``, or None when it publishes none."""
    confidence = record.shared.get(CONFIDENCE)
    if confidence is None:
        return None
    if not isinstance(confidence, Tensor) or confidence.shape != (len(record.modalities),):
        raise ValueError(
            f"record.shared['{CONFIDENCE}'] must be a tensor of shape [{len(record.modalities)}] (one ρ per modality, "
            f"in record.modalities order), got {getattr(confidence, 'shape', type(confidence).__name__)}"
        )
    return confidence


@METHODS.register("g2d_smp")
class G2DSMP(Plugin):
    """G²D's Sequential Modality Prioritization: freeze the encoders of the modalities with the more confident teachers."""

    class Config(SMPConfig, TeacherConfig):
        pass

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options g2d_smp`)
    search_space = {
        "freeze": Choice(["all_encoder_grads", "code"]),
        "hard_freeze": Choice([False, True]),
    }

    exclusive = (ROLE,)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        check_teacher_config(config, self.modalities, self.name)

    @classmethod
    def pinned_options(cls, config, epochs):
        return smp_pinned(config, epochs) | teacher_pinned(config, epochs)

    @property
    def key(self) -> str:
        return f"{self.name}/kappa"

    def setup(self, model, ctx):
        check_freezable(self.config, model, self.modalities, self.name)
        self.teachers = UnimodalTeachers.for_model(model, self.config, self.num_classes, ctx, self.name)

    def on_epoch_start(self, model, ctx):
        self.teachers.fit(ctx, teacher_epochs(self.config, ctx.max_epochs))

    def on_epoch_end(self, model, ctx):
        return self.teachers.logs(self.name)

    def on_forward(self, record, ctx):
        active = smp_active(self.config, ctx.epoch, ctx.max_epochs)
        if active:  # outside the window κ = 1: no teacher pass
            confidence = published_confidence(record, self.name)
            if confidence is None:  # the objective has no teachers: ask this plugin's own
                logits = self.teachers.logits(record.batch.inputs)
                confidence = teacher_confidence(torch.stack([logits[m] for m in self.modalities]), record.labels)
            kappa = smp_coefficients(ctx, confidence)
            record.shared[self.key] = kappa
        else:
            kappa = torch.ones(len(self.modalities), device=record.labels.device)
        record.logs[f"{self.name}/prioritizing"] = float(active)
        record.logs.update({f"{self.name}/kappa/{m}": k for m, k in zip(self.modalities, kappa)})

    def after_backward(self, record, ctx):
        if record is None or self.key not in record.shared:
            return
        prioritize_gradients_(ctx.params.encoder, self.modalities, record.shared[self.key],
                              self.config.freeze, self.config.hard_freeze)
