"""The leaderboard: a tiny board trained once, rendered from its runs, never inventing a row."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.experiments.bench import plan_runs
from mmbalance.experiments.comparison import cell, compare
from mmbalance.experiments.leaderboard import (
    NOT_MEASURED, build_board, counts, expand_methods, load_board, registered_methods, write_board,
)
from mmbalance.experiments.robustness import area_under_curve
from mmbalance.experiments.summary import fmt
from mmbalance.registry import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "leaderboard.py"
TINY = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
        "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16"]
METHODS_TRAINED = ["joint", "midas", "arl"]
LEVELS = [0, 1, 2]


def board_file(root: Path, methods=METHODS_TRAINED, **dataset) -> Path:
    """A board of one tiny synthetic dataset, 2 seeds, written under ``root``."""
    entry = {"id": "tiny", "dataset": "synthetic", "set": TINY, "weak": "weak", "dominant": "strong", "linear": True}
    entry.update(dataset)
    board = {"output": str(root / "docs" / "leaderboard.md"), "figure": str(root / "docs" / "img" / "board.png"),
             "runs": str(root / "runs"), "seeds": 2, "methods": list(methods),
             "robustness": {"levels": LEVELS}, "datasets": [entry]}
    path = root / "board.yaml"
    path.write_text(yaml.safe_dump(board))
    return path


def render(path: Path, **options) -> tuple[str, object]:
    options.setdefault("train", False)
    options.setdefault("compute", True)
    board = load_board(path)
    result = build_board(board, log=lambda text: None, **options)
    write_board(result, "python benchmarks/leaderboard.py", "python benchmarks/leaderboard.py --test")
    return Path(board.output).read_text(), result


def table_row(page: str, label: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith("|") and f"| `{label}` |" in line)
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny board trained once: 3 methods × 2 seeds, the linear reference and every sweep."""
    root = tmp_path_factory.mktemp("board")
    path = board_file(root)
    page, result = render(path, train=True)
    return root, path, page, result


def run_metrics(runs: Path) -> list[dict]:
    out = []
    for metrics in sorted(runs.glob("*-seed*/metrics.json")):
        data = json.loads(metrics.read_text())
        data["label"] = metrics.parent.name.rsplit("-seed", 1)[0]
        out.append(data)
    return out


def test_the_board_renders_every_row_with_the_command_on_top(trained):
    root, _, page, result = trained
    assert page.startswith("# Leaderboard")
    assert page.index("python benchmarks/leaderboard.py") < page.index("## tiny")
    assert "**4 of 4 planned rows measured**" in page  # 3 methods and the linear reference
    assert counts(result.sections) == (4, 4, 0)
    assert (root / "docs" / "img" / "board.png").is_file() and (root / "docs" / "img" / "board.pdf").is_file()
    assert "](img/board.png)" in page
    assert NOT_MEASURED not in page.split("## tiny")[1].split("## How this page is made")[0]
    ranked = [table_row(page, label)[3] for label in ("joint", "midas", "joint+arl", "linear")]
    assert all(cell != NOT_MEASURED for cell in ranked)
    table = [line for line in page.split("## tiny")[1].splitlines() if line.startswith("| ") and "`" in line]
    means = [float(line.split("|")[4].split("±")[0]) for line in table]
    assert means == sorted(means, reverse=True)  # sorted by accuracy


def test_delta_is_comparison_py_on_the_run_folders(trained):
    root, _, page, _ = trained
    results = run_metrics(root / "runs" / "tiny")
    assert len(results) == 6
    comparisons = compare(results, "joint", "t")
    for label in ("midas", "joint+arl"):
        row = table_row(page, label)
        assert row[4] == cell(comparisons[label])
        assert row[3] == fmt([r["test"]["accuracy"] for r in results if r["label"] == label])
        assert row[5] == fmt([r["test"]["modality_accuracy"]["weak"] for r in results if r["label"] == label])
    assert table_row(page, "joint")[4] == "(baseline)"


