"""G-Blending (an objective): the weight rule and MultiBench's by hand, the blended loss and its slots,
the estimation (copies train their own head only; the real model, optimizer, gradients and random
streams untouched; which rows of which split it reads), the super-epoch schedule, determinism, state
and resume, the MultiBench fine-tune, and runs with ARL, OGM-GE and M = 3."""

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import mmbalance.methods.gblending  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.loading import load_dataset
from mmbalance.errors import ConfigError
from mmbalance.methods.gblending import (
    blend_weights,
    blended_loss,
    generalisation_and_overfitting,
    mean_losses,
    multibench_weights,
)
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
FAST = ["gblending.estimation_epochs=1"]

# The spec's example as a loss table, rows L^T(0), L^V(0), L^T(N), L^V(N), columns (a, b, fused):
# L^V(0) = (1, 1, 1), L^V(N) = (0.8, 0.9, 0.7)                    ⇒ ΔG = (0.2, 0.1, 0.3)
# gap(0) = L^V(0) − L^T(0) = (0.1, 0.05, 0.2); gap(N) = (0.2, 0.15, 0.5)  ⇒ ΔO = (0.1, 0.1, 0.3)
# raw ΔG/ΔO² = (20, 10, 3.333); Σ = 33.333 ⇒ w = (0.6, 0.3, 0.1)
SPEC_LOSSES = torch.tensor([
    [0.9, 0.95, 0.8],
    [1.0, 1.0, 1.0],
    [0.6, 0.75, 0.2],
    [0.8, 0.9, 0.7],
], dtype=torch.float64)


def trainer_for(spec="gblending", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def part_of(trainer):
    return trainer.method.parts["gblending"]


def snapshot(trainer):
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in trainer.model.named_parameters()},
        "optimizer": copy.deepcopy(trainer.ctx.optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "generator": trainer.ctx.generator.get_state(),
    }


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- the core by hand ----------------------------------------------------------------------------------------

def test_spec_example_weights_from_the_losses_before_and_after_a_super_epoch():
    gain, overfit = generalisation_and_overfitting(SPEC_LOSSES)
    assert gain.tolist() == pytest.approx([0.2, 0.1, 0.3], abs=1e-12)
    assert overfit.tolist() == pytest.approx([0.1, 0.1, 0.3], abs=1e-12)
    weights = blend_weights(gain, overfit)
    assert weights.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_guards_of_the_weight_rule():
    # a head whose held-out loss rose (ΔG = −0.2) gets weight 0; the others: raw (0.1/0.01, 0.2/0.04) = (10, 5)
    w = blend_weights(torch.tensor([0.1, -0.2, 0.2], dtype=torch.float64), torch.tensor([0.1, 0.1, 0.2], dtype=torch.float64))
    assert w.tolist() == pytest.approx([2 / 3, 0.0, 1 / 3], abs=1e-12)
    # no head gained: uniform
    w = blend_weights(torch.tensor([0.0, -0.1, -0.3], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)
    # ΔO = 0: ΔO² floored at 1e-8 ⇒ raw (0.1/1e-8, 0.1/0.01) = (1e7, 10); ΔO = −0.1 counts as 0.01 (squared)
    w = blend_weights(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1e7 / (1e7 + 20), 10 / (1e7 + 20), 10 / (1e7 + 20)], rel=1e-12)


def test_multibench_rule_by_hand():
    # G = L^V(N) = (0.8, 0.9, 0.7); O = L^V(N) − L^T(N) = (0.2, 0.15, 0.5)
    # raw = (0.8/0.04, 0.9/0.0225, 0.7/0.25) = (20, 40, 2.8); Σ = 62.8
    w = multibench_weights(SPEC_LOSSES)
    assert w.tolist() == pytest.approx([20 / 62.8, 40 / 62.8, 2.8 / 62.8], abs=1e-12)
    # O < 0 becomes 1e-4: columns (L^T(N), L^V(N)) = (0.5, 0.4) ⇒ 0.4/1e-8 = 4e7 against 0.8/0.04 = 20
    table = SPEC_LOSSES.clone()
    table[2, 1], table[3, 1] = 0.5, 0.4
    raw = torch.tensor([20.0, 4e7, 2.8], dtype=torch.float64)
    assert multibench_weights(table).tolist() == pytest.approx((raw / raw.sum()).tolist(), rel=1e-12)


