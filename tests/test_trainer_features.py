"""Everyday trainer features: mixed precision, gradient accumulation, early stopping, warm-up, plateau.

Each is off by default, and the defaults leave a run exactly as it was before they existed.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmbalance.api import load_run
from mmbalance.config import RunConfig, build_config, load_yaml
from mmbalance.errors import ConfigError
from mmbalance.methods.base import Objective, Plugin, cross_entropy
from mmbalance.methods.midas import pooled_micro_batches
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.accumulation import micro_batches, optimizer_steps
from mmbalance.training.checkpoint import atomic_save, load_checkpoint
from mmbalance.training.precision import Precision

NEW_KEYS = ("precision", "accumulate", "early_stop", "early_stop_delta", "warmup_epochs", "plateau_patience")


def read_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_batches(trainer: Trainer, count: int) -> list:
    trainer.train_sampler.set_epoch(0)
    batches = []
    for batch in trainer.train_loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def cpu_scaler(scale: float = 2.0**10) -> Precision:
    """float32 compute with a real gradient scaler: float16's step logic, testable without CUDA."""
    return Precision("32", torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", init_scale=scale))


# -- defaults and old files ------------------------------------------------------------------------

def test_defaults_leave_a_joint_run_as_it_was(tmp_path, tiny_overrides):
    # recorded with the trainer before these features existed (same tiny settings, seed 0, CPU);
    # if the data or model code changes on purpose, record them again from a run at the defaults
    metrics = train_run(build_config(overrides=tiny_overrides), tmp_path / "run", quiet=True)
    assert [line["train_loss"] for line in read_lines(tmp_path / "run")] == pytest.approx(
        [4.213057949429467, 4.1883683658781505], rel=1e-9)
    assert metrics["val"]["accuracy"] == pytest.approx(0.2777777777777778, rel=1e-12)
    assert metrics["test"]["accuracy"] == pytest.approx(0.2777777777777778, rel=1e-12)
    assert metrics["stopped_epoch"] is None


def test_a_config_and_a_best_checkpoint_written_before_these_options_still_load(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    train_run(build_config(overrides=tiny_overrides), out, quiet=True)
    old = load_yaml(out / "config.yaml")
    for key in NEW_KEYS:
        del old["train"][key]
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    config = RunConfig(load_yaml(out / "config.yaml"))
    assert (config.train.precision, config.train.accumulate, config.train.early_stop, config.train.warmup_epochs) == ("32", 1, 0, 0)
    best = load_checkpoint(out / "best.pt")
    for key in NEW_KEYS:
        del best["config"]["train"][key]
    atomic_save(best, out / "best.pt")
    run = load_run(out)  # compares best.pt's config with the run's: missing keys count as their defaults
    assert run.evaluate("val")["accuracy"] == json.loads((out / "metrics.json").read_text())["val"]["accuracy"]


def test_new_options_are_validated(tiny_overrides):
    assert build_config(overrides=["train.precision=16"]).train.precision == "16"  # a number on the command line
    with pytest.raises(ConfigError, match="train.precision"):
        build_config(overrides=["train.precision=8"])
    with pytest.raises(ConfigError, match="train.accumulate"):
        build_config(overrides=["train.accumulate=0"])
    with pytest.raises(ConfigError, match="train.gamma.*plateau"):
        build_config(overrides=["train.scheduler=plateau", "train.gamma=1.0"])


# -- mixed precision -------------------------------------------------------------------------------

def test_float16_on_the_cpu_is_refused_before_anything_is_written(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["train.precision=16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.precision=16 .*needs a CUDA device.*bf16"):
        train_run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_bf16_runs_the_training_forward_in_bfloat16_and_evaluates_in_float32(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["train.precision=bf16", "train.device=cpu"])
    trainer = Trainer(config, None, quiet=True)
    record = trainer.train_step(first_batches(trainer, 1)[0])
    assert record.logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.parameters)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.parameters)
    plain = trainer.evaluate("val")
    with trainer.precision.forward():  # a part evaluating inside the forward pass still gets float32
        assert trainer.evaluate("val") == plain
    metrics = train_run(config, tmp_path / "run", quiet=True)
    assert all(math.isfinite(line["train_loss"]) for line in read_lines(tmp_path / "run"))
    assert 0 <= metrics["test"]["accuracy"] <= 1


@pytest.fixture
def probes(register_part):
    """A plugin that records the gradients its after_backward sees, and a manual-optimisation objective."""
    seen = []

    @register_part("grad_probe")
    class GradProbe(Plugin):
        accumulation = True

        def after_backward(self, record, ctx):
            seen.append([p.grad.detach().clone() for p in ctx.params.encoder[self.modalities[0]]])

    @register_part("manual_joint")
    class ManualJoint(Objective):
        manual_optimization = True

        def training_step(self, model, batch, ctx):
            features = self.encode(model, batch.inputs)
            record = self.record(model, batch, features, logits=self.fuse(model, features))
            record.add_loss("fused", cross_entropy(record.logits, batch))
            ctx.manual_step(record.loss, record)
            return record

    @register_part("inf_grad")
    class InfGradient(Plugin):
        def on_forward(self, record, ctx):
            record.logits.register_hook(lambda g: g * math.inf)

    return seen


@pytest.mark.parametrize("method", ["joint+grad_probe", "manual_joint+grad_probe"])
def test_gradients_are_unscaled_before_any_after_backward(tiny_overrides, probes, method):
    config = build_config(overrides=tiny_overrides + ["train.device=cpu"], method=method)
    plain, scaled = Trainer(config, None, quiet=True), Trainer(config, None, quiet=True)
    scaled.precision = cpu_scaler()
    batch = first_batches(plain, 1)[0]
    plain.train_step(batch)
    scaled.train_step(batch)
    assert len(probes) == 2  # one after_backward per run
    unscaled, seen_scaled = probes
    for a, b in zip(unscaled, seen_scaled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert any(g.abs().max() > 0 for g in unscaled)
    for p, q in zip(plain.parameters, scaled.parameters):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_a_step_with_infinite_gradients_is_skipped_and_the_scale_checkpointed(tiny_overrides, probes):
    config = build_config(overrides=tiny_overrides + ["train.device=cpu"], method="joint+inf_grad")
    trainer = Trainer(config, None, quiet=True)
    trainer.precision = cpu_scaler(2.0**10)
    before = [p.detach().clone() for p in trainer.parameters]
    trainer.train_step(first_batches(trainer, 1)[0])
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.parameters))  # skipped
    assert trainer.precision.scaler.get_scale() == 2.0**9  # and the scale lowered
    checkpoint = trainer._last_checkpoint()
    assert checkpoint["scaler"]["scale"] == 2.0**9
    fresh = Trainer(config, None, quiet=True)
    fresh.precision = cpu_scaler(2.0**10)
    fresh._restore(checkpoint, Path("last.pt"))
    assert fresh.precision.scaler.get_scale() == 2.0**9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 with gradient scaling needs CUDA")
