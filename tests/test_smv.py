"""SMV (a plugin that plans epochs): the Shapley game per sample, the copy rule, the modality-level
ratio, the plan the trainer then iterates (batches keep only the planned modalities, and the
objective zeroes the others), the composition rule, determinism and runs with M = 2 and 3."""

import json
import math

import pytest
import torch

from mmbalance.config import build_config
from mmbalance.data.plan import EpochPlan
from mmbalance.errors import ConfigError
from mmbalance.methods.compose import resolve
from mmbalance.methods.smv import (
    coalition_values,
    modality_ratio,
    plan_from_copies,
    sample_copies,
    sample_shapley,
)
from mmbalance.models.multimodal import keep_features
from mmbalance.training import Trainer, train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=3", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
    "smv.warmup_epochs=1",
]
THREE = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
F = frozenset


def test_the_spec_example_values_audio_at_one_and_a_half_and_adds_one_visual_only_copy():
    # correct with both and with audio only, wrong with visual only:
    # v(a)=1, v(v)=0, v(av)=2; φ_a = (1 + 2 − 0)/2 = 1.5, φ_v = (0 + 2 − 1)/2 = 0.5
    correct = {F({"a"}): torch.tensor([True]), F({"v"}): torch.tensor([False]), F({"a", "v"}): torch.tensor([True])}
    phi = sample_shapley(coalition_values(correct), ["a", "v"])
    assert phi.tolist() == [[1.5, 0.5]]
    # 0.4 < 0.5 < 0.9: one copy keeping only v; 1.5 gets none
    assert sample_copies(phi).tolist() == [[0, 1]]
    plan = plan_from_copies(sample_copies(phi))
    assert plan.rows.tolist() == [0, 0]
    assert plan.keep.tolist() == [[True, True], [False, True]]


def test_two_modal_shapley_takes_only_the_five_values_and_they_add_up_to_v_of_all():
    outcomes = torch.tensor([[a, v, av] for a in (0, 1) for v in (0, 1) for av in (0, 1)], dtype=torch.bool)
    correct = {F({"a"}): outcomes[:, 0], F({"v"}): outcomes[:, 1], F({"a", "v"}): outcomes[:, 2]}
    phi = sample_shapley(coalition_values(correct), ["a", "v"])
    assert set(phi.flatten().tolist()) <= {-0.5, 0.0, 0.5, 1.0, 1.5}
    assert torch.equal(phi.sum(1), 2.0 * outcomes[:, 2].float())  # efficiency: Σφ = v(all) − v(∅)


def test_three_modal_game_scales_by_coalition_size():
    # correct exactly when a is present: v(a)=1, v(ab)=v(ac)=2, v(abc)=3, others 0
    # φ_a = 1/3·1 + 1/6·2 + 1/6·2 + 1/3·3 = 2; φ_b = 1/6·(2−1) + 1/6·0 + 1/3·(3−2) = 0.5 = φ_c
    mods = ["a", "b", "c"]
    correct = {S: torch.tensor(["a" in S]) for S in [F(x) for x in ("a", "b", "c", "ab", "ac", "bc", "abc")]}
    phi = sample_shapley(coalition_values(correct), mods)
    assert phi[0].tolist() == pytest.approx([2.0, 0.5, 0.5])


def test_copy_rule_bounds_are_strict():
    phi = torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, 0.4], [-0.1, 0.9]])
    # −0.5 < −0.1: 3; 0 in (−0.1, 0.4): 2; 0.5 in (0.4, 0.9): 1; 1, 1.5: 0; the bounds themselves: 0
    assert sample_copies(phi).tolist() == [[3, 2], [1, 0], [0, 0], [0, 0]]


def test_plan_lists_every_sample_once_then_the_copies_by_modality():
    plan = plan_from_copies(torch.tensor([[0, 1], [2, 0]]))
    assert plan.rows.tolist() == [0, 1, 1, 1, 0]
    assert plan.keep.tolist() == [[True, True], [True, True], [True, False], [True, False], [False, True]]


def test_modality_level_ratio_by_rule():
    # φ̄ = (1.2, 0.3): gaps (−0.2, 0.7), spread 0.9, (2/3)·0.9 = 0.6; the second modality has the larger gap
    mean = torch.tensor([1.2, 0.3])
    r, weakest = modality_ratio(mean, alpha=1.0)
    assert (r, weakest) == (pytest.approx(0.6), 1)
    assert modality_ratio(mean, 0.5)[0] == pytest.approx(0.3)
    assert modality_ratio(mean, 1.0, "tanh")[0] == pytest.approx(math.tanh(0.6))
    assert modality_ratio(mean, 1.0, "power")[0] == pytest.approx(0.6**1.5)


