"""CAL's modality contribution W and weights ρ, shared by the ``cal`` objective and the ``cal_accel`` plugin.

I(m): exact Shapley value of m for v(S) = batch mean of the fused
probability of the true class with the modalities outside S zeroed (2^M
fusion passes, no gradient). D(m): the unimodal head's batch mean
true-class probability (``confidence=ema``: its moving average;
``entropy``: 1 − normalised entropy). W = max(I, 0) / Σ max(I, 0) · D
(equal shares when no I is positive), a moving average over steps;
ρ = softmax(T · W). A step's ρ already includes that step's batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..evaluation.shapley import all_coalitions, shapley_values
from ..models.readouts import coalition_logits, true_class_probability
from .window import WindowConfig

LOGGED = ("I", "D", "W", "rho")


class ContributionConfig(WindowConfig):
    """Options of the contribution estimate; the window is when the acceleration acts."""

    modulation_starts: int = Field(5, ge=0, description="first epoch (0-based) of the gradient acceleration (E_w)")
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


def contribution(marginal: Tensor, confidence: Tensor, use: str = "both") -> Tensor:
    """W = positive share of I × D; ``marginal``: the share only; ``confidence``: D only."""
    if use == "confidence":
        return confidence
    positive = marginal.clamp(min=0)
    total = positive.sum()
    equal = torch.full_like(positive, 1 / positive.numel())
    share = torch.where(total > 0, positive / total.clamp_min(torch.finfo(positive.dtype).tiny), equal)
    return share if use == "marginal" else share * confidence


def moving_average(average: Tensor, value: Tensor, momentum: float, started: Tensor) -> Tensor:
    """One EMA step; the first observation is taken as it is (no bias towards the zero start)."""
    return torch.where(started, momentum * average + (1 - momentum) * value, value)


class ContributionTracker(nn.Module):
    """The running W and ρ of one run (buffers, so checkpoints hold them)."""

    def __init__(self, config: ContributionConfig, modalities: list[str], num_classes: int):
        super().__init__()
        self.config = config
        self.modalities = list(modalities)
        self.num_classes = num_classes
        count = len(self.modalities)
        self.coalitions = all_coalitions(self.modalities)
        self.register_buffer("shapley_weights", shapley_matrix(self.modalities), persistent=False)
        self.register_buffer("contribution_average", torch.zeros(count))
        self.register_buffer("confidence_average", torch.zeros(count))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def batch_statistics(self, fuse, features: dict[str, Tensor], unimodal: dict[str, Tensor], labels: Tensor) -> Tensor:
        """[2, M]: I(m) (Shapley values of the fused true-class probability) and the batch's D(m)."""
        values = torch.stack(
            [true_class_probability(coalition_logits(fuse, features, c), labels).float().mean() for c in self.coalitions]
        )
        marginal = self.shapley_weights @ values
        logits = torch.stack([unimodal[m] for m in self.modalities]).float()  # [M, B, C]
        if self.config.confidence == "entropy":
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            confidence = 1 - entropy.mean(-1) / math.log(self.num_classes)
        else:
            confidence = true_class_probability(logits, labels).mean(-1)
        return torch.stack([marginal, confidence.float()])

    @torch.no_grad()
    def update(self, marginal: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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

    def step(self, record, dist) -> dict[str, Tensor]:
        """Statistics of the record's batch (pooled across processes), then one update: I, D, W, ρ."""
        unimodal = record.unimodal
        if unimodal is None or any(m not in unimodal for m in self.modalities):
            unimodal = dict(zip(self.modalities, record.zeroed_logits().detach()))
        marginal, confidence = dist.mean(self.batch_statistics(record.fuse, record.features, unimodal, record.labels))
        confidence, weight, rho = self.update(marginal, confidence)
        return {"I": marginal, "D": confidence, "W": weight, "rho": rho}


class EpochMeans:
    """Per-epoch means of [K, M] step statistics, for logging (reset at each epoch start)."""

    def __init__(self):
        self.sums: Tensor | None = None
        self.steps = 0

    def reset(self) -> None:
        self.sums, self.steps = None, 0

    def add(self, values: Tensor) -> None:
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1

    def logs(self, prefix: str, names: tuple[str, ...], modalities: list[str], dist) -> dict[str, float]:
        if self.sums is None:
            return {}
        means = dist.mean(self.sums / self.steps).tolist()
        return {f"{prefix}/{name}/{m}": value for name, row in zip(names, means) for m, value in zip(modalities, row)}
