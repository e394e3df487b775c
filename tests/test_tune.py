"""``mmbalance tune`` and ``bench --tune/--jobs`` on tiny synthetic data."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from mmbalance.cli import main  # noqa: E402
from mmbalance.config import build_config  # noqa: E402
from mmbalance.experiments import study as studies  # noqa: E402
from mmbalance.experiments.tune import fixed_keys, search_space, tune  # noqa: E402

TINY = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
        "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16"]
SETS = [arg for key in TINY for arg in ("--set", key)]


def run_cli(*args):
    return main(["--quiet", *args])


def trials_of(folder):
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert pattern in err[0], err[0]


def test_tune_writes_its_folder_and_best_yaml_trains(tmp_path, capsys):
    out = tmp_path / "study"
    assert run_cli("tune", "--dataset", "synthetic", "--method", "midas", "--trials", "3", "--out", str(out), *SETS) == 0
    printed = capsys.readouterr().out
    assert "best validation accuracy" in printed and "train --config" in printed
    for name in ("best.yaml", "trials.csv", "trials.md", "search.png", "study.db", "tune.json"):
        assert (out / name).is_file(), name
    rows = trials_of(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"complete"}
    best = max(rows, key=lambda r: (float(r["value"]), -int(r["number"])))
    assert f"trial {best['number']}" in (out / "trials.md").read_text()
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["method"] == "midas" and config["midas"]["lam"] == pytest.approx(float(best["midas.lam"]), rel=1e-5)
    # the best config is a config file like any other
    run = tmp_path / "run"
    assert run_cli("train", "--config", str(out / "best.yaml"), "--out", str(run)) == 0
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["midas"] == config["midas"] and trained["train"] == config["train"]
    # the run's best validation accuracy is the trial's value: the same training, seed and split
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == pytest.approx(float(best["value"]), abs=1e-6)


def test_rerun_continues_the_study_up_to_n_trials(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["tune", "--method", "midas", "--out", str(out), *SETS]
    assert run_cli(*args, "--trials", "2") == 0
    first = trials_of(out)
    assert run_cli(*args, "--trials", "3") == 0
    assert trials_of(out)[:2] == first and len(trials_of(out)) == 3
    assert run_cli(*args, "--trials", "3") == 0  # done already: no new trial
    assert len(trials_of(out)) == 3


def test_trials_never_read_the_test_split(tmp_path, monkeypatch):
    from mmbalance.data import loading

    class Refusing(list):
        def __getitem__(self, i):
            raise AssertionError("a trial read the test split")

    load = loading.load_dataset

    def guarded(config):
        bundle = load(config)
        bundle.test = Refusing(range(len(bundle.test)))
        return bundle

    monkeypatch.setattr(loading, "load_dataset", guarded)
    calls = []
    evaluate = studies.Trainer.evaluate
    monkeypatch.setattr(studies.Trainer, "evaluate", lambda self, split: calls.append(split) or evaluate(self, split))
    result = tune("synthetic", "midas", 2, tmp_path / "study", TINY, quiet=True)
    assert result["counts"]["complete"] == 2
    assert calls == ["val"] * 4  # one validation per epoch per trial, never test


def test_pruned_trials_are_recorded_and_never_best(tmp_path, monkeypatch):
    # a pruner that stops every trial after its first epoch
    monkeypatch.setattr(studies.optuna.pruners, "MedianPruner", lambda **_: optuna.pruners.ThresholdPruner(lower=1.01))
    result = tune("synthetic", "midas", 2, tmp_path / "study", TINY, quiet=True)
    assert result["counts"] == {"complete": 0, "pruned": 2, "fail": 0, "running": 0} and result["best"] is None
    rows = trials_of(tmp_path / "study")
    assert [(r["state"], r["epochs"], r["value"]) for r in rows] == [("pruned", "1", "")] * 2
    assert not (tmp_path / "study" / "best.yaml").exists()
    assert "(" in (tmp_path / "study" / "trials.md").read_text()  # the value it reached, in parentheses


KILLER = textwrap.dedent("""
    import os, signal, sys
    from mmbalance.experiments import study
    evaluate = study.TrialTrainer.evaluate
    def killing(self, split):
        if self.trial.number == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self, split)
    study.TrialTrainer.evaluate = killing
    from mmbalance.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_killed_study_resumes_as_if_never_stopped(tmp_path):
    """A real SIGKILL in the middle of trial 2; the same command then finishes the study."""
    args = ["--quiet", "tune", "--method", "midas", "--trials", "4", *SETS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(tmp_path / "killed")],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert [r["state"] for r in trials_of(tmp_path / "killed")] == ["complete", "complete"]
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = trials_of(tmp_path / "killed"), trials_of(tmp_path / "whole")
    assert [r["state"] for r in resumed] == ["complete", "complete", "fail", "complete", "complete"]
    finished = [r for r in resumed if r["state"] != "fail"]
    strip = [{k: v for k, v in r.items() if k != "number"} for r in finished]
    assert strip == [{k: v for k, v in r.items() if k != "number"} for r in whole]


