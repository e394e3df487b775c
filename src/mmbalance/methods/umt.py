"""UMT and UME: uni-modal teacher and uni-modal ensemble (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao,
"On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023), as objectives.

Joint training under-learns each modality's features. Both methods first
train one unimodal model per modality (the teachers, ``unimodal_teachers.py``;
their training is part of the run and of its time). Then (BASELINES §12):

- ``umt`` trains the multimodal model jointly and pulls every encoder's
  features towards its frozen teacher's:
  L = CE(fuse(f), y) + λ Σ_m MSE(f_m, T_m.encode(x_m)), λ = 10,
  the MSE averaged over all elements, the teacher under no-grad.
- ``ume`` does no joint training: it predicts with the mean of the
  teachers' probabilities, mean_m softmax(T_m(x_m)) (``ensemble=logits``:
  the mean of their logits).

How UME is read: its ``encode`` returns the teachers' logits as the
"features", ``fuse`` ensembles them and ``heads`` returns them unchanged.
A zeroed modality's logits are 0, whose softmax is uniform, so fuse(f^{S})
is the ensemble of the modalities in S plus a constant per class: the
modality-only accuracy and the Shapley values of a UME run are those of its
teachers and of their sub-ensembles, and the unimodal accuracy is each
teacher's. ``fuse`` returns log(mean_m p_m), so its softmax is the
ensemble's probability itself. Nothing trains in UME's main epochs: its
step records the ensemble's cross-entropy on the batch (a monitor that
reaches no parameter) and the model's parameters never get a gradient.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Objective, cross_entropy
from .unimodal_teachers import TeacherConfig, UnimodalTeachers, check_teacher_config, teacher_epochs
from .window import WindowConfig, in_window


# -- the rules, on plain tensors ------------------------------------------------------------------
def distillation_terms(features: dict[str, Tensor], targets: dict[str, Tensor],
                       weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per modality MSE(f_m, t_m), averaged over every element of f_m.

    ``weight`` (per sample, as a plugin may set ``batch.weight``) weighs
    each sample's mean squared error as ``cross_entropy`` weighs its loss:
    mean_i w_i · mean_j (f_ij − t_ij)². Without it, the plain MSE. E.g.
    f = (1, 2), t = (0, 0): (1 + 4) / 2 = 2.5.
    """
    terms = {}
    for m, f in features.items():
        target = targets[m].detach().to(f.dtype)
        if weight is None:
            terms[m] = F.mse_loss(f, target)
        else:
            per_sample = (f - target).pow(2).flatten(1).mean(1)
            terms[m] = (per_sample * weight).mean()
    return terms


def distillation_loss(features: dict[str, Tensor], targets: dict[str, Tensor], weight: float = 10.0,
                      sample_weight: Optional[Tensor] = None) -> Tensor:
    """UMT's distillation term λ Σ_m MSE(f_m, t_m) (λ = ``weight``); f_m = (1, 2), t_m = (0, 0), λ = 10: 25."""
    return weight * sum(distillation_terms(features, targets, sample_weight).values())


def ensemble_logits(logits: dict[str, Tensor], mode: str = "probabilities") -> Tensor:
    """UME's prediction from the teachers' logits.

    ``probabilities``: log(mean_m softmax(z_m)), whose softmax is the mean
    of the teachers' probabilities; ``logits``: mean_m z_m.
    """
    stacked = torch.stack([z.float() for z in logits.values()])
    if mode == "logits":
        return stacked.mean(0)
    return torch.logsumexp(stacked.log_softmax(-1), dim=0) - math.log(len(logits))


# -- the objectives -------------------------------------------------------------------------------
class _TeacherObjective(Objective):
    """What UMT and UME share: the teachers, built in ``setup`` and trained at the first epoch start."""

    honours_keep = True

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        check_teacher_config(config, self.modalities, self.name)

    @classmethod
    def pinned_options(cls, config, epochs):
        return {"teacher_epochs": epochs} if config.teacher_epochs is None else {}

    def setup(self, model, ctx):
        self.teachers = UnimodalTeachers.for_model(model, self.config, self.num_classes, ctx, self.name)

    def on_epoch_start(self, model, ctx):
        self.teachers.fit(ctx, teacher_epochs(self.config, ctx.max_epochs))

    def on_epoch_end(self, model, ctx):
        return self.teachers.logs(self.name)


@METHODS.register("umt")
class UMT(_TeacherObjective):
    """Uni-modal teacher: joint CE plus MSE distillation of unimodal teachers' features (Du et al., ICML 2023)."""

    class Config(WindowConfig, TeacherConfig):
        distillation_weight: float = Field(
            10.0, ge=0, description="λ, weight of Σ_m MSE(f_m, T_m(x_m)) (BMM's scaling; the paper's value is unverified)"
        )
        modulation_starts: Optional[int] = Field(
            0, ge=0, description="first epoch (0-based) with the distillation term (paper: 0; BMM applies it in its window)"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options umt`)
    search_space = {
        "distillation_weight": FloatRange(1.0, 30.0, log=True),
    }

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        weight = self.config.distillation_weight
        if weight > 0 and in_window(self.config, ctx.epoch):
            targets = self.teachers.encode(batch.inputs)
            terms = distillation_terms(features, targets, batch.weight)
            record.add_loss("distil", weight * torch.stack(list(terms.values())).sum())
            record.logs.update({f"umt/mse/{m}": term.detach() for m, term in terms.items()})
        probe, record.unimodal = self.probe_loss(model, features, batch.labels)
        record.add_loss("probe", probe)
        return record


@METHODS.register("ume")
class UME(_TeacherObjective):
    """Uni-modal ensemble: predict with the mean of separately trained unimodal teachers (Du et al., ICML 2023)."""

    class Config(TeacherConfig):
        ensemble: Literal["probabilities", "logits"] = Field(
            "probabilities",
            description="average the teachers' softmax probabilities or their logits (which the paper uses is unverified)",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options ume`)
    search_space = {
        "ensemble": Choice(["probabilities", "logits"]),
    }

    def encode(self, model, inputs):
        """The teachers' logits stand for the features: evaluation and every readout go through the teachers."""
        return self.teachers.logits(inputs)

    def fuse(self, model, features):
        return ensemble_logits(features, self.config.ensemble)

    def heads(self, model, features):
        return dict(features)

    def predict_from_features(self, model, features):
        return self.fuse(model, features)

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits, unimodal=self.heads(model, features))
        # nothing to train: the ensemble's CE is recorded as the loss, a leaf reaching no parameter
        record.add_loss("ensemble", cross_entropy(logits, batch).detach().requires_grad_())
        return record