def test_keep_features_zeroes_per_sample():
    features = {"a": torch.ones(3, 2), "b": 2 * torch.ones(3, 2)}
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    out = keep_features(features, keep, ["a", "b"])
    assert out["a"].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert out["b"].tolist() == [[2, 2], [0, 0], [2, 2]]
    assert keep_features(features, None, ["a", "b"]) is features


def test_an_invalid_plan_is_refused():
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\)"):
        EpochPlan(torch.tensor([0, 4])).check(4, 2)
    with pytest.raises(ValueError, match="keep must have shape"):
        EpochPlan(torch.tensor([0, 1]), torch.ones(2, 3, dtype=torch.bool)).check(4, 2)


def test_bounds_must_decrease():
    with pytest.raises(ConfigError, match="copy_bounds must decrease"):
        Trainer(build_config(overrides=TINY + ["smv.copy_bounds=[0.4,0.9,-0.1]"], method="joint+smv"), None, quiet=True)


def test_objectives_that_ignore_keep_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="'mla' and 'smv'.*does not honour") as error:
        resolve("mla+smv")
    assert "\n" not in str(error.value)
    resolve("midas+smv")  # MIDAS honours it


def test_the_planned_epoch_trains_on_the_copies_with_their_modalities_zeroed():
    trainer = Trainer(build_config(overrides=TINY, method="joint+smv"), None, quiet=True)
    trainer._train_epoch(0)  # warm-up of one epoch: valued at its end
    smv = trainer.method.parts["smv"]
    assert bool(smv.valued)
    plan = smv.plan()
    n = len(trainer.train_data)
    assert plan.rows[:n].tolist() == list(range(n))
    copies = sample_copies(smv.phi.cpu())
    assert len(plan.rows) == n + int(copies.sum())
    loader = trainer._epoch_loader(1)
    assert len(loader.dataset) == len(plan.rows)
    batch = next(iter(loader))
    assert batch.keep is not None and batch.keep.shape == (len(batch), 2)
    single = ~batch.keep.all(1)
    assert single.any()
    joint = trainer.method.objective
    features = joint.encode_batch(trainer.model, batch)
    for j, m in enumerate(trainer.bundle.modalities):
        assert torch.all(features[m][~batch.keep[:, j]] == 0)
        assert torch.all(features[m][batch.keep[:, j]].abs().sum(1) > 0)


def _logs(run_dir):
    return [json.loads(line)["method"] for line in open(run_dir / "metrics.jsonl")]


def test_runs_are_deterministic_and_the_later_epochs_are_longer(tmp_path):
    config = build_config(overrides=TINY, method="joint+smv")
    train_run(config, tmp_path / "a", quiet=True)
    train_run(config, tmp_path / "b", quiet=True)
    a, b = _logs(tmp_path / "a"), _logs(tmp_path / "b")
    assert a == b
    assert "smv/phi/strong" in a[0] and "smv/copies/weak" in a[0]


def test_composes_with_midas_and_runs_with_three_modalities(tmp_path):
    train_run(build_config(overrides=TINY + ["train.epochs=2"], method="midas+smv"), tmp_path / "midas", quiet=True)
    train_run(build_config(overrides=TINY + THREE + ["train.epochs=2"], method="joint+smv"), tmp_path / "three", quiet=True)
    logs = _logs(tmp_path / "three")
    assert {"smv/phi/strong", "smv/copies/weak2"} <= set(logs[0])
    assert len([k for k in logs[0] if k.startswith("smv/phi/")]) == 3
    metrics = json.loads((tmp_path / "midas" / "metrics.json").read_text())
    assert metrics["method"] == "midas+smv"


def test_modality_level_adds_copies_of_the_weakest_modality_only(tmp_path):
    trainer = Trainer(build_config(overrides=TINY + ["smv.level=modality"], method="joint+smv"), None, quiet=True)
    trainer._train_epoch(0)
    plan = trainer.method.parts["smv"].plan()
    n = len(trainer.train_data)
    extra = plan.keep[n:]
    assert len(extra) > 0
    assert (extra.sum(1) == 1).all() and len(set(extra.float().argmax(1).tolist())) == 1
    assert torch.equal(plan.rows, trainer.method.parts["smv"].plan().rows)  # the draw follows the stored seed
