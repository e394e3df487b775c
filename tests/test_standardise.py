"""One standardisation for every dataset: training statistics only, float features only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import RunConfig
from mmbalance.data import load_dataset
from mmbalance.data.mfeat import NUM_SAMPLES, VIEW_DIMS, csv_name
from mmbalance.data.standardise import STD_FLOOR, standardise

SAMPLES = 60
TRAIN = np.arange(0, 60, 2)


def test_numpy_per_feature_is_the_former_mfeat_formula_bit_for_bit():
    x = np.random.default_rng(0).normal(3.0, 7.0, size=(SAMPLES, 9))
    train = x[TRAIN]
    former = ((x - train.mean(axis=0)) / np.maximum(train.std(axis=0), STD_FLOOR)).astype(np.float32)
    assert np.array_equal(standardise(x, TRAIN).astype(np.float32), former)


def test_torch_modes_are_the_former_avdigits_formulas_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    bands = torch.randn(SAMPLES, 5, 7, generator=gen) * torch.arange(1, 6).view(1, 5, 1) + 2
    rows = torch.as_tensor(TRAIN)
    train = bands[rows]
    per_row = (bands - train.mean(dim=(0, 2), keepdim=True)) / train.std(dim=(0, 2), keepdim=True).clamp_min(STD_FLOOR)
    assert torch.equal(standardise(bands, TRAIN, per_channel=True, ddof=1), per_row)
    images = torch.rand(SAMPLES, 1, 4, 4, generator=gen)
    train = images[rows]
    overall = (images - train.mean()) / max(float(train.std()), STD_FLOOR)
    assert torch.equal(standardise(images, TRAIN, per_channel=False, ddof=1), overall)


def test_statistics_come_from_training_rows_and_constant_features_are_only_centred():
    x = np.random.default_rng(1).normal(size=(SAMPLES, 3))
    x[:, 2] = 5.0
    x[1, 2] = 6.0  # row 1 is not a training row: the feature is constant on the training split
    z = standardise(x, TRAIN)
    assert np.allclose(z[TRAIN].mean(axis=0), 0) and np.allclose(z[TRAIN, :2].std(axis=0), 1)
    assert z[1, 2] == 1.0 and (z[TRAIN, 2] == 0).all()  # centred, not blown up by a tiny spread


def test_per_channel_pools_the_trailing_axes():
    x = torch.randn(SAMPLES, 2, 3, 3, dtype=torch.float64) * torch.tensor([1.0, 50.0]).view(1, 2, 1, 1)
    z = standardise(x, TRAIN)
    train = z[torch.as_tensor(TRAIN)]
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(train.std(dim=(0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64))


# -- npz: on by default, training statistics only, never tokens --------------------------------------------


def npz_arrays(**changes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "audio": rng.normal(100.0, 20.0, size=(SAMPLES, 4)),
        "image": rng.normal(0.5, 0.1, size=(SAMPLES, 2, 3, 3)).astype(np.float32),
        "tokens": rng.integers(0, 50, size=(SAMPLES, 6)),
        "flags": rng.random((SAMPLES, 2)) > 0.5,
        "label": np.arange(SAMPLES) % 3,
        "split": np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10),
    }
    arrays.update(changes)
    return arrays


def load_npz(tmp_path, arrays, name="data.npz", **data):
    path = tmp_path / name
    np.savez(path, **arrays)
    return load_dataset(RunConfig({"data": {"name": "npz", "path": str(path), **data}}))


def test_npz_standardises_float_features_with_training_statistics(tmp_path):
    arrays = npz_arrays()
    bundle = load_npz(tmp_path, arrays)
    assert bundle.info["standardized"] == ["audio", "image"]
    audio = bundle.train.inputs["audio"].double()
    assert torch.allclose(audio.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(audio.std(dim=0, correction=0), torch.ones(4, dtype=torch.float64), atol=1e-5)
    raw = arrays["audio"].astype(np.float32).astype(np.float64)
    mean, std = raw[:40].mean(axis=0), raw[:40].std(axis=0)
    expected = (raw[50:] - mean) / std  # test rows, with the training split's statistics
    assert np.allclose(bundle.test.inputs["audio"].numpy(), expected, atol=1e-5)
    image = bundle.train.inputs["image"].double()
    assert torch.allclose(image.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)  # per channel


def test_npz_validation_and_test_values_do_not_leak_into_the_statistics(tmp_path):
    arrays = npz_arrays()
    before = load_npz(tmp_path, arrays, "before.npz")
    audio = arrays["audio"].copy()
    audio[40:] = audio[40:] * 1000 + 1e6  # every val and test value changed
    after = load_npz(tmp_path, npz_arrays(audio=audio), "after.npz")
    assert torch.equal(before.train.inputs["audio"], after.train.inputs["audio"])
    assert not torch.equal(before.test.inputs["audio"], after.test.inputs["audio"])


def test_npz_standardize_off_gives_raw_values(tmp_path):
    arrays = npz_arrays()
    bundle = load_npz(tmp_path, arrays, standardize=False)
    assert bundle.info["standardized"] == []
    assert torch.equal(bundle.train.inputs["audio"], torch.from_numpy(arrays["audio"][:40].astype(np.float32)))
    assert torch.equal(bundle.val.inputs["image"], torch.from_numpy(arrays["image"][40:50]))


def test_npz_token_and_boolean_inputs_are_untouched(tmp_path):
    arrays = npz_arrays()
    bundle = load_npz(tmp_path, arrays)
    assert bundle.train.inputs["tokens"].dtype == torch.int64
    assert torch.equal(bundle.train.inputs["tokens"], torch.from_numpy(arrays["tokens"][:40]))
    assert torch.equal(bundle.test.inputs["flags"], torch.from_numpy(arrays["flags"][50:].astype(np.float32)))


# -- mfeat honours data.standardize too (a small stand-in for its CSVs) -------------------------------------


def test_mfeat_standardize_off_gives_the_raw_features(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), NUM_SAMPLES // 10)
    raw = {}
    for view in ("fou", "mor"):
        raw[view] = np.round(rng.normal(10.0, 3.0, size=(NUM_SAMPLES, VIEW_DIMS[view])), 4)
        table = np.column_stack([raw[view], labels])
        header = ",".join([f"f{k}" for k in range(VIEW_DIMS[view])] + ["label"])
        np.savetxt(tmp_path / csv_name(view), table, delimiter=",", header=header, comments="", fmt="%.4f")
    config = {"name": "mfeat", "root": str(tmp_path), "views": ["fou", "mor"]}
    on = load_dataset(RunConfig({"data": config}))
    off = load_dataset(RunConfig({"data": {**config, "standardize": False}}))
    rows = off.train.index.numpy()
    assert torch.equal(off.train.inputs["mor"], torch.from_numpy(raw["mor"][rows].astype(np.float32)))
    train = raw["mor"][rows]
    expected = ((raw["mor"] - train.mean(axis=0)) / train.std(axis=0)).astype(np.float32)
    assert torch.equal(on.test.inputs["mor"], torch.from_numpy(expected[on.test.index.numpy()]))


def test_a_single_axis_is_refused():
    with pytest.raises(ValueError, match="at least one feature axis"):
        standardise(np.zeros(5), [0, 1])
