"""Shared machinery of the file-based benchmark loaders.

Real benchmarks are too large to hold in memory, so a split is a list of
records (the paths of one sample's files) read on demand. Every record is
checked when the dataset loads, so a missing or unreadable file fails (or is
skipped, with ``data.on_error=skip``) before training starts instead of in
the middle of an epoch.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from ...config import Section
from ...errors import DataError
from ..base import DataBundle, MultimodalDataset, select_views
from ..loading import split_seed
from ..splits import stratified_split

Reader = Callable[[dict], torch.Tensor]


# The field's common settings (OGM-GE, MIDAS, CAL): SGD 1e-3, batch 64, ResNet-18 encoders.
RESNET_SGD_DEFAULTS = {
    "train.epochs": 100,
    "train.batch_size": 64,
    "train.optimizer": "sgd",
    "train.lr": 1e-3,
    "train.momentum": 0.9,
    "train.weight_decay": 1e-4,
    "model.encoder": "resnet18",
    "model.feature_dim": 512,
}


class FileConfig(Section):
    """Options every file-based benchmark shares."""

    check: Literal["header", "decode"] = Field(
        "header",
        description="load-time check of each file: header (exists and its header parses; fast) "
        "or decode (read every sample once; slow but catches truncated files)",
    )


class FileDataset(MultimodalDataset):
    """A split read lazily: ``records[i]`` holds the paths that ``readers`` turn into tensors."""

    def __init__(self, records: list[dict], readers: dict[str, Reader], labels: Sequence[int], index: Sequence[int]):
        self.records = records
        self.readers = readers
        self.modalities = list(readers)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.index = torch.as_tensor(np.asarray(index, dtype=np.int64))

    def input_dtype(self, modality: str) -> torch.dtype:
        """A reader's declared ``dtype`` (token readers: int64); media readers give float32 features."""
        return getattr(self.readers[modality], "dtype", torch.float32)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        sample: dict[str, Any] = {m: read(record) for m, read in self.readers.items()}
        sample["label"] = int(self.labels[i])
        sample["index"] = int(self.index[i])
        return sample


def require_dir(root: Path, name: str, layout: str) -> None:
    if not root.is_dir():
        raise DataError(f"{name} data not found: {root} is not a folder (expected {layout}; set data.root)")


def first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    return None


def read_numbered_rows(path: Path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-empty row of a list file, fields stripped.

    The numbers are the file's own, so an error can point at the line to fix.
    """
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            for row in reader:
                fields = [field.strip() for field in row]
                if any(fields):
                    rows.append((reader.line_num, fields))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return rows


def read_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    """Non-empty rows of a list file, fields stripped."""
    return [row for _, row in read_numbered_rows(path, delimiter)]


def inside_root(root: Path, entry: str, source: Path, line: int, base: Path | None = None) -> Path:
    """``base / entry`` (``base`` defaults to ``root``) for a path that a list file names.

    A list file is data: its entries must not make mmbalance read files
    outside the data folder. An absolute entry or one with a ``..`` part
    (``/`` and ``\\`` both separate parts) is refused, naming the list file
    and the line. The check is on the entry's text, not on resolved symlinks,
    so that media folders linked from another disk keep working, and without
    ``..`` a symlink in the folder cannot be climbed out of.
    """
    try:
        where = f"{source.relative_to(root)} line {line}"
    except ValueError:
        where = f"{source} line {line}"
    if "\x00" in entry:
        raise DataError(f"{where}: path {entry!r} has a NUL character, which no file name may hold")
    parts = entry.replace("\\", "/").split("/")
    if PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).anchor or ".." in parts:
        raise DataError(
            f"{where}: path {entry!r} leaves the data folder {root} (list paths must be relative, without '..')"
        )
    return (root if base is None else base) / entry


def class_index(names: Sequence[str], expected: int | None, source: str, option: str) -> dict[str, int]:
    """Sorted class names -> ids, checking the count a benchmark is known to have."""
    classes = sorted(set(names))
    if expected is not None and len(classes) != expected:
        raise DataError(
            f"{source} name {len(classes)} classes, expected {expected} (set {option}=null to accept any number)"
        )
    return {name: k for k, name in enumerate(classes)}


def carve_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` rows: a stratified, seeded validation part for benchmarks without an official one."""
    val, train = stratified_split(labels, (fraction,), seed)
    return train, val


class Checker:
    """Applies ``data.on_error`` to records with a bad file and counts the skips."""

    def __init__(self, on_error: str, mode: str, readers: dict[str, Reader], probes: dict[str, Callable[[dict], None]]):
        self.on_error = on_error
        self.mode = mode
        self.readers = readers
        self.probes = probes
        self.skipped: list[str] = []

    def keep(self, record: dict) -> bool:
        try:
            for modality in self.readers:
                if self.mode == "decode":
                    self.readers[modality](record)
                else:
                    self.probes[modality](record)
        except DataError as exc:
            if self.on_error == "raise":
                raise
            self.skipped.append(str(exc))
            return False
        return True

    def filter(self, records: list[dict]) -> list[dict]:
        return [r for r in records if self.keep(r)]

    def info(self) -> dict:
        return {"skipped": len(self.skipped), "skipped_examples": self.skipped[:5]}


def bundle_from_records(
    config,
    name: str,
    splits: dict[str, list[dict]],
    readers: dict[str, Reader],
    probes: dict[str, Callable[[dict], None]],
    input_shapes: dict[str, tuple[int, ...]],
    class_names: list[str],
    info: dict,
) -> DataBundle:
    """Check every record, apply ``data.views`` and build the three lazy splits.

    ``splits`` has ``train`` and ``test`` and, where the benchmark ships one,
    ``val``; without it a stratified part of train becomes validation.
    Each record carries its ``label``.
    """
    views = select_views(readers, config.data.views, name)
    readers = {m: readers[m] for m in views}
    checker = Checker(config.data.on_error, config.section(name).check, readers, probes)
    kept = {split: checker.filter(records) for split, records in splits.items()}
    if "val" not in kept:
        train = kept["train"]
        labels = np.array([r["label"] for r in train], dtype=np.int64)
        rows_train, rows_val = carve_val(labels, config.data.val_fraction, split_seed(config))
        kept["train"] = [train[k] for k in rows_train]
        kept["val"] = [train[k] for k in rows_val]
        info = {**info, "val": "carved from train"}
    datasets = {}
    offset = 0
    for split in ("train", "val", "test"):
        records = kept[split]
        labels = [r["label"] for r in records]
        datasets[split] = FileDataset(records, readers, labels, range(offset, offset + len(records)))
        offset += len(records)
    return DataBundle(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        num_classes=len(class_names),
        modalities=views,
        input_shapes={m: input_shapes[m] for m in views},
        class_names=list(class_names),
        info={**info, **checker.info()},
    )
