"""MLA: multimodal learning by alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao, "Multimodal
Representation Learning by Alternating Unimodal Adaptation", CVPR 2024), as an objective.

Joint training lets a dominant modality settle the loss before the others
have learned anything. MLA never optimises the modalities together
(BASELINES §7): every step trains them one at a time, each against one
shared head H: Linear(d → C), so the head is where they meet. Per batch, for
m in modality order (``shuffle_order``: a fresh random order per batch):

1. ℓ_m = CE(H(f_m), y) with the head as the previous sub-step left it;
   backward reaches only encoder m and H.
2. The head's weight gradient is projected so that fitting m does not undo
   what H learned from the others (orthogonal weight modification; not
   for the very first sub-step of the run, n = 0): with r = batch mean of
   f_m (detached, averaged over processes), α_b = 0.1^(1 + b/N_b)
   (b = step in the epoch, N_b = steps per epoch),
       k = P rᵀ,  P ← P − k kᵀ / (α_b + r k),  P ← P / ‖P‖_F,  ∇W_H ← ∇W_H Pᵀ
   (the bias is not projected). P starts as I_d; P and n are buffers.
3. One optimizer step (``ctx.manual_step``: averaging, every part's
   ``after_backward`` — the projection is MLA's own — clipping, the step),
   every gradient set to None after it, so an encoder a sub-step does not
   reach gets no weight decay or momentum move.

The encoders run once per batch, before the sub-steps: encoder m changes
only in its own sub-step, so its output then is what a fresh pass would give
(the authors' code does the same). The logged loss is mean_m ℓ_m.

Prediction (``fuse``, ``predict_from_features``): o_m = H(f_m), per-sample
entropy e_m = −Σ_c p(o_m)_c log p(o_m)_c and
    g_m = exp(max_k e_k − e_m) / Σ_j exp(max_k e_k − e_j),   output Σ_m g_m o_m,
so the surer modality weighs more (``fusion=fixed``: fixed weights instead).
``heads`` returns o_m: the unimodal accuracy of a run is the shared head's on
each modality. A zeroed modality's head output is H(0) = b with its own
entropy gate, so the modality-only accuracy fuse(f^{m}) is the gated
prediction with the others' features zeroed, as for every method.

``variant=official`` is the released code as it runs: the projection is never
applied (its parameter-name check never matches) and the gate uses one
entropy per modality for the whole batch, softmax taken along the batch
dimension. ``projection`` and ``gate`` set either choice alone.

With plugins: every part's ``after_backward`` runs once per sub-step, on
that sub-step's record (``shared["mla/modality"]`` names the modality; only
that encoder and the shared head have gradients; ``losses`` holds that
modality's CE, ``logits`` its head output). A plugin's ``on_forward`` runs
once, after the sub-steps, on the step's record, whose features are
detached: gradient hooks it attaches there never fire and loss terms it adds
are never backpropagated (they still count in the logged step loss). So a
plugin that computes its coefficients in ``on_forward`` (ARL, OGM-GE, AGM,
...) finds none in a sub-step and leaves MLA's training unchanged; what a
plugin does unconditionally in ``after_backward``, or at epoch boundaries,
does apply.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..registry import METHODS
from ..search_space import Choice
from .base import Objective, cross_entropy

#: record.shared keys of a sub-step record
MODALITY = "mla/modality"
HEAD_INPUT = "mla/head_input"


# -- the rules, on plain tensors ---------------------------------------------------------------------
def projection_alpha(step_in_epoch: int, steps_per_epoch: int) -> float:
    """α_b = 0.1^(1 + b/N_b): 0.1 at the first step of an epoch, tending to 0.01 at its end."""
    return 0.1 ** (1 + step_in_epoch / max(steps_per_epoch, 1))


def update_projection(projection: Tensor, mean_input: Tensor, alpha: float) -> Tensor:
    """One recursive OWM update of the projector P [d, d] with the mean head input r [d], then ‖P‖_F = 1.

    k = P rᵀ, P ← P − k kᵀ / (α + r k), P ← P / ‖P‖_F. E.g. P = I_2,
    r = (1, 0), α = 0.1: I − diag(1, 0)/1.1 = diag(0.0909, 1), normalised
    diag(0.0905, 0.9959).
    """
    r = mean_input.reshape(1, -1).to(projection.dtype)
    k = projection @ r.T
    updated = projection - (k @ k.T) / (alpha + r @ k)
    return updated / torch.linalg.matrix_norm(updated)


def project_gradient(gradient: Tensor, projection: Tensor) -> Tensor:
    """∇W ← ∇W Pᵀ for a head weight gradient [C, d]: each row moves only within P's range."""
    return gradient @ projection.T.to(gradient.dtype)


