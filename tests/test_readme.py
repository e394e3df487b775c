"""The README's code runs exactly as printed."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


def test_standalone_midas_snippet_runs():
    namespace: dict = {}
    exec(compile(snippet("standalone-midas"), "README.md", "exec"), namespace)
    alpha = namespace["midas"].alpha
    assert alpha.shape == (2,) and bool((alpha >= 1).all())
    assert torch.isfinite(namespace["misaligned_loss"]) and namespace["misaligned_loss"] > 0
    assert int(namespace["stats"]["count"]) > 0


def test_python_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet("python-api"), "README.md", "exec"), namespace)
    assert namespace["run"].method == "midas+arl" and len(namespace["results"]) == 4
    assert (tmp_path / "runs" / "py-bench" / "summary.md").is_file()