def test_blended_loss_by_hand():
    # w = (0.5, 0.2, 0.3), CE = (a 1.0, b 2.0, fused 4.0) ⇒ 0.5 + 0.4 + 1.2 = 2.1
    loss = blended_loss(torch.tensor([0.5, 0.2, 0.3]), torch.tensor(4.0), [torch.tensor(1.0), torch.tensor(2.0)])
    assert loss.item() == pytest.approx(2.1, abs=1e-6)


# -- the step -----------------------------------------------------------------------------------------------

def test_step_loss_is_the_blend_of_the_heads_and_each_unimodal_term_reaches_only_its_encoder():
    trainer = trainer_for()
    part = part_of(trainer)
    strong, weak = trainer.ctx.modalities
    batch = next(iter(trainer.train_loader))
    part.weights.copy_(torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    with torch.no_grad():
        features = trainer.model.encode(batch.inputs)
        heads = trainer.model.heads(features)
        expected = (0.5 * F.cross_entropy(heads[strong], batch.labels) + 0.2 * F.cross_entropy(heads[weak], batch.labels)
                    + 0.3 * F.cross_entropy(trainer.model.fuse(features), batch.labels))
    assert record.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(record.losses) == {f"unimodal_{strong}", f"unimodal_{weak}", "fused"}
    assert record.unimodal.keys() == {strong, weak}

    # all weight on the first unimodal head: only its encoder and head get a gradient
    part.weights.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    trainer._zero_grad()
    trainer.method.training_step(trainer.model, batch, trainer.ctx).loss.backward()
    norm = lambda params: sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)  # noqa: E731
    groups = trainer.ctx.params
    assert norm(groups.encoder[strong]) > 0 and norm(groups.heads[strong]) > 0
    assert norm(groups.encoder[weak]) == 0 and norm(groups.heads[weak]) == 0 and norm(groups.fusion) == 0


# -- the estimation -----------------------------------------------------------------------------------------

def test_estimation_leaves_the_real_model_optimizer_gradients_and_random_streams_untouched():
    trainer = trainer_for(extra=["gblending.estimation_epochs=2", "model.dropout=0.2"])
    part = part_of(trainer)
    for batch in list(trainer.train_loader)[:2]:
        trainer.train_step(batch)  # optimizer state and gradients exist
    before = snapshot(trainer)
    assert before["optimizer"] and any(g is not None for g in before["grads"].values())
    trainer.model.train()
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    assert int(part.estimations) == 1 and int(part.estimated_super_epoch) == 0
    assert same(before, snapshot(trainer))
    assert all(m.training for m in trainer.model.modules())  # modes restored
    assert part.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert not torch.allclose(part.weights, torch.full_like(part.weights, 1 / 3))
    assert torch.isfinite(part.losses).all()


@pytest.mark.parametrize("head", ["strong", "fused"])
def test_a_copy_trains_its_own_head_and_encoders_only(head):
    trainer = trainer_for()
    part, model = part_of(trainer), trainer.model
    trained = part.train_copy(model, head, 1, 0, trainer.ctx)
    changed = {n for (n, p), q in zip(model.named_parameters(), trained.parameters()) if not torch.equal(p, q)}
    if head == "fused":
        expected = {n for n, _ in model.named_parameters() if n.startswith(("encoders.", "fusion."))}
    else:
        expected = {n for n, _ in model.named_parameters() if n.startswith(("encoders.strong.", "unimodal_heads.strong."))}
    assert changed == expected