def test_float16_on_cuda_trains_and_resumes_exactly(tmp_path, tiny_overrides, monkeypatch):
    config = build_config(overrides=tiny_overrides + ["train.precision=16", "train.device=cuda", "train.epochs=3"])
    full = train_run(config, tmp_path / "full", quiet=True)
    assert "scaler" in load_checkpoint(tmp_path / "full" / "last.pt")
    original = Trainer._train_epoch

    def dies(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "resumed", quiet=True)
    assert resumed["test"] == full["test"]
    assert [l["train_loss"] for l in read_lines(tmp_path / "resumed")] == [l["train_loss"] for l in read_lines(tmp_path / "full")]


# -- gradient accumulation -------------------------------------------------------------------------

def test_micro_batches_weigh_by_their_share_of_the_step():
    plan = micro_batches(56, 16, 2)  # batches of 16, 16, 16, 8
    assert [(m.step, m.first, m.last) for m in plan] == [(0, True, False), (0, False, True), (1, True, False), (1, False, True)]
    assert [m.weight for m in plan] == [0.5, 0.5, 16 / 24, 8 / 24]
    assert [(m.step, m.weight, m.first, m.last) for m in micro_batches(40, 16, 2)][-1] == (1, 1.0, True, True)  # a lone last batch
    assert optimizer_steps(3, 2) == 2 and optimizer_steps(4, 2) == 2


