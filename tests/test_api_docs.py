"""docs/api.md runs as printed, and the extension routes it describes reach the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmbalance.cli import main
from mmbalance.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"


def snippets() -> list[tuple[str, str]]:
    return re.findall(r"<!-- api:(\w+) -->\s*```python\n(.*?)```", DOC.read_text(), re.S)


def test_every_snippet_runs_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = [name for name, _ in snippets()]
    assert names == ["train", "load", "tensors", "bench", "plugin"]
    namespace: dict = {}
    try:
        for name, code in snippets():
            exec(compile(code, f"docs/api.md:{name}", "exec"), namespace)
    finally:
        METHODS.unregister("boost")
    predictions = namespace["predictions"]
    assert predictions.probabilities.shape == (5, 20)
    assert abs(float(predictions.probabilities.sum()) - 5) < 1e-4
    assert predictions.modality_only.keys() == {"strong", "weak"} and predictions.modality_only["weak"].shape == (5,)
    assert namespace["val"]["midas/alpha"].keys() == {"strong", "weak"}
    assert len(namespace["results"]) == 4
    boost = json.loads((tmp_path / "runs/boost/metrics.jsonl").read_text().splitlines()[1])
    assert boost["method"]["boost/active"] == 1.0
    first = json.loads((tmp_path / "runs/boost/metrics.jsonl").read_text().splitlines()[0])
    assert first["method"]["boost/active"] == 0.0
    # the in-memory run is evaluated from the shell as well
    capsys.readouterr()
    assert main(["eval", "--run", "runs/mine", "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "runs/mine/metrics.json").read_text())
    assert printed["method"] == "joint" and printed["accuracy"] == saved["test"]["accuracy"]  # same data, same model


PLUGIN_MODULE = textwrap.dedent('''
    from mmbalance.methods import Plugin
    from mmbalance.registry import METHODS


    @METHODS.register("halve_fusion")
    class HalveFusion(Plugin):
        """Halves the fusion head's gradients."""

        def after_backward(self, record, ctx):
            for p in ctx.params.fusion:
                p.grad.mul_(0.5)
            record.logs["halve_fusion/steps"] = 1.0
''')


def run_cli(args, env_path: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(env_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmbalance", *args], capture_output=True, text=True, env=env, cwd=cwd)


TINY = ["--set", "train.epochs=1", "--set", "synthetic.num_samples=200", "--set", "synthetic.num_classes=4",
        "--set", "synthetic.strong_groups=2", "--quiet"]


def test_import_flag_brings_a_users_part_to_the_command_line(tmp_path):
    (tmp_path / "my_parts.py").write_text(PLUGIN_MODULE)
    done = run_cli(["--import", "my_parts", "train", "--method", "midas+halve_fusion", "--out", "r", *TINY], tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["method"]["halve_fusion/steps"] == 1.0
    missing = run_cli(["--import", "not_there", "list", "methods"], tmp_path, tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--import not_there" in missing.stderr


def test_an_installed_entry_point_registers_without_any_flag(tmp_path):
    (tmp_path / "my_parts.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "my_parts-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-parts\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmbalance.plugins]\nmy_parts = my_parts\n")
    listed = run_cli(["list", "methods"], tmp_path, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^halve_fusion\s+plugin\s+Halves the fusion head's gradients\.$", listed.stdout, re.M)


def test_import_mmbalance_is_enough_in_a_fresh_shell(tmp_path):
    code = ("import mmbalance; r = mmbalance.train(dataset='synthetic', method='joint', out='r', "
            "overrides={'train.epochs': 2, 'synthetic.num_samples': 200}); print(r.metrics['test']['accuracy'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert 0 <= float(done.stdout.strip()) <= 1


def test_the_architecture_pages_plugin_example_is_a_working_gradient_modulator(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("from ..", "from mmbalance.").replace("from .base", "from mmbalance.methods.base")
    code = code.replace("from .window", "from mmbalance.methods.window")
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {})
        from mmbalance.training import Trainer
        from mmbalance.config import build_config

        config = build_config(method="joint+my_ogm[alpha=0.5]", overrides=[
            "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "train.epochs=1"])
        plain = Trainer(build_config(method="joint", overrides=[
            "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "train.epochs=1"]), None, quiet=True)
        trainer = Trainer(config, None, quiet=True)
        trainer.model.load_state_dict(plain.model.state_dict())
        batch = next(iter(trainer.train_loader))
        grads = []
        for t in (plain, trainer):
            t._zero_grad()
            record = t.method.training_step(t.model, batch, t.ctx)
            record.loss.backward()
            t._finish_gradients(record)
            grads.append(record)
        k = grads[1].logs
        dominant = max(("strong", "weak"), key=lambda m: -float(k[f"my_ogm/k/{m}"]))
        assert float(k[f"my_ogm/k/{dominant}"]) < 1  # the dominant modality is damped ...
        p_plain = plain.ctx.params.encoder[dominant][0].grad
        p_mod = trainer.ctx.params.encoder[dominant][0].grad
        assert torch.allclose(p_mod, float(k[f"my_ogm/k/{dominant}"]) * p_plain, atol=1e-7)  # ... by exactly k
    finally:
        METHODS.unregister("my_ogm")
