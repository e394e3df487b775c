"""Hostile data files: nothing mmbalance reads may run code, leave the data folder or exhaust memory.

Every malicious file is written by hand here; each test fails without the
guard it names.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import mmbalance.data  # noqa: F401  (registers the datasets)
import mmbalance.models  # noqa: F401  (registers the encoders)
from mmbalance.config import RunConfig, build_config
from mmbalance.data import DataBundle, load_dataset
from mmbalance.data.safe_pickle import load_arrays
from mmbalance.errors import ConfigError, DataError
from mmbalance.models.encoders import build_encoder
from mmbalance.models.text import TextEncoder


class WritesMarker:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_frames(folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(folder / f"{k:05d}.jpg")


def load(name, root, *overrides):
    return load_dataset(build_config(overrides=[f"data.root={root}", *overrides], dataset=name))


# -- 1. spectrogram caches are .npy, never unpickled --------------------------------------------
def kinetics_with_pickles(root, marker):
    (root / "audio").mkdir(parents=True)
    rows, test_rows = [], []
    for c, name in enumerate(["drums", "singing"]):
        for k in range(4):
            clip = f"yt{c}{k}"
            (root / "audio" / f"{clip}.pkl").write_bytes(pickle.dumps(WritesMarker(marker)))
            write_frames(root / "frames" / clip)
            (rows if k < 3 else test_rows).append(f"{clip},{name}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("\n".join(test_rows) + "\n")


@pytest.mark.parametrize("check", ["header", "decode"])
def test_pickled_spectrogram_is_refused_never_unpickled(tmp_path, check):
    marker = tmp_path / "ran"
    kinetics_with_pickles(tmp_path / "data", marker)
    with pytest.raises(DataError, match=r"^audio file .*yt00\.pkl is a pickled spectrogram, .*re-run `mmbalance data prepare`"):
        load("kinetics_sounds", tmp_path / "data", "kinetics_sounds.num_classes=null", f"kinetics_sounds.check={check}")
    with pytest.raises(DataError, match="the train split is empty"):  # skip mode skips them all, still unread
        load("kinetics_sounds", tmp_path / "data", "kinetics_sounds.num_classes=null", "data.on_error=skip")
    assert not marker.exists()


def test_npy_cache_wins_and_a_stray_pickle_beside_it_is_ignored(tmp_path):
    marker = tmp_path / "ran"
    root = tmp_path / "data"
    kinetics_with_pickles(root, marker)
    for pkl in (root / "audio").glob("*.pkl"):
        np.save(pkl.with_suffix(".npy"), np.ones((33, 20), np.float32))
    bundle = load(
        "kinetics_sounds", root, "kinetics_sounds.num_classes=null", "kinetics_sounds.check=decode",
        "kinetics_sounds.n_fft=64", "kinetics_sounds.image_size=8", "data.val_fraction=0.34",
    )
    assert bundle.train[0]["audio"].shape[:2] == (1, 33)
    assert not marker.exists()


def test_npy_spectrogram_with_object_dtype_is_refused(tmp_path):
    root = tmp_path / "data"
    kinetics_with_pickles(root, tmp_path / "ran")
    for pkl in (root / "audio").glob("*.pkl"):
        pkl.unlink()
        np.save(pkl.with_suffix(".npy"), np.array([[WritesMarker(tmp_path / "ran")]] * 33, dtype=object))
    with pytest.raises(DataError, match=r"^cannot read audio file .*\.npy: "):
        load("kinetics_sounds", root, "kinetics_sounds.num_classes=null", "kinetics_sounds.n_fft=64")
    assert not (tmp_path / "ran").exists()


# -- 2. MulT pickles: numpy arrays and plain data only -----------------------------------------
def mult_data():
    rng = np.random.default_rng(0)
    data = {}
    for split, n in {"train": 12, "valid": 4, "test": 4}.items():
        data[split] = {
            "vision": rng.standard_normal((n, 3, 2)).astype(np.float32),
            "audio": rng.standard_normal((n, 3, 2)),
            "text": rng.standard_normal((n, 3, 4)).astype(np.float32),
            "labels": np.tile([-1.0, 1.0], n // 2).reshape(n, 1, 1).astype(np.float32),
            "id": np.array([[f"{split}{k}", "0"] for k in range(n)]),
        }
    return data


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_restricted_unpickler_loads_arrays_of_every_protocol(tmp_path, protocol):
    value = {"a": np.arange(6.0).reshape(2, 3), "b": [np.int64(3), 1.5, "x", (b"raw", b"")],
             "c": np.asfortranarray(np.ones((2, 3), np.float32)), "d": np.array(["u", "vv"]), "e": np.zeros((0, 4))}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    loaded = load_arrays(path)
    for key in ("a", "c", "d", "e"):
        assert loaded[key].dtype == value[key].dtype and np.array_equal(loaded[key], value[key])
    assert loaded["b"] == value["b"]


@pytest.mark.parametrize("payload, refused", [(WritesMarker, r"(io|builtins)\.open"), (RunsShell, r"(posix|os)\.system")])
def test_malicious_mult_pickle_is_refused_without_running(tmp_path, payload, refused):
    marker = tmp_path / "ran"
    data = mult_data()
    data["train"]["extra"] = payload(marker)
    (tmp_path / "mosi_data.pkl").write_bytes(pickle.dumps(data))
    path = re.escape(str(tmp_path / "mosi_data.pkl"))
    with pytest.raises(DataError, match=rf"^{path} refers to {refused}, which mmbalance never unpickles"):
        load("mosi", tmp_path)
    assert not marker.exists()


def test_valid_mult_pickle_still_loads(tmp_path):
    (tmp_path / "mosi_data.pkl").write_bytes(pickle.dumps(mult_data(), protocol=2))
    bundle = load("mosi", tmp_path)
    assert bundle.input_shapes == {"audio": (3, 2), "vision": (3, 2), "text": (3, 4)}


def test_pickle_that_allocates_a_huge_array_is_refused(tmp_path):
    # numpy.ndarray((10**12,)) called directly, and _reconstruct with a huge shape: both allocate before any data
    path = tmp_path / "big.pkl"
    path.write_bytes(b"cnumpy\nndarray\n(I1000000000000\ntR.")
    with pytest.raises(DataError, match="^cannot read .*big.pkl: "):
        load_arrays(path)
    path.write_bytes(b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I1000000000000\ntS'b'\ntR.")
    with pytest.raises(DataError, match="^cannot read .*big.pkl: an array is rebuilt in a way numpy never writes"):
        load_arrays(path)


def test_mult_pickle_with_non_numeric_features_fails_with_one_line(tmp_path):
    data = mult_data()
    data["valid"]["audio"] = [["a", "b"]] * 4
    (tmp_path / "mosi_data.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"mosi_data.pkl: 'valid/audio' is not an array of numbers"):
        load("mosi", tmp_path)


# -- 3. list entries stay inside the data folder -------------------------------------------------
def cremad_layout(root, train_rows):
    (root / "AudioWAV").mkdir(parents=True)
    (root / "Image-01-FPS").mkdir()
    (root / "train.csv").write_text("\n".join(train_rows) + "\n")
    (root / "test.csv").write_text("1001_DFA_ANG_XX,ANG\n")


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "x/../../y", "..\\..\\secret"])
def test_cremad_list_entry_leaving_the_root_is_refused(tmp_path, entry):
    root = tmp_path / "cremad"
    cremad_layout(root, ["clip_id,emotion", "1000_DFA_NEU_XX,NEU", "", f"{entry},ANG"])
    with pytest.raises(DataError, match="^" + re.escape(f"train.csv line 4: path {entry!r} leaves the data folder {root} ")):
        load("cremad", root, "data.on_error=skip")


def test_ave_video_id_leaving_the_root_is_refused(tmp_path):
    root = tmp_path / "ave"
    (root / "audio").mkdir(parents=True)
    (root / "frames").mkdir()
    (root / "trainSet.txt").write_text("Category&VideoID&Quality&Start&End\nDog&../../../home&good&0&10\n")
    (root / "testSet.txt").write_text("Dog&v1&good&0&10\n")
    with pytest.raises(DataError, match=r"^trainSet.txt line 2: path '\.\./\.\./\.\./home' leaves the data folder"):
        load("ave", root, "ave.num_classes=null")


@pytest.mark.parametrize("img", ["/etc/hosts", "../outside.jpg", "data/../../outside.jpg"])
def test_jsonl_image_path_leaving_the_root_is_refused(tmp_path, img):
    root = tmp_path / "mvsa"
    root.mkdir()
    good = {"text": "a fine day", "img": "data/1.jpg", "label": "positive"}
    bad = {"text": "a bad day", "img": img, "label": "negative"}
    (root / "train.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    (root / "dev.jsonl").write_text(json.dumps(good) + "\n")
    (root / "test.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"train.jsonl line 3: path '{img}' leaves the data folder {root} ")):
        load("mvsa", root)


def test_ucf101_list_entry_leaving_the_root_is_refused(tmp_path):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    for folder in ("jpegs_256", "tvl1_flow/u", "tvl1_flow/v"):
        (root / folder).mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Run\n2 ..\n")
    (lists / "trainlist01.txt").write_text("Run/v_Run_g01_c01.avi 1\n../v_x.avi 2\n")
    (lists / "testlist01.txt").write_text("Run/v_Run_g02_c01.avi\n")
    with pytest.raises(DataError, match=r"^ucfTrainTestlist/trainlist01.txt line 2: path '\.\./v_x\.avi' leaves"):
        load("ucf101", root, "ucf101.num_classes=null")
    # '...avi' would name the video '..' (the jpegs_256 folder's parent)
    (lists / "trainlist01.txt").write_text("Run/v_Run_g01_c01.avi 1\nRun/...avi 1\n")
    with pytest.raises(DataError, match=r"^ucfTrainTestlist/trainlist01.txt line 2: path '\.\.' leaves"):
        load("ucf101", root, "ucf101.num_classes=null")


# -- 4. npz headers are checked before anything is allocated -------------------------------------
def npy_bytes(array=None, header=None, data=b""):
    handle = io.BytesIO()
    if array is not None:
        np.save(handle, array)
        return handle.getvalue()
    np.lib.format.write_array_header_1_0(handle, header)
    return handle.getvalue() + data


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def npz_load(path, **options):
    return load_dataset(RunConfig({"data": {"name": "npz", "path": str(path)}, "npz": options}))


def good_members(n=30):
    rng = np.random.default_rng(0)
    return {
        "a.npy": npy_bytes(rng.standard_normal((n, 3))),
        "b.npy": npy_bytes(rng.standard_normal((n, 2))),
        "label.npy": npy_bytes(np.arange(n) % 3),
    }


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_array_declaring_a_huge_shape_is_refused(tmp_path, compression):
    members = good_members()
    members["a.npy"] = npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (300, 10**12)}, data=b"\0" * 64)
    path = write_zip(tmp_path / "forged.npz", members, compression)
    with pytest.raises(DataError, match=r"^array 'a' in .*forged.npz declares shape \(300, 1000000000000\) of float64"):
        npz_load(path)


def test_npz_member_lying_about_its_uncompressed_size_is_refused(tmp_path):
    # 4e9 bytes declared, and the zip directory forged to claim ~4 GB uncompressed from a few compressed bytes
    members = good_members()
    members["a.npy"] = npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (500_000_000,)}, data=b"\0" * 64)
    path = write_zip(tmp_path / "forged.npz", members, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    entries = [m.start() for m in re.finditer(b"PK\x01\x02", bytes(raw))]  # central directory records
    at = next(k for k in entries if raw[k + 46 : k + 51] == b"a.npy")
    struct.pack_into("<I", raw, at + 24, 0xFFFFFFF0)  # the central directory's uncompressed size
    path.write_bytes(bytes(raw))
    assert zipfile.ZipFile(path).getinfo("a.npy").file_size == 0xFFFFFFF0
    with pytest.raises(DataError, match=r"^array 'a' in .*forged.npz declares shape \(500000000,\) of float64"):
        npz_load(path)


def test_npz_member_with_unbounded_compression_is_refused(tmp_path):
    # bzip2 can expand millions of times, so its sizes bound nothing; numpy never writes it
    path = write_zip(tmp_path / "bz.npz", good_members(), zipfile.ZIP_BZIP2)
    with pytest.raises(DataError, match=r"^array 'a' in .*bz.npz uses zip compression method 12; save with np.savez"):
        npz_load(path)


def test_npz_member_that_is_not_an_array_is_refused(tmp_path):
    members = good_members()
    members["notes.txt"] = b"hello"
    with pytest.raises(DataError, match=r"^member 'notes.txt' of .*x.npz is not a \.npy array"):
        npz_load(write_zip(tmp_path / "x.npz", members))


def test_single_npy_declaring_a_huge_shape_is_refused_without_reading(tmp_path):
    path = tmp_path / "one.npz"
    path.write_bytes(npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (300, 10**12)}, data=b"\0" * 64))
    with pytest.raises(DataError, match=r"^.*one.npz is not a valid \.npz file"):
        npz_load(path)


def test_sparse_huge_labels_are_refused_before_building_a_model(tmp_path):
    members = good_members()
    labels = np.arange(30) % 3
    labels[0] = 10**9
    members["label.npy"] = npy_bytes(labels)
    path = write_zip(tmp_path / "labels.npz", members)
    expected = (
        r"^the largest label in 'label' of .*labels.npz is 1000000000 but only 4 distinct labels occur, "
        r"which would make 1000000001 classes; relabel the classes 0\.\.C-1 or set npz\.num_classes$"
    )
    with pytest.raises(DataError, match=expected):
        npz_load(path)
    with pytest.raises(DataError, match=r"^the largest label in the labels given to DataBundle.from_tensors is 1000000000 .* or set num_classes$"):
        DataBundle.from_tensors({"a": np.zeros((30, 2)), "b": np.zeros((30, 2))}, labels)
    many = np.arange(2000)  # 2,000 classes all present: large, but supported by the labels
    assert DataBundle.from_tensors({"a": np.zeros((2000, 1)), "b": np.zeros((2000, 1))}, many, rows=(many, many, many)).num_classes == 2000


# -- 5. a modality needs features -----------------------------------------------------------------
def test_modality_without_features_is_refused(tmp_path):
    members = good_members()
    members["b.npy"] = npy_bytes(np.zeros((30, 0)))
    with pytest.raises(DataError, match=r"^modality 'b' has samples of shape \(0,\), which hold no values"):
        npz_load(write_zip(tmp_path / "empty.npz", members))
    bundle = DataBundle.from_tensors({"a": np.zeros((30, 2)), "b": np.zeros((30, 3, 0))}, np.arange(30) % 3)
    with pytest.raises(DataError, match=r"^modality 'b' has samples of shape \(3, 0\)"):
        bundle.validate()


# -- 6. a token-id encoder on float features --------------------------------------------------------
def test_text_encoder_on_float_features_is_refused_at_load(tmp_path):
    path = write_zip(tmp_path / "floats.npz", good_members())
    raw = {"data": {"name": "npz", "path": str(path)}, "model": {"encoders": {"b": "text"}}}
    expected = (
        r"^encoder 'text' for modality 'b' reads integer token ids, but 'b' holds float features \(torch.float32\); "
        r"for float inputs use mlp \(vectors\), cnn or resnet18 .*transformer \(sequences"
    )
    with pytest.raises(ConfigError, match=expected):
        load_dataset(RunConfig(raw))
    members = good_members()
    members["b.npy"] = npy_bytes(np.random.default_rng(0).integers(0, 50, (30, 5)))
    raw["data"]["path"] = str(write_zip(tmp_path / "tokens.npz", members))
    bundle = load_dataset(RunConfig(raw))
    assert bundle.input_dtypes == {"a": torch.float32, "b": torch.int64}


def test_build_encoder_and_text_forward_refuse_float_features():
    with pytest.raises(ConfigError, match=r"^encoder 'text' for modality 'words' reads integer token ids"):
        build_encoder("text", (8,), 4, 8, 0.0, modality="words", input_dtype=torch.float32)
    assert build_encoder("text", (8,), 4, 8, 0.0, modality="words", input_dtype=torch.int64).feature_dim == 4
    encoder = TextEncoder((8,), feature_dim=4, hidden_dim=8, layers=0)
    with pytest.raises(ConfigError, match=r"^encoder 'text' reads integer token ids, but got float features of shape \(8,\)"):
        encoder(torch.rand(2, 8))
    assert encoder(torch.randint(0, 20, (2, 8))).shape == (2, 4)


def test_file_benchmark_dtypes_come_from_the_readers(tmp_path):
    root = tmp_path / "mvsa"
    (root / "data").mkdir(parents=True)
    rows = []
    for k, label in enumerate(["negative", "neutral", "positive"] * 4):
        Image.new("RGB", (8, 8)).save(root / "data" / f"{k}.jpg")
        rows.append(json.dumps({"text": f"word {k}", "img": f"data/{k}.jpg", "label": label}))
    for name in ("train", "dev", "test"):
        (root / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    bundle = load("mvsa", root, "mvsa.image_size=8")
    assert bundle.input_dtypes == {"image": torch.float32, "text": torch.int64}
