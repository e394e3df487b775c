"""What a method's hooks can see of the run (the trainer's side of the contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..models.parameters import ParameterGroups
from .distributed import DistributedState


@dataclass
class TrainContext:
    """The run as the parts see it.

    ``heldout_loader`` iterates data methods may estimate on (the validation
    split, or with ``data.heldout=carve`` a stratified part of the training
    data removed from training); ``train_eval_loader`` the training split in
    a fixed order. ``evaluate(loader)`` returns the run's metrics on any
    loader and leaves train mode as it was. ``manual_step(loss, ...)`` is the
    manual-optimisation path: backward, cross-process averaging, the
    plugins' ``after_backward``, clipping, the optimizer step.
    ``fit_teacher(name, module, loss, predict, epochs)`` trains a teacher
    module inside the run, resumably (``training/teachers.py``).
    ``encode(inputs)`` and ``predict_from_features(features)`` read the model
    as the run does (valuation passes that must score what the run predicts).

    ``global_step``, ``step_in_epoch`` and ``steps_per_epoch`` count optimizer
    steps: with ``train.accumulate`` = k, one step gathers k micro-batches
    (fewer at the end of an epoch). ``step_records`` holds the records of the
    micro-batches of the step being finished (``after_backward``,
    ``after_step``), the last one being the record those hooks receive; it is
    empty outside the trainer's step.
    """

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
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    train_loader: Any = None
    heldout_loader: Any = None
    train_eval_loader: Any = None
    params: ParameterGroups | None = None
    evaluate: Callable[[Any], dict] | None = None
    manual_step: Callable[..., None] | None = None
    fit_teacher: Callable[..., dict] | None = None
    #: the run's reading of the model: its objective's encode, and its prediction from features
    encode: Callable[[dict], dict] | None = None
    predict_from_features: Callable[[dict], torch.Tensor] | None = None
    #: the StepRecords of the optimizer step being finished, one per micro-batch
    step_records: list = field(default_factory=list)
    #: ``single_label`` or ``multi_label`` (``tasks.py``): how the run's labels, losses and predictions read
    task: str = "single_label"
