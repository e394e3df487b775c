"""Teachers trained inside a run: progress saved per epoch, exact resume when killed mid-teacher."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import build_config
from mmbalance.methods.base import Objective, cross_entropy
from mmbalance.training import Trainer, resume_run, train_run


class Distils(Objective):
    """Joint training plus an MSE pull of each encoder towards a unimodal teacher trained first."""

    def setup(self, model, ctx):
        self.teachers = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, self.num_classes))  # synthetic.dims=[8,8]
            for m in self.modalities
        })
        for p in self.teachers.parameters():
            p.requires_grad_(False)

    def on_epoch_start(self, model, ctx):
        if ctx.epoch == 0:
            for m in self.modalities:
                ctx.fit_teacher(m, self.teachers[m],
                                loss=lambda t, b, m=m: F.cross_entropy(t(b.inputs[m]), b.labels),
                                predict=lambda t, b, m=m: t(b.inputs[m]), epochs=3)

    def training_step(self, model, batch, ctx):
        features = model.encode(batch.inputs)
        logits = model.fuse(features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        with torch.no_grad():
            targets = {m: self.teachers[m](batch.inputs[m]).softmax(-1) for m in self.modalities}
        record.add_loss("distil", sum(F.mse_loss(model.heads(features)[m].softmax(-1), targets[m]) for m in self.modalities))
        return record


OVERRIDES = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
             "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16"]


def test_teachers_train_to_their_best_heldout_epoch_and_stay_frozen(tmp_path, register_part):
    register_part("_distils")(Distils)
    metrics = train_run(build_config(overrides=OVERRIDES, method="_distils"), tmp_path / "r", quiet=True)
    saved = torch.load(tmp_path / "r" / "teachers" / "strong.pt", weights_only=True)
    assert saved["state"]["epoch"] == 3 and 1 <= saved["state"]["best_epoch"] <= 3
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    best_teacher = saved["best"]
    for key, value in best_teacher.items():  # the frozen teacher in the run is the best epoch's, unchanged by training
        assert torch.equal(last["method"][f"parts._distils.teachers.strong.{key}"], value)
    assert metrics["train_seconds"] > 0


def test_a_run_killed_while_a_teacher_trains_resumes_exactly(tmp_path, register_part, monkeypatch):
    register_part("_distils")(Distils)
    config = build_config(overrides=OVERRIDES, method="_distils")
    full = train_run(config, tmp_path / "full", quiet=True)

    from mmbalance.training import teachers

    original = teachers.TeacherFit.accuracy
    calls = {"n": 0}

    def killed_in_the_second_teacher(self, module, predict):
        calls["n"] += 1
        if calls["n"] == 5:  # teacher 'strong' done (3 epochs), 'weak' killed after its second epoch's training
            raise KeyboardInterrupt
        return original(self, module, predict)

    monkeypatch.setattr(teachers.TeacherFit, "accuracy", killed_in_the_second_teacher)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "killed", quiet=True)
    monkeypatch.undo()
    assert (tmp_path / "killed" / "teachers" / "weak.pt").is_file() and not (tmp_path / "killed" / "last.pt").exists()
    resumed = resume_run(tmp_path / "killed", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    rows = [json.loads(l)["train_loss"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [json.loads(l)["train_loss"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
