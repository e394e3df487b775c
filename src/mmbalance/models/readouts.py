"""Ways of reading one modality out of a fused model, shared by methods and evaluation.

A method that balances modalities needs, per modality, logits that say what
that modality alone contributes. The fusion head is the only place where
modalities meet, so these readouts all go through ``fuse`` on a feature
dict with some modalities replaced by zeros (BASELINES §1.1):

- ``coalition_logits``: fuse(f^S), the fused head reading the modalities in S only;
- ``zeroed_logits``: fuse(f^{m}) for every m (ARL's unimodal predictions, the
  modality-only accuracy of every metrics.json);
- ``restricted_logits``: d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅). For a linear
  concat head z = Σ_k W_k f_k + b this is exactly W_m f_m + b/M, and Σ_m d_m = z;
  unlike splitting a weight matrix it works for every fusion head.

``true_class_probability`` and ``modality_scores`` turn logits into the
per-modality scores the gradient modulators compare.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .multimodal import zero_out

Fuse = Callable[[dict[str, Tensor]], Tensor]


def coalition_logits(fuse: Fuse, features: Mapping[str, Tensor], coalition: Iterable[str]) -> Tensor:
    """fuse(f^S): the fused head with every modality outside ``coalition`` zeroed."""
    return fuse(zero_out(dict(features), coalition))


def zeroed_logits(fuse: Fuse, features: Mapping[str, Tensor], modalities: list[str]) -> Tensor:
    """[M, B, C]: fuse(f^{m}) for each modality m in order."""
    return torch.stack([coalition_logits(fuse, features, [m]) for m in modalities])


def restricted_logits(fuse: Fuse, features: Mapping[str, Tensor], modalities: list[str]) -> Tensor:
    """[M, B, C]: d_m = fuse(f^{m}) − (M−1)/M · fuse(f^∅), which sum to the fused logits for a linear head."""
    count = len(modalities)
    empty = coalition_logits(fuse, features, [])
    return zeroed_logits(fuse, features, modalities) - (count - 1) / count * empty


def true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """softmax(logits)[..., y]: the probability given to the true class, same leading shape as ``labels``."""
    labels = labels.expand(logits.shape[:-1])
    return logits.softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def modality_scores(per_modality_logits: Tensor, labels: Tensor) -> Tensor:
    """s_m = Σ_i softmax(d_m,i)[y_i] from [M, B, C] logits, detached: how well each modality fits the batch."""
    return true_class_probability(per_modality_logits.detach().float(), labels).sum(dim=-1)
