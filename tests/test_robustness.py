"""``mmbalance robust`` and ``bench --robust`` end to end on a tiny trained run."""

import json
import shutil

import pytest

from mmbalance.experiments.robustness import area_under_curve, parse_levels, robustness_report
from mmbalance.errors import MMBalanceError
from test_cli import TINY, one_line_error, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "joint-seed0"
    assert run_cli("train", "--method", "joint", "--seed", "0", "--out", str(out), *TINY) == 0
    return out


def test_robust_writes_table_json_and_plots(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli("robust", "--run", str(trained_run), "--corruption", "gaussian", "--levels", "0,1,4", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "robustness.json").read_text())
    clean = json.loads((trained_run / "metrics.json").read_text())["test"]["accuracy"]
    assert report["levels"] == [0, 1, 4] and report["fraction"] == 0.5 and report["split"] == "test"
    assert report["targets"] == {"strong": ["strong"], "weak": ["weak"]}
    [run] = report["runs"]
    assert run["label"] == "joint" and run["clean_accuracy"] == pytest.approx(clean)
    for target in ("strong", "weak"):
        assert run["accuracy"][target][0] == pytest.approx(clean)
        assert run["auc"][target] == pytest.approx(area_under_curve([0, 1, 4], run["accuracy"][target]))
        assert (out / f"robustness-{target}.png").stat().st_size > 1000
    table = (out / "robustness.md").read_text()
    assert "| method | runs | ε=0 | ε=1 | ε=4 | AUC |" in table and "| joint | 1 |" in table
    assert table in printed


def test_runs_sharing_a_method_are_averaged_and_all_corrupts_every_modality(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["robust", "--run", str(trained_run), "--run", str(trained_run), "--corruption", "missing",
            "--modality", "all", "--levels", "0,1", "--fraction", "1", "--out", str(out)]
    assert run_cli(*args) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["targets"] == {"all": ["strong", "weak"]} and len(report["runs"]) == 2
    assert report["runs"][0]["accuracy"] == report["runs"][1]["accuracy"]  # seeded: the same run scores the same
    assert "| joint | 2 |" in (out / "robustness.md").read_text()
    assert (out / "robustness-all.png").is_file()


def test_corrupted_path_with_nothing_touched_scores_the_clean_accuracy(trained_run, tmp_path):
    """The wrapped test loader goes through the same evaluation as the clean one."""
    report = robustness_report([trained_run], "gaussian", [0, 2], tmp_path / "report", ["weak"], fraction=0.0, log=lambda _: None)
    [run] = report["runs"]
    assert run["accuracy"]["weak"] == [run["clean_accuracy"]] * 2


@pytest.mark.parametrize("args, pattern", [
    (["--corruption", "gausian", "--levels", "0,1"], "unknown corruption 'gausian'; did you mean 'gaussian'?"),
    (["--corruption", "gaussian", "--modality", "audio", "--levels", "0,1"], "unknown modality 'audio'"),
    (["--corruption", "gaussian", "--levels", "0,x"], "bad levels '0,x'"),
    (["--corruption", "gaussian", "--levels", "0,-1"], "finite number >= 0"),
    (["--corruption", "gaussian", "--levels", "1,0"], "distinct and increasing"),
    (["--corruption", "gaussian", "--levels", "0,1", "--fraction", "2"], "fraction must be between 0 and 1"),
    (["--corruption", "blur", "--levels", "0,1"], "corruption 'blur' cannot apply to modality 'strong' (per-sample shape (8,)"),
    (["--corruption", "token_mask", "--option", "unkid=3", "--levels", "1"], "did you mean 'token_mask.unk_id'?"),
    (["--corruption", "gaussian", "--option", "absolute", "--levels", "1"], "bad --option 'absolute'"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys, args, pattern):
    code = run_cli("robust", "--run", str(trained_run), *args, "--out", str(tmp_path / "report"))
    one_line_error(capsys, code, pattern)
    assert not (tmp_path / "report").exists()


def test_not_a_run_folder(tmp_path, capsys):
    code = run_cli("robust", "--run", str(tmp_path / "nothing"), "--corruption", "gaussian", "--levels", "0,1",
                   "--out", str(tmp_path / "report"))
    one_line_error(capsys, code, "is not a finished run folder")
    assert not (tmp_path / "report").exists()


def test_bench_robust_reports_over_every_run(trained_run, tmp_path, capsys):
    out = tmp_path / "bench"
    shutil.copytree(trained_run, out / "joint-seed0")  # the bench's own run, finished: bench skips its training
    args = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1", "--out", str(out), *TINY]
    assert run_cli(*args, "--robust", "feature_dropout:0,0.5") == 0
    report = json.loads((out / "robustness" / "robustness.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["joint"] and report["corruption"] == "feature_dropout"
    assert (out / "robustness" / "robustness.md").is_file()


@pytest.mark.parametrize("sweep, pattern", [("blur:0,1", "cannot apply to modality"), ("gaussian", "expected CORRUPTION:LEVELS"),
                                            ("gausian:0,1", "did you mean 'gaussian'?")])
def test_bench_robust_fails_before_training(tmp_path, capsys, sweep, pattern):
    args = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1", "--out", str(tmp_path / "b"), *TINY]
    one_line_error(capsys, run_cli(*args, "--robust", sweep), pattern)
    assert not (tmp_path / "b").exists()


def test_area_under_curve_is_normalised_by_the_level_range():
    assert area_under_curve([0, 1, 3], [1.0, 0.5, 0.5]) == pytest.approx((0.75 + 1.0) / 3)
    assert area_under_curve([2], [0.4]) == 0.4
    assert parse_levels("0, 0.5,2") == [0.0, 0.5, 2.0]
    with pytest.raises(MMBalanceError):
        parse_levels("")


def test_list_corruptions(capsys):
    assert run_cli("list", "corruptions") == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("gaussian", "salt_pepper", "blur", "token_mask", "feature_dropout", "missing"))
