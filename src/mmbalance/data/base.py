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
from ..tasks import MULTI_LABEL, SINGLE_LABEL, is_multi_label, stratification_key, task_of
from .batch import Batch


class MultimodalDataset(Dataset):
    """A split: ``__getitem__`` gives ``{modality: tensor, 'label': int, 'index': int}``.

    On multi-label data (``tasks.py``) ``labels`` is [N, C] of 0/1 (float32)
    and a sample's ``'label'`` is its row.
    """

    modalities: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def input_dtype(self, modality: str) -> torch.dtype | None:
        """What a modality's samples hold (token ids or float features), from the first sample; None if unknown."""
        try:
            return torch.as_tensor(self[0][modality]).dtype
        except Exception:  # a sample that cannot be read fails later, with its own error, where it is used
            return None


class TensorDataset(MultimodalDataset):
    """Modalities held as tensors in memory; batched fetches are vectorised.

    ``labels``: class ids [N] (kept as int64) or multi-label rows [N, C] (kept as float32 0/1).
    """

    def __init__(self, inputs: dict[str, Tensor], labels: Tensor, index: Tensor | None = None):
        n = int(labels.shape[0])
        for name, x in inputs.items():
            if int(x.shape[0]) != n:
                raise DataError(f"modality '{name}' has {x.shape[0]} samples but there are {n} labels")
        self.inputs = inputs
        self.labels = labels.float() if is_multi_label(labels) else labels.long()
        self.index = torch.arange(n) if index is None else index.long()
        self.modalities = list(inputs)

    def input_dtype(self, modality: str) -> torch.dtype:
        return self.inputs[modality].dtype

    def __getitem__(self, i: int) -> dict:
        sample: dict[str, Any] = {m: x[i] for m, x in self.inputs.items()}
        sample["label"] = self.labels[i] if is_multi_label(self.labels) else int(self.labels[i])
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


class SubsetDataset(MultimodalDataset):
    """Some rows of another split (a held-out carve), keeping the samples' own indices."""

    def __init__(self, base: MultimodalDataset, rows: np.ndarray | Tensor):
        self.base = base
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        self.labels = base.labels[self.rows]
        self.modalities = list(base.modalities)

    def input_dtype(self, modality: str) -> torch.dtype:
        return self.base.input_dtype(modality)

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.rows[i])]

    def __getitems__(self, indices: list[int]):
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)].tolist()
        if hasattr(self.base, "__getitems__"):
            return self.base.__getitems__(rows)
        return [self.base[r] for r in rows]


def carve(dataset: MultimodalDataset, fraction: float, seed: int) -> tuple[MultimodalDataset, MultimodalDataset]:
    """(rest, carved): a stratified ``fraction`` of ``dataset`` set apart, the same for every method of a seed."""
    from .splits import stratified_split

    carved, rest = stratified_split(stratification_key(dataset.labels.numpy()), (fraction,), seed)
    if len(carved) == 0 or len(rest) == 0:
        raise DataError(
            f"data.heldout_fraction={fraction} of {len(dataset)} training samples leaves an empty part; choose another fraction"
        )
    return SubsetDataset(dataset, rest), SubsetDataset(dataset, carved)


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
    # int64 for token ids, float32 for features; filled by ``validate`` where a loader leaves it out.
    input_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    # per standardised modality, the training statistics (``data/standardise.py``): stored with the
    # run's best checkpoint so that ``mmbalance predict`` transforms new inputs the same way
    standardisation: dict[str, Any] = field(default_factory=dict)
    # single_label (labels [N] of class ids) or multi_label (labels [N, num_classes] of 0/1): ``tasks.py``
    task: str = SINGLE_LABEL

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor | np.ndarray],
        labels: Tensor | np.ndarray,
        rows: tuple | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        info: dict[str, Any] | None = None,
        *,
        standardisation: dict[str, Any] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> "DataBundle":
        """Splits of in-memory data: one tensor (or array) per modality, first dimension = samples.

        ``labels``: one class id per sample ([N]), or for multi-label data one
        row of 0/1 per sample ([N, C], C classes; several may be on).
        ``rows`` gives the ``(train, val, test)`` row indices; without it a
        stratified split with the given fractions is drawn from ``seed``.
        ``num_classes`` defaults to the largest label + 1 (the number of
        columns for multi-label rows). ``standardisation``: the
        ``Standardisation`` each standardised modality went through.
        """
        from .splits import train_val_test

        tensors = {m: _as_tensor(m, x) for m, x in tensors.items()}
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        if labels.ndim == 2:
            labels = multi_label_rows(labels.cpu().numpy(), "the labels given to DataBundle.from_tensors")
            if num_classes is None:
                num_classes = int(labels.shape[1])
        elif labels.ndim != 1:
            raise DataError(
                f"labels must be 1-d (one class per sample) or 2-d (one 0/1 row per sample, multi-label), "
                f"got shape {tuple(labels.shape)}"
            )
        else:
            labels = labels.long()
        if num_classes is None:
            source = "the labels given to DataBundle.from_tensors"
            num_classes = infer_num_classes(labels.numpy(), source, "num_classes")
        if rows is None:
            rows = train_val_test(stratification_key(labels.numpy()), val_fraction, test_fraction, seed)
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
            input_dtypes={m: x.dtype for m, x in tensors.items()},
            standardisation=dict(standardisation or {}),
            task=task_of(labels),
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
        if self.task not in (SINGLE_LABEL, MULTI_LABEL):
            raise DataError(f"unknown task '{self.task}' (allowed: {SINGLE_LABEL}, {MULTI_LABEL})")
        for m in self.modalities:
            shape = tuple(self.input_shapes.get(m, ()))
            if 0 in shape:
                # Nothing to learn from, and an encoder over zero inputs trains silently on its bias.
                raise DataError(
                    f"modality '{m}' has samples of shape {shape}, which hold no values "
                    "(every sample needs at least one feature)"
                )
        for split in ("train", "val", "test"):
            data = getattr(self, split)
            if len(data) == 0:
                raise DataError(f"the {split} split is empty; check the data and the split fractions")
            if self.task == MULTI_LABEL:
                check_multi_label_split(data.labels, self.num_classes, split)
            else:
                check_class_ids(data.labels, self.num_classes, split)
            missing = [m for m in self.modalities if m not in data.modalities]
            if missing:
                raise DataError(f"the {split} split has no data for modality {missing[0]!r} (expected {self.modalities})")
        infer = getattr(self.train, "input_dtype", None)  # absent on a plain torch Dataset
        for m in self.modalities:
            if m not in self.input_dtypes and infer is not None and (dtype := infer(m)) is not None:
                self.input_dtypes[m] = dtype
        return self