def accumulating(tiny_overrides, batch_size, accumulate):
    overrides = tiny_overrides + [
        "synthetic.num_samples=220",  # 156 training samples: the last step gathers 16 + 12 samples
        f"train.batch_size={batch_size}", f"train.accumulate={accumulate}",
        "train.optimizer=sgd", "train.lr=0.05", "train.grad_clip=1.0", "train.device=cpu",
    ]
    return Trainer(build_config(overrides=overrides), None, quiet=True)


def test_two_micro_batches_of_16_train_exactly_like_one_batch_of_32(tiny_overrides):
    whole, halves = accumulating(tiny_overrides, 32, 1), accumulating(tiny_overrides, 16, 2)
    assert len(whole.train_data) % 32 > 16
    # one step: the same gradients (after averaging and clipping)
    batch = first_batches(whole, 1)[0]
    first, second = first_batches(halves, 2)
    assert torch.equal(torch.cat([first.labels, second.labels]), batch.labels)
    whole.train_step(batch)
    plan = micro_batches(len(halves.train_data), 16, 2)
    halves.train_step(first, plan[0])
    halves.train_step(second, plan[1])
    for p, q in zip(whole.parameters, halves.parameters):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    # whole epochs, the uneven last step included: the same parameters, loss and step count
    whole, halves = accumulating(tiny_overrides, 32, 1), accumulating(tiny_overrides, 16, 2)
    for epoch in range(2):
        a, b = whole._train_epoch(epoch), halves._train_epoch(epoch)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["train_accuracy"] == b["train_accuracy"]
    for p, q in zip(whole.parameters, halves.parameters):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert halves.state["global_step"] == whole.state["global_step"] == 2 * 5
    assert halves.ctx.steps_per_epoch == whole.ctx.steps_per_epoch == 5


def test_accumulation_with_a_part_that_modulates_per_batch_is_refused(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["train.accumulate=2"], method="midas+ogm_ge+arl")
    with pytest.raises(ConfigError, match=r"train.accumulate=2 cannot run with 'ogm_ge', 'arl'"):
        train_run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_midas_accumulates_and_moves_alpha_once_per_step_from_every_micro_batch(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["train.accumulate=2", "train.batch_size=16", "midas.modulation_starts=0"],
                          method="midas")
    metrics = train_run(config, tmp_path / "run", quiet=True)
    assert all(math.isfinite(line["train_loss"]) for line in read_lines(tmp_path / "run"))
    assert 0 <= metrics["test"]["accuracy"] <= 1
    stats = [
        {"confidence": torch.tensor([0.2, 0.8]), "fused_confidence": torch.tensor([0.4, 0.6]),
         "unimodal_confidence": torch.tensor([0.1, 0.9]), "fused_probability": torch.tensor([0.5, 0.5]), "count": torch.tensor(3.0)},
        {"confidence": torch.tensor([0.6, 0.4]), "fused_confidence": torch.tensor([0.8, 0.2]),
         "unimodal_confidence": torch.tensor([0.5, 0.5]), "fused_probability": torch.tensor([0.1, 0.9]), "count": torch.tensor(1.0)},
    ]
    pooled = pooled_micro_batches(stats)
    assert pooled["count"] == 4
    assert torch.allclose(pooled["confidence"], torch.tensor([0.3, 0.7]))  # (3 · 0.2 + 1 · 0.6) / 4
    assert torch.allclose(pooled["fused_probability"], torch.tensor([0.4, 0.6]))


# -- early stopping --------------------------------------------------------------------------------

