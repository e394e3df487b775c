"""MMCosine: multimodal cosine logits (Xu, Feng, Zhang, Hu, "MMCosine: Multi-Modal Cosine Loss Towards
Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023), as an objective.

A dominant modality wins partly through larger feature and weight norms.
MMCosine removes both (BASELINES §13): modality m contributes the scaled
cosine between its feature and its per-class weight vector,

    z_{i,c} = s · Σ_m cos(f_{m,i}, W_{m,c}),   no bias,   L = CE(z, y),

so every modality's logits lie in [−s, s]. W_m is modality m's block of the
linear fusion head (``weights=fusion``: the columns of a concat head that
read f_m, or a sum head's layer for m), the model's unimodal head
(``weights=heads``), or a bias-free weight set the method adds
(``weights=own``, for fusion heads that have no per-modality linear block).

The objective *is* the model's read-out: ``fuse`` returns the cosine
logits, so evaluation, checkpoint selection, every coalition readout and
every plugin that calls ``record.fuse`` see them. A zeroed modality has no
direction; its cosine is defined as 0, so fuse(f^S) = s · Σ_{m∈S} cos(f_m, W_m),
fuse(f^∅) = 0 and the fusion-restricted logits d_m (BASELINES §1.1) are
exactly the paper's per-modality logits s · cos(f_m, W_m), summing to z.

``variant=official`` predicts as the authors' ``main_CD.py`` evaluates:
with the plain fusion head (W f + b) although training used the cosine
logits. The supplement's NCE term (weight ``lam``, off by default) pulls
same-class features of two modalities together.
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..models.fusion import ConcatFusion, SumFusion
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Objective, cross_entropy

#: below this norm a vector has no direction: it normalises to 0 (F.normalize's eps)
NORM_EPS = 1e-12
#: added inside the NCE term's logarithms (the authors' EPISILON)
LOG_EPS = 1e-10


# -- the rule, on plain tensors ---------------------------------------------------------------------
def normalise(x: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """x / ‖x‖ along ``dim``; a vector with ‖x‖ ≤ eps becomes 0, with zero gradient.

    ``F.normalize`` divides such a vector by eps instead, which gives the
    same value (0 for the zero vector) but a gradient of 1/eps = 1e12: an
    encoder whose ReLU output is all zero for one sample would get an
    enormous gradient. Here the direction of a vanishing vector is 0 and
    nothing flows back through it.
    """
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    inverse = torch.where(norm > eps, 1 / norm.clamp_min(eps), torch.zeros_like(norm))
    return x * inverse


def cosine_logits(feature: Tensor, weight: Tensor, scale: float) -> Tensor:
    """[B, C]: s · cos(f_i, W_c) for features [B, d] and class weights [C, d]; a zero vector gives 0."""
    return scale * normalise(feature) @ normalise(weight).transpose(-2, -1)


def modality_cosine_logits(features: list[Tensor], weights: list[Tensor], scale: float) -> Tensor:
    """[M, B, C]: s · cos(f_m, W_m) for each modality; their sum over M is MMCosine's fused logits."""
    return torch.stack([cosine_logits(f, w, scale) for f, w in zip(features, weights)])


