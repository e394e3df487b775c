"""CAL: contribution-guided asymmetric learning (Xu, Kou, Wu, Liu, arXiv 2510.26289, 2025).

Reconstructed from the paper's description; every free choice is a config
option. No official code is public and the paper's formulas could not be
obtained (see the CAL specification).

Certain (the paper's abstracts): a per-modality contribution W^m combines a
marginal performance I(m) with a confidence D(m) and is turned into weights
by a softmax; the gradients of high-contribution modalities are reinforced
(the strong one is not suppressed); an asymmetric information bottleneck
compresses low-contribution modalities harder.

Reconstructed (defaults, each a ``cal.*`` option):

- I(m): exact Shapley value of m for v(S) = batch mean of the fused
  probability of the true class with the modalities outside S zeroed
  (2^M fusion passes, no gradient).
- D(m): batch mean true-class probability of the unimodal head
  (``confidence=ema``: its moving average; ``entropy``: 1 − normalised entropy).
- W^m = max(I(m), 0) / Σ_k max(I(k), 0) · D(m) (equal shares when no I is
  positive), a moving average over steps (``momentum`` 0.9);
  ρ = softmax(T · W) with T = ``temperature`` (4); a step's ρ and β already
  include that step's batch.
- Acceleration after ``warmup_epochs`` (5): the gradient reaching encoder m
  through its output feature is multiplied by 1 + ρ_m.
- AIB: z^m = μ_m + σ_m ε (training, ε from the run's seeded generator) or μ_m
  (evaluation), μ_m and log σ²_m linear in f^m; β_m = β_0 (1 − ρ_m) M / (M − 1), β_0 = 1e-3.
- Loss: CE(fuse(z)) + γ Σ_m CE(head_m(z^m)) + Σ_m β_m KL_m, γ = 1.

The bottleneck sits between the encoders and every head, inside this
method's ``encode``, so evaluation (accuracy, coalitions, unimodal heads)
reads μ like the training step reads z.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..evaluation.shapley import all_coalitions, shapley_values
from ..models.multimodal import zero_out
from ..registry import METHODS
from .base import Method, StepResult
from .gradient_scaling import scale_gradient_

LOGGED = ("I", "D", "W", "rho", "beta", "KL")


def shapley_matrix(modalities: list[str]) -> Tensor:
    """A [M, 2^M] matrix A with φ = A v for coalition values v ordered as ``all_coalitions``.

    Shapley values are linear in v, so column c is the Shapley vector of the
    game worth 1 on coalition c only; one matrix product then replaces the
    per-step subset loops.
    """
    coalitions = all_coalitions(modalities)
    columns = []
    for target in coalitions:
        phi = shapley_values({c: float(c == target) for c in coalitions}, modalities)
        columns.append([phi[m] for m in modalities])
    return torch.tensor(columns, dtype=torch.float32).T


def true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def contribution(marginal: Tensor, confidence: Tensor, use: str = "both") -> Tensor:
    """W = positive share of I × D; ``marginal``: the share only; ``confidence``: D only."""
    if use == "confidence":
        return confidence
    positive = marginal.clamp(min=0)
    total = positive.sum()
    equal = torch.full_like(positive, 1 / positive.numel())
    share = torch.where(total > 0, positive / total.clamp_min(torch.finfo(positive.dtype).tiny), equal)
    return share if use == "marginal" else share * confidence


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), summed over feature dimensions, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=-1).mean()


def compression_strength(rho: Tensor, beta0: float) -> Tensor:
    """β_m = β_0 (1 − ρ_m) M / (M − 1): the weaker the modality, the stronger the bottleneck (mean β_0)."""
    count = rho.numel()
    return beta0 * (1 - rho) * count / (count - 1)


def moving_average(average: Tensor, value: Tensor, momentum: float, started: Tensor) -> Tensor:
    """One EMA step; the first observation is taken as it is (no bias towards the zero start)."""
    return torch.where(started, momentum * average + (1 - momentum) * value, value)


@METHODS.register("cal")
class CAL(Method):
    """Contribution-guided asymmetric learning (Xu et al., 2025), reconstructed from the paper's description."""

    class Config(Section):
        temperature: float = Field(4.0, gt=0, description="T in ρ = softmax(T · W)")
        momentum: float = Field(0.9, ge=0, lt=1, description="momentum of W's moving average over steps")
        confidence: Literal["probability", "ema", "entropy"] = Field(
            "probability",
            description="D(m): the unimodal head's mean true-class probability, its moving average, or 1 − normalised entropy",
        )
        confidence_momentum: float = Field(0.9, ge=0, lt=1, description="momentum of D's moving average (confidence=ema)")
        contribution: Literal["both", "marginal", "confidence"] = Field(
            "both", description="W from the Shapley share and D, the share only (I), or D only"
        )
        acceleration: bool = Field(True, description="multiply each encoder's gradient by 1 + ρ_m after the warm-up")
        warmup_epochs: int = Field(5, ge=0, description="epochs E_w of plain training before the acceleration starts")
        bottleneck: bool = Field(True, description="the asymmetric information bottleneck (AIB)")
        beta0: float = Field(1e-3, ge=0, description="β_0, the mean strength of the bottleneck's KL term")
        unimodal_weight: float = Field(1.0, ge=0, description="γ, weight of the unimodal heads' losses")

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if len(self.modalities) < 2:
            raise ConfigError(f"cal needs at least two modalities (got {len(self.modalities)})")
        count = len(self.modalities)
        self.coalitions = all_coalitions(self.modalities)
        self.register_buffer("shapley_weights", shapley_matrix(self.modalities), persistent=False)
        self.register_buffer("contribution_average", torch.zeros(count))
        self.register_buffer("confidence_average", torch.zeros(count))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.mu = nn.ModuleDict()
        self.logvar = nn.ModuleDict()
        self._epoch_sums: Tensor | None = None  # [len(LOGGED), M], this epoch's steps only
        self._epoch_steps = 0

    def setup(self, model, ctx):
        if self.config.bottleneck:
            dims = model.feature_dims
            self.mu = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in self.modalities})
            self.logvar = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in self.modalities})

    # -- the bottleneck: every read of the model goes through it --------------
    def compress(self, features: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Codes z^m (sampled in training, μ in evaluation) and KL_m per modality."""
        if not self.config.bottleneck:
            return features, features[self.modalities[0]].new_zeros(len(self.modalities))
        codes, kl = {}, []
        for m in self.modalities:
            mu, logvar = self.mu[m](features[m]), self.logvar[m](features[m])
            codes[m] = mu + (0.5 * logvar).exp() * self._noise(mu, generator) if self.training else mu
            kl.append(gaussian_kl(mu, logvar))
        return codes, torch.stack(kl)

    @staticmethod
    def _noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
        # drawn where the generator lives (the trainer's is on the CPU): the same numbers on any device
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device).to(like)

    def encode(self, model, inputs):
        return self.compress(model.encode(inputs))[0]

    # -- contribution ----------------------------------------------------------
    @torch.no_grad()
    def batch_statistics(self, model, codes: dict[str, Tensor], unimodal: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """I(m) (Shapley values of the fused true-class probability) and the batch's D(m)."""
        values = torch.stack(
            [true_class_probability(self.fuse(model, zero_out(codes, c)), labels).float().mean() for c in self.coalitions]
        )
        marginal = self.shapley_weights @ values
        logits = torch.stack([unimodal[m] for m in self.modalities])  # [M, B, C]
        if self.config.confidence == "entropy":
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            confidence = 1 - entropy.mean(-1) / math.log(self.num_classes)
        else:
            confidence = true_class_probability(logits, labels.expand(len(self.modalities), -1)).mean(-1)
        return marginal, confidence.float()

    @torch.no_grad()
    def update_contribution(self, marginal: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Advance the moving averages by one step; return (D used, smoothed W, ρ)."""
        started = self.updates > 0
        if self.config.confidence == "ema":
            self.confidence_average.copy_(
                moving_average(self.confidence_average, confidence, self.config.confidence_momentum, started)
            )
            confidence = self.confidence_average.clone()
        current = contribution(marginal, confidence, self.config.contribution)
        self.contribution_average.copy_(moving_average(self.contribution_average, current, self.config.momentum, started))
        self.updates += 1
        rho = torch.softmax(self.config.temperature * self.contribution_average, dim=0)
        return confidence, self.contribution_average.clone(), rho

    def accelerating(self, epoch: int) -> bool:
        return self.config.acceleration and epoch >= self.config.warmup_epochs

    # -- hooks -------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        labels = batch.labels
        features = model.encode(batch.inputs)
        codes, kl = self.compress(features, ctx.generator)
        logits = self.fuse(model, codes)
        unimodal = self.heads(model, codes)
        marginal, confidence = ctx.dist.mean(torch.stack(self.batch_statistics(model, codes, unimodal, labels)))
        confidence, weight, rho = self.update_contribution(marginal, confidence)
        beta = compression_strength(rho, self.config.beta0)
        if self.accelerating(ctx.epoch):
            for m, factor in zip(self.modalities, 1 + rho):
                scale_gradient_(features[m], factor)

        fused_loss = F.cross_entropy(logits, labels)
        unimodal_loss = sum(F.cross_entropy(unimodal[m], labels) for m in self.modalities)
        kl_loss = (beta * kl).sum()
        self._accumulate(torch.stack([marginal, confidence, weight, rho, beta, kl.detach()]))
        logs = {"loss/fused": fused_loss.detach(), "loss/unimodal": unimodal_loss.detach(), "loss/kl": kl_loss.detach()}
        return StepResult(fused_loss + self.config.unimodal_weight * unimodal_loss + kl_loss, logits, logs)

    def _accumulate(self, values: Tensor) -> None:
        self._epoch_sums = values if self._epoch_sums is None else self._epoch_sums + values
        self._epoch_steps += 1

    def on_epoch_start(self, model, ctx):
        self._epoch_sums, self._epoch_steps = None, 0

    def on_epoch_end(self, model, ctx):
        logs = {"cal/accelerating": float(self.accelerating(ctx.epoch))}
        if self._epoch_sums is None:
            return logs
        means = ctx.dist.mean(self._epoch_sums / self._epoch_steps).tolist()  # KL differs between processes
        for name, row in zip(LOGGED, means):
            logs.update({f"cal/{name}/{m}": value for m, value in zip(self.modalities, row)})
        return logs
