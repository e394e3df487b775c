"""The avdigits dataset on the real Free Spoken Digit Dataset recordings.

The recordings live in the ``shared`` folder beside the repository checkout;
the tests skip when it is absent. They read a small subset (two speakers,
a few takes) so that they stay fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import RunConfig
from mmbalance.data import load_dataset
from mmbalance.data.avdigits import FILE_PATTERN, TEST_TAKES, list_recordings
from mmbalance.errors import DataError
from mmbalance.models.encoders import build_encoder

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"
SMALL = {"speakers": ["george", "jackson"], "max_takes": 8}


@pytest.fixture(scope="module")
def fsdd() -> Path:
    if not FSDD.is_dir():
        pytest.skip(f"FSDD recordings not found beside the repository ({FSDD})")
    return FSDD


def av_config(root: Path, seed: int = 0, data: dict | None = None, **options) -> RunConfig:
    data = {"name": "avdigits", "root": str(root), **(data or {})}
    return RunConfig({"seed": seed, "data": data, "avdigits": {**SMALL, **options}})


@pytest.fixture(scope="module")
def small(fsdd):
    """The small subset with clean images (so equal pictures compare equal), loaded once."""
    return load_dataset(av_config(fsdd, image_noise=0.0))


def files_of(bundle, split: str, root: Path, options: dict = SMALL) -> list[str]:
    """The WAV names behind a split's rows (the bundle's index counts the selected files in order)."""
    files = list_recordings(root, options.get("speakers"), options.get("max_takes"))
    return [files[i].name for i in bundle.split(split).index.tolist()]


def image_rows(bundle, split: str) -> set[bytes]:
    return {row.numpy().tobytes() for row in bundle.split(split).inputs["image"]}


def test_shapes_labels_and_fsdd_split(fsdd, small):
    bundle = small
    assert bundle.modalities == ["audio", "image"]
    assert bundle.input_shapes == {"audio": (1, 32, 32), "image": (1, 8, 8)}  # 1 s, hop 256, 32 bands
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 2 * 10 * 8
    assert len(bundle.test) == 2 * 10 * TEST_TAKES
    for split in ("train", "val", "test"):
        data = bundle.split(split)
        names = files_of(bundle, split, fsdd)
        matches = [FILE_PATTERN.match(name) for name in names]
        assert [int(m["digit"]) for m in matches] == data.labels.tolist()
        assert {m["speaker"] for m in matches} == {"george", "jackson"}
        takes = np.array([int(m["take"]) for m in matches])
        assert (takes < TEST_TAKES).all() if split == "test" else (takes >= TEST_TAKES).all()
        assert data.inputs["audio"].dtype == torch.float32 and torch.isfinite(data.inputs["audio"]).all()
    assert np.bincount(bundle.val.labels.numpy(), minlength=10).min() >= 1  # stratified
    assert bundle.info["skipped_files"] == 0


def test_test_images_are_never_seen_in_training(small):
    train, val, test = (image_rows(small, s) for s in ("train", "val", "test"))
    assert train and val and test
    assert not train & test and not train & val and not val & test


def test_same_seed_same_data_other_seed_other_pairing(fsdd):
    first, again = load_dataset(av_config(fsdd, seed=3)), load_dataset(av_config(fsdd, seed=3))
    other = load_dataset(av_config(fsdd, seed=4, image_noise=0.0))
    clean = load_dataset(av_config(fsdd, seed=3, image_noise=0.0))
    for split in ("train", "val", "test"):
        for m in ("audio", "image"):
            assert torch.equal(first.split(split).inputs[m], again.split(split).inputs[m])
    assert torch.equal(first.test.index, other.test.index)  # FSDD's test split does not move
    assert not torch.equal(clean.test.inputs["image"], other.test.inputs["image"])  # the pairing does


def test_knobs_change_shapes_and_noise(fsdd):
    bundle = load_dataset(av_config(fsdd, hop=128, bands=None, image_size=4, image_noise=0.5, audio_noise=1.0))
    assert bundle.input_shapes == {"audio": (1, 129, 63), "image": (1, 4, 4)}
    assert len(image_rows(bundle, "test")) == len(bundle.test)  # noise makes every pairing's image unique


def test_default_encoder_takes_both_modalities(small):
    for m, shape in small.input_shapes.items():
        encoder = build_encoder("auto", shape, feature_dim=8, hidden_dim=16, dropout=0.0)
        assert type(encoder).__name__ == "SmallCNNEncoder"
        assert encoder(small.train.inputs[m][:4]).shape == (4, 8)


@pytest.fixture
def small_copy(fsdd, tmp_path) -> Path:
    """One speaker's first ten takes of every digit, copied so that a test may damage them."""
    root = tmp_path / "recordings"
    root.mkdir()
    for path in list_recordings(fsdd, ["george"], 10):
        shutil.copy(path, root / path.name)
    return root


def test_corrupt_wav_is_named_or_skipped(small_copy):
    options = {"speakers": None, "max_takes": None}
    assert load_dataset(av_config(small_copy, **options)).info["skipped_files"] == 0
    bad = small_copy / "3_george_7.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00not a wave file")  # after a load: the in-memory cache must not hide it
    with pytest.raises(DataError, match=r"cannot read WAV file .*3_george_7\.wav"):
        load_dataset(av_config(small_copy, **options))
    bundle = load_dataset(av_config(small_copy, data={"on_error": "skip"}, **options))
    assert bundle.info["skipped_files"] == 1 and bundle.info["skipped"] == ["3_george_7.wav"]
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 99


def test_wrong_sample_rate_is_refused(small_copy):
    soundfile.write(small_copy / "0_george_9.wav", np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=r"0_george_9\.wav has a sample rate of 16000 Hz, expected 8000"):
        load_dataset(av_config(small_copy, speakers=None, max_takes=None))


def test_missing_folder_says_where_to_get_fsdd(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as caught:
        load_dataset(av_config(missing))
    message = str(caught.value)
    assert message.startswith(f"FSDD recordings not found in {missing}; get the Free Spoken Digit Dataset from ")
    assert "set data.root" in message and "\n" not in message


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBALANCE_DATA", str(tmp_path))
    with pytest.raises(DataError, match=f"not found in {tmp_path / 'fsdd'};"):
        load_dataset(RunConfig({"data": {"name": "avdigits"}}))
