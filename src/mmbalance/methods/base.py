"""The Method: a training recipe expressed as hooks around one shared loop.

The trainer calls these hooks and never asks which method it runs. A new
method is one file: a subclass registered in ``METHODS`` with a ``Config``
section, overriding the hooks it needs. A method is an ``nn.Module`` so that
modules it adds in ``setup`` (bottlenecks, projections) are trained by the
run's optimizer and saved in checkpoints; Python-side running statistics go
through ``get_extra_state``/``set_extra_state``.

Order of calls in one optimisation step::

    result = method.training_step(model, batch, ctx)   # loss and logits
    result.loss.backward()                             # unless manual_optimization
    (gradients averaged across processes)
    method.after_backward(model, ctx)                  # gradient modulation
    optimizer.step(); method.after_step(model, ctx)    # running statistics
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Section
from ..data.batch import Batch
from ..models.multimodal import MultimodalModel, zero_out


@dataclass
class StepResult:
    """What a training step returns: the loss to minimise and what to log.

    ``logits`` are the fused predictions on the aligned batch, used for the
    training accuracy; ``logs`` are scalars averaged over the epoch.
    """

    loss: Tensor
    logits: Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class: plain fused cross-entropy unless a subclass says otherwise."""

    class Config(Section):
        pass

    manual_optimization: bool = False

    def __init__(self, config: Section, modalities: list[str], num_classes: int):
        super().__init__()
        self.config = config
        self.modalities = list(modalities)
        self.num_classes = num_classes

    # -- hooks -------------------------------------------------------------
    def setup(self, model: MultimodalModel, ctx: Any) -> None:
        """Add modules or snapshot weights before the optimizer is built."""

    def on_epoch_start(self, model: MultimodalModel, ctx: Any) -> None:
        pass

    def training_step(self, model: MultimodalModel, batch: Batch, ctx: Any) -> StepResult:
        raise NotImplementedError

    def after_backward(self, model: MultimodalModel, ctx: Any) -> None:
        """Gradients exist (and are averaged across processes); modulate them here."""

    def after_step(self, model: MultimodalModel, ctx: Any) -> None:
        """The optimizer has stepped; update running statistics here."""

    def on_epoch_end(self, model: MultimodalModel, ctx: Any) -> dict[str, float]:
        """Per-epoch quantities to log (e.g. a method's weights)."""
        return {}

    # -- how this method's model is read ------------------------------------
    def encode(self, model: MultimodalModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return model.encode(inputs)

    def fuse(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        return model.fuse(features)

    def heads(self, model: MultimodalModel, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return model.heads(features)

    def predict_from_features(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        """The method's prediction; evaluation and checkpoint selection use it."""
        return self.fuse(model, features)

    def predict(self, model: MultimodalModel, inputs: dict[str, Tensor]) -> Tensor:
        return self.predict_from_features(model, self.encode(model, inputs))

    # -- shared pieces ------------------------------------------------------
    @staticmethod
    def probe_loss(model: MultimodalModel, features: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Unimodal heads trained on detached features: a linear probe of each encoder.

        It reports how much each encoder has learned without changing the
        encoders, for methods that do not train the heads themselves.
        """
        logits = model.heads({m: f.detach() for m, f in features.items()})
        return sum(F.cross_entropy(z, labels) for z in logits.values())

    @staticmethod
    def zeroed(features: dict[str, Tensor], keep) -> dict[str, Tensor]:
        return zero_out(features, keep)


def accuracy_of(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())
