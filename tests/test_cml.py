"""CML (an objective): the spec's confidence example, the per-sample vs batch-sum hinge, the penalty's
gradient, removal chains for M = 3 on a hand model in two orders, the order buffer (drawn per epoch or
per step from the run's generator), the window, determinism, state round trips, and runs with plugins."""

import copy
import json
import math

import pytest
import torch

import mmbalance.methods.cml  # noqa: F401  (registers "cml")
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.methods.cml import calibration_penalty, confidence, draw_order, removal_logits
from mmbalance.methods.compose import Method
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
TINY3 = [*TINY, "synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
ln = math.log


def part(modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get("cml")
    return cls(cls.Config(**options), list(modalities), num_classes)


# -- "Test it by": conf 0.7 with every modality, 0.9 after the removal ⇒ penalty 0.2·λ; a drop ⇒ 0 --------------
def test_penalty_of_the_spec_example_and_zero_when_confidence_drops():
    rising = torch.tensor([[[ln(7 / 3), 0.0]], [[ln(9), 0.0]]])  # [M = 2, B = 1, C = 2]: conf 0.7 → 0.9
    assert confidence(rising)[:, 0].tolist() == pytest.approx([0.7, 0.9])
    lam = 0.1
    assert lam * calibration_penalty(rising).item() == pytest.approx(0.2 * lam, abs=1e-7)  # 0.02
    assert calibration_penalty(rising.flip(0)).item() == 0.0  # 0.9 → 0.7: lower confidence is not penalised


def test_per_sample_hinge_against_bmms_batch_sum():
    # three samples, z^(0) → z^(1):
    #   0: (ln 7/3, 0) → (ln 9, 0): 0.7 → 0.9, +0.2
    #   1: (0, ln 4)   → (0, 0):    0.8 → 0.5, −0.3
    #   2: (ln 3, 0)   → (0, ln 9): 0.75 → 0.9, +0.15 (the predicted class changed: confidence is the max, not p[y])
    logits = torch.tensor([[[ln(7 / 3), 0.0], [0.0, ln(4)], [ln(3), 0.0]], [[ln(9), 0.0], [0.0, 0.0], [0.0, ln(9)]]])
    # paper: (0.2 + 0 + 0.15)/3 = 0.116667; bmm: max(0, 0.2 − 0.3 + 0.15) = 0.05 (a sum, not divided by B)
    assert calibration_penalty(logits).item() == pytest.approx(0.116667, abs=1e-6)
    assert calibration_penalty(logits, "bmm").item() == pytest.approx(0.05, abs=1e-6)
    rising = logits[:, [0, 0]]  # two samples rising 0.2 each: paper 0.2 (a mean), bmm 0.4 (a sum)
    assert calibration_penalty(rising).item() == pytest.approx(0.2, abs=1e-6)
    assert calibration_penalty(rising, "bmm").item() == pytest.approx(0.4, abs=1e-6)
    # a plugin's sample weights (2, 1, 0): paper (2 · 0.2 + 0 + 0)/3 = 0.133333; bmm max(0, 0.4 − 0.3) = 0.1
    weight = torch.tensor([2.0, 1.0, 0.0])
    assert calibration_penalty(logits, sample_weight=weight).item() == pytest.approx(0.133333, abs=1e-6)
    assert calibration_penalty(logits, "bmm", weight).item() == pytest.approx(0.1, abs=1e-6)


def test_both_sides_of_an_increase_get_gradient():
    logits = torch.tensor([[[ln(7 / 3), 0.0]], [[ln(9), 0.0]]], requires_grad=True)
    calibration_penalty(logits).backward()
    # conf = σ(z_0 − z_1), ∂conf/∂z = conf(1 − conf)(1, −1): the reduced model's 0.9 · 0.1 = 0.09 pushes down,
    # the full model's 0.7 · 0.3 = 0.21 pushes up
    assert torch.allclose(logits.grad[1, 0], torch.tensor([0.09, -0.09]), atol=1e-6)
    assert torch.allclose(logits.grad[0, 0], torch.tensor([-0.21, 0.21]), atol=1e-6)


def test_each_removal_is_compared_with_the_step_before_it():
    # conf 0.6 → 0.8 → 0.7: 0.2 from the first removal, none from the second (0.8 → 0.7);
    # against the full model it would be 0.2 + 0.1 = 0.3
    chain = torch.tensor([[[ln(1.5), 0.0]], [[ln(4), 0.0]], [[ln(7 / 3), 0.0]]])
    assert calibration_penalty(chain).item() == pytest.approx(0.2, abs=1e-6)


# -- the objective on a hand model, M = 3 --------------------------------------------------------------
class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """f_m = x_m and fuse(f) = f_a + f_b + f_c (identity weights, zero bias)."""
    dims = {m: 2 for m in "abc"}
    model = MultimodalModel({m: Identity((2,), 2) for m in "abc"}, SumFusion(dims, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def context(epoch=0, seed=0):
    return TrainContext(epoch=epoch, max_epochs=4, steps_per_epoch=1, device=torch.device("cpu"), modalities=list("abc"),
                        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=DistributedState())


# one sample, label 0: f_b = (ln 4, 0), f_a = (ln 1.5 − ln 4, 0), f_c = (ln 6, 0)
#   ⇒ a + b = (ln 1.5, 0), a + b + c = (ln 9, 0)
HAND = {"a": [[ln(1.5) - ln(4), 0.0]], "b": [[ln(4), 0.0]], "c": [[ln(6), 0.0]]}


def hand_step(slots, lam=0.5, **options):
    cml = part(modalities="abc", lam=lam, **options)
    cml.removal_order.copy_(torch.tensor(slots))
    batch = Batch({m: torch.tensor(x) for m, x in HAND.items()}, torch.tensor([0]), torch.arange(1))
    return Method([cml]).training_step(hand_model(), batch, context())


def test_removal_chain_in_the_buffers_order():
    # π = (c, a, b): z0 = a + b + c (conf 0.9), z1 = a + b (0.6), z2 = b (0.8): penalty 0 + 0.2, λ = 0.5 ⇒ 0.1
    record = hand_step([2, 0, 1])
    assert record.losses["cml_calibration"].item() == pytest.approx(0.1, abs=1e-6)
    # (1/M) CE(z0) = −ln 0.9 / 3 = 0.035120; (1/M)(CE(z1) + CE(z2)) = (−ln 0.6 − ln 0.8)/3 = 0.244657
    assert record.losses["fused"].item() == pytest.approx(0.035120, abs=1e-6)
    assert record.losses["removal"].item() == pytest.approx(0.244657, abs=1e-6)
    assert {m: record.logs[f"cml/position/{m}"] for m in "abc"} == {"c": 1.0, "a": 2.0, "b": 3.0}
    assert [record.logs[f"cml/confidence/{j}"].item() for j in range(3)] == pytest.approx([0.9, 0.6, 0.8], abs=1e-6)
    # π = (a, c, b): z1 = b + c = (ln 24, 0) (conf 24/25 = 0.96), z2 = b (0.8): penalty 0.06 ⇒ 0.03
    record = hand_step([0, 2, 1])
    assert record.losses["cml_calibration"].item() == pytest.approx(0.03, abs=1e-6)
    # (−ln 0.96 − ln 0.8)/3 = (0.040822 + 0.223144)/3 = 0.087989
    assert record.losses["removal"].item() == pytest.approx(0.087989, abs=1e-6)
    assert "cml_calibration" not in hand_step([0, 2, 1], lam=0.0).losses


def test_removal_logits_zero_the_removed_modalities():
    model = hand_model()
    features = {m: torch.tensor(x) for m, x in HAND.items()}
    steps = removal_logits(model.fuse, features, ["c", "a", "b"])
    expected = [[ln(9), 0.0], [ln(1.5), 0.0], [ln(4), 0.0]]
    assert torch.allclose(steps[:, 0], torch.tensor(expected), atol=1e-6)


def test_order_is_drawn_at_each_epoch_start_or_at_each_step_from_the_runs_generator():
    cml = part(modalities="abc")
    assert cml.removal_order.tolist() == [0, 1, 2]  # identity before the first draw
    ctx = context(seed=3)
    reference = torch.Generator().manual_seed(3)
    for epoch in range(3):
        cml.on_epoch_start(None, ctx)
        assert cml.removal_order.tolist() == torch.randperm(3, generator=reference).tolist()
    assert "removal_order" in cml.state_dict()
    expected = torch.randperm(3, generator=torch.Generator().manual_seed(3)).tolist()
    assert draw_order(3, torch.Generator().manual_seed(3)).tolist() == expected

    stepwise = part(modalities="abc", order="step")
    ctx, reference = context(seed=4), torch.Generator().manual_seed(4)
    stepwise.on_epoch_start(None, ctx)  # draws nothing in this mode
    batch = Batch({m: torch.tensor(x) for m, x in HAND.items()}, torch.tensor([0]), torch.arange(1))
    for _ in range(3):
        record = stepwise.training_step(hand_model(), batch, ctx)
        drawn = torch.randperm(3, generator=reference).tolist()
        assert stepwise.removal_order.tolist() == drawn
        assert [record.logs[f"cml/position/{m}"] for m in "abc"] == [float(drawn.index(s) + 1) for s in range(3)]


# -- the window, determinism, state ---------------------------------------------------------------
def trainer_for(spec, extra=(), overrides=TINY):
    return Trainer(build_config(overrides=[*overrides, *extra], method=spec), None, quiet=True)


def step_gradients(trainer, batch, epoch):
    trainer.ctx.epoch = epoch
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    trainer._zero_grad()
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    record.loss.backward()
    trainer._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_outside_the_window_the_step_is_joint_training_exactly():
    plain = trainer_for("joint")
    batch, weights = next(iter(plain.train_loader)), plain.model.state_dict()
    _, expected = step_gradients(plain, batch, 1)
    for spec in ("cml[modulation_starts=2]", "cml[modulation_starts=2,order=step]"):
        trainer = trainer_for(spec)
        trainer.model.load_state_dict(weights)
        record, grads = step_gradients(trainer, batch, 1)
        assert set(record.losses) == {"fused", "probe"}
        assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in grads), spec
        record, grads = step_gradients(trainer, batch, 2)
        assert {"removal", "cml_calibration"} <= set(record.losses)
        assert not torch.equal(grads["fusion.linear.weight"], expected["fusion.linear.weight"])


def run_logs(path):
    return [json.loads(line)["method"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_the_same_seed_have_the_same_trajectory(tmp_path):
    config = build_config(overrides=[*TINY3, "train.epochs=3"], method="cml")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    logs = run_logs(tmp_path / "one")
    assert logs == run_logs(tmp_path / "two") and first["test"] == second["test"]
    assert {"cml/penalty", "cml/increase_share", "cml/confidence/2", "loss/cml_calibration"} <= set(logs[0])
    positions = [tuple(line[f"cml/position/{m}"] for m in ("strong", "weak1", "weak2")) for line in logs]
    assert all(sorted(p) == [1.0, 2.0, 3.0] for p in positions)  # one order per epoch: whole positions
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["method"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["method"]
    assert torch.equal(one["parts.cml.removal_order"], two["parts.cml.removal_order"])


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    trainer = trainer_for("cml", ["train.epochs=4"], TINY3)
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    for epoch in range(2):
        trainer.ctx.epoch = epoch
        trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    order = trainer.method.parts["cml"].removal_order.tolist()
    assert order != [0, 1, 2]  # the buffer, not the identity a fresh part starts from, must carry it
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = copy.deepcopy({"model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
                           "optimizer": trainer.ctx.optimizer.state_dict()})
    expected = trainer.train_step(batches[2])

    fresh = trainer_for("cml", ["train.epochs=4"], TINY3)
    fresh.ctx.epoch = 1  # no draw of its own: the order comes from the checkpoint
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    assert fresh.method.parts["cml"].removal_order.tolist() == order
    record = fresh.train_step(batches[2])
    assert record.loss.item() == expected.loss.item()
    assert record.logs["cml/penalty"].item() == expected.logs["cml/penalty"].item()


# -- runs with plugins, M = 2 and 3 ------------------------------------------------------------------
@pytest.mark.parametrize("spec,overrides", [
    ("cml+arl[modulation_starts=0]", TINY), ("cml+arl[modulation_starts=0]", TINY3),
    ("cml+ogm_ge", TINY), ("cml[order=step,variant=bmm]", TINY3),
])
def test_two_epoch_runs(spec, overrides, tmp_path):
    metrics = train_run(build_config(overrides=overrides, method=spec), tmp_path / "r", quiet=True)
    logs = run_logs(tmp_path / "r")
    assert len(logs) == 2 and all(math.isfinite(v) for line in logs for v in line.values())
    modalities = 3 if overrides is TINY3 else 2
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    assert len([k for k in logs[-1] if k.startswith("cml/confidence/")]) == modalities
    if "arl" in spec:
        assert logs[-1]["arl/accelerating"] == 1.0 and "loss/arl_unimodal" in logs[-1]
