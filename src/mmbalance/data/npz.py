"""Bring your own data: one ``.npz`` file with an array per modality.

The file holds an integer ``label`` array, one array per modality (any other
name; first dimension = samples, any trailing shape) and optionally a
``split`` array of ``train``/``val``/``test`` strings. Without ``split`` the
samples are split by label like every other dataset. A 2-d ``label`` of 0/1
(samples x classes) makes the data multi-label: several classes per sample
(``tasks.py``), split by each sample's rarest label. Everything is checked
on load so that a bad file fails with one line instead of mid-training.

Float arrays are standardised with the training split's statistics
(``data.standardize``, on by default): each feature of a vector, each channel
of a ``(C, ...)`` array, on its own. Integer arrays (token ids) and booleans
are never touched.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pydantic import Field

from ..config import Section
from ..errors import DataError
from ..registry import DATASETS
from ..tasks import stratification_key
from .base import DataBundle, check_labels, infer_num_classes, multi_label_rows, select_views
from .loading import split_seed
from .splits import train_val_test
from .standardise import fit_standardisation

RESERVED = ("label", "split")
SPLITS = ("train", "val", "test")


ZIP_MAGIC = b"PK\x03\x04"
# Deflate expands at most about 1032-fold, so a member claiming more than that is lying about its size.
DEFLATE_RATIO = 1032


def _array_header(member, version: tuple[int, int]) -> tuple[tuple[int, ...], np.dtype]:
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:  # 3.0 (utf-8 field names) has no public reader
        shape, _, dtype = np.lib.format._read_array_header(member, version)
    return shape, dtype


def check_members(path: Path) -> None:
    """Refuse, before anything is allocated, an array that declares more data than its member holds.

    numpy allocates an array's declared shape before reading its data, so a
    few bytes declaring shape (300, 10**12) would end in MemoryError instead
    of a line. The bound is the member's uncompressed size, itself capped by
    its compressed size (stored: equal; deflated: at most 1032 times), which
    must lie within the file: sizes in a zip's directory can be forged too.
    """
    on_disk = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # bzip2 and lzma have no useful bound on expansion; numpy never writes them
                raise DataError(
                    f"array '{name}' in {path} uses zip compression method {info.compress_type}; "
                    "save with np.savez or np.savez_compressed (stored or deflated)"
                )
            with archive.open(info) as member:
                try:
                    shape, dtype = _array_header(member, np.lib.format.read_magic(member))
                    header = member.tell()
                except (ValueError, KeyError, TypeError, SyntaxError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise DataError(f"member '{info.filename}' of {path} is not a .npy array: {reason}") from None
            if dtype.hasobject:
                raise DataError(
                    f"array '{name}' in {path} holds Python objects, which mmbalance never unpickles; save numbers"
                )
            declared = math.prod(shape) * dtype.itemsize
            if info.compress_type == zipfile.ZIP_STORED:
                room = min(info.file_size, info.compress_size)
            else:
                room = min(info.file_size, info.compress_size * DEFLATE_RATIO)
            if info.compress_size > on_disk or declared > room - header:
                raise DataError(
                    f"array '{name}' in {path} declares shape {shape} of {dtype} ({declared:,} bytes), "
                    f"more than its {max(room - header, 0):,} bytes of data; the file is corrupt or forged"
                )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file, loaded now so that a corrupt member fails here."""
    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        if is_zip:
            check_members(path)
        # mmap: a single .npy is only looked at, not read, before it is refused
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is not a valid .npz file (it holds a single array; save with np.savez)")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
            NotImplementedError, RuntimeError) as exc:  # zipfile's ways of saying "corrupt"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a valid .npz file: {reason}") from None
    except MemoryError:
        raise DataError(f"{path} holds more data than fits in memory") from None


def integer_labels(label: np.ndarray, path: Path) -> np.ndarray:
    """Labels as int64; whole-valued floats are accepted, anything else is refused."""
    if label.ndim != 1:
        raise DataError(
            f"'label' in {path} must be 1-d (one class per sample) or 2-d (0/1 per class, multi-label), got shape {label.shape}"
        )
    if np.issubdtype(label.dtype, np.integer):
        return label.astype(np.int64)
    if np.issubdtype(label.dtype, np.floating):
        whole = np.isfinite(label) & (label == np.round(label))
        if whole.all():
            return label.astype(np.int64)
        first = int(np.flatnonzero(~whole)[0])
        raise DataError(f"'label' in {path} must hold integers, got {label[first]} at sample {first}")
    raise DataError(f"'label' in {path} must hold integers, got dtype {label.dtype}")


