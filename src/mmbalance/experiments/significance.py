"""Paired tests for a few seeds: the t distribution and the exact Wilcoxon signed-rank test.

A bench compares methods over a handful of seeds, so the tests must be exact
for small samples and need nothing beyond the standard library: the t
distribution comes from the regularised incomplete beta function, the Wilcoxon
p-value from counting all 2^n sign patterns (by dynamic programming over the
rank sums, which is the same count without listing them one by one).
"""

from __future__ import annotations

import math
from typing import Sequence

TESTS = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test (exact)"}

_EPS = 1e-15
_TINY = 1e-300
# |differences| equal to this many decimals are ties: accuracies are fractions of a test set,
# so anything closer is floating-point rounding of equal values
_TIE_DECIMALS = 12


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's method).

    The fraction converges fast for x < (a + 1) / (a + b + 2); above that the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"incomplete_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)) - math.log(a)
    # 1 + d1/(1 + d2/(1 + ...)), with d_{2m} = m(b-m)x / ((a+2m-1)(a+2m)),
    # d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)); I_x(a, b) = front / that
    value, c, d = 1.0, 1.0, 0.0
    for j in range(1, 10_000):
        m = j // 2
        if j % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + term / c
        c = c if abs(c) > _TINY else _TINY
        value *= c * d
        if abs(c * d - 1.0) < _EPS:
            break
    return math.exp(log_front) / value


def t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's t with ``dof`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    tail = t_two_sided_p(t, dof) / 2
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, dof: float) -> float:
    """The t with P(T <= t) = ``probability``, by bisection on the CDF (monotone, so it cannot fail)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"t_quantile needs 0 < probability < 1, got {probability}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < probability:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if t_cdf(middle, dof) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its ``level`` confidence interval from the t distribution with n - 1 degrees of freedom."""
    n = len(values)
    if n < 2:
        raise ValueError("a confidence interval needs at least two values")
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return mean, mean - half, mean + half


def paired_t_test(differences: Sequence[float]) -> float:
    """Two-sided p of the paired t-test on the per-pair ``differences`` (H0: mean difference 0).

    Equal non-zero differences (no spread) give p = 0, the limit of the test;
    all-zero differences give p = 1.
    """
    n = len(differences)
    if n < 2:
        raise ValueError("a paired t-test needs at least two pairs")
    mean = sum(differences) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in differences) / (n - 1) / n)
    if se == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / se, n - 1)


def wilcoxon_signed_rank(differences: Sequence[float]) -> float:
    """Exact two-sided p of the Wilcoxon signed-rank test on the per-pair ``differences``.

    Zero differences are left out (Wilcoxon's convention); tied magnitudes get
    their average rank, and the null distribution is that of the observed ranks
    under all 2^n sign patterns, so ties are handled exactly too.
    """
    magnitudes = [round(abs(d), _TIE_DECIMALS) for d in differences]
    kept = [(m, d > 0) for m, d in zip(magnitudes, differences) if m > 0]
    n = len(kept)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: kept[i][0])
    doubled = [0] * n  # twice the average rank: an integer even with ties
    start = 0
    while start < n:
        end = start
        while end + 1 < n and kept[order[end + 1]][0] == kept[order[start]][0]:
            end += 1
        for position in range(start, end + 1):
            doubled[order[position]] = (start + 1) + (end + 1)
        start = end + 1
    observed = sum(r for r, (_, positive) in zip(doubled, kept) if positive)
    counts = [1] + [0] * sum(doubled)  # counts[s]: sign patterns whose positive doubled ranks sum to s
    for rank in doubled:
        for s in range(len(counts) - 1, rank - 1, -1):
            counts[s] += counts[s - rank]
    below = sum(counts[: observed + 1])
    above = sum(counts[observed:])
    return min(1.0, 2 * min(below, above) / 2**n)


def p_value(differences: Sequence[float], test: str) -> float:
    """The two-sided p of ``test`` (a key of ``TESTS``) on paired differences."""
    if test == "t":
        return paired_t_test(differences)
    if test == "wilcoxon":
        return wilcoxon_signed_rank(differences)
    raise ValueError(f"unknown test {test!r} (allowed: {', '.join(TESTS)})")
