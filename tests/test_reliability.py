"""What mmbalance promises when files are hostile, processes are killed and users make mistakes.

Every case is run through the command line (``main``) as a user would, and
each must end with one line on stderr and exit status 2, or succeed without
destroying an earlier result. docs/reliability.md lists the promises.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mmbalance.cli import main
from mmbalance.errors import MMBalanceError
from mmbalance.training import Trainer

TINY = [
    "--set", "synthetic.num_samples=200", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=2", "--set", "train.batch_size=32",
    "--set", "model.feature_dim=8", "--set", "model.hidden_dim=16",
]


def cli(*args) -> int:
    return main(["--quiet", *args])


def one_line(capsys, code: int, pattern: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run(tmp_path, capsys):
    """A finished two-epoch joint run."""
    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *TINY) == 0
    capsys.readouterr()
    return out


class RunsCode:
    """Unpickling this creates a marker file: proof that loading ran code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- nothing read runs code ---------------------------------------------------------------------
@pytest.mark.parametrize("target", ["best.pt", "last.pt"])
def test_a_checkpoint_holding_a_pickled_callable_is_refused_unrun(run, target, tmp_path, capsys):
    marker = tmp_path / "ran"
    RunsCode.marker = str(marker)
    checkpoint = torch.load(run / target, weights_only=True)
    checkpoint["model"]["evil"] = RunsCode()
    torch.save(checkpoint, run / target)
    commands = {
        "best.pt": [["eval", "--run", str(run)],
                    ["robust", "--run", str(run), "--corruption", "gaussian", "--levels", "0,1", "--out", str(tmp_path / "r")]],
        "last.pt": [["train", "--resume", str(run), "--set", "train.epochs=3"]],
    }[target]
    for command in commands:
        one_line(capsys, cli(*command), "is not an mmbalance checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\x00\x01 random bytes \xff" * 50, "dict"])
def test_a_checkpoint_that_is_no_checkpoint_is_one_line(run, content, capsys):
    if content == "dict":
        torch.save({"weights": torch.zeros(2)}, run / "best.pt")
        pattern = "a dict without the keys model, method"
    else:
        (run / "best.pt").write_bytes(content)
        pattern = "is not an mmbalance checkpoint"
    one_line(capsys, cli("eval", "--run", str(run)), pattern)


