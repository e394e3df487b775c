"""Each method of a bench against a baseline, paired by seed.

Runs of one seed share the split (and the linear reference's data), so the
fair comparison is the per-seed difference, not two means side by side: the
spread between splits cancels. A seed with a result for only one of the two
(a run that failed) has no pair; it is left out and the summary says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .significance import TESTS, mean_interval, p_value

ALPHA = 0.05
MARK = "*"


def test_accuracy(result: dict) -> float:
    return result["test"]["accuracy"]


@dataclass(frozen=True)
class Comparison:
    """``method`` minus ``baseline`` over the seeds both have (differences as fractions)."""

    method: str
    baseline: str
    test: str
    seeds: tuple[int, ...]
    mean: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float | None = None  # None: fewer than two pairs, no test
    unpaired: tuple[int, ...] = ()  # seeds with a result for only one of the two

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def label_of(result: dict) -> str:
    return result.get("label", result["method"])


def default_baseline(labels: list[str]) -> str:
    """``joint`` when the bench has it, otherwise its first method."""
    return "joint" if "joint" in labels else labels[0]


def compare(
    results: list[dict], baseline: str, test: str = "t", value: Callable[[dict], float] = test_accuracy
) -> dict[str, Comparison]:
    """Every other method of ``results`` against ``baseline``, by label."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r} (allowed: {', '.join(TESTS)})")
    by_label: dict[str, dict[int, float]] = {}
    for r in results:
        by_label.setdefault(label_of(r), {}).setdefault(int(r["seed"]), value(r))
    reference = by_label.get(baseline, {})  # none when every baseline run failed: no pairs, and said so
    comparisons = {}
    for label, values in by_label.items():
        if label == baseline:
            continue
        seeds = tuple(sorted(set(values) & set(reference)))
        unpaired = tuple(sorted(set(values) ^ set(reference)))
        differences = [values[s] - reference[s] for s in seeds]
        if len(differences) < 2:
            mean = differences[0] if differences else math.nan
            comparisons[label] = Comparison(label, baseline, test, seeds, mean, unpaired=unpaired)
            continue
        mean, low, high = mean_interval(differences)
        comparisons[label] = Comparison(label, baseline, test, seeds, mean, low, high, p_value(differences, test), unpaired)
    return comparisons


def points(value: float) -> str:
    """A difference in percentage points with its sign, never '-0.0'."""
    text = f"{100 * value:+.1f}"
    return "+0.0" if text == "-0.0" else text


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def cell(comparison: Comparison | None) -> str:
    """The table cell: ``+4.8 [+2.9, +6.7] p=0.002 *``; '—' with fewer than two pairs."""
    if comparison is None:
        return "(baseline)"
    if comparison.p is None:
        return "—"
    mark = f" {MARK}" if comparison.significant else ""
    return f"{points(comparison.mean)} [{points(comparison.low)}, {points(comparison.high)}] {format_p(comparison.p)}{mark}"


def column_name(baseline: str) -> str:
    return f"Δ vs {baseline}"


def how_to_read(baseline: str, test: str, comparisons: dict[str, Comparison] | None = None, metric: str = "accuracy") -> str:
    """The one sentence over a table that says what its Δ column means (and, for Wilcoxon on few seeds, its limit)."""
    sentence = (
        f"*{column_name(baseline)}*: test {metric} minus `{baseline}`'s in points, paired by seed (a seed sets "
        f"the split), as the mean difference [95 % confidence interval, t distribution with n − 1 degrees of "
        f"freedom] and the two-sided p of a {TESTS[test]} over the n seeds; {MARK} marks p < {ALPHA}, — means "
        "fewer than two seeds (no test)"
    )
    fewest = min((len(c.seeds) for c in (comparisons or {}).values()), default=0)
    if test == "wilcoxon" and fewest < 6:
        sentence += ", and with fewer than 6 seeds the exact test cannot reach p < 0.05"
    return sentence + "."


def unpaired_lines(comparisons: dict[str, Comparison]) -> list[str]:
    """One line per method that lost seeds from its pairing, so a shorter pairing is never silent."""
    lines = []
    for c in comparisons.values():
        if c.unpaired:
            seeds = ", ".join(str(s) for s in c.unpaired)
            lines.append(
                f"- `{c.method}` vs `{c.baseline}`: seed(s) {seeds} have a result for only one of the two and are "
                f"left out of the pairing ({len(c.seeds)} pair(s) remain)."
            )
    return lines + [""] if lines else []
