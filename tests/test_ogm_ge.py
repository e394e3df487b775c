"""OGM-GE (a plugin): the coefficient and the discrepancy ratios by hand, scaling and GE noise on hand-set
gradients, the window, determinism, resume, composition with MIDAS, and full runs (BASELINES §2, §16)."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import mmbalance.methods.ogm_ge  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.discrepancy import discrepancy_ratios
from mmbalance.methods.ogm_ge import modulate_, ogm_coefficients, step_seed
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.parameters import ParameterGroups
from mmbalance.models.readouts import modality_scores
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log
K_HAND = 1 - math.tanh(1.0)  # 0.238406: s_a = 2 s_v, α = 0.5 -> ρ_a = 2, k_a = 1 − tanh(0.5 · 2)
TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def part(name, modalities=("a", "v"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def joint_ogm(**options):
    return Method([part("joint"), part("ogm_ge", **options)])


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """Identity encoders and a summing head with identity weights and no bias: d_m = f_m = the inputs."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "av"}, SumFusion({"a": 2, "v": 2}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def hand_batch():
    """Both labels 0. a: logits (ln 4, 0) -> p(y) = 0.8; v: (ln 2/3, 0) -> p(y) = 0.4. s_a = 1.6 = 2 s_v."""
    inputs = {"a": torch.tensor([[LN(4), 0.0]] * 2), "v": torch.tensor([[LN(2 / 3), 0.0]] * 2)}
    return Batch(inputs, torch.tensor([0, 0]), torch.arange(2))


def hand_params(dtype=torch.float32):
    """Encoder tensors with hand-set gradients of ones: a 2-D weight, a 1-D bias, a 4-D kernel per modality."""
    params = {}
    for m in "av":
        shapes = [(64, 64), (64,), (8, 4, 3, 3)]
        params[m] = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        for p in params[m]:
            p.grad = torch.ones_like(p)
    return params


def context(params=None, epoch=0, seed=0):
    groups = ParameterGroups(encoder=params or {}, heads={}, fusion=[])
    return TrainContext(
        epoch=epoch, max_epochs=60, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "v"],
        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=DistributedState(), params=groups,
    )


def hand_step(plugin_options, params, epoch=0, seed=0):
    """joint+ogm_ge on the hand batch: forward, then after_backward on the hand-set gradients."""
    method = joint_ogm(**plugin_options)
    ctx = context(params, epoch, seed)
    record = method.training_step(hand_model(), hand_batch(), ctx)
    method.after_backward(record, ctx)
    return record, ctx


# -- Test it by (a): the coefficient ------------------------------------------------------------------
def test_coefficient_by_hand_for_scores_two_to_one():
    # ρ_a = 2 / (1 + 1e-5), ρ_v = 1 / (2 + 1e-5); k_a = 1 − tanh(0.5 ρ_a) = 0.2384, k_v = 1
    ratios = discrepancy_ratios(torch.tensor([2.0, 1.0]))
    assert ratios.tolist() == pytest.approx([2.0, 0.5], rel=1e-4)
    k = ogm_coefficients(ratios, alpha=0.5)
    assert k[0].item() == pytest.approx(K_HAND, abs=1e-5) and k[0].item() == pytest.approx(0.2384, abs=1e-4)
    assert k[1].item() == 1.0
    # the other slot dominant: the coefficients swap; a tie (ρ < 1 by ε) modulates nobody
    assert ogm_coefficients(discrepancy_ratios(torch.tensor([1.0, 2.0])), 0.5).tolist() == pytest.approx([1.0, K_HAND], abs=1e-5)
    assert ogm_coefficients(discrepancy_ratios(torch.tensor([3.0, 3.0])), 0.5).tolist() == [1.0, 1.0]


def test_plugin_reads_scores_from_the_restricted_logits_of_the_hand_batch():
    record, _ = hand_step({"alpha": 0.5, "variant": "OGM"}, hand_params())
    # s_a = 2 × 0.8 = 1.6, s_v = 2 × 0.4 = 0.8
    assert record.logs["ogm_ge/score/a"].item() == pytest.approx(1.6, rel=1e-6)
    assert record.logs["ogm_ge/score/v"].item() == pytest.approx(0.8, rel=1e-6)
    assert record.logs["ogm_ge/ratio/a"].item() == pytest.approx(2.0, rel=1e-4)
    assert record.logs["ogm_ge/coefficient/a"].item() == pytest.approx(K_HAND, abs=1e-5)
    assert record.logs["ogm_ge/coefficient/v"].item() == 1.0
    assert record.logs["ogm_ge/modulating"] == 1.0


