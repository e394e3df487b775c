"""What the method API offers parts: the record, several optimizers, manual optimisation,
held-out data, evaluation during training, open metrics."""

from __future__ import annotations

import json

import pytest
import torch

from mmbalance.config import build_config
from mmbalance.evaluation.metrics import Metric
from mmbalance.methods.base import Objective, Plugin, cross_entropy
from mmbalance.training import Trainer, resume_run, train_run


def joint_step(part, model, batch):
    features = model.encode(batch.inputs)
    logits = model.fuse(features)
    record = part.record(model, batch, features, logits=logits, unimodal=model.heads(features))
    record.add_loss("fused", cross_entropy(logits, batch))
    record.add_loss("unimodal", sum(cross_entropy(z, batch) for z in record.unimodal.values()))
    return record


def test_two_optimizers_are_used_and_checkpointed_and_resume_exactly(tmp_path, tiny_overrides, register_part, monkeypatch):
    @register_part("_two_optimizers")
    class TwoOptimizers(Objective):
        """Encoders with SGD at a per-encoder learning rate, the heads with the run's optimizer."""

        def configure_optimizers(self, model, ctx):
            encoders = torch.optim.SGD(
                [{"params": ps, "lr": 0.05 if m == "strong" else 0.02} for m, ps in ctx.params.encoder.items()],
                momentum=0.9,
            )
            rest = ctx.make_optimizer([*ctx.params.fusion, *(p for ps in ctx.params.heads.values() for p in ps)])
            return {"optimizers": {"encoders": encoders, "heads": rest}}

        def training_step(self, model, batch, ctx):
            return joint_step(self, model, batch)

    overrides = tiny_overrides + ["train.epochs=3", "train.scheduler=step", "train.step_size=1"]
    config = build_config(overrides=overrides, method="_two_optimizers")
    trainer = Trainer(config, None, quiet=True)
    assert set(trainer.optimizers) == {"encoders", "heads"} and set(trainer.schedulers) == {"encoders", "heads"}
    assert [g["lr"] for g in trainer.optimizers["encoders"].param_groups] == [0.05, 0.02]
    full = train_run(config, tmp_path / "full", quiet=True)
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert set(last["optimizers"]) == {"encoders", "heads"} and last["optimizers"]["encoders"]["state"]
    assert last["optimizers"]["encoders"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.1**3)  # stepped 3 times

    original = Trainer._train_epoch

    def dies(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    assert resume_run(tmp_path / "resumed", quiet=True)["test"] == full["test"]


def test_manual_optimisation_still_averages_calls_plugins_and_clips(tiny_overrides, register_part):
    seen = []

    @register_part("_manual")
    class Manual(Objective):
        """Steps the encoders and the heads separately, as alternating methods do."""

        manual_optimization = True

        def configure_optimizers(self, model, ctx):
            encoders = [p for ps in ctx.params.encoder.values() for p in ps]
            rest = [*ctx.params.fusion, *(p for ps in ctx.params.heads.values() for p in ps)]
            return {"optimizers": {"encoders": ctx.make_optimizer(encoders), "rest": ctx.make_optimizer(rest)}}

        def training_step(self, model, batch, ctx):
            record = joint_step(self, model, batch)
            ctx.manual_step(record.losses["fused"], record, ctx.optimizers["encoders"])
            fresh = joint_step(self, model, batch)
            ctx.manual_step(fresh.losses["unimodal"], fresh, ctx.optimizers["rest"])
            return record

    @register_part("_watches")
    class Watches(Plugin):
        """Sees every manual step's gradients."""

        def after_backward(self, record, ctx):
            norms = [p.grad.norm() for p in ctx.params.trainable() if p.grad is not None]
            seen.append(float(torch.stack(norms).square().sum().sqrt()))

    config = build_config(overrides=tiny_overrides + ["train.epochs=1", "train.grad_clip=1e-3", "train.optimizer=sgd",
                                                      "train.lr=1.0", "train.momentum=0"], method="_manual+_watches")
    trainer = Trainer(config, None, quiet=True)
    batch = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.parameters]
    trainer.train_step(batch)
    assert len(seen) == 2  # the plugin's after_backward ran for each manual step
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(trainer.parameters, before)])
    # two SGD steps at lr 1 of gradients clipped to norm 1e-3 each: the update is at most 2e-3 long
    assert 0 < moved.norm() <= 2e-3 + 1e-6
    assert all(p.grad is None for p in trainer.parameters)  # zeroed with set_to_none after each step


def test_heldout_is_val_or_a_carve_identical_for_every_method(tiny_overrides):
    val = Trainer(build_config(overrides=tiny_overrides), None, quiet=True)
    assert val.heldout_data is val.bundle.val and len(val.train_data) == len(val.bundle.train)
    carves = [
        Trainer(build_config(overrides=tiny_overrides + ["data.heldout=carve", "data.heldout_fraction=0.25"], method=m), None, quiet=True)
        for m in ("joint", "midas", "joint+arl")
    ]
    indices = [sorted(int(t.heldout_data.base.index[r]) for r in t.heldout_data.rows) for t in carves]
    assert indices[0] == indices[1] == indices[2]
    first = carves[0]
    train_rows = set(first.train_data.rows.tolist())
    assert not train_rows & set(first.heldout_data.rows.tolist())  # removed from training
    assert len(train_rows) + len(first.heldout_data) == len(first.bundle.train)
    assert len(first.heldout_data) == pytest.approx(0.25 * len(first.bundle.train), abs=4)  # stratified by class
    assert first.ctx.heldout_loader is first.heldout_loader


def test_a_part_can_evaluate_during_training_and_add_its_own_metric(tmp_path, tiny_overrides, register_part):
    modes = []

    class SeenSamples(Metric):
        """How many held-out samples a part's metric saw."""

        def reset(self, modalities, num_classes, device):
            super().reset(modalities, num_classes, device)
            self.zeros("count", 1)

        def update(self, view):
            self.sums["count"] += len(view.labels)

        def compute(self):
            return {"_probe/samples": int(self.sums["count"][0])}

    @register_part("_probe")
    class Probe(Plugin):
        """Evaluates on the held-out data at every epoch start."""

        def on_epoch_start(self, model, ctx):
            result = ctx.evaluate(ctx.heldout_loader)
            modes.append((model.training, self.training, result["accuracy"]))

        def metrics(self):
            return [SeenSamples()]

    train_run(build_config(overrides=tiny_overrides, method="_probe"), tmp_path / "r", quiet=True)
    assert len(modes) == 2 and all(model and part for model, part, _ in modes)  # train mode restored
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["val"]["_probe/samples"] == metrics["val"]["num_samples"]
    assert metrics["test"]["_probe/samples"] == metrics["test"]["num_samples"]


def test_sample_weights_set_before_the_step_reach_the_loss(tiny_overrides, register_part):
    @register_part("_first_only")
    class FirstOnly(Plugin):
        """Weights every sample but the first by zero."""

        def before_step(self, batch, ctx):
            batch.weight = torch.zeros(len(batch), device=batch.labels.device)
            batch.weight[0] = len(batch)

    trainer = Trainer(build_config(overrides=tiny_overrides, method="joint+_first_only"), None, quiet=True)
    batch = next(iter(trainer.train_loader))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    logits = record.logits
    expected = torch.nn.functional.cross_entropy(logits[:1], batch.labels[:1])  # mean of (B·CE_0, 0, ..., 0)
    assert record.losses["fused"].item() == pytest.approx(expected.item(), rel=1e-6)
