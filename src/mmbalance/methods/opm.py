"""OPM / OGM (TPAMI): on-the-fly prediction and gradient modulation (Wei, Hu, Du, Wen, "On-the-fly
Modulation for Balanced Multimodal Learning", IEEE TPAMI 2024), as a plugin.

Scores s_m and ratios ρ_m as in OGM-GE (``ogm_ge.py``, ``discrepancy.py``).

``variant=OPM`` (default, the paper's feed-forward modulation, BASELINES §10):

- q_m = clip(q_base (1 + λ tanh(relu(ρ_m − 1))), 0, 1) where ρ_m > 1, else 0: the
  probability of dropping modality m's feature, so only modalities ahead of
  the others are ever dropped;
- with probability p_exe (one draw per step) keep masks b_{i,m} ~
  Bernoulli(1 − q_m) per sample and modality; θ = Σ_m D_m q_m / Σ_m D_m
  (D_m the feature widths); f̃_{m,i} = b_{i,m} f_{m,i} / (1 − θ), so the
  expected fused input keeps its scale (the gradient through f̃ carries the
  same 1/(1 − θ)); otherwise f̃ = f;
- the objective's fused cross-entropy (its loss term ``fused``) becomes
  CE(fuse(f̃), y) averaged over the samples with at least one kept
  modality. The objective's other terms (MIDAS's unimodal and misaligned
  losses, probes) and its logits are left as they are. An objective step
  without a ``fused`` term (MIDAS's warm-up) is left alone.

``variant=OGM`` is the journal's gradient modulation: §2's k_m on the
encoder gradients, without GE unless ``ge=true``. ``variant=OGM_plus`` is
the authors' switch ``use_OGM_plus`` [unverified]: instead of slowing the
dominant encoder, every modality not ahead (ρ_m ≤ 1) gets its encoder
gradient multiplied by ``plus_factor`` (4), or by 1 + tanh(α / ρ_m) with
``plus_rule=tanh`` (their commented alternative; 1/ρ_m is the dominant
modality's ratio when M = 2).

All variants act only inside the modulation window; its default start 6 is
the authors' warm-up (no modulation while epoch ≤ 5).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin
from .discrepancy import MultiRatio, discrepancy_ratios
from .mixing import ROLE as FUSED_REWRITE
from .ogm_ge import GeParams, ScoreLogits, modulate_encoders_, ogm_coefficients, scores_of, step_seed
from .window import WindowConfig, in_window

#: the objective's loss term that OPM recomputes on the dropped features
FUSED_TERM = "fused"


# -- the rule, on plain tensors ---------------------------------------------------------------------
def drop_probabilities(ratios: Tensor, q_base: float, lam: float) -> Tensor:
    """q_m = clip(q_base (1 + λ tanh(relu(ρ_m − 1))), 0, 1) where ρ_m > 1, else 0."""
    q = q_base * (1 + lam * torch.tanh(torch.relu(ratios - 1)))
    return torch.where(ratios > 1, q.clamp(0, 1), torch.zeros_like(ratios))


def drop_theta(q: Tensor, widths: Tensor) -> Tensor:
    """θ = Σ_m D_m q_m / Σ_m D_m: the expected fraction of the fused input's entries dropped."""
    widths = widths.to(q)
    return (widths * q).sum() / widths.sum()


