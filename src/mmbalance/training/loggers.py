"""Where a run's per-epoch scalars go besides metrics.jsonl: CSV, TensorBoard, Weights & Biases, MLflow.

Every backend receives the same flat scalars per epoch (``flatten``):
``train/loss``, ``train/accuracy``, ``lr``, ``seconds``, each ``val/...``
metric, and every method log (``method/loss/fused``, ``method/midas/alpha``,
...), so loss terms are comparable across methods. ``csv`` and
``tensorboard`` need nothing beyond the core install (the TensorBoard event
file is written here, in its documented record format); ``wandb`` and
``mlflow`` are optional extras, checked when the run starts.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterable

from ..extras import require
from ..files import atomic_write_text

BACKENDS = ("csv", "tensorboard", "wandb", "mlflow")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


def flatten(record: dict) -> dict[str, float]:
    """The numeric scalars of one metrics.jsonl record, with '/'-joined names (``epoch`` is the step)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(float(value)):
                out[prefix] = float(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), inner)

    for key, value in record.items():
        if key == "epoch":
            continue
        name = {"train_loss": "train/loss", "train_accuracy": "train/accuracy"}.get(key, key)
        walk(name, value)
    return out


# -- TensorBoard's event file, without TensorBoard ------------------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """The checksum TFRecord files store: CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, scalars: dict[str, float] | None = None, file_version: str | None = None) -> bytes:
    """One ``Event`` protocol buffer: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    message = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        message += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        message += _bytes_field(5, values)
    return message


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class CSVLogger:
    """``scalars.csv``: one row per epoch, one column per scalar, rewritten whole from the history."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "scalars.csv"

    def write(self, history: list[dict]) -> None:
        rows = [{"epoch": r["epoch"], **flatten(r)} for r in history]
        columns: list[str] = ["epoch"]
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    def log(self, record: dict, history: list[dict]) -> None:
        self.write(history)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """An ``events.out.tfevents.*`` file in the run folder; a resumed run starts a new file."""

    def __init__(self, out_dir: Path):
        self.folder = out_dir
        self.path: Path | None = None

    def _open(self) -> Path:
        if self.path is None:
            now = time.time()
            self.path = self.folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{id(self) % 100000}"
            with open(self.path, "wb") as handle:
                handle.write(tfrecord(event_bytes(now, 0, file_version="brain.Event:2")))
        return self.path

    def log(self, record: dict, history: list[dict]) -> None:
        with open(self._open(), "ab") as handle:
            handle.write(tfrecord(event_bytes(time.time(), int(record["epoch"]), flatten(record))))

    def close(self) -> None:
        pass


class WandbLogger:
    def __init__(self, out_dir: Path, project: str | None, config: dict, name: str):
        self.module = importlib.import_module("wandb")
        self.run = self.module.init(project=project or "mmbalance", name=name, config=config, dir=str(out_dir), resume="allow")

    def log(self, record: dict, history: list[dict]) -> None:
        self.run.log(flatten(record), step=int(record["epoch"]))

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    def __init__(self, out_dir: Path, project: str | None, config: dict, name: str):
        self.module = importlib.import_module("mlflow")
        if project:
            self.module.set_experiment(project)
        self.run = self.module.start_run(run_name=name)
        self.module.log_params({k: str(v) for k, v in _flat_config(config).items()})

    def log(self, record: dict, history: list[dict]) -> None:
        self.module.log_metrics({k.replace("/", "."): v for k, v in flatten(record).items()}, step=int(record["epoch"]))

    def close(self) -> None:
        self.module.end_run()


def _flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat_config(value, name) if isinstance(value, dict) else {name: value})
    return out


def require_extras(backends: Iterable[str]) -> None:
    """One line naming the install that fixes a missing optional backend, before any training."""
    for backend in backends:
        module = EXTRAS.get(backend)
        if module is not None:
            require(module, extra=backend, feature=f"log.backends with '{backend}'")


class RunLoggers:
    """Every chosen backend, fed once per finished epoch."""

    def __init__(self, out_dir: Path, backends: Iterable[str], project: str | None = None, config: dict | None = None):
        backends = list(dict.fromkeys(backends))
        require_extras(backends)
        name = out_dir.name
        made = {
            "csv": lambda: CSVLogger(out_dir),
            "tensorboard": lambda: TensorBoardLogger(out_dir),
            "wandb": lambda: WandbLogger(out_dir, project, config or {}, name),
            "mlflow": lambda: MLflowLogger(out_dir, project, config or {}, name),
        }
        self.loggers = [made[b]() for b in backends]

    def log(self, record: dict, history: list[dict]) -> None:
        for logger in self.loggers:
            logger.log(record, history)

    def sync(self, history: list[dict]) -> None:
        """After a resume: files that mirror the history (the CSV) agree with the checkpoint."""
        for logger in self.loggers:
            if isinstance(logger, CSVLogger):
                logger.write(history)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
