"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng, Wei, Deng, Wang, Hu,
"Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022), as a plugin.

Per step (BASELINES §2), from the objective's forward pass:

- s_m = Σ_i softmax(d_m,i)[y_i], d_m the fusion-restricted logits (or the
  unimodal heads' with ``score_logits=heads``), detached and averaged
  across processes;
- ρ_m: the discrepancy ratio (M = 2: s_a / s_v; M > 2: ``multi_ratio``,
  see ``discrepancy.py``);
- k_m = 1 − tanh(α ρ_m) where ρ_m > 1, else 1: the dominant modality's
  encoder is slowed in proportion to how far ahead it is.

Inside the modulation window, after the gradients are averaged, every
weight tensor of encoder m (``ndim ≥ 2``; ``ge_params=conv4d``: only 4-D
convolution kernels, the authors' code) gets g ← k_m g (``variant=OGM``),
or g ← k_m g + n with n ~ N(0, σ²), σ = std(g) + 1e-8 taken on the
unscaled g (``variant=OGM_GE``, default). The noise goes to every encoder,
k_m = 1 included. Fusion and unimodal heads are never touched.

The noise is the same on every process: one int64 seed per step comes from
``ctx.generator`` (seeded per run, identical on all processes,
checkpointed); a generator on the gradients' device, seeded with it, draws
the noise where the gradients are.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from ..errors import ConfigError
from ..models.readouts import modality_scores
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Plugin
from .discrepancy import MultiRatio, discrepancy_ratios
from .window import WindowConfig, in_window

#: added to the per-tensor gradient std, so a constant gradient still gets (tiny) noise (official)
NOISE_FLOOR = 1e-8
GeParams = Literal["weights", "conv4d"]
ScoreLogits = Literal["fusion", "heads"]


# -- the rule, on plain tensors ---------------------------------------------------------------------
def ogm_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """k_m = 1 − tanh(α ρ_m) where ρ_m > 1, else 1 (CVPR 2022 Eq. 10)."""
    return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))


def modulated_gradients(params, ge_params: str = "weights") -> list[Tensor]:
    """The ``.grad`` tensors OGM modulates among ``params``: weights (ndim ≥ 2) or 4-D kernels only.

    Biases and normalisation parameters (1-D) are never touched; parameters
    without a gradient this step are skipped.
    """
    if ge_params not in ("weights", "conv4d"):
        raise ValueError(f"ge_params must be 'weights' or 'conv4d', got '{ge_params}'")
    wanted = (lambda g: g.ndim >= 2) if ge_params == "weights" else (lambda g: g.ndim == 4)
    return [p.grad for p in params if p.grad is not None and wanted(p.grad)]


def gradient_std(grad: Tensor) -> Tensor:
    """std over all elements of one tensor (unbiased, as the authors' ``grad.std()``); 0 for one element."""
    if grad.numel() < 2:
        return torch.zeros((), dtype=grad.dtype, device=grad.device)
    return grad.std()


def modulate_(grads: list[Tensor], coefficient: Tensor | float, noise_seed: Optional[int] = None) -> None:
    """g ← k g, plus N(0, (std(g) + 1e-8)²) noise when ``noise_seed`` is given, in place.

    σ is taken on the gradient *before* scaling. The noise of all tensors is
    drawn, in order, from one generator per device seeded with
    ``noise_seed``: the same seed and gradients give the same result on any
    process, and nothing is drawn on the CPU and copied over.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for grad in grads:
        if noise_seed is None:
            grad.mul_(coefficient)
            continue
        sigma = gradient_std(grad) + NOISE_FLOOR
        generator = generators.get(grad.device)
        if generator is None:
            generator = generators[grad.device] = torch.Generator(device=grad.device).manual_seed(noise_seed)
        noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
        grad.mul_(coefficient).add_(noise.mul_(sigma))


def step_seed(generator: torch.Generator) -> int:
    """One int64 seed drawn from the run's (CPU) generator: one draw per step, the same on every process."""
    return int(torch.randint(0, 2**62, (), generator=generator))