def _as_tensor(name: str, values: Tensor | np.ndarray) -> Tensor:
    """Floats as float32 features, integers (token ids) as int64; a 1-d array is one feature per sample."""
    x = values if isinstance(values, Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    if x.ndim == 0:
        raise DataError(f"modality '{name}' is a scalar; expected one row per sample")
    if x.ndim == 1:
        x = x[:, None]
    if x.is_floating_point() or x.dtype == torch.bool:
        return x.float()
    if x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return x.long()
    raise DataError(f"modality '{name}' has dtype {x.dtype}; expected numbers (floats or integers)")


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


# Beyond this many classes, a largest label far above the number of distinct labels is a labelling
# mistake (ids not renumbered 0..C-1), and the classifier heads would need absurd memory.
MAX_SPARSE_CLASSES = 1000
SPARSE_FACTOR = 100


def infer_num_classes(labels: np.ndarray, source: str, option: str) -> int:
    """The largest label + 1, refused when it is far beyond what the labels present support."""
    if labels.size == 0:
        return 0
    num_classes = int(labels.max()) + 1
    if num_classes > MAX_SPARSE_CLASSES:
        distinct = int(np.unique(labels).size)
        if num_classes > SPARSE_FACTOR * distinct:
            raise DataError(
                f"the largest label in {source} is {num_classes - 1} but only {distinct} distinct labels occur, "
                f"which would make {num_classes} classes; relabel the classes 0..C-1 or set {option}"
            )
    return num_classes


def multi_label_rows(labels: np.ndarray, source: str) -> Tensor:
    """Multi-label rows [N, C] as float32 0/1, refusing anything but 0 and 1 (booleans and whole numbers pass)."""
    if labels.ndim != 2:
        raise DataError(f"multi-label labels in {source} must be 2-d (samples x classes), got shape {labels.shape}")
    if labels.shape[1] < 2:
        raise DataError(f"multi-label labels in {source} have {labels.shape[1]} column; need at least 2 classes")
    if labels.dtype == np.bool_:
        return torch.from_numpy(labels.astype(np.float32))
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"multi-label labels in {source} must hold 0 and 1, got dtype {labels.dtype}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        row, column = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"multi-label labels in {source} must hold 0 and 1, got {labels[row, column]} at sample {row}, class {column}"
        )
    return torch.from_numpy(labels.astype(np.float32))


def check_class_ids(labels: Tensor, num_classes: int, split: str) -> None:
    """One class id in 0..num_classes-1 per sample, or one line saying what is wrong."""
    if labels.ndim != 1:
        raise DataError(
            f"the {split} split has labels of shape {tuple(labels.shape)}, but the dataset is single-label "
            "(one class id per sample)"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"label {bad} in the {split} split is out of range (allowed: 0..{num_classes - 1})")


def check_multi_label_split(labels: Tensor, num_classes: int, split: str) -> None:
    """One 0/1 row of ``num_classes`` per sample, or one line saying what is wrong."""
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(
            f"the {split} split has labels of shape {tuple(labels.shape)}, expected (samples, {num_classes}) "
            "rows of 0/1 for multi-label data"
        )
    if not ((labels == 0) | (labels == 1)).all():
        raise DataError(f"the {split} split has multi-label labels other than 0 and 1")


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise DataError(f"label {bad} in {source} is out of range (allowed: 0..{num_classes - 1})")