# -- Test it by (b): scaling and noise on hand-set gradients -----------------------------------------
def test_ge_off_scales_the_dominant_encoder_weights_only():
    params = hand_params()
    hand_step({"alpha": 0.5, "variant": "OGM"}, params)
    weight_a, bias_a, kernel_a = params["a"]
    assert torch.allclose(weight_a.grad, torch.full((64, 64), K_HAND), atol=1e-5)
    assert torch.allclose(kernel_a.grad, torch.full((8, 4, 3, 3), K_HAND), atol=1e-5)
    assert torch.equal(bias_a.grad, torch.ones(64))  # biases untouched
    for p in params["v"]:  # k_v = 1
        assert torch.equal(p.grad, torch.ones_like(p))


def test_ge_params_conv4d_touches_only_four_dimensional_kernels():
    params = hand_params()
    hand_step({"alpha": 0.5, "variant": "OGM", "ge_params": "conv4d"}, params)
    weight_a, bias_a, kernel_a = params["a"]
    assert torch.equal(weight_a.grad, torch.ones(64, 64)) and torch.equal(bias_a.grad, torch.ones(64))
    assert torch.allclose(kernel_a.grad, torch.full((8, 4, 3, 3), K_HAND), atol=1e-5)


def test_ge_on_a_constant_gradient_adds_noise_of_std_1e_8():
    # std(ones) = 0 -> σ = 1e-8: a ≈ 0.2384 everywhere, v ≈ 1, and the deviations have std ≈ 1e-8
    # (float64 gradients: in float32 a deviation of 1e-8 is below the spacing of numbers near 1)
    params = hand_params(torch.float64)
    record, _ = hand_step({"alpha": 0.5}, params, seed=3)
    weight_a, bias_a, _ = params["a"]
    assert torch.equal(bias_a.grad, torch.ones(64, dtype=torch.float64))
    k_a = record.logs["ogm_ge/coefficient/a"].item()
    assert k_a == pytest.approx(K_HAND, abs=1e-5)
    for grad, k in ((weight_a.grad, k_a), (params["v"][0].grad, 1.0)):
        deviation = grad - k
        assert deviation.abs().max().item() < 1e-7
        assert deviation.std().item() == pytest.approx(1e-8, rel=0.1)  # 4096 draws: ±~2 % at 1 sd


def test_ge_noise_std_is_that_of_the_unscaled_gradient_and_the_seed_fixes_it():
    torch.manual_seed(0)
    g = 3 * torch.randn(128, 128)
    grad = g.clone()
    generator = torch.Generator().manual_seed(11)
    seed = step_seed(copy.deepcopy(generator))
    modulate_([grad], torch.tensor(K_HAND), step_seed(generator))
    noise = grad - K_HAND * g
    # std(noise) ≈ std(g) ≈ 3, not k · std(g) ≈ 0.72: σ is taken before the scaling
    assert noise.std().item() == pytest.approx(g.std().item(), rel=0.03)
    # exactly N(0, 1) from a generator seeded with the step's seed, times std(g) + 1e-8
    expected = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed)) * (g.std() + 1e-8)
    assert torch.allclose(noise, expected, atol=1e-5)