def test_a_run_that_cannot_improve_stops_after_patience_plus_one_epochs(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.epochs=6", "train.lr=1e-12", "train.early_stop=2"]
    out = tmp_path / "run"
    metrics = train_run(build_config(overrides=overrides), out, quiet=True)
    assert [line["epoch"] for line in read_lines(out)] == [1, 2, 3]
    assert metrics["stopped_epoch"] == 3 and metrics["best_epoch"] == 1 and metrics["epochs"] == 6
    assert json.loads((out / "metrics.json").read_text())["stopped_epoch"] == 3
    assert load_checkpoint(out / "best.pt")["epoch"] == 1
    # resuming a stopped run trains no further ...
    again = resume_run(out, quiet=True)
    assert len(read_lines(out)) == 3 and again["stopped_epoch"] == 3 and again["test"] == metrics["test"]
    # ... unless it is extended: then the patience counts anew from the resume
    extended = resume_run(out, quiet=True, overrides=["train.epochs=9"])
    assert [line["epoch"] for line in read_lines(out)] == [1, 2, 3, 4, 5]
    assert extended["stopped_epoch"] == 5 and extended["best_epoch"] == 1


def test_early_stop_counts_only_gains_above_the_delta(tiny_overrides):
    trainer = Trainer(build_config(overrides=tiny_overrides + [
        "train.epochs=10", "train.early_stop=2", "train.early_stop_delta=0.05"]), None, quiet=True)
    for epoch, accuracy in enumerate([0.50, 0.54, 0.56, 0.57, 0.58], start=1):  # 0.56 gains 0.06 on 0.50
        trainer._check_early_stop(epoch, accuracy)
    assert trainer.state["stopped_epoch"] == 5 and trainer.state["early_stop_epoch"] == 3


# -- warm-up and plateau -----------------------------------------------------------------------------

def test_warmup_rises_per_step_to_lr_then_hands_over_to_the_step_scheduler(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.epochs=5", "train.lr=0.01", "train.warmup_epochs=2",
                                  "train.scheduler=step", "train.step_size=1", "train.gamma=0.5"]
    trainer = Trainer(build_config(overrides=overrides), None, quiet=True)
    steps = trainer.ctx.steps_per_epoch
    train_run(build_config(overrides=overrides), tmp_path / "run", quiet=True)
    rates = [line["lr"] for line in read_lines(tmp_path / "run")]
    assert rates == pytest.approx([0.01 / (2 * steps), 0.01 * (steps + 1) / (2 * steps), 0.01, 0.005, 0.0025])


def test_warmup_then_cosine_spans_the_epochs_after_the_warmup(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.epochs=5", "train.lr=0.01", "train.warmup_epochs=1", "train.scheduler=cosine"]
    train_run(build_config(overrides=overrides), tmp_path / "run", quiet=True)
    rates = [line["lr"] for line in read_lines(tmp_path / "run")]
    cosine = [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert rates[1:] == pytest.approx(cosine)


def test_plateau_multiplies_the_lr_by_gamma_when_validation_accuracy_stalls(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.epochs=4", "train.lr=1e-6", "train.scheduler=plateau",
                                  "train.plateau_patience=0", "train.gamma=0.5"]
    train_run(build_config(overrides=overrides), tmp_path / "run", quiet=True)
    lines = read_lines(tmp_path / "run")
    assert len({line["val"]["accuracy"] for line in lines}) == 1  # lr too small to change a prediction
    assert [line["lr"] for line in lines] == pytest.approx([1e-6, 1e-6, 5e-7, 2.5e-7])


class Killed(Exception):
    pass


@pytest.mark.parametrize("schedule", [
    ["train.warmup_epochs=3", "train.scheduler=step", "train.step_size=1"],
    ["train.warmup_epochs=1", "train.scheduler=plateau", "train.plateau_patience=0", "train.gamma=0.5"],
])
def test_resuming_mid_warmup_reproduces_the_uninterrupted_run(tmp_path, tiny_overrides, monkeypatch, schedule):
    overrides = tiny_overrides + ["train.epochs=4", "train.optimizer=sgd", "train.lr=0.05", *schedule]
    config = build_config(overrides=overrides)
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def dies_in_second_epoch(self, epoch):
        if epoch == 1:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies_in_second_epoch)
    with pytest.raises(Killed):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "resumed", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    keys = ("train_loss", "lr")
    assert [[l[k] for k in keys] for l in read_lines(tmp_path / "resumed")] == [[l[k] for k in keys] for l in read_lines(tmp_path / "full")]


def test_warmup_is_refused_for_a_method_with_its_own_schedules(tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["train.warmup_epochs=1"], method="reconboost")
    with pytest.raises(ConfigError, match="train.warmup_epochs=1 cannot apply: method 'reconboost'"):
        Trainer(config, None, quiet=True)
