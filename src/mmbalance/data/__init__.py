"""Datasets, batches, splits."""

from .base import DataBundle, MultimodalDataset, TensorDataset
from .batch import Batch, collate
from .loading import default_data_root, load_dataset
from . import synthetic  # noqa: F401  (registration)
from . import mfeat, npz  # noqa: F401
from . import benchmarks  # noqa: F401
from . import avdigits, mnist_hog  # noqa: F401

__all__ = ["Batch", "DataBundle", "MultimodalDataset", "TensorDataset", "collate", "default_data_root", "load_dataset"]
