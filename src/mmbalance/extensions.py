"""Your own methods, datasets, encoders and fusions, without editing mmbalance.

Register a class with the usual decorator in your own module, e.g.
``@METHODS.register("my_plugin")``; the command line finds it when either

- your installed package declares an entry point in the group
  ``mmbalance.plugins`` (``[project.entry-points."mmbalance.plugins"]``,
  ``mine = "my_package.methods"``): every such module is imported when the
  ``mmbalance`` command starts; or
- you name the module: ``mmbalance --import my_module train ...``
  (repeatable; the module must be importable, e.g. on ``PYTHONPATH``).

From Python, importing your module is enough.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Iterable

from .errors import MMBalanceError

ENTRY_POINT_GROUP = "mmbalance.plugins"


def load_extensions(modules: Iterable[str] = (), entry_point_group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import every entry point of ``mmbalance.plugins`` and every named module; return what was loaded."""
    loaded = []
    for entry in entry_points(group=entry_point_group):
        try:
            entry.load()
        except Exception as exc:
            raise MMBalanceError(
                f"extension '{entry.name}' ({entry.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from None
        loaded.append(entry.value)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MMBalanceError(f"--import {name}: cannot import it ({exc}); is it on PYTHONPATH?") from None
        loaded.append(name)
    return loaded
