"""MBSD (an objective): the spec's weight example, L_RS and L_KL and their gradients on hand logits, the
bmm variant, M = 3 pair averaging, the whole loss of a hand model, the window, determinism, state round
trips, and runs with plugins (arl, ogm_ge) for M = 2 and 3."""

import copy
import json
import math

import pytest
import torch

import mmbalance.methods.mbsd  # noqa: F401  (registers "mbsd")
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.compose import Method, resolve
from mmbalance.methods.mbsd import (
    bmm_divergence,
    distillation_divergence,
    first_teaches,
    mbsd_losses,
    modality_pairs,
    pair_weights,
    representation_distance,
)
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

# Hand logits, C = 2, every label 0 (so p[y] is the first probability):
#   sample 0: a = (ln 9, 0)   → p_a = (0.9, 0.1) right;  b = (0, ln 7/3) → p_b = (0.3, 0.7) wrong  ⇒ w = 0.6, a teaches
#   sample 1: a = (0, ln 3)   → p_a = (0.25, 0.75) wrong; b = (0, ln 4)  → p_b = (0.2, 0.8) wrong   ⇒ w = 0 (not 0.05)
#   sample 2: a = (0, ln 1.5) → p_a = (0.4, 0.6) wrong;  b = (ln 4, 0)   → p_b = (0.8, 0.2) right   ⇒ w = 0.4, b teaches
A = [[ln(9), 0.0], [0.0, ln(3)], [0.0, ln(1.5)]]
B = [[0.0, ln(7 / 3)], [0.0, ln(4)], [ln(4), 0.0]]
LABELS = torch.zeros(3, dtype=torch.long)


def hand_logits(*rows):
    return torch.tensor([*rows], requires_grad=True)


