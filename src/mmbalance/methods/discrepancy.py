"""Discrepancy ratios ρ_m between per-modality scores, shared by OGM-GE and OPM (BASELINES §2 step 2).

The papers are two-modal: ρ_a = s_a / s_v and ρ_v = 1 / ρ_a, so ρ_m > 1
marks the modality that already fits the labels better. For M > 2 the rule
is [unverified]; ``multi_ratio`` chooses one of three generalisations, each
giving the two-modal coefficients back when M = 2:

- ``mean_pairwise`` (default): ρ_m = mean_{k≠m} s_m / s_k;
- ``sum_others``: ρ_m = s_m / Σ_{k≠m} s_k (BMM's three-modal branch, minus its indentation bug);
- ``min``: ρ_m = s_m / min_k s_k (the weakest modality gets ρ = 1).

With M = 2 the first two are the paper's ratios exactly; ``min`` agrees on
the dominant modality and gives the weaker one 1 instead of a value below 1,
which no coefficient rule distinguishes (all act only where ρ_m > 1).
Every rule leaves at least one modality, the weakest, at ρ ≤ 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MultiRatio = Literal["mean_pairwise", "sum_others", "min"]
RULES: tuple[str, ...] = ("mean_pairwise", "sum_others", "min")
#: added to every denominator (BASELINES §2 step 3): a modality that scores 0 gives a finite ratio
EPSILON = 1e-5


def discrepancy_ratios(scores: Tensor, rule: str = "mean_pairwise", eps: float = EPSILON) -> Tensor:
    """ρ [M] from scores s [M] (e.g. Σ_i p(y_i | d_m,i)); detached, float.

    ``rule`` names the M > 2 generalisation (see the module docstring); all
    three are the two-modal ratio s_m / s_other for the dominant modality.
    """
    s = scores.detach().float()
    count = s.numel()
    if count < 2:
        raise ValueError(f"discrepancy ratios need at least 2 modalities, got {count}")
    if rule == "mean_pairwise":
        pairwise = s[:, None] / (s[None, :] + eps)  # [m, k] = s_m / s_k
        off_diagonal = ~torch.eye(count, dtype=torch.bool, device=s.device)
        return (pairwise * off_diagonal).sum(1) / (count - 1)
    if rule == "sum_others":
        return s / (s.sum() - s + eps)
    if rule == "min":
        return s / (s.min() + eps)
    raise ValueError(f"unknown discrepancy rule '{rule}'; allowed: {', '.join(RULES)}")
