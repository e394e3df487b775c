"""The contract every registered method part keeps, checked for each one and for compositions.

Parametrised over the registry, so a new objective or plugin is covered the
moment it is registered: two epochs on tiny synthetic data (M = 2 and 3),
finite losses, evaluation, exact resume after a stop mid-run, a state round
trip mid-epoch that reproduces the next step, no access to the test split
during training, and for plugins: outside their modulation window the
gradients are plain joint training's.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.methods.base import Objective, Plugin
from mmbalance.methods.compose import resolve
from mmbalance.methods.window import WindowConfig
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run

BUILT_IN = [name for name in METHODS.names() if not name.startswith("_")]
COMPOSITIONS = ["midas+arl", "midas+cal_accel", "joint[unimodal_weight=1]+arl+cal_accel", "cal+arl", "joint+smv[warmup_epochs=1]"]
SPECS = BUILT_IN + COMPOSITIONS

TINY = [
    "synthetic.num_samples=160", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def tiny(modalities: int, extra=()) -> list[str]:
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    return [*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}", *extra]


def window_plugins() -> list[str]:
    return [n for n in BUILT_IN if issubclass(METHODS.get(n), Plugin) and issubclass(METHODS.get(n).Config, WindowConfig)]


def test_every_registered_name_is_an_objective_or_a_plugin():
    for name in BUILT_IN:
        cls = METHODS.get(name)
        assert issubclass(cls, (Objective, Plugin)), name
        assert METHODS.describe(name), f"{name} needs a one-line docstring for `mmbalance list methods`"


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", SPECS)
def test_trains_evaluates_and_resumes_exactly(spec, modalities, tmp_path, monkeypatch):
    limits = [METHODS.get(p.name).max_modalities for p in resolve(spec)]
    if any(limit is not None and modalities > limit for limit in limits):
        # a part defined for fewer modalities refuses the run in one line, before training
        with pytest.raises(ConfigError, match=r"needs .* modalities \(the dataset has") as error:
            train_run(build_config(overrides=tiny(modalities), method=spec), tmp_path / "refused", quiet=True)
        assert "\n" not in str(error.value) and not (tmp_path / "refused").exists()
        return
    # every window opens in the first epoch, so the stop falls inside each part's active phase
    config = build_config(overrides=tiny(modalities), method=spec)
    for name in config.parts:
        if "modulation_starts" in type(config.section(name)).model_fields:
            config = config.replace(**{f"{name}.modulation_starts": 0})
    full = train_run(config, tmp_path / "full", quiet=True)
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    for split in ("val", "test"):
        assert 0 <= full[split]["accuracy"] <= 1 and len(full[split]["modality_accuracy"]) == modalities
    assert full["method"] == config.method

    original = Trainer._train_epoch

    def stops_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert (tmp_path / "stopped" / "metrics.jsonl").read_text() .count("\n") == 2


def trainer_for(spec: str, extra=(), modalities: int = 2) -> Trainer:
    config = build_config(overrides=tiny(modalities, extra), method=spec)
    return Trainer(config, None, quiet=True)


def state_of(trainer: Trainer) -> dict:
    return copy.deepcopy({
        "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "generator": trainer.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


def load_state(trainer: Trainer, state: dict) -> None:
    trainer.model.load_state_dict(state["model"])
    trainer.method.load_state_dict(state["method"])
    for k, o in trainer.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    trainer.ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])


@pytest.mark.parametrize("spec", SPECS)
def test_state_round_trip_mid_epoch_reproduces_the_next_step(spec):
    batches = [b for _, b in zip(range(3), tiny_batches(spec))]
    trainer = trainer_for(spec, ["train.epochs=7"])
    trainer.ctx.epoch = 6  # past every default warm-up, inside every default window
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = state_of(trainer)
    expected = trainer.train_step(batches[2]).loss.item()

    fresh = trainer_for(spec, ["train.epochs=7"])
    fresh.ctx.epoch = 6
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)
    load_state(fresh, saved)
    assert fresh.train_step(batches[2]).loss.item() == expected


def tiny_batches(spec: str):
    trainer = trainer_for(spec)
    return iter(trainer.train_loader)


class Sentinel(torch.utils.data.Dataset):
    """The test split, refusing every read until training has finished."""

    def __init__(self, base):
        self.base, self.labels, self.modalities = base, base.labels, base.modalities
        self.open = False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        assert self.open, "the test split was read during training"
        return self.base[i]

    def __getitems__(self, indices):
        assert self.open, "the test split was read during training"
        return self.base.__getitems__(indices)


@pytest.mark.parametrize("spec", SPECS)
def test_training_never_reads_the_test_split(spec, tmp_path, monkeypatch):
    from mmbalance.data.loading import load_dataset

    config = build_config(overrides=tiny(2), method=spec)
    bundle = load_dataset(config)
    sentinel = Sentinel(bundle.test)
    bundle.test = sentinel
    original = Trainer.finish

    def finish(self):
        sentinel.open = True  # the final report may read test, once, on the best checkpoint
        return original(self)

    monkeypatch.setattr(Trainer, "finish", finish)
    metrics = train_run(config, tmp_path / "r", quiet=True, bundle=bundle)
    assert metrics["test"]["num_samples"] == len(sentinel)


@pytest.mark.parametrize("plugin", window_plugins())
def test_plugins_leave_gradients_alone_outside_their_window(plugin):
    options = {"modulation_starts": 3, **{k: 0 for k in METHODS.get(plugin).auxiliary_options}}
    spec = f"joint+{plugin}[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"
    plain, modulated = trainer_for("joint"), trainer_for(spec)
    modulated.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    grads = []
    for trainer in (plain, modulated):
        trainer.ctx.epoch = 1
        trainer.method.on_epoch_start(trainer.model, trainer.ctx)
        trainer._zero_grad()
        record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
        record.loss.backward()
        trainer._finish_gradients(record)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
