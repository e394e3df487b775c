"""Fusion heads: a dict of per-modality features -> class logits.

Every head accepts any feature dict with the model's modalities, including
misaligned tuples and modalities replaced by zeros, which is how methods
probe what each modality contributes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import FUSIONS


class Fusion(nn.Module):
    def __init__(self, feature_dims: dict[str, int], num_classes: int, hidden_dim: int = 128):
        super().__init__()
        self.modalities = list(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def ordered(self, features: dict[str, Tensor]) -> list[Tensor]:
        return [features[m] for m in self.modalities]


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """A linear layer on the concatenated features (the field's default)."""

    def __init__(self, feature_dims, num_classes, hidden_dim=128):
        super().__init__(feature_dims, num_classes, hidden_dim)
        self.linear = nn.Linear(sum(feature_dims.values()), num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.linear(torch.cat(self.ordered(features), dim=-1))


@FUSIONS.register("sum")
class SumFusion(Fusion):
    """One linear layer per modality, logits summed."""

    def __init__(self, feature_dims, num_classes, hidden_dim=128):
        super().__init__(feature_dims, num_classes, hidden_dim)
        self.linears = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return sum(self.linears[m](features[m]) for m in self.modalities)


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """Feature-wise linear modulation: every other modality scales and shifts the last one.

    With M modalities the first M-1 produce (gamma, beta) for the last
    modality's projected feature; their contributions are summed. A zeroed
    conditioning modality gives gamma = 1 + bias, beta = bias.
    """

    def __init__(self, feature_dims, num_classes, hidden_dim=128):
        super().__init__(feature_dims, num_classes, hidden_dim)
        *conditioners, self.target = self.modalities
        self.project = nn.Linear(feature_dims[self.target], hidden_dim)
        self.film = nn.ModuleDict({m: nn.Linear(feature_dims[m], 2 * hidden_dim) for m in conditioners})
        self.out = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        h = self.project(features[self.target])
        gamma = torch.ones_like(h)
        beta = torch.zeros_like(h)
        for m, layer in self.film.items():
            g, b = layer(features[m]).chunk(2, dim=-1)
            gamma = gamma + g
            beta = beta + b
        return self.out(torch.relu(gamma * h + beta))


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """Each modality's projection is weighted by a sigmoid gate computed from all features."""

    def __init__(self, feature_dims, num_classes, hidden_dim=128):
        super().__init__(feature_dims, num_classes, hidden_dim)
        total = sum(feature_dims.values())
        self.project = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in feature_dims.items()})
        self.gate = nn.Linear(total, len(self.modalities) * hidden_dim)
        self.out = nn.Linear(hidden_dim, num_classes)
        self.hidden_dim = hidden_dim

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = self.ordered(features)
        gates = torch.sigmoid(self.gate(torch.cat(parts, dim=-1)))
        gates = gates.reshape(gates.shape[0], len(parts), self.hidden_dim)
        fused = sum(gates[:, k] * torch.tanh(self.project[m](x)) for k, (m, x) in enumerate(zip(self.modalities, parts)))
        return self.out(fused)


def build_fusion(name: str, feature_dims: dict[str, int], num_classes: int, hidden_dim: int) -> Fusion:
    return FUSIONS.get(name)(feature_dims, num_classes, hidden_dim=hidden_dim)
