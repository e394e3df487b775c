"""Food-101 and MVSA-Single loaders on tiny fixtures in the MMBT/QMF jsonl layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import mmbalance.data  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.errors import DataError

SENTIMENTS = ["negative", "neutral", "positive"]
WORDS = {"negative": "awful sad day", "neutral": "a train timetable", "positive": "happy great day"}


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(path)


def make_mvsa(root, per_split=(3, 1, 1)):
    tweet = 0
    for split, count in zip(["train", "dev", "test"], per_split):
        lines = []
        for label in SENTIMENTS:
            for _ in range(count):
                write_image(root / "data" / f"{tweet}.jpg", seed=tweet)
                text = f"{WORDS[label]} #{split}{tweet}"
                lines.append(json.dumps({"id": str(tweet), "label": label, "text": text, "img": f"data/{tweet}.jpg"}))
                tweet += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def load(name, root, *extra):
    overrides = [f"data.root={root}", f"{name}.image_size=16", *extra]
    return load_dataset(build_config(overrides=overrides, dataset=name))


def test_mvsa_shapes_tokens_and_official_splits(tmp_path):
    make_mvsa(tmp_path)
    bundle = load("mvsa", tmp_path, "mvsa.max_length=6", "mvsa.min_count=2")
    assert bundle.modalities == ["image", "text"] and bundle.class_names == SENTIMENTS
    assert bundle.input_shapes == {"image": (3, 16, 16), "text": (6,)}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 3, 3)
    assert bundle.val.labels.tolist() == [0, 1, 2]
    sample = bundle.test[2]  # "happy great day #test14": words seen in train twice or more get ids
    tokens = sample["text"].tolist()
    assert sample["image"].shape == (3, 16, 16)
    assert tokens[:3] != [1, 1, 1] and 1 in tokens and tokens[-1] == 0  # '#'/test14 are <unk>, then padding
    assert bundle.info["vocabulary"] >= 8
    config = build_config(overrides=[f"data.root={tmp_path}"], dataset="mvsa")
    assert config.model.encoders == {"text": "text"} and config.model.encoder == "resnet18"


def test_food101_classes_and_errors(tmp_path):
    with pytest.raises(DataError, match=r"^food101 data not found: .* is not a folder \(expected ROOT/\{train,dev,test\}.jsonl"):
        load("food101", tmp_path / "nowhere")
    tmp_path.joinpath("train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"does not have the food101 layout: no dev.jsonl \(expected ROOT/\{train,dev,test\}.jsonl"):
        load("food101", tmp_path)
    dishes = ["apple_pie", "ramen"]
    for split in ("train", "dev", "test"):
        lines = []
        for d, dish in enumerate(dishes):
            for k in range(3 if split == "train" else 1):
                img = f"images/{split}/{dish}/{dish}_{k}.jpg"
                write_image(tmp_path / img, seed=d)
                lines.append(json.dumps({"text": f"recipe for {dish}", "img": img, "label": dish}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"^the food101 train list name 2 classes, expected 101"):
        load("food101", tmp_path)
    bundle = load("food101", tmp_path, "food101.num_classes=null")
    assert bundle.class_names == dishes and bundle.test.labels.tolist() == [0, 1]
    broken = tmp_path / "images/train/ramen/ramen_1.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"^cannot read image file .*ramen_1.jpg"):
        load("food101", tmp_path, "food101.num_classes=null")
    skipped = load("food101", tmp_path, "food101.num_classes=null", "data.on_error=skip")
    assert skipped.info["skipped"] == 1 and len(skipped.train) == 5
    (tmp_path / "test.jsonl").write_text('{"text": "x", "img": "a.jpg"}\n')
    with pytest.raises(DataError, match=r"test.jsonl line 1 lacks a string 'img', 'label' or 'text'"):
        load("food101", tmp_path, "food101.num_classes=null")


def test_mvsa_unknown_label(tmp_path):
    make_mvsa(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x", "img": "data/0.jpg", "label": "angry"}) + "\n")
    with pytest.raises(DataError, match=r"^the mvsa train list has label 'angry' \(allowed: negative, neutral, positive\)$"):
        load("mvsa", tmp_path)


def test_mvsa_trains_one_epoch_with_the_text_encoder(tmp_path):
    from mmbalance.training import train_run

    make_mvsa(tmp_path, per_split=(4, 1, 1))
    overrides = [f"data.root={tmp_path}", "mvsa.image_size=8", "mvsa.max_length=8", "model.encoder=cnn"]
    overrides += ["model.feature_dim=8", "model.hidden_dim=16", "train.epochs=1", "train.batch_size=6"]
    metrics = train_run(build_config(overrides=overrides, dataset="mvsa"), tmp_path / "run", quiet=True)
    assert metrics["modalities"] == ["image", "text"] and metrics["epochs"] == 1