def test_robustness_auc_is_the_sweep_of_each_best_checkpoint(trained):
    root, _, page, _ = trained
    caches = sorted((root / "runs" / "tiny" / "robustness").glob("*.json"))
    assert len(caches) == 6
    by_label: dict[str, list[float]] = {}
    for cache in caches:
        record = json.loads(cache.read_text())
        metrics = json.loads((root / "runs" / "tiny" / cache.stem / "metrics.json").read_text())
        assert record["clean_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
        assert record["auc"] == pytest.approx(area_under_curve(LEVELS, record["accuracy"]))
        assert record["key"]["target"] == "strong"
        by_label.setdefault(cache.stem.rsplit("-seed", 1)[0], []).append(record["auc"])
    for label, aucs in by_label.items():
        assert table_row(page, label)[6] == fmt(aucs)


def test_a_rerun_reuses_every_run_and_cache(trained):
    root, path, page, _ = trained
    files = sorted((root / "runs" / "tiny").rglob("*.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again, _ = render(path, train=True)
    assert again == page
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


def test_rows_without_runs_are_not_yet_measured_and_nothing_trains(trained, tmp_path):
    root, _, _, _ = trained
    path = board_file(tmp_path, methods=[*METHODS_TRAINED, "ogm_ge"], sources=[str(root / "runs" / "tiny")])
    page, result = render(path, train=False)
    row = table_row(page, "joint+ogm_ge")
    assert row[2] == "0/2" and row[3:7] == [NOT_MEASURED] * 4
    assert "**4 of 5 planned rows measured**" in page
    assert not list((tmp_path / "runs").glob("tiny/*-seed*"))  # nothing trained
    assert table_row(page, "midas")[4] != NOT_MEASURED  # read from the source folder
    assert f"`{root / 'runs' / 'tiny'}` (6 runs)" in page


def test_runs_of_other_settings_are_never_read(trained, tmp_path):
    root, _, _, _ = trained
    path = board_file(tmp_path, set=[*TINY, "train.lr=0.01"], sources=[str(root / "runs" / "tiny")])
    page, _ = render(path, train=False, compute=False)
    assert "Nothing measured yet: every planned row is not yet measured" in page
    assert "trained with other settings" in page and "train.lr" in page


def test_cached_only_computes_nothing(trained, tmp_path):
    root, _, _, _ = trained
    source = tmp_path / "copy"
    shutil.copytree(root / "runs" / "tiny", source, ignore=shutil.ignore_patterns("robustness", "linear"))
    path = board_file(tmp_path, sources=[str(source)])
    page, _ = render(path, train=False, compute=False)
    assert table_row(page, "midas")[6] == NOT_MEASURED  # a sweep not computed yet
    assert table_row(page, "linear")[3] == NOT_MEASURED
    assert table_row(page, "midas")[3] != NOT_MEASURED
    assert "**3 of 4 planned rows measured**" in page


def test_a_row_with_some_seeds_says_how_many(trained, tmp_path):
    root, _, _, _ = trained
    source = tmp_path / "copy"
    shutil.copytree(root / "runs" / "tiny", source, ignore=shutil.ignore_patterns("midas-seed1"))
    page, result = render(board_file(tmp_path, sources=[str(source)]))
    assert table_row(page, "midas")[2] == "1/2"
    assert counts(result.sections) == (4, 3, 1) and "1 more with some of their seeds" in page
    assert "seed(s) 1 have a result for only one of the two" in page  # comparison.py's unpaired note


def test_step_time_ratios_come_from_the_step_time_file(trained, tmp_path):
    root, _, _, _ = trained
    path = board_file(tmp_path, sources=[str(root / "runs" / "tiny")], step_time_encoder="mlp")
    data = yaml.safe_load(path.read_text())
    data["step_time"] = str(tmp_path / "missing.json")
    path.write_text(yaml.safe_dump(data))
    page, _ = render(path, compute=False)
    assert table_row(page, "joint+arl")[7] == "—" and "does not exist yet" in page
    rows = [{"encoder": "mlp", "method": "arl", "ratio_to_joint": 1.5}, {"encoder": "cnn", "method": "midas", "ratio_to_joint": 9.0}]
    (tmp_path / "steps.json").write_text(json.dumps({"environment": {"command": "x"}, "results": rows}))
    data["step_time"] = str(tmp_path / "steps.json")
    path.write_text(yaml.safe_dump(data))
    page, _ = render(path, compute=False)
    assert table_row(page, "joint+arl")[7] == "1.50"  # 'arl' in the file is joint+arl
    assert table_row(page, "midas")[7] == "—"  # timed for another encoder setting only


def test_tuned_rows_come_from_bench_tune_studies(tmp_path):
    pytest.importorskip("optuna")
    path = board_file(tmp_path, methods=["joint", "arl"], linear=False, tune=2)
    page, _ = render(path, train=False, compute=False)
    assert "every planned row is not yet measured (`joint`, `joint+arl`, `joint+arl (tuned)`)" in page
    assert "No study of 2 finished trials yet" in page
    page, _ = render(path, train=True)
    assert (tmp_path / "runs" / "tiny" / "tune" / "joint+arl-seed0" / "best.yaml").is_file()
    assert table_row(page, "joint+arl (tuned)")[2] == "2/2"
    again, _ = render(path, train=False)  # found again from the finished study, without tuning
    assert table_row(again, "joint+arl (tuned)")[3] == table_row(page, "joint+arl (tuned)")[3]


def test_registered_means_every_part_once_plugins_on_joint():
    methods = registered_methods()
    assert methods[0] == "joint" and len(methods) == len(METHODS.names())
    assert "joint+arl" in methods and "midas" in methods and "arl" not in methods


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"datasets": [{"id": "x", "dataset": "synthetic", "weak": "weak", "dominant": "strong", "sets": []}]},
     r"unknown key 'datasets\.0\.sets' \(allowed keys here: id, dataset"),
    ({"seeds": 0}, "seeds"),
    ({"methods": ["joint", "linear"]}, "linear: true"),
    ({"robustness": {"levels": [1, 0]}}, "increasing"),
])
def test_a_bad_board_file_is_one_line(tmp_path, change, message):
    path = board_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_board(path)


