"""Two-process training with torchrun (gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "--set", "synthetic.num_samples=240", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=3", "--set", "model.feature_dim=8",
    "--set", "model.hidden_dim=16", "--set", "train.lr=0.01",
]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "mmbalance", "--quiet", "train", "--out", str(two), *TINY, "--set", "train.batch_size=16"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "mmbalance", "--quiet", "train", "--out", str(one), *TINY, "--set", "train.batch_size=32"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # only rank 0 writes: one line per epoch, not one per process
    names = sorted(p.name for p in two.iterdir() if not p.name.startswith("events.out.tfevents."))
    assert names == ["best.pt", "config.yaml", "last.pt", "metrics.json", "metrics.jsonl", "scalars.csv"]
    lines_two = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    lines_one = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(lines_two) == 3
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # evaluation gathers both shards: every validation and test sample is counted once
    assert metrics["val"]["num_samples"] == json.loads((one / "metrics.json").read_text())["val"]["num_samples"]
    # each rank sees half of every global batch and gradients are averaged, so training
    # follows the single-process run with the same global batch (up to summation order)
    for a, b in zip(lines_two, lines_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-9)
        assert a["val"]["accuracy"] == pytest.approx(b["val"]["accuracy"], abs=1e-9)