def test_noise_is_identical_for_the_same_seed_and_differs_otherwise():
    # two processes after gradient averaging: the same gradients and the same run generator
    results = []
    for seed in (5, 5, 6):
        params = hand_params()
        for m in "av":
            params[m][0].grad = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
        hand_step({"alpha": 0.5}, params, seed=seed)
        results.append(torch.cat([p.grad.flatten() for m in "av" for p in params[m]]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_one_seed_per_step_is_drawn_only_when_noise_is_added():
    for options, draws in (({"alpha": 0.5}, 1), ({"alpha": 0.5, "variant": "OGM"}, 0), ({"alpha": 0.5, "modulation_starts": 1}, 0)):
        _, ctx = hand_step(options, hand_params())
        reference = torch.Generator().manual_seed(0)
        for _ in range(draws):
            step_seed(reference)
        assert torch.equal(ctx.generator.get_state(), reference.get_state()), options


# -- the M > 2 rules ------------------------------------------------------------------------------------
def test_discrepancy_rules_for_three_modalities():
    s = torch.tensor([4.0, 2.0, 1.0])
    # mean_pairwise: (4/2 + 4/1)/2 = 3, (2/4 + 2/1)/2 = 1.25, (1/4 + 1/2)/2 = 0.375
    assert discrepancy_ratios(s, "mean_pairwise").tolist() == pytest.approx([3.0, 1.25, 0.375], rel=1e-4)
    # sum_others: 4/3, 2/5, 1/6
    assert discrepancy_ratios(s, "sum_others").tolist() == pytest.approx([4 / 3, 0.4, 1 / 6], rel=1e-4)
    # min: 4, 2, 1⁻ (ε keeps the weakest just below 1)
    ratios = discrepancy_ratios(s, "min")
    assert ratios.tolist() == pytest.approx([4.0, 2.0, 1.0], rel=1e-4) and ratios[2] < 1
    # coefficients with α = 0.5, mean_pairwise: 1 − tanh(1.5), 1 − tanh(0.625), 1
    k = ogm_coefficients(discrepancy_ratios(s), 0.5)
    assert k.tolist() == pytest.approx([1 - math.tanh(1.5), 1 - math.tanh(0.625), 1.0], abs=1e-5)


@pytest.mark.parametrize("rule", ["mean_pairwise", "sum_others", "min"])
def test_every_rule_gives_the_two_modality_coefficients(rule):
    for s in ([2.0, 1.0], [1.0, 3.0], [0.7, 0.7]):
        scores = torch.tensor(s)
        two = ogm_coefficients(scores / (scores.flip(0) + 1e-5), 0.3)  # the paper: s_a / s_v and s_v / s_a
        assert torch.allclose(ogm_coefficients(discrepancy_ratios(scores, rule), 0.3), two), (rule, s)


def test_a_zero_score_gives_finite_ratios():
    assert torch.isfinite(discrepancy_ratios(torch.tensor([0.0, 0.0, 1.0]))).all()
    with pytest.raises(ValueError, match="unknown discrepancy rule"):
        discrepancy_ratios(torch.ones(2), "max")


def test_three_modalities_modulate_every_encoder_ahead():
    method = Method([part("joint", "abc", 2), part("ogm_ge", "abc", 2, alpha=0.5, variant="OGM")])
    model = MultimodalModel({m: Identity((2,), 2) for m in "abc"}, SumFusion({m: 2 for m in "abc"}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    # p(y) per sample: a 0.8, b 0.4, c 0.2 -> s = (1.6, 0.8, 0.4) ∝ (4, 2, 1): ρ = (3, 1.25, 0.375)
    inputs = {"a": [LN(4), 0.0], "b": [LN(2 / 3), 0.0], "c": [LN(1 / 4), 0.0]}
    batch = Batch({m: torch.tensor([x] * 2) for m, x in inputs.items()}, torch.tensor([0, 0]), torch.arange(2))
    params = {m: [nn.Parameter(torch.zeros(3, 3))] for m in "abc"}
    for m in "abc":
        params[m][0].grad = torch.ones(3, 3)
    ctx = context(params)
    method.after_backward(method.training_step(model, batch, ctx), ctx)
    expected = [1 - math.tanh(1.5), 1 - math.tanh(0.625), 1.0]
    assert [params[m][0].grad[0, 0].item() for m in "abc"] == pytest.approx(expected, abs=1e-5)


# -- the window, the options ----------------------------------------------------------------------------
def test_window_defaults_are_the_official_zero_to_fifty():
    config = METHODS.get("ogm_ge").Config()
    assert (config.modulation_starts, config.modulation_ends, config.alpha, config.variant) == (0, 50, 0.1, "OGM_GE")
    for epoch, inside in ((0, True), (50, True), (51, False)):
        params = hand_params()
        record, _ = hand_step({"alpha": 0.5, "variant": "OGM"}, params, epoch=epoch)
        assert record.logs["ogm_ge/modulating"] == float(inside)
        assert torch.allclose(params["a"][0].grad, torch.full((64, 64), K_HAND if inside else 1.0), atol=1e-5)


def test_score_logits_heads_reads_the_unimodal_heads():
    model, batch = hand_model(), hand_batch()
    method = joint_ogm(score_logits="heads")
    record = method.training_step(model, batch, context(hand_params()))
    heads = torch.stack([record.unimodal[m] for m in "av"])
    expected = modality_scores(heads, batch.labels)
    assert record.logs["ogm_ge/score/a"].item() == pytest.approx(expected[0].item(), rel=1e-6)
    assert record.logs["ogm_ge/score/a"].item() != pytest.approx(1.6, rel=1e-3)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="ogm_ge.variant"):
        build_config(overrides=["ogm_ge.variant=GE"], method="ogm_ge")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("ogm_ge", modulation_starts=10, modulation_ends=5)
    assert build_config(method="ogm_ge").parts == ["joint", "ogm_ge"]


# -- §16: determinism, outside the window, resume; composition; runs -----------------------------------------
def trainer(spec, extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def step_gradients(t, batch, epoch):
    t.ctx.epoch = epoch
    t.method.on_epoch_start(t.model, t.ctx)
    t._zero_grad()
    record = t.method.training_step(t.model, batch, t.ctx)
    record.loss.backward()
    t._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_two_runs_with_the_same_seed_give_the_same_coefficients_and_weights():
    trajectories = []
    for _ in range(2):
        t = trainer("joint+ogm_ge")
        logs = []
        for batch in list(t.train_loader)[:4]:
            record = t.train_step(batch)
            logs.append([record.logs[f"ogm_ge/coefficient/{m}"].item() for m in ("strong", "weak")])
        trajectories.append((logs, [p.detach().clone() for p in t.model.parameters()]))
    assert trajectories[0][0] == trajectories[1][0]
    assert all(torch.equal(a, b) for a, b in zip(trajectories[0][1], trajectories[1][1]))


def test_outside_the_window_gradients_equal_joint_exactly():
    plain, modulated = trainer("joint"), trainer("joint+ogm_ge[modulation_starts=2]")
    modulated.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    _, expected = step_gradients(plain, batch, epoch=1)
    state = modulated.ctx.generator.get_state()
    _, grads = step_gradients(modulated, batch, epoch=1)
    assert grads.keys() == expected.keys()
    assert all(torch.equal(grads[n], expected[n]) for n in grads)
    assert torch.equal(modulated.ctx.generator.get_state(), state)  # no seed drawn outside the window


def test_state_round_trip_mid_epoch_reproduces_the_next_step_with_its_noise():
    t = trainer("joint+ogm_ge", ["train.epochs=3"])
    batches = list(t.train_loader)[:3]
    t.ctx.epoch = 1
    for batch in batches[:2]:
        t.train_step(batch)
    saved = copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizer": t.ctx.optimizer.state_dict(), "generator": t.ctx.generator.get_state(),
    })
    t.train_step(batches[2])
    expected = [p.detach().clone() for p in t.model.parameters()]

    fresh = trainer("joint+ogm_ge", ["train.epochs=3"])
    fresh.ctx.epoch = 1
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    fresh.ctx.generator.set_state(saved["generator"])
    fresh.train_step(batches[2])
    assert all(torch.equal(a, b) for a, b in zip(expected, fresh.model.parameters()))


def test_midas_plus_ogm_scales_midas_encoder_weight_gradients_by_k():
    """midas+ogm_ge[variant=OGM]: MIDAS's step with each encoder weight's gradient × k_m, the rest untouched."""
    extra = ["midas.modulation_starts=0"]
    alone, composed = trainer("midas", extra), trainer("midas+ogm_ge[variant=OGM,alpha=2.0]", extra)
    composed.model.load_state_dict(alone.model.state_dict())
    batch = next(iter(alone.train_loader))
    reference, plain = step_gradients(alone, batch, epoch=0)
    record, scaled = step_gradients(composed, batch, epoch=0)
    assert set(record.losses) == set(reference.losses) == {"fused", "unimodal", "misaligned"}
    assert record.loss.item() == reference.loss.item()
    k = {m: record.logs[f"ogm_ge/coefficient/{m}"].item() for m in ("strong", "weak")}
    assert min(k.values()) < 1 and max(k.values()) == 1.0
    model = composed.model
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        modality = name.split(".")[1] if name.startswith("encoders.") else None
        if modality is not None and p.ndim >= 2:
            assert torch.allclose(scaled[name], k[modality] * plain[name], rtol=1e-5, atol=1e-9), name
        else:  # biases, fusion and unimodal heads
            assert torch.equal(scaled[name], plain[name]), name


def test_midas_plus_ogm_ge_trains(tmp_path):
    config = build_config(overrides=[*TINY, "midas.modulation_starts=0"], method="midas+ogm_ge")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert "ogm_ge/coefficient/strong" in lines[0]["method"] and "loss/misaligned" in lines[0]["method"]
    assert metrics["method"] == "midas+ogm_ge"


@pytest.mark.parametrize("modalities", [2, 3])
def test_joint_plus_ogm_ge_runs_two_epochs(modalities, tmp_path):
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    config = build_config(overrides=[*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}"], method="joint+ogm_ge")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    coefficients = [k for k in lines[-1]["method"] if k.startswith("ogm_ge/coefficient/")]
    assert len(coefficients) == modalities
    assert all(0 < lines[-1]["method"][k] <= 1 for k in coefficients)
    assert len(metrics["test"]["modality_accuracy"]) == modalities
