"""Multimodal Mixup (BASELINES §15b), as a plugin: per-modality embedding interpolation.

Each step draws λ ~ Beta(a, a) (a = 0.4) and a random permutation π of the
batch, mixes every modality's features with the *same* λ and π,
f~_m = λ f_m + (1 − λ) f_m[π], fuses the mixed tuples and trains towards
both labels: L = λ CE(fuse(f~), y) + (1 − λ) CE(fuse(f~), y[π]).

By default (``fused=replace``) this L takes the place of the objective's
fused cross-entropy, as in Mixup, so with λ = 1 the step is plain training;
the objective's other terms stay (``midas+mixup``: MIDAS's unimodal and
misaligned losses, with the fused term on mixed tuples). ``fused=add``
keeps the clean term and adds L as its own term ``mixup``. The objective's
``fuse`` reads the mixed tuples, so an objective that reads the model its
own way (normalised logits) mixes in that reading.

``per_modality_lambda`` draws an independent λ_m per modality; the label
weight is then the mean of the λ_m [unverified]. The formulas live in
``mixing.py``.
"""

from __future__ import annotations

from pydantic import Field

from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .mixing import MixingConfig, MixingPlugin


@METHODS.register("mixup")
class Mixup(MixingPlugin):
    """Multimodal Mixup: interpolate every modality's features with one λ ~ Beta(a, a) and partner, mix the labels."""

    class Config(MixingConfig):
        per_modality_lambda: bool = Field(
            False,
            description="draw an independent λ_m for each modality; the label weight is the mean of the λ_m [unverified]",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options mixup`)
    search_space = {
        "alpha": FloatRange(0.1, 2.0, log=True),
        "weight": FloatRange(0.25, 2.0, log=True),
        "fused": Choice(["replace", "add"]),
    }

    def granularity(self):
        return "modality" if self.config.per_modality_lambda else "batch"
