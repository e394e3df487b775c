import math

import pytest
import torch

from mmbalance.evaluation import imbalance_ratio, macro_f1, shapley_values
from mmbalance.evaluation.evaluate import reduce_sums
from mmbalance.evaluation.metrics import DEFAULT_METRICS
from mmbalance.registry import METRICS
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


class View:
    """A hand-made evaluation batch: what EvalView would have computed."""

    def __init__(self, labels, logits, coalitions, unimodal, misaligned=None):
        self.labels, self.logits, self._coalitions = labels, logits, coalitions
        self.unimodal, self.misaligned = unimodal, misaligned

    def coalition_logits(self, coalition):
        return self._coalitions[frozenset(coalition)]


def run_metrics(views, modalities=("a", "b"), num_classes=3):
    results = {}
    for name in DEFAULT_METRICS:
        metric = METRICS.get(name)()
        metric.reset(list(modalities), num_classes, torch.device("cpu"))
        for view in views:
            metric.update(view)
        results.update(metric.compute())
    return results


HAND = dict(
    labels=torch.tensor([0, 1, 2, 0]),
    logits=one_hot_logits([0, 1, 2, 1]),
    coalitions={
        F(): one_hot_logits([0, 0, 0, 0]),  # 0.5
        F(["a"]): one_hot_logits([0, 1, 0, 0]),  # 0.75
        F(["b"]): one_hot_logits([0, 0, 2, 1]),  # 0.5
        F(["a", "b"]): one_hot_logits([0, 1, 2, 0]),  # 1.0
    },
    unimodal={"a": one_hot_logits([0, 1, 1, 1]), "b": one_hot_logits([2, 2, 2, 2])},
)


def test_metrics_from_known_outputs():
    m = run_metrics([View(**HAND)])
    assert m["accuracy"] == 0.75
    # class 0: tp 1, predicted 1, actual 2 -> f1 2/3; class 1: tp 1, predicted 2, actual 1 -> 2/3; class 2: f1 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["num_samples"] == 4
    assert m["modality_accuracy"] == {"a": 0.75, "b": 0.5}
    assert m["unimodal_accuracy"] == {"a": 0.5, "b": 0.25}
    assert m["shapley"]["a"] == pytest.approx(0.375)  # (0.25 + 0.5) / 2
    assert m["shapley"]["b"] == pytest.approx(0.125)  # (0.0 + 0.25) / 2
    assert m["imbalance_ratio"] == pytest.approx(1.5)
    assert math.isclose(sum(m["shapley"].values()), 0.5)


def test_batches_and_processes_add_up_to_the_whole():
    def rows(k):
        return View(
            labels=HAND["labels"][k], logits=HAND["logits"][k],
            coalitions={c: z[k] for c, z in HAND["coalitions"].items()},
            unimodal={m: z[k] for m, z in HAND["unimodal"].items()},
        )

    whole = run_metrics([View(**HAND)])
    assert run_metrics([rows(slice(0, 1)), rows(slice(1, 4))]) == whole

    class TwoProcesses:  # this process holds rows 0..1, the other rows 2..3; all-reduce adds the other's sums
        enabled = True

        def __init__(self, other):
            self.other = other

        def all_reduce_sum(self, flat):
            return flat + self.other

    def shard(k):
        metrics = [METRICS.get(name)() for name in DEFAULT_METRICS]
        for metric in metrics:
            metric.reset(["a", "b"], 3, torch.device("cpu"))
            metric.update(rows(k))
        return metrics

    mine, theirs = shard(slice(0, 2)), shard(slice(2, 4))
    other = torch.cat([t.reshape(-1) for metric in theirs for t in metric.sums.values()])
    reduce_sums(mine, TwoProcesses(other))
    combined = {}
    for metric in mine:
        combined.update(metric.compute())
    assert combined == whole


def misaligned_only(logits, sources, modalities, num_classes):
    metric = METRICS.get("misalignment")()
    metric.reset(list(modalities), num_classes, torch.device("cpu"))
    metric.update(View(None, None, {}, {}, misaligned=(logits, sources)))
    return metric.compute()


def test_misaligned_metrics_by_hand():
    # sample 1: probabilities 0.5/0.3/0.2/0.0.. over classes 0/1/2/3, sources (0, 1): both in the top 2
    # sample 2: sources (0, 2): class 2 is third -> wrong
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sources = torch.tensor([[0, 1], [0, 2]])
    m = misaligned_only(logits, sources, ["a", "b"], 4)
    assert m["misaligned_accuracy"] == 0.5
    # normalised confidence of slot a: 0.5/0.8 and 0.5/0.65; of slot b: 0.3/0.8 and 0.15/0.65
    assert m["misaligned_confidence"]["a"] == pytest.approx((0.5 / 0.8 + 0.5 / 0.65) / 2)
    assert m["misaligned_confidence"]["b"] == pytest.approx((0.3 / 0.8 + 0.15 / 0.65) / 2)
    assert m["misaligned_samples"] == 2
    empty = misaligned_only(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), ["a", "b"], 4)
    assert math.isnan(empty["misaligned_accuracy"]) and empty["misaligned_samples"] == 0


def test_misaligned_accuracy_is_undefined_when_every_class_fits_in_the_top_m():
    # C = 2 = M: both classes are always in the top 2, so a score would be 100 % by construction
    logits = torch.tensor([[2.0, 1.0]])
    m = misaligned_only(logits, torch.tensor([[0, 1]]), ["a", "b"], 2)
    assert m["misaligned_accuracy"] is None
    assert m["misaligned_confidence"]["a"] == pytest.approx(torch.tensor([2.0, 1.0]).softmax(0)[0].item())


def test_misaligned_accuracy_counts_distinct_source_labels():
    # M = 3, C = 5. Sample 1: sources (1, 1, 3), two distinct labels -> correct iff {1, 3} is the top 2.
    # Its logits rank 3 > 1 > 0 > ...: correct (under "every label in the top M" the top 3 would also pass
    # with a label ranked third). Sample 2: sources (0, 0, 2); top 2 are {2, 4}: 0 is third -> wrong,
    # although every label is in the top M = 3.
    logits = torch.tensor([[1.0, 3.0, 0.0, 4.0, -1.0], [2.0, -1.0, 4.0, 0.0, 3.0]])
    sources = torch.tensor([[1, 1, 3], [0, 0, 2]])
    m = misaligned_only(logits, sources, ["a", "b", "c"], 5)
    assert m["misaligned_accuracy"] == 0.5


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
