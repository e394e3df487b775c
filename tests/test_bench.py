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
