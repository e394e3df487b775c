"""Gradient accumulation (``train.accumulate`` = k): k micro-batches per optimizer step.

Each micro-batch runs the forward hooks and its backward; its loss is
multiplied by its share of the step's samples (1/k when the micro-batches
are equal), so k micro-batches of b samples give the gradient of one batch
of k·b. The gradients are then averaged across processes, every part's
``after_backward`` runs once, they are clipped, and the optimizer steps.
An epoch whose batches do not divide by k ends with a shorter step, which
still steps. Coefficients of the field's methods are defined per optimizer
step (BASELINES §1.4.7), so only parts that declare ``accumulation = True``
may run with k > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..methods.compose import part_class
from ..registry import METHODS


def check_accumulation(accumulate: int, parts: list[str]) -> None:
    """One line naming the parts that cannot train with ``accumulate`` micro-batches per step."""
    if accumulate == 1:
        return
    unsupported = [name for name in parts if not part_class(name).accumulation]
    if unsupported:
        named = ", ".join(f"'{name}'" for name in unsupported)
        supported = ", ".join(name for name in METHODS.names() if part_class(name).accumulation)
        raise ConfigError(
            f"train.accumulate={accumulate} cannot run with {named}: they act on each batch's statistics, which "
            f"accumulation would split into micro-batches; use train.accumulate=1 (parts that accumulate: {supported})"
        )


@dataclass(frozen=True)
class MicroBatch:
    """Where one batch of the loader sits in its optimizer step."""

    step: int  # the optimizer step of the epoch (0-based)
    first: bool  # opens the step: the gradients are cleared first
    last: bool  # closes the step: the gradients are finished and the optimizer steps
    weight: float  # its share of the step's samples; its loss is multiplied by it


def micro_batches(num_samples: int, batch_size: int, accumulate: int) -> list[MicroBatch]:
    """The micro-batches of an epoch of ``num_samples`` (this process's) in batches of ``batch_size``."""
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    out = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start:start + accumulate]
        total = sum(group)
        for slot, size in enumerate(group):
            out.append(MicroBatch(start // accumulate, slot == 0, slot == len(group) - 1, size / total))
    return out


def optimizer_steps(num_batches: int, accumulate: int) -> int:
    """Optimizer steps of an epoch of ``num_batches`` batches."""
    return -(-num_batches // accumulate)