def test_bad_names_fail_before_any_work(tmp_path):
    with pytest.raises(MMBalanceError, match="not a dataset of the board"):
        build_board(load_board(board_file(tmp_path)), train=True, compute=True, only=["nope"], log=lambda t: None)
    with pytest.raises(MMBalanceError, match="unknown method"):
        build_board(load_board(board_file(tmp_path, methods=["joint", "midsa"])), train=True, compute=True, log=lambda t: None)
    with pytest.raises(ConfigError, match="add joint to its methods"):
        build_board(load_board(board_file(tmp_path, methods=["midas"])), train=True, compute=True, log=lambda t: None)
    with pytest.raises(ConfigError, match="weak modality 'audio'"):
        build_board(load_board(board_file(tmp_path, weak="audio")), train=True, compute=True, log=lambda t: None)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


def test_the_shipped_board_is_valid():
    board = load_board(SCRIPT.with_suffix(".yaml"))
    assert [d.id for d in board.datasets] == ["synthetic", "avdigits", "mfeat-fac-mor", "mfeat-all", "mnist_hog"]
    for entry in board.datasets:
        plan = plan_runs(entry.dataset, expand_methods(entry.methods or board.methods), board.seeds, entry.set)
        assert plan[0][0] == "joint" and len(plan) == board.seeds * len(METHODS.names())


def test_the_script_exits_2_with_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("leaderboard_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    finally:
        sys.modules.pop(spec.name, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("leaderboard.py: error: config file not found") and "\n" not in err
