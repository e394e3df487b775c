"""Training methods, one file each, found by name in ``METHODS``."""

from .base import Method, StepResult
from . import joint, unimodal  # noqa: F401  (registration)
from . import midas  # noqa: F401  (registration)
from . import cal  # noqa: F401  (registration)
from . import arl  # noqa: F401  (registration)

__all__ = ["Method", "StepResult"]
