import pytest

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.experiments.bench import plan_runs, run_name
from mmbalance.experiments.summary import fmt, mean_std
from mmbalance.methods.spec import parse_spec, split_methods


def test_method_specs_with_options():
    assert split_methods("joint, midas[modulation_starts=0;lam=2]+arl,unimodal") == [
        "joint", "midas[modulation_starts=0;lam=2]+arl", "unimodal"]
    assert [(p.name, p.options) for p in parse_spec("joint")] == [("joint", {})]
    parts = parse_spec("midas[modulation_starts=0,lam=2]+arl[temperature=4]")
    assert [(p.name, p.options) for p in parts] == [
        ("midas", {"modulation_starts": 0, "lam": 2}), ("arl", {"temperature": 4})]
    assert run_name("midas[lam=2]+arl", 3) == "midas-lam=2-+arl-seed3"
    with pytest.raises(MMBalanceError, match="unbalanced"):
        parse_spec("midas[lam=1")
    with pytest.raises(MMBalanceError, match="expected key=value"):
        parse_spec("midas[lam]")
    with pytest.raises(MMBalanceError, match="names 'arl' twice"):
        parse_spec("arl+midas+arl")


def test_plan_validates_every_run_before_training():
    plan = plan_runs("synthetic", ["joint", "midas[hard_weighting=false]", "arl"], 2, [])
    assert [(label, name) for label, name, _ in plan] == [
        ("joint", "joint-seed0"), ("joint", "joint-seed1"),
        ("midas[hard_weighting=false]", "midas-hard_weighting=false-seed0"),
        ("midas[hard_weighting=false]", "midas-hard_weighting=false-seed1"),
        ("joint+arl", "joint+arl-seed0"), ("joint+arl", "joint+arl-seed1"),
    ]
    assert plan[2][2].section("midas").hard_weighting is False and plan[2][2].seed == 0
    with pytest.raises(ConfigError, match="midas.hard_weightin"):
        plan_runs("synthetic", ["midas[hard_weightin=false]"], 1, [])


def test_plan_refuses_the_same_method_twice():
    with pytest.raises(MMBalanceError, match="lists 'joint' twice"):
        plan_runs("synthetic", ["joint", "joint"], 1, [])
    with pytest.raises(MMBalanceError, match="lists 'joint\\+arl' twice"):
        plan_runs("synthetic", ["arl", "joint+arl"], 1, [])


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert fmt([0.5, 0.7]) == "60.0 ± 14.1"
    assert fmt([0.5]) == "50.0"  # one run: no spread to show


def fake_run(label: str, seed: int, accuracy: float) -> dict:
    """A run's metrics as a bench reads them, without training."""
    split = {"accuracy": accuracy, "macro_f1": accuracy, "modality_accuracy": {"a": 0.5, "b": 0.4},
             "unimodal_accuracy": {"a": 0.5, "b": 0.4}, "imbalance_ratio": 1.2}
    return {"method": label, "label": label, "seed": seed, "modalities": ["a", "b"], "test": split,
            "val": split, "seconds_per_step": 0.01}


def test_summary_compares_every_method_with_the_baseline_paired_by_seed(tmp_path):
    from mmbalance.experiments.bench import write_reports

    results = [fake_run("joint", s, a) for s, a in enumerate([0.80, 0.82, 0.78, 0.80])]
    results += [fake_run("midas", s, a) for s, a in [(0, 0.85), (1, 0.86), (3, 0.84)]]  # seed 2 failed
    results += [fake_run("solo", 0, 0.70)]
    linear = {"method": "linear", "label": "linear", "seed": 0, "modalities": ["a", "b"],
              "test": {"accuracy": 0.9, "macro_f1": 0.9}, "val": {"accuracy": 0.9, "macro_f1": 0.9}}
    results += [linear, {**linear, "seed": 1}]
    write_reports(results, tmp_path, "synthetic", None)
    summary = (tmp_path / "summary.md").read_text()
    assert "*Δ vs joint*: test accuracy minus `joint`'s in points, paired by seed" in summary
    rows: dict[str, str] = {}
    for line in summary.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)  # the test table comes first
    assert "| 4 | 80.0 ± 1.6 | (baseline) |" in rows["joint"]
    # d = 0.05, 0.04, 0.04: mean 4.33 points, se 0.333, t = 13 with 2 dof: p = 1 - 13/sqrt(171), CI ± 4.303 · 0.333
    assert "| 3 | 85.0 ± 1.0 | +4.3 [+2.9, +5.8] p=0.006 * |" in rows["midas"]
    assert "| 1 | 70.0 | — | 70.0 |" in rows["solo"]  # one seed: no ± and no test
    assert "- `midas` vs `joint`: seed(s) 2 have a result for only one of the two" in summary
    # d = 0.10, 0.08: t = 9 with 1 dof, p = 1 - 2/π · atan(9), CI 9 ± 12.706 points
    assert "| 2 | 90.0 ± 0.0 | +9.0 [-3.7, +21.7] p=0.070 | 90.0 ± 0.0 | – | – |" in rows["linear"]
    assert ("The linear reference (logistic regression on the standardised features of every modality, L2 chosen "
            "on validation) is more accurate on test than `joint` (by 10.0 points, p=0.070 paired by seed), "
            "`midas` (by 5.0 points, p=0.070 paired by seed), `solo` (by 20.0 points)") in summary
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_baseline_must_be_a_method_of_the_bench():
    from mmbalance.experiments.bench import choose_baseline

    assert choose_baseline(["midas", "arl", "linear"], None, "t") == "midas"
    assert choose_baseline(["midas", "joint"], None, "t") == "joint"
    assert choose_baseline(["midas", "arl"], "arl", "wilcoxon") == "joint+arl"
    assert choose_baseline(["midas", "linear"], "linear", "t") == "linear"
    with pytest.raises(MMBalanceError, match=r"--baseline 'unimodal' is not in --methods \(midas, joint\)"):
        choose_baseline(["midas", "joint"], "unimodal", "t")
    with pytest.raises(MMBalanceError, match="--test 'sign' is not a test"):
        choose_baseline(["joint"], None, "sign")
