"""MMPareto: innocent unimodal assistance by Pareto integration (Wei, Hu, "MMPareto: Boosting
Multimodal Learning with Innocent Unimodal Assistance", ICML 2024), as a plugin for any objective.

Each encoder m is pulled by a multimodal gradient g_mm and by its own
unimodal gradient g_u. Inside the modulation window MMPareto replaces the
encoder's gradient by (BASELINES §5):

- weights (w_mm, w_u) = (½, ½) when g_mm · g_u > 0, else the min-norm point
  of the segment between them, w_mm = (‖g_u‖² − g_mm·g_u) / ‖g_mm − g_u‖²,
  clipped to [0.001, 0.999] (``variant=official``: the authors' solver,
  which leaves that value unclipped and uses 0.999 / 0.001 only at the
  segment's ends); weights and cosines are taken over all of encoder m;
- per parameter tensor: ĝ = 2 (w_mm g_mm + w_u g_u); where ‖ĝ‖ is below the
  norm n of the tensor's plain gradient, ĝ is stretched to norm n; the
  gradient becomes γ ĝ (γ = 1.5). A tensor with ĝ = 0 keeps its plain gradient.

Which terms are which, for any objective: the unimodal loss Σ_m L_m is the
objective's ``unimodal`` term when its step has one (joint with
``unimodal_weight`` > 0, MIDAS, CAL); otherwise the plugin adds
``mmpareto_unimodal`` = λ Σ_m CE(head_m(f_m), y) on the model's unimodal heads
with gradient into the encoders (with ``joint``'s detached probes the heads
are already trained by the probe, so this term reaches the encoders only).
The multimodal loss is everything else the step minimises: the fused CE, and
also e.g. MIDAS's misaligned loss, so no term's encoder gradient is dropped.

How it is computed, at the cost of one extra backward pass through the
encoders whatever M is: ``on_forward`` takes g_u for every encoder from one
``torch.autograd.grad`` of the unimodal term (L_k reads modality k only, so
its gradient on encoder m ≠ k is zero and the one call gives each g_u^m
exactly). The trainer's backward then gives the plain gradient g_mm + g_u.
``after_backward`` runs after that gradient was averaged across processes;
it averages g_u the same way (one all-reduce), so g_mm = plain − g_u, the
weights and the result are the global batch's and identical on every
process, and clipping, which follows, applies to the final gradient.

Composition: a plugin that scales encoder gradients with tensor hooks (arl,
cal_accel) must come before mmpareto in the spec (``joint+arl+mmpareto``), so
that the hooks also act on the unimodal gradient taken here.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin, cross_entropy
from .window import WindowConfig, in_window

#: record.shared key: the flattened unimodal gradient of every encoder, from on_forward to after_backward
GRADIENT = "mmpareto/unimodal_gradient"
#: the weight bounds of the min-norm solver (Sener & Koltun's edge values)
LOW, HIGH = 0.001, 0.999
Variant = Literal["paper", "official"]


# -- the rule, on plain tensors ---------------------------------------------------------------------
def inner_products(g_mm: Tensor, g_u: Tensor) -> Tensor:
    """[‖g_mm‖², g_mm·g_u, ‖g_u‖²] of two flattened gradients, in float64 (everything the weights need)."""
    return torch.stack([g_mm.dot(g_mm), g_mm.dot(g_u), g_u.dot(g_u)]).double()


def min_norm_weight(products: Tensor, variant: Variant = "paper") -> Tensor:
    """w_mm, the multimodal gradient's weight (w_u = 1 − w_mm), from ``inner_products`` (last dim of 3).

    Equal weights when the two agree (g_mm·g_u > 0). Otherwise the point of
    the segment w g_mm + (1 − w) g_u closest to the origin: the solver's edge
    rule (w = 0.999 if g_mm·g_u ≥ ‖g_mm‖², 0.001 if g_mm·g_u ≥ ‖g_u‖², which
    for conflicting gradients only happens when one of them is zero), else
    w = (‖g_u‖² − g_mm·g_u) / ‖g_mm − g_u‖², clipped to [0.001, 0.999] with
    ``variant=paper`` (BASELINES §5), unclipped with ``official``. The
    branches are ``torch.where``: no host synchronisation.
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"variant must be 'paper' or 'official', got '{variant}'")
    aa, ab, bb = products.unbind(-1)
    interior = (bb - ab) / (aa + bb - 2 * ab).clamp_min(torch.finfo(products.dtype).tiny)
    if variant == "paper":
        interior = interior.clamp(LOW, HIGH)
    solved = torch.where(ab >= aa, HIGH, torch.where(ab >= bb, LOW, interior))
    return torch.where(ab > 0, 0.5, solved)


