"""Checkpoints: plain tensors and containers only, written atomically, read without running code.

A checkpoint holds state dicts, numbers, strings and the run's records;
nothing in it needs pickle's ability to rebuild arbitrary objects, so it is
read with ``torch.load(weights_only=True)``, which refuses (instead of
running) anything else. RNG states are stored as tensors for that reason.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MMBalanceError
from ..files import atomic_write_bytes


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: Path, required: tuple[str, ...] = ("model", "method")) -> dict:
    """A checkpoint written by mmbalance, or one line saying why ``path`` is not one."""
    path = Path(path)
    if not path.is_file():
        raise MMBalanceError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or unsafe file: nothing of it was run
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects other than tensors and plain containers, which mmbalance never loads"
        raise MMBalanceError(f"{path} is not an mmbalance checkpoint: {reason[:200]}") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in required):
        kind = type(checkpoint).__name__
        raise MMBalanceError(
            f"{path} is not an mmbalance checkpoint: a {kind} without the keys {', '.join(required)}"
        )
    return checkpoint


def config_fingerprint(config: dict) -> str:
    """A short hash of a resolved config, stored in every checkpoint."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(stored: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += differing_keys(stored.get(key), current.get(key), name)
        return out
    return [] if stored == current else [(prefix, stored, current)]


def check_state_fits(found: dict, expected: dict, what: str, path: Path) -> None:
    """Refuse, naming the parts, a state dict whose keys or shapes are not this run's."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"this run has {_names(missing)} that the checkpoint lacks")
        if unexpected:
            parts.append(f"the checkpoint has {_names(unexpected)} that this run lacks")
        raise MMBalanceError(f"{path} does not fit this run's {what}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        value = found[key]
        if isinstance(tensor, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape != tensor.shape:
            raise MMBalanceError(
                f"{path} does not fit this run's {what}: {key} has shape {list(value.shape)} in the checkpoint "
                f"but {list(tensor.shape)} in this run (did the data or the model settings change since it was trained?)"
            )


def _names(keys: list[str]) -> str:
    groups = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(groups[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")
    return f"{len(keys)} entries ({shown})"


def rng_state() -> dict:
    """Python's, NumPy's and torch's RNG states, as tensors and numbers only."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
