"""Zero mean and unit spread, with statistics of the training split only.

Every dataset that standardises its inputs goes through ``standardise``, so the
rule is the same everywhere: the mean and spread are computed on the training
rows as the dataset loads them (before any ``data.heldout=carve``, whose rows
are training data too), and validation and test values are transformed with
them without being looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: below this spread a feature counts as constant on the training split: it is centred, not scaled
STD_FLOOR = 1e-6


def standardise(x: np.ndarray | torch.Tensor, train_rows, *, per_channel: bool = True, ddof: int = 0):
    """``x`` (samples first) standardised with the statistics of its ``train_rows``.

    ``per_channel``: each entry of the second axis gets its own mean and spread,
    pooled over the samples and any further axes: a feature of a vector, a
    channel of an image, a frequency band of an ``(N, bands, frames)``
    spectrogram. Otherwise one mean and spread cover every value. ``ddof`` is the
    spread's delta degrees of freedom (0: population, 1: sample). A NumPy array
    is computed with NumPy and a tensor with torch, in the input's precision, so
    a dataset's inputs do not change by a bit when it moves here.
    """
    return fit_standardisation(x, train_rows, per_channel=per_channel, ddof=ddof)(x)


@dataclass(frozen=True)
class Standardisation:
    """A fitted mean and spread, kept so that new data (``mmbalance predict``) gets the training transform.

    Both broadcast over any number of samples (every pooled axis has length 1,
    or they are single values); NumPy arrays or tensors, as fitted. Datasets
    put theirs in ``DataBundle.standardisation`` and the trainer stores them
    in ``best.pt`` (``to_state``).
    """

    mean: np.ndarray | torch.Tensor
    std: np.ndarray | torch.Tensor

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return (x - self.mean) / self.std

    def to_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors in the statistics' own precision, for a checkpoint read with ``weights_only``."""
        return {"mean": torch.as_tensor(self.mean), "std": torch.as_tensor(self.std)}

    @classmethod
    def from_state(cls, state: dict) -> "Standardisation":
        return cls(mean=state["mean"], std=state["std"])


def fit_standardisation(x: np.ndarray | torch.Tensor, train_rows, *, per_channel: bool = True, ddof: int = 0) -> Standardisation:
    """The mean and spread ``standardise`` divides by, computed on ``train_rows`` of ``x``."""
    if x.ndim < 2:
        raise ValueError(f"standardise expects samples first and at least one feature axis, got shape {tuple(x.shape)}")
    axes = (0, *range(2, x.ndim)) if per_channel else None
    if isinstance(x, torch.Tensor):
        train = x[torch.as_tensor(np.asarray(train_rows), dtype=torch.long)]
        if axes is None:
            mean, std = train.mean(), train.std(correction=ddof)
        else:
            mean, std = train.mean(dim=axes, keepdim=True), train.std(dim=axes, correction=ddof, keepdim=True)
        std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)
    else:
        train = x[np.asarray(train_rows)]
        mean, std = train.mean(axis=axes, keepdims=True), train.std(axis=axes, ddof=ddof, keepdims=True)
        std = np.where(std < STD_FLOOR, 1.0, std)
    return Standardisation(mean, std)
