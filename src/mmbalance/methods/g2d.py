"""G²D: gradient-guided distillation from unimodal teachers (Rakib & Bagavathi, ICCV 2025), an objective.

Reconstructed from the authors' code (github.com/rAIson-Lab/G2D, commit
95969d8); the paper body could not be read (BASELINES-2025 §2).

Before the student trains, one teacher per modality, T_m = (an encoder of
the student's architecture, a Linear head), is trained with cross-entropy
on modality m alone, then frozen in eval mode: the shared
``UnimodalTeachers`` of ``unimodal_teachers.py`` (UMT's and UME's teachers,
the same recipe and options ``teacher_epochs``, ``teacher_init``,
``teacher_checkpoints``; ``ctx.fit_teacher`` keeps the best epoch on the
held-out data, where the authors keep the best *test* epoch; checkpoints
in ``RUN/teachers/unimodal_M.pt``). Per step, with
(f^T_m, l^T_m) = (T_m.encode(x_m), T_m.head(f^T_m)) under no_grad::

    L = CE(z, y) + Σ_m [ λ_f · MSE(f_m, f^T_m) + λ_l · τ² · KL(p(l^T_m / τ) ‖ p(z / τ)) ]

MSE is the mean over the B × D elements, KL is summed over classes and
averaged over the batch, and both logit terms act on the same fused z.

Sequential Modality Prioritization (SMP): the teachers' confidence on the
batch, ρ_m = Σ_i p(l^T_m)_i[y_i], is published for later parts as
``record.shared["teacher_confidence"]`` (a detached [M] tensor in
``record.modalities`` order, this process's batch). Inside the SMP window
(epochs ``modulation_starts``..``modulation_ends``, inclusive; by default
half of training long, the authors' 0–150 of 300), after the gradients
are averaged, κ_m = 1 for the modality whose teacher is least confident and
0 for the others (ρ averaged across processes first; for M = 2 this is the
code's rule, for M > 2 our generalisation; every modality tied at the
minimum keeps κ = 1, so an exact tie of two freezes nothing), and the
encoder gradients of every modality with κ_m = 0 are multiplied by κ_m:
all of them (``freeze=all_encoder_grads``, the paper's reported rule) or
the 4-D convolution kernels only (``freeze=code``, the released code; its
BatchNorm and biases keep learning). ``hard_freeze`` also keeps the
optimizer from moving the frozen tensors (momentum, weight decay) by
dropping their gradients. The same rule is the plugin ``g2d_smp`` for any
other objective (it trains teachers of its own); the two are not combined.

The unimodal heads get no G²D loss: they are trained as detached probes
(diagnostics only, never SMP's input).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.readouts import true_class_probability
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Objective, cross_entropy
from .unimodal_teachers import TeacherConfig, UnimodalTeachers, check_teacher_config, teacher_epochs
from .window import WindowConfig, window_bounds

#: the role SMP plays: at most one part of a run prioritises modalities by teacher confidence
ROLE = "sequential_modality_prioritization"
#: where an objective with teachers publishes ρ_m: a detached [M] tensor, record.modalities order
CONFIDENCE = "teacher_confidence"
Freeze = Literal["all_encoder_grads", "code"]


# -- the method's core, on plain tensors ----------------------------------------------------------------
def teacher_confidence(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """ρ_m = Σ_i softmax(l^T_m,i)[y_i] from teacher logits [M, B, C]: a batch sum per modality, detached, float."""
    return true_class_probability(teacher_logits.detach().float(), labels).sum(dim=-1)


def prioritization(confidence: Tensor) -> Tensor:
    """κ [M]: 1 for the modality (or modalities, on an exact tie) with the lowest ρ, 0 for the others.

    For two modalities a tie leaves both at 1 (the authors' code raises an
    error there); for M > 2 only the least confident modality learns.
    """
    return (confidence == confidence.min()).to(confidence.dtype)


def feature_distillation(features: Tensor, teacher_features: Tensor) -> Tensor:
    """MSE(f_m, f^T_m), the mean over all B × D elements; the teacher's side carries no gradient."""
    return F.mse_loss(features, teacher_features.detach())


