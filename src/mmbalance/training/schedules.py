"""Learning-rate schedules: an optional linear warm-up per optimizer step, then an epoch-level scheduler.

``train.scheduler`` picks the epoch-level part: ``step`` (× gamma every
``step_size`` epochs), ``cosine`` (down to 0 over the epochs after the
warm-up), ``plateau`` (ReduceLROnPlateau on validation accuracy, mode max:
× gamma after ``plateau_patience`` epochs without a gain) or ``none``.

``train.warmup_epochs`` = E puts a linear warm-up in front of it: over the
first E epochs the learning rate rises per optimizer step from lr/S to lr
(S = E × the optimizer steps of an epoch), reaching lr exactly when the
E-th epoch ends; the epoch scheduler then starts as if the run began there
(its first decay after ``step_size`` further epochs, cosine spanning
``epochs − E``). Every schedule has a ``state_dict``, so a resumed run,
mid-warm-up too, continues exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau, StepLR


def epoch_scheduler(optimizer: torch.optim.Optimizer, train: Any) -> Optional[Any]:
    """The torch scheduler of ``train.scheduler`` for ``optimizer`` (None for ``none``)."""
    if train.scheduler == "step":
        return StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    if train.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max(train.epochs - train.warmup_epochs, 1))
    if train.scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max", factor=train.gamma, patience=train.plateau_patience)
    return None


def build_schedule(optimizer: torch.optim.Optimizer, train: Any, steps_per_epoch: int) -> Optional[Any]:
    """The run's schedule of one optimizer: the epoch scheduler, behind a warm-up when ``warmup_epochs`` > 0."""
    after = epoch_scheduler(optimizer, train)
    if train.warmup_epochs == 0:
        return after
    return WarmUp(optimizer, after, train.warmup_epochs, steps_per_epoch)


def step_after_optimizer(schedule: Any) -> None:
    """Called after every optimizer step: only a warm-up moves per step."""
    if isinstance(schedule, WarmUp):
        schedule.step_batch()


def step_after_epoch(schedule: Any, val_accuracy: float) -> None:
    """Called once per epoch, after validation: plateau reads the validation accuracy, the others count epochs."""
    if isinstance(schedule, WarmUp):
        schedule.step_epoch(val_accuracy)
    elif isinstance(schedule, ReduceLROnPlateau):
        schedule.step(val_accuracy)
    else:
        schedule.step()


class WarmUp:
    """Linear warm-up per optimizer step over ``epochs`` epochs, then ``after`` (an epoch scheduler or None).

    The learning rate of optimizer step s (1-based) is lr · s / S, S =
    ``epochs × steps_per_epoch``; when the last warm-up epoch ends it is lr,
    whatever the epochs' lengths were (an epoch plan may change them).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, after: Optional[Any], epochs: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.after = after
        self.epochs = epochs
        self.total = max(epochs * steps_per_epoch, 1)
        self.steps = 0  # optimizer steps taken during the warm-up
        self.epochs_done = 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._scale(1 / self.total)

    @property
    def warming(self) -> bool:
        return self.epochs_done < self.epochs

    def _scale(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step_batch(self) -> None:
        if self.warming:
            self.steps += 1
            self._scale(min(self.steps + 1, self.total) / self.total)

    def step_epoch(self, val_accuracy: float) -> None:
        if self.warming:
            self.epochs_done += 1
            if not self.warming:
                self._scale(1.0)
            return
        if self.after is not None:
            step_after_epoch(self.after, val_accuracy)

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "epochs_done": self.epochs_done,
            "base_lrs": list(self.base_lrs),
            "after": None if self.after is None else self.after.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.epochs_done = int(state["epochs_done"])
        self.base_lrs = list(state["base_lrs"])
        if self.after is not None and state.get("after") is not None:
            self.after.load_state_dict(state["after"])
