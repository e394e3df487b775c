import pytest

from mmbalance.errors import UnknownNameError
from mmbalance.registry import DATASETS, ENCODERS, FUSIONS, METHODS, Registry


def test_register_get_and_list():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        """A round widget."""

    assert reg.get("round") is Round
    assert reg.names() == ["round"] and "round" in reg
    assert reg.describe("round") == "A round widget."
    with pytest.raises(ValueError):
        reg.register("round")(Round)


def test_typo_suggests_and_lists_allowed():
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'resnet81'; did you mean 'resnet18'\? \(allowed: cnn, mlp, resnet18"):
        ENCODERS.get("resnet81")


def test_builtin_components_are_registered():
    assert {"joint", "unimodal"} <= set(METHODS.names())
    assert {"synthetic", "mfeat", "npz"} <= set(DATASETS.names())
    assert set(FUSIONS.names()) == {"concat", "sum", "film", "gated"}
    assert METHODS.names("uni*") == ["unimodal"]
