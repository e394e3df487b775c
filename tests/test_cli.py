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
    assert run_cli("eval", "--run", str(out), "--split", "test", "--set", "train.eval_batch_size=7") == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert evaluated["modality_accuracy"] == pytest.approx(metrics["test"]["modality_accuracy"])
    code = run_cli("eval", "--run", str(out), "--set", "model.hidden_dim=32")
    one_line_error(capsys, code, "--set model.hidden_dim cannot change for a finished run")


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
    assert capsys.readouterr().err == ""  # --quiet: no per-run lines
    assert main(args) == 0
    assert "[1/4] joint-seed0: done earlier with the same settings, reused" in capsys.readouterr().err
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
        (["config", "show", "--set", "train.epochz=3"], "did you mean 'train.epochs'?"),
        (["config", "show", "--method", "midas+cal"], "has two objectives"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--out", "{tmp}/b"], "--seeds must be at least 1"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1,2,1", "--out", "{tmp}/b"], "lists seed 1 twice"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1,x", "--out", "{tmp}/b"], "--seeds '1,x'"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds=-1,2", "--out", "{tmp}/b"], "seeds >= 0"),
        (["robust", "--run", "{tmp}/r", "--corruption", "token_mask", "--levels", "1", "--set", "train.device=cpu",
          "--out", "{tmp}/o"], "'train.device' is not one"),
        (["robust", "--run", "{tmp}/r", "--corruption", "token_mask", "--levels", "1", "--set", "unk_id=3",
          "--out", "{tmp}/o"], "as token_mask.KEY=VALUE"),
        (["robust", "--run", "{tmp}/r", "--corruption", "gausian", "--levels", "1", "--out", "{tmp}/o"],
         "did you mean 'gaussian'?"),
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


def test_every_argument_of_every_command_says_what_it_is_for():
    import argparse

    from mmbalance.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {action.option_strings or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not (choice.help or "").strip():
                        missing.append(f"{path} {choice.dest}")
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")

    walk(build_parser(), "mmbalance")
    assert not missing, missing


def test_config_show_prints_what_train_writes(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--method", "arl[temperature=3]", "--seed", "2", *TINY]
    (tmp_path / "extra.yaml").write_text("train:\n  lr: 0.002\n")
    assert run_cli("config", "show", *args, "--config", str(tmp_path / "extra.yaml")) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# train.grad_clip: recommended by arl\n")
    assert "temperature: 3" in shown and "lr: 0.002" in shown
    assert run_cli("train", *args, "--config", str(tmp_path / "extra.yaml"), "--out", str(tmp_path / "run")) == 0
    assert (tmp_path / "run" / "config.yaml").read_text() == shown


@pytest.mark.parametrize("args", [["list", "methods"], ["config", "show", "--method", "arl"], ["list", "options", "train"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(args):
    """``mmbalance list methods | head -1``: exit 0, nothing on stderr, whoever closes the pipe first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmbalance", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the command prints a line
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""
    shell = subprocess.run(f"{sys.executable} -m mmbalance {' '.join(args)} | head -1", shell=True, env=env,
                           capture_output=True, text=True)
    assert shell.stderr == "" and len(shell.stdout.splitlines()) == 1


def test_bench_runs_exactly_the_listed_seeds_and_says_which(tmp_path, capsys):
    out = tmp_path / "bench"
    assert run_cli("bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "2,0", "--out", str(out), *TINY) == 0
    assert capsys.readouterr().err == ""  # --quiet
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["joint-seed0", "joint-seed2"]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in results] == [2, 0]
    assert "mean ± std over seeds 0, 2 " in (out / "summary.md").read_text()
    assert "| joint | 2 |" in (out / "summary.md").read_text()


def test_robust_takes_corruption_options_with_set_and_still_reads_option(tmp_path, capsys):
    from mmbalance.cli import corruption_options

    assert corruption_options("token_mask", ["token_mask.unk_id=3", "token_mask.pad_id=null"], []) == {"unk_id": 3, "pad_id": None}
    run = tmp_path / "run"
    assert run_cli("train", "--out", str(run), *TINY) == 0
    common = ["robust", "--run", str(run), "--corruption", "gaussian", "--levels", "0,1"]
    assert run_cli(*common, "--set", "gaussian.absolute=true", "--out", str(tmp_path / "new")) == 0
    assert capsys.readouterr().err == ""
    assert run_cli(*common, "--option", "absolute=true", "--out", str(tmp_path / "old")) == 0
    assert "--option is deprecated: use --set gaussian.absolute=" in capsys.readouterr().err
    new, old = (json.loads((tmp_path / name / "robustness.json").read_text()) for name in ("new", "old"))
    assert new["options"] == old["options"] == {"absolute": True}
    assert new["runs"][0]["accuracy"] == old["runs"][0]["accuracy"]


def test_list_options_gives_type_default_and_description_of_every_key(capsys):
    from mmbalance.config import CORE_SECTIONS
    from mmbalance.options import section_of
    from mmbalance.registry import CORRUPTIONS, DATASETS, METHODS

    for name in [*CORE_SECTIONS, *METHODS.names(), *DATASETS.names(), *CORRUPTIONS.names()]:
        assert run_cli("list", "options", name) == 0
        lines = capsys.readouterr().out.splitlines()
        schema = section_of(name)[1]
        for key, field in schema.model_fields.items():
            assert field.description, f"{name}.{key} has no description"
            row = next(i for i, line in enumerate(lines) if line.split()[:1] == [key])
            assert " default " in lines[row], lines[row]
            assert lines[row + 1].strip() == " ".join(field.description.split()), f"{name}.{key}"
