import pytest

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.experiments.bench import parse_method, plan_runs, run_name, split_methods
from mmbalance.experiments.summary import fmt, mean_std


def test_method_specs_with_options():
    assert split_methods("joint, midas[warmup=false;lam=2],unimodal") == ["joint", "midas[warmup=false;lam=2]", "unimodal"]
    assert parse_method("joint") == ("joint", [])
    assert parse_method("midas[warmup=false;lam=2]") == ("midas", ["midas.warmup=false", "midas.lam=2"])
    assert run_name("midas[warmup=false]", 3) == "midas-warmup=false-seed3"
    with pytest.raises(MMBalanceError, match="expected NAME or NAME"):
        parse_method("midas[warmup=false")
    with pytest.raises(MMBalanceError, match="expected key=value"):
        parse_method("midas[warmup]")


def test_plan_validates_every_run_before_training():
    plan = plan_runs("synthetic", ["joint", "midas[hard_weighting=false]"], 2, [])
    assert [(label, name) for label, name, _ in plan] == [
        ("joint", "joint-seed0"), ("joint", "joint-seed1"),
        ("midas[hard_weighting=false]", "midas-hard_weighting=false-seed0"),
        ("midas[hard_weighting=false]", "midas-hard_weighting=false-seed1"),
    ]
    assert plan[2][2].method_config.hard_weighting is False and plan[2][2].seed == 0
    with pytest.raises(ConfigError, match="midas.hard_weightin"):
        plan_runs("synthetic", ["midas[hard_weightin=false]"], 1, [])


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert fmt([0.5, 0.7]) == "60.0 ± 14.1"
