"""MOSI and MOSEI from small pickles in the MulT layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import mmbalance.data  # noqa: F401
import mmbalance.models  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.errors import DataError
from mmbalance.training import train_run

COUNTS = {"train": 24, "valid": 8, "test": 8}
SHAPES = {"vision": (6, 5), "audio": (6, 4), "text": (6, 7)}


def mult_pickle(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in COUNTS.items():
        arrays = {m: rng.standard_normal((n, *shape)).astype(np.float32) for m, shape in shapes.items()}
        arrays["text"][:, :2] = 0.0  # left padding, as in the MulT files
        arrays["audio"][0, 3, 1] = -np.inf  # MOSEI's audio has -inf values
        arrays["labels"] = rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32)
        arrays["id"] = np.array([[f"{split}{k}", "0"] for k in range(n)])
        data[split] = arrays
    return data


def write(path, data):
    with open(path, "wb") as handle:
        pickle.dump(data, handle)


def load(name, *overrides):
    return load_dataset(build_config(overrides=list(overrides), dataset=name))


def test_mosi_aligned_binary(tmp_path):
    data = mult_pickle()
    write(tmp_path / "mosi_data.pkl", data)
    bundle = load("mosi", f"data.root={tmp_path}")
    assert bundle.modalities == ["audio", "vision", "text"]
    assert bundle.input_shapes == SHAPES | {}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 8, 8)
    scores = data["valid"]["labels"].reshape(-1)
    assert bundle.val.labels.tolist() == (scores >= 0).astype(int).tolist()
    assert bundle.num_classes == 2 and bundle.class_names == ["negative", "positive"]
    audio = bundle.train.inputs["audio"]
    assert torch.isfinite(audio).all() and audio[0, 3, 1] == 0
    assert bundle.test.index.tolist() == list(range(32, 40))


def test_mosei_unaligned_seven_classes_and_path(tmp_path):
    data = mult_pickle(shapes={"vision": (9, 5), "audio": (12, 4), "text": (6, 7)})
    data["test"]["labels"][:3, 0, 0] = [-3.0, 0.4, 2.6]
    write(tmp_path / "mosei_senti_data_noalign.pkl", data)
    bundle = load("mosei", f"data.root={tmp_path}", "mosei.aligned=false", "mosei.labels=7class")
    assert bundle.num_classes == 7 and bundle.test.labels[:3].tolist() == [0, 3, 6]
    assert bundle.input_shapes["audio"] == (12, 4)
    write(tmp_path / "elsewhere.pkl", data)
    views = load("mosei", f"data.path={tmp_path / 'elsewhere.pkl'}", "data.views=[text,audio]")
    assert views.modalities == ["text", "audio"]


def test_errors_name_the_file_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"^mosi pickle not found: .*mosi_data.pkl \(expected mosi_data.pkl or mosi_data_noalign.pkl in data.root"):
        load("mosi", f"data.root={tmp_path}")
    (tmp_path / "mosi_data.pkl").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^cannot read .*mosi_data.pkl: "):
        load("mosi", f"data.root={tmp_path}")
    write(tmp_path / "mosi_data.pkl", {"train": {}})
    with pytest.raises(DataError, match=r"mosi_data.pkl does not have the MulT layout \(expected .*train/valid/test, each with vision, audio, text"):
        load("mosi", f"data.root={tmp_path}")
    data = mult_pickle()
    del data["valid"]["audio"]
    write(tmp_path / "mosi_data.pkl", data)
    with pytest.raises(DataError, match=r"split 'valid' has no 'audio' array"):
        load("mosi", f"data.root={tmp_path}")
    data = mult_pickle()
    data["test"]["vision"] = data["test"]["vision"][:5]
    write(tmp_path / "mosi_data.pkl", data)
    with pytest.raises(DataError, match=r"'test/vision' has shape \(5, 6, 5\), expected \(8, T, D\) for 8 labels$"):
        load("mosi", f"data.root={tmp_path}")


def test_mosi_trains_one_epoch_with_transformers(tmp_path):
    write(tmp_path / "mosi_data.pkl", mult_pickle())
    overrides = [f"data.root={tmp_path}", "train.epochs=1", "model.feature_dim=8", "model.hidden_dim=16", "train.batch_size=8"]
    config = build_config(overrides=overrides, dataset="mosi")
    assert config.model.encoder == "transformer"
    metrics = train_run(config, tmp_path / "run", quiet=True)
    assert metrics["epochs"] == 1 and metrics["modalities"] == ["audio", "vision", "text"]
