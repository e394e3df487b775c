"""Exact Shapley values of modalities, from the value of every coalition."""

from __future__ import annotations

from itertools import combinations
from math import factorial
from typing import Iterable, Mapping


def all_coalitions(players: Iterable[str]) -> list[frozenset[str]]:
    players = list(players)
    return [frozenset(c) for r in range(len(players) + 1) for c in combinations(players, r)]


def shapley_values(value: Mapping[frozenset[str], float], players: Iterable[str]) -> dict[str, float]:
    """phi_m = sum over S not containing m of |S|!(M-|S|-1)!/M! * (v(S+m) - v(S)).

    ``value`` must hold every coalition, the empty one included. The values
    add up to v(all) - v(empty) (efficiency), which the tests check.
    """
    players = list(players)
    total = len(players)
    phi = {}
    for m in players:
        others = [p for p in players if p != m]
        acc = 0.0
        for size in range(total):
            weight = factorial(size) * factorial(total - size - 1) / factorial(total)
            for subset in combinations(others, size):
                s = frozenset(subset)
                acc += weight * (value[s | {m}] - value[s])
        phi[m] = acc
    return phi


def imbalance_ratio(shapley: Mapping[str, float]) -> float:
    """How unevenly the modalities contribute: 1 = equal shares, M = one modality does everything.

    Computed on the positive parts of the Shapley values: M * max share.
    With no positive contribution at all the model uses no modality, and 1.0
    (nothing to be imbalanced about) is returned.
    """
    positive = {m: max(v, 0.0) for m, v in shapley.items()}
    total = sum(positive.values())
    if total <= 0:
        return 1.0
    return len(positive) * max(positive.values()) / total
