"""Checkpoints written atomically, so a killed run never leaves a torn file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MMBalanceError
from ..files import atomic_write_bytes


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MMBalanceError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise MMBalanceError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
