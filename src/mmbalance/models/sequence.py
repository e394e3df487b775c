"""A Transformer encoder for feature sequences ``(T, D)`` (MOSI/MOSEI-style features).

Padding is recognised, not passed in: a time step whose features are all
zero is padding, which is how the MulT pickles pad. Padded steps are masked
out of attention and of the mean pool, and positions count real steps only,
so the pooled feature is the same whether a sequence is padded on the left,
on the right or not at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import ENCODERS
from .encoders import Encoder

MAX_POSITIONS = 4096


def pick_heads(width: int, preferred: int = 4) -> int:
    """The largest head count up to ``preferred`` that divides ``width``."""
    return next(h for h in range(preferred, 0, -1) if width % h == 0)


class MaskedTransformer(nn.Module):
    """Learned positions over real steps, ``layers`` pre-norm Transformer layers, masked mean pool."""

    def __init__(self, width: int, layers: int, dropout: float, max_positions: int = MAX_POSITIONS):
        super().__init__()
        self.positions = nn.Embedding(max_positions, width)
        layer = nn.TransformerEncoderLayer(
            width, pick_heads(width), dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """``x``: (B, T, width); ``valid``: (B, T) bool. Returns (B, width)."""
        # A sequence with no real step keeps one so attention and the pool stay defined.
        valid = valid.clone()
        valid[~valid.any(dim=1), 0] = True
        position = (valid.long().cumsum(dim=1) - 1).clamp(min=0, max=self.positions.num_embeddings - 1)
        x = x + self.positions(position)
        x = self.norm(self.layers(x, src_key_padding_mask=~valid))
        weights = valid.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)


@ENCODERS.register("transformer")
class SequenceTransformerEncoder(Encoder):
    """Feature sequences (T, D): linear projection to ``hidden_dim``, 2 Transformer layers, masked mean pool."""

    def __init__(self, input_shape, feature_dim=64, hidden_dim=128, dropout=0.0, layers: int = 2):
        super().__init__(input_shape, feature_dim)
        if len(self.input_shape) != 2:
            raise ConfigError(f"transformer needs feature sequences (T, D), got shape {self.input_shape}")
        self.project = nn.Linear(self.input_shape[1], hidden_dim)
        self.body = MaskedTransformer(hidden_dim, layers, dropout)
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        valid = x.ne(0).any(dim=-1)
        return torch.relu(self.out(self.body(self.project(x), valid)))
