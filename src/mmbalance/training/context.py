"""What a method's hooks can see of the run (the trainer's side of the contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .distributed import DistributedState


@dataclass
class TrainContext:
    epoch: int
    max_epochs: int
    steps_per_epoch: int
    device: torch.device
    modalities: list[str]
    num_classes: int
    generator: torch.Generator
    dist: DistributedState
    global_step: int = 0
    step_in_epoch: int = 0
    optimizer: torch.optim.Optimizer | None = None
    make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    train_loader: Any = None
    heldout_loader: Any = None
    train_eval_loader: Any = None
    params: dict = field(default_factory=dict)