def test_losses_before_are_the_real_models_eval_losses_on_a_train_subset_as_large_as_the_heldout_data():
    trainer = trainer_for(extra=FAST)
    part, ctx = part_of(trainer), trainer.ctx
    part.on_epoch_start(trainer.model, ctx)
    subset = part.train_loss_loader(ctx)
    rows = list(subset.sampler)
    assert len(rows) == len(ctx.heldout_loader.dataset) < len(ctx.train_eval_loader.dataset)
    assert rows == sorted(set(rows)) and list(part.train_loss_loader(ctx).sampler) == rows  # fixed all run long
    trainer.model.eval()
    with torch.no_grad():
        def by_hand(loader):
            sums, n = torch.zeros(3, dtype=torch.float64), 0
            for batch in loader:
                f = trainer.model.encode(batch.inputs)
                u = trainer.model.heads(f)
                logits = [*u.values(), trainer.model.fuse(f)]
                sums += torch.tensor([F.cross_entropy(z, batch.labels, reduction="sum").item() for z in logits], dtype=torch.float64)
                n += len(batch)
            return sums / n
        assert part.losses[0].tolist() == pytest.approx(by_hand(subset).tolist(), rel=1e-6)
        assert part.losses[1].tolist() == pytest.approx(by_hand(ctx.heldout_loader).tolist(), rel=1e-6)


def test_train_losses_full_reads_the_whole_training_split():
    trainer = trainer_for(extra=[*FAST, "gblending.train_losses=full"])
    part, ctx = part_of(trainer), trainer.ctx
    assert part.train_loss_loader(ctx) is ctx.train_eval_loader
    part.on_epoch_start(trainer.model, ctx)
    trainer.model.eval()
    expected = mean_losses(trainer.model, ctx.train_eval_loader, part.head_names, ctx.device, ctx.dist)
    assert part.losses[0].tolist() == pytest.approx(expected.tolist(), rel=1e-9)


class Recorder(torch.utils.data.Dataset):
    """A split that counts the reads of each row while armed, and refuses every read when ``refuse``."""

    def __init__(self, base, refuse=False):
        self.base, self.labels, self.modalities = base, base.labels, base.modalities
        self.refuse, self.armed, self.reads = refuse, False, Counter()

    def __len__(self):
        return len(self.base)

    def input_dtype(self, modality):
        return self.base.input_dtype(modality)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        assert not (self.armed and self.refuse), "the estimation read a split it must not read"
        if self.armed:
            self.reads.update(int(i) for i in indices)
        return self.base.__getitems__(indices)


def recorded_estimation(heldout):
    config = build_config(overrides=[*TINY, *FAST, f"data.heldout={heldout}"], method="gblending")
    bundle = load_dataset(config)
    bundle.train = Recorder(bundle.train)
    bundle.val = Recorder(bundle.val, refuse=heldout == "carve")
    bundle.test = Recorder(bundle.test, refuse=True)
    trainer = Trainer(config, None, quiet=True, bundle=bundle)
    for split in (bundle.train, bundle.val, bundle.test):
        split.armed = True
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    return trainer, bundle


def test_estimation_reads_training_and_validation_data_and_never_the_test_split():
    trainer, bundle = recorded_estimation("val")
    heads = 3
    # V = the validation split: every row read once before and once after each head's copy trained
    assert bundle.val.reads == Counter({i: heads + 1 for i in range(len(bundle.val))})
    assert not bundle.test.reads
    # one copy epoch per head reads every training row once; the subset for L^T adds (heads + 1) reads
    subset = set(part_of(trainer).train_loss_loader(trainer.ctx).sampler)
    assert bundle.train.reads == Counter({i: heads + (heads + 1) * (i in subset) for i in range(len(bundle.train))})