def prediction_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """−Σ p log p of softmax(logits) along ``dim`` (log-softmax: no 0 · log 0)."""
    log_p = logits.float().log_softmax(dim)
    return -(log_p.exp() * log_p).sum(dim)


def entropy_gate(logits: Tensor, per: Literal["sample", "batch"] = "sample") -> Tensor:
    """[M, B] weights g from per-modality logits [M, B, C]: exp(max_k e_k − e_m) / Σ_j exp(max_k e_k − e_j).

    ``sample``: e_{m,i} is sample i's prediction entropy (the paper);
    ``batch``: one e_m per modality, the entropy of the softmax taken along
    the batch dimension, summed over batch and classes (the authors' code),
    so every sample gets the same weights. Equal entropies give 1/M each.
    """
    if per == "sample":
        entropy = prediction_entropy(logits, dim=-1)
    else:
        log_p = logits.float().log_softmax(dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=(1, 2))[:, None].expand(logits.shape[:2])
    return torch.softmax(-entropy, dim=0)  # the shift by max_k e_k is softmax's own


def gated_logits(logits: Tensor, weights: Tensor) -> Tensor:
    """Σ_m g_m o_m from logits [M, B, C] and weights [M, B] (or [M] for fixed weights)."""
    weights = weights.to(logits.dtype)
    if weights.dim() == 1:
        weights = weights[:, None].expand(logits.shape[:2])
    return (weights[..., None] * logits).sum(0)


