"""Name -> class registries for methods, datasets, encoders, fusion heads, corruptions and metrics.

Every pluggable component is found by name, the way timm finds models: a
decorator registers a class, ``get`` looks it up and suggests the closest name
on a typo, ``names`` lists what exists for the CLI.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str | None:
    """The most similar choice, or None when nothing is close."""
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind: str, name: str, choices: list[str]) -> str:
    hint = closest(name, choices)
    did_you_mean = f"; did you mean '{hint}'?" if hint else ""
    return f"unknown {kind} '{name}'{did_you_mean} (allowed: {', '.join(sorted(choices))})"


class Registry(Generic[T]):
    """A named collection of classes of one kind ("method", "dataset", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            try:
                setattr(obj, "registry_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and interactive sessions that register throwaway parts)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise UnknownNameError(
                f"{self.kind} name must be a string, got {type(name).__name__} "
                f"(allowed: {', '.join(self.names())})"
            )
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names())) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        """First line of the registered object's docstring."""
        doc = (getattr(self.get(name), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


METHODS: Registry = Registry("method")
DATASETS: Registry = Registry("dataset")
ENCODERS: Registry = Registry("encoder")
FUSIONS: Registry = Registry("fusion")
CORRUPTIONS: Registry = Registry("corruption")
METRICS: Registry = Registry("metric")
