"""CML: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, ICML 2023; BASELINES §14b).

A calibrated multimodal model should not become *more* confident when a
modality is taken away. Modalities are removed one at a time in an order π
(a random permutation of the modalities, redrawn at every epoch start, or
at every step with ``order=step``): z^{(0)} = fuse(f) and, for j = 1..M−1,
z^{(j)} = fuse(f with π_1..π_j zeroed). With conf^{(j)}_i = max_c softmax(z^{(j)}_i)_c:

    L = (1/M) Σ_{j=0}^{M−1} CE(z^{(j)}, y) + λ Σ_{j=1}^{M−1} (1/B) Σ_i max(0, conf^{(j)}_i − conf^{(j−1)}_i)

Each removal is compared with the step before it, not with the full model.
``variant=bmm`` hinges the batch sum instead, λ Σ_j max(0, Σ_i Δ_i) (BalanceMM's
code: not divided by B, and one sample's confidence drop offsets another's rise).
Removing a modality means zeroing its features before the fusion head, which
for a linear concat head equals BalanceMM's subtraction of that modality's
block. The order lives in a buffer, so a resumed run removes in the same order.
Outside the modulation window the step is plain joint training.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import Tensor

from ..models.readouts import coalition_logits
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Objective, cross_entropy
from .window import WindowConfig, in_window


# -- the method's core, usable on plain tensors --------------------------------------------------
def removal_logits(fuse: Callable[[dict[str, Tensor]], Tensor], features: dict[str, Tensor],
                   order: Sequence[str], full: Optional[Tensor] = None) -> Tensor:
    """[M, B, C] z^{(0)} = fuse(f), z^{(j)} = fuse(f with order[:j] zeroed) for j = 1..M−1.

    ``full`` (the fused logits, if already computed) is reused as z^{(0)}:
    M − 1 fusion calls then, one per removal.
    """
    steps = [fuse(features) if full is None else full]
    for j in range(1, len(order)):
        steps.append(coalition_logits(fuse, features, order[j:]))
    return torch.stack(steps)


def confidence(logits: Tensor) -> Tensor:
    """max_c softmax(logits)_c: the probability of the predicted class, same leading shape as ``logits``."""
    return logits.float().softmax(-1).amax(-1)


def calibration_penalty(logits: Tensor, variant: str = "paper", sample_weight: Optional[Tensor] = None) -> Tensor:
    """Σ_{j≥1} of the confidence increase from z^{(j−1)} to z^{(j)}, from removal logits [M, B, C] (λ not applied).

    ``paper``: (1/B) Σ_i max(0, Δ_i) per removal; ``bmm``: max(0, Σ_i Δ_i)
    per removal (the batch sum, hinged once). ``sample_weight`` [B]
    multiplies each sample's increase.
    """
    conf = confidence(logits)
    increase = conf[1:] - conf[:-1]  # [M − 1, B]
    if variant == "paper":
        hinged = increase.clamp_min(0)
        if sample_weight is not None:
            hinged = hinged * sample_weight.to(hinged.dtype)
        return hinged.mean(-1).sum()
    if variant == "bmm":
        if sample_weight is not None:
            increase = increase * sample_weight.to(increase.dtype)
        return increase.sum(-1).clamp_min(0).sum()
    raise ValueError(f"unknown variant {variant!r} (allowed: paper, bmm)")


def draw_order(count: int, generator: torch.Generator) -> Tensor:
    """A random permutation of the modality slots (π_1 is removed first), drawn on the generator's device."""
    return torch.randperm(count, generator=generator, device=generator.device)


# -- the objective -------------------------------------------------------------------------------
@METHODS.register("cml")
class CML(Objective):
    """Calibrating multimodal learning: penalise confidence that rises when modalities are removed (Ma et al., ICML 2023)."""

    honours_keep = True

    class Config(WindowConfig):
        lam: float = Field(
            0.1, ge=0, description="λ, weight of the confidence-increase penalty (BalanceMM 0.1; paper value unverified)"
        )
        order: Literal["epoch", "step"] = Field(
            "epoch", description="redraw the removal order π at every epoch start (BalanceMM) or at every step"
        )
        variant: Literal["paper", "bmm"] = Field(
            "paper",
            description="paper: per-sample hinge, averaged over the batch; "
            "bmm: BalanceMM's hinge of the batch sum (not divided by B)",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options cml`)
    search_space = {
        "lam": FloatRange(0.01, 1.0, log=True),
        "order": Choice(["epoch", "step"]),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        # π as modality slots; identity until the first draw
        self.register_buffer("removal_order", torch.arange(len(self.modalities)))

    def _draw(self, ctx) -> list[int]:
        drawn = draw_order(len(self.modalities), ctx.generator)
        self.removal_order.copy_(drawn.to(self.removal_order.device))
        return drawn.tolist()

    def on_epoch_start(self, model, ctx):
        if self.config.order == "epoch":
            self._draw(ctx)

    def training_step(self, model, batch, ctx):
        # read before any kernel of this step is queued: the copy to the host then waits for nothing
        slots = self._draw(ctx) if self.config.order == "step" else self.removal_order.tolist()
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits)
        probe, record.unimodal = self.probe_loss(model, features, batch.labels)
        calibrating = in_window(self.config, ctx.epoch)
        record.logs["cml/calibrating"] = float(calibrating)
        if not calibrating:
            record.add_loss("fused", cross_entropy(logits, batch))
            record.add_loss("probe", probe)
            return record
        count = len(self.modalities)
        order = [self.modalities[slot] for slot in slots]
        steps = removal_logits(record.fuse, features, order, full=logits)
        record.add_loss("fused", cross_entropy(logits, batch) / count)
        record.add_loss("removal", sum(cross_entropy(z, batch) for z in steps[1:]) / count)
        record.add_loss("probe", probe)
        penalty = calibration_penalty(steps, self.config.variant, batch.weight)
        if self.config.lam > 0:
            record.add_loss("cml_calibration", self.config.lam * penalty)
        conf = confidence(steps.detach())
        record.logs["cml/penalty"] = penalty.detach()
        record.logs["cml/increase_share"] = (conf[1:] > conf[:-1]).float().mean()
        for j in range(count):
            record.logs[f"cml/confidence/{j}"] = conf[j].mean()
        for position, m in enumerate(order, start=1):  # 1 = removed first; M = never removed
            record.logs[f"cml/position/{m}"] = float(position)
        return record
