"""The method a run trains: one objective and its plugins, run as one.

``resolve`` checks a spec against the registry and the composition rules
before anything is built; ``Method`` calls every hook of every part in
order (objective first, then plugins as written) and is what the trainer
and evaluation talk to. The rules, each refused with one line naming both
parts: exactly one objective; at most one part that drives the optimizer
(manual optimisation or its own optimizers); at most one part that
overrides the prediction; at most one part per ``exclusive`` role; at most one part that plans the
epochs (``epoch_plan``), and only with an objective that honours
``batch.keep``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..models.multimodal import MultimodalModel
from ..registry import METHODS
from .base import Objective, Part
from .record import StepRecord
from .spec import DEFAULT_OBJECTIVE, PartSpec, canonical, parse_spec


def part_class(name: str) -> type[Part]:
    return METHODS.get(name)


def resolve(text: str) -> list[PartSpec]:
    """The canonical parts of a spec (objective first), or one line saying why they cannot run together."""
    parts = parse_spec(text)
    classes = {p.name: part_class(p.name) for p in parts}
    objectives = [p.name for p in parts if issubclass(classes[p.name], Objective)]
    if len(objectives) > 1:
        raise ConfigError(
            f"method '{text}' has two objectives, '{objectives[0]}' and '{objectives[1]}'; "
            f"combine one objective with plugins ({', '.join(plugin_names()) or 'none registered'})"
        )
    objective = objectives[0] if objectives else DEFAULT_OBJECTIVE
    parts = canonical(parts, objective)
    check_compatible([(p.name, part_class(p.name)) for p in parts], text)
    return parts


def check_compatible(named: list[tuple[str, type[Part]]], text: str) -> None:
    rules = [
        ("drive the optimizer", lambda cls: cls.drives_optimizer()),
        ("override the prediction", lambda cls: cls.overrides_prediction()),
        ("plan the epochs", lambda cls: cls.plans_epochs()),
    ]
    for reason, holds in rules:
        claimants = [name for name, cls in named if holds(cls)]
        if len(claimants) > 1:
            raise ConfigError(f"method '{text}' cannot combine '{claimants[0]}' and '{claimants[1]}': both {reason}")
    planners = [name for name, cls in named if cls.plans_epochs()]
    objective_name, objective = named[0]
    if planners and issubclass(objective, Objective) and not objective.honours_keep:
        keeping = ", ".join(n for n in objective_names() if part_class(n).honours_keep)
        raise ConfigError(
            f"method '{text}' cannot combine '{objective_name}' and '{planners[0]}': '{planners[0]}' trains on copies "
            f"of samples that keep only some modalities, which '{objective_name}' does not honour; "
            f"objectives that do: {keeping or 'none'}"
        )
    manual = [name for name, cls in named if cls.manual_optimization]
    if manual:
        # a part that runs its own backward passes has trained before any on_forward of another part runs
        late = [name for name, cls in named if name not in manual and cls.on_forward is not Part.on_forward]
        if late:
            raise ConfigError(
                f"method '{text}' cannot combine '{manual[0]}' and '{late[0]}': '{manual[0]}' runs its own backward "
                f"passes inside its step, so '{late[0]}' (which acts on the step's forward pass) would change nothing"
            )
    roles: dict[str, str] = {}
    for name, cls in named:
        for role in cls.exclusive:
            if role in roles:
                raise ConfigError(f"method '{text}' cannot combine '{roles[role]}' and '{name}': both do {role.replace('_', ' ')}")
            roles[role] = name


def plugin_names() -> list[str]:
    return [n for n in METHODS.names() if not issubclass(METHODS.get(n), Objective)]


def objective_names() -> list[str]:
    return [n for n in METHODS.names() if issubclass(METHODS.get(n), Objective)]


class Method(nn.Module):
    """A run's objective and plugins, called in order; the trainer knows only this."""

    def __init__(self, parts: list[Part]):
        super().__init__()
        if not parts or not isinstance(parts[0], Objective):
            raise ValueError("a method starts with its objective")
        self.parts = nn.ModuleDict({p.name: p for p in parts})
        self.objective: Objective = parts[0]
        self.spec = "+".join(self.parts)
        predictors = [p for p in parts if type(p).overrides_prediction()]
        self._predictor = predictors[0] if predictors else self.objective

    @classmethod
    def build(cls, config, modalities: list[str], num_classes: int) -> "Method":
        parts = [part_class(name)(config.section(name), modalities, num_classes) for name in config.parts]
        return cls(parts)

    @property
    def manual_optimization(self) -> bool:
        return any(p.manual_optimization for p in self.parts.values())

    def __iter__(self):
        return iter(self.parts.values())

    # -- how the model is read: the objective's, the prediction possibly a plugin's ----
    def encode(self, model: MultimodalModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective.encode(model, inputs)

    def fuse(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        return self.objective.fuse(model, features)

    def heads(self, model: MultimodalModel, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective.heads(model, features)

    def predict_from_features(self, model: MultimodalModel, features: dict[str, Tensor]) -> Tensor:
        return self._predictor.predict_from_features(model, features)

    def predict(self, model: MultimodalModel, inputs: dict[str, Tensor]) -> Tensor:
        return self.predict_from_features(model, self.encode(model, inputs))

    # -- hooks, for every part ----------------------------------------------------
    def setup(self, model, ctx) -> None:
        for part in self:
            part.setup(model, ctx)

    def epoch_plan(self, model, ctx):
        for part in self:
            plan = part.epoch_plan(model, ctx)
            if plan is not None:
                return plan
        return None

    def configure_optimizers(self, model, ctx) -> dict[str, Any] | None:
        for part in self:
            configured = part.configure_optimizers(model, ctx)
            if configured is not None:
                return configured
        return None

    def on_epoch_start(self, model, ctx) -> None:
        for part in self:
            part.on_epoch_start(model, ctx)

    def training_step(self, model, batch, ctx) -> StepRecord:
        for part in self:
            part.before_step(batch, ctx)
        record = self.objective.training_step(model, batch, ctx)
        for part in self:
            part.on_forward(record, ctx)
        return record

    def after_backward(self, record: StepRecord, ctx) -> None:
        for part in self:
            part.after_backward(record, ctx)

    def after_step(self, record: StepRecord, ctx) -> None:
        for part in self:
            part.after_step(record, ctx)

    def on_epoch_end(self, model, ctx) -> dict[str, float]:
        logs: dict[str, float] = {}
        for part in self:
            logs.update(part.on_epoch_end(model, ctx) or {})
        return logs

    def metrics(self) -> list:
        return [metric for part in self for metric in part.metrics()]
