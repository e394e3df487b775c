"""DGL: disentangled gradient learning (Wei, Luo, Luo, "Boosting Multimodal Learning via Disentangled
Gradient Learning", ICCV 2025; code github.com/shicaiwei123/ICCV2025-GDL), as an objective.

In joint training the fused loss reaches each encoder damped by the other
modalities. DGL gives the two jobs to two losses (BASELINES-2025 §4):

- L_fus = CE(fuse(sg(f)), y): the fused loss on detached features; only the
  fusion head learns from it;
- L_uni = α Σ_m CE(v_m, y), v_m = fuse(f^{m}) read through the fusion head
  with its parameters held constant (``variant=zeroed``, the authors' code:
  the full fusion bias kept) or v_m = d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅)
  (``variant=bias_corrected``); only encoder m learns from its term.

The separation is built into the graph, not applied to gradients by name:
the fused pass reads detached features, the unimodal passes read detached
fusion parameters (``torch.func.functional_call``), so one backward of the
sum gives every group the gradient of its own loss alone. Averaging across
processes and the plugins' ``after_backward`` act per parameter and global
clipping multiplies every gradient by one factor, so the separation holds
after them (clipping changes only the common scale). This is the spec's
implementation (b); the authors' two backward passes (implementation (a))
give the same gradients.

Every readout a plugin takes from the record (``record.zeroed_logits()``,
``restricted_logits()``, coalitions through ``record.fuse``) goes through the
fusion head held constant, like DGL's unimodal passes: a plugin's auxiliary
loss trains the encoders, never the fusion head, and the fusion head's
gradient stays that of L_fus. ``record.features`` (= ``encoder_outputs``) are
the live features, so a gradient modulator (ARL, CAL, OGM-GE) scales what
DGL sends to each encoder, i.e. that encoder's unimodal gradient. The
unimodal heads are trained as detached probes (term ``probe``) for the
diagnostics; prediction is the fusion head's, unchanged.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..models.readouts import restricted_logits, zeroed_logits
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Objective, accuracy_of
from .record import StepRecord

Fuse = Callable[[dict[str, Tensor]], Tensor]
Variant = Literal["zeroed", "bias_corrected"]


# -- the method's core, on plain tensors ----------------------------------------------------------
def constant_fusion(fusion: nn.Module) -> Fuse:
    """``fusion`` with its parameters detached: a loss through it trains what produced the features only.

    The parameters are read when the returned function is called (so an
    optimizer step in between is seen) and share storage with the module's;
    buffers are the module's own.
    """
    def fuse(features: dict[str, Tensor]) -> Tensor:
        detached = {name: p.detach() for name, p in fusion.named_parameters()}
        return torch.func.functional_call(fusion, detached, (features,))

    return fuse


def dgl_logits(fusion: nn.Module, features: Mapping[str, Tensor], modalities: list[str],
               variant: Variant = "zeroed") -> tuple[Tensor, Tensor]:
    """(z̄ [B, C], v [M, B, C]): the fused logits on detached features and the unimodal logits v_m.

    z̄ = fusion(sg(f)) has a graph to the fusion parameters only; v_m =
    fusion(f^{m}) (``zeroed``) or d_m (``bias_corrected``) with the fusion
    parameters held constant, a graph to encoder m's features only.
    """
    fused = fusion({m: f.detach() for m, f in features.items()})
    frozen = constant_fusion(fusion)
    read = zeroed_logits if variant == "zeroed" else restricted_logits
    return fused, read(frozen, features, modalities)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean CE over the batch, each sample weighted by ``weight`` when given (as ``base.cross_entropy``)."""
    if weight is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * weight).mean()


def dgl_loss(fused: Tensor, unimodal: Tensor, labels: Tensor, alpha: float,
             weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(L_fus, L_uni, CE_m [M]): L_fus = CE(z̄, y), L_uni = α Σ_m CE(v_m, y), and the unweighted CE(v_m, y)."""
    per_modality = torch.stack([weighted_cross_entropy(v, labels, weight) for v in unimodal])
    return weighted_cross_entropy(fused, labels, weight), alpha * per_modality.sum(), per_modality


@METHODS.register("dgl")
class DGL(Objective):
    """Disentangled gradient learning: fusion head from the fused loss, encoders from unimodal losses (Wei et al., ICCV 2025)."""

    honours_keep = True

    class Config(Section):
        alpha: float = Field(
            4.0, ge=0, le=1000,
            description="α, weight of the unimodal losses (authors' scripts: CREMA-D 4 and 5, Kinetics-Sounds 2 and 3, "
            "VGGSound 2; the paper's values are unverified)",
        )
        variant: Variant = Field(
            "zeroed",
            description="unimodal logits v_m: zeroed = fuse(f^{m}) with the full fusion bias (the authors' code); "
            "bias_corrected = d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅)",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options dgl`)
    search_space = {
        "alpha": FloatRange(0.5, 8.0, log=True),
        "variant": Choice(["zeroed", "bias_corrected"]),
    }

    #: the authors clip the global gradient norm at 40
    defaults = {"train.grad_clip": 40.0}

    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        fused = self.fuse(model, {m: f.detach() for m, f in features.items()})
        probe, heads = self.probe_loss(model, features, batch.labels)
        frozen = constant_fusion(model.fusion)
        record = StepRecord(batch=batch, fuse=frozen, modalities=self.modalities, features=features,
                            logits=fused, unimodal=heads)
        # the record's cached readouts: a plugin asking for them (ARL, OGM-GE) pays no extra fusion pass
        unimodal = record.zeroed_logits() if self.config.variant == "zeroed" else record.restricted_logits()
        fusion_loss, unimodal_loss, per_modality = dgl_loss(fused, unimodal, batch.labels, self.config.alpha, batch.weight)
        record.add_loss("fusion", fusion_loss)
        record.add_loss("unimodal", unimodal_loss)
        record.add_loss("probe", probe)
        record.logs["dgl/total"] = (fusion_loss + unimodal_loss).detach()
        for slot, m in enumerate(self.modalities):
            record.logs[f"dgl/unimodal_loss/{m}"] = per_modality[slot].detach()
            record.logs[f"dgl/unimodal_accuracy/{m}"] = accuracy_of(unimodal[slot], batch.labels)
        return record
