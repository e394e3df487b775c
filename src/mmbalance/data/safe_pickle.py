"""Reading pickles that may hold only numpy arrays and plain Python data.

Unpickling calls whatever function the file names, so a pickle from
elsewhere could run any code. ``load_arrays`` admits only the numpy
functions that rebuild arrays, dtypes and scalars, plus the latin-1
``_codecs.encode`` and empty ``bytes()`` that protocol 0-2 pickles use for
bytes; dicts, lists, tuples, strings and numbers need no function at all.
Any other name is refused before it is called, with a ``DataError`` naming
the file and the name.
"""

from __future__ import annotations

import codecs
import math
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError

try:  # numpy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

ALLOWED = "numpy arrays, numbers, strings, lists, tuples and dicts"


class _ArrayClass:
    """Stands in for ``numpy.ndarray``: it may only be named to ``_reconstruct``, never called to allocate."""


def _reconstruct(cls, shape, dtype):
    """numpy's array rebuild step, which pickles always give an empty shape (the data comes after)."""
    if cls is not _ArrayClass or not isinstance(shape, tuple) or math.prod(shape) != 0:
        raise pickle.UnpicklingError("an array is rebuilt in a way numpy never writes")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _latin1(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as protocol 0-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 is allowed)")
    return codecs.encode(text, "latin1", errors)


def _empty_bytes(*args):
    """``bytes()`` as protocol 0-2 pickles write ``b""``; ``bytes(n)`` would allocate n bytes."""
    if args:
        raise pickle.UnpicklingError("bytes() is only allowed without arguments")
    return b""


_GLOBALS = {}
for _module in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _GLOBALS[(_module, "_reconstruct")] = _reconstruct
    _GLOBALS[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy._core.numeric", "numpy.core.numeric"):
    _GLOBALS[(_module, "_frombuffer")] = _numeric._frombuffer
_GLOBALS[("numpy", "ndarray")] = _ArrayClass
_GLOBALS[("numpy", "dtype")] = np.dtype
_GLOBALS[("_codecs", "encode")] = _latin1
_GLOBALS[("builtins", "bytes")] = _GLOBALS[("__builtin__", "bytes")] = _empty_bytes


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` knows only the numpy rebuild functions."""

    def __init__(self, file, source: Path | str, **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if found is None:
            raise DataError(
                f"{self.source} refers to {module}.{name}, which mmbalance never unpickles "
                f"(a data pickle may hold only {ALLOWED})"
            )
        return found


def load_arrays(path: Path) -> object:
    """The pickled object in ``path``, refusing anything but numpy arrays and plain data."""
    try:
        with open(path, "rb") as handle:
            return ArrayUnpickler(handle, path, encoding="latin1").load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"cannot read {path}: it declares more data than fits in memory") from None
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path}: {reason}") from None