def logit_distillation(fused_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · KL(p(l^T / τ) ‖ p(z / τ)), summed over classes, averaged over the batch."""
    student = (fused_logits / temperature).log_softmax(dim=-1)
    teacher = (teacher_logits.detach() / temperature).log_softmax(dim=-1)
    return temperature**2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def g2d_loss(
    fused_logits: Tensor,
    labels: Tensor,
    features: dict[str, Tensor],
    teacher_features: dict[str, Tensor],
    teacher_logits: dict[str, Tensor],
    feature_weight: float = 1.0,
    logit_weight: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """L = CE(z, y) + Σ_m [λ_f MSE(f_m, f^T_m) + λ_l τ² KL(p(l^T_m/τ) ‖ p(z/τ))], for use outside the trainer."""
    total = F.cross_entropy(fused_logits, labels)
    for m in features:
        total = total + feature_weight * feature_distillation(features[m], teacher_features[m])
        total = total + logit_weight * logit_distillation(fused_logits, teacher_logits[m], temperature)
    return total


def frozen_parameters(params, freeze: str) -> list[nn.Parameter]:
    """The encoder tensors SMP freezes: every one (``all_encoder_grads``) or the 4-D kernels only (``code``)."""
    if freeze not in ("all_encoder_grads", "code"):
        raise ValueError(f"freeze must be 'all_encoder_grads' or 'code', got '{freeze}'")
    return [p for p in params if freeze == "all_encoder_grads" or p.dim() == 4]


def prioritize_gradients_(encoder_params: dict[str, list], modalities: list[str], kappa: Tensor,
                          freeze: str = "all_encoder_grads", hard_freeze: bool = False) -> None:
    """g ← κ_m g on the selected tensors of each encoder m, in place.

    ``hard_freeze``: a frozen tensor's gradient is dropped instead (set to
    None), so the optimizer skips it: no momentum or weight-decay step either.
    """
    if hard_freeze:
        for m, k in zip(modalities, kappa.tolist()):
            if k == 0:
                for p in frozen_parameters(encoder_params[m], freeze):
                    p.grad = None
        return
    for slot, m in enumerate(modalities):
        for p in frozen_parameters(encoder_params[m], freeze):
            if p.grad is not None:
                p.grad.mul_(kappa[slot].to(p.grad.dtype))


# -- the SMP options and schedule, shared with the g2d_smp plugin ------------------------------------------
class SMPConfig(WindowConfig):
    """The SMP window and how a modality is frozen (G²D's objective and the ``g2d_smp`` plugin)."""

    modulation_starts: int = Field(0, ge=0, description="first epoch (0-based) of Sequential Modality Prioritization")
    modulation_ends: Optional[int] = Field(
        None, ge=0,
        description="last SMP epoch, inclusive; unset: modulation_starts + train.epochs // 2 (the authors' epochs 0–150 of 300)",
    )
    freeze: Freeze = Field(
        "all_encoder_grads",
        description="gradients zeroed for the more confident modalities: all_encoder_grads (every encoder tensor, "
        "the paper's rule as reported [unverified]) or code (4-D convolution kernels only, the authors' code)",
    )
    hard_freeze: bool = Field(
        False,
        description="also keep the optimizer from moving the frozen tensors (momentum, weight decay) [our choice]",
    )


def smp_window(config: SMPConfig, epochs: int) -> tuple[int, int]:
    """[starts, ends] of the SMP window in a run of ``epochs``; unset ends: starts + epochs // 2."""
    starts, ends = window_bounds(config)
    return starts, starts + epochs // 2 if ends is None else ends


def smp_active(config: SMPConfig, epoch: int, epochs: int) -> bool:
    starts, ends = smp_window(config, epochs)
    return starts <= epoch <= ends


def check_freezable(config: SMPConfig, model, modalities: list[str], part: str) -> None:
    """``freeze=code`` on an encoder without 4-D kernels would never freeze it: refused with one line."""
    if config.freeze != "code":
        return
    for m in modalities:
        if not any(p.dim() == 4 for p in model.encoders[m].parameters()):
            raise ConfigError(
                f"{part}.freeze=code zeroes 4-D convolution kernels only, and the encoder of modality '{m}' has none "
                f"(SMP could never freeze it); use {part}.freeze=all_encoder_grads"
            )


def smp_coefficients(ctx, confidence: Tensor) -> Tensor:
    """κ [M] from this process's ρ, averaged across processes first so every process freezes the same encoder."""
    return prioritization(ctx.dist.mean(confidence.detach().float()))


def smp_pinned(config: SMPConfig, epochs: int) -> dict:
    return {"modulation_ends": smp_window(config, epochs)[1]} if config.modulation_ends is None else {}


def teacher_pinned(config: TeacherConfig, epochs: int) -> dict:
    """An unset ``teacher_epochs`` follows ``train.epochs``: pinned, so an extended run keeps its teachers' recipe."""
    return {"teacher_epochs": epochs} if config.teacher_epochs is None else {}


@METHODS.register("g2d")
class G2D(Objective):
    """Gradient-guided distillation from unimodal teachers with modality prioritization (Rakib & Bagavathi, ICCV 2025)."""

    honours_keep = True

    class Config(SMPConfig, TeacherConfig):
        feature_weight: float = Field(1.0, ge=0, description="λ_f, weight of each Σ_m MSE(f_m, f^T_m) term (code: 1)")
        logit_weight: float = Field(1.0, ge=0, description="λ_l, weight of each τ² KL(p(l^T_m/τ) ‖ p(z/τ)) term (code: 1)")
        temperature: float = Field(1.0, gt=0, le=100, description="τ of the logit distillation (code: 1)")
        smp: bool = Field(True, description="apply Sequential Modality Prioritization inside its window")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options g2d`)
    search_space = {
        "feature_weight": FloatRange(0.1, 4.0, log=True),
        "logit_weight": FloatRange(0.1, 4.0, log=True),
        "temperature": FloatRange(0.5, 8.0, log=True),
    }

    exclusive = (ROLE,)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        check_teacher_config(config, self.modalities, self.name)

    @classmethod
    def pinned_options(cls, config, epochs):
        return smp_pinned(config, epochs) | teacher_pinned(config, epochs)

    def setup(self, model, ctx):
        if self.config.smp:
            check_freezable(self.config, model, self.modalities, self.name)
        self.teachers = UnimodalTeachers.for_model(model, self.config, self.num_classes, ctx, self.name)

    def on_epoch_start(self, model, ctx):
        self.teachers.fit(ctx, teacher_epochs(self.config, ctx.max_epochs))

    def prioritizing(self, ctx) -> bool:
        return self.config.smp and smp_active(self.config, ctx.epoch, ctx.max_epochs)

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        outputs = self.teachers.outputs(batch.inputs)
        probe, unimodal = self.probe_loss(model, features, batch.labels)
        record = self.record(model, batch, features, logits=logits, unimodal=unimodal)
        tau = self.config.temperature
        mse = torch.stack([feature_distillation(features[m], outputs[m][0]) for m in self.modalities])
        kl = torch.stack([logit_distillation(logits, outputs[m][1], tau) for m in self.modalities])
        record.add_loss("fused", cross_entropy(logits, batch))
        record.add_loss("feature_distill", self.config.feature_weight * mse.sum())
        record.add_loss("logit_distill", self.config.logit_weight * kl.sum())
        record.add_loss("probe", probe)
        confidence = teacher_confidence(torch.stack([outputs[m][1] for m in self.modalities]), batch.labels)
        record.shared[CONFIDENCE] = confidence
        prioritizing = self.prioritizing(ctx)
        kappa = smp_coefficients(ctx, confidence) if prioritizing else torch.ones_like(confidence)
        if prioritizing:
            record.shared[f"{self.name}/kappa"] = kappa
        record.logs[f"{self.name}/prioritizing"] = float(prioritizing)
        mean_confidence = confidence / len(batch)
        for slot, m in enumerate(self.modalities):
            record.logs[f"{self.name}/teacher_confidence/{m}"] = mean_confidence[slot]
            record.logs[f"{self.name}/kappa/{m}"] = kappa[slot]
            record.logs[f"{self.name}/feature_mse/{m}"] = mse[slot].detach()
            record.logs[f"{self.name}/logit_kl/{m}"] = kl[slot].detach()
        return record

    def after_backward(self, record, ctx):
        key = f"{self.name}/kappa"
        if record is None or key not in record.shared:
            return
        prioritize_gradients_(ctx.params.encoder, self.modalities, record.shared[key],
                              self.config.freeze, self.config.hard_freeze)

    def on_epoch_end(self, model, ctx):
        return self.teachers.logs(self.name)
