"""End-to-end runs of the ``mmbalance`` command on tiny data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmbalance.cli import main

TINY = [
    "--set", "synthetic.num_samples=240", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=2", "--set", "train.batch_size=32",
    "--set", "model.feature_dim=8", "--set", "model.hidden_dim=16",
]


def run_cli(*args):
    return main(["--quiet", *args])


def one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--dataset", "synthetic", "--method", "joint", "--seed", "3", "--out", str(out), *TINY) == 0
    assert "test accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "joint" and metrics["dataset"] == "synthetic" and metrics["seed"] == 3
    for key in ("best_epoch", "train_seconds", "seconds_per_step"):
        assert key in metrics
    assert run_cli("eval", "--run", str(out), "--split", "test") == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert evaluated["modality_accuracy"] == pytest.approx(metrics["test"]["modality_accuracy"])


def test_list(capsys):
    for what, expected in [("methods", "joint"), ("datasets", "synthetic"), ("encoders", "resnet18"), ("fusions", "film"),
                           ("corruptions", "gaussian"), ("metrics", "misalignment")]:
        assert run_cli("list", what) == 0
        assert expected in capsys.readouterr().out
    assert run_cli("list", "methods") == 0
    listed = capsys.readouterr().out.splitlines()
    kinds = {line.split()[0]: line.split()[1] for line in listed}
    assert kinds["midas"] == "objective" and kinds["arl"] == "plugin"


def test_bench_writes_results_and_summary_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,unimodal", "--seeds", "2", "--out", str(out), *TINY]
    assert run_cli(*args) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["joint-seed0", "joint-seed1", "unimodal-seed0", "unimodal-seed1"]
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in results] == [("joint", 0), ("joint", 1), ("unimodal", 0), ("unimodal", 1)]
    summary = (out / "summary.md").read_text()
    assert "| joint | 2 |" in summary and "| unimodal | 2 |" in summary
    assert "strong only" in summary and "weak only" in summary and "±" in summary
    assert "bench --dataset synthetic --methods joint,unimodal" in summary
    assert (out / "summary.png").stat().st_size > 1000
    stamp = (out / "joint-seed0" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert "done earlier with the same settings, reused" in capsys.readouterr().err
    assert (out / "joint-seed0" / "metrics.json").stat().st_mtime_ns == stamp


def test_npz_quick_start(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    path = tmp_path / "mine.npz"
    np.savez(path, audio=rng.normal(size=(90, 5)) + labels[:, None], video=rng.normal(size=(90, 4)), label=labels)
    out = tmp_path / "run"
    code = run_cli("train", "--dataset", "npz", "--set", f"data.path={path}", "--set", "train.epochs=2", "--out", str(out))
    assert code == 0
    assert set(json.loads((out / "metrics.json").read_text())["test"]["modality_accuracy"]) == {"audio", "video"}


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["train", "--method", "jiont", "--out", "{tmp}/r"], "unknown method 'jiont'; did you mean 'joint'?"),
        (["train", "--dataset", "synthtic", "--out", "{tmp}/r"], "did you mean 'synthetic'?"),
        (["train", "--set", "model.encoder=resnet81", "--out", "{tmp}/r"], "did you mean 'resnet18'?"),
        (["train", "--set", "model.fusion=concatt", "--out", "{tmp}/r"], "did you mean 'concat'?"),
        (["train", "--set", "train.epochs=two", "--out", "{tmp}/r"], "invalid value for train.epochs: 'two'"),
        (["train", "--dataset", "mfeat", "--set", "data.root={tmp}/none", "--out", "{tmp}/r"], "mmbalance data fetch mfeat"),
        (["train", "--dataset", "npz", "--set", "data.path={tmp}/none.npz", "--out", "{tmp}/r"], "none.npz"),
        (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "config file not found"),
        (["train", "--set", "data.views=[strong]", "--out", "{tmp}/r"], "at least 2"),
        (["train", "--out", "{tmp}/blocker/r"], "cannot write to output folder"),
        (["eval", "--run", "{tmp}/nothing"], "is not a finished run folder"),
        (["train", "--set", "train.device=tpu", "--out", "{tmp}/r"], "invalid value for train.device: 'tpu'"),
        (["train", "--resume", "{tmp}/nothing"], "nothing to resume"),
        (["bench", "--dataset", "synthetic", "--methods", "joint,bogus", "--seeds", "1", "--out", "{tmp}/b"], "unknown method 'bogus'"),
        (["data", "fetch", "synthetic"], "has nothing to fetch"),
        (["data", "fetch", "mfet"], "did you mean 'mfeat'?"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, pattern):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    one_line_error(capsys, code, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half-written output


def test_labels_out_of_range_and_missing_modality(tmp_path, capsys):
    labels = np.array([0, 1, 2, 7] * 10)
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.zeros((40, 2)), b=np.zeros((40, 2)), label=labels)
    code = run_cli("train", "--dataset", "npz", "--set", f"data.path={path}", "--set", "npz.num_classes=3", "--out", str(tmp_path / "r"))
    one_line_error(capsys, code, "label 7")
    np.savez(path, a=np.zeros((40, 2)), b=np.zeros((39, 2)), label=labels % 3)
    code = run_cli("train", "--dataset", "npz", "--set", f"data.path={path}", "--out", str(tmp_path / "r"))
    one_line_error(capsys, code, "'b'")
    assert not (tmp_path / "r").exists()


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "train", "--method", "jiont", "--out", str(tmp_path / "r")])


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_metrics(tmp_path):
    """A real SIGKILL in the middle of a run, then ``train --resume DIR``."""
    common = [*TINY, "--set", "train.epochs=60", "--set", "synthetic.num_samples=600"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mmbalance", "--quiet", "train"]
    subprocess.run([*cli, "--out", str(tmp_path / "full"), *common], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cli, "--out", str(tmp_path / "killed"), *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it could be killed"
    done = subprocess.run([*cli, "--resume", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["best_epoch"] == full["best_epoch"]


def test_plot_writes_pngs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--out", str(out), *TINY) == 0
    capsys.readouterr()
    assert run_cli("plot", "--run", str(out)) == 0
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert {"accuracy.png", "modality_accuracy.png"} <= names
    assert all((out / "plots" / n).stat().st_size > 1000 for n in names)
    code = run_cli("plot", "--run", str(tmp_path / "nothing"))
    one_line_error(capsys, code, "has no metrics.jsonl")


@pytest.mark.slow
def test_demo_writes_the_report_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--out", str(out), "--seeds", "1") == 0
    printed = capsys.readouterr().out
    assert "| joint | 1 |" in printed and "| unimodal | 1 |" in printed and "| midas | 1 |" in printed
    assert {"summary.md", "summary.png", "results.jsonl"} <= {p.name for p in out.iterdir()}
