import pytest

import mmbalance.data  # noqa: F401  (registries)
import mmbalance.methods  # noqa: F401
import mmbalance.models  # noqa: F401

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
