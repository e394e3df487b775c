"""Run logging: scalars.csv and a TensorBoard event file in every run folder, plain per-epoch lines off a
terminal, each loss term named, optional backends checked before training."""

import csv
import struct
import sys
import types

import pytest

from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.training import train_run
from mmbalance.training.loggers import crc32c, event_bytes, flatten, masked_crc, tfrecord

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value of RFC 3720
    assert masked_crc(b"") == ((0 >> 15 | (0 << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # crc32c(b"") = 0


def _varint(data, pos):
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data):
    """(number, wire type, value) of a protocol buffer message, read by hand."""
    pos, out = 0, []
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = struct.unpack("<d", data[pos:pos + 8])[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack("<f", data[pos:pos + 4])[0], pos + 4
        else:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        out.append((number, wire, value))
    return out


def read_events(path):
    """Every event of a TFRecord file, checksums verified: [(step, {tag: value}, file_version)]."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc(body)
        pos += 16 + length
        fields = _fields(body)
        step = next(v for n, _, v in fields if n == 2)
        version = next((v.decode() for n, _, v in fields if n == 3), None)
        scalars = {}
        for n, _, summary in fields:
            if n == 5:
                for _, _, value in _fields(summary):
                    inner = dict((k, v) for k, _, v in _fields(value))
                    scalars[inner[1].decode()] = inner[2]
        events.append((step, scalars, version))
    return events


def test_event_encoding_round_trips_by_hand():
    record = tfrecord(event_bytes(1.5, 3, {"val/accuracy": 0.25}))
    fields = _fields(record[12:-4])
    assert fields[0] == (1, 1, 1.5) and fields[1] == (2, 0, 3)


def test_flatten_names_every_scalar():
    record = {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_accuracy": 0.5,
              "val": {"accuracy": 0.4, "modality_accuracy": {"a": 0.3}, "note": "x", "nan": float("nan")},
              "method": {"loss/fused": 1.5}}
    assert flatten(record) == {"lr": 0.1, "train/loss": 2.0, "train/accuracy": 0.5, "val/accuracy": 0.4,
                               "val/modality_accuracy/a": 0.3, "method/loss/fused": 1.5}


def test_a_run_folder_holds_a_csv_and_tensorboard_events_of_every_epoch(tmp_path):
    train_run(build_config(overrides=TINY), tmp_path / "r", quiet=True)
    rows = list(csv.DictReader(open(tmp_path / "r" / "scalars.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train/loss", "val/accuracy", "method/loss/fused", "method/loss/probe", "lr"} <= set(rows[0])
    events = sorted((tmp_path / "r").glob("events.out.tfevents.*"))
    assert len(events) == 1
    read = read_events(events[0])
    assert read[0][2] == "brain.Event:2"
    assert [step for step, _, _ in read[1:]] == [1, 2]
    assert read[2][1]["val/accuracy"] == pytest.approx(float(rows[1]["val/accuracy"]))


def test_logging_backends_can_be_switched_off(tmp_path):
    train_run(build_config(overrides=TINY + ["log.backends=[]"]), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r" / "scalars.csv").exists()
    assert not list((tmp_path / "r").glob("events.out.tfevents.*"))


def test_off_a_terminal_each_epoch_prints_one_plain_line_naming_the_loss_terms(tmp_path, capsys):
    train_run(build_config(overrides=TINY), tmp_path / "r", quiet=False)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2  loss ") and "(fused " in lines[0] and " + probe " in lines[0]
    assert "val acc" in lines[0] and lines[0].endswith("s")
    train_run(build_config(overrides=TINY), tmp_path / "q", quiet=True)
    assert "epoch 1/2" not in capsys.readouterr().err


def test_a_missing_optional_backend_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'mmbalance\[wandb\]'") as error:
        train_run(build_config(overrides=TINY + ["log.backends=[wandb]"]), tmp_path / "r", quiet=True)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "r").exists()


def test_wandb_receives_every_epoch(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kwargs: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train_run(build_config(overrides=TINY + ["log.backends=[wandb]"]), tmp_path / "r", quiet=True)
    assert [entry[0] for entry in logged[:-1]] == [1, 2] and logged[-1] == "finished"
    assert "val/accuracy" in logged[0][1]


def test_overwrite_removes_the_earlier_runs_logs(tmp_path):
    train_run(build_config(overrides=TINY), tmp_path / "r", quiet=True)
    train_run(build_config(overrides=TINY), tmp_path / "r", quiet=True, overwrite=True)
    assert len(list((tmp_path / "r").glob("events.out.tfevents.*"))) == 1
