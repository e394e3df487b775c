"""What one training step computed, handed from the objective to every later hook.

The objective's ``training_step`` fills a ``StepRecord``; plugins read it in
``on_forward`` (before the loss is summed), ``after_backward`` and
``after_step``. Nothing passes between hooks through attributes of a part.
Readouts that cost fusion passes (d_m, zeroed logits) are computed on first
use and cached, so two plugins asking for them pay once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..data.batch import Batch
from ..models.readouts import coalition_logits, zeroed_logits


@dataclass(eq=False)
class StepRecord:
    """The step's tensors (with their graph) and its named loss terms.

    ``features``: what the fusion head and unimodal heads read (after any
    bottleneck). ``encoder_outputs``: the encoders' raw outputs, where a
    plugin scales the gradient reaching an encoder (default: ``features``).
    ``logits``: fused logits on the aligned batch. ``unimodal``: unimodal
    head logits (None if the objective has none). ``losses``: named terms,
    each already weighted; the trainer minimises their sum. ``logs``:
    scalars (tensors stay on the device) averaged over the epoch.
    ``shared``: values one part publishes for the parts after it.
    """

    batch: Batch
    fuse: Callable[[dict[str, Tensor]], Tensor]
    modalities: list[str]
    features: dict[str, Tensor] | None = None
    logits: Tensor | None = None
    unimodal: dict[str, Tensor] | None = None
    encoder_outputs: dict[str, Tensor] | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.encoder_outputs is None:
            self.encoder_outputs = self.features

    @property
    def labels(self) -> Tensor:
        return self.batch.labels

    @property
    def loss(self) -> Tensor:
        """The sum of every loss term (objective's and plugins')."""
        if not self.losses:
            raise RuntimeError("the step recorded no loss term")
        return torch.stack([term.float() for term in self.losses.values()]).sum()

    def add_loss(self, name: str, value: Tensor) -> None:
        """Add a named, already weighted term; ``loss/NAME`` is logged with it."""
        if name in self.losses:
            raise ValueError(f"loss term '{name}' is recorded twice")
        self.losses[name] = value

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def restricted_logits(self) -> Tensor:
        """[M, B, C] d_m (BASELINES §1.1), with gradient; computed once per step."""
        def compute() -> Tensor:
            count = len(self.modalities)
            return self.zeroed_logits() - (count - 1) / count * coalition_logits(self.fuse, self.features, [])

        return self.cached("restricted", compute)

    def zeroed_logits(self) -> Tensor:
        """[M, B, C] fuse(f^{m}), with gradient; computed once per step."""
        return self.cached("zeroed", lambda: zeroed_logits(self.fuse, self.features, self.modalities))

    def loss_logs(self) -> dict[str, Tensor]:
        return {f"loss/{name}": value.detach() for name, value in self.losses.items()}
