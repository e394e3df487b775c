"""Diagnosing & Re-learning (a plugin): purity, K-means, the strength and the soft re-initialisation by hand,
its R/K schedule and window, which data the diagnosis reads, the optimizer state, determinism, state and
resume across a re-initialisation, composition with MIDAS and runs with M = 2 and 3."""

import json
import math

import pytest
import torch
from torch import nn

import mmbalance.methods.relearning  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.data.loading import load_dataset
from mmbalance.errors import ConfigError
from mmbalance.methods.relearning import (
    clustering_purity,
    kmeans,
    minmax_scale,
    purity,
    reinit_due,
    reinit_strength,
    soft_reinit_,
)
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def relearning(modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get("relearning")
    return cls(cls.Config(**options), list(modalities), num_classes)


# -- the core by hand ---------------------------------------------------------------------------------

def test_strength_from_the_purity_gap_by_hand():
    # spec: purity 0.9 vs 0.6, λ = 3: a = tanh(3 · 0.3) = tanh(0.9) = 0.716297870199024; the gap is absolute
    a = reinit_strength(torch.tensor([0.9, 0.6, 0.5], dtype=torch.float64),
                        torch.tensor([0.6, 0.9, 0.5], dtype=torch.float64), 3.0)
    assert a.tolist() == pytest.approx([0.716297870199024, 0.716297870199024, 0.0], abs=1e-12)
    assert a[2].item() == 0.0  # gap 0: strength exactly 0


def test_soft_reinit_formula_on_a_tiny_encoder():
    # θ^init: W0 = I, b0 = 0; θ: W = [[3, 2], [-1, 5]], b = [4, -2]; a = 0.25:
    # W' = 0.25 I + 0.75 W = [[2.5, 1.5], [-0.75, 4.0]], b' = 0.75 b = [3, -1.5] (all exact in binary)
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 2.0], [-1.0, 5.0]]))
        layer.bias.copy_(torch.tensor([4.0, -2.0]))
    weight_before = layer.weight
    soft_reinit_(list(layer.parameters()), [torch.eye(2), torch.zeros(2)], 0.25)
    assert layer.weight is weight_before  # the same tensor: optimizers keep referring to it
    assert torch.equal(layer.weight, torch.tensor([[2.5, 1.5], [-0.75, 4.0]]))
    assert torch.equal(layer.bias, torch.tensor([3.0, -1.5]))
    # a = 0 leaves θ exactly; a = 1 is θ^init exactly
    soft_reinit_(list(layer.parameters()), [torch.eye(2), torch.zeros(2)], 0.0)
    assert torch.equal(layer.bias, torch.tensor([3.0, -1.5]))
    soft_reinit_(list(layer.parameters()), [torch.eye(2), torch.zeros(2)], 1.0)
    assert torch.equal(layer.weight, torch.eye(2)) and torch.equal(layer.bias, torch.zeros(2))
    with pytest.raises(ValueError):
        soft_reinit_([layer.weight], [torch.zeros(3)], 0.5)


def test_minmax_scale_by_hand():
    # column 0: min 0, max 4 -> 0, 2, 4 map to -1, 0, 1; column 1 is constant -> -1 (scikit-learn's choice)
    x = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    assert torch.equal(minmax_scale(x), torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]))


def test_purity_by_hand():
    # cluster 0 holds labels {0, 0, 1} (majority 2), cluster 5 holds {1, 1, 2} (majority 2): 4 / 6
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert purity(labels, torch.tensor([0, 0, 0, 5, 5, 5])) == pytest.approx(4 / 6)
    assert purity(labels, labels) == 1.0
    assert purity(labels, torch.zeros(6, dtype=torch.long)) == pytest.approx(3 / 6)