def part(name="mbsd", modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


# -- "Test it by": p_a[y] = 0.9 (right), p_b[y] = 0.3 ⇒ w = 0.6; both wrong ⇒ w = 0 --------------------------
def test_weight_of_the_spec_example_and_zero_when_both_are_wrong():
    weights = pair_weights(hand_logits(A, B), LABELS)
    assert weights.shape == (1, 3)
    assert weights[0].tolist() == pytest.approx([0.6, 0.0, 0.4], abs=1e-6)
    assert first_teaches(hand_logits(A, B), LABELS)[0].tolist() == [True, True, False]


def test_kl_and_rs_terms_and_their_gradients_by_hand():
    u = hand_logits(A, B)
    terms = mbsd_losses(u, LABELS)
    # KL(p_strong ‖ p_weak), per sample:
    #   0: 0.9 ln(0.9/0.3) + 0.1 ln(0.1/0.7) = 0.988751 − 0.194591 = 0.794160 (teacher a)
    #   2: 0.8 ln(0.8/0.4) + 0.2 ln(0.2/0.6) = 0.554518 − 0.219722 = 0.334795 (teacher b)
    # L_KL = (0.6 · 0.794160 + 0 + 0.4 · 0.334795) / 3 = (0.476496 + 0.133918) / 3 = 0.203471
    kl = distillation_divergence(u, LABELS)[0]
    assert kl[0].item() == pytest.approx(0.794160, abs=1e-6) and kl[2].item() == pytest.approx(0.334795, abs=1e-6)
    assert terms["kl"].item() == pytest.approx(0.203471, abs=1e-6)
    # (1/C)‖d_a − d_b‖²: 0: ((ln 9)² + (ln 7/3)²)/2 = (4.827796 + 0.717914)/2 = 2.772855
    #                    2: ((ln 4)² + (ln 1.5)²)/2 = (1.921812 + 0.164402)/2 = 1.043107
    # L_RS = (0.6 · 2.772855 + 0.4 · 1.043107) / 3 = (1.663713 + 0.417243) / 3 = 0.693652
    rs = representation_distance(u)[0]
    assert rs[0].item() == pytest.approx(2.772855, abs=1e-5) and rs[2].item() == pytest.approx(1.043107, abs=1e-5)
    assert terms["rs"].item() == pytest.approx(0.693652, abs=1e-5)
    # the teacher is a constant: ∂L_KL/∂d_student = (w/B)(p_student − p_teacher), nothing reaches the teacher
    #   sample 0 (student b): 0.6/3 · ((0.3, 0.7) − (0.9, 0.1)) = (−0.12, 0.12)
    #   sample 2 (student a): 0.4/3 · ((0.4, 0.6) − (0.8, 0.2)) = (−0.053333, 0.053333); sample 1 (w = 0): none
    terms["kl"].backward()
    expected = torch.zeros(2, 3, 2)
    expected[1, 0] = torch.tensor([-0.12, 0.12])
    expected[0, 2] = torch.tensor([-0.4 / 3 * 0.4, 0.4 / 3 * 0.4])
    assert torch.allclose(u.grad, expected, atol=1e-6)


def test_teacher_gets_gradient_when_not_detached_and_weights_when_asked():
    u = hand_logits(A, B)
    mbsd_losses(u, LABELS, detach_teacher=False)["kl"].backward()
    assert u.grad[0, 0].abs().sum() > 0  # sample 0's teacher (a) now moves too
    u = hand_logits(A, B)
    mbsd_losses(u, LABELS, detach_weight=False)["rs"].backward()
    detached = hand_logits(A, B)
    mbsd_losses(detached, LABELS)["rs"].backward()
    assert not torch.allclose(u.grad, detached.grad)  # the gradient through w adds to the distance's own


def test_rs_on_probabilities_and_sample_weights():
    u = hand_logits(A, B)
    # (1/C)‖p_a − p_b‖²: 0: (0.6² + 0.6²)/2 = 0.36; 2: (0.4² + 0.4²)/2 = 0.16
    #   ⇒ (0.6 · 0.36 + 0.4 · 0.16)/3 = 0.093333
    assert mbsd_losses(u, LABELS, rs_space="probabilities")["rs"].item() == pytest.approx(0.093333, abs=1e-6)
    # a plugin's per-sample weights (2, 1, 0) scale each sample's term: 2 · 0.6 · 2.772855 / 3 = 1.109142
    weighted = mbsd_losses(u, LABELS, sample_weight=torch.tensor([2.0, 1.0, 0.0]))
    assert weighted["rs"].item() == pytest.approx(1.109142, abs=1e-5)


def test_bmm_variant_is_pw_times_log_pw_minus_ps_on_true_class_probabilities():
    u = hand_logits(A, B)
    # p_w (ln p_w − p_s): 0: 0.3 (ln 0.3 − 0.9) = −0.631192; 2: 0.4 (ln 0.4 − 0.8) = −0.686516
    # weighted: (0.6 · −0.631192 + 0.4 · −0.686516) / 3 = −0.217774 — negative, so not a KL
    per_sample = bmm_divergence(u, LABELS)[0]
    assert per_sample[0].item() == pytest.approx(-0.631192, abs=1e-6)
    assert mbsd_losses(u, LABELS, variant="bmm")["kl"].item() == pytest.approx(-0.217774, abs=1e-6)


def test_three_modalities_average_the_three_pairs():
    assert [t.tolist() for t in modality_pairs(3)] == [[0, 0, 1], [1, 2, 2]]
    # c = b: pair (a, c) repeats (a, b), pair (b, c) has w = 0 ⇒ each term is 2/3 of the two-modality one
    # L_KL = 2/3 · 0.203471 = 0.135647, L_RS = 2/3 · 0.693652 = 0.462435 (a sum over pairs would give 3/2 times more)
    terms = mbsd_losses(hand_logits(A, B, B), LABELS)
    assert terms["weight"].shape == (3, 3)
    assert terms["weight"][2].tolist() == [0.0, 0.0, 0.0]
    assert terms["kl"].item() == pytest.approx(0.135647, abs=1e-6)
    assert terms["rs"].item() == pytest.approx(0.462435, abs=1e-5)


# -- the objective on a hand model --------------------------------------------------------------------
class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """f_m = x_m and fuse(f) = f_a + f_b (identity weights, zero bias): d_m = f_m exactly."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def context(epoch=0):
    return TrainContext(epoch=epoch, max_epochs=4, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"],
                        num_classes=2, generator=torch.Generator().manual_seed(0), dist=DistributedState())


def test_whole_loss_of_a_hand_model():
    batch = Batch({"a": torch.tensor(A), "b": torch.tensor(B)}, LABELS, torch.arange(3))
    record = Method([part()]).training_step(hand_model(), batch, context())
    assert set(record.losses) == {"fused", "probe", "unimodal", "mbsd_rs", "mbsd_kl"}
    # CE(z), z = a + b: 0: p0 = 9/(9 + 7/3) = 27/34 ⇒ 0.230524; 1: (0, ln 12) ⇒ ln 13 = 2.564949;
    #   2: (ln 4, ln 1.5) ⇒ ln(5.5/4) = 0.318454; mean 1.037976
    assert record.losses["fused"].item() == pytest.approx(1.037976, abs=1e-5)
    # Σ_m CE(d_m): a: (−ln 0.9 − ln 0.25 − ln 0.4)/3 = 0.802649; b: (−ln 0.3 − ln 0.2 − ln 0.8)/3 = 1.012185
    assert record.losses["unimodal"].item() == pytest.approx(1.814834, abs=1e-5)
    assert record.losses["mbsd_rs"].item() == pytest.approx(0.693652, abs=1e-5)
    assert record.losses["mbsd_kl"].item() == pytest.approx(0.203471, abs=1e-6)
    # a teaches in sample 0, b in sample 2: 1/3 of each one's pair-samples; 2 of 3 samples distilled
    assert record.logs["mbsd/teaches/a"].item() == pytest.approx(1 / 3)
    assert record.logs["mbsd/teaches/b"].item() == pytest.approx(1 / 3)
    assert record.logs["mbsd/active"].item() == pytest.approx(2 / 3)
    assert record.logs["mbsd/weight"].item() == pytest.approx(1 / 3, abs=1e-6)  # (0.6 + 0.4)/3
    # the options weight their terms
    record = Method([part(rs_weight=2.0, kl_weight=0.0, unimodal_weight=0.5)]).training_step(hand_model(), batch, context())
    assert "mbsd_kl" not in record.losses
    assert record.losses["mbsd_rs"].item() == pytest.approx(2 * 0.693652, abs=1e-5)
    assert record.losses["unimodal"].item() == pytest.approx(0.5 * 1.814834, abs=1e-5)


def test_heads_option_distils_the_unimodal_heads_and_trains_them():
    model = hand_model()
    with torch.no_grad():  # heads = identity too: u_m = f_m, the same hand values as d_m
        for head in model.unimodal_heads.values():
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
        model.fusion.linears["b"].weight.mul_(3.0)  # d_b would now differ: the heads must be what is read
    batch = Batch({"a": torch.tensor(A), "b": torch.tensor(B)}, LABELS, torch.arange(3))
    record = Method([part(score_logits="heads")]).training_step(model, batch, context())
    assert "probe" not in record.losses
    assert record.losses["mbsd_kl"].item() == pytest.approx(0.203471, abs=1e-6)
    record.loss.backward()
    assert model.unimodal_heads["a"].weight.grad.abs().sum() > 0


def test_two_objectives_are_refused():
    with pytest.raises(ConfigError, match="two objectives"):
        resolve("midas+mbsd")


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
    for spec in ("mbsd[modulation_starts=2]", "mbsd[modulation_starts=2,score_logits=heads]"):
        trainer = trainer_for(spec)
        trainer.model.load_state_dict(weights)
        record, grads = step_gradients(trainer, batch, 1)
        assert set(record.losses) == {"fused", "probe"}
        assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in grads), spec
        record, grads = step_gradients(trainer, batch, 2)  # inside: the encoders feel the new terms
        assert {"unimodal", "mbsd_rs", "mbsd_kl"} <= set(record.losses)
        assert not torch.equal(grads["encoders.weak.net.1.weight"], expected["encoders.weak.net.1.weight"])


def run_logs(path):
    return [json.loads(line)["method"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_the_same_seed_have_the_same_trajectory(tmp_path):
    config = build_config(overrides=TINY, method="mbsd")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    logs = run_logs(tmp_path / "one")
    assert logs == run_logs(tmp_path / "two") and first["test"] == second["test"]
    assert {"mbsd/score/strong", "mbsd/teaches/weak", "mbsd/weight", "loss/mbsd_kl"} <= set(logs[0])
    assert all(math.isfinite(v) for line in logs for v in line.values())


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    trainer = trainer_for("mbsd", ["train.epochs=4"])
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    trainer.ctx.epoch = 1
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = copy.deepcopy({"model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
                           "optimizer": trainer.ctx.optimizer.state_dict()})
    expected = trainer.train_step(batches[2])
    fresh = trainer_for("mbsd", ["train.epochs=4"])
    fresh.ctx.epoch = 1
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    record = fresh.train_step(batches[2])
    assert record.loss.item() == expected.loss.item()
    for key in ("mbsd/weight", "mbsd/score/strong", "mbsd/teaches/weak"):
        assert record.logs[key].item() == expected.logs[key].item(), key


# -- runs with plugins, M = 2 and 3 ------------------------------------------------------------------
@pytest.mark.parametrize("spec,overrides", [
    ("mbsd+arl[modulation_starts=0]", TINY), ("mbsd+arl[modulation_starts=0]", TINY3),
    ("mbsd+ogm_ge", TINY), ("mbsd[variant=bmm,rs_space=probabilities,score_logits=heads]", TINY3),
])
def test_two_epoch_runs(spec, overrides, tmp_path):
    metrics = train_run(build_config(overrides=overrides, method=spec), tmp_path / "r", quiet=True)
    logs = run_logs(tmp_path / "r")
    assert len(logs) == 2 and all(math.isfinite(v) for line in logs for v in line.values())
    modalities = 3 if overrides is TINY3 else 2
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    assert len([k for k in logs[-1] if k.startswith("mbsd/teaches/")]) == modalities
    if "arl" in spec:
        assert logs[-1]["arl/accelerating"] == 1.0 and "loss/arl_unimodal" in logs[-1]
