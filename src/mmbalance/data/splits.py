"""Stratified train/val/test splits from a seed."""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Split row indices into parts with the given fractions, class by class.

    The last part takes what is left (so ``fractions`` for val and test give
    ``[val, test, train]``). Every class is shuffled with the same seeded
    generator, so the split is a pure function of the labels and the seed.
    """
    labels = np.asarray(labels)
    if sum(fractions) >= 1:
        raise DataError(f"split fractions {fractions} leave nothing for training")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        rng.shuffle(rows)
        start = 0
        for k, fraction in enumerate(fractions):
            count = int(round(fraction * len(rows)))
            parts[k].extend(rows[start : start + count])
            start += count
        parts[-1].extend(rows[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def train_val_test(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """``(train, val, test)`` row indices, stratified by label."""
    val, test, train = stratified_split(labels, (val_fraction, test_fraction), seed)
    return train, val, test