def modality_tensor(name: str, array: np.ndarray, count: int) -> torch.Tensor:
    """Floats become float32 features, integers (e.g. token ids) stay int64."""
    if array.ndim == 0 or array.shape[0] != count:
        length = "a scalar" if array.ndim == 0 else f"{array.shape[0]} samples"
        raise DataError(f"modality '{name}' has {length} but 'label' has {count}")
    if array.ndim == 1:
        array = array[:, None]  # one feature per sample
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(array.astype(np.int64))
    if array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.floating):
        features = array.astype(np.float32)  # checked after the cast: float64 beyond float32's range becomes inf
        finite = np.isfinite(features).reshape(count, -1).all(axis=1)
        if not finite.all():
            raise DataError(f"modality '{name}' has non-finite values in sample {int(np.flatnonzero(~finite)[0])}")
        return torch.from_numpy(features)
    raise DataError(f"modality '{name}' has dtype {array.dtype}; expected numbers (floats or integers)")


def split_rows(split: np.ndarray, count: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, val and test parts named by the file's ``split`` array."""
    if split.ndim != 1 or split.shape[0] != count:
        raise DataError(f"'split' in {path} must be 1-d with one entry per sample ({count}), got shape {split.shape}")
    if split.dtype.kind == "S":
        split = np.char.decode(split, "utf-8")
    if split.dtype.kind != "U":
        raise DataError(f"'split' in {path} must hold the strings train, val or test, got dtype {split.dtype}")
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        value = str(split[first])
        raise DataError(f"'split' in {path} has value {value!r} at sample {first} (allowed: train, val, test)")
    parts = tuple(np.flatnonzero(split == name) for name in SPLITS)
    for name, rows in zip(SPLITS, parts):
        if rows.size == 0:
            raise DataError(f"the {name} split in {path} is empty; 'split' must name every one of train, val, test")
    return parts


@DATASETS.register("npz")
class NpzDataset:
    """Your own data: one .npz file with an array per modality, 'label' and an optional 'split'."""

    class Config(Section):
        num_classes: Optional[int] = Field(
            None, ge=2, description="number of classes; default max label + 1 (multi-label: the label's columns, checked)"
        )

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("npz")
        if not config.data.path:
            raise DataError("data.path is not set; the npz dataset reads one .npz file")
        path = Path(config.data.path).expanduser()
        if not path.is_file():
            raise DataError(f"npz file not found: {path}")
        arrays = read_npz(path)
        if "label" not in arrays:
            raise DataError(f"{path} has no 'label' array (arrays: {', '.join(arrays) or 'none'})")
        multi_label = arrays["label"].ndim == 2
        if multi_label:  # one 0/1 row per sample
            labels = multi_label_rows(np.asarray(arrays["label"]), f"'label' of {path}").numpy()
        else:
            labels = integer_labels(arrays["label"], path)
        count = labels.shape[0]
        if count == 0:
            raise DataError(f"{path} has no samples ('label' is empty)")
        modalities = {name: array for name, array in arrays.items() if name not in RESERVED}
        if len(modalities) < 2:
            raise DataError(
                f"{path} needs at least 2 modality arrays besides 'label' and 'split', "
                f"found {len(modalities)}: {list(modalities)}"
            )
        if multi_label:
            num_classes = labels.shape[1]
            if options.num_classes is not None and options.num_classes != num_classes:
                raise DataError(
                    f"npz.num_classes={options.num_classes} but the multi-label 'label' of {path} has {num_classes} columns"
                )
        elif options.num_classes is not None:
            num_classes = options.num_classes
        else:
            num_classes = infer_num_classes(labels, f"'label' of {path}", "npz.num_classes")
        if not multi_label:
            check_labels(labels, num_classes, str(path))
        views = select_views(modalities, config.data.views, "npz")
        tensors = {name: modality_tensor(name, modalities[name], count) for name in views}
        if "split" in arrays:
            train, val, test = split_rows(arrays["split"], count, path)
        else:
            strata = stratification_key(labels)
            train, val, test = train_val_test(strata, config.data.val_fraction, config.data.test_fraction, split_seed(config))
        # float arrays only: integers are token ids or counts, booleans indicators, both kept as they are
        scaled = [name for name in views if config.data.standardize and np.issubdtype(modalities[name].dtype, np.floating)]
        # float64 statistics of the float32 values, so large offsets keep their precision
        fitted = {name: fit_standardisation(tensors[name].double(), train) for name in scaled}
        for name in scaled:
            tensors[name] = fitted[name](tensors[name].double()).float()
        return DataBundle.from_tensors(
            tensors,
            torch.from_numpy(labels),
            (train, val, test),
            num_classes,
            info={"path": str(path), "split": "file" if "split" in arrays else "stratified", "standardized": scaled},
            standardisation=fitted,
        )
