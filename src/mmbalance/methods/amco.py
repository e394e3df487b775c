"""AMCo: adaptive mask co-optimisation (Zhou, Liang, Zheng, Xuan, Kumada, "Adaptive Mask
Co-optimization for Modal Dependence in Multimodal Learning", ICASSP 2023), as an objective.

The model reads per-modality logits d_m and predicts z' = A(Σ_m d_m) through
a learnable C×C linear layer A added in ``setup``. During training the
modality the model depends on is made harder to rely on: a random share p_t
of its contribution is zeroed, p_t rising on a sine ramp, while unimodal
("co-optimisation") losses keep every d_m learning (BASELINES §9)::

    p_t = sin(π/2 · min(ε, ℓ_t)/ε),  N_t = ⌊p_t · D⌋ of D mask units set to 0 (one draw per step)
    z'_train = A(Σ_m M_m ⊙ d_m),    M_m = mask if m ∈ 𝒟 else 1
    L = CE(z'_train, y) + Σ_m CE(M_m ⊙ d_m, y)
    𝒟 ← {m : mean_i Σ_c softmax([d_1 … d_M]_i)[block m, c] > σ}   (unmasked logits, next step's set)

d_m (``score_logits=fusion``, default) is the fusion head's restricted logit
fuse(f^{m}) − (M−1)/M · fuse(f^∅) (BASELINES §1.1): for the linear heads
(``model.fusion=concat``: W_m f_m + b/M; ``sum``) Σ_m d_m is exactly the fused
logits, so the unmasked z' is A(fuse(f)). Other fusion heads are refused
before training: Σ_m d_m would not be their prediction. ``score_logits=heads``
uses the unimodal heads instead (d_m = u_m(f_m), the fusion head unused) and
works with any fusion head.

This objective's ``fuse`` *is* the read-out A(Σ_m d_m) without masks, so
prediction, evaluation, checkpoint selection and every coalition readout a
plugin or metric takes (fuse(f^S)) see the model AMCo trains.

Schedules: ``ramp=per_epoch`` (BalanceMM's): ℓ_t = k · e / 10 for batch k
(0-based) of epoch e (0-based), reset every epoch, so epoch 0 is never masked
and from epoch 3 on p_t = 1 from the second batch of each epoch: the
dependent modality is then masked entirely. ``ramp=progress``: ℓ_t =
global_step / total_steps. 𝒟 is empty at the start of every epoch.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.fusion import ConcatFusion, SumFusion
from ..models.readouts import restricted_logits
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Objective
from .window import WindowConfig, in_window

#: BalanceMM's per-epoch ramp: ℓ_t grows by epoch / RAMP_DIVISOR per batch
RAMP_DIVISOR = 10
#: added before the floor of p_t · D, so that a ratio exact in theory (sin(π/6) = 0.5) is not rounded down
FLOOR_ALLOWANCE = 1e-9
#: fusion heads whose restricted logits sum to the fused logits exactly
LINEAR_FUSIONS = (ConcatFusion, SumFusion)


# -- the rule, on plain tensors ----------------------------------------------------------------------
def ramp_position(ramp: str, epoch: int, step_in_epoch: int, global_step: int, total_steps: int) -> float:
    """ℓ_t: ``per_epoch`` k · e / 10 (batch k, epoch e, both 0-based; BalanceMM), ``progress`` t / T."""
    if ramp == "per_epoch":
        return step_in_epoch * epoch / RAMP_DIVISOR
    return global_step / max(total_steps, 1)


def mask_ratio(position: float, epsilon: float) -> float:
    """p_t = sin(π/2 · min(ε, ℓ_t)/ε): 0 at ℓ_t = 0, rising on a sine to 1 at ℓ_t = ε and after."""
    return math.sin(math.pi / 2 * min(epsilon, max(position, 0.0)) / epsilon)


def masked_units(ratio: float, units: int) -> int:
    """N_t = ⌊p_t · D⌋, the number of the D mask units set to 0.

    A rounding allowance of 1e-9 keeps ratios that are exact in theory exact:
    sin(π/6) evaluates to 0.49999999999999994, and ⌊0.5 · 4⌋ must be 2, not 1.
    """
    return min(units, math.floor(ratio * units + FLOOR_ALLOWANCE))


def draw_mask(units: int, ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """[D] float 0/1 vector with exactly ⌊ratio · D⌋ zeros at random positions (on the generator's device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    mask = torch.ones(units, device=device)
    mask[torch.randperm(units, generator=generator, device=device)[: masked_units(ratio, units)]] = 0
    return mask


def dependence_masses(per_modality: Tensor) -> Tensor:
    """[M]: each modality's block mass in softmax over the concatenated logits [d_1 … d_M] (B × MC), batch mean.

    The mass of block m for sample i is Σ_c exp d_m,i,c / Σ_k Σ_c exp d_k,i,c, i.e. a softmax over
    modalities of logsumexp_c d_m,i,c. It measures how much the logits of m dominate the others'
    in size, not how confident m is on its own. Detached.
    """
    return torch.logsumexp(per_modality.detach().float(), dim=-1).softmax(dim=0).mean(dim=1)


def dependent_modalities(masses: Tensor, sigma: float) -> Tensor:
    """[M] booleans: the modalities whose mass exceeds σ (with σ ≥ 0.5 at most one)."""
    return masses > sigma


def mask_logits(per_modality: Tensor, dependent: Tensor, mask: Tensor) -> Tensor:
    """M_m ⊙ d_m: the dependent modalities' logits [M, B, C] times ``mask`` [C], the others unchanged."""
    factor = torch.where(dependent.view(-1, 1, 1), mask.to(per_modality), torch.ones_like(mask, dtype=per_modality.dtype))
    return per_modality * factor


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy, each sample weighted by ``weight`` when given (as ``base.cross_entropy``)."""
    if weight is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * weight).mean()


def amco_losses(masked_sum: Tensor, co_opt_logits: Tensor, mixer: Callable[[Tensor], Tensor], labels: Tensor,
                weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(z', CE(z', y), Σ_m CE(co_opt_m, y)) with z' = A(Σ_m M_m ⊙ d_m).

    ``masked_sum`` [B, C] is Σ_m M_m ⊙ d_m, ``co_opt_logits`` [M, B, C] the
    logits of the co-optimisation terms (M_m ⊙ d_m, or d_m with
    ``co_opt_unmasked``), ``mixer`` the layer A.
    """
    fused = mixer(masked_sum)
    co_opt = sum(weighted_cross_entropy(z, labels, weight) for z in co_opt_logits.unbind(0))
    return fused, weighted_cross_entropy(fused, labels, weight), co_opt


def make_mixer(num_classes: int, init: str, generator: Optional[torch.Generator] = None) -> nn.Linear:
    """A: C×C linear layer with bias; ``random`` draws nn.Linear's ranges U(±1/√C) from ``generator``."""
    mixer = nn.utils.skip_init(nn.Linear, num_classes, num_classes)  # no draw from the global RNG
    with torch.no_grad():
        if init == "identity":
            mixer.weight.copy_(torch.eye(num_classes))
            mixer.bias.zero_()
        else:
            bound = num_classes ** -0.5
            mixer.weight.copy_(torch.empty(num_classes, num_classes).uniform_(-bound, bound, generator=generator))
            mixer.bias.copy_(torch.empty(num_classes).uniform_(-bound, bound, generator=generator))
    return mixer


# -- the objective -----------------------------------------------------------------------------------
@METHODS.register("amco")
class AMCo(Objective):
    """Masks the modality the model depends on, with unimodal co-optimisation losses (Zhou et al., ICASSP 2023)."""

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options amco`)
    search_space = {
        "sigma": FloatRange(0.3, 0.9),
        "epsilon": FloatRange(0.05, 1.0, log=True),
        "ramp": Choice(["per_epoch", "progress"]),
        "co_opt_unmasked": Choice([False, True]),
        "mask_space": Choice(["logits", "features"]),
    }

    class Config(WindowConfig):
        modulation_starts: Optional[int] = Field(
            0, ge=0, description="first epoch (0-based) with masks and co-optimisation losses (BalanceMM 10)"
        )
        modulation_ends: Optional[int] = Field(
            None, ge=0, description="last such epoch, inclusive (BalanceMM 80); unset: the last epoch; "
            "outside the window the loss is CE(A(Σ_m d_m)) alone"
        )
        sigma: float = Field(0.5, ge=0, le=1, description="σ: a modality whose concatenated-softmax mass exceeds σ is dependent")
        epsilon: float = Field(0.3, gt=0, description="ε: the mask ratio p_t reaches 1 when ℓ_t reaches ε")
        ramp: Literal["per_epoch", "progress"] = Field(
            "per_epoch",
            description="ℓ_t: per_epoch = batch · epoch / 10, reset every epoch (BalanceMM; epoch 0 is never masked); "
            "progress = global step / total steps [unverified]",
        )
        ramp_epochs: Optional[int] = Field(
            None, ge=1, description="epochs of the progress ramp's total steps; unset: train.epochs (pinned when a run is extended)"
        )
        mask_space: Literal["logits", "features"] = Field(
            "logits",
            description="logits: the mask has C units and multiplies d_m (BalanceMM); features: d_m units, "
            "it multiplies f_m before the fusion head [unverified]",
        )
        co_opt_unmasked: bool = Field(
            False, description="co-optimisation losses on the unmasked d_m (default: masked, as BalanceMM) [unverified]"
        )
        score_logits: Literal["fusion", "heads"] = Field(
            "fusion",
            description="d_m: fusion = the fusion head's restricted logits (needs model.fusion=concat or sum, "
            "Σ_m d_m = fused logits); heads = the unimodal heads' logits (any fusion head, which goes unused)",
        )
        dependence: Literal["step", "sticky"] = Field(
            "step",
            description="step: 𝒟 is re-estimated every step; sticky: a modality once dependent stays so until "
            "the epoch ends (BalanceMM)",
        )
        mixer_init: Literal["random", "identity"] = Field(
            "random", description="initial A: random (nn.Linear's ranges, BalanceMM) or identity (z' starts as Σ_m d_m) [unverified]"
        )

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        #: 𝒟, the dependent modalities found on the previous step (empty at every epoch start)
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool))
        #: A, the C×C layer on Σ_m d_m, built in ``setup``
        self.mixer: Optional[nn.Linear] = None

    @classmethod
    def pinned_options(cls, config, epochs):
        return {"ramp_epochs": epochs} if config.ramp == "progress" and config.ramp_epochs is None else {}

    def setup(self, model, ctx):
        if self.config.score_logits == "fusion" and not isinstance(model.fusion, LINEAR_FUSIONS):
            name = getattr(type(model.fusion), "registry_name", type(model.fusion).__name__)
            raise ConfigError(
                f"amco.score_logits=fusion needs a linear fusion head (model.fusion=concat or sum), whose per-modality "
                f"logits d_m sum to its prediction; got model.fusion={name}; set amco.score_logits=heads to use the unimodal heads"
            )
        if self.mixer is None:
            self.mixer = make_mixer(self.num_classes, self.config.mixer_init, getattr(ctx, "generator", None))

    # -- how this objective reads the model -------------------------------------------------------------
    def modality_logits(self, model, features: dict[str, Tensor]) -> Tensor:
        """[M, B, C] d_m in modality order (restricted fusion logits, or the unimodal heads)."""
        if self.config.score_logits == "heads":
            heads = self.heads(model, features)
            return torch.stack([heads[m] for m in self.modalities])
        return restricted_logits(model.fuse, features, self.modalities)

    def combined(self, model, features: dict[str, Tensor], per_modality: Optional[Tensor] = None) -> Tensor:
        """Σ_m d_m: the fusion head's own logits for ``fusion`` (one pass, exact), the heads' sum for ``heads``."""
        if self.config.score_logits == "fusion":
            return model.fuse(features)
        return (self.modality_logits(model, features) if per_modality is None else per_modality).sum(0)

    def fuse(self, model, features):
        return self.mixer(self.combined(model, features))

    def predict_from_features(self, model, features):
        """z' = A(Σ_m d_m) without masks (masking is a training-time perturbation only)."""
        return self.fuse(model, features)

    # -- the schedule ---------------------------------------------------------------------------------
    def mask_ratio_at(self, ctx) -> float:
        """p_t of this step."""
        total = (self.config.ramp_epochs or ctx.max_epochs) * ctx.steps_per_epoch
        position = ramp_position(self.config.ramp, ctx.epoch, ctx.step_in_epoch, ctx.global_step, total)
        return mask_ratio(position, self.config.epsilon)

    def on_epoch_start(self, model, ctx):
        self.dependent.zero_()

    # -- one step ---------------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        features = self.encode(model, batch.inputs)
        per_modality = self.modality_logits(model, features)
        summed = self.combined(model, features, per_modality)
        active = in_window(self.config, ctx.epoch)
        ratio = self.mask_ratio_at(ctx) if active else 0.0
        dependent = self.dependent.clone() if active else torch.zeros_like(self.dependent)
        units = {m: 0 for m in self.modalities}
        masked_sum, co_opt = summed, per_modality
        if active and bool(dependent.any()) and ratio > 0:
            masked_sum, co_opt, units = self._masked(model, features, per_modality, summed, dependent, ratio, ctx)
        logits, fused_loss, co_opt_loss = amco_losses(masked_sum, co_opt, self.mixer, batch.labels, batch.weight)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", fused_loss)
        if active:
            record.add_loss("co_opt", co_opt_loss)
        if self.config.score_logits == "heads":
            record.unimodal = dict(zip(self.modalities, per_modality.unbind(0)))
        else:
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        masses = ctx.dist.mean(dependence_masses(per_modality))
        if active:
            record.shared["amco/masses"] = masses
        record.logs["amco/active"] = float(active)
        record.logs["amco/mask_ratio"] = ratio
        for k, m in enumerate(self.modalities):
            record.logs[f"amco/mass/{m}"] = masses[k]
            record.logs[f"amco/dependent/{m}"] = float(dependent[k])
            record.logs[f"amco/masked_units/{m}"] = float(units[m])
        return record

    def _masked(self, model, features, per_modality, summed, dependent, ratio, ctx):
        """(Σ_m M_m ⊙ d_m, co-optimisation logits, zeroed units per modality) for this step's masks."""
        generator = ctx.generator
        if self.config.mask_space == "logits":
            mask = draw_mask(self.num_classes, ratio, generator).to(per_modality.device)
            masked = mask_logits(per_modality, dependent, mask)
            # Σ_m M_m ⊙ d_m = Σ_m d_m + Σ_m (M_m ⊙ d_m − d_m): the undependent terms add exact zeros
            masked_sum = summed + (masked - per_modality).sum(0)
            count = masked_units(ratio, self.num_classes)
            units = {m: count if dependent[k] else 0 for k, m in enumerate(self.modalities)}
        else:
            masked_features, units = dict(features), {}
            for k, m in enumerate(self.modalities):
                size = features[m].shape[-1]
                units[m] = masked_units(ratio, size) if dependent[k] else 0
                if units[m]:
                    masked_features[m] = features[m] * draw_mask(size, ratio, generator).to(features[m])
            masked = self.modality_logits(model, masked_features)
            masked_sum = self.combined(model, masked_features, masked)
        co_opt = per_modality if self.config.co_opt_unmasked else masked
        return masked_sum, co_opt, units

    def after_step(self, record, ctx):
        masses = record.shared.get("amco/masses")
        if masses is None:  # outside the window 𝒟 stays as the epoch start left it: empty
            return
        found = dependent_modalities(masses, self.config.sigma).to(self.dependent.device)
        if self.config.dependence == "sticky":
            self.dependent |= found
        else:
            self.dependent.copy_(found)
