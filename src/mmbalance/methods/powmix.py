"""PowMix (Georgiou, Avrithis, Potamianos, IEEE/ACM TASLP; BASELINES §15c), as a plugin.

Intra-modal mixing in embedding space before fusion, built as Mixup
(``mixup.py``, §15b) plus three of the paper's five components, every
formula and default [unverified] (no public code):

- a number of mixed examples per batch (``num_mixed``, unset: the batch
  size): mixed example k mixes sample k mod N with a partner from a fresh
  random permutation of the batch per pass over it;
- anisotropic mixing (``lambdas=dimension``, the default): λ_m is a vector
  over modality m's feature dimensions, each entry ~ Beta(a, a), drawn
  independently for every modality; ``modality`` draws one scalar per
  modality, ``batch`` one for all (then PowMix is Mixup);
- cross-modal label mixing: the first label's weight is the mean over
  modalities of mean(λ_m).

Loss: L = mean_k [w CE(fuse(f~)_k, y_{i_k}) + (1 − w) CE(fuse(f~)_k, y_{j_k})],
replacing the objective's fused cross-entropy (``fused=replace``) or added
to it (``fused=add``, term ``powmix``). The paper's mixing-factor
reweighting and dynamic mixing are not reconstructed: the spec gives no
formula for them.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .mixing import Granularity, MixingConfig, MixingPlugin


@METHODS.register("powmix")
class PowMix(MixingPlugin):
    """PowMix: Mixup with K mixed examples per batch, anisotropic per-modality λ and mixed labels [unverified]."""

    class Config(MixingConfig):
        num_mixed: Optional[int] = Field(
            None, ge=1, le=1_000_000,
            description="mixed examples per batch (partners from a fresh permutation per pass); unset: the batch size [unverified]",
        )
        lambdas: Granularity = Field(
            "dimension",
            description="dimension: a λ vector over each modality's feature dimensions (anisotropic); modality: one λ "
            "per modality; batch: one λ for all (Mixup); the label weight is the mean of all λ's [unverified]",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options powmix`)
    search_space = {
        "alpha": FloatRange(0.1, 2.0, log=True),
        "weight": FloatRange(0.25, 2.0, log=True),
        "lambdas": Choice(["batch", "modality", "dimension"]),
    }

    def granularity(self):
        return self.config.lambdas

    def count(self, batch_size):
        return batch_size if self.config.num_mixed is None else self.config.num_mixed
