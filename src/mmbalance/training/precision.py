"""Mixed precision (``train.precision``): autocast for the training forward, gradient scaling for float16.

``"32"`` changes nothing. ``"bf16"`` runs the training forward pass (the
parts' ``before_step``, the objective's ``training_step``, the parts'
``on_forward``) and the parts' ``after_step`` (which may compute on the
step's tensors, as LeMDA's augmenter step does) under ``torch.autocast``
with bfloat16, on the CPU or a GPU.
``"16"`` does the same with float16, on CUDA only, and scales the loss with
a ``GradScaler`` so that small gradients do not underflow.

Backward passes, every ``after_backward``, clipping and the optimizer step
run outside autocast, and the gradients are unscaled before any part's
``after_backward`` sees them (BASELINES §1.4.7: OGM-GE's noise follows their
scale). A float16 step whose gradients hold inf or nan is skipped by the
scaler, which then lowers its scale. Evaluation always runs in float32, and
so do teachers trained inside the run (``ctx.fit_teacher``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch

from ..errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def check_precision(setting: str, device: torch.device) -> None:
    """One line, before any data is read, when the device cannot train at ``setting``."""
    if setting == "16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision=16 (float16 with gradient scaling) needs a CUDA device, this run trains on {device.type}; "
            "use train.precision=bf16 or 32"
        )
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {device} does not support bfloat16; use train.precision=16 or 32")


class Precision:
    """The run's precision: a context for the training forward, and the scaled backward and step.

    ``scaler`` replaces the float16 ``GradScaler`` (tests pass a CPU one).
    """

    def __init__(self, setting: str, device: torch.device, scaler: Any = None):
        self.setting = setting
        self.device = device
        self.dtype = AUTOCAST_DTYPES.get(setting)
        if scaler is None and setting == "16":
            scaler = torch.amp.GradScaler(device.type)
        self.scaler = scaler
        self._unscaled: set[int] = set()

    def forward(self):
        """The context of the training forward pass: autocast, or nothing at 32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def full(self):
        """A float32 context inside the forward's (backward passes of manual steps, evaluation)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Divide the gradients of ``optimizers`` by the scale (once per optimizer and step)."""
        if self.scaler is None:
            return
        for optimizer in optimizers:
            if id(optimizer) not in self._unscaled and has_gradients(optimizer):
                self.scaler.unscale_(optimizer)
                self._unscaled.add(id(optimizer))

    def step(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Step every optimizer (the scaler skips them all when a gradient is inf or nan), then update the scale."""
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return
        # an optimizer without any gradient would not move anyway, and the scaler refuses it (a step of
        # frozen teachers only, e.g. UME's, has none at all: then the scale stays as it is)
        stepping = [optimizer for optimizer in optimizers if has_gradients(optimizer)]
        for optimizer in stepping:
            self.scaler.step(optimizer)
        if stepping:
            self.scaler.update()
        self._unscaled.clear()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])
