"""The modulation window: the epochs in which a method changes plain training.

One option pair with the same names in every method (BASELINES §1.3):
``modulation_starts`` and ``modulation_ends``, 0-based epochs, both
inclusive; ``modulation_ends`` unset means until the last epoch. Outside the
window a plugin leaves the step exactly as its objective made it; running
statistics may still update.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..config import Section
from ..errors import ConfigError


class WindowConfig(Section):
    """Mix-in section for the parts that act only inside a window of epochs."""

    modulation_starts: Optional[int] = Field(0, ge=0, description="first epoch (0-based) of the modulation")
    modulation_ends: Optional[int] = Field(None, ge=0, description="last epoch (0-based, inclusive); unset: the last epoch")


def window_bounds(config, default_starts: int = 0) -> tuple[int, Optional[int]]:
    starts = config.modulation_starts if config.modulation_starts is not None else default_starts
    ends = config.modulation_ends
    if ends is not None and ends < starts:
        raise ConfigError(
            f"modulation_ends ({ends}) is before modulation_starts ({starts}); the window would be empty"
        )
    return starts, ends


def in_window(config, epoch: int, default_starts: int = 0) -> bool:
    """True when ``epoch`` lies inside [modulation_starts, modulation_ends]."""
    starts, ends = window_bounds(config, default_starts)
    return epoch >= starts and (ends is None or epoch <= ends)
