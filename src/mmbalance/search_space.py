"""Search spaces: the values an option is tuned over, declared next to the option.

A part declares ``search_space = {"lam": FloatRange(0.1, 4.0, log=True),
"variant": Choice(["paper", "official"])}`` beside its ``Config``; ``mmbalance
tune`` samples every part of a spec (keys become ``midas.lam``) and ``mmbalance
list options NAME`` shows each range next to the option's type and default.
A range is a claim about the option, so it is checked against the option's own
validation: every endpoint and every choice must be a value the section accepts
(``check_space``), and a declared key that is not an option is an error.

The types know no tuner: ``suggest(trial, key)`` calls the trial's
``suggest_float``, ``suggest_int`` or ``suggest_categorical`` (Optuna's trial,
or anything with those methods). This module sits beside ``config`` so that
every layer above it, methods included, may declare spaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from pydantic import ValidationError

from .errors import ConfigError


@dataclass(frozen=True)
class FloatRange:
    """A real option sampled from [low, high]; ``log`` samples its logarithm uniformly (scales, weights)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        for value in (self.low, self.high):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"FloatRange bounds must be finite numbers, got {value!r}")
        if not self.low < self.high:
            raise ConfigError(f"FloatRange needs low < high, got {self.low!r} and {self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"FloatRange(log=True) needs low > 0, got {self.low!r}")

    def suggest(self, trial: Any, key: str) -> float:
        return trial.suggest_float(key, float(self.low), float(self.high), log=self.log)

    def edges(self) -> list[float]:
        """The values that bound every sample: checked against the option's validation."""
        return [float(self.low), float(self.high)]

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class IntRange:
    """An integer option sampled from low..high (both included), in steps of ``step``."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self):
        for value in (self.low, self.high, self.step):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"IntRange bounds and step must be integers, got {value!r}")
        if not self.low < self.high:
            raise ConfigError(f"IntRange needs low < high, got {self.low} and {self.high}")
        if self.step < 1 or (self.high - self.low) % self.step:
            raise ConfigError(f"IntRange step {self.step} must be >= 1 and divide high - low ({self.high - self.low})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ConfigError("IntRange(log=True) needs low >= 1 and step 1")

    def suggest(self, trial: Any, key: str) -> int:
        return trial.suggest_int(key, self.low, self.high, step=self.step, log=self.log)

    def edges(self) -> list[int]:
        return [self.low, self.high]

    def __str__(self) -> str:
        step = f" step {self.step}" if self.step != 1 else ""
        return f"{self.low}..{self.high}{step}" + (" log" if self.log else "")


class Choice:
    """One of a few values: variants, switches, rules (None, booleans, numbers or strings)."""

    def __init__(self, options: Sequence[Any]):
        options = tuple(options)
        if len(options) < 2:
            raise ConfigError(f"Choice needs at least two options, got {list(options)!r}")
        for value in options:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"Choice options must be None, booleans, numbers or strings, got {value!r}")
        if len(set(map(repr, options))) != len(options):
            raise ConfigError(f"Choice lists an option twice: {list(options)!r}")
        self.options = options

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.options))

    def edges(self) -> list[Any]:
        return list(self.options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Choice) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        return f"Choice({list(self.options)!r})"

    def __str__(self) -> str:
        return "{" + ", ".join("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                               for v in self.options) + "}"


Range = Union[FloatRange, IntRange, Choice]

#: the trainer's options joined by ``mmbalance tune --tune-train`` (config.TrainConfig)
TRAIN_SPACE: dict[str, Range] = {
    "lr": FloatRange(1e-4, 1e-1, log=True),
    "weight_decay": FloatRange(1e-6, 1e-2, log=True),
}


def check_space(section: str, schema: type, space: Mapping[str, Any]) -> None:
    """Refuse, in one line, a space whose key is not an option of ``schema`` or whose range it rejects.

    Each endpoint and choice is validated by the section itself (from its
    defaults), so a range can never produce a value the option refuses.
    """
    options = list(getattr(schema, "model_fields", {}))
    for key, value in space.items():
        if key not in options:
            raise ConfigError(
                f"the search space of '{section}' names '{key}', which is not one of its options "
                f"({', '.join(options) or 'none'})"
            )
        if not isinstance(value, (FloatRange, IntRange, Choice)):
            raise ConfigError(
                f"the search space of '{section}' gives {key} a {type(value).__name__}; "
                "use FloatRange, IntRange or Choice"
            )
        for edge in value.edges():
            try:
                schema(**{key: edge})
            except ValidationError as exc:
                message = exc.errors()[0]["msg"]
                raise ConfigError(
                    f"the search space of '{section}' lets {key} be {edge!r}, which {section}.{key} refuses ({message})"
                ) from None
