"""From a run config to validated splits, whatever the dataset."""

from __future__ import annotations

import os
from pathlib import Path

from ..registry import DATASETS
from .base import DataBundle


def default_data_root(name: str) -> Path:
    """Where fetched datasets live: ``$MMBALANCE_DATA/NAME``, else ``~/.cache/mmbalance/NAME``."""
    base = os.environ.get("MMBALANCE_DATA")
    root = Path(base) if base else Path.home() / ".cache" / "mmbalance"
    return root / name


def data_root(config, name: str) -> Path:
    """``data.root`` if set, else the default data folder of ``name``."""
    return Path(config.data.root).expanduser() if config.data.root else default_data_root(name)


def split_seed(config) -> int:
    """The seed of the train/val/test split: ``data.split_seed``, else the run seed."""
    return config.seed if config.data.split_seed is None else config.data.split_seed


def load_dataset(config) -> DataBundle:
    """Build the dataset a ``RunConfig`` names and check it, and the encoders' fit to it, before any training."""
    plugin = DATASETS.get(config.data.name)
    bundle = plugin.load(config).validate()
    check_encoders(config.model, bundle)
    return bundle


def check_encoders(model_config, bundle: DataBundle) -> None:
    """Each modality's encoder reads what the modality holds: token ids or float features."""
    from ..models.encoders import check_encoder_input  # models import data; imported here to avoid a cycle

    for m in bundle.modalities:
        name = model_config.encoders.get(m, model_config.encoder)
        if m in bundle.input_dtypes:
            check_encoder_input(name, m, bundle.input_dtypes[m])