def test_another_command_on_the_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "study"
    assert run_cli("tune", "--method", "midas", "--trials", "1", "--out", str(out), *SETS) == 0
    capsys.readouterr()
    code = run_cli("tune", "--method", "midas[lam=0.5]", "--trials", "1", "--out", str(out), *SETS)
    one_line_error(capsys, code, "holds a study of other settings")
    assert run_cli("tune", "--method", "midas[lam=0.5]", "--trials", "1", "--out", str(out), "--overwrite", *SETS) == 0
    assert "midas.lam" not in trials_of(out)[0] and len(trials_of(out)) == 1


def test_one_machine_joins_another_through_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["tune", "--method", "midas", "--storage", url, *SETS]
    assert run_cli(*common, "--trials", "2", "--out", str(tmp_path / "a")) == 0
    assert run_cli(*common, "--trials", "3", "--out", str(tmp_path / "b")) == 0
    assert trials_of(tmp_path / "b")[:2] == trials_of(tmp_path / "a") and len(trials_of(tmp_path / "b")) == 3
    assert not (tmp_path / "a" / "study.db").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--method", "joint"], "nothing to tune for 'joint'"),
    (["--method", "midas", "--trials", "0"], "--trials must be a whole number >= 1"),
    (["--method", "midas", "--storage", "nosuch://x"], "cannot open the study database nosuch://x"),
    (["--method", "midas", "--set", "midas.lamda=1"], "unknown config key 'midas.lamda'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, pattern):
    out = tmp_path / "study"
    extra = [] if "--trials" in args else ["--trials", "2"]
    one_line_error(capsys, run_cli("tune", *args, *extra, "--out", str(out), *SETS), pattern)
    assert not out.exists()


def test_missing_optuna_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    code = run_cli("tune", "--method", "midas", "--trials", "2", "--out", str(tmp_path / "s"), *SETS)
    one_line_error(capsys, code, "pip install 'mmbalance[tune]'")
    assert not (tmp_path / "s").exists()


def test_the_space_spans_every_part_less_what_the_command_fixes():
    config = build_config(None, TINY, method="midas+arl")
    space = search_space(config, fixed_keys("midas[lam=0.5]+arl", ["arl.temperature=4"]), tune_train=True)
    assert "midas.lam" not in space and "arl.temperature" not in space
    assert {"midas.eta", "arl.unimodal_weight", "train.lr", "train.weight_decay"} <= set(space)
    assert list(space)[0].startswith("midas.")  # the objective first


def test_bench_tunes_each_method_then_runs_its_best_config(tmp_path, capsys):
    out = tmp_path / "bench"
    assert run_cli("bench", "--dataset", "synthetic", "--methods", "joint,midas", "--seeds", "2", "--tune", "2",
                   "--out", str(out), *SETS) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r["seed"]) for r in results] == [("joint", 0), ("joint", 1), ("midas (tuned)", 0), ("midas (tuned)", 1)]
    assert "midas (tuned)" in (out / "summary.md").read_text()
    best = yaml.safe_load((out / "tune" / "midas-seed0" / "best.yaml").read_text())
    for seed in (0, 1):
        run = yaml.safe_load((out / f"midas-tuned-seed{seed}" / "config.yaml").read_text())
        assert run["midas"] == best["midas"] and run["seed"] == seed
    assert len(trials_of(out / "tune" / "midas-seed0")) == 2


def comparable(run_dir):
    """A run's metrics without its timings."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timings = ("train_seconds", "seconds_per_step")
    epochs = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
              for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in metrics.items() if k not in timings}, epochs


@pytest.mark.slow
def test_two_jobs_write_what_one_at_a_time_writes(tmp_path):
    # both in fresh processes with one thread: what earlier tests registered or set in this process stays out
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,midas", "--seeds", "2", *SETS, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--out", str(tmp_path / "serial")], ["--out", str(tmp_path / "jobs"), "--jobs", "2"]):
        done = subprocess.run([sys.executable, "-m", "mmbalance", *args, *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "serial").iterdir() if p.is_dir())
    assert names == ["joint-seed0", "joint-seed1", "midas-seed0", "midas-seed1"]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir()) == names
    for name in names:
        assert comparable(tmp_path / "jobs" / name) == comparable(tmp_path / "serial" / name), name
    order = [json.loads(line)["label"] for line in (tmp_path / "jobs" / "results.jsonl").read_text().splitlines()]
    assert order == ["joint", "joint", "midas", "midas"]


def test_the_pruner_never_stops_a_trial_in_the_first_third_of_its_epochs(tmp_path):
    from mmbalance.experiments.study import open_study, pruner_warmup

    assert [pruner_warmup(e) for e in (1, 2, 3, 30, 100)] == [1, 1, 1, 10, 33]
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", seed=0, shared=False, epochs=30)
    assert study.pruner._n_warmup_steps == 10