def keep_masks(q: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """[B, M] booleans b_{i,m} ~ Bernoulli(1 − q_m), drawn on ``generator``'s device."""
    uniform = torch.rand((batch_size, q.numel()), generator=generator, device=generator.device)
    return uniform < (1 - q).to(uniform.device)


def dropped_features(features: dict[str, Tensor], modalities: list[str], keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """f̃_m = b_m f_m / (1 − θ) for every modality (b broadcast over the feature dimensions)."""
    scale = 1 / (1 - theta).clamp_min(torch.finfo(theta.dtype).eps)
    out = {}
    for slot, m in enumerate(modalities):
        f = features[m]
        mask = keep[:, slot].reshape(-1, *([1] * (f.ndim - 1))).to(f.dtype)
        out[m] = f * (mask * scale.to(f.dtype))
    return out


def kept_cross_entropy(logits: Tensor, labels: Tensor, kept: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean CE over the kept samples (each weighted by ``weight`` if given); 0 with a graph if none is kept."""
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    if weight is not None:
        per_sample = per_sample * weight
    kept = kept.to(per_sample.dtype)
    return (per_sample * kept).sum() / kept.sum().clamp_min(1)


def ogm_plus_coefficients(ratios: Tensor, rule: str, factor: float, alpha: float) -> Tensor:
    """1 for modalities ahead (ρ_m > 1); the others ``factor`` (constant) or 1 + tanh(α / ρ_m) (tanh)."""
    if rule == "constant":
        boost = torch.full_like(ratios, factor)
    else:
        boost = 1 + torch.tanh(alpha / ratios.clamp_min(torch.finfo(ratios.dtype).tiny))
    return torch.where(ratios > 1, torch.ones_like(ratios), boost)


@METHODS.register("opm")
class OPM(Plugin):
    """On-the-fly prediction modulation: drop the dominant modality's features at random (Wei et al., TPAMI 2024)."""

    exclusive = (FUSED_REWRITE,)  # its dropped-feature loss takes the place of the objective's fused term

    class Config(WindowConfig):
        modulation_starts: int = Field(
            6, ge=0, description="first epoch (0-based) with modulation; the official warm-up is epochs 0–5"
        )
        modulation_ends: Optional[int] = Field(
            None, ge=0, description="last modulated epoch, inclusive; unset: the last epoch (official OGM script: 60)"
        )
        variant: Literal["OPM", "OGM", "OGM_plus"] = Field(
            "OPM",
            description="OPM: drop dominant features before fusion; OGM: slow the dominant encoder's gradients; "
            "OGM_plus: amplify the others' encoder gradients [unverified]",
        )
        q_base: float = Field(0.5, ge=0, le=1, description="q_base, drop probability at ρ = 1⁺ (official 0.5; BMM 0.4)")
        lam: float = Field(0.5, ge=0, le=100, description="λ in q = q_base (1 + λ tanh(ρ − 1)) (official lam; BMM alpha)")
        p_exe: float = Field(0.7, ge=0, le=1, description="probability that a step drops features at all")
        multi_ratio: MultiRatio = Field(
            "mean_pairwise",
            description="discrepancy ratio for M > 2 [unverified]: mean_pairwise, sum_others (BMM), min; all s_a/s_v for M = 2",
        )
        score_logits: ScoreLogits = Field(
            "fusion", description="scores from the fusion-restricted logits d_m (paper) or the unimodal heads"
        )
        alpha: float = Field(
            0.8, ge=0, le=100,
            description="α of the OGM variants (released OGM script 0.8; the repo's config 1.0)",
        )
        ge: bool = Field(False, description="OGM variants: add GE noise (the released OGM script runs with it on)")
        ge_params: GeParams = Field(
            "weights", description="OGM variants: encoder tensors modulated, weights (ndim ≥ 2) or conv4d (official)"
        )
        plus_rule: Literal["constant", "tanh"] = Field(
            "constant", description="OGM_plus: factor for the other modalities, constant or 1 + tanh(α / ρ)"
        )
        plus_factor: float = Field(4.0, gt=0, le=1000, description="OGM_plus: constant factor (official 4)")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options opm`)
    search_space = {
        "q_base": FloatRange(0.2, 0.8),
        "lam": FloatRange(0.1, 2.0, log=True),
        "p_exe": FloatRange(0.3, 1.0),
    }

    @property
    def key(self) -> str:
        return f"{self.name}/coefficients"

    def on_forward(self, record, ctx):
        scores = ctx.dist.mean(scores_of(record, self.config.score_logits, self.name))
        ratios = discrepancy_ratios(scores, self.config.multi_ratio)
        active = in_window(self.config, ctx.epoch)
        logs = {"score": scores, "ratio": ratios}
        record.logs[f"{self.name}/modulating"] = float(active)
        if self.config.variant == "OPM":
            q = drop_probabilities(ratios, self.config.q_base, self.config.lam)
            logs["q"] = q
            if active and FUSED_TERM in record.losses:
                self.drop(record, ctx, q)
        else:
            if self.config.variant == "OGM":
                coefficients = ogm_coefficients(ratios, self.config.alpha)
            else:
                coefficients = ogm_plus_coefficients(ratios, self.config.plus_rule, self.config.plus_factor, self.config.alpha)
            record.shared[self.key] = coefficients
            logs["coefficient"] = coefficients
        for name, values in logs.items():
            record.logs.update({f"{self.name}/{name}/{m}": v for m, v in zip(self.modalities, values)})

    def drop(self, record, ctx, q: Tensor) -> None:
        """One OPM draw: with probability p_exe, the fused term is recomputed on dropped features."""
        executed = bool(torch.rand((), generator=ctx.generator) < self.config.p_exe)
        record.logs[f"{self.name}/executed"] = float(executed)
        if not executed:
            return
        features = record.features
        device = features[self.modalities[0]].device
        # one seed per step from the shared generator; each process draws its own samples' masks
        generator = torch.Generator(device=device).manual_seed(step_seed(ctx.generator) + ctx.dist.rank)
        keep = keep_masks(q.to(device), len(record.batch), generator)
        widths = torch.tensor([features[m][0].numel() for m in self.modalities], dtype=torch.float32)
        theta = drop_theta(q.to(device), widths.to(device))
        logits = record.fuse(dropped_features(features, self.modalities, keep, theta))
        kept = keep.any(dim=1)
        record.losses[FUSED_TERM] = kept_cross_entropy(logits, record.labels, kept, record.batch.weight)
        record.logs[f"{self.name}/theta"] = theta
        record.logs.update({f"{self.name}/kept/{m}": keep[:, slot].float().mean() for slot, m in enumerate(self.modalities)})

    def after_backward(self, record, ctx):
        if record is None or self.key not in record.shared or not in_window(self.config, ctx.epoch):
            return
        modulate_encoders_(ctx, self.modalities, record.shared[self.key], self.config.ge, self.config.ge_params)
