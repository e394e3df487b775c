"""A text encoder for token ids that needs no download.

Inputs are ``(L,)`` int64 ids from the benchmarks' own tokenizer (``<pad>``
= 0, ``<unk>`` = 1). Ids at or above ``vocab_size`` are read as ``<unk>``,
so a vocabulary larger than the table degrades instead of crashing. Local
pretrained weights (a ``torch.save``d state dict of this module) can be
loaded from a path; nothing is ever fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import ENCODERS
from .encoders import FLOAT_ENCODERS, Encoder
from .sequence import MaskedTransformer

PAD_ID = 0
UNK_ID = 1
VOCAB_SIZE = 30000  # equals the benchmarks' tokenizer default max_vocab


@ENCODERS.register("text")
class TextEncoder(Encoder):
    """Token ids (L,): embedding of ``hidden_dim``, a small Transformer (or mean of embeddings), masked mean pool."""

    reads_token_ids = True

    def __init__(
        self,
        input_shape,
        feature_dim=64,
        hidden_dim=128,
        dropout=0.0,
        vocab_size: int = VOCAB_SIZE,
        layers: int = 2,
        weights: str | Path | None = None,
    ):
        super().__init__(input_shape, feature_dim)
        if len(self.input_shape) != 1:
            raise ConfigError(f"text needs token ids of shape (L,), got shape {self.input_shape}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden_dim, padding_idx=PAD_ID)
        self.body = MaskedTransformer(hidden_dim, layers, dropout) if layers > 0 else None
        self.out = nn.Linear(hidden_dim, feature_dim)
        if weights is not None:
            self.load_pretrained(weights)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point():  # .long() would silently truncate features to ids (or index out of range)
            raise ConfigError(
                f"encoder 'text' reads integer token ids, but got float features of shape {tuple(ids.shape[1:])}; "
                f"for float inputs use {FLOAT_ENCODERS}"
            )
        ids = ids.long()
        ids = torch.where(ids >= self.vocab_size, torch.full_like(ids, UNK_ID), ids)
        valid = ids.ne(PAD_ID)
        x = self.embed(ids)
        if self.body is not None:
            pooled = self.body(x, valid)
        else:
            weights = valid.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return torch.relu(self.out(pooled))
