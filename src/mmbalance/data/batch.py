"""The unit every method sees: named modalities plus labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """``inputs`` maps modality name -> tensor with the batch in dimension 0.

    ``labels``: class ids [B] (int64), or [B, C] rows of 0/1 (float32) on multi-label data.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    index: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    weight: Tensor | None = None  # per-sample loss weights a plugin may set before the step
    keep: Tensor | None = None  # B × M booleans from an epoch plan: the modalities each sample keeps

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            inputs={m: x.to(device, non_blocking=non_blocking) for m, x in self.inputs.items()},
            labels=self.labels.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
            extras={
                k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
                for k, v in self.extras.items()
            },
            weight=None if self.weight is None else self.weight.to(device, non_blocking=non_blocking),
            keep=None if self.keep is None else self.keep.to(device, non_blocking=non_blocking),
        )


def collate(samples: list[dict]) -> Batch:
    """Stack per-sample dicts ``{modality..., 'label', 'index'}`` into a Batch (a class id or a 0/1 row per label)."""
    first = samples[0]
    modalities = [k for k in first if k not in ("label", "index")]
    inputs = {m: torch.stack([torch.as_tensor(s[m]) for s in samples]) for m in modalities}
    if torch.as_tensor(first["label"]).ndim == 0:
        labels = torch.as_tensor([int(s["label"]) for s in samples], dtype=torch.long)
    else:  # multi-label: one 0/1 row per sample
        labels = torch.stack([torch.as_tensor(s["label"], dtype=torch.float32) for s in samples])
    index = torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return Batch(inputs=inputs, labels=labels, index=index)


def collate_batch(batch: Batch | list) -> Batch:
    """Collate for datasets whose ``__getitems__`` already returns a Batch."""
    return batch if isinstance(batch, Batch) else collate(batch)
