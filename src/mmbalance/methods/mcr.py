"""MCR: the Multimodal Competition Regularizer (Kontras, Strypsteen, Chatzichristos, Liang, Blaschko,
De Vos, "Balancing Multimodal Training Through Game-Theoretic Regularization", NeurIPS 2025), as a
plugin that adds its regularisers to any objective's loss (BASELINES §15a).

MCR changes neither the model nor the prediction: every term is computed from
what the objective recorded (features, fusion head, fused logits, labels), so
it is a plugin and composes with any objective (``midas+mcr``). The paper's
unimodal-head losses Σ_m CE(u_m) are the objective's business
(``joint[unimodal_weight=1]+mcr``; MIDAS trains its heads already).

Inside the modulation window it adds, each already weighted:

- ``mcr_mipd`` = −λ_M Σ_S JSD_S. For a set S of modalities (``single``: every
  {m}; ``subsets``: every proper non-empty subset, the authors' 3-modal code)
  and each of n_perm random permutations π of the batch, the features of the
  modalities in S are replaced by f_m[π] and the fused prediction on them is
  compared with the real one by the Jensen–Shannon divergence; JSD_S is its
  mean over the (permutation, sample) rows kept (``partners``). Maximising it
  makes the prediction depend on what each modality uniquely brings.
- The game (README: ∇_θ1 L_MIPD = λ_M(∇_θ1 L_MIPD,1 + k ∇_θ1 L_MIPD,2)): in the
  pass that permutes S, the gradient reaching the features of a modality
  outside S is multiplied by k (−1 greedy: the others work against S's
  influence; 0 independent; 1 collaborative). The forward values, hence the
  loss value, do not depend on k. The fusion head's parameters cannot be
  split by modality for a general head and get the plain gradient.
- ``mcr_contrastive`` = λ_C · supervised NT-Xent between the modalities'
  features (cosine similarity, temperature 0.5): every pair of samples of one
  label, across and within modalities, is a positive; one term per positive
  pair against the anchor's negatives, averaged over positive pairs.
- ``mcr_ceb`` = λ_CEB · MSE(concat_m f_m, g(z.detach())), a conditional-entropy
  bottleneck with a two-layer decoder g from the fused logits to the
  features (form reconstructed from the authors' code; off by default).

Almost everything here is [unverified] in the spec; each such choice is an
option whose default is the spec's.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin
from .window import WindowConfig, in_window


# -- the core, on plain tensors ---------------------------------------------------------------------

def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-row Jensen–Shannon divergence (natural log) between softmax(logits_p) and softmax(logits_q).

    JSD = ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q)/2; computed from log-probabilities,
    so it needs no clamping and is 0 (up to rounding) when P = Q.
    """
    log_p = logits_p.float().log_softmax(-1)
    log_q = logits_q.float().log_softmax(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def routed(tensor: Tensor, factor: float) -> Tensor:
    """``tensor`` unchanged in the forward pass, its gradient multiplied by ``factor`` in the backward pass.

    ``x.detach() + factor · (x − x.detach())`` is exactly x in value for any
    factor, unlike ``factor · x + (1 − factor) · x.detach()``.
    """
    if factor == 1:
        return tensor
    if factor == 0:
        return tensor.detach()
    frozen = tensor.detach()
    return frozen + factor * (tensor - frozen)


def draw_permutations(count: int, modalities: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """[count, modalities, batch_size] independent uniform permutations of the batch, from ``generator``.

    One draw of uniform numbers sorted per row: as many random numbers per step
    whatever the labels, so the generator's stream does not depend on the data.
    """
    return torch.rand((count, modalities, batch_size), generator=generator, device=generator.device).argsort(dim=-1)


def permuted_sets(count: int, mode: str) -> list[tuple[int, ...]]:
    """The modality slots permuted together: ``single`` {m} for each m, ``subsets`` every proper non-empty subset."""
    if mode == "single":
        return [(m,) for m in range(count)]
    return [s for size in range(1, count) for s in itertools.combinations(range(count), size)]


def kept_rows(permutations: Tensor, labels: Tensor, permuted: tuple[int, ...], partners: str) -> Tensor:
    """[P, B] bool: which (permutation, sample) rows count for set ``permuted``.

    ``different_label``: every permuted modality's partner has another label;
    ``not_self``: at least one permuted modality comes from another sample;
    ``any``: every row (rows whose input is unchanged then add JSD 0).
    """
    slots = permutations[:, list(permuted), :]  # [P, |S|, B]
    own = torch.arange(labels.shape[0], device=labels.device)
    if partners == "different_label":
        return (labels[slots] != labels).all(dim=1)
    if partners == "not_self":
        return (slots != own).any(dim=1)
    return torch.ones(slots.shape[0], slots.shape[2], dtype=torch.bool, device=labels.device)


def permutation_divergences(
    fuse,
    features: dict[str, Tensor],
    modalities: list[str],
    reference: Tensor,
    labels: Tensor,
    permutations: Tensor,
    sets: list[tuple[int, ...]],
    k: float,
    partners: str,
) -> tuple[Tensor, Tensor]:
    """JSD_S for every set S (with gradient, routed by the game) and the fraction of rows kept.

    For each S, one fusion pass on P·B rows: the features of the modalities in
    S gathered by their permutations, the others repeated with their gradient
    multiplied by ``k``. JSD_S is the mean over the kept rows of
    JSD(fuse(permuted), reference); 0 when no row is kept. Returns a [len(sets)]
    tensor and a [len(sets)] tensor of kept fractions (detached).
    """
    count, batch = permutations.shape[0], labels.shape[0]
    reference = reference.unsqueeze(0).expand(count, *reference.shape).reshape(count * batch, *reference.shape[1:])
    divergences, kept = [], []
    for permuted in sets:
        inputs = {}
        for slot, m in enumerate(modalities):
            f = features[m]
            if slot in permuted:
                inputs[m] = f[permutations[:, slot, :].reshape(-1)]
            else:
                inputs[m] = routed(f, k).unsqueeze(0).expand(count, *f.shape).reshape(count * batch, *f.shape[1:])
        jsd = js_divergence(fuse(inputs), reference).view(count, batch)
        mask = kept_rows(permutations, labels, permuted, partners).to(jsd.dtype)
        divergences.append((jsd * mask).sum() / mask.sum().clamp_min(1.0))
        kept.append(mask.mean())
    return torch.stack(divergences), torch.stack(kept).detach()


def supervised_nt_xent(features: list[Tensor], labels: Optional[Tensor], temperature: float) -> Tensor:
    """Supervised NT-Xent over the features of every modality (each [B, d], one d for all).

    The M·B rows are L2-normalised; row i's label is its sample's label
    (``labels``) or, with ``labels=None``, its sample index (positives: the same
    sample in the other modalities). For each positive pair (anchor a, positive
    p ≠ a, same label) the term is −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_n e^{s_an/τ}))
    over the anchor's negatives n (other label), i.e. softplus(LSE_n s_an/τ − s_ap/τ);
    the loss is their mean (0 when there is no positive pair).
    """
    z = F.normalize(torch.cat([f.flatten(1).float() for f in features]), dim=-1)
    batch = features[0].shape[0]
    ids = labels if labels is not None else torch.arange(batch, device=z.device)
    ids = ids.repeat(len(features))
    similarity = z @ z.T / temperature
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    positive = same & ~torch.eye(len(ids), dtype=torch.bool, device=z.device)
    negatives = torch.logsumexp(similarity.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    terms = F.softplus(negatives - similarity)  # an anchor without negatives gives softplus(−inf) = 0
    return terms[positive].sum() / positive.sum().clamp_min(1)


def ceb_loss(decoder: nn.Module, fused_logits: Tensor, features: list[Tensor]) -> Tensor:
    """MSE between the concatenated features and their reconstruction from the detached fused logits."""
    target = torch.cat([f.flatten(1) for f in features], dim=-1)
    return F.mse_loss(target.float(), decoder(fused_logits.detach().float()))


# -- the plugin -----------------------------------------------------------------------------------

@METHODS.register("mcr")
class MCR(Plugin):
    """Multimodal Competition Regularizer: permutation-JSD game, contrastive and CEB terms (Kontras et al., NeurIPS 2025)."""

    class Config(WindowConfig):
        mipd_weight: float = Field(
            0.1, ge=0, description="λ_M, weight of L_MIPD (CREMA-D config 0.1; README example 0.01) [unverified]"
        )
        permutations: int = Field(6, ge=1, le=256, description="n_perm, random permutations of the batch per step [unverified]")
        k: float = Field(
            -1.0, ge=-1, le=1,
            description="game coefficient: factor of the gradient reaching the other modalities' features when S is "
            "permuted (−1 greedy, 0 independent, 1 collaborative) [unverified]",
        )
        partners: Literal["different_label", "not_self", "any"] = Field(
            "different_label",
            description="rows kept in JSD_S: partners of another label, partners other than the sample itself, or all [unverified]",
        )
        permuted_sets: Literal["single", "subsets"] = Field(
            "single",
            description="modalities permuted together: each one alone, or every proper non-empty subset "
            "(the authors' 3-modal code; the same for M = 2)",
        )
        reference: Literal["detached", "attached"] = Field(
            "detached",
            description="whether the real fused prediction in JSD carries gradient (the authors' code: attached, "
            "which cancels for k = −1) [unverified]",
        )
        contrastive_weight: float = Field(1.0, ge=0, description="λ_C, weight of the supervised NT-Xent L_Con [unverified]")
        temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
        contrastive_positives: Literal["label", "sample"] = Field(
            "label", description="positives of L_Con: samples of the same label, or the same sample in other modalities"
        )
        ceb_weight: float = Field(
            0.0, ge=0, description="λ_CEB, weight of the bottleneck L_CEB (off in the released configs) [form unverified]"
        )
        ceb_hidden: Optional[int] = Field(
            None, ge=1, description="hidden width of L_CEB's decoder; unset: the largest feature dimension"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mcr`)
    search_space = {
        "mipd_weight": FloatRange(0.01, 1.0, log=True),
        "contrastive_weight": FloatRange(0.1, 2.0, log=True),
        "temperature": FloatRange(0.1, 1.0, log=True),
    }

    auxiliary_options = ("mipd_weight", "contrastive_weight", "ceb_weight")

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self.sets = permuted_sets(len(self.modalities), config.permuted_sets)

    def setup(self, model, ctx):
        dims = model.feature_dims
        self.check_feature_sizes(dims)
        if self.config.ceb_weight > 0:
            hidden = self.config.ceb_hidden or max(dims.values())
            # g: fused logits -> concatenated features (the authors' two bias-free layers)
            self.ceb = nn.Sequential(
                nn.Linear(self.num_classes, hidden, bias=False),
                nn.ReLU(),
                nn.Linear(hidden, sum(dims[m] for m in self.modalities), bias=False),
            )

    def check_feature_sizes(self, dims: dict[str, int]) -> None:
        if self.config.contrastive_weight > 0 and len({dims[m] for m in self.modalities}) > 1:
            shown = ", ".join(f"{m}: {dims[m]}" for m in self.modalities)
            raise ConfigError(
                f"mcr.contrastive_weight={self.config.contrastive_weight} compares features of one size, "
                f"but the feature sizes differ ({shown}); set mcr.contrastive_weight=0 or give every encoder the same feature size"
            )

    def on_forward(self, record, ctx):
        config = self.config
        if not in_window(config, ctx.epoch):
            return
        features = {m: record.features[m] for m in self.modalities}
        labels = record.labels
        logits = record.logits if record.logits is not None else record.fuse(features)
        if config.mipd_weight > 0:
            generator = ctx.generator
            permutations = draw_permutations(config.permutations, len(self.modalities), len(labels), generator)
            reference = logits.detach() if config.reference == "detached" else logits
            divergences, kept = permutation_divergences(
                record.fuse, features, self.modalities, reference, labels, permutations.to(labels.device),
                self.sets, config.k, config.partners,
            )
            record.add_loss("mcr_mipd", -config.mipd_weight * divergences.sum())
            for permuted, value, fraction in zip(self.sets, divergences.detach(), kept):
                name = "+".join(self.modalities[slot] for slot in permuted)
                record.logs[f"mcr/jsd/{name}"] = value
                record.logs[f"mcr/kept/{name}"] = fraction
        if config.contrastive_weight > 0:
            self.check_feature_sizes({m: features[m][0].numel() for m in self.modalities})
            positives = labels if config.contrastive_positives == "label" else None
            contrastive = supervised_nt_xent([features[m] for m in self.modalities], positives, config.temperature)
            record.add_loss("mcr_contrastive", config.contrastive_weight * contrastive)
        if config.ceb_weight > 0:
            if not hasattr(self, "ceb"):
                raise RuntimeError("mcr.ceb_weight > 0 needs setup(model, ctx) to build the bottleneck's decoder")
            record.add_loss("mcr_ceb", config.ceb_weight * ceb_loss(self.ceb, logits, [features[m] for m in self.modalities]))
