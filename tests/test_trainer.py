import json

import pytest
import torch

from mmbalance.config import build_config
from mmbalance.errors import MMBalanceError, NonFiniteLossError
from mmbalance.methods.base import Objective, cross_entropy
from mmbalance.training import Trainer, resume_run, train_run


def test_run_folder_and_metrics(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    metrics = train_run(build_config(overrides=tiny_overrides + ["train.epochs=3"]), out, quiet=True)
    names = {p.name for p in out.iterdir()}
    assert {n for n in names if not n.startswith("events.out.tfevents.")} == {
        "config.yaml", "metrics.jsonl", "metrics.json", "best.pt", "last.pt", "scalars.csv"}
    assert len(names) == 7  # and one TensorBoard event file
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "val", "lr", "method"} <= set(lines[0])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "modality_accuracy", "unimodal_accuracy", "shapley", "imbalance_ratio"):
            assert key in saved[split]
    best = max(lines, key=lambda l: l["val"]["accuracy"])
    assert saved["best_epoch"] == best["epoch"]
    assert saved["val"]["accuracy"] == pytest.approx(best["val"]["accuracy"])  # best.pt is what is evaluated
    assert saved["seconds_per_step"] > 0 and saved["train_seconds"] > 0


def test_same_seed_same_result_different_seed_different(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides)
    a = train_run(config, tmp_path / "a", quiet=True)
    b = train_run(config, tmp_path / "b", quiet=True)
    c = train_run(build_config(overrides=tiny_overrides, seed=1), tmp_path / "c", quiet=True)
    assert a["test"] == b["test"]
    assert a["test"] != c["test"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["joint", "unimodal"])
def test_resume_matches_uninterrupted(tmp_path, tiny_overrides, method, monkeypatch):
    overrides = tiny_overrides + [
        "train.epochs=4", "model.dropout=0.3", "train.scheduler=step", "train.step_size=1",
        "train.optimizer=sgd", "train.lr=0.05",
    ]
    config = build_config(overrides=overrides, method=method)
    full = train_run(config, tmp_path / "full", quiet=True)

    original = Trainer._train_epoch

    def dies_in_third_epoch(self, epoch):
        if epoch == 2:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies_in_third_epoch)
    with pytest.raises(Killed):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = resume_run(tmp_path / "resumed", quiet=True)
    assert resumed["test"] == full["test"]
    assert resumed["val"] == full["val"]
    assert resumed["best_epoch"] == full["best_epoch"]

    def losses(run):
        return [json.loads(l)["train_loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("resumed") == losses("full")


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(MMBalanceError, match="nothing to resume"):
        resume_run(tmp_path)


class Explodes(Objective):
    """Joint training whose loss becomes NaN in the second epoch."""

    def training_step(self, model, batch, ctx):
        features = model.encode(batch.inputs)
        logits = model.fuse(features)
        record = self.record(model, batch, features, logits=logits)
        loss = cross_entropy(logits, batch)
        if ctx.epoch == 1 and ctx.step_in_epoch == 2:
            loss = loss * float("nan")
        record.add_loss("fused", loss)
        return record


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, register_part):
    register_part("_explodes")(Explodes)
    out = tmp_path / "run"
    config = build_config(overrides=tiny_overrides + ["train.epochs=3"], method="_explodes")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 3"):
        train_run(config, out, quiet=True)
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_unwritable_output(tmp_path, tiny_overrides):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MMBalanceError, match="cannot write to output folder"):
        train_run(build_config(overrides=tiny_overrides), blocker / "run", quiet=True)


def test_model_selection_never_reads_test(tmp_path, tiny_overrides, monkeypatch):
    calls = []
    original = Trainer.evaluate

    def spy(self, split):
        calls.append(split)
        return original(self, split)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    train_run(build_config(overrides=tiny_overrides + ["train.epochs=3"]), tmp_path / "r", quiet=True)
    assert calls == ["val", "val", "val", "val", "test"]  # 3 epochs select on val; test once at the end


def test_hooks_are_called_in_order(tmp_path, tiny_overrides, register_part):
    events = []

    @register_part("_records_hooks")
    class Records(Objective):
        """Joint training that records its hook calls."""

        def setup(self, model, ctx):
            events.append("setup")
            self.extra = torch.nn.Linear(2, 2)  # a module the method adds: must be optimised and saved

        def on_epoch_start(self, model, ctx):
            events.append(f"start{ctx.epoch}")

        def training_step(self, model, batch, ctx):
            events.append("step")
            features = model.encode(batch.inputs)
            logits = model.fuse(features)
            record = self.record(model, batch, features, logits=logits)
            record.add_loss("fused", cross_entropy(logits, batch) + self.extra.weight.sum() * 0)
            return record

        def on_forward(self, record, ctx):
            events.append("on_forward")

        def after_backward(self, record, ctx):
            events.append("after_backward")
            assert all(p.grad is not None for p in ctx.params.encoder["strong"])
            assert record.logits is not None  # what the step computed reaches the later hooks

        def after_step(self, record, ctx):
            events.append("after_step")

        def on_epoch_end(self, model, ctx):
            events.append(f"end{ctx.epoch}")
            return {"custom": 1.5}

    config = build_config(overrides=tiny_overrides + ["train.epochs=1"], method="_records_hooks")
    trainer = Trainer(config, tmp_path / "r", quiet=True)
    part = trainer.method.objective
    assert any(p is part.extra.weight for p in trainer.ctx.optimizer.param_groups[0]["params"])
    assert any(p is part.extra.weight for p in trainer.ctx.params.method["_records_hooks"])  # built after setup
    trainer.fit()
    assert events[:5] == ["setup", "start0", "step", "on_forward", "after_backward"]
    assert events[5] == "after_step" and events[-1] == "end0"
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["method"]["custom"] == 1.5
    assert "parts._records_hooks.extra.weight" in torch.load(tmp_path / "r" / "best.pt", weights_only=False)["method"]


def test_progress_is_silent_when_quiet_or_not_a_terminal(monkeypatch):
    from mmbalance.training.progress import Progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert Progress(quiet=False).show
    assert not Progress(quiet=True).show
    assert not Progress(quiet=False, enabled_rank=False).show  # only rank 0 draws
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert not Progress(quiet=False).show


def test_evaluation_counts_every_sample_whatever_the_batch_size(tmp_path):
    # 203 samples, batch sizes that do not divide the splits: no evaluation ever drops a partial batch
    overrides = ["synthetic.num_samples=203", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
                 "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=7", "model.feature_dim=8", "model.hidden_dim=16"]
    trainer = Trainer(build_config(overrides=overrides), None, quiet=True)
    for split, data in (("train", trainer.train_data), ("val", trainer.bundle.val), ("test", trainer.bundle.test)):
        assert trainer.evaluate(split)["num_samples"] == len(data)
