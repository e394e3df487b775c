"""ARL: asymmetric representation learning (Wei, Luo, Luo, "Improving Multimodal Learning via
Imbalanced Learning", ICCV 2025), as the CAL specification describes it.

Each modality's prediction is read from the fusion head with the other
modalities' features zeroed. Per batch, from those predictions:

- H_m: mean entropy, normalised to sum 1, floored at ``entropy_floor`` (0.3);
- q_m = (1 / H_m) / Σ_k (1 / H_k): inverse variance, how sure modality m is;
- c_m = Σ_classes batch-mean |logit_m|, normalised: how much the fused
  prediction depends on m;
- w = softmax(T · [c_v q_a, c_a q_v]): each modality weighted by the other's
  dependence times its own inverse variance. For M > 2 modality m uses the
  mean dependence of the other modalities, mean_{k≠m} c_k · q_m, which is the
  two-modality rule exactly when M = 2.

From ``start_epoch`` (5) on, the gradient reaching each encoder through its
output feature becomes g + w_m g (a backward-only scaling; the forward pass
is unchanged). Loss: CE(fused) + γ Σ_m CE(unimodal-from-fusion), γ = 4, T = 8.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config import Section
from ..errors import ConfigError
from ..models.multimodal import zero_out
from ..registry import METHODS
from .base import Method, StepResult
from .gradient_scaling import scale_gradient_


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
class ARL(Method):
    """Asymmetric gradient reinforcement from fusion-head predictions (Wei et al., ICCV 2025)."""

    class Config(Section):
        temperature: float = Field(8.0, gt=0, description="T in w = softmax(T · c q) (8 for CREMA-D, 4 for Kinetics-Sounds and AVE)")
        unimodal_weight: float = Field(4.0, ge=0, description="γ, weight of the unimodal-from-fusion losses")
        start_epoch: int = Field(5, ge=0, description="first epoch (0-based) whose encoder gradients are scaled")
        entropy_floor: float = Field(0.3, ge=0, le=1, description="floor of the normalised entropies H_m")
        unimodal_logits: Literal["zeroed", "restricted"] = Field(
            "zeroed",
            description="fuse(f^{m}) with the others zeroed (ARL), or d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅) (BASELINES §1.1)",
        )

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if len(self.modalities) < 2:
            raise ConfigError(f"arl needs at least two modalities (got {len(self.modalities)})")

    def unimodal_from_fusion(self, model, features: dict[str, Tensor]) -> Tensor:
        """[M, B, C] logits of the fusion head reading one modality at a time."""
        logits = torch.stack([self.fuse(model, zero_out(features, [m])) for m in self.modalities])
        if self.config.unimodal_logits == "restricted":
            count = len(self.modalities)
            logits = logits - (count - 1) / count * self.fuse(model, zero_out(features, []))
        return logits

    def accelerating(self, epoch: int) -> bool:
        return epoch >= self.config.start_epoch

    def training_step(self, model, batch, ctx):
        labels = batch.labels
        features = self.encode(model, batch.inputs)
        logits = self.fuse(model, features)
        unimodal = self.unimodal_from_fusion(model, features)
        entropy, dependence = ctx.dist.mean(prediction_statistics(unimodal.detach()))
        stats = balance_weights(entropy, dependence, self.config.temperature, self.config.entropy_floor)
        if self.accelerating(ctx.epoch):
            for m, factor in zip(self.modalities, 1 + stats["weight"]):
                scale_gradient_(features[m], factor)

        fused_loss = F.cross_entropy(logits, labels)
        count = len(self.modalities)
        # Σ_m CE_m: every modality's batch has the same size, so one mean over all rows times M
        unimodal_loss = count * F.cross_entropy(unimodal.flatten(0, 1), labels.repeat(count))
        logs = {"loss/fused": fused_loss.detach(), "loss/unimodal": unimodal_loss.detach()}
        logs["arl/accelerating"] = float(self.accelerating(ctx.epoch))
        for name, values in stats.items():
            logs.update({f"arl/{name}/{m}": value for m, value in zip(self.modalities, values)})
        # ARL trains no unimodal heads; fit them as detached probes so the diagnostics can read them
        probe_loss = self.probe_loss(model, features, labels)
        return StepResult(fused_loss + self.config.unimodal_weight * unimodal_loss + probe_loss, logits, logs)