def test_estimation_with_a_carve_reads_the_carved_rows_as_heldout_data_and_never_val_or_test():
    trainer, bundle = recorded_estimation("carve")
    heads = 3
    carved = trainer.heldout_data.rows.tolist()
    kept = trainer.train_data.rows.tolist()
    subset = {kept[p] for p in part_of(trainer).train_loss_loader(trainer.ctx).sampler}
    assert not bundle.val.reads and not bundle.test.reads
    # carved rows: only the held-out passes (never the copies' training); kept rows: training and L^T
    assert all(bundle.train.reads[i] == heads + 1 for i in carved)
    assert all(bundle.train.reads[i] == heads + (heads + 1) * (i in subset) for i in kept)
    assert len(subset) == len(carved)


# -- schedule, state, determinism ----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, due", [("online", [0, 2, 4]), ("offline", [0])])
def test_estimation_schedule(schedule, due, monkeypatch):
    trainer = trainer_for(extra=["gblending.super_epoch=2", f"gblending.schedule={schedule}", "train.epochs=6"])
    part, calls = part_of(trainer), []
    monkeypatch.setattr(part, "estimate", lambda model, ctx: calls.append(ctx.epoch) or SPEC_LOSSES.clone())
    for epoch in range(6):
        trainer.ctx.epoch = epoch
        trainer.method.on_epoch_start(trainer.model, trainer.ctx)
        logs = trainer.method.on_epoch_end(trainer.model, trainer.ctx)
        assert logs["gblending/estimated"] == float(epoch in due)
    assert calls == due
    assert part.weights.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)
    assert logs["gblending/weight/fused"] == pytest.approx(0.1) and logs["gblending/gain/strong"] == pytest.approx(0.2)

    # restored mid-super-epoch, a run does not estimate again
    fresh = trainer_for(extra=["gblending.super_epoch=2", f"gblending.schedule={schedule}", "train.epochs=6"])
    fresh.method.load_state_dict(trainer.method.state_dict())
    monkeypatch.setattr(part_of(fresh), "estimate", lambda model, ctx: pytest.fail("estimated twice"))
    fresh.ctx.epoch = 5
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    extra = [*FAST, "gblending.super_epoch=3", "train.epochs=6"]
    trainer = trainer_for(extra=extra)
    trainer.ctx.epoch = 4
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    batches = list(trainer.train_loader)[:3]
    for batch in batches[:2]:
        trainer.train_step(batch)
    state = {"model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
             "optimizer": trainer.ctx.optimizer.state_dict()}
    state = copy.deepcopy(state)
    assert set(state["method"]) >= {"parts.gblending.weights", "parts.gblending.losses", "parts.gblending.estimated_super_epoch"}
    expected = trainer.train_step(batches[2]).loss.item()

    fresh = trainer_for(extra=extra)
    fresh.model.load_state_dict(state["model"])
    fresh.method.load_state_dict(state["method"])
    fresh.ctx.optimizer.load_state_dict(state["optimizer"])
    fresh.ctx.epoch = 4
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)  # the super-epoch is estimated already: nothing happens
    assert int(part_of(fresh).estimations) == 1
    assert fresh.train_step(batches[2]).loss.item() == expected


def method_logs(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line["method"].items() if not k.endswith("seconds")} for line in lines]


def test_two_runs_with_the_same_seed_have_the_same_weights(tmp_path):
    config = build_config(overrides=[*TINY, *FAST, "gblending.super_epoch=1"], method="gblending")
    first = train_run(config, tmp_path / "a", quiet=True)
    second = train_run(config, tmp_path / "b", quiet=True)
    logs = method_logs(tmp_path / "a")
    assert logs == method_logs(tmp_path / "b")
    assert [line["gblending/estimated"] for line in logs] == [1.0, 1.0]
    assert logs[0]["gblending/weight/strong"] != logs[1]["gblending/weight/strong"]  # re-estimated
    assert first["test"] == second["test"]