def cosine(products: Tensor) -> Tensor:
    """cos(g_mm, g_u) from ``inner_products``; 0 when either gradient is zero."""
    aa, ab, bb = products.unbind(-1)
    return ab / (aa * bb).sqrt().clamp_min(torch.finfo(products.dtype).tiny)


def integrate(g_mm: Tensor, g_u: Tensor, total: Tensor, w_mm: Tensor, sizes: list[int], gamma: float) -> Tensor:
    """γ ĝ per parameter tensor, ĝ = 2 (w_mm g_mm + (1 − w_mm) g_u) stretched to ‖total‖ where shorter.

    The vectors are one encoder's tensors flattened and concatenated,
    ``sizes`` their element counts: the magnitude is restored per tensor.
    A tensor whose ĝ is zero keeps ``total`` (its direction is undefined).
    """
    combined = torch.lerp(g_u, g_mm, w_mm.to(g_mm.dtype)).mul_(2)
    # one norm per tensor in a single call (as torch.nn.utils.clip_grad_norm_ does)
    norm = torch.stack(torch._foreach_norm(combined.split(sizes)))
    target = torch.stack(torch._foreach_norm(total.split(sizes)))
    factor = gamma * torch.where(target > norm, target / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0)
    per_element = torch.cat([f.expand(n) for f, n in zip(factor, sizes)])
    keep = torch.cat([zero.expand(n) for zero, n in zip(norm == 0, sizes)])
    return torch.where(keep, total, combined.mul_(per_element))


def pareto_weights(g_mm: Tensor, g_u: Tensor, variant: Variant = "paper") -> Tensor:
    """(w_mm, w_u) for one encoder's flattened multimodal and unimodal gradients."""
    w_mm = min_norm_weight(inner_products(g_mm, g_u), variant)
    return torch.stack([w_mm, 1 - w_mm]).to(g_mm.dtype)


def pareto_gradient(
    g_mm: Tensor, g_u: Tensor, total: Optional[Tensor] = None, sizes: Optional[list[int]] = None,
    gamma: float = 1.5, variant: Variant = "paper",
) -> tuple[Tensor, Tensor]:
    """MMPareto's gradient for one encoder, and the weights (w_mm, w_u) it used.

    ``g_mm``, ``g_u``, ``total``: the encoder's flattened gradients (its
    parameter tensors concatenated); ``total`` is the plain gradient whose
    per-tensor norm the result keeps at least (default g_mm + g_u);
    ``sizes``: the element count of each tensor (default: one tensor).
    """
    total = g_mm + g_u if total is None else total
    sizes = [g_mm.numel()] if sizes is None else list(sizes)
    w_mm = min_norm_weight(inner_products(g_mm, g_u), variant)
    weights = torch.stack([w_mm, 1 - w_mm]).to(g_mm.dtype)
    return integrate(g_mm, g_u, total, w_mm, sizes, gamma), weights


def flat(tensors: list[Optional[Tensor]], like: list[Tensor], device: torch.device) -> Tensor:
    """Tensors concatenated into one vector; a missing one (None) counts as zeros shaped like its ``like``."""
    if not like:
        return torch.zeros(0, device=device)
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


