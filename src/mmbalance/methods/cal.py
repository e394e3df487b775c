"""CAL: contribution-guided asymmetric learning (Xu, Kou, Wu, Liu, arXiv 2510.26289, 2025).

Reconstructed from the paper's description; every free choice is a config
option. No official code is public and the paper's formulas could not be
obtained (see the CAL specification).

Certain (the paper's abstracts): a per-modality contribution W^m combines a
marginal performance I(m) with a confidence D(m) and is turned into weights
by a softmax; the gradients of high-contribution modalities are reinforced
(the strong one is not suppressed); an asymmetric information bottleneck
compresses low-contribution modalities harder.

Reconstructed (defaults, each a ``cal.*`` option): W and ρ as in
``methods/contribution.py``; acceleration from ``modulation_starts`` (5):
the gradient reaching encoder m through its output feature is multiplied by
1 + ρ_m (the same rule as the ``cal_accel`` plugin, which brings it to any
objective); AIB: z^m = μ_m + σ_m ε (training, ε from the run's seeded
generator) or μ_m (evaluation), μ_m and log σ²_m linear in f^m;
β_m = β_0 (1 − ρ_m) M / (M − 1), β_0 = 1e-3. Loss:
CE(fuse(z)) + γ Σ_m CE(head_m(z^m)) + Σ_m β_m KL_m, γ = 1.

The bottleneck sits between the encoders and every head, inside this
objective's ``encode``, so evaluation (accuracy, coalitions, unimodal heads)
reads μ like the training step reads z.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..registry import METHODS
from ..search_space import Choice, FloatRange, IntRange
from .base import Objective, cross_entropy
from .contribution import LOGGED, ContributionConfig, ContributionTracker, EpochMeans
from .gradient_scaling import scale_gradient_
from .window import in_window

ROLE = "contribution_acceleration"
IDENTITY_LOGVAR = -4.0  # bottleneck_init=identity: σ ≈ 0.14, small noise on features of unit scale


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), summed over feature dimensions, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=-1).mean()


def compression_strength(rho: Tensor, beta0: float) -> Tensor:
    """β_m = β_0 (1 − ρ_m) M / (M − 1): the weaker the modality, the stronger the bottleneck (mean β_0)."""
    count = rho.numel()
    return beta0 * (1 - rho) * count / (count - 1)


@METHODS.register("cal")
class CAL(Objective):
    """Contribution-guided asymmetric learning (Xu et al., 2025), reconstructed from the paper's description."""

    class Config(ContributionConfig):
        # defaults chosen on the validation splits of synthetic, mfeat (fac+mor) and avdigits by
        # `mmbalance tune` and a 5-seed comparison of the studies' best settings (docs/methods.md)
        modulation_starts: int = Field(0, ge=0, description="first epoch (0-based) of the gradient acceleration (E_w; 0: no warm-up)")
        temperature: float = Field(4.104, gt=0, description="T in ρ = softmax(T · W)")
        momentum: float = Field(0.7674, ge=0, lt=1, description="momentum of W's moving average over steps")
        contribution: Literal["both", "marginal", "confidence"] = Field(
            "marginal", description="W from the Shapley share and D, the share only (I), or D only"
        )
        acceleration: bool = Field(True, description="multiply each encoder's gradient by 1 + ρ_m inside the modulation window")
        bottleneck: bool = Field(True, description="the asymmetric information bottleneck (AIB)")
        bottleneck_init: Literal["random", "identity"] = Field(
            "identity",
            description="how the bottleneck starts: random (PyTorch's Linear init) or identity (μ = f, log σ² = -4: the features pass through nearly unchanged)",
        )
        beta0: float = Field(0.001062, ge=0, description="β_0, the mean strength of the bottleneck's KL term")
        unimodal_weight: float = Field(0.7412, ge=0, description="γ, weight of the unimodal heads' losses")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options cal`)
    search_space = {
        "temperature": FloatRange(1.0, 16.0, log=True),
        "momentum": FloatRange(0.5, 0.99),
        "beta0": FloatRange(1e-4, 1e-2, log=True),
        "unimodal_weight": FloatRange(0.25, 4.0, log=True),
        "confidence": Choice(["probability", "ema", "entropy"]),
        "contribution": Choice(["both", "marginal", "confidence"]),
        "modulation_starts": IntRange(0, 15),
        "bottleneck_init": Choice(["random", "identity"]),
    }

    defaults = {"train.grad_clip": 40.0}
    exclusive = (ROLE,)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self.tracker = ContributionTracker(config, self.modalities, num_classes)
        self.mu = nn.ModuleDict()
        self.logvar = nn.ModuleDict()
        self.epoch_means = EpochMeans()

    def setup(self, model, ctx):
        if self.config.bottleneck:
            dims = model.feature_dims
            self.mu = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in self.modalities})
            self.logvar = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in self.modalities})
            if self.config.bottleneck_init == "identity":
                with torch.no_grad():
                    for m in self.modalities:
                        self.mu[m].weight.copy_(torch.eye(dims[m]))
                        self.mu[m].bias.zero_()
                        self.logvar[m].weight.zero_()
                        self.logvar[m].bias.fill_(IDENTITY_LOGVAR)

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

    def accelerating(self, epoch: int) -> bool:
        return self.config.acceleration and in_window(self.config, epoch)

    # -- hooks -------------------------------------------------------------------
    def on_epoch_start(self, model, ctx):
        self.epoch_means.reset()

    def training_step(self, model, batch, ctx):
        features = model.encode(batch.inputs)
        codes, kl = self.compress(features, ctx.generator)
        logits = self.fuse(model, codes)
        unimodal = self.heads(model, codes)
        record = self.record(model, batch, codes, logits=logits, unimodal=unimodal, encoder_outputs=features)
        stats = self.tracker.step(record, ctx.dist)
        beta = compression_strength(stats["rho"], self.config.beta0)
        if self.accelerating(ctx.epoch):
            for m, factor in zip(self.modalities, 1 + stats["rho"]):
                scale_gradient_(features[m], factor)
        record.add_loss("fused", cross_entropy(logits, batch))
        record.add_loss("unimodal", self.config.unimodal_weight * sum(cross_entropy(unimodal[m], batch) for m in self.modalities))
        record.add_loss("kl", (beta * kl).sum())
        self.epoch_means.add(torch.stack([*(stats[k] for k in LOGGED), beta, kl.detach()]))
        return record

    def on_epoch_end(self, model, ctx):
        logs = {"cal/accelerating": float(self.accelerating(ctx.epoch))}
        logs.update(self.epoch_means.logs("cal", (*LOGGED, "beta", "KL"), self.modalities, ctx.dist))
        return logs
