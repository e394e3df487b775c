import importlib
import os

import pytest

from mmbalance.registry import METHODS

# Parts under development (or a user's own) join the registry-wide tests:
# MMBALANCE_IMPORT=my_parts pytest tests/test_contract.py
for _module in filter(None, os.environ.get("MMBALANCE_IMPORT", "").split(",")):
    importlib.import_module(_module.strip())

TINY = [
    "synthetic.num_samples=240",
    "synthetic.num_classes=4",
    "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]",
    "train.epochs=2",
    "train.batch_size=32",
    "model.feature_dim=8",
    "model.hidden_dim=16",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture
def register_part():
    """Register throwaway methods for one test; they are removed afterwards."""
    names = []

    def register(name):
        def decorator(cls):
            names.append(name)
            return METHODS.register(name)(cls)

        return decorator

    yield register
    for name in names:
        METHODS.unregister(name)
