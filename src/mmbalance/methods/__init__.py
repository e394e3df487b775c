"""Training methods: objectives and plugins, one file each, found by name in ``METHODS``."""

from .base import Objective, Part, Plugin, cross_entropy
from .compose import Method, resolve
from .record import StepRecord
from . import joint, unimodal, midas, cal, cal_accel, arl  # noqa: F401  (registration)
from . import ogm_ge, opm, agm, pmr, mmpareto, inforeg, relearning  # noqa: F401  (gradient modulators)
from . import mixup, powmix, mcr, smv  # noqa: F401  (augmentation, regularisers, re-sampling)
from . import reconboost, mla, aug, amco, greedy, lemda  # noqa: F401  (training schemes, model changes, learned augmentation)
from . import gblending, umt, mmcosine, mbsd, cml, lfm, dgl, g2d, g2d_smp  # noqa: F401  (objectives of the field)

__all__ = ["Method", "Objective", "Part", "Plugin", "StepRecord", "cross_entropy", "resolve"]