@METHODS.register("mmpareto")
class MMPareto(Plugin):
    """Pareto integration of multimodal and unimodal encoder gradients (Wei & Hu, ICML 2024)."""

    class Config(WindowConfig):
        gamma: float = Field(1.5, gt=0, description="γ, the factor of the integrated encoder gradient")
        unimodal_weight: float = Field(
            1.0, ge=0,
            description="weight λ of the plugin's own unimodal loss λ Σ_m CE(head_m(f_m)), added when the "
            "objective's step has no unimodal term (unimodal_term); 0: no such term (g_u = 0)",
        )
        unimodal_term: str = Field(
            "unimodal", min_length=1,
            description="the objective's loss term used as Σ_m L_m when its step has one; its gradient on "
            "encoder m must come from modality m alone",
        )
        probe_term: str = Field(
            "probe", min_length=1,
            description="the objective's term that trains the unimodal heads on detached features; when the "
            "step has it, the plugin's own unimodal loss reaches the encoders only (the heads train once)",
        )
        variant: Variant = Field(
            "paper",
            description="paper: conflicting weights clipped to [0.001, 0.999] (BASELINES §5); official: the "
            "authors' min-norm solver, the analytic weight unclipped, 0.999/0.001 only at the segment's ends",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mmpareto`)
    search_space = {
        "gamma": FloatRange(1.0, 3.0),
        "unimodal_weight": FloatRange(0.25, 4.0, log=True),
    }

    auxiliary_options = ("unimodal_weight",)
    #: the rule combines the gradients of the step's loss terms and reads no class; its own unimodal term
    #: is the task loss (binary cross-entropy per class on multi-label data)
    multi_label = True

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self._heads: dict[str, nn.Module] = {}  # a handle on the model's heads (a plain dict: not part of the state)

    def setup(self, model, ctx):
        self._heads = {m: model.unimodal_heads[m] for m in self.modalities}

    # -- the unimodal loss ---------------------------------------------------------------------------
    def unimodal_loss(self, record) -> Optional[Tensor]:
        """The objective's unimodal term, or the plugin's own (added to the record); None when there is none."""
        if self.config.unimodal_term in record.losses:
            return record.losses[self.config.unimodal_term]
        if self.config.unimodal_weight == 0:
            return None
        if not self._heads:
            raise RuntimeError("mmpareto reads the model's unimodal heads: call its setup(model, ctx) before training")
        train_heads = self.config.probe_term not in record.losses
        loss = sum(
            cross_entropy(head_logits(self._heads[m], record.features[m], train_heads), record.batch)
            for m in self.modalities
        )
        loss = self.config.unimodal_weight * loss
        record.add_loss("mmpareto_unimodal", loss)
        return loss

    @staticmethod
    def encoder_parameters(ctx) -> dict[str, list[nn.Parameter]]:
        return {m: [p for p in params if p.requires_grad] for m, params in ctx.params.encoder.items()}

    # -- hooks ---------------------------------------------------------------------------------------
    def on_forward(self, record, ctx):
        active = in_window(self.config, ctx.epoch)
        record.logs["mmpareto/active"] = float(active)
        if not active:
            return
        params = self.encoder_parameters(ctx)
        every = [p for m in self.modalities for p in params[m]]
        loss = self.unimodal_loss(record)
        grads: list[Optional[Tensor]] = [None] * len(every)
        if loss is not None and loss.requires_grad and every:
            try:
                grads = list(torch.autograd.grad(loss, every, retain_graph=True, allow_unused=True))
            except RuntimeError as exc:
                raise RuntimeError(
                    f"mmpareto needs the step's graph before backward (an objective that steps by itself cannot "
                    f"be combined with it): {exc}"
                ) from None
        unimodal, start = {}, 0
        for m in self.modalities:
            count = len(params[m])
            unimodal[m] = flat(grads[start:start + count], params[m], ctx.device)
            start += count
        record.shared[GRADIENT] = unimodal

    def after_backward(self, record, ctx):
        if record is None or GRADIENT not in record.shared:
            return
        params = self.encoder_parameters(ctx)
        stored = record.shared[GRADIENT]
        lengths = [stored[m].numel() for m in self.modalities]
        # every process holds its own batch's g_u; the plain gradients are averaged already
        averaged = ctx.dist.mean(torch.cat([stored[m] for m in self.modalities])).split(lengths)
        for m, g_u in zip(self.modalities, averaged):
            if not params[m]:
                continue
            sizes = [p.numel() for p in params[m]]
            total = flat([p.grad for p in params[m]], params[m], ctx.device)
            g_mm = total - g_u
            products = inner_products(g_mm, g_u)
            w_mm = min_norm_weight(products, self.config.variant)
            gradient = integrate(g_mm, g_u, total, w_mm, sizes, self.config.gamma)
            for p, chunk in zip(params[m], gradient.split(sizes)):
                if p.grad is not None:  # a parameter the step did not reach stays without a gradient
                    p.grad.copy_(chunk.view_as(p.grad))
            record.logs[f"mmpareto/cos/{m}"] = cosine(products)
            record.logs[f"mmpareto/weight_mm/{m}"] = w_mm


def head_logits(head: nn.Module, features: Tensor, train_head: bool = True) -> Tensor:
    """head(features); with ``train_head=False`` the head's parameters are detached, so only the features get a gradient."""
    if train_head:
        return head(features)
    frozen = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, frozen, (features,))