# -- nothing is destroyed without asking ----------------------------------------------------------
@pytest.mark.parametrize("state", ["finished", "interrupted", "log only"])
def test_train_refuses_a_folder_holding_a_run(run, state, capsys):
    if state == "interrupted":
        (run / "metrics.json").unlink()
    if state == "log only":
        for name in ("metrics.json", "best.pt", "last.pt", "config.yaml"):
            (run / name).unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = one_line(capsys, cli("train", "--out", str(run), *TINY), "holds a run already")
    assert f"--resume {run}" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert cli("train", "--out", str(run), "--overwrite", *TINY, "--set", "train.epochs=1") == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_never_writes_through_a_symbolic_link(run, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(precious)
    assert cli("train", "--resume", str(run), "--set", "train.epochs=3") == 0
    assert precious.read_text() == "keep me\n"
    assert not (run / "metrics.jsonl").is_symlink() and len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_outputs_have_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("train", "--out", str(tmp_path / "r"), *TINY) == 0
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "best.pt", "last.pt"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name


# -- no wrong result reported as right ------------------------------------------------------------
def test_bench_never_reuses_a_run_trained_with_other_settings(tmp_path, capsys):
    args = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1", "--out", str(tmp_path / "b"), *TINY]
    assert cli(*args) == 0
    capsys.readouterr()
    line = one_line(capsys, cli(*args, "--set", "train.lr=0.01"), "was trained with other settings")
    assert "train.lr: 0.001 in the run, 0.01 in this bench" in line


def test_two_benches_on_one_folder_train_each_run_once(tmp_path):
    out = tmp_path / "b"
    command = [sys.executable, "-m", "mmbalance", "bench", "--dataset", "synthetic", "--methods", "joint,midas",
               "--seeds", "1", "--out", str(out), *TINY, "--set", "train.epochs=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, second = (subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2))
    logs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, logs
    text = "".join(err for _, err in logs)
    assert text.count(": training") == 2  # each of the two runs trained by exactly one process
    for run in ("joint-seed0", "midas-seed0"):
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    assert not (out / "joint-seed0" / ".lock").exists()


def test_resume_refuses_a_checkpoint_of_other_settings(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert cli("train", "--out", str(other), *TINY, "--set", "train.lr=0.01", "--seed", "4") == 0
    capsys.readouterr()
    (run / "metrics.json").unlink()
    (run / "last.pt").write_bytes((other / "last.pt").read_bytes())
    line = one_line(capsys, cli("train", "--resume", str(run)), "differs from the configuration last.pt was trained with")
    assert "seed: 4 in last.pt, 0 in config.yaml" in line and "train.lr: 0.01 in last.pt, 0.001 in config.yaml" in line


def test_a_hand_edited_config_is_refused_and_epochs_can_be_extended(run, capsys):
    (run / "metrics.json").unlink()
    original = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(original.replace("lr: 0.001", "lr: 0.05"))
    one_line(capsys, cli("train", "--resume", str(run)), "train.lr: 0.001 in last.pt, 0.05 in config.yaml")
    (run / "config.yaml").write_text(original)
    one_line(capsys, cli("train", "--resume", str(run), "--set", "train.lr=0.05"), "--set train.lr cannot change when resuming")
    assert cli("train", "--resume", str(run), "--set", "train.epochs=4") == 0
    assert "epochs: 4" in (run / "config.yaml").read_text()
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_extending_keeps_an_epoch_dependent_warmup(tmp_path):
    out = tmp_path / "m"
    assert cli("train", "--method", "midas", "--out", str(out), *TINY, "--set", "train.epochs=7") == 0
    assert cli("train", "--resume", str(out), "--set", "train.epochs=14") == 0
    assert "modulation_starts: 1" in (out / "config.yaml").read_text()  # round(7 / 7), not round(14 / 7)


def test_metrics_log_agrees_with_the_checkpoint_after_a_kill_between_them(tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert cli("train", "--out", str(full), *TINY, "--set", "train.epochs=3") == 0
    original = Trainer._write_history

    def killed_after_second_checkpoint(self):
        if self.state["epoch"] == 2 and len(self.history) == 2:
            raise KeyboardInterrupt  # last.pt of epoch 2 is written, its metrics.jsonl row is not
        return original(self)

    out = tmp_path / "killed"
    monkeypatch.setattr(Trainer, "_write_history", killed_after_second_checkpoint)
    assert cli("train", "--out", str(out), *TINY, "--set", "train.epochs=3") == 130
    monkeypatch.undo()
    log = out / "metrics.jsonl"
    assert len(log.read_text().splitlines()) == 1
    log.write_text(log.read_text() + '{"epoch": 2, "train_lo')  # and a torn line
    assert cli("train", "--resume", str(out)) == 0
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    reference = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, reference):
        assert row["train_loss"] == ref["train_loss"] and row["val"] == ref["val"]


# -- user mistakes are one line, exit 2 -----------------------------------------------------------
def test_a_checkpoint_of_another_method_or_shape_names_what_does_not_fit(run, tmp_path, capsys):
    other = tmp_path / "midas"
    assert cli("train", "--out", str(other), "--method", "midas", *TINY) == 0
    capsys.readouterr()
    (run / "best.pt").write_bytes((other / "best.pt").read_bytes())
    one_line(capsys, cli("eval", "--run", str(run)), "best.pt was trained with method 'midas', this run's method is 'joint'")
    wide = tmp_path / "wide"
    assert cli("train", "--out", str(wide), *TINY, "--set", "model.feature_dim=12") == 0
    capsys.readouterr()
    (run / "best.pt").write_bytes((wide / "best.pt").read_bytes())
    one_line(capsys, cli("eval", "--run", str(run)), "model.feature_dim: 12 in best.pt, 8 in this run")


def test_data_changed_after_training_is_named(run, capsys):
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("dims:\n  - 8\n  - 8", "dims:\n  - 9\n  - 8"))
    line = one_line(capsys, cli("eval", "--run", str(run)), "best.pt was trained with another configuration")
    assert "synthetic.dims" in line


def test_a_full_disk_names_the_path_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    import mmbalance.files as files

    real_fsync = os.fsync
    calls = {"n": 0}

    def full_disk_in_second_epoch(fd):
        calls["n"] += 1
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".last.pt") and calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_disk_in_second_epoch)
    out = tmp_path / "r"
    line = one_line(capsys, cli("train", "--out", str(out), *TINY), "cannot write")
    assert "last.pt: No space left on device" in line and "previous version of it is intact" in line
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["state"]["epoch"] == 1  # epoch 1's checkpoint stands
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_failure_in_the_first_epoch_leaves_no_half_made_folder(tmp_path, monkeypatch, capsys):
    def explodes(self, epoch):
        raise MMBalanceError("non-finite loss (nan) at epoch 1, step 1; training stopped, no epoch had finished")

    monkeypatch.setattr(Trainer, "_train_epoch", explodes)
    one_line(capsys, cli("train", "--out", str(tmp_path / "r"), *TINY), "non-finite loss")
    assert not (tmp_path / "r").exists()


def test_nan_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, capsys):
    line = one_line(capsys, cli("train", "--out", str(tmp_path / "r"), *TINY, "--set", "train.lr=1e30",
                                "--set", "train.optimizer=sgd"), "non-finite loss")
    assert "no epoch had finished, so there is no checkpoint" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not text"),
        (b"train:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' appears twice (line 3)"),
        (b"train:\n  epochs: true\n", "invalid value for train.epochs: True"),
        (b"train:\n  lr: .inf\n", "invalid value for train.lr: inf"),
        (b"train:\n  lr: .nan\n", "invalid value for train.lr: nan"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, content, pattern):
    file = tmp_path / "c.yaml"
    file.write_bytes(content)
    one_line(capsys, cli("train", "--out", str(tmp_path / "r"), "--config", str(file)), pattern)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, pattern", [
    ("train.epochs=true", "invalid value for train.epochs: True"),
    ("train.lr=.inf", "invalid value for train.lr: inf"),
    ("train.batch_size=2.5", "invalid value for train.batch_size: 2.5"),
])
def test_strict_numbers_on_the_command_line(tmp_path, capsys, setting, pattern):
    one_line(capsys, cli("train", "--out", str(tmp_path / "r"), "--set", setting), pattern)


def test_library_warnings_never_add_lines_to_an_error(monkeypatch, capsys):
    import mmbalance.cli as command

    def warns_then_fails(args):
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        raise MMBalanceError("something the user can fix")

    monkeypatch.setattr(command, "cmd_list", warns_then_fails)
    one_line(capsys, cli("list", "methods"), "something the user can fix")

    def warns_then_succeeds(args):
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        return 0

    monkeypatch.setattr(command, "cmd_list", warns_then_succeeds)
    assert cli("list", "methods") == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "mmbalance: warning: RuntimeWarning: invalid value encountered in divide"]


def test_a_second_process_on_a_run_folder_is_refused(run, capsys):
    from mmbalance.files import FolderLock

    (run / "metrics.json").unlink()
    with FolderLock(run):
        one_line(capsys, cli("train", "--resume", str(run)), f"is in use by process {os.getpid()}")
