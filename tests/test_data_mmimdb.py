"""MM-IMDB on a tiny fixture written in the public release's layout (split.json, dataset/<id>.json and .jpeg)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import mmbalance.data  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.data.benchmarks.mmimdb import GENRES
from mmbalance.errors import DataError

MOVIES = {
    # id: (plot, genres)
    "0000001": (["a lonely detective hunts a killer", "second summary"], ["Crime", "Thriller"]),
    "0000002": (["two friends laugh and fall in love"], ["Comedy", "Romance"]),
    "0000003": ("a killer in the dark house", ["Horror", "Thriller", "Reality-TV"]),
    "0000004": (["friends laugh at a wedding"], ["Comedy"]),
    "0000005": (["a detective and a spy"], ["Crime", "Drama"]),
    "0000006": (["love in the war"], ["Romance", "War", "Drama"]),
}
SPLIT = {"train": ["0000001", "0000002", "0000003", "0000004"], "dev": ["0000005"], "test": ["0000006"]}


def make_mmimdb(root, movies=MOVIES, split=SPLIT):
    folder = root / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (movie, (plot, genres)) in enumerate(movies.items()):
        (folder / f"{movie}.json").write_text(json.dumps({"title": movie, "plot": plot, "genres": genres}))
        pixels = np.random.default_rng(k).integers(0, 255, (14, 9, 3), dtype=np.uint8)  # posters are tall
        Image.fromarray(pixels).save(folder / f"{movie}.jpeg")
    (root / "split.json").write_text(json.dumps(split))


def load(root, *extra):
    return load_dataset(build_config(overrides=[f"data.root={root}", "mmimdb.image_size=16", *extra], dataset="mmimdb"))


def row(genres):
    return [1.0 if g in genres else 0.0 for g in GENRES]


def test_official_splits_genre_rows_and_inputs(tmp_path):
    make_mmimdb(tmp_path)
    bundle = load(tmp_path, "mmimdb.max_length=5")
    assert bundle.task == "multi_label" and bundle.num_classes == 23 and bundle.class_names == GENRES
    assert GENRES[:5] == ["Drama", "Comedy", "Romance", "Thriller", "Crime"] and GENRES[-1] == "Film-Noir"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4, 1, 1)
    assert bundle.modalities == ["image", "text"]
    assert bundle.input_shapes == {"image": (3, 16, 16), "text": (5,)}
    assert bundle.train.labels.tolist() == [row(MOVIES[m][1]) for m in SPLIT["train"]]
    assert bundle.test.labels.tolist() == [row(["Romance", "War", "Drama"])]
    assert bundle.info["ignored_genres"] == {"Reality-TV": 1}  # not one of the 23
    sample = bundle.val[0]
    assert sample["image"].shape == (3, 16, 16) and sample["label"].tolist() == row(["Crime", "Drama"])
    tokens = sample["text"].tolist()  # "a detective and a spy": train words get ids, "spy" (not in train) is <unk>
    assert len(tokens) == 5 and tokens[-1] == 1 and tokens.count(1) == 1 and tokens[0] == tokens[3]
    config = build_config(overrides=[f"data.root={tmp_path}"], dataset="mmimdb")
    assert config.model.encoders == {"text": "text"} and config.model.encoder == "resnet18"


def test_first_plot_or_all_plots(tmp_path):
    make_mmimdb(tmp_path)
    first = load(tmp_path, "mmimdb.max_length=12")
    joined = load(tmp_path, "mmimdb.max_length=12", "mmimdb.plot=all")
    # movie 1 has two summaries: "all" reads the second one too
    assert (first.train[0]["text"] > 0).sum() == 6 and (joined.train[0]["text"] > 0).sum() == 8
    assert joined.info["vocabulary"] == first.info["vocabulary"] + 2  # "second" and "summary" join the vocabulary
    assert first.info["plot"] == "first" and joined.info["plot"] == "all"


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^mmimdb data not found: .* is not a folder \(expected ROOT/split.json"):
        load(tmp_path / "missing")
    make_mmimdb(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(DataError, match=r"split.json must map train, dev and test to lists of movie ids"):
        load(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({**SPLIT, "dev": ["../0000005"]}))
    with pytest.raises(DataError, match=r"id '../0000005' in 'dev' is not a plain file name"):
        load(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({**SPLIT, "dev": ["0000009"]}))
    with pytest.raises(DataError, match=r"^mmimdb metadata not found: .*0000009.json"):
        load(tmp_path)
    (tmp_path / "dataset" / "0000005.json").write_text(json.dumps({"plot": ["x"], "genres": "Crime"}))
    (tmp_path / "split.json").write_text(json.dumps(SPLIT))
    with pytest.raises(DataError, match=r"0000005.json: 'genres' must be a list of genre names"):
        load(tmp_path)
    (tmp_path / "dataset" / "0000005.json").write_text(json.dumps({"plot": [], "genres": ["Crime"]}))
    with pytest.raises(DataError, match=r"0000005.json: 'plot' must be a string or a non-empty list of strings"):
        load(tmp_path)


def test_missing_poster_raises_or_is_skipped(tmp_path):
    make_mmimdb(tmp_path)
    (tmp_path / "dataset" / "0000002.jpeg").unlink()
    with pytest.raises(DataError, match=r"0000002.jpeg"):
        load(tmp_path)
    bundle = load(tmp_path, "data.on_error=skip")
    assert len(bundle.train) == 3 and bundle.info["skipped"] == 1


def test_trains_midas_one_epoch_on_posters_and_plots(tmp_path):
    from mmbalance.training import train_run

    make_mmimdb(tmp_path)
    overrides = [f"data.root={tmp_path}", "mmimdb.image_size=8", "mmimdb.max_length=8", "model.encoders.image=cnn",
                 "model.feature_dim=8", "model.hidden_dim=16", "train.epochs=2", "train.batch_size=2",
                 "midas.modulation_starts=1"]
    metrics = train_run(build_config(overrides=overrides, dataset="mmimdb", method="midas"), tmp_path / "run", quiet=True)
    assert metrics["task"] == "multi_label" and metrics["modalities"] == ["image", "text"]
    assert metrics["test"]["num_samples"] == 1 and 0 <= metrics["test"]["micro_f1"] <= 1
