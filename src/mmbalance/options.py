"""A section's options as a table: type, default, search range, description (``mmbalance list options NAME``).

NAME is a method part (``midas``), a dataset (``synthetic``), a corruption
(``token_mask``: ``robust --set token_mask.unk_id=3``) or a core section
(``train``, ``data``, ``model``, ``log``). The search range is what ``mmbalance tune``
samples (the part's ``search_space``; ``train``'s joins with ``--tune-train``).
"""

from __future__ import annotations

import typing
from typing import Any

from .config import CORE_SECTIONS
from .errors import MMBalanceError
from .registry import CORRUPTIONS, DATASETS, METHODS, unknown_name_message
from .search_space import TRAIN_SPACE

BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def section_of(name: str) -> tuple[str, type, dict]:
    """(heading, Config class, search space) of a part, dataset, corruption or core section."""
    if name in METHODS:
        part = METHODS.get(name)
        return f"{name} ({part.kind}): {METHODS.describe(name)}", part.Config, dict(getattr(part, "search_space", {}))
    if name in DATASETS:
        return f"{name} (dataset): {DATASETS.describe(name)}", DATASETS.get(name).Config, {}
    if name in CORRUPTIONS:
        return f"{name} (corruption): {CORRUPTIONS.describe(name)}", CORRUPTIONS.get(name).Config, {}
    if name in CORE_SECTIONS:
        return f"{name} (core section)", CORE_SECTIONS[name], dict(TRAIN_SPACE) if name == "train" else {}
    raise MMBalanceError(unknown_name_message("method, dataset, corruption or section", name,
                                              [*METHODS.names(), *DATASETS.names(), *CORRUPTIONS.names(), *CORE_SECTIONS]))


def type_name(annotation: Any) -> str:
    """``Optional[Literal['a', 'b']]`` -> ``a | b | null``; ``list[float]`` -> ``list[float]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{inner}]" if inner else base
    return getattr(annotation, "__name__", str(annotation))


def constraint_text(field) -> str:
    """The field's numeric bounds, e.g. ``>= 0, < 1``."""
    parts = []
    for item in field.metadata:
        for attribute, symbol in BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value:g}" if isinstance(value, float) else f"{symbol} {value}")
    return ", ".join(parts)


def default_text(field) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def options_table(name: str) -> str:
    """Every option of ``name``: one line each, its description on the line below."""
    heading, schema, space = section_of(name)
    rows = []
    for key, field in schema.model_fields.items():
        kind = type_name(field.annotation)
        bounds = constraint_text(field)
        rows.append((key, kind + (f" ({bounds})" if bounds else ""), default_text(field),
                     f"tune {space[key]}" if key in space else "", field.description or ""))
    if not rows:
        return f"{heading}\n  (no options)"
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [heading]
    for key, kind, default, tuned, description in rows:
        cells = f"  {key:<{widths[0]}}  {kind:<{widths[1]}}  default {default:<{widths[2]}}  {tuned}".rstrip()
        lines.append(cells)
        if description:
            lines.append(f"      {description}")
    return "\n".join(lines)