# -- the objective ----------------------------------------------------------------------------------
@METHODS.register("mla")
class MLA(Objective):
    """Alternating unimodal steps on one shared head with projected head gradients; entropy-gated prediction (Zhang et al., CVPR 2024)."""

    class Config(Section):
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="paper: projected head gradients, per-sample entropy gate; official: the released code as it "
            "runs: no projection (its name check never matches), one gate per batch (softmax along the batch)",
        )
        projection: Optional[bool] = Field(
            None, description="project the shared head's weight gradient (unset: on for variant=paper, off for official)"
        )
        gate: Optional[Literal["sample", "batch"]] = Field(
            None,
            description="entropy of the gate: per sample, or one per modality over the batch (unset: sample for "
            "variant=paper, batch for official)",
        )
        fusion: Literal["entropy", "fixed"] = Field(
            "entropy", description="prediction: entropy-gated sum of the head's outputs, or fixed weights (fixed_weights)"
        )
        fixed_weights: Optional[list[float]] = Field(
            None,
            description="fusion=fixed: one weight ≥ 0 per modality in dataset order (unset: 1/M each; the authors "
            "use 0.5/0.5, and 0.35/0.25/0.4 for audio/visual/text)",
        )
        shuffle_order: bool = Field(
            False, description="train the modalities in a random order per batch (ctx.generator) instead of dataset order"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mla`)
    search_space = {
        "gate": Choice(["sample", "batch"]),
        "shuffle_order": Choice([False, True]),
    }

    manual_optimization = True

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        official = config.variant == "official"
        self.projects = (not official) if config.projection is None else config.projection
        self.gate_kind = ("batch" if official else "sample") if config.gate is None else config.gate
        weights = config.fixed_weights
        if weights is not None and config.fusion != "fixed":
            raise ConfigError(f"mla.fixed_weights={weights} is used only with mla.fusion=fixed (fusion is {config.fusion})")
        if weights is not None:
            if len(weights) != len(self.modalities) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"mla.fixed_weights={weights} must hold {len(self.modalities)} weights ≥ 0, not all 0, one per "
                    f"modality ({', '.join(self.modalities)})"
                )
        # fixed weights follow the config, so they are not state (persistent=False): they only move with the device
        self.register_buffer("fixed", torch.tensor(weights if weights is not None else [1.0] * len(self.modalities)),
                             persistent=False)
        #: n, sub-steps taken so far: the first sub-step of a run is not projected
        self.register_buffer("substeps", torch.zeros((), dtype=torch.long))
        self.shared_head: Optional[nn.Linear] = None

    def setup(self, model, ctx):
        dims = model.feature_dims
        sizes = {dims[m] for m in self.modalities}
        if len(sizes) > 1:
            shown = ", ".join(f"{m}: {dims[m]}" for m in self.modalities)
            raise ConfigError(
                f"mla shares one head across modalities, so every encoder needs the same feature size (got {shown}); "
                f"use encoders with one model.feature_dim"
            )
        if self.shared_head is None:
            dim = sizes.pop()
            self.shared_head = nn.Linear(dim, self.num_classes)
            #: P, the projector of the head's weight gradient (d × d), starting as the identity
            self.register_buffer("projection", torch.eye(dim))

    # -- how MLA reads the model --------------------------------------------------------------------
    def heads(self, model, features):
        return {m: self.shared_head(f) for m, f in features.items()}

    def gate_weights(self, logits: Tensor) -> Tensor:
        """[M, B] (entropy) or [M] (fixed, normalised) weights of the modalities' head outputs [M, B, C]."""
        if self.config.fusion == "fixed":
            return self.fixed / self.fixed.sum()
        return entropy_gate(logits, self.gate_kind)

    def fuse(self, model, features):
        logits = torch.stack([self.shared_head(features[m]) for m in self.modalities])
        return gated_logits(logits, self.gate_weights(logits))

    def predict_from_features(self, model, features):
        return self.fuse(model, features)

    # -- one step: a sub-step per modality ------------------------------------------------------------
    def order(self, ctx) -> list[str]:
        if not self.config.shuffle_order:
            return list(self.modalities)
        return [self.modalities[int(i)] for i in torch.randperm(len(self.modalities), generator=ctx.generator)]

    def training_step(self, model, batch, ctx):
        features = self.encode(model, batch.inputs)  # each encoder once; encoder m changes only in its sub-step
        trained: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        sub_logs: dict[str, list] = {}
        for m in self.order(ctx):
            logits = self.shared_head(features[m])
            loss = cross_entropy(logits, batch)
            sub = self.record(model, batch, features, logits=logits, unimodal={m: logits})
            sub.add_loss("alternating", loss)
            sub.shared[MODALITY] = m
            sub.shared[HEAD_INPUT] = features[m].detach()
            ctx.manual_step(loss, sub)
            self.substeps += 1
            trained[m], losses[m] = logits.detach(), loss.detach()
            for key, value in sub.logs.items():
                sub_logs.setdefault(key, []).append(value)
        stacked = torch.stack([trained[m] for m in self.modalities])
        weights = self.gate_weights(stacked)
        detached = {m: f.detach() for m, f in features.items()}
        record = self.record(model, batch, detached, logits=gated_logits(stacked, weights),
                             unimodal={m: trained[m] for m in self.modalities})
        record.add_loss("alternating", torch.stack([losses[m] for m in self.modalities]).mean())
        # what the sub-steps' after_backward hooks logged (MLA's and plugins'), averaged over the sub-steps
        record.logs.update({key: sum(values) / len(values) for key, values in sub_logs.items()})
        record.logs["mla/alpha"] = projection_alpha(ctx.step_in_epoch, ctx.steps_per_epoch)
        weights = weights if weights.dim() == 1 else weights.mean(1)
        for k, m in enumerate(self.modalities):
            record.logs[f"mla/loss/{m}"] = losses[m]
            record.logs[f"mla/gate/{m}"] = weights[k].detach()
        return record

    def after_backward(self, record, ctx):
        """A sub-step's head gradient: project it (not on the run's first sub-step) and update P."""
        if record is None or MODALITY not in record.shared or not self.projects:
            return
        weight = self.shared_head.weight
        if weight.grad is None:
            return
        mean_input = ctx.dist.mean(record.shared[HEAD_INPUT].float().mean(0))
        alpha = projection_alpha(ctx.step_in_epoch, ctx.steps_per_epoch)
        active = self.substeps > 0  # a tensor: no host sync per sub-step
        projection = torch.where(active, update_projection(self.projection, mean_input, alpha), self.projection)
        raw = weight.grad
        projected = torch.where(active, project_gradient(raw, projection), raw)
        kept = torch.linalg.vector_norm(projected) / torch.linalg.vector_norm(raw).clamp_min(torch.finfo(raw.dtype).tiny)
        self.projection.copy_(projection)
        weight.grad = projected
        record.logs[f"mla/head_gradient_kept/{record.shared[MODALITY]}"] = kept.detach()
