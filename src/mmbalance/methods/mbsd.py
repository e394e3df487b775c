"""MBSD: balanced self-distillation between modalities (BalanceMM's MBSD, BASELINES §14a).

For every pair of modalities (a, b) and every sample, the modality that gives
the true class the higher probability teaches the other one, with a weight
w_i = |p_a,i[y] − p_b,i[y]| on samples that at least one of the two gets right
(w_i = 0 where both are wrong: neither is worth copying). With unimodal logits
d_m (the fusion-restricted d_m of BASELINES §1.1 by default, or the unimodal
heads with ``score_logits=heads``) and p_m = softmax(d_m):

    L_RS = (1/B) Σ_i w_i · (1/C) ‖d_a,i − d_b,i‖²       (``rs_space=probabilities``: on p)
    L_KL = (1/B) Σ_i w_i · KL(p_strong,i ‖ p_weak,i)     (teacher side detached)
    L    = CE(z) + Σ_m CE(d_m) + L_RS + L_KL

For M > 2 L_RS and L_KL are averaged over the M(M−1)/2 pairs; Σ_m CE(d_m)
runs over every modality. The weights w are constants (detached) unless
``detach_weight=false``. ``variant=bmm`` replaces the KL by the expression
BalanceMM's code evaluates, p_weak[y]·(log p_weak[y] − p_strong[y]) on the two
true-class probabilities, which is not a divergence (kept for reproduction).
Outside the modulation window the step is plain joint training.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from ..models.readouts import modality_scores, true_class_probability
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Objective, cross_entropy
from .window import WindowConfig, in_window


# -- the method's core, usable on plain tensors --------------------------------------------------
def modality_pairs(count: int, device=None) -> tuple[Tensor, Tensor]:
    """(first, second) slots of the M(M−1)/2 unordered pairs, in modality order: (0,1), (0,2), …, (1,2), …"""
    first, second = torch.triu_indices(count, count, offset=1, device=device)
    return first, second


def pair_weights(unimodal: Tensor, labels: Tensor) -> Tensor:
    """[P, B] w_i = |p_a,i[y] − p_b,i[y]| if modality a or b predicts y_i, else 0, from logits [M, B, C].

    Differentiable in ``unimodal`` (pass detached logits for constant weights,
    the default); the correctness mask is never differentiated.
    """
    true = true_class_probability(unimodal.float(), labels)  # [M, B]
    correct = unimodal.detach().argmax(-1) == labels
    a, b = modality_pairs(len(unimodal), unimodal.device)
    return (true[a] - true[b]).abs() * (correct[a] | correct[b]).to(true.dtype)


def first_teaches(unimodal: Tensor, labels: Tensor) -> Tensor:
    """[P, B] True where the pair's first modality gives y the probability at least as high as the second's.

    Ties (where w = 0 anyway) go to the first modality.
    """
    true = true_class_probability(unimodal.detach().float(), labels)
    a, b = modality_pairs(len(unimodal), unimodal.device)
    return true[a] >= true[b]


def representation_distance(unimodal: Tensor, space: str = "logits") -> Tensor:
    """[P, B] (1/C)‖x_a,i − x_b,i‖² per pair and sample, x = the logits or (``probabilities``) their softmax."""
    if space not in ("logits", "probabilities"):
        raise ValueError(f"unknown space {space!r} (allowed: logits, probabilities)")
    x = unimodal.float()
    if space == "probabilities":
        x = x.softmax(-1)
    a, b = modality_pairs(len(x), x.device)
    return (x[a] - x[b]).pow(2).mean(-1)


def distillation_divergence(unimodal: Tensor, labels: Tensor, detach_teacher: bool = True) -> Tensor:
    """[P, B] KL(p_strong,i ‖ p_weak,i) over the classes, strong = the modality with the larger p[y_i].

    With ``detach_teacher`` only the weak modality (the student) is pulled
    toward the strong one; otherwise both move.
    """
    log_p = unimodal.float().log_softmax(-1)
    a, b = modality_pairs(len(unimodal), unimodal.device)
    a_teaches = first_teaches(unimodal, labels).unsqueeze(-1)
    teacher = torch.where(a_teaches, log_p[a], log_p[b])
    student = torch.where(a_teaches, log_p[b], log_p[a])
    if detach_teacher:
        teacher = teacher.detach()
    return (teacher.exp() * (teacher - student)).sum(-1)


def bmm_divergence(unimodal: Tensor, labels: Tensor, detach_teacher: bool = True) -> Tensor:
    """[P, B] p_w·(log p_w − p_s) on true-class probabilities p_s ≥ p_w: BalanceMM's ``F.kl_div(ps, pw)``.

    ``kl_div`` expects log-probabilities as its first argument and gets
    probabilities, so this is not a divergence: it is negative whenever
    p_w < 1, and it ignores every class but y. For reproduction only.
    """
    true = true_class_probability(unimodal.float(), labels)
    a, b = modality_pairs(len(unimodal), unimodal.device)
    strong, weak = torch.maximum(true[a], true[b]), torch.minimum(true[a], true[b])
    if detach_teacher:
        strong = strong.detach()
    return torch.xlogy(weak, weak) - weak * strong


def mbsd_losses(unimodal: Tensor, labels: Tensor, rs_space: str = "logits", variant: str = "paper",
                detach_teacher: bool = True, detach_weight: bool = True,
                sample_weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """L_RS, L_KL (pair means of (1/B) Σ_i w_i · term_i) and the weights w [P, B], from unimodal logits [M, B, C].

    ``sample_weight`` [B] (a plugin's per-sample loss weights) multiplies every
    sample's terms, as it does the cross-entropies.
    """
    weights = pair_weights(unimodal.detach() if detach_weight else unimodal, labels)
    scale = weights if sample_weight is None else weights * sample_weight.to(weights.dtype)
    divergence = (distillation_divergence if variant == "paper" else bmm_divergence)(unimodal, labels, detach_teacher)
    return {
        "rs": (scale * representation_distance(unimodal, rs_space)).mean(),
        "kl": (scale * divergence).mean(),
        "weight": weights.detach(),
    }


# -- the objective -------------------------------------------------------------------------------
@METHODS.register("mbsd")
class MBSD(Objective):
    """Balanced self-distillation: per sample the more confident modality teaches the other (BalanceMM's MBSD)."""

    honours_keep = True

    class Config(WindowConfig):
        unimodal_weight: float = Field(1.0, ge=0, description="weight of Σ_m CE(d_m), the unimodal cross-entropies")
        rs_weight: float = Field(
            1.0, ge=0, description="weight of L_RS, the w-weighted squared distance between the pair's logits"
        )
        kl_weight: float = Field(1.0, ge=0, description="weight of L_KL, the w-weighted KL(p_strong ‖ p_weak)")
        rs_space: Literal["logits", "probabilities"] = Field(
            "logits",
            description="L_RS on the unimodal logits, or on their softmax (BalanceMM does this for three modalities)",
        )
        detach_teacher: bool = Field(
            True, description="[unverified] the strong modality of each pair is a constant target in L_KL (BalanceMM: false)"
        )
        detach_weight: bool = Field(
            True, description="w_i is a constant; false lets the gradient flow through w as BalanceMM's code does"
        )
        score_logits: Literal["fusion", "heads"] = Field(
            "fusion",
            description="unimodal logits: d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅), or the unimodal heads "
            "(then trained by the loss)",
        )
        variant: Literal["paper", "bmm"] = Field(
            "paper",
            description="paper: L_KL is KL(p_strong ‖ p_weak) over the classes; bmm: BalanceMM's "
            "p_w[y]·(log p_w[y] − p_s[y]) (not a divergence; for reproduction)",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mbsd`)
    search_space = {
        "unimodal_weight": FloatRange(0.1, 4.0, log=True),
        "rs_weight": FloatRange(0.1, 4.0, log=True),
        "kl_weight": FloatRange(0.1, 4.0, log=True),
    }

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        distilling = in_window(self.config, ctx.epoch)
        record.logs["mbsd/distilling"] = float(distilling)
        heads = distilling and self.config.score_logits == "heads"
        if heads:
            record.unimodal = self.heads(model, features)
            unimodal = torch.stack([record.unimodal[m] for m in self.modalities])
        else:  # the heads are not trained by the method: detached probes, for the diagnostics
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        if not distilling:
            return record
        if not heads:
            unimodal = record.restricted_logits()
        config = self.config
        if config.unimodal_weight > 0:
            record.add_loss("unimodal", config.unimodal_weight * sum(cross_entropy(u, batch) for u in unimodal))
        terms = mbsd_losses(unimodal, batch.labels, config.rs_space, config.variant, config.detach_teacher,
                            config.detach_weight, batch.weight)
        if config.rs_weight > 0:
            record.add_loss("mbsd_rs", config.rs_weight * terms["rs"])
        if config.kl_weight > 0:
            record.add_loss("mbsd_kl", config.kl_weight * terms["kl"])
        self._log(record, unimodal.detach(), terms["weight"])
        return record

    def _log(self, record, unimodal: Tensor, weights: Tensor) -> None:
        """Scores s_m, mean w, the share of pair-samples distilled, and how often each modality teaches."""
        count = len(self.modalities)
        active = weights > 0
        a, b = modality_pairs(count, weights.device)
        a_teaches = first_teaches(unimodal, record.labels)
        teacher = torch.where(a_teaches, a.unsqueeze(-1), b.unsqueeze(-1))  # [P, B] slot of each pair's teacher
        teaches = (teacher.unsqueeze(0) == torch.arange(count, device=weights.device).view(-1, 1, 1)) & active
        # each modality sits in M − 1 pairs: the share of its pair-samples in which it teaches
        share = teaches.flatten(1).sum(-1).double() / (weights.shape[-1] * (count - 1))
        scores = modality_scores(unimodal, record.labels)
        record.logs["mbsd/weight"] = weights.mean()
        record.logs["mbsd/active"] = active.float().mean()
        for slot, m in enumerate(self.modalities):
            record.logs[f"mbsd/score/{m}"] = scores[slot]
            record.logs[f"mbsd/teaches/{m}"] = share[slot]