def nce_loss(f1: Tensor, f2: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """The supplement's cross-modal NCE term between features f1 [B, d] and f2 [B, d] (same d).

    For sample i, p_ij = softmax_j(cos(f1_i, f2_j) / T) over the batch;
    pairs with the same label are positives (j = i among them), the others
    negatives. Per sample: mean over positives of −log(p_ij + ε) plus mean
    over negatives of −log(1 − p_ij + ε), ε = 1e-10; the loss is the batch
    mean. A sample with no negative in the batch has only its positive part
    (the authors' code divides by zero there).
    """
    similarity = normalise(f1) @ normalise(f2).transpose(0, 1)
    probability = (similarity / temperature).softmax(dim=1)
    positive = (labels.unsqueeze(1) == labels.unsqueeze(0)).to(probability.dtype)
    negative = 1 - positive
    pulled = (-(probability + LOG_EPS).log() * positive).sum(1) / positive.sum(1)
    pushed = (-(1 - probability + LOG_EPS).log() * negative).sum(1) / negative.sum(1).clamp_min(1)
    return (pulled + pushed).mean()


# -- the objective ----------------------------------------------------------------------------------
@METHODS.register("mmcosine")
class MMCosine(Objective):
    """Scaled per-modality cosine logits, no bias: norms cannot make a modality dominate (Xu et al., ICASSP 2023)."""

    honours_keep = True
    accumulation = True  # loss terms only

    class Config(Section):
        scale: float = Field(10.0, gt=0, description="s, the scale of the cosine logits (10 in the authors' code, 15 in BalanceMM)")
        weights: Literal["fusion", "heads", "own"] = Field(
            "fusion",
            description="class weights W_m: fusion = the linear fusion head's block for m (model.fusion concat or sum); "
            "heads = the unimodal heads' weights; own = bias-free weights added by the method (any fusion head, "
            "which then goes unused)",
        )
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="paper: predict with the cosine logits; official: predict with the plain fusion head "
            "W f + b, as the authors' evaluation does (needs weights=fusion)",
        )
        lam: float = Field(0.0, ge=0, description="weight of the supplement's cross-modal NCE term (0: off)")
        nce_temperature: float = Field(0.1, gt=0, description="temperature T of the NCE term")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mmcosine`)
    search_space = {
        "scale": FloatRange(5.0, 30.0, log=True),
        "lam": FloatRange(0.0, 0.5),
    }

    auxiliary_options = ("lam",)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if config.variant == "official" and config.weights != "fusion":
            raise ConfigError(
                f"mmcosine.variant=official predicts with the fusion head, so it needs mmcosine.weights=fusion "
                f"(got weights={config.weights})"
            )
        #: bias-free class weights per modality, filled in ``setup`` when ``weights=own``
        self.cosine_weights = nn.ParameterDict()

    def setup(self, model, ctx):
        dims = model.feature_dims
        if self.config.weights == "fusion":
            self._fusion_blocks(model)  # refuses a head without per-modality linear blocks now, not mid-run
        elif self.config.weights == "own" and not len(self.cosine_weights):
            generator = getattr(ctx, "generator", None)
            for m in self.modalities:
                bound = dims[m] ** -0.5  # nn.Linear's initial range; the scale is irrelevant to a cosine
                weight = torch.empty(self.num_classes, dims[m]).uniform_(-bound, bound, generator=generator)
                self.cosine_weights[m] = nn.Parameter(weight)
        if self.config.lam > 0 and len({dims[m] for m in self.modalities}) > 1:
            shown = ", ".join(f"{m}: {dims[m]}" for m in self.modalities)
            raise ConfigError(
                f"mmcosine.lam={self.config.lam} compares features across modalities, which needs equal feature "
                f"sizes (got {shown}); set mmcosine.lam=0"
            )

    # -- where W_m lives -----------------------------------------------------------------------------
    def _fusion_blocks(self, model) -> dict[str, Tensor]:
        fusion = model.fusion
        if isinstance(fusion, ConcatFusion):
            sizes = [fusion.feature_dims[m] for m in fusion.modalities]
            return dict(zip(fusion.modalities, fusion.linear.weight.split(sizes, dim=1)))
        if isinstance(fusion, SumFusion):
            return {m: fusion.linears[m].weight for m in fusion.modalities}
        name = getattr(type(fusion), "registry_name", type(fusion).__name__)
        raise ConfigError(
            f"mmcosine.weights=fusion needs a linear fusion head with one weight block per modality "
            f"(model.fusion=concat or sum), got model.fusion={name}; set mmcosine.weights=own (or heads) to learn "
            f"cosine weights beside it"
        )

    def class_weights(self, model) -> dict[str, Tensor]:
        """W_m for every modality: [C, d_m] class weight vectors."""
        if self.config.weights == "fusion":
            return self._fusion_blocks(model)
        if self.config.weights == "heads":
            return {m: model.unimodal_heads[m].weight for m in self.modalities}
        return {m: self.cosine_weights[m] for m in self.modalities}

    def modality_logits(self, model, features: dict[str, Tensor]) -> Tensor:
        """[M, B, C]: s · cos(f_m, W_m) in modality order."""
        weights = self.class_weights(model)
        return modality_cosine_logits([features[m] for m in self.modalities], [weights[m] for m in self.modalities],
                                      self.config.scale)

    # -- how this objective reads the model ---------------------------------------------------------
    def fuse(self, model, features):
        return self.modality_logits(model, features).sum(0)

    def heads(self, model, features):
        if self.config.weights != "heads":
            return model.heads(features)
        # the heads are the cosine weights: a head's plain linear output would ignore how it was trained
        return {m: cosine_logits(f, model.unimodal_heads[m].weight, self.config.scale) for m, f in features.items()}

    def predict_from_features(self, model, features):
        if self.config.variant == "official":
            return model.fuse(features)
        return self.fuse(model, features)

    # -- one step -----------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        per_modality = self.modality_logits(model, features)
        logits = per_modality.sum(0)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        if self.config.weights == "heads":
            record.unimodal = dict(zip(self.modalities, per_modality.unbind(0)))
        else:
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        if self.config.lam > 0:
            pairs = list(combinations(self.modalities, 2))
            term = sum(nce_loss(features[a], features[b], batch.labels, self.config.nce_temperature) for a, b in pairs)
            record.add_loss("nce", self.config.lam * term / len(pairs))
        self._log(record, per_modality, features, model)
        return record

    def _log(self, record, per_modality: Tensor, features: dict[str, Tensor], model) -> None:
        detached = per_modality.detach()
        true_logit = detached.gather(-1, record.labels.expand(detached.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)
        weights = self.class_weights(model)
        for k, m in enumerate(self.modalities):
            record.logs[f"mmcosine/true_logit/{m}"] = true_logit[k]
            record.logs[f"mmcosine/feature_norm/{m}"] = features[m].detach().norm(dim=-1).mean()
            record.logs[f"mmcosine/weight_norm/{m}"] = weights[m].detach().norm(dim=-1).mean()
