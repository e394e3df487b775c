"""Parts of a training method: one objective and any number of plugins.

A run's method is a composition such as ``midas+arl``: the *objective*
(``midas``) defines the loss and how the model is read and predicts; each
*plugin* (``arl``) adds what works with any objective: gradient modulation,
epoch-level schedules, sample weights, running statistics, auxiliary loss
terms. Every part is an ``nn.Module`` with its own config section, so
modules it adds in ``setup`` are trained and checkpointed like the model.

Order of calls in one optimisation step (``Method`` runs them for every
part, the objective first, then the plugins in the order of the spec)::

    (epoch start) part.epoch_plan(model, ctx)  # at most one part: which samples and modalities
    part.before_step(batch, ctx)              # e.g. set batch.weight
    record = objective.training_step(model, batch, ctx)
    part.on_forward(record, ctx)              # read the record, add loss terms, hook gradients
    record.loss.backward()                    # the sum of the named terms
    (gradients averaged across processes)
    part.after_backward(record, ctx)          # modulate .grad
    (clipping) optimizer.step()
    part.after_step(record, ctx)              # running statistics

An objective with ``manual_optimization = True`` does its own backward and
steps through ``ctx.manual_step``, which keeps averaging, the plugins'
``after_backward`` and clipping.

With ``train.accumulate`` = k the forward hooks and the backward run per
micro-batch; averaging, ``after_backward``, clipping, the step and
``after_step`` run once per optimizer step, with the last micro-batch's
record (``ctx.step_records`` holds them all). Only parts that declare
``accumulation = True`` may run so.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from ..config import Section
from ..data.batch import Batch
from ..data.plan import EpochPlan
from ..errors import ConfigError
from ..models.multimodal import MultimodalModel, keep_features
from ..registry import METHODS
from ..tasks import MULTI_LABEL, POS_WEIGHT, exact_matches, task_loss
from .record import StepRecord
from .window import WindowConfig, window_bounds


class Part(nn.Module):
    """What objectives and plugins share: a config, hooks and declared capabilities."""

    class Config(Section):
        pass

    kind: ClassVar[str] = "part"
    #: recommended settings, as dotted keys, applied below the user's own (visible in config.yaml)
    defaults: ClassVar[dict[str, Any]] = {}
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[Optional[int]] = None
    #: roles at most one part of a run may play (e.g. two parts accelerating by the same contribution)
    exclusive: ClassVar[tuple[str, ...]] = ()
    #: the part calls backward and steps the optimizer itself (through ``ctx.manual_step``)
    manual_optimization: ClassVar[bool] = False
    #: the part trains correctly with ``train.accumulate`` > 1 (several micro-batches per optimizer
    #: step): its work is loss terms, schedules, or statistics pooled over ``ctx.step_records``
    #: (BASELINES §1.4.7). Off by default: a part that modulates gradients from each batch's
    #: statistics would apply them per micro-batch, so a run with accumulation refuses it.
    accumulation: ClassVar[bool] = False
    #: the part trains correctly on multi-label data (labels [B, C] of 0/1, ``tasks.py``): its losses go
    #: through ``task_loss`` / ``cross_entropy`` and its rule reads no single true class per sample
    #: (a class's probability, a prototype, a top-1 hit). Off by default: a run combining a part without
    #: it and a multi-label dataset is refused before training (``check_task_support``).
    multi_label: ClassVar[bool] = False

    def __init__(self, config: Section, modalities: list[str], num_classes: int):
        super().__init__()
        self.config = config
        self.modalities = list(modalities)
        self.num_classes = num_classes
        count = len(self.modalities)
        if count < self.min_modalities or (self.max_modalities is not None and count > self.max_modalities):
            allowed = f"{self.min_modalities}" if self.max_modalities == self.min_modalities else (
                f"at least {self.min_modalities}" if self.max_modalities is None
                else f"{self.min_modalities} to {self.max_modalities}"
            )
            raise ConfigError(f"{self.name} needs {allowed} modalities (the dataset has {count}: {', '.join(self.modalities)})")
        if isinstance(config, WindowConfig):
            window_bounds(config)  # an empty modulation window is refused before training, for every part

    @classmethod
    def pinned_options(cls, config: Section, epochs: int) -> dict[str, Any]:
        """Options whose unset value follows ``train.epochs``, resolved for ``epochs``.

        When a run is extended to more epochs these are written into its
        config first, so that its schedule (e.g. a warm-up of epochs / 7) stays
        what it was.
        """
        return {}

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__.lower())

    # -- capabilities, for the composition rules ------------------------------
    @classmethod
    def overrides_prediction(cls) -> bool:
        return cls.predict_from_features is not Part.predict_from_features and cls.predict_from_features is not Objective.predict_from_features

    @classmethod
    def plans_epochs(cls) -> bool:
        return cls.epoch_plan is not Part.epoch_plan

    @classmethod
    def drives_optimizer(cls) -> bool:
        return cls.manual_optimization or cls.configure_optimizers is not Part.configure_optimizers

    # -- hooks -------------------------------------------------------------------
    def setup(self, model: MultimodalModel, ctx: Any) -> None:
        """Add modules or snapshot weights; runs before the optimizers are built."""

    def configure_optimizers(self, model: MultimodalModel, ctx: Any) -> Optional[dict[str, Any]]:
        """``{"optimizers": {name: opt}, "schedulers": {name: sched}}`` to replace the run's one optimizer.

        ``ctx.make_optimizer(params)`` builds one with the run's settings and
        ``ctx.params`` holds the parameter groups. Every optimizer and
        scheduler returned is checkpointed. At most one part of a run may
        configure optimizers.
        """
        return None

    def on_epoch_start(self, model: MultimodalModel, ctx: Any) -> None:
        pass

    def epoch_plan(self, model: MultimodalModel, ctx: Any) -> Optional[EpochPlan]:
        """Which training samples this epoch visits and which modalities each keeps (``data/plan.py``).

        Called after ``on_epoch_start``; None trains on every sample once. The
        plan must follow from the part's state, so a resumed run plans alike.
        At most one part of a run may plan epochs.
        """
        return None

    def before_step(self, batch: Batch, ctx: Any) -> None:
        """Before the forward pass: e.g. set ``batch.weight`` (per-sample loss weights)."""

    def on_forward(self, record: StepRecord, ctx: Any) -> None:
        """After the objective's forward: read the record, add loss terms, attach gradient hooks."""

    def after_backward(self, record: StepRecord, ctx: Any) -> None:
        """Gradients exist and are averaged across processes; modulate them here."""

    def after_step(self, record: StepRecord, ctx: Any) -> None:
        """The optimizer has stepped; update running statistics here."""

    def on_epoch_end(self, model: MultimodalModel, ctx: Any) -> dict[str, float]:
        """Per-epoch quantities to log."""
        return {}

    def metrics(self) -> list:
        """Evaluation metrics this part adds (``evaluation.metrics.Metric`` objects)."""
        return []

    def predict_from_features(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        """Override to change the run's prediction (at most one part of a run may)."""
        raise NotImplementedError


class Objective(Part):
    """The part that defines the loss and how the model is read; every run has exactly one."""

    kind = "objective"
    #: the objective zeroes, per sample, the features of modalities ``batch.keep`` drops (``encode_batch``),
    #: so it can train on an epoch plan that keeps only some modalities of a sample
    honours_keep: ClassVar[bool] = False

    def training_step(self, model: MultimodalModel, batch: Batch, ctx: Any) -> StepRecord:
        raise NotImplementedError

    # -- how this objective reads the model --------------------------------------
    def encode(self, model: MultimodalModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return model.encode(inputs)

    def encode_batch(self, model: MultimodalModel, batch: Batch) -> dict[str, Tensor]:
        """The batch's features, with those of the modalities ``batch.keep`` drops zeroed."""
        return keep_features(self.encode(model, batch.inputs), batch.keep, self.modalities)

    def fuse(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        return model.fuse(features)

    def heads(self, model: MultimodalModel, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return model.heads(features)

    def predict_from_features(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        """The prediction that evaluation and checkpoint selection use (default: the fused head)."""
        return self.fuse(model, features)

    def record(self, model: MultimodalModel, batch: Batch, features: dict[str, Tensor], **fields: Any) -> StepRecord:
        """A record bound to this objective's fusion head."""
        return StepRecord(batch=batch, fuse=lambda f: self.fuse(model, f), modalities=self.modalities,
                          features=features, **fields)

    # -- shared pieces -------------------------------------------------------------
    @staticmethod
    def probe_loss(model: MultimodalModel, features: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Unimodal heads trained on detached features: a linear probe of each encoder.

        It reports how much each encoder has learned without changing the
        encoders, for objectives that do not train the heads themselves.
        Returns the summed loss and the probe logits.
        """
        logits = model.heads({m: f.detach() for m, f in features.items()})
        return sum(task_loss(z, labels) for z in logits.values()), logits


class Plugin(Part):
    """A part that works with any objective: it never defines the main loss.

    A plugin may add auxiliary loss terms (``record.add_loss``); the options
    that weight them are named in ``auxiliary_options``, so that its other
    effects can be told apart (outside its window, with those weights at
    zero, a plugin leaves every gradient as its objective made it).
    """

    kind = "plugin"
    auxiliary_options: ClassVar[tuple[str, ...]] = ()


def cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """The batch's mean task loss, each sample weighted by ``batch.weight`` when a plugin set one.

    Cross-entropy for class ids; for multi-label rows binary cross-entropy per
    class (``tasks.task_loss``), with the run's positive-class weights
    (``train.pos_weight``) that the trainer puts in ``batch.extras``.
    """
    return task_loss(logits, batch.labels, batch.weight, batch.extras.get(POS_WEIGHT))


def accuracy_of(logits: Tensor, labels: Tensor) -> Tensor:
    """Share of exact hits: the argmax is the class, or (multi-label) every class is on exactly when labelled."""
    return exact_matches(logits.detach(), labels).float().mean()


def check_task_support(parts: list[str], task: str, dataset: str) -> None:
    """Refuse, in one line, a method with a part that cannot train on ``task`` (see ``Part.multi_label``)."""
    if task != MULTI_LABEL:
        return
    unsupported = [name for name in parts if not METHODS.get(name).multi_label]
    if unsupported:
        able = ", ".join(n for n in METHODS.names() if not n.startswith("_") and METHODS.get(n).multi_label)
        raise ConfigError(
            f"method '{'+'.join(parts)}' cannot train on the multi-label data of '{dataset}': '{unsupported[0]}' "
            f"does not support multi-label classification (parts that do: {able})"
        )


