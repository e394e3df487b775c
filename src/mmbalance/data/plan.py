"""An epoch plan: which training samples an epoch visits, and which of their modalities it keeps.

Data-level methods (SMV, BASELINES §1.4.4) re-sample the training set:
the next epoch visits every sample once plus extra copies in which only a
weak modality is kept. A part returns an :class:`EpochPlan` from
``epoch_plan(model, ctx)``; the trainer then iterates :class:`PlannedDataset`
for that epoch, shuffled and sharded like the plain training set, and each
batch carries ``keep`` (B × M booleans). Objectives that honour it zero the
features of the modalities a copy does not keep before fusing
(``Objective.encode_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import MultimodalDataset
from .batch import Batch, collate


@dataclass
class EpochPlan:
    """``rows``: positions in the training set (repeats allowed); ``keep``: rows × modalities, or None (all kept)."""

    rows: Tensor
    keep: Tensor | None = None

    def check(self, size: int, modalities: int) -> "EpochPlan":
        """Refuse a plan that would index outside the training set or mismatch the modalities."""
        rows = torch.as_tensor(self.rows, dtype=torch.long).reshape(-1)
        if rows.numel() == 0:
            raise ValueError("an epoch plan must visit at least one sample")
        if int(rows.min()) < 0 or int(rows.max()) >= size:
            raise ValueError(f"epoch plan rows must lie in [0, {size}), got [{int(rows.min())}, {int(rows.max())}]")
        keep = self.keep
        if keep is not None:
            keep = torch.as_tensor(keep, dtype=torch.bool)
            if keep.shape != (rows.numel(), modalities):
                raise ValueError(f"epoch plan keep must have shape ({rows.numel()}, {modalities}), got {tuple(keep.shape)}")
        return EpochPlan(rows.cpu(), None if keep is None else keep.cpu())


class PlannedDataset(MultimodalDataset):
    """The training set as one epoch's plan visits it; batches carry the plan's ``keep``."""

    def __init__(self, base: MultimodalDataset, plan: EpochPlan):
        self.base = base
        self.rows = plan.rows
        self.keep = plan.keep

    def __len__(self) -> int:
        return int(self.rows.numel())

    def input_dtype(self, modality: str) -> torch.dtype | None:
        return self.base.input_dtype(modality)

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.rows[i])]

    def __getitems__(self, positions: list[int]) -> Batch:
        rows = self.rows[torch.as_tensor(positions, dtype=torch.long)].tolist()
        if hasattr(self.base, "__getitems__"):
            batch = self.base.__getitems__(rows)
            batch = batch if isinstance(batch, Batch) else collate(batch)
        else:
            batch = collate([self.base[r] for r in rows])
        if self.keep is not None:
            batch.keep = self.keep[torch.as_tensor(positions, dtype=torch.long)]
        return batch
