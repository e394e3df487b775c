"""The loader-throughput benchmark script: result structure only (never its timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"
TINY = ["--clips", "4", "--seconds", "0.1", "--image-size", "16", "--frames-per-clip", "2", "--batch-size", "2",
        "--workers", "0", "--passes", "1", "--step-seconds", "0.5"]


@pytest.fixture(scope="module")
def loader_throughput():
    """The script as a module: it lives outside the package, so it is loaded by path."""
    spec = importlib.util.spec_from_file_location("loader_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_run(loader_throughput, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader_throughput")
    status = loader_throughput.main([*TINY, "--json", str(out / "r.json"), "--markdown", str(out / "r.md")])
    return status, json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_one_row_per_audio_input_and_worker_count(tiny_run):
    status, results, _ = tiny_run
    assert status == 0
    rows = results["results"]
    assert [(r["audio"], r["workers"]) for r in rows] == [("raw WAV", 0), ("cached spectrogram", 0)]
    for row in rows:
        assert row["samples_per_s"] > 0
        assert row["batches_per_s"] == pytest.approx(row["samples_per_s"] / 2)
        assert row["ratio_to_step_rate"] == pytest.approx(row["batches_per_s"] * 0.5)


def test_environment_records_the_shapes_and_the_given_step_time(tiny_run):
    _, results, _ = tiny_run
    env = results["environment"]
    assert env["step_seconds"] == 0.5 and env["step_measured"] is False
    assert env["input_shapes"] == {"audio": [1, 257, 1 + 2205 // 353], "visual": [1, 3, 16, 16]}
    assert env["command"].startswith("python benchmarks/loader_throughput.py --clips 4")


def test_markdown_table(tiny_run):
    _, _, markdown = tiny_run
    lines = markdown.splitlines()
    assert lines[2].startswith("| audio input | workers | samples/s | batches/s |")
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| raw WAV", "| cached spectrogram"]


def test_too_few_clips_is_a_usage_error(loader_throughput):
    with pytest.raises(SystemExit) as exit_info:
        loader_throughput.parse_args(["--clips", "2"])
    assert exit_info.value.code == 2