def test_resume_across_an_estimation_is_exact(tmp_path, monkeypatch):
    config = build_config(overrides=[*TINY, *FAST, "gblending.super_epoch=1", "train.epochs=3"], method="gblending")
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def stops(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert method_logs(tmp_path / "stopped") == method_logs(tmp_path / "full")
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]


# -- the MultiBench variant ------------------------------------------------------------------------------------

def test_multibench_variant_finetunes_a_separate_fused_head_and_predicts_with_it():
    trainer = trainer_for(extra=[*FAST, "gblending.variant=multibench", "gblending.super_epoch=2", "gblending.finetune_epochs=2",
                                 "train.epochs=3"])
    part, ctx, model = part_of(trainer), trainer.ctx, trainer.model
    batch = next(iter(trainer.train_loader))
    features = model.encode(batch.inputs)
    assert torch.equal(trainer.method.predict_from_features(model, features), model.fuse(features))  # not fine-tuned yet
    ctx.epoch = 0
    trainer.method.on_epoch_start(model, ctx)
    assert part.weights.tolist() == pytest.approx(multibench_weights(part.losses).tolist(), abs=1e-12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.method.on_epoch_end(model, ctx)["gblending/finetunes"] == 0.0  # epoch 0 ends no super-epoch
    ctx.epoch = 1
    assert trainer.method.on_epoch_end(model, ctx)["gblending/finetunes"] == 1.0
    assert same(before, model.state_dict())  # the model itself is not fine-tuned
    assert all(p.grad is None for p in part.finetune_head.parameters())
    with torch.no_grad():
        predicted = trainer.method.predict_from_features(model, features)
        assert torch.equal(predicted, part.finetune_head(features))
        assert not torch.equal(predicted, model.fuse(features))
    ctx.epoch = 2  # the run's last epoch ends a (partial) super-epoch too
    assert trainer.method.on_epoch_end(model, ctx)["gblending/finetunes"] == 2.0


def test_multibench_variant_trains(tmp_path):
    config = build_config(overrides=[*TINY, *FAST, "gblending.variant=multibench", "gblending.super_epoch=1",
                                     "gblending.finetune_epochs=1"], method="gblending")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert [line["gblending/finetunes"] for line in method_logs(tmp_path / "r")] == [1.0, 2.0]


# -- compositions and M = 3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, key", [("gblending+arl[modulation_starts=0]", "loss/arl_unimodal"),
                                       ("gblending+ogm_ge[modulation_starts=0]", "ogm_ge/")])
def test_gblending_with_a_plugin(spec, key, tmp_path):
    config = build_config(overrides=[*TINY, *FAST], method=spec)
    metrics = train_run(config, tmp_path / "r", quiet=True)
    logs = [json.loads(line)["method"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and any(k.startswith(key) for k in logs[0])
    assert logs[0]["gblending/weight/fused"] + logs[0]["gblending/weight/strong"] + logs[0]["gblending/weight/weak"] == pytest.approx(1)
    assert 0 <= metrics["test"]["accuracy"] <= 1


def test_three_modality_run(tmp_path):
    config = build_config(overrides=[*TINY, *M3, *FAST, "gblending.super_epoch=1"], method="gblending")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    logs = method_logs(tmp_path / "r")
    names = [k.split("/")[-1] for k in logs[0] if k.startswith("gblending/weight/")]
    assert len(names) == 4 and names[-1] == "fused"
    for line in logs:
        assert sum(line[f"gblending/weight/{n}"] for n in names) == pytest.approx(1)
    assert len(metrics["test"]["modality_accuracy"]) == 3


def test_config_is_validated():
    cls = METHODS.get("gblending")
    with pytest.raises(ValueError):
        cls.Config(super_epoch=0)
    with pytest.raises(ValueError):
        cls.Config(variant="bmm")
    with pytest.raises(ConfigError, match="fused"):
        cls(cls.Config(), ["fused", "b"], 2)
