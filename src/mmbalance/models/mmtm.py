"""MMTM: the multimodal transfer module (a squeeze-and-excitation across two modalities).

Between two encoders' stages, each modality's map h_m (B·frames, C_m, …) is
squeezed to a_m (B, C_m): its mean over everything but batch and channel,
the frames of a sample included (frames are folded into the batch). Then

    e = ReLU(W_s [a_0; a_1]),   g_m = sigmoid(W_m e),   out_m = h_m ⊙ g_m

with W_s: (C_0 + C_1) → int(2 (C_0 + C_1) / ratio) shared by both
modalities and W_m: → C_m one per modality; g_m is broadcast over the
positions (and frames) of each sample. The gate g_m is how modality m reads
the other one: W_m and W_s are m's cross-modal "bypass" (Greedy, BASELINES
§11). Each block also keeps ḡ_m, the cumulative mean over the training
forwards of the batch-mean gate (buffers, so checkpoints hold it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def squeeze(h: Tensor, frames: int = 1) -> Tensor:
    """(B, C): the mean of a stage output (B·frames, C, *positions) over its positions and each sample's frames.

    A vector stage output (B, C) is returned as it is (a mean over one value).
    """
    batch = h.shape[0] // frames
    return h.reshape(batch, frames, h.shape[1], -1).mean(dim=(1, 3))


def excite(h: Tensor, gate: Tensor, frames: int = 1) -> Tensor:
    """h ⊙ g: the gate (B, C) of each sample scales every position of every frame of that sample's map."""
    batch = gate.shape[0]
    shape = (batch, 1, gate.shape[1]) + (1,) * (h.dim() - 2)
    return (h.reshape(batch, frames, *h.shape[1:]) * gate.reshape(shape)).reshape(h.shape)


class MMTM(nn.Module):
    """One MMTM block between stage outputs of two modalities (channel widths ``dims``)."""

    def __init__(self, dims: Sequence[int], ratio: float = 4.0):
        super().__init__()
        if len(dims) != 2:
            raise ValueError(f"an MMTM block joins two modalities, got widths {list(dims)}")
        total = int(dims[0]) + int(dims[1])
        hidden = max(1, int(2 * total / ratio))
        self.dims = tuple(int(d) for d in dims)
        #: W_s, the squeeze layer both modalities share
        self.squeeze_layer = nn.Linear(total, hidden)
        #: W_m, one excitation layer per modality
        self.excitation = nn.ModuleList(nn.Linear(hidden, d) for d in self.dims)
        for m, d in enumerate(self.dims):
            self.register_buffer(f"gate_mean_{m}", torch.zeros(d))
        #: how many batch means ḡ averages
        self.register_buffer("gate_count", torch.zeros((), dtype=torch.long))

    def gates(self, maps: Sequence[Tensor], frames: Sequence[int] = (1, 1)) -> list[Tensor]:
        """[g_0, g_1], each (B, C_m): sigmoid(W_m ReLU(W_s [a_0; a_1]))."""
        squeezed = torch.cat([squeeze(h, f) for h, f in zip(maps, frames)], dim=1)
        hidden = torch.relu(self.squeeze_layer(squeezed))
        return [torch.sigmoid(layer(hidden)) for layer in self.excitation]

    @staticmethod
    def apply_gates(maps: Sequence[Tensor], gates: Sequence[Tensor], frames: Sequence[int] = (1, 1)) -> list[Tensor]:
        return [excite(h, g, f) for h, g, f in zip(maps, gates, frames)]

    def forward(self, maps: Sequence[Tensor], frames: Sequence[int] = (1, 1)) -> list[Tensor]:
        return self.apply_gates(maps, self.gates(maps, frames), frames)

    def gate_mean(self, m: int) -> Tensor:
        """ḡ_m (C_m,): the running mean of modality m's batch-mean gate."""
        return getattr(self, f"gate_mean_{m}")

    @torch.no_grad()
    def update_gate_means(self, batch_means: Sequence[Tensor]) -> None:
        """ḡ_m ← (ḡ_m · n + batch_mean_m) / (n + 1) for both modalities, n += 1 (a cumulative mean)."""
        n = self.gate_count.to(self.gate_mean_0.dtype)
        for m, value in enumerate(batch_means):
            mean = self.gate_mean(m)
            mean.copy_((mean * n + value.detach().to(mean.dtype)) / (n + 1))
        self.gate_count.add_(1)
