"""DGL (an objective): the spec's hand values (fused path, unimodal paths, encoder gradients, logged total),
the bias-corrected variant, three modalities, which loss trains which parameter group (bit for bit after
the trainer's averaging and clipping, and what triggered clipping does), the §16 checks, DGL with ARL
and with OGM-GE, and two-epoch runs with two and three modalities."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbalance.methods.dgl  # noqa: F401  (registration)
import mmbalance.methods.ogm_ge  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.dgl import constant_fusion, dgl_logits, dgl_loss
from mmbalance.models import Encoder
from mmbalance.models.fusion import ConcatFusion
from mmbalance.models.multimodal import MultimodalModel, zero_out
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
TINY3 = [o for o in TINY if not o.startswith("synthetic.dims")] + ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def tiny(modalities=2):
    return TINY if modalities == 2 else TINY3


# -- the spec's hand model ------------------------------------------------------------------------
class Scale(Encoder):
    """f = w · x with w = 1: ∂L/∂w = ∂L/∂f · x, so with x = 1 the encoder's gradient is the feature's."""

    def __init__(self):
        super().__init__((1,), 1)
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


def hand_model(modalities=("a", "v"), weight=((1.0, 0.0), (0.0, 1.0)), bias=(0.0, 0.0)):
    """D_m = 1, C = 2, concat fusion z = W [f_a, f_v] + b; the unimodal heads are the probes (random)."""
    torch.manual_seed(0)
    model = MultimodalModel({m: Scale() for m in modalities}, ConcatFusion({m: 1 for m in modalities}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor(weight))
        model.fusion.linear.bias.copy_(torch.tensor(bias))
    return model


def hand_batch(modalities=("a", "v"), weight=None):
    """f_m = 1 for every modality, y = 0, one sample."""
    return Batch({m: torch.ones(1, 1) for m in modalities}, torch.tensor([0]), torch.arange(1), weight=weight)


def context(model, epoch=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=list(model.modalities),
        num_classes=2, generator=torch.Generator().manual_seed(0), dist=DistributedState(),
        params=ParameterGroups.of(model),
    )


def dgl(modalities=("a", "v"), num_classes=2, **options):
    cls = METHODS.get("dgl")
    return cls(cls.Config(**options), list(modalities), num_classes)


def hand_step(modalities=("a", "v"), model=None, batch=None, **options):
    model = model or hand_model(modalities)
    method = Method([dgl(modalities, **options)])
    record = method.training_step(model, batch or hand_batch(modalities), context(model))
    return model, record


def ce(logit_gap):
    """CE of two logits when the true class leads by ``logit_gap``: ln(1 + e^−gap)."""
    return math.log1p(math.exp(-logit_gap))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Spec: W = I, b = 0, f_a = f_v = 1, y = 0, α = 4.
# Fused: z̄ = [1, 1], L_fus = ln 2 = 0.693147; p − y = [0.5 − 1, 0.5] = [−0.5, 0.5];
# ∂W = (p − y) [f_a, f_v]ᵀ = [[−0.5, −0.5], [0.5, 0.5]], ∂b = [−0.5, 0.5].
# Unimodal: v_a = W[:, a] = [1, 0], CE = ln(1 + e^−1) = 0.313262; v_v = [0, 1], CE = ln(1 + e) = 1.313262.
# ∂f_a = α (σ(1) − 1) · W[0, a] = 4 · (−0.268941) = −1.075766;
# ∂f_v = α · p_v[1] · W[1, v] = 4 · σ(1) = 2.924234.
# Logged total: 0.693147 + 4 · (0.313262 + 1.313262) = 7.199241.
L_FUS = math.log(2)
CE_A, CE_V = ce(1), ce(-1)
GRAD_F_A, GRAD_F_V = 4 * (sigmoid(1) - 1), 4 * sigmoid(1)
TOTAL = 7.199241


def test_hand_fused_path_trains_the_fusion_head_only():
    model, record = hand_step()
    assert record.losses["fusion"].item() == pytest.approx(0.693147, abs=1e-6)
    assert torch.equal(record.logits, torch.tensor([[1.0, 1.0]]))
    record.loss.backward()
    linear = model.fusion.linear
    # these are the final fusion gradients: nothing but L_fus reaches the fusion head
    assert torch.allclose(linear.weight.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.5]]), atol=1e-7, rtol=0)
    assert torch.allclose(linear.bias.grad, torch.tensor([-0.5, 0.5]), atol=1e-7, rtol=0)


def test_hand_unimodal_paths_read_the_fusion_head_with_one_modality_kept():
    model, record = hand_step()
    v = record.zeroed_logits()
    assert torch.equal(v[0], torch.tensor([[1.0, 0.0]])) and torch.equal(v[1], torch.tensor([[0.0, 1.0]]))
    assert record.logs["dgl/unimodal_loss/a"].item() == pytest.approx(0.313262, abs=1e-6)
    assert record.logs["dgl/unimodal_loss/v"].item() == pytest.approx(1.313262, abs=1e-6)
    assert record.losses["unimodal"].item() == pytest.approx(4 * (CE_A + CE_V), abs=1e-5)


def test_hand_encoder_gradients_come_from_the_unimodal_losses_alone():
    model, record = hand_step()
    encoders = [model.encoders[m].w for m in "av"]
    # the fused term has no path to any encoder, the unimodal term none to the fusion head
    assert torch.autograd.grad(record.losses["fusion"], encoders, retain_graph=True, allow_unused=True) == (None, None)
    fusion = list(model.fusion.parameters())
    assert all(g is None for g in torch.autograd.grad(record.losses["unimodal"], fusion, retain_graph=True, allow_unused=True))
    record.loss.backward()
    assert model.encoders["a"].w.grad.item() == pytest.approx(-1.075766, abs=1e-6)
    assert model.encoders["v"].w.grad.item() == pytest.approx(2.924234, abs=1e-6)
    assert GRAD_F_A == pytest.approx(-1.075766, abs=1e-6) and GRAD_F_V == pytest.approx(2.924234, abs=1e-6)


def test_hand_logged_total():
    _, record = hand_step()
    assert record.logs["dgl/total"].item() == pytest.approx(TOTAL, abs=1e-5)
    total = record.losses["fusion"] + record.losses["unimodal"]
    assert total.item() == pytest.approx(L_FUS + 4 * (CE_A + CE_V), abs=1e-5)
    # the trainer's loss adds the detached probes, which train the unimodal heads only
    assert record.loss.item() == pytest.approx(total.item() + record.losses["probe"].item(), abs=1e-5)


def test_alpha_weights_the_unimodal_term_only():
    # α = 1: the unimodal term is CE_a + CE_v = 1.626523, the encoder gradient a quarter of α = 4's
    model, record = hand_step(alpha=1.0)
    assert record.losses["unimodal"].item() == pytest.approx(CE_A + CE_V, abs=1e-6)
    assert record.losses["fusion"].item() == pytest.approx(L_FUS, abs=1e-6)
    record.loss.backward()
    assert model.encoders["a"].w.grad.item() == pytest.approx(GRAD_F_A / 4, abs=1e-6)
    assert torch.allclose(model.fusion.linear.bias.grad, torch.tensor([-0.5, 0.5]), atol=1e-7, rtol=0)


def test_sample_weights_a_plugin_sets_weigh_both_terms():
    # per-sample weight 3 on the single sample: both terms triple (mean of weighted per-sample CE)
    _, record = hand_step(batch=hand_batch(weight=torch.tensor([3.0])))
    assert record.losses["fusion"].item() == pytest.approx(3 * L_FUS, abs=1e-5)
    assert record.losses["unimodal"].item() == pytest.approx(3 * 4 * (CE_A + CE_V), abs=1e-5)


# bias_corrected, with b = [1, 0] so that it differs from the code's v_m (W = I, f = 1, y = 0, α = 4):
# zeroed v_a = [1 + 1, 0] = [2, 0], v_v = [1, 1]; fuse(f^∅) = b = [1, 0];
# d_a = v_a − ½ b = [1.5, 0], d_v = [0.5, 1] (d_a + d_v = [2, 1] = z).
# CE(d_a) = ln(1 + e^−1.5) = 0.201413, CE(d_v) = ln(1 + e^0.5) = 0.974077;
# ∂f_a = 4 (σ(1.5) − 1) = −0.729702, ∂f_v = 4 σ(0.5) = 2.489837.
# The code's variant on the same head: CE(v_a) = ln(1 + e^−2) = 0.126928, CE(v_v) = ln 2.
# The fused path is the same in both: z̄ = [2, 1], L_fus = ln(1 + e^−1) = 0.313262, ∂b = [σ(1) − 1, 1 − σ(1)].
def test_bias_corrected_variant_uses_d_m():
    model = hand_model(bias=(1.0, 0.0))
    _, record = hand_step(model=model, variant="bias_corrected")
    assert torch.allclose(record.restricted_logits()[:, 0], torch.tensor([[1.5, 0.0], [0.5, 1.0]]))
    assert record.logs["dgl/unimodal_loss/a"].item() == pytest.approx(0.201413, abs=1e-6)
    assert record.logs["dgl/unimodal_loss/v"].item() == pytest.approx(0.974077, abs=1e-6)
    assert record.losses["fusion"].item() == pytest.approx(0.313262, abs=1e-6)
    record.loss.backward()
    assert model.encoders["a"].w.grad.item() == pytest.approx(-0.729702, abs=1e-6)
    assert model.encoders["v"].w.grad.item() == pytest.approx(2.489837, abs=1e-6)
    assert torch.allclose(model.fusion.linear.bias.grad, torch.tensor([sigmoid(1) - 1, 1 - sigmoid(1)]), atol=1e-7)

    _, code = hand_step(model=hand_model(bias=(1.0, 0.0)))
    assert code.logs["dgl/unimodal_loss/a"].item() == pytest.approx(0.126928, abs=1e-6)
    assert code.logs["dgl/unimodal_loss/v"].item() == pytest.approx(math.log(2), abs=1e-6)


# M = 3 (a, v, t), D_m = 1, W = [[1, 0, 2], [0, 1, 0]], b = 0, f = 1, y = 0, α = 4.
# Fused: z̄ = [3, 1], L_fus = ln(1 + e^−2) = 0.126928, p − y = [σ(2) − 1, 1 − σ(2)] = [−0.119203, 0.119203],
# ∂W = (p − y) [1, 1, 1]ᵀ. Unimodal: v_a = [1, 0] (0.313262), v_v = [0, 1] (1.313262), v_t = [2, 0] (0.126928);
# L_uni = 4 · 1.753452 = 7.013806. ∂f_a = −1.075766, ∂f_v = 2.924234, ∂f_t = 4 (σ(2) − 1) · 2 = −0.953623.
def test_three_modalities_by_hand():
    modalities = ("a", "v", "t")
    model = hand_model(modalities, weight=((1.0, 0.0, 2.0), (0.0, 1.0, 0.0)))
    _, record = hand_step(modalities, model=model)
    assert record.losses["fusion"].item() == pytest.approx(0.126928, abs=1e-6)
    assert record.losses["unimodal"].item() == pytest.approx(7.013806, abs=1e-5)
    for m, value in zip(modalities, (0.313262, 1.313262, 0.126928)):
        assert record.logs[f"dgl/unimodal_loss/{m}"].item() == pytest.approx(value, abs=1e-6)
    record.loss.backward()
    for m, value in zip(modalities, (-1.075766, 2.924234, -0.953623)):
        assert model.encoders[m].w.grad.item() == pytest.approx(value, abs=1e-6), m
    expected = torch.tensor([[-0.119203] * 3, [0.119203] * 3])
    assert torch.allclose(model.fusion.linear.weight.grad, expected, atol=1e-6, rtol=0)


def test_plain_functions_match_the_objective():
    model = hand_model(bias=(1.0, 0.0))
    for variant in ("zeroed", "bias_corrected"):
        _, record = hand_step(model=model, variant=variant)
        features = {m: torch.ones(1, 1) for m in "av"}
        fused, unimodal = dgl_logits(model.fusion, features, ["a", "v"], variant)
        fusion_loss, unimodal_loss, per_modality = dgl_loss(fused, unimodal, torch.tensor([0]), 4.0)
        assert torch.equal(fusion_loss, record.losses["fusion"].detach())
        assert torch.equal(unimodal_loss, record.losses["unimodal"].detach())
        assert per_modality.tolist() == [record.logs[f"dgl/unimodal_loss/{m}"].item() for m in "av"]


def test_constant_fusion_sends_no_gradient_to_the_head():
    model = hand_model()
    features = {m: torch.ones(1, 1, requires_grad=True) for m in "av"}
    out = constant_fusion(model.fusion)(features)
    assert torch.equal(out, model.fusion(features))
    out.sum().backward()
    assert all(p.grad is None for p in model.fusion.parameters())
    assert features["a"].grad.tolist() == [[1.0]] and features["v"].grad.tolist() == [[1.0]]


def test_prediction_is_the_fusion_head_unchanged():
    model = hand_model(bias=(1.0, 0.0))
    method = Method([dgl()])
    features = {m: torch.ones(2, 1) for m in "av"}
    assert torch.equal(method.predict_from_features(model, features), model.fuse(features))


def test_options_and_defaults():
    config = build_config(overrides=TINY, method="dgl")
    assert config.train.grad_clip == 40.0  # the authors' clipping
    assert config.section("dgl").alpha == 4.0 and config.section("dgl").variant == "zeroed"
    with pytest.raises(ConfigError):
        build_config(overrides=[*TINY, "dgl.alpha=-1"], method="dgl")
    with pytest.raises(ConfigError):
        build_config(overrides=[*TINY, "dgl.variant=code"], method="dgl")


# -- which loss trains which parameter group, through the trainer -----------------------------------
def trainer_for(spec="dgl", extra=(), modalities=2):
    return Trainer(build_config(overrides=[*tiny(modalities), *extra], method=spec), None, quiet=True)


def own_gradients(trainer, record):
    """Every parameter group's gradient from its own loss alone, built anew from the step's features.

    Fusion: CE(fusion(sg f), y); encoder m: α CE(fusion(f^{m}), y); heads m: CE(head_m(sg f_m), y). The
    fusion head is live here: only the gradients with respect to each group's own parameters are taken.
    """
    model, params = trainer.model, trainer.ctx.params
    features, labels = record.features, record.labels
    alpha = trainer.method.objective.config.alpha
    detached = {m: f.detach() for m, f in features.items()}

    def grads(loss, group):
        return list(torch.autograd.grad(loss, group, retain_graph=True, allow_unused=True))

    out = {"fusion": grads(F.cross_entropy(model.fusion(detached), labels), params.fusion)}
    for m in trainer.bundle.modalities:
        out[f"encoder/{m}"] = grads(alpha * F.cross_entropy(model.fusion(zero_out(features, [m])), labels), params.encoder[m])
        out[f"heads/{m}"] = grads(F.cross_entropy(model.unimodal_heads[m](detached[m]), labels), params.heads[m])
    return out


def groups(trainer):
    params = trainer.ctx.params
    out = {"fusion": params.fusion}
    for m in trainer.bundle.modalities:
        out[f"encoder/{m}"] = params.encoder[m]
        out[f"heads/{m}"] = params.heads[m]
    return out


def step_until_backward(trainer):
    """A ``train_step`` split open: forward, the reference gradients, backward, averaging, hooks, clipping."""
    batch = next(iter(trainer.train_loader))
    trainer._zero_grad()
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    expected = own_gradients(trainer, record)
    record.loss.backward()
    trainer._finish_gradients(record)
    return record, expected


@pytest.mark.parametrize("modalities", [2, 3])
def test_each_group_gets_its_own_loss_gradient_bit_for_bit(modalities):
    trainer = trainer_for(modalities=modalities)  # grad_clip = 40, the authors' threshold
    record, expected = step_until_backward(trainer)
    every = [p for p in trainer.parameters if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in every]))
    assert total < trainer.config.train.grad_clip  # clipping ran and did not trigger
    assert set(map(id, every)) == set(map(id, trainer.parameters))  # every group is trained
    for name, params in groups(trainer).items():
        for p, g in zip(params, expected[name]):
            assert g is not None and torch.equal(p.grad, g), name


def test_triggered_clipping_scales_every_group_by_one_factor():
    # clip_grad_norm_ over all parameters (encoders, fusion, probe heads): every gradient × c,
    # c = clip / (‖g‖ + 1e-6) with ‖g‖ the global norm of the unclipped gradients
    trainer = trainer_for(extra=["train.grad_clip=0.01"])
    record, expected = step_until_backward(trainer)
    unclipped = [g for name in groups(trainer) for g in expected[name]]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped]))
    assert norm > 0.01
    factor = 0.01 / (norm + 1e-6)
    for name, params in groups(trainer).items():
        for p, g in zip(params, expected[name]):
            assert torch.allclose(p.grad, g * factor, rtol=1e-5, atol=1e-12), name
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.parameters]))
    assert clipped.item() == pytest.approx(0.01, rel=1e-4)


def test_one_train_step_moves_each_group_by_its_own_gradient():
    # SGD without momentum or decay: θ' = θ − lr g, g the group's own loss gradient
    trainer = trainer_for(extra=["train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr=0.1"])
    before = {name: [p.detach().clone() for p in params] for name, params in groups(trainer).items()}
    batch = next(iter(trainer.train_loader))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    expected = own_gradients(trainer, record)
    trainer._zero_grad()
    trainer.train_step(batch)
    for name, params in groups(trainer).items():
        for p, old, g in zip(params, before[name], expected[name]):
            assert torch.allclose(p.detach(), old - 0.1 * g, rtol=0, atol=1e-7), name


# -- §16: determinism, state round trip ----------------------------------------------------------
def history(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


@pytest.mark.parametrize("modalities", [2, 3])
def test_two_epoch_runs_are_finite_and_deterministic(modalities, tmp_path):
    config = build_config(overrides=tiny(modalities), method="dgl")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    lines = history(tmp_path / "one")
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    for m in first["modalities"]:
        assert math.isfinite(lines[-1]["method"][f"dgl/unimodal_loss/{m}"])
    assert math.isfinite(lines[-1]["method"]["loss/fusion"]) and "loss/unimodal" in lines[-1]["method"]
    assert lines == history(tmp_path / "two")
    assert first["val"] == second["val"] and first["test"] == second["test"]
    assert len(first["test"]["modality_accuracy"]) == modalities


def snapshot(trainer):
    return copy.deepcopy({
        "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "generator": trainer.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


def restore(trainer, state):
    trainer.model.load_state_dict(state["model"])
    trainer.method.load_state_dict(state["method"])
    for k, o in trainer.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    trainer.ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    trainer = trainer_for()
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = snapshot(trainer)
    expected = trainer.train_step(batches[2])
    after = [p.detach().clone() for p in trainer.parameters]

    fresh = trainer_for()
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)
    restore(fresh, saved)
    again = fresh.train_step(batches[2])
    assert {k: v.item() for k, v in again.losses.items()} == {k: v.item() for k, v in expected.losses.items()}
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters, after))


# -- with plugins ----------------------------------------------------------------------------------
def test_with_arl_the_fusion_head_still_learns_from_the_fused_loss_alone():
    # ARL's unimodal term γ Σ CE(fuse(f^{m})) goes through the record's fusion head, held constant in DGL:
    # with variant=zeroed it is DGL's own v_m, so encoder m's gradient becomes (1 + w_m)(α + γ)/α times
    # plain DGL's (ARL's hook scales all that reaches f_m); the fusion and probe heads keep DGL's exactly
    plain, modulated = trainer_for("dgl"), trainer_for("dgl+arl[modulation_starts=0]")
    modulated.model.load_state_dict(plain.model.state_dict())
    step_until_backward(plain)
    record, _ = step_until_backward(modulated)
    assert record.logs["arl/accelerating"] == 1.0
    for name in ["fusion", *[f"heads/{m}" for m in plain.bundle.modalities]]:
        for p, q in zip(groups(modulated)[name], groups(plain)[name]):
            assert torch.equal(p.grad, q.grad), name
    alpha, gamma = 4.0, 4.0
    for m in plain.bundle.modalities:
        weight = record.logs[f"arl/weight/{m}"]
        assert 0 < weight < 1
        for p, q in zip(modulated.ctx.params.encoder[m], plain.ctx.params.encoder[m]):
            assert torch.allclose(p.grad, q.grad * (1 + weight) * (alpha + gamma) / alpha, rtol=1e-4, atol=1e-7), m


def test_with_ogm_the_dominant_encoders_unimodal_gradient_is_scaled():
    # OGM (no noise) multiplies encoder m's weight gradients by k_m: in DGL that is k_m × α ∂CE(v_m);
    # biases, the fusion head and the probe heads keep their own losses' gradients exactly
    trainer = trainer_for("dgl+ogm_ge[variant=OGM,alpha=5]")
    record, expected = step_until_backward(trainer)
    coefficients = record.shared["ogm_ge/coefficients"]
    assert coefficients.min() < 1  # one modality is slowed
    for name in ["fusion", *[f"heads/{m}" for m in trainer.bundle.modalities]]:
        for p, g in zip(groups(trainer)[name], expected[name]):
            assert torch.equal(p.grad, g), name
    for slot, m in enumerate(trainer.bundle.modalities):
        for p, g in zip(trainer.ctx.params.encoder[m], expected[f"encoder/{m}"]):
            assert torch.equal(p.grad, g * coefficients[slot] if g.ndim >= 2 else g), m


@pytest.mark.parametrize("spec", ["dgl+arl[modulation_starts=0]", "dgl+ogm_ge"])
@pytest.mark.parametrize("modalities", [2, 3])
def test_two_epoch_runs_with_plugins(spec, modalities, tmp_path):
    config = build_config(overrides=tiny(modalities), method=spec)
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = history(tmp_path / "r")
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= metrics["test"]["accuracy"] <= 1
