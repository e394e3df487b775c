"""Multi-label classification throughout: task loss, metrics, threshold, MIDAS's generalisation, data, runs."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers every part and dataset)
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.data.base import DataBundle
from mmbalance.data.batch import Batch, collate
from mmbalance.errors import ConfigError, DataError
from mmbalance.evaluation import metrics as metrics_module
from mmbalance.evaluation.evaluate import gather_rows
from mmbalance.evaluation.metrics import (
    MultiLabelClassification,
    average_precision,
    multi_label_scores,
)
from mmbalance.experiments.summary import markdown_table
from mmbalance.methods.base import cross_entropy
from mmbalance.misalignment import (
    MisalignmentLoss,
    draw_sources,
    fused_source_probabilities,
    misaligned_loss,
    soft_labels,
    source_confidences,
)
from mmbalance.registry import METHODS
from mmbalance.tasks import (
    POS_WEIGHT,
    balanced_pos_weight,
    choose_threshold,
    label_confidence,
    stratification_key,
    task_loss,
)
from mmbalance.training import train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
MULTI = [*TINY, "synthetic.multi_label=true", "synthetic.labels_per_sample=2"]


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def close(tensor, values):
    return torch.allclose(tensor.double(), torch.tensor(values, dtype=torch.float64), atol=1e-6)


def bce(p, y):
    """Binary cross-entropy of probability p for target y, averaged over classes, written out."""
    return -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for q, t in zip(p, y)) / len(p)


# -- the task loss ----------------------------------------------------------------------------------
def test_task_loss_is_bce_per_class_with_an_optional_positive_weight():
    p = [[0.9, 0.2, 0.6], [0.3, 0.7, 0.5]]
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    expected = (bce(p[0], y[0].tolist()) + bce(p[1], y[1].tolist())) / 2
    assert float(task_loss(logit(p), y.double())) == pytest.approx(expected)
    # pos_weight multiplies each class's positive term: class 2 weighted 3
    weighted = [
        -(math.log(0.9) + math.log(0.8) + 3 * math.log(0.6)) / 3,
        -(math.log(0.7) + math.log(0.3) + 3 * math.log(0.5)) / 3,
    ]
    loss = task_loss(logit(p), y.double(), pos_weight=torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64))
    assert float(loss) == pytest.approx(sum(weighted) / 2)
    # the batch helper reads the trainer's weights from batch.extras and a plugin's per-sample weights
    batch = Batch(inputs={}, labels=y.double(), index=torch.arange(2), weight=torch.tensor([2.0, 0.0], dtype=torch.float64))
    batch.extras[POS_WEIGHT] = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)
    assert float(cross_entropy(logit(p), batch)) == pytest.approx(2 * weighted[0] / 2)


def test_single_label_loss_is_unchanged():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert torch.equal(task_loss(logits, labels), F.cross_entropy(logits, labels))


def test_balanced_positive_weight_and_strata():
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    # class 0 is always on and class 2 has 3 negatives to 1 positive; class 1 too
    assert balanced_pos_weight(labels).tolist() == [1.0, 3.0, 3.0]
    # each row's rarest positive label (ties by index: class 1 before class 2); no label -> C
    rows = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert stratification_key(rows).tolist() == [2, 0, 1, 3]
    assert stratification_key(np.array([2, 0, 1])).tolist() == [2, 0, 1]


# -- metrics by hand -------------------------------------------------------------------------------
def test_multi_label_scores_by_hand():
    probabilities = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4], [0.8, 0.3, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    scores = multi_label_scores(probabilities, labels, 0.5)
    # predictions at 0.5: {0,1}, {1}, {0,2}, {} -> per class (tp, predicted, actual): (2,2,2), (1,2,1), (1,1,2)
    assert scores["micro_f1"] == pytest.approx(2 * 4 / (5 + 5))
    f1 = [1.0, 2 / 3, 2 / 3]
    assert scores["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert scores["weighted_f1"] == pytest.approx((2 * 1.0 + 1 * 2 / 3 + 2 * 2 / 3) / 5)
    # per sample: 2/3, 2/3, 1, and 1 for the sample with no label and no prediction
    assert scores["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)
    assert scores["accuracy"] == pytest.approx(2 / 4)  # samples 3 and 4 are exact
    # AP per class: class 0 ranks its 2 positives first (1.0); class 1: its positive first (1.0);
    # class 2 scores 0.5 (pos), 0.4 (pos), 0.3, 0.1 -> 1.0
    assert scores["mAP"] == pytest.approx(1.0)
    low = multi_label_scores(probabilities, labels, 0.35)  # class 2 now also predicted for sample 2
    assert low["micro_f1"] == pytest.approx(2 * 5 / (6 + 5))


def test_average_precision_by_hand_with_ties():
    # ranked: 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True])) == pytest.approx(1 / 2 + 1 / 3)
    # a tie enters together: 0.5 holds a positive and a negative -> precision 1/2 at recall 1
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == pytest.approx(0.5)
    assert math.isnan(average_precision(torch.tensor([0.5]), torch.tensor([False])))
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores, truth = rng.random(50).round(1), rng.random(50) < 0.3
    ours = average_precision(torch.tensor(scores), torch.tensor(truth))
    assert ours == pytest.approx(sklearn.average_precision_score(truth, scores))


def test_threshold_chosen_for_micro_f1_ties_to_the_default():
    probabilities = torch.tensor([[0.45, 0.1], [0.3, 0.2], [0.48, 0.05]])
    labels = torch.tensor([[1, 0], [0, 0], [1, 0]], dtype=torch.float32)
    # 0.31..0.45 predict exactly the two positives (micro-F1 1); the one nearest 0.5 is 0.45
    assert choose_threshold(probabilities, labels) == pytest.approx(0.45)
    # nothing separates thresholds: the default stays
    assert choose_threshold(torch.full((2, 2), 0.9), torch.ones(2, 2)) == pytest.approx(0.5)


def test_rows_are_gathered_across_processes_in_order():
    class TwoProcesses:
        enabled = True

        def gather_objects(self, local):
            other = [{"probability": torch.tensor([[0.7, 0.2]]), "label": torch.tensor([[1.0, 0.0]])}]
            return [local, other]

    metric = MultiLabelClassification()
    metric.reset(["a", "b"], 2, torch.device("cpu"))
    metric.add_rows("probability", torch.tensor([[0.9, 0.6]]))
    metric.add_rows("label", torch.tensor([[1.0, 1.0]]))
    gather_rows([metric], TwoProcesses())
    probabilities, labels = metric.rows_of()
    assert close(probabilities, [[0.9, 0.6], [0.7, 0.2]])
    assert labels.tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_bench_table_shows_micro_and_macro_f1():
    def result(seed, micro):
        scores = {"micro_f1": micro, "macro_f1": micro - 0.1, "mAP": 0.8, "accuracy": 0.3,
                  "modality_micro_f1": {"a": 0.5, "b": 0.4}, "unimodal_micro_f1": {"a": 0.5, "b": 0.4},
                  "imbalance_ratio": 1.2}
        return {"method": "joint", "seed": seed, "task": "multi_label", "modalities": ["a", "b"], "test": scores}

    table = markdown_table([result(0, 0.6), result(1, 0.7)])
    header = table.splitlines()[0]
    assert "micro-F1" in header and "macro-F1" in header and "mAP" in header and "accuracy" not in header
    assert "| joint | 2 | 65.0 ± 7.1 | 55.0 ± 7.1 |" in table


# -- MIDAS's generalisation, by hand ---------------------------------------------------------------
# two samples, three classes: y0 = {0, 2}, y1 = {1}; the heads' probabilities are chosen by hand
Y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
HEAD_A = [[0.8, 0.1, 0.6], [0.3, 0.4, 0.2]]  # confidence on own labels: (0.8 + 0.6) / 2 = 0.7; 0.4
HEAD_B = [[0.5, 0.5, 0.5], [0.2, 0.9, 0.1]]  # 0.5; 0.9
SOURCES = torch.tensor([[0, 1], [1, 0]])  # (a of 0, b of 1) and (a of 1, b of 0)
FUSED = [[0.9, 0.5, 0.6], [0.3, 0.7, 0.1]]
FUSED_FAVOURS_B = [[0.2, 0.9, 0.1], [0.8, 0.1, 0.9]]  # on each row, high on slot b's source labels


def test_confidence_is_the_mean_sigmoid_probability_of_the_positive_labels():
    assert label_confidence(logit(HEAD_A), Y).tolist() == pytest.approx([0.7, 0.4])
    # a sample without a positive label: the mean probability that each class is off
    assert label_confidence(logit([[0.9, 0.2, 0.4]]), torch.zeros(1, 3)).tolist() == pytest.approx([(0.1 + 0.8 + 0.6) / 3])
    heads = {"a": logit(HEAD_A), "b": logit(HEAD_B)}
    confidences = source_confidences(heads, Y, SOURCES, ["a", "b"])
    assert close(confidences, [[0.7, 0.9], [0.4, 0.5]])
    assert close(soft_labels(confidences), [[0.7 / 1.6, 0.9 / 1.6], [0.4 / 0.9, 0.5 / 0.9]])
    # the fused model's confidence in each slot's source labels: row 0 has y0 in slot a, y1 in slot b
    fused = fused_source_probabilities(logit(FUSED), Y[SOURCES])
    assert close(fused, [[(0.9 + 0.6) / 2, 0.5], [0.7, (0.3 + 0.1) / 2]])


def test_misaligned_loss_mixes_the_label_vectors_by_confidence():
    soft = torch.tensor([[0.7 / 1.6, 0.9 / 1.6], [0.4 / 0.9, 0.5 / 0.9]], dtype=torch.float64)
    loss = misaligned_loss(logit(FUSED), Y[SOURCES].double(), soft)
    row0 = soft[0, 0] * bce(FUSED[0], [1, 0, 1]) + soft[0, 1] * bce(FUSED[0], [0, 1, 0])
    row1 = soft[1, 0] * bce(FUSED[1], [0, 1, 0]) + soft[1, 1] * bce(FUSED[1], [1, 0, 1])
    assert float(loss) == pytest.approx(float(row0 + row1) / 2)
    # BCE is linear in its target: the same as BCE against the soft target c^a y^(a) + c^b y^(b)
    target = soft[:, :1] * Y[SOURCES][:, 0].double() + soft[:, 1:] * Y[SOURCES][:, 1].double()
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy_with_logits(logit(FUSED), target)))
    # alpha scales a slot's term and the hard-sample weight a row's
    alpha, weights = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.5, 1.0], dtype=torch.float64)
    scaled = misaligned_loss(logit(FUSED), Y[SOURCES].double(), soft, alpha, weights)
    expected = 1.5 * (2 * soft[0, 0] * bce(FUSED[0], [1, 0, 1]) + soft[0, 1] * bce(FUSED[0], [0, 1, 0])) + row1 + (
        soft[1, 0] * bce(FUSED[1], [0, 1, 0])
    )
    assert float(scaled) == pytest.approx(float(expected) / 2)


def test_alpha_moves_by_the_multi_label_confidences():
    loss = MisalignmentLoss(["a", "b"], hard_weighting=False, eta=0.5)
    heads = {"a": logit(HEAD_A).float(), "b": logit(HEAD_B).float()}
    features = {"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}
    value, stats = loss(features, heads, Y, lambda f: logit(FUSED_FAVOURS_B).float(), sources=SOURCES)
    c = [[0.7 / 1.6, 0.9 / 1.6], [0.4 / 0.9, 0.5 / 0.9]]
    # row 0: slot a's labels y0 get (0.2 + 0.1) / 2, slot b's y1 0.9; row 1: y1 gets 0.1, y0 (0.8 + 0.9) / 2
    q = [[0.15 / 1.05, 0.9 / 1.05], [0.1 / 0.95, 0.85 / 0.95]]
    mean_c = [(c[0][k] + c[1][k]) / 2 for k in range(2)]
    mean_q = [(q[0][k] + q[1][k]) / 2 for k in range(2)]
    assert stats["confidence"].tolist() == pytest.approx(mean_c, abs=1e-6)
    assert stats["fused_confidence"].tolist() == pytest.approx(mean_q, abs=1e-6)
    assert int(stats["weak_modality"]) == 0  # a is the less confident slot
    loss.update_alpha(stats)  # the fused model under-credits a: its alpha grows by eta * (mean c^a - mean q^a)
    assert mean_c[0] - mean_q[0] > 0.3
    assert loss.alpha.tolist() == pytest.approx([1 + 0.5 * (mean_c[0] - mean_q[0]), 1.0], abs=1e-6)
    assert float(value) > 0


def test_misaligned_pairs_differ_in_their_label_vectors():
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sources, valid = draw_sources(labels, 2, torch.Generator().manual_seed(0))
    assert valid.all() and len(sources) == 8
    assert all(not torch.equal(labels[i], labels[j]) for i, j in sources.tolist())
    same, valid = draw_sources(torch.ones(3, 2), 2, torch.Generator().manual_seed(0))
    assert len(same) == 0 and not valid.any()


# -- data ------------------------------------------------------------------------------------------
def test_from_tensors_reads_rows_as_multi_label_and_refuses_other_values():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 3)) < 0.4).astype(np.int64)
    bundle = DataBundle.from_tensors({"a": rng.random((60, 2)), "b": rng.random((60, 2))}, labels).validate()
    assert bundle.task == "multi_label" and bundle.num_classes == 3
    assert bundle.train.labels.dtype == torch.float32 and bundle.train.labels.shape[1] == 3
    sample = bundle.train[0]
    assert sample["label"].tolist() == bundle.train.labels[0].tolist()
    assert collate([bundle.train[0], bundle.train[1]]).labels.shape == (2, 3)
    labels[4, 1] = 2
    with pytest.raises(DataError, match=r"must hold 0 and 1, got 2 at sample 4, class 1$"):
        DataBundle.from_tensors({"a": rng.random((60, 2)), "b": rng.random((60, 2))}, labels)


def test_synthetic_multi_label_mode():
    bundle = load_dataset(build_config(overrides=[*TINY, "synthetic.multi_label=true", "synthetic.labels_per_sample=3"]))
    labels = torch.cat([bundle.train.labels, bundle.val.labels, bundle.test.labels])
    assert bundle.task == "multi_label" and labels.shape == (200, 4)
    counts = labels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) == 3
    again = load_dataset(build_config(overrides=[*TINY, "synthetic.multi_label=true", "synthetic.labels_per_sample=3"]))
    assert torch.equal(again.train.inputs["weak"], bundle.train.inputs["weak"])
    single = load_dataset(build_config(overrides=TINY))
    assert single.task == "single_label" and single.train.labels.ndim == 1
    with pytest.raises(ConfigError, match=r"labels_per_sample \(5\) cannot exceed num_classes \(4\)"):
        build_config(overrides=[*TINY, "synthetic.multi_label=true", "synthetic.labels_per_sample=5"])


def write_npz(path, seed=0, n=120):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) < 0.4).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    signal = labels @ rng.standard_normal((3, 6))
    np.savez(path, label=labels, audio=signal + rng.standard_normal((n, 6)),
             video=-signal + rng.standard_normal((n, 6)).astype(np.float32))
    return labels


def test_npz_with_a_2d_label_is_multi_label(tmp_path):
    labels = write_npz(tmp_path / "ml.npz")
    bundle = load_dataset(build_config(overrides=[f"data.path={tmp_path / 'ml.npz'}"], dataset="npz"))
    assert bundle.task == "multi_label" and bundle.num_classes == 3
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == len(labels)
    with pytest.raises(DataError, match=r"npz.num_classes=4 but the multi-label 'label' of .* has 3 columns"):
        load_dataset(build_config(overrides=[f"data.path={tmp_path / 'ml.npz'}", "npz.num_classes=4"], dataset="npz"))
    np.savez(tmp_path / "bad.npz", label=np.full((10, 3), 0.5), audio=np.zeros((10, 2)), video=np.zeros((10, 2)))
    with pytest.raises(DataError, match=r"must hold 0 and 1, got 0.5 at sample 0, class 0"):
        load_dataset(build_config(overrides=[f"data.path={tmp_path / 'bad.npz'}"], dataset="npz"))


def test_mosei_emotions_as_a_multi_label_task(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in {"train": 12, "valid": 4, "test": 4}.items():
        arrays = {m: rng.standard_normal((n, 5, 3)).astype(np.float32) for m in ("vision", "audio", "text")}
        intensities = np.where(rng.random((n, 1, 6)) < 0.4, rng.uniform(0.3, 3, (n, 1, 6)), 0.0)
        arrays["labels"] = np.concatenate([rng.uniform(-3, 3, (n, 1, 1)), intensities], axis=2).astype(np.float32)
        data[split] = arrays
    with open(tmp_path / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump(data, handle)
    bundle = load_dataset(build_config(overrides=[f"data.root={tmp_path}", "mosei.labels=emotions"], dataset="mosei"))
    assert bundle.task == "multi_label" and bundle.num_classes == 6
    assert bundle.class_names == ["happiness", "sadness", "anger", "surprise", "disgust", "fear"]
    expected = (data["test"]["labels"][:, 0, 1:] > 0).astype(np.float32)
    assert bundle.test.labels.numpy().tolist() == expected.tolist()
    sentiment = load_dataset(build_config(overrides=[f"data.root={tmp_path}"], dataset="mosei"))
    assert sentiment.task == "single_label"
    assert sentiment.test.labels.tolist() == (data["test"]["labels"][:, 0, 0] >= 0).astype(int).tolist()
    for split in data.values():
        split["labels"] = split["labels"][:, :, :1]  # the MulT pickles: sentiment only
    with open(tmp_path / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump(data, handle)
    with pytest.raises(DataError, match=r"labels=emotions needs 7 values per sample in 'train/labels' .*, got 1"):
        load_dataset(build_config(overrides=[f"data.root={tmp_path}", "mosei.labels=emotions"], dataset="mosei"))
    with pytest.raises(ConfigError, match=r"mosi.labels"):
        build_config(overrides=["mosi.labels=emotions"], dataset="mosi")


# -- methods and runs ------------------------------------------------------------------------------
def test_parts_declare_multi_label_support():
    supported = {n for n in METHODS.names() if METHODS.get(n).multi_label}
    assert {"joint", "unimodal", "midas", "mmpareto"} <= supported
    # rules that read one true class per sample stay refused
    assert not supported & {"ogm_ge", "agm", "opm", "pmr", "arl", "cal", "cal_accel", "smv"}


def test_unsupported_method_is_refused_before_training(tmp_path):
    config = build_config(overrides=MULTI, method="joint+ogm_ge")
    with pytest.raises(ConfigError, match=r"^method 'joint\+ogm_ge' cannot train on the multi-label data of 'synthetic': "
                                          r"'ogm_ge' does not support multi-label classification \(parts that do: .*midas"):
        train_run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    for option, message in (("train.pos_weight=2", "train.pos_weight=2.0 applies to multi-label data only"),
                            ("eval.threshold=0.3", "eval.threshold=0.3 applies to multi-label data only")):
        with pytest.raises(ConfigError, match=message):
            train_run(build_config(overrides=[*TINY, option]), tmp_path / "single", quiet=True)
    with pytest.raises(ConfigError, match=r"eval.select: 'mAP' on single-label data \(allowed: auto, accuracy, macro_f1\)"):
        train_run(build_config(overrides=[*TINY, "eval.select=mAP"]), tmp_path / "single", quiet=True)


def test_unimodal_ensemble_sums_logits_per_class(tmp_path):
    metrics = train_run(build_config(overrides=MULTI, method="unimodal"), tmp_path / "run", quiet=True)
    assert metrics["task"] == "multi_label" and 0 <= metrics["test"]["micro_f1"] <= 1
    from mmbalance.api import load_run

    run = load_run(tmp_path / "run")
    method, model = run.trainer.method, run.trainer.model
    features = {m: torch.randn(3, 8) for m in ("strong", "weak")}
    heads = method.heads(model, features)
    assert torch.allclose(method.predict_from_features(model, features), heads["strong"] + heads["weak"])


def test_threshold_chosen_on_validation_only_and_selection_on_micro_f1(tmp_path, monkeypatch):
    seen = []
    original = metrics_module.choose_threshold

    def recording(probabilities, labels, *args):
        seen.append(len(labels))
        return original(probabilities, labels, *args)

    monkeypatch.setattr(metrics_module, "choose_threshold", recording)
    config = build_config(overrides=[*MULTI, "train.epochs=3", "eval.threshold=val", "train.pos_weight=balanced"],
                          method="midas[modulation_starts=1]")
    metrics = train_run(config, tmp_path / "run", quiet=True)
    sizes = {metrics["val"]["num_samples"]}
    assert seen and set(seen) == sizes  # every choice read validation rows, never test's
    assert metrics["val"]["threshold"] == metrics["test"]["threshold"]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val"]["micro_f1"] for r in history]
    assert metrics["selection_metric"] == "micro_f1" and metrics["best_epoch"] == 1 + scores.index(max(scores))
    assert all("train_micro_f1" in r for r in history)
    for key in ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "accuracy"):
        assert 0 <= metrics["test"][key] <= 1
    assert set(metrics["test"]["modality_micro_f1"]) == {"strong", "weak"}
    assert set(metrics["test"]["shapley"]) == {"strong", "weak"} and metrics["test"]["misaligned_accuracy"] is None


def test_multi_label_run_resumes_exactly(tmp_path):
    from mmbalance.training import resume_run

    overrides = [*MULTI, "train.epochs=3"]
    whole = train_run(build_config(overrides=overrides, method="midas[modulation_starts=1]"), tmp_path / "whole", quiet=True)
    train_run(build_config(overrides=[*MULTI, "train.epochs=2"], method="midas[modulation_starts=1]"), tmp_path / "part", quiet=True)
    resumed = resume_run(tmp_path / "part", quiet=True, overrides=["train.epochs=3"])
    assert resumed["test"]["micro_f1"] == pytest.approx(whole["test"]["micro_f1"])
    assert resumed["best_epoch"] == whole["best_epoch"]


@pytest.mark.parametrize("source", ["synthetic", "npz"])
def test_cli_trains_midas_on_multi_label_data_end_to_end(source, tmp_path, capsys):
    from mmbalance.cli import main

    if source == "synthetic":
        data = ["--dataset", "synthetic", *[x for o in MULTI for x in ("--set", o)]]
    else:
        write_npz(tmp_path / "ml.npz")
        data = ["--dataset", "npz", "--set", f"data.path={tmp_path / 'ml.npz'}", *[x for o in TINY[4:] for x in ("--set", o)]]
    assert main(["--quiet", "train", *data, "--method", "midas", "--out", str(tmp_path / "run")]) == 0
    assert "multi-label): test micro-F1" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "multi_label" and metrics["selection_metric"] == "micro_f1"
    assert {"micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "threshold"} <= set(metrics["test"])
    assert main(["--quiet", "train", *data, "--method", "ogm_ge", "--out", str(tmp_path / "no")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "does not support multi-label classification" in error
    assert not (tmp_path / "no").exists()
