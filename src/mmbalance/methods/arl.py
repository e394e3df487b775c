"""ARL: asymmetric representation learning (Wei, Luo, Luo, "Improving Multimodal Learning via
Imbalanced Learning", ICCV 2025), as a plugin for any objective.

Each modality's prediction is read from the fusion head with the other
modalities' features zeroed (``unimodal_logits=zeroed``, ARL) or as the
fusion-restricted d_m (``restricted``). Per batch, from those predictions:

- H_m: mean entropy, normalised to sum 1, floored at ``entropy_floor`` (0.3);
- q_m = (1 / H_m) / Σ_k (1 / H_k): inverse variance, how sure modality m is;
- c_m = Σ_classes batch-mean |logit_m|, normalised: how much the fused
  prediction depends on m;
- w = softmax(T · [c_v q_a, c_a q_v]): each modality weighted by the other's
  dependence times its own inverse variance. For M > 2 modality m uses the
  mean dependence of the other modalities, mean_{k≠m} c_k · q_m, which is the
  two-modality rule exactly when M = 2.

Inside the modulation window (from epoch 5) the gradient reaching each
encoder through its output becomes g + w_m g (a backward-only scaling; the
forward pass is unchanged). ARL's auxiliary loss γ Σ_m CE(unimodal-from-fusion)
(γ = 4) is added to the objective's loss.

``schedule=paper`` (default) is the paper's: γ throughout, scaling from
``modulation_starts``. ``schedule=official`` is the authors' released
schedule: γ = 1 during the warm-up (epochs before ``modulation_starts``),
scaling from the epoch after ``modulation_starts``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin
from .gradient_scaling import scale_gradient_
from .window import WindowConfig, in_window


def prediction_statistics(unimodal_logits: Tensor) -> Tensor:
    """[2, M]: mean prediction entropy and Σ_classes batch-mean |logit|, from logits [M, B, C]."""
    entropy = -(unimodal_logits.softmax(-1) * unimodal_logits.log_softmax(-1)).sum(-1).mean(-1)
    dependence = unimodal_logits.abs().mean(1).sum(-1)
    return torch.stack([entropy, dependence])


def normalised(values: Tensor) -> Tensor:
    return values / values.sum().clamp_min(torch.finfo(values.dtype).tiny)


def balance_weights(entropy: Tensor, dependence: Tensor, temperature: float, entropy_floor: float) -> dict[str, Tensor]:
    """ARL's per-modality gradient weights w from the raw statistics (see the module docstring)."""
    floored = normalised(entropy).clamp_min(entropy_floor)
    inverse_variance = normalised(1 / floored)
    share = normalised(dependence)
    others = (share.sum() - share) / (share.numel() - 1)
    weight = torch.softmax(temperature * others * inverse_variance, dim=0)
    return {"entropy": floored, "q": inverse_variance, "c": share, "weight": weight}


@METHODS.register("arl")
class ARL(Plugin):
    """Asymmetric gradient reinforcement from fusion-head predictions (Wei et al., ICCV 2025)."""

    class Config(WindowConfig):
        modulation_starts: int = Field(5, ge=0, description="first epoch (0-based) whose encoder gradients are scaled")
        temperature: float = Field(8.0, gt=0, description="T in w = softmax(T · c q) (8 for CREMA-D, 4 for Kinetics-Sounds and AVE)")
        unimodal_weight: float = Field(4.0, ge=0, description="γ, weight of the unimodal-from-fusion losses added to the objective's")
        entropy_floor: float = Field(0.3, ge=0, le=1, description="floor of the normalised entropies H_m")
        unimodal_logits: Literal["zeroed", "restricted"] = Field(
            "zeroed",
            description="fuse(f^{m}) with the others zeroed (ARL), or d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅) (BASELINES §1.1)",
        )
        schedule: Literal["paper", "official"] = Field(
            "paper",
            description="paper: γ throughout, scaling from modulation_starts; official (the authors' code): "
            "γ = 1 before modulation_starts, scaling from the epoch after it",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options arl`)
    search_space = {
        "temperature": FloatRange(1.0, 16.0, log=True),
        "unimodal_weight": FloatRange(0.5, 8.0, log=True),
        "entropy_floor": FloatRange(0.0, 0.6),
    }

    defaults = {"train.grad_clip": 40.0}
    auxiliary_options = ("unimodal_weight",)


    def accelerating(self, epoch: int) -> bool:
        # official: the first epoch of the window is skipped; its end stays modulation_ends
        skipped = self.config.schedule == "official" and epoch == self.config.modulation_starts
        return in_window(self.config, epoch) and not skipped

    def unimodal_weight(self, epoch: int) -> float:
        """γ of this epoch: the authors' code uses 1 during the warm-up (0 stays 0: the term is off)."""
        warming_up = epoch < self.config.modulation_starts
        if self.config.schedule == "official" and warming_up and self.config.unimodal_weight > 0:
            return 1.0
        return self.config.unimodal_weight

    def on_forward(self, record, ctx):
        unimodal = record.zeroed_logits() if self.config.unimodal_logits == "zeroed" else record.restricted_logits()
        entropy, dependence = ctx.dist.mean(prediction_statistics(unimodal.detach().float()))
        stats = balance_weights(entropy, dependence, self.config.temperature, self.config.entropy_floor)
        accelerating = self.accelerating(ctx.epoch)
        if accelerating:
            for m, factor in zip(self.modalities, 1 + stats["weight"]):
                scale_gradient_(record.encoder_outputs[m], factor)
        weight = self.unimodal_weight(ctx.epoch)
        if weight > 0:
            count = len(self.modalities)
            # Σ_m CE_m: every modality's batch has the same size, so one mean over all rows times M
            loss = count * F.cross_entropy(unimodal.flatten(0, 1), record.labels.repeat(count))
            record.add_loss("arl_unimodal", weight * loss)
        record.logs["arl/accelerating"] = float(accelerating)
        for name, values in stats.items():
            record.logs.update({f"arl/{name}/{m}": value for m, value in zip(self.modalities, values)})
