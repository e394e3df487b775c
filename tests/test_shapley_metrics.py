import math

import pytest
import torch

from mmbalance.evaluation import Outputs, compute_metrics, imbalance_ratio, macro_f1, shapley_values
from mmbalance.evaluation.shapley import all_coalitions

F = frozenset


def test_two_player_shapley_by_hand():
    # v(0)=0.1, v(a)=0.7, v(b)=0.2, v(ab)=0.9
    v = {F(): 0.1, F("a"): 0.7, F("b"): 0.2, F("ab"): 0.9}
    phi = shapley_values(v, ["a", "b"])
    # phi_a = 1/2 (0.7-0.1) + 1/2 (0.9-0.2) = 0.65 ; phi_b = 1/2 (0.2-0.1) + 1/2 (0.9-0.7) = 0.15
    assert phi["a"] == pytest.approx(0.65)
    assert phi["b"] == pytest.approx(0.15)


def test_three_player_shapley_by_hand_and_efficiency():
    # additive game plus a synergy of 0.3 between a and b
    base = {"a": 0.2, "b": 0.1, "c": 0.05}
    v = {}
    for s in all_coalitions("abc"):
        v[s] = sum(base[p] for p in s) + (0.3 if {"a", "b"} <= s else 0.0)
    phi = shapley_values(v, list("abc"))
    assert phi["a"] == pytest.approx(0.35)
    assert phi["b"] == pytest.approx(0.25)
    assert phi["c"] == pytest.approx(0.05)
    assert sum(phi.values()) == pytest.approx(v[F("abc")] - v[F()])


def test_imbalance_ratio():
    assert imbalance_ratio({"a": 0.3, "b": 0.3}) == pytest.approx(1.0)
    assert imbalance_ratio({"a": 0.6, "b": 0.0}) == pytest.approx(2.0)
    assert imbalance_ratio({"a": 0.45, "b": 0.15}) == pytest.approx(1.5)  # 2 * 0.75
    assert imbalance_ratio({"a": -0.1, "b": -0.2}) == 1.0


def test_macro_f1_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([0, 1, 1, 1])
    # class 0: p=1, r=0.5, f1=2/3; class 1: p=2/3, r=1, f1=0.8
    assert macro_f1(preds, labels, 3) == pytest.approx((2 / 3 + 0.8) / 2)


def one_hot_logits(classes, num_classes=3):
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_compute_metrics_from_known_outputs():
    labels = torch.tensor([0, 1, 2, 0])
    outputs = Outputs(
        labels=labels,
        index=torch.arange(4),
        logits=one_hot_logits([0, 1, 2, 1]),
        coalition_logits={
            F(): one_hot_logits([0, 0, 0, 0]),  # 0.5
            F(["a"]): one_hot_logits([0, 1, 0, 0]),  # 0.75
            F(["b"]): one_hot_logits([0, 0, 2, 1]),  # 0.5
            F(["a", "b"]): one_hot_logits([0, 1, 2, 0]),  # 1.0
        },
        unimodal_logits={"a": one_hot_logits([0, 1, 1, 1]), "b": one_hot_logits([2, 2, 2, 2])},
    )
    m = compute_metrics(outputs, ["a", "b"], 3)
    assert m["accuracy"] == 0.75
    assert m["modality_accuracy"] == {"a": 0.75, "b": 0.5}
    assert m["unimodal_accuracy"] == {"a": 0.5, "b": 0.25}
    assert m["shapley"]["a"] == pytest.approx(0.375)  # (0.25 + 0.5) / 2
    assert m["shapley"]["b"] == pytest.approx(0.125)  # (0.0 + 0.25) / 2
    assert m["imbalance_ratio"] == pytest.approx(1.5)
    assert math.isclose(sum(m["shapley"].values()), 0.5)


def test_concat_drops_padding_duplicates():
    def part(idx):
        idx = torch.tensor(idx)
        return Outputs(idx, idx, one_hot_logits(idx.tolist(), 5), {F(): one_hot_logits(idx.tolist(), 5)}, {}).to_cpu_dict()

    joined = Outputs.concat([part([0, 2, 4]), part([1, 3, 0])])
    assert joined.index.tolist() == [0, 1, 2, 3, 4]
    assert joined.labels.tolist() == [0, 1, 2, 3, 4]


def test_misaligned_metrics_by_hand():
    from mmbalance.evaluation.metrics import misaligned_metrics

    # sample 1: probabilities 0.5/0.3/0.2 over classes 0/1/2, sources (0, 1): both in the top 2
    # sample 2: 0.5/0.3/0.2, sources (0, 2): class 2 is third -> wrong
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    logits = probs.log()
    sources = torch.tensor([[0, 1], [0, 2]])
    m = misaligned_metrics(logits, sources, ["a", "b"])
    assert m["misaligned_accuracy"] == 0.5
    # normalised confidence of slot a: 0.5/0.8 and 0.5/0.7; of slot b: 0.3/0.8 and 0.2/0.7
    assert m["misaligned_confidence"]["a"] == pytest.approx((0.5 / 0.8 + 0.5 / 0.7) / 2)
    assert m["misaligned_confidence"]["b"] == pytest.approx((0.3 / 0.8 + 0.2 / 0.7) / 2)
    assert m["misaligned_samples"] == 2
    empty = misaligned_metrics(torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.long), ["a", "b"])
    assert math.isnan(empty["misaligned_accuracy"]) and empty["misaligned_samples"] == 0


def test_evaluation_builds_misaligned_pairs_with_distinct_labels(tmp_path):
    from mmbalance.config import build_config
    from mmbalance.training import Trainer

    overrides = ["synthetic.num_samples=240", "synthetic.num_classes=4", "synthetic.strong_groups=2",
                 "synthetic.dims=[8,8]", "train.epochs=1", "model.feature_dim=8", "model.hidden_dim=16"]
    trainer = Trainer(build_config(overrides=overrides), None, quiet=True)
    first = trainer.evaluate("val")
    second = trainer.evaluate("val")
    assert first["misaligned_samples"] > 0
    assert first["misaligned_accuracy"] == second["misaligned_accuracy"]  # a fixed set of pairs
    assert sum(first["misaligned_confidence"].values()) == pytest.approx(1.0, abs=1e-6)