def scores_of(record, score_logits: str, part: str) -> Tensor:
    """s_m [M] of the record's batch from d_m (``fusion``) or the unimodal heads (``heads``), detached."""
    if score_logits == "fusion":
        logits = record.restricted_logits()
    else:
        unimodal = record.unimodal
        if unimodal is None or any(m not in unimodal for m in record.modalities):
            raise ConfigError(
                f"{part}.score_logits=heads needs an objective with unimodal heads for every modality; "
                "this one has none (use score_logits=fusion)"
            )
        logits = torch.stack([unimodal[m] for m in record.modalities])
    return modality_scores(logits, record.labels)


def modulate_encoders_(ctx, modalities: list[str], coefficients: Tensor, noise: bool, ge_params: str) -> None:
    """Apply ``modulate_`` to every encoder's selected gradients (one noise seed for all of them)."""
    seed = step_seed(ctx.generator) if noise else None
    grads = {m: modulated_gradients(ctx.params.encoder[m], ge_params) for m in modalities}
    for slot, m in enumerate(modalities):
        modulate_(grads[m], coefficients[slot], seed)


@METHODS.register("ogm_ge")
class OGMGE(Plugin):
    """On-the-fly gradient modulation with Gaussian noise on encoder gradients (Peng et al., CVPR 2022)."""

    class Config(WindowConfig):
        modulation_starts: int = Field(0, ge=0, description="first epoch (0-based) whose encoder gradients are modulated (official 0; BMM 10)")
        modulation_ends: Optional[int] = Field(
            50, ge=0, description="last modulated epoch, inclusive (official 50; BMM 80); unset: the last epoch"
        )
        alpha: float = Field(
            0.1, ge=0, le=100,
            description="α in k = 1 − tanh(α ρ) (official README: 0.1 for VGGSound, 0.8 for CREMA-D; BMM 0.3)",
        )
        variant: Literal["OGM_GE", "OGM"] = Field(
            "OGM_GE", description="OGM_GE: scaling plus Gaussian noise of the unscaled gradient's std; OGM: scaling only"
        )
        multi_ratio: MultiRatio = Field(
            "mean_pairwise",
            description="discrepancy ratio for M > 2 [unverified]: mean_pairwise (mean of s_m/s_k), "
            "sum_others (s_m / Σ others), min (s_m / min s); all are s_a/s_v for M = 2",
        )
        ge_params: GeParams = Field(
            "weights",
            description="encoder tensors modulated: weights (ndim ≥ 2, BMM) or conv4d (4-D kernels only, the official code)",
        )
        score_logits: ScoreLogits = Field(
            "fusion", description="scores from the fusion-restricted logits d_m (paper) or the unimodal heads"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options ogm_ge`)
    search_space = {
        "alpha": FloatRange(0.05, 1.0, log=True),
        "variant": Choice(["OGM_GE", "OGM"]),
    }

    @property
    def key(self) -> str:
        return f"{self.name}/coefficients"

    def on_forward(self, record, ctx):
        scores = ctx.dist.mean(scores_of(record, self.config.score_logits, self.name))
        ratios = discrepancy_ratios(scores, self.config.multi_ratio)
        coefficients = ogm_coefficients(ratios, self.config.alpha)
        record.shared[self.key] = coefficients
        record.logs[f"{self.name}/modulating"] = float(in_window(self.config, ctx.epoch))
        for name, values in (("score", scores), ("ratio", ratios), ("coefficient", coefficients)):
            record.logs.update({f"{self.name}/{name}/{m}": v for m, v in zip(self.modalities, values)})

    def after_backward(self, record, ctx):
        if record is None or self.key not in record.shared or not in_window(self.config, ctx.epoch):
            return
        modulate_encoders_(
            ctx, self.modalities, record.shared[self.key], self.config.variant == "OGM_GE", self.config.ge_params
        )
