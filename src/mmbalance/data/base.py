"""Datasets as the trainer sees them: three splits of named modalities.

A dataset plugin (registered in ``DATASETS``) turns its files or generator
into a ``DataBundle``. In-memory data uses ``TensorDataset`` so that a batch
is one indexing operation rather than a Python loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .batch import Batch


class MultimodalDataset(Dataset):
    """A split: ``__getitem__`` gives ``{modality: tensor, 'label': int, 'index': int}``."""

    modalities: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TensorDataset(MultimodalDataset):
    """Modalities held as tensors in memory; batched fetches are vectorised."""

    def __init__(self, inputs: dict[str, Tensor], labels: Tensor, index: Tensor | None = None):
        n = int(labels.shape[0])
        for name, x in inputs.items():
            if int(x.shape[0]) != n:
                raise DataError(f"modality '{name}' has {x.shape[0]} samples but there are {n} labels")
        self.inputs = inputs
        self.labels = labels.long()
        self.index = torch.arange(n) if index is None else index.long()
        self.modalities = list(inputs)

    def __getitem__(self, i: int) -> dict:
        sample: dict[str, Any] = {m: x[i] for m, x in self.inputs.items()}
        sample["label"] = int(self.labels[i])
        sample["index"] = int(self.index[i])
        return sample

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(
            inputs={m: x[idx] for m, x in self.inputs.items()},
            labels=self.labels[idx],
            index=self.index[idx],
        )

    def subset(self, rows: np.ndarray | Tensor) -> "TensorDataset":
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return TensorDataset({m: x[idx] for m, x in self.inputs.items()}, self.labels[idx], self.index[idx])


@dataclass
class DataBundle:
    """The three splits of a dataset and what a model needs to know about it."""

    train: MultimodalDataset
    val: MultimodalDataset
    test: MultimodalDataset
    num_classes: int
    modalities: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor],
        labels: Tensor,
        rows: tuple,
        num_classes: int,
        class_names: list[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> "DataBundle":
        """Splits of in-memory data, from ``(train, val, test)`` row indices."""
        full = TensorDataset(tensors, labels)
        train, val, test = (full.subset(r) for r in rows)
        return cls(
            train=train,
            val=val,
            test=test,
            num_classes=num_classes,
            modalities=list(tensors),
            input_shapes={m: tuple(x.shape[1:]) for m, x in tensors.items()},
            class_names=class_names,
            info=info or {},
        )

    def split(self, name: str) -> MultimodalDataset:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split '{name}' (allowed: train, val, test)")
        return getattr(self, name)

    def validate(self) -> "DataBundle":
        """Fail early, with one line, on data a model cannot train on."""
        if len(self.modalities) < 2:
            raise DataError(
                f"a multimodal dataset needs at least 2 modalities, got {len(self.modalities)}: {self.modalities}"
            )
        if self.num_classes < 2:
            raise DataError(f"need at least 2 classes, got {self.num_classes}")
        for split in ("train", "val", "test"):
            data = getattr(self, split)
            if len(data) == 0:
                raise DataError(f"the {split} split is empty; check the data and the split fractions")
            labels = data.labels
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise DataError(
                    f"label {bad} in the {split} split is out of range (allowed: 0..{self.num_classes - 1})"
                )
            missing = [m for m in self.modalities if m not in data.modalities]
            if missing:
                raise DataError(f"the {split} split has no data for modality {missing[0]!r} (expected {self.modalities})")
        return self


def select_views(inputs: dict[str, Any], views: list[str] | None, dataset: str) -> list[str]:
    """Check a user's ``data.views`` against what a dataset has."""
    available = list(inputs)
    if views is None:
        return available
    if not isinstance(views, list) or not views:
        raise DataError(f"data.views must be a non-empty list of modality names (available: {', '.join(available)})")
    unknown = [v for v in views if v not in available]
    if unknown:
        raise DataError(f"dataset '{dataset}' has no modality '{unknown[0]}' (available: {', '.join(available)})")
    if len(set(views)) != len(views):
        raise DataError(f"data.views lists a modality twice: {views}")
    if len(views) < 2:
        raise DataError(f"data.views must name at least 2 modalities, got {views} (available: {', '.join(available)})")
    return list(views)


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise DataError(f"label {bad} in {source} is out of range (allowed: 0..{num_classes - 1})")