def test_kmeans_and_clustering_purity_by_hand():
    # 1-D points 0, 0.1, 0.05 | 10, 10.1 with labels 0, 0, 1 | 1, 1: two clusters, purity (2 + 2) / 5 = 0.8
    x = torch.tensor([[0.0], [0.1], [0.05], [10.0], [10.1]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    clusters = kmeans(x, 2, torch.Generator().manual_seed(0))
    assert clusters[0] == clusters[1] == clusters[2] != clusters[3] == clusters[4]
    assert clustering_purity(x, labels, 2) == pytest.approx(0.8)
    # scaling the features changes nothing (min–max per set)
    assert clustering_purity(7 * x - 3, labels, 2) == pytest.approx(0.8)
    # fewer points than clusters: one point per cluster, purity 1
    assert clustering_purity(x[:2], labels[:2], 4) == 1.0


def test_torch_kmeans_agrees_with_scikit_learn_on_separated_blobs():
    g = torch.Generator().manual_seed(3)
    centers = 6 * torch.randn(4, 5, generator=g)
    labels = torch.arange(4).repeat_interleave(25)
    x = centers[labels] + torch.randn(100, 5, generator=g)
    assert clustering_purity(x, labels, 4) == clustering_purity(x, labels, 4, backend="sklearn") == 1.0


# -- the schedule --------------------------------------------------------------------------------------

def scheduled_epochs(part, epochs):
    done = []
    for epoch in range(epochs):
        if part.due(epoch):
            done.append(epoch)
            part.count += 1
    return done


def test_schedule_of_R_and_K():
    # e > 0, e % R == 0, fewer than K done: R = 20, K = 3 -> 20, 40, 60; BMM's R = 15, K = 2 -> 15, 30
    assert reinit_due(20, 20, 3, done=0) and reinit_due(60, 20, 3, done=2)
    assert not reinit_due(80, 20, 3, done=3) and not reinit_due(21, 20, 3, done=0)
    assert not reinit_due(0, 1, 3, done=0)  # epoch 0 never re-initialises (0 % R == 0, but e > 0 is required)
    assert scheduled_epochs(relearning(), 100) == [20, 40, 60]
    assert scheduled_epochs(relearning(reinit_every=15, reinit_times=2), 100) == [15, 30]
    assert scheduled_epochs(relearning(reinit_every=1, reinit_times=2), 10) == [1, 2]
    assert scheduled_epochs(relearning(reinit_times=0), 100) == []
    # the window bounds when re-initialisation may happen; skipped epochs do not count towards K
    assert scheduled_epochs(relearning(modulation_starts=25), 100) == [40, 60, 80]
    assert scheduled_epochs(relearning(modulation_ends=45), 100) == [20, 40]
    with pytest.raises(ConfigError):
        relearning(modulation_starts=5, modulation_ends=2)


# -- the plugin on a hand model ----------------------------------------------------------------------------

class Line(Encoder):
    """f = w x + b on one number (a 1-D representation whose clusters min–max scaling does not change)."""

    def __init__(self, norm=False):
        super().__init__((1,), 1)
        self.linear = nn.Linear(1, 1)
        self.norm = nn.BatchNorm1d(1) if norm else nn.Identity()
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.norm(self.linear(x))


def batches(a, b, labels, index, size):
    return [
        Batch({"a": torch.tensor(a[i:i + size], dtype=torch.float32).unsqueeze(1),
               "b": torch.tensor(b[i:i + size], dtype=torch.float32).unsqueeze(1)},
              torch.tensor(labels[i:i + size]), torch.tensor(list(index[i:i + size])))
        for i in range(0, len(labels), size)
    ]


class Refused:
    def __iter__(self):
        raise AssertionError("the diagnosis read a loader it must not read")


def hand_setup(**options):
    """Encoders initialised to f = x (θ^init: w = 1, b = 0), then 'trained' to a: 2x + 1, b: 3x − 1.

    Training set (labels 0, 0, 1, 1, 1): a = 0, 0.1, 10, 10.1, 10.05 -> clusters {0, 0.1 | ...}: purity 1;
    b = 0, 10, 0.1, 10.1, 10.05 -> {0 (y0), 0.1 (y1)} and {10 (y0), 10.1, 10.05 (y1)}: (1 + 2) / 5 = 0.6.
    Held-out (labels 0, 1, 1, 1, 0): a = 0, 0.1, 10, 10.1, 0.05 -> {y0, y1, y0} and {y1, y1}: 0.8;
    b = 0, 0.1, 10, 10.1, 10.05 -> {y0, y1} and {y1, y1, y0}: 0.6.
    Gaps: a 0.2 -> strength tanh(3 · 0.2) = tanh(0.6) = 0.5370495669980353; b 0 -> unchanged.
    """
    model = MultimodalModel({"a": Line(), "b": Line(norm=True)}, SumFusion({"a": 1, "b": 1}, 2), 2)
    with torch.no_grad():
        for m in "ab":
            model.encoders[m].linear.weight.fill_(1.0)
            model.encoders[m].linear.bias.zero_()
    part = relearning(reinit_every=1, **options)
    ctx = TrainContext(
        epoch=1, max_epochs=4, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"], num_classes=2,
        generator=torch.Generator().manual_seed(0), dist=DistributedState(), params=ParameterGroups.of(model),
        train_loader=Refused(),
        train_eval_loader=batches([0, 0.1, 10, 10.1, 10.05], [0, 10, 0.1, 10.1, 10.05], [0, 0, 1, 1, 1], range(5), 2),
        heldout_loader=batches([0, 0.1, 10, 10.1, 0.05], [0, 0.1, 10, 10.1, 10.05], [0, 1, 1, 1, 0], range(5), 3),
    )
    part.setup(model, ctx)
    with torch.no_grad():
        model.encoders["a"].linear.weight.fill_(2.0)
        model.encoders["a"].linear.bias.fill_(1.0)
        model.encoders["b"].linear.weight.fill_(3.0)
        model.encoders["b"].linear.bias.fill_(-1.0)
        model.encoders["b"].norm.running_mean.fill_(0.5)
    model.train()
    return model, part, ctx


def test_diagnosis_and_reinitialisation_on_a_hand_model():
    model, part, ctx = hand_setup()
    fusion = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    heads = {k: v.clone() for k, v in model.unimodal_heads.state_dict().items()}
    logs = part.on_epoch_end(model, ctx)
    s = math.tanh(0.6)
    assert logs["relearning/reinitialised"] == 1.0 and logs["relearning/count"] == 1.0
    assert logs["relearning/purity_train/a"] == pytest.approx(1.0) and logs["relearning/purity_heldout/a"] == pytest.approx(0.8)
    assert logs["relearning/purity_train/b"] == pytest.approx(0.6) and logs["relearning/purity_heldout/b"] == pytest.approx(0.6)
    assert logs["relearning/strength/a"] == pytest.approx(s) and logs["relearning/strength/b"] == 0.0
    # a: w = s · 1 + (1 − s) · 2 = 2 − s, b = (1 − s) · 1 = 1 − s
    a = model.encoders["a"].linear
    assert a.weight.item() == pytest.approx(2 - s, abs=1e-6) and a.bias.item() == pytest.approx(1 - s, abs=1e-6)
    # b: gap 0, strength 0: unchanged exactly; its BatchNorm statistics are never touched
    b = model.encoders["b"]
    assert b.linear.weight.item() == 3.0 and b.linear.bias.item() == -1.0
    assert b.norm.running_mean.item() == 0.5
    # only encoders move
    assert all(torch.equal(v, model.fusion.state_dict()[k]) for k, v in fusion.items())
    assert all(torch.equal(v, model.unimodal_heads.state_dict()[k]) for k, v in heads.items())
    # the buffers hold the diagnosis and the counter
    assert part.count.item() == 1
    assert part.purities.flatten().tolist() == pytest.approx([1.0, 0.6, 0.8, 0.6])


def test_diagnosis_runs_in_eval_mode_without_gradients_and_restores_the_modes():
    model, part, ctx = hand_setup()
    model.encoders["b"].norm.eval()  # a module another part keeps in eval mode stays so
    before = {name: module.training for name, module in model.named_modules()}
    part.on_epoch_end(model, ctx)
    for m in "ab":
        assert model.encoders[m].calls and all(call == (False, False) for call in model.encoders[m].calls)
    assert {name: module.training for name, module in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())


def test_nothing_happens_on_epochs_that_are_not_due():
    model, part, ctx = hand_setup()
    ctx.train_eval_loader = ctx.heldout_loader = Refused()  # not due: no pass over any data
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx.epoch = 0
    assert part.on_epoch_end(model, ctx) == {"relearning/reinitialised": 0.0, "relearning/count": 0.0}
    outside = relearning(reinit_every=1, modulation_starts=3)  # epoch 2 is due by R and K but before the window
    outside.setup(model, ctx)
    ctx.epoch = 2
    assert outside.on_epoch_end(model, ctx)["relearning/reinitialised"] == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- which data the diagnosis reads -------------------------------------------------------------------------

class Sentinel(torch.utils.data.Dataset):
    """A split that counts its reads and refuses them while ``closed``."""

    def __init__(self, base, name):
        self.base, self.labels, self.modalities, self.name = base, base.labels, base.modalities, name
        self.closed, self.reads = False, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        assert not self.closed, f"the {self.name} split was read by the diagnosis"
        self.reads += 1
        return self.base[i]

    def input_dtype(self, modality):
        return self.base.input_dtype(modality)

    def __getitems__(self, indices):
        assert not self.closed, f"the {self.name} split was read by the diagnosis"
        self.reads += len(indices)
        return self.base.__getitems__(indices)


def sentinel_trainer(heldout):
    config = build_config(overrides=[*TINY, f"data.heldout={heldout}"], method="joint+relearning[reinit_every=1]")
    bundle = load_dataset(config)
    splits = {name: Sentinel(getattr(bundle, name), name) for name in ("train", "val", "test")}
    for name, split in splits.items():
        setattr(bundle, name, split)
    trainer = Trainer(config, None, quiet=True, bundle=bundle)
    trainer.ctx.train_loader = Refused()  # the shuffled training loader is never the diagnosis's
    trainer.ctx.epoch = 1
    return trainer, splits


def test_diagnosis_with_a_carved_heldout_reads_training_data_only():
    trainer, splits = sentinel_trainer("carve")
    splits["val"].closed = splits["test"].closed = True
    logs = trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert logs["relearning/reinitialised"] == 1.0
    # both passes (training part and carved part) together read the training split once
    assert splits["train"].reads == len(splits["train"]) and splits["val"].reads == splits["test"].reads == 0


def test_diagnosis_never_reads_the_test_split():
    # data.heldout=val (the default): the held-out set is the validation split, as the spec's
    # train-vs-held-out purity gap needs; the test split stays closed
    trainer, splits = sentinel_trainer("val")
    splits["test"].closed = True
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert splits["train"].reads == len(splits["train"]) and splits["val"].reads == len(splits["val"])
    assert splits["test"].reads == 0


# -- optimizer state --------------------------------------------------------------------------------------------

def momentum_trainer(option, monkeypatch):
    spec = f"joint+relearning[reinit_every=1,optimizer_state={option}]"
    trainer = Trainer(build_config(overrides=[*TINY, "train.optimizer=sgd"], method=spec), None, quiet=True)
    # a fixed diagnosis (gap 0.3 for every modality), so that every encoder moves
    part = trainer.method.parts["relearning"]
    monkeypatch.setattr(part, "diagnose", lambda model, ctx: torch.tensor([[0.9, 0.9], [0.6, 0.6]], dtype=torch.float64))
    for batch in list(trainer.train_loader)[:2]:
        trainer.train_step(batch)
    trainer.ctx.epoch = 1
    optimizer = trainer.ctx.optimizer
    before = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in trainer.ctx.params.all()
              if "momentum_buffer" in optimizer.state.get(p, {})}
    logs = trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert all(logs[f"relearning/strength/{m}"] > 0 for m in trainer.ctx.modalities)
    return trainer, optimizer, before


def test_optimizer_state_is_kept_by_default(monkeypatch):
    trainer, optimizer, before = momentum_trainer("keep", monkeypatch)
    for p in trainer.ctx.params.all():
        if id(p) in before:
            assert torch.equal(optimizer.state[p]["momentum_buffer"], before[id(p)])


def test_optimizer_state_reset_drops_the_encoders_state_only(monkeypatch):
    trainer, optimizer, before = momentum_trainer("reset", monkeypatch)
    encoder = {id(p) for m in trainer.ctx.modalities for p in trainer.ctx.params.encoder[m]}
    assert encoder and encoder <= set(before)
    for p in trainer.ctx.params.all():
        if id(p) in encoder:
            assert p not in optimizer.state
        elif id(p) in before:
            assert torch.equal(optimizer.state[p]["momentum_buffer"], before[id(p)])


# -- determinism, state, resume ----------------------------------------------------------------------------

def run(tmp_path, name, extra=(), spec="joint+relearning[reinit_every=1,reinit_times=2]", epochs=3):
    config = build_config(overrides=[*TINY, f"train.epochs={epochs}", *extra], method=spec)
    metrics = train_run(config, tmp_path / name, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


def test_runs_are_deterministic(tmp_path):
    first, lines_a = run(tmp_path, "a")
    second, lines_b = run(tmp_path, "b")
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    assert [l["method"]["relearning/reinitialised"] for l in lines_a] == [0.0, 1.0, 1.0]
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for key, value in last[0]["model"].items():
        assert torch.equal(value, last[1]["model"][key]), key


def test_state_round_trip_holds_the_counter_the_diagnosis_and_the_initial_weights():
    spec = "joint+relearning[reinit_every=1,reinit_times=1]"
    config = build_config(overrides=[*TINY, "train.epochs=4"], method=spec)
    trainer = Trainer(config, None, quiet=True)
    initial = {m: [p.detach().clone() for p in trainer.ctx.params.encoder[m]] for m in trainer.ctx.modalities}
    for batch in list(trainer.train_loader)[:3]:
        trainer.train_step(batch)
    trainer.ctx.epoch = 1
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    state = trainer.method.state_dict()
    part = trainer.method.parts["relearning"]
    for j, m in enumerate(trainer.ctx.modalities):
        assert all(torch.equal(state[f"parts.relearning.initial.m{j}_p{i}"], p0) for i, p0 in enumerate(initial[m]))
    assert state["parts.relearning.count"].item() == 1

    fresh = Trainer(config, None, quiet=True)
    fresh.model.load_state_dict(trainer.model.state_dict())
    fresh.method.load_state_dict(state)
    restored = fresh.method.parts["relearning"]
    assert restored.count.item() == 1 and torch.equal(restored.purities, part.purities)
    assert torch.equal(restored.strength, part.strength)
    fresh.ctx.epoch = trainer.ctx.epoch = 2  # K = 1 reached: neither re-initialises again
    assert fresh.method.on_epoch_end(fresh.model, fresh.ctx) == trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert not restored.due(2)


@pytest.mark.parametrize("stop", [1, 2])
def test_resume_across_a_reinitialisation_is_exact(stop, tmp_path, monkeypatch):
    # re-initialisations at the ends of epochs 1 and 2 (R = 1, K = 2); the run stops before epoch `stop`
    config = build_config(overrides=[*TINY, "train.epochs=4"], method="joint+relearning[reinit_every=1,reinit_times=2]")
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def stops(self, epoch):
        if epoch == stop:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    logs = [[json.loads(l)["method"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "stopped")]
    assert logs[0] == logs[1]
    assert [l["relearning/count"] for l in logs[0]] == [0.0, 1.0, 2.0, 2.0]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in ("full", "stopped")]
    for part in ("model", "method"):
        for key, value in last[0][part].items():
            assert torch.equal(value, last[1][part][key]), key


# -- composition and M = 3 ------------------------------------------------------------------------------------

def test_midas_plus_relearning(tmp_path):
    metrics, lines = run(tmp_path, "midas", spec="midas[modulation_starts=0]+relearning[reinit_every=1,reinit_times=1]",
                         epochs=2)
    assert metrics["method"] == "midas+relearning"
    assert lines[1]["method"]["relearning/reinitialised"] == 1.0
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())


@pytest.mark.parametrize("extra", [(), M3], ids=["M2", "M3"])
def test_joint_relearning_runs(extra, tmp_path):
    metrics, lines = run(tmp_path, "r", extra, spec="joint+relearning[reinit_every=1,reinit_times=1]", epochs=2)
    count = 3 if extra else 2
    assert len(metrics["test"]["modality_accuracy"]) == count
    strengths = [k for k in lines[1]["method"] if k.startswith("relearning/strength/")]
    assert len(strengths) == count
    assert all(0 <= lines[1]["method"][k] < 1 for k in strengths)
    assert all(math.isfinite(l["train_loss"]) for l in lines)
