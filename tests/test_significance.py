"""The paired tests of a bench's Δ column, against values worked out by hand or read from a t table."""

from __future__ import annotations

import math

import pytest

from mmbalance.experiments.comparison import Comparison, cell, compare, default_baseline
from mmbalance.experiments.significance import (
    incomplete_beta,
    mean_interval,
    p_value,
    paired_t_test,
    t_cdf,
    t_quantile,
    wilcoxon_signed_rank,
)


@pytest.mark.parametrize("x", [0.01, 0.2, 0.5, 0.77, 0.999])
def test_incomplete_beta_closed_forms(x):
    assert incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-13)
    assert incomplete_beta(3, 1, x) == pytest.approx(x**3, abs=1e-13)
    assert incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert incomplete_beta(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
    assert incomplete_beta(2.5, 7, x) == pytest.approx(1 - incomplete_beta(7, 2.5, 1 - x), abs=1e-13)


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.0, 9.5])
def test_t_cdf_closed_forms(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_cdf(t, 4) == pytest.approx(0.5 + t * (t * t + 6) / (2 * (t * t + 4) ** 1.5), abs=1e-12)


@pytest.mark.parametrize("dof, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_table(dof, table):
    assert t_quantile(0.975, dof) == pytest.approx(table, abs=5e-4)
    assert t_quantile(0.025, dof) == pytest.approx(-table, abs=5e-4)
    assert t_cdf(t_quantile(0.9, dof), dof) == pytest.approx(0.9, abs=1e-12)


def test_paired_t_test_by_hand():
    # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 3 / sqrt(0.5) = sqrt(18), 4 dof
    t = math.sqrt(18)
    assert paired_t_test([1, 2, 3, 4, 5]) == pytest.approx(1 - t * (t * t + 6) / (t * t + 4) ** 1.5, abs=1e-12)
    assert paired_t_test([1, 2, 3, 4, 5]) == pytest.approx(0.0132, abs=1e-4)
    # d = 1, 2, 3: t = 2 / (1 / sqrt 3), 2 dof; d = 1, 3: t = 2, 1 dof
    t = 2 * math.sqrt(3)
    assert paired_t_test([1, 2, 3]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert paired_t_test([1, 3]) == pytest.approx(1 - 2 / math.pi * math.atan(2), abs=1e-12)
    assert paired_t_test([-1, -3]) == paired_t_test([1, 3])
    assert paired_t_test([0.02, 0.02, 0.02]) == 0.0  # no spread: the limit of the test
    assert paired_t_test([0.0, 0.0, 0.0]) == 1.0


def test_confidence_interval_by_hand():
    mean, low, high = mean_interval([1, 2, 3, 4, 5])  # 3 ± t(0.975, 4) · sqrt(0.5) = 3 ± 2.7764 · 0.7071
    assert mean == 3
    assert (low, high) == (pytest.approx(3 - 1.96324, abs=1e-4), pytest.approx(3 + 1.96324, abs=1e-4))


def test_wilcoxon_exact_by_hand():
    assert wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5]) == 2 / 32  # the most extreme of 32 patterns, twice
    assert wilcoxon_signed_rank([-0.1, -0.2, -0.3, -0.4, -0.5]) == 2 / 32
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5, 6]) == 2 / 64
    # W- = 2 (the rank 2 is negative): negative sets summing to <= 2 are {}, {1}, {2}: 3 of 32, twice
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5]) == 6 / 32
    # the zero is dropped; |d| ranks 2, 2, 2 (three 1s), 4.5, 4.5, 6; W- = 2: {} or one of the three 2s
    assert wilcoxon_signed_rank([1, 1, 2, 2, 3, -1, 0]) == 2 * 4 / 64
    assert wilcoxon_signed_rank([0.0, 0.0]) == 1.0
    assert wilcoxon_signed_rank([0.3]) == 1.0  # one pair: both signs equally likely
    # equal up to rounding counts as a tie: 0.85 - 0.80 and 0.90 - 0.85 differ in their last bits
    assert wilcoxon_signed_rank([0.85 - 0.80, 0.90 - 0.85, -0.05]) == wilcoxon_signed_rank([1, 1, -1])


def test_wilcoxon_equals_listing_every_sign_pattern():
    n = 16
    differences = [(-1) ** k * (k + 1) for k in range(n)]  # ranks 1..n, even ranks negative
    observed = sum(k + 1 for k in range(n) if k % 2 == 0)  # W+ = 64, below its mean of 68
    below = sum(1 for mask in range(2**n) if sum(r + 1 for r in range(n) if mask >> r & 1) <= observed)
    assert wilcoxon_signed_rank(differences) == pytest.approx(2 * below / 2**n, abs=1e-15)


def test_p_value_names_the_test():
    assert p_value([1, 2, 3, 4, 5], "wilcoxon") == 0.0625
    assert p_value([1, 2, 3], "t") == paired_t_test([1, 2, 3])
    with pytest.raises(ValueError, match="unknown test"):
        p_value([1, 2], "sign")


def run(label: str, seed: int, accuracy: float) -> dict:
    return {"method": label, "label": label, "seed": seed, "test": {"accuracy": accuracy}}


def test_compare_pairs_by_seed_and_says_which_seeds_were_dropped():
    results = [run("joint", s, a) for s, a in enumerate([0.80, 0.82, 0.78, 0.81])]
    results += [run("midas", s, a) for s, a in [(0, 0.85), (1, 0.86), (3, 0.84), (4, 0.90)]]
    comparison = compare(results, "joint")["midas"]
    assert comparison.seeds == (0, 1, 3) and comparison.unpaired == (2, 4)
    assert comparison.mean == pytest.approx((0.05 + 0.04 + 0.03) / 3)
    assert comparison.p == pytest.approx(paired_t_test([0.05, 0.04, 0.03]))
    assert default_baseline(["midas", "joint"]) == "joint" and default_baseline(["midas", "arl"]) == "midas"


def test_cell_formats_difference_interval_p_and_marker():
    c = Comparison("midas", "joint", "t", (0, 1, 2, 3, 4), 0.048, 0.029, 0.067, 0.002)
    assert cell(c) == "+4.8 [+2.9, +6.7] p=0.002 *"
    assert cell(Comparison("midas", "joint", "t", (0, 1), -0.0001, -0.03, 0.02, 0.6)) == "+0.0 [-3.0, +2.0] p=0.600"
    assert cell(Comparison("midas", "joint", "t", (0, 1, 2), 0.1, 0.09, 0.11, 1e-5)) == "+10.0 [+9.0, +11.0] p<0.001 *"
    one_seed = compare([run("joint", 0, 0.8), run("midas", 0, 0.9)], "joint")["midas"]
    assert one_seed.p is None and cell(one_seed) == "—"
    assert cell(None) == "(baseline)"
