"""The step-time benchmark script: result structure and bad-name handling (never its timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
METHODS = ["joint", "unimodal"]


@pytest.fixture(scope="module")
def step_time():
    """The script as a module: it lives outside the package, so it is loaded by path."""
    spec = importlib.util.spec_from_file_location("step_time_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def mlp_run(step_time, tmp_path_factory):
    out = tmp_path_factory.mktemp("step_time")
    argv = ["--encoders", "mlp", "--methods", ",".join(METHODS), "--steps", "2", "--warmup", "1",
            "--json", str(out / "results.json"), "--markdown", str(out / "results.md")]
    status = step_time.main(argv)
    return status, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_one_row_per_method_with_positive_times(mlp_run):
    status, results, _ = mlp_run
    assert status == 0
    rows = results["results"]
    assert [(r["encoder"], r["method"]) for r in rows] == [("mlp", m) for m in METHODS]
    for row in rows:
        assert row["steps"] == 2 and len(row["seconds"]) == 2
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["ratio_to_joint"] > 0


def test_joint_is_its_own_reference(mlp_run):
    _, results, _ = mlp_run
    joint = next(r for r in results["results"] if r["method"] == "joint")
    assert joint["ratio_to_joint"] == 1.0


def test_environment_and_markdown_table(mlp_run):
    _, results, markdown = mlp_run
    env = results["environment"]
    assert env["torch_threads"] >= 1 and env["torch"]
    table_rows = [line for line in markdown.splitlines() if line.startswith("| mlp |")]
    assert [line.split(" | ")[1] for line in table_rows] == METHODS


def test_joint_is_timed_even_when_not_asked_for(step_time):
    assert step_time.with_reference_first(["unimodal", "joint", "unimodal"]) == ["joint", "unimodal"]


def test_unknown_encoder_exits_2_with_one_line():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--encoders", "mlp,resnet81"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2
    message = completed.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "resnet81" in message and "did you mean 'resnet18'" in message
    assert completed.stdout == ""


def test_unknown_method_returns_2(step_time, capsys):
    assert step_time.main(["--encoders", "mlp", "--methods", "jiont"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'joint'" in err
