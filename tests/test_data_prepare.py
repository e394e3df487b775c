"""``mmbalance data prepare``: raw clips -> a layout the audio-visual loaders read, resumably."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.cli import main as cli
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.data.prepare import FFMPEG_MISSING, prepare

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
SMALL = ["cremad.image_size=16", "cremad.sample_rate=8000", "cremad.audio_seconds=0.5",
         "cremad.n_fft=64", "cremad.hop_length=32"]


def write_raw_cremad(raw, per_class=3, rate=11025):
    """WAVs at another rate than the loader's (so resampling is covered) and JPEG frame folders."""
    rng = np.random.default_rng(0)
    for c, emotion in enumerate(EMOTIONS):
        for k in range(per_class):
            clip = f"10{c}{k}_DFA_{emotion}_XX"
            (raw / "AudioWAV").mkdir(parents=True, exist_ok=True)
            soundfile.write(str(raw / "AudioWAV" / f"{clip}.wav"), rng.uniform(-0.5, 0.5, 3000).astype(np.float32), rate)
            (raw / "frames" / clip).mkdir(parents=True, exist_ok=True)
            for f in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(raw / "frames" / clip / f"{f:05d}.jpg")


def load(root):
    return load_dataset(build_config(overrides=[f"data.root={root}", "data.val_fraction=0.3", *SMALL],
                                     dataset="cremad"))


@pytest.fixture
def prepared(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw_cremad(raw)
    counts = prepare("cremad", raw, out, SMALL, test_fraction=0.34, log=None)
    return raw, out, counts


def test_prepared_layout_loads_like_the_raw_wavs(prepared, tmp_path):
    raw, out, counts = prepared
    assert counts["clips"] == 18 and counts["written"] == 18 and counts["lists"] == ["train.csv", "test.csv"]
    assert len(list((out / "audio").glob("*.npy"))) == 18 and not list((out / "audio").glob("*.wav"))
    assert len(list((out / "Image-01-FPS").iterdir())) == 18
    # The raw folder in the loader's own layout (its lists taken from the prepared output).
    shutil.copytree(raw / "frames", raw / "Image-01-FPS")
    for name in ("train.csv", "test.csv"):
        shutil.copy(out / name, raw / name)
    cached, direct = load(out), load(raw)
    assert cached.info["audio_dir"] == "audio" and direct.info["audio_dir"] == "AudioWAV"
    assert cached.input_shapes == direct.input_shapes
    for split in ("train", "val", "test"):
        a, b = getattr(cached, split), getattr(direct, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert x["label"] == y["label"]
            assert torch.equal(x["audio"], y["audio"])  # the cache is exactly the loader's spectrogram
            assert torch.equal(x["visual"], y["visual"])


def test_second_run_skips_and_a_removed_output_is_regenerated(prepared):
    raw, out, _ = prepared
    again = prepare("cremad", raw, out, SMALL, log=None)
    assert again["written"] == 0 and again["skipped"] == 18
    clip = "1000_DFA_NEU_XX"
    before = np.load(out / "audio" / f"{clip}.npy")
    (out / "audio" / f"{clip}.npy").unlink()
    shutil.rmtree(out / "Image-01-FPS" / clip)
    (out / "Image-01-FPS" / ".1000_DFA_NEU_XX.abc.tmp").mkdir()  # what a killed run leaves
    (out / "audio" / ".1000_DFA_NEU_XX.npy.abc.tmp").write_bytes(b"torn")
    lines = []
    third = prepare("cremad", raw, out, SMALL, log=lines.append)
    assert third["written"] == 1 and third["skipped"] == 17
    assert np.array_equal(np.load(out / "audio" / f"{clip}.npy"), before)
    assert len(list((out / "Image-01-FPS" / clip).iterdir())) == 2
    assert any(f"1/18 {clip}: frames, spectrogram" in line for line in lines)
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # no leftover temporaries


def test_other_spectrogram_options_refuse_to_reuse_the_cache(prepared, capsys):
    raw, out, _ = prepared
    argv = ["data", "prepare", "cremad", "--raw", str(raw), "--out", str(out), "--set", "cremad.n_fft=128"]
    assert cli(argv) == 2
    assert "use another --out" in capsys.readouterr().err


def test_cli_prepare_and_unknown_name(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw_cremad(raw, per_class=2)
    argv = ["data", "prepare", "cremad", "--raw", str(raw), "--out", str(tmp_path / "out"), *sum((["--set", s] for s in SMALL), [])]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert "clip 12/12" in captured.err and "12 clips (12 written" in captured.out
    assert cli(["data", "prepare", "cremadd", "--raw", str(raw), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'cremad'?" in err


def test_missing_ffmpeg_is_one_line(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    (raw / "videos").mkdir(parents=True)
    (raw / "videos" / "1001_DFA_ANG_XX.mp4").write_bytes(b"not decoded")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli(["data", "prepare", "cremad", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"mmbalance: error: {FFMPEG_MISSING}"


def test_lists_are_copied_for_ave(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw_cremad(raw, per_class=1)
    clips = sorted(p.stem for p in (raw / "AudioWAV").iterdir())
    for name, part in (("trainSet.txt", clips[:4]), ("valSet.txt", clips[4:5]), ("testSet.txt", clips[5:])):
        (raw / name).write_text("".join(f"Cat{i % 2}&{c}&good&0&10\n" for i, c in enumerate(part)))
    small = [s.replace("cremad", "ave") for s in SMALL] + ["ave.num_classes=null"]
    assert prepare("ave", raw, out, small, log=None)["lists"] == ["trainSet.txt", "valSet.txt", "testSet.txt"]
    bundle = load_dataset(build_config(overrides=[f"data.root={out}", *small], dataset="ave"))
    assert len(bundle.train) == 4 and bundle.train[0]["audio"].shape == (1, 33, 126)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_video_is_decoded_with_ffmpeg(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "videos").mkdir(parents=True)
    clip = "1001_DFA_ANG_XX"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=32x24:rate=5:duration=2",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=2", "-shortest",
                    str(raw / "videos" / f"{clip}.mp4")], check=True)
    counts = prepare("cremad", raw, out, SMALL, fps=2, test_fraction=0.0, log=None)
    assert counts["written"] == 1
    assert len(list((out / "Image-01-FPS" / clip).glob("*.jpg"))) >= 3
    info = soundfile.info(str(out / "wav" / f"{clip}.wav"))
    assert info.samplerate == 8000 and info.channels == 1 and info.subtype == "PCM_16"
    assert np.load(out / "audio" / f"{clip}.npy").shape == (33, 126)
