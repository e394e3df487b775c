"""CREMA-D, AVE and Kinetics-Sounds loaders on tiny fixtures written in their exact layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.errors import DataError
from mmbalance.training import train_run

SMALL = [
    "{name}.image_size=16",
    "{name}.sample_rate=8000",
    "{name}.audio_seconds=0.5",
    "{name}.n_fft=64",
    "{name}.hop_length=32",
]
SPEC_SHAPE = (1, 33, 1 + 4000 // 32)
EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def write_wav(path, seconds=0.25, rate=8000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * rate)).astype(np.float32)
    soundfile.write(str(path), wave, rate)


def write_frames(folder, count=2, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{k:05d}.jpg")


def make_cremad(root, per_class_train=4, per_class_test=1):
    rows = {"train": [], "test": []}
    for c, emotion in enumerate(EMOTIONS):
        for k in range(per_class_train + per_class_test):
            clip = f"10{c}{k}_DFA_{emotion}_XX"
            write_wav(root / "AudioWAV" / f"{clip}.wav", seed=c * 10 + k)
            write_frames(root / "Image-01-FPS" / clip, seed=k)
            rows["train" if k < per_class_train else "test"].append(f"{clip},{emotion}")
    (root / "train.csv").write_text("\n".join(rows["train"]) + "\n")
    (root / "test.csv").write_text("\n".join(rows["test"]) + "\n")
    return rows


def load(name, root, *extra):
    overrides = [f"data.root={root}", *[s.format(name=name) for s in SMALL], *extra]
    return load_dataset(build_config(overrides=overrides, dataset=name))


def test_cremad_shapes_labels_and_splits(tmp_path):
    rows = make_cremad(tmp_path)
    bundle = load("cremad", tmp_path, "data.val_fraction=0.25")
    assert bundle.num_classes == 6 and bundle.class_names == EMOTIONS
    assert bundle.modalities == ["audio", "visual"]
    assert bundle.input_shapes == {"audio": SPEC_SHAPE, "visual": (1, 3, 16, 16)}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (18, 6, 6)  # val: 1 of 4 per class
    assert [r["clip"] for r in bundle.test.records] == [row.split(",")[0] for row in rows["test"]]
    sample = bundle.train[0]
    assert sample["audio"].shape == SPEC_SHAPE and sample["visual"].shape == (1, 3, 16, 16)
    assert torch.isfinite(sample["audio"]).all()
    assert sample["label"] == EMOTIONS.index(bundle.train.records[0]["clip"].split("_")[2])
    assert bundle.info["skipped"] == 0 and bundle.info["val"] == "carved from train"
    indices = [int(i) for part in (bundle.train, bundle.val, bundle.test) for i in part.index]
    assert len(set(indices)) == 30
    again = load("cremad", tmp_path, "data.val_fraction=0.25")
    assert [r["clip"] for r in again.val.records] == [r["clip"] for r in bundle.val.records]
    copy = pickle.loads(pickle.dumps(bundle.train))  # DataLoader workers receive the split pickled
    assert torch.equal(copy[0]["audio"], sample["audio"])
    three = load("cremad", tmp_path, "cremad.frames=3")
    assert three.train[0]["visual"].shape == (3, 3, 16, 16)  # 2 frames on disk, repeated to 3


def test_cremad_missing_and_corrupt_files(tmp_path):
    make_cremad(tmp_path)
    missing = tmp_path / "AudioWAV" / "1000_DFA_NEU_XX.wav"
    missing.unlink()
    corrupt = tmp_path / "Image-01-FPS" / "1011_DFA_HAP_XX" / "00000.jpg"
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"^audio file not found: .*1000_DFA_NEU_XX\{.wav,.npy\}$"):
        load("cremad", tmp_path)
    missing.with_suffix(".npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^cannot read audio file .*1000_DFA_NEU_XX.npy"):
        load("cremad", tmp_path)
    missing.with_suffix(".npy").unlink()
    bundle = load("cremad", tmp_path, "data.on_error=skip")
    assert bundle.info["skipped"] == 2
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 28
    write_wav(missing)
    with pytest.raises(DataError, match=r"^cannot read image file .*1011_DFA_HAP_XX/00000.jpg"):
        load("cremad", tmp_path)
    write_frames(corrupt.parent)
    (tmp_path / "AudioWAV" / "1012_DFA_HAP_XX.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(DataError, match=r"^cannot read audio file .*1012_DFA_HAP_XX.wav: "):
        load("cremad", tmp_path)
    with pytest.raises(DataError, match=r"^cannot read audio file .*1012_DFA_HAP_XX.wav: "):
        load("cremad", tmp_path, "cremad.check=decode")


def test_cremad_wrong_layout_and_bad_rows(tmp_path):
    with pytest.raises(DataError, match=r"^cremad data not found: .* is not a folder \(expected ROOT/\{train,test\}.csv"):
        load("cremad", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"does not have the cremad layout: no train.csv \(expected ROOT/\{train,test\}.csv with rows clip_id,EMOTION, ROOT/AudioWAV/<clip_id>.wav"):
        load("cremad", tmp_path)
    make_cremad(tmp_path)
    (tmp_path / "test.csv").write_text("clip,label\n1005_DFA_NEU_XX,BORED\n")
    with pytest.raises(DataError, match=r"clip 1005_DFA_NEU_XX has label 'BORED' \(allowed: NEU, HAP, SAD, FEA, DIS, ANG\)$"):
        load("cremad", tmp_path)


def make_ave(root, categories=("Church bell", "Dog", "Frying (food)"), with_spectrograms=True):
    lines = {"train": [], "val": [], "test": []}
    for c, category in enumerate(categories):
        for k, split in enumerate(["train", "train", "val", "test"]):
            vid = f"v{c}{k}"
            if with_spectrograms and k % 2:
                np.save(root / "Audio-1004-SE" / f"{vid}.npy", np.ones((33, 200), np.float32)) if (root / "Audio-1004-SE").is_dir() else None
            write_wav(root / "Audio-1004-SE" / f"{vid}.wav", seed=k)
            write_frames(root / "Image-01-FPS" / vid, count=5)
            lines[split].append(f"{category}&{vid}&good&0&10")
    for split, name in [("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")]:
        (root / name).write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines[split]) + "\n")


def test_ave_official_splits_classes_and_precomputed_spectrograms(tmp_path):
    make_ave(tmp_path)
    spec = tmp_path / "Audio-1004-SE" / "v00.npy"
    np.save(spec, np.full((33, 200), 2.0, np.float32))  # .wav is preferred when both exist
    (tmp_path / "Audio-1004-SE" / "v01.wav").unlink()
    np.save(tmp_path / "Audio-1004-SE" / "v01.npy", np.full((33, 50), 2.0, np.float32))
    with pytest.raises(DataError, match=r"^the ave lists name 3 classes, expected 28 \(set ave.num_classes=null to accept any number\)$"):
        load("ave", tmp_path)
    bundle = load("ave", tmp_path, "ave.num_classes=null")
    assert bundle.class_names == ["Church bell", "Dog", "Frying (food)"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 3, 3)
    assert [r["clip"] for r in bundle.val.records] == ["v02", "v12", "v22"]
    assert bundle.val.labels.tolist() == [0, 1, 2]
    precomputed = bundle.train[1]["audio"]  # v01: (33, 50) padded with zeros to 126 frames
    assert precomputed.shape == SPEC_SHAPE
    assert torch.all(precomputed[0, :, :50] == 2.0) and torch.all(precomputed[0, :, 50:] == 0.0)
    assert bundle.train[0]["visual"].shape == (3, 3, 16, 16)
    np.save(tmp_path / "Audio-1004-SE" / "v01.npy", np.ones((40, 50), np.float32))
    with pytest.raises(DataError, match=r"v01.npy has shape \(40, 50\), expected \(33, frames\) for n_fft=64$"):
        load("ave", tmp_path, "ave.num_classes=null", "ave.check=decode")


def test_kinetics_sounds_cached_spectrograms_and_skip(tmp_path):
    names = ["playing drums", "singing"]
    rows = ["youtube_id,label"]
    test_rows = []
    for c, name in enumerate(names):
        for k in range(5):
            clip = f"yt{c}{k}"
            (tmp_path / "audio").mkdir(exist_ok=True)
            np.save(tmp_path / "audio" / f"{clip}.npy", np.zeros((33, 126)))
            write_frames(tmp_path / "frames" / clip)
            (rows if k < 4 else test_rows).append(f"{clip},{name}")
    rows.append("yt_gone,singing")  # listed, but no files
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(test_rows) + "\n")
    with pytest.raises(DataError, match=r"audio file not found: .*yt_gone"):
        load("kinetics_sounds", tmp_path, "kinetics_sounds.num_classes=null")
    bundle = load("kinetics_sounds", tmp_path, "kinetics_sounds.num_classes=null", "data.on_error=skip")
    assert bundle.info["skipped"] == 1 and "yt_gone" in bundle.info["skipped_examples"][0]
    assert bundle.class_names == names and len(bundle.test) == 2
    assert bundle.test[0]["audio"].shape == SPEC_SHAPE


def test_cremad_trains_one_epoch(tmp_path):
    make_cremad(tmp_path)
    overrides = [f"data.root={tmp_path}", "data.val_fraction=0.25", *[s.format(name="cremad") for s in SMALL]]
    overrides += ["model.encoder=cnn", "model.feature_dim=8", "model.hidden_dim=16", "train.epochs=1", "train.batch_size=8"]
    metrics = train_run(build_config(overrides=overrides, dataset="cremad"), tmp_path / "run", quiet=True)
    assert metrics["epochs"] == 1 and metrics["modalities"] == ["audio", "visual"]
    assert metrics["dataset_info"]["skipped"] == 0


def test_spectrogram_resamples_and_finds_the_tone(tmp_path):
    from mmbalance.data.benchmarks.media import Spectrogram

    rate = 16000
    t = np.arange(rate // 4) / rate
    soundfile.write(str(tmp_path / "tone.wav"), (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), rate)
    spectrogram = Spectrogram("audio", sample_rate=8000, seconds=0.5, n_fft=64, hop_length=32)
    spec = spectrogram({"audio": str(tmp_path / "tone")})
    assert spec.shape == spectrogram.shape == SPEC_SHAPE
    assert int(spec[0].mean(dim=1).argmax()) == 8  # 1000 Hz / (8000 Hz / 64 bins)


def test_cremad_one_column_list_takes_the_emotion_from_the_id(tmp_path):
    rows = make_cremad(tmp_path, per_class_train=2)
    (tmp_path / "test.csv").write_text("\n".join(row.split(",")[0] for row in rows["test"]) + "\n")
    bundle = load("cremad", tmp_path, "data.val_fraction=0.4")
    assert bundle.test.labels.tolist() == list(range(6))


def make_cremad_actors(root, actors=6):
    """Every actor speaks every emotion; the lists put every actor in both train and test, as the shipped ones do."""
    rows = {"train": [], "test": []}
    for a in range(actors):
        for c, emotion in enumerate(EMOTIONS):
            clip = f"{1001 + a}_DFA_{emotion}_XX"
            write_wav(root / "AudioWAV" / f"{clip}.wav", seed=a * 10 + c)
            write_frames(root / "Image-01-FPS" / clip, seed=c)
            rows["test" if (a + c) % 5 == 0 else "train"].append(f"{clip},{emotion}")
    (root / "train.csv").write_text("\n".join(rows["train"]) + "\n")
    (root / "test.csv").write_text("\n".join(rows["test"]) + "\n")


def test_cremad_speaker_split_keeps_actors_apart_and_test_fixed(tmp_path):
    make_cremad_actors(tmp_path)

    def actors(split):
        return {r["clip"].split("_")[0] for r in split.records}

    lists = load("cremad", tmp_path)
    assert actors(lists.train) & actors(lists.test)  # the shipped protocol: actors in both
    bundle = load("cremad", tmp_path, "cremad.split=speaker", "cremad.test_speakers=0.2", "data.val_fraction=0.25")
    train, val, test = actors(bundle.train), actors(bundle.val), actors(bundle.test)
    # 6 actors: round(0.2·6) = 1 for test, round(0.25·5) = 1 for validation, 4 for training; 6 clips each
    assert (len(train), len(val), len(test)) == (4, 1, 1)
    assert not (train & val or train & test or val & test)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 6)
    other = load("cremad", tmp_path, "cremad.split=speaker", "cremad.test_speakers=0.2", "data.val_fraction=0.25",
                 "data.split_seed=5")
    assert actors(other.test) == test  # the test actors do not follow the split seed
    seeds = [load("cremad", tmp_path, "cremad.split=speaker", "cremad.test_speakers=0.2", "data.val_fraction=0.25",
                  f"data.split_seed={s}") for s in range(4)]
    assert len({frozenset(actors(b.val)) for b in seeds}) > 1  # validation actors do
