"""Method specs: ``'midas[lam=0.5]+ogm_ge[alpha=0.3]'`` -> parts with their options.

A spec names one objective and any number of plugins, joined by ``+``; each
may carry options in brackets, separated by ``;`` or ``,`` (a value may
itself be a bracketed list: ``x[views=[a,b];k=1]``). A spec of plugins only
runs them on ``joint``. The canonical form puts the objective first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import ConfigError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_OBJECTIVE = "joint"


@dataclass
class PartSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the options as written, for labels

    def label(self) -> str:
        return f"{self.name}[{self.text}]" if self.text else self.name


def _split_top_level(text: str, separators: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"bad method '{text}': unbalanced ']'")
        if char in separators and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ConfigError(f"bad method '{text}': unbalanced '['")
    parts.append(current)
    return parts


def split_methods(text: str) -> list[str]:
    """``'a,b[x=1,y=2]+c'`` -> ``['a', 'b[x=1,y=2]+c']``: the commas outside brackets separate specs."""
    return [p.strip() for p in _split_top_level(text, ",") if p.strip()]


def parse_part(text: str) -> PartSpec:
    text = text.strip()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    if not NAME.match(name):
        raise ConfigError(f"bad method '{text}': expected NAME or NAME[key=value,...]")
    if not bracket:
        return PartSpec(name)
    if not rest.endswith("]"):
        raise ConfigError(f"bad method '{text}': options must end with ']'")
    inner = rest[:-1]
    options: dict[str, Any] = {}
    for option in _split_top_level(inner, ";,"):
        if not option.strip():
            continue
        key, equals, raw = option.partition("=")
        key = key.strip()
        if not equals or not NAME.match(key):
            raise ConfigError(f"bad option '{option.strip()}' in '{text}': expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw.strip()
        if key in options:
            raise ConfigError(f"option '{key}' is given twice in '{text}'")
        options[key] = value
    return PartSpec(name, options, inner.strip())


def parse_spec(text: str) -> list[PartSpec]:
    """The parts of a spec, in the order written; every name once."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"bad method {text!r}: expected a name such as joint, or parts joined by '+' (midas+arl)")
    parts = [parse_part(p) for p in _split_top_level(text, "+")]
    seen: set[str] = set()
    for part in parts:
        if part.name in seen:
            raise ConfigError(f"method '{text}' names '{part.name}' twice")
        seen.add(part.name)
    return parts


def canonical(parts: list[PartSpec], objective: str) -> list[PartSpec]:
    """The objective first, then the plugins as written; ``joint`` when the spec has no objective."""
    names = [p.name for p in parts]
    head = [p for p in parts if p.name == objective] or [PartSpec(objective)]
    return head + [p for p in parts if p.name != objective and p.name in names]


def spec_string(parts: list[PartSpec], with_options: bool = False) -> str:
    return "+".join(p.label() if with_options else p.name for p in parts)
