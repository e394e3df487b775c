"""The npz dataset: a good file round-trips, every kind of bad file fails with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import RunConfig
from mmbalance.data import load_dataset
from mmbalance.errors import DataError

SAMPLES = 60
CLASSES = 3


def good_arrays(**changes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.standard_normal((SAMPLES, 2, 4, 4)),
        "tokens": rng.integers(0, 100, size=(SAMPLES, 7)),
        "label": np.arange(SAMPLES) % CLASSES,
    }
    arrays.update(changes)
    return {name: value for name, value in arrays.items() if value is not None}


def write(tmp_path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def load(path: str | None, **options):
    raw = {"data": {"name": "npz", "path": path}, "npz": options}
    return load_dataset(RunConfig(raw))


def test_good_file_round_trips_shapes_labels_and_dtypes(tmp_path):
    arrays = good_arrays()
    # raw values (standardisation, on by default, is tested in test_standardise.py)
    bundle = load_dataset(RunConfig({"data": {"name": "npz", "path": write(tmp_path, **arrays), "standardize": False}}))
    assert bundle.modalities == ["image", "tokens"]
    assert bundle.input_shapes == {"image": (2, 4, 4), "tokens": (7,)}
    assert bundle.num_classes == CLASSES
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == SAMPLES
    assert (len(bundle.val), len(bundle.test)) == (9, 9)  # 15% of each class of 20, rounded
    assert bundle.train.inputs["image"].dtype == torch.float32
    assert bundle.train.inputs["tokens"].dtype == torch.int64
    rows = bundle.train.index.numpy()
    assert np.array_equal(bundle.train.labels.numpy(), arrays["label"][rows])
    assert np.allclose(bundle.train.inputs["image"].numpy(), arrays["image"][rows].astype(np.float32))
    assert np.array_equal(bundle.train.inputs["tokens"].numpy(), arrays["tokens"][rows])


def test_provided_split_is_honoured(tmp_path):
    split = np.array(["train"] * 40 + ["val"] * 8 + ["test"] * 12)
    bundle = load(write(tmp_path, **good_arrays(split=split)))
    assert "split" not in bundle.modalities
    assert np.array_equal(bundle.train.index.numpy(), np.arange(40))
    assert np.array_equal(bundle.val.index.numpy(), np.arange(40, 48))
    assert np.array_equal(bundle.test.index.numpy(), np.arange(48, 60))


def test_num_classes_option_and_views(tmp_path):
    arrays = good_arrays(audio=np.ones((SAMPLES, 5), dtype=np.float32))
    bundle = load(write(tmp_path, **arrays), num_classes=5)
    assert bundle.num_classes == 5
    assert bundle.modalities == ["image", "tokens", "audio"]
    raw = {"data": {"name": "npz", "path": write(tmp_path, **arrays), "views": ["audio", "image"]}}
    assert load_dataset(RunConfig(raw)).modalities == ["audio", "image"]


def test_path_not_set():
    with pytest.raises(DataError, match=r"^data.path is not set; the npz dataset reads one .npz file$"):
        load(None)


def test_file_missing(tmp_path):
    with pytest.raises(DataError, match="npz file not found: .*nothing.npz"):
        load(str(tmp_path / "nothing.npz"))


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated zip"])
def test_not_a_valid_npz(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="is not a valid .npz file"):
        load(str(path))


def test_single_npy_array_is_not_an_npz(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match="is not a valid .npz file"):
        load(str(path))


def test_no_label_array(tmp_path):
    with pytest.raises(DataError, match=r"has no 'label' array \(arrays: image, tokens\)"):
        load(write(tmp_path, **good_arrays(label=None)))


def test_fewer_than_two_modalities(tmp_path):
    path = write(tmp_path, **good_arrays(tokens=None, split=np.array(["train"] * SAMPLES)))
    with pytest.raises(DataError, match=r"needs at least 2 modality arrays .* found 1: \['image'\]"):
        load(path)


def test_modality_length_differs_from_labels(tmp_path):
    with pytest.raises(DataError, match="modality 'tokens' has 59 samples but 'label' has 60"):
        load(write(tmp_path, **good_arrays(tokens=np.zeros((SAMPLES - 1, 7), dtype=np.int64))))


@pytest.mark.parametrize(
    "label, message",
    [
        (np.full(SAMPLES, 0.5), "'label' .* must hold integers, got 0.5 at sample 0"),
        (np.array(["a"] * SAMPLES), "'label' .* must hold integers, got dtype <U1"),
    ],
)
def test_non_integer_labels(tmp_path, label, message):
    with pytest.raises(DataError, match=message):
        load(write(tmp_path, **good_arrays(label=label)))


def test_whole_float_labels_are_accepted(tmp_path):
    bundle = load(write(tmp_path, **good_arrays(label=(np.arange(SAMPLES) % CLASSES).astype(float))))
    assert bundle.train.labels.dtype == torch.int64


def test_negative_label(tmp_path):
    label = np.arange(SAMPLES) % CLASSES
    label[5] = -1
    with pytest.raises(DataError, match=r"label -1 in .* is out of range \(allowed: 0..2\)"):
        load(write(tmp_path, **good_arrays(label=label)))


def test_label_at_or_above_num_classes(tmp_path):
    with pytest.raises(DataError, match=r"label 2 in .* is out of range \(allowed: 0..1\)"):
        load(write(tmp_path, **good_arrays()), num_classes=2)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_modality_names_first_bad_sample(tmp_path, bad_value):
    image = np.zeros((SAMPLES, 2, 4, 4))
    image[17, 1, 2, 3] = bad_value
    image[30, 0, 0, 0] = bad_value
    with pytest.raises(DataError, match=r"^modality 'image' has non-finite values in sample 17$"):
        load(write(tmp_path, **good_arrays(image=image)))


def test_unknown_split_value(tmp_path):
    split = np.array(["train"] * 50 + ["dev"] * 5 + ["test"] * 5)
    with pytest.raises(DataError, match=r"'split' .* has value 'dev' at sample 50 \(allowed: train, val, test\)"):
        load(write(tmp_path, **good_arrays(split=split)))


def test_empty_split(tmp_path):
    split = np.array(["train"] * 50 + ["test"] * 10)
    with pytest.raises(DataError, match="the val split in .* is empty"):
        load(write(tmp_path, **good_arrays(split=split)))


def test_split_must_be_strings(tmp_path):
    with pytest.raises(DataError, match="'split' .* must hold the strings train, val or test"):
        load(write(tmp_path, **good_arrays(split=np.zeros(SAMPLES, dtype=np.int64))))
