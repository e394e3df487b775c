"""The linear reference: exact on separable data, L2 chosen on validation only, refused on non-vector data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmbalance.cli import main
from mmbalance.data.base import DataBundle
from mmbalance.errors import ConfigError
from mmbalance.experiments.linear_reference import linear_reference, split_reference

WEAK, STRONG = 1e-3, 100.0


def bundle_of(a: np.ndarray, labels: np.ndarray, rows, b: np.ndarray | None = None, num_classes: int = 2) -> DataBundle:
    b = np.zeros((len(labels), 1)) if b is None else b  # a second modality: constant, so only centred
    return DataBundle.from_tensors({"a": a, "b": b}, labels, rows, num_classes)


def test_separable_data_is_classified_perfectly():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centres = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    a = centres[labels] + rng.normal(0, 0.3, size=(60, 3))
    b = rng.normal(0, 1, size=(60, 2))  # noise in the other modality
    order = rng.permutation(60)
    bundle = bundle_of(a, labels, (order[:30], order[30:45], order[45:]), b, num_classes=3)
    result = linear_reference(bundle)
    assert result["test"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert result["val"]["accuracy"] == 1.0
    assert linear_reference(bundle) == result  # no random state: the same every time


def two_ways_to_label():
    """Train: 30 of class 0 at a = -1, 10 of class 1 at a = +1 (separable, imbalanced).

    ``consistent``: 5 + 5 samples labelled like training, which the weakly
    regularised model gets right and the strongly regularised one (all weights
    near zero, so the majority class) half right. ``contrary``: 10 samples at
    a = +1 labelled 0, which only the strongly regularised model gets right.
    """
    a = np.concatenate([np.full(30, -1.0), np.full(10, 1.0), np.full(5, -1.0), np.full(5, 1.0), np.full(10, 1.0)])
    a = a[:, None] + np.random.default_rng(0).normal(0, 0.05, size=(60, 1))
    labels = np.concatenate([np.zeros(30), np.ones(10), np.zeros(5), np.ones(5), np.zeros(10)]).astype(np.int64)
    train, consistent, contrary = np.arange(40), np.arange(40, 50), np.arange(50, 60)
    return a, labels, train, consistent, contrary


def test_regularisation_is_chosen_on_validation_not_on_test():
    a, labels, train, consistent, contrary = two_ways_to_label()
    # validation favours the weak L2, test the strong one: the choice follows validation
    result = linear_reference(bundle_of(a, labels, (train, consistent, contrary)), grid=(WEAK, STRONG))
    assert result["linear"]["l2"] == WEAK
    assert result["linear"]["val_accuracy"] == {str(WEAK): 1.0, str(STRONG): 0.5}
    assert result["test"]["accuracy"] == 0.0  # what the chosen model scores, however bad
    # the same data with the two roles swapped: now validation favours the strong L2
    result = linear_reference(bundle_of(a, labels, (train, contrary, consistent)), grid=(WEAK, STRONG))
    assert result["linear"]["l2"] == STRONG
    assert result["test"]["accuracy"] == 0.5


def test_non_vector_inputs_are_refused_with_one_line():
    labels = np.arange(12) % 2
    rows = (np.arange(6), np.arange(6, 9), np.arange(9, 12))
    images = DataBundle.from_tensors({"a": np.zeros((12, 1, 4, 4)), "b": np.zeros((12, 3))}, labels, rows)
    with pytest.raises(ConfigError, match=r"^the linear reference needs float vector features, but modality 'a' has "
                                          r"samples of shape \(1, 4, 4\); leave 'linear' out of --methods"):
        linear_reference(images)
    tokens = DataBundle.from_tensors({"a": np.zeros((12, 3)), "b": np.ones((12, 5), dtype=np.int64)}, labels, rows)
    with pytest.raises(ConfigError, match="modality 'b' has token ids"):
        linear_reference(tokens)


def test_methods_list_with_the_reference():
    assert split_reference(["joint", "linear", "midas"]) == (["joint", "midas"], True)
    assert split_reference(["joint"]) == (["joint"], False)
    with pytest.raises(ConfigError, match="takes no options"):
        split_reference(["joint", "linear[l2=1]"])
    with pytest.raises(ConfigError, match="lists 'linear' twice"):
        split_reference(["joint", "linear", "linear"])
    with pytest.raises(ConfigError, match="only the linear reference"):
        split_reference(["linear"])


TINY = [
    "--set", "synthetic.num_samples=240", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=1", "--set", "train.batch_size=32",
    "--set", "model.feature_dim=8", "--set", "model.hidden_dim=16",
]


def test_bench_with_the_linear_reference_and_a_chosen_baseline(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--quiet", "bench", "--dataset", "synthetic", "--methods", "joint,unimodal,linear", "--seeds", "2",
            "--baseline", "unimodal", "--test", "wilcoxon", "--out", str(out), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "joint-seed0", "joint-seed1", "unimodal-seed0", "unimodal-seed1"]  # the reference keeps no folder
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    linear = [r for r in results if r["label"] == "linear"]
    assert [r["seed"] for r in linear] == [0, 1] and all(r["linear"]["l2"] > 0 for r in linear)
    summary = (out / "summary.md").read_text()
    assert summary in printed
    assert "| accuracy | Δ vs unimodal |" in summary and "| unimodal | 2 |" in summary
    assert "(baseline)" in summary and "Wilcoxon signed-rank test (exact)" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| linear | 2 |"))
    assert "p=0.500" in row and "| – |" in row  # two pairs: the smallest exact p is 2/4


def test_bench_refuses_the_reference_on_images_before_training(tmp_path, capsys):
    path = tmp_path / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.random((60, 1, 4, 4)), audio=rng.random((60, 3)), label=np.arange(60) % 3)
    out = tmp_path / "bench"
    code = main(["--quiet", "bench", "--dataset", "npz", "--set", f"data.path={path}", "--methods", "joint,linear",
                 "--seeds", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "modality 'image' has samples of shape (1, 4, 4)" in err[0]
    assert not out.exists() or not any(p.is_dir() for p in out.iterdir())  # nothing trained
