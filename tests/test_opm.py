"""OPM / OGM (TPAMI) (a plugin): drop probabilities, θ and the rescaling by hand, the dropped fused loss on a
hand batch, the OGM and OGM_plus variants, M > 2, the warm-up window, determinism, resume, MIDAS, runs
(BASELINES §10, §16)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbalance.methods.opm  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.discrepancy import discrepancy_ratios
from mmbalance.methods.ogm_ge import step_seed
from mmbalance.methods.opm import (
    drop_probabilities, drop_theta, dropped_features, keep_masks, kept_cross_entropy, ogm_plus_coefficients,
)
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log
Q_HAND = 0.5 * (1 + 0.5 * math.tanh(1.0))  # 0.690399: ρ_a = 2, q_base = 0.5, λ = 0.5
THETA_HAND = Q_HAND / 2  # 0.345199 for widths (512, 512)
TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def part(name, modalities="av", num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def joint_opm(modalities="av", **options):
    return Method([part("joint", modalities), part("opm", modalities, **options)])


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model(modalities="av"):
    """Identity encoders, a summing head with identity weights and no bias: d_m = f_m = the inputs."""
    model = MultimodalModel({m: Identity((2,), 2) for m in modalities}, SumFusion({m: 2 for m in modalities}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def hand_batch(a=LN(4), v=LN(2 / 3)):
    """Both labels 0. a: logits (ln 4, 0) -> p(y) = 0.8; v: (ln 2/3, 0) -> p(y) = 0.4: s_a = 1.6 = 2 s_v."""
    inputs = {"a": torch.tensor([[a, 0.0]] * 2), "v": torch.tensor([[v, 0.0]] * 2)}
    for x in inputs.values():
        x.requires_grad_(True)
    return Batch(inputs, torch.tensor([0, 0]), torch.arange(2))


def context(epoch=6, seed=0, params=None, dist=None):
    return TrainContext(
        epoch=epoch, max_epochs=60, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "v"],
        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=dist or DistributedState(),
        params=ParameterGroups(encoder=params or {}, heads={}, fusion=[]),
    )


# -- Test it by: q, θ, the scale ------------------------------------------------------------------------
def test_drop_probability_theta_and_scale_by_hand():
    # ρ = (2, 0.5): q_a = 0.5 (1 + 0.5 tanh 1) = 0.6904, q_v = 0
    q = drop_probabilities(torch.tensor([2.0, 0.5]), q_base=0.5, lam=0.5)
    assert q.tolist() == pytest.approx([Q_HAND, 0.0], abs=1e-6) and q[0].item() == pytest.approx(0.6904, abs=1e-4)
    # widths (512, 512): θ = 0.6904 / 2 = 0.3452, scale 1 / (1 − θ) = 1.5272
    theta = drop_theta(q, torch.tensor([512, 512]))
    assert theta.item() == pytest.approx(0.3452, abs=1e-4) and 1 / (1 - theta.item()) == pytest.approx(1.5272, abs=1e-4)
    # unequal widths weight q by D: (256, 768) -> θ = 0.6904 · 256 / 1024
    assert drop_theta(q, torch.tensor([256, 768])).item() == pytest.approx(Q_HAND / 4, abs=1e-6)
    # clipping: q_base 0.9, λ 1, ρ = 3: 0.9 (1 + tanh 2) > 1 -> 1
    assert drop_probabilities(torch.tensor([3.0, 1 / 3]), 0.9, 1.0).tolist() == [1.0, 0.0]


def test_with_ratios_at_most_one_nothing_is_ever_dropped():
    q = drop_probabilities(torch.tensor([1.0, 0.999, 0.2]), q_base=0.5, lam=0.5)
    assert q.tolist() == [0.0, 0.0, 0.0]
    keep = keep_masks(q, 10_000, torch.Generator().manual_seed(0))
    assert keep.all()
    features = {m: torch.randn(10_000, 4) for m in "abc"}
    out = dropped_features(features, list("abc"), keep, drop_theta(q, torch.tensor([4, 4, 4])))
    assert all(torch.equal(out[m], features[m]) for m in "abc")


def test_keep_masks_are_bernoulli_one_minus_q_per_sample_and_modality():
    keep = keep_masks(torch.tensor([Q_HAND, 0.0, 0.25]), 40_000, torch.Generator().manual_seed(1))
    rates = keep.float().mean(0)
    assert rates[0].item() == pytest.approx(1 - Q_HAND, abs=0.01)  # 0.3096
    assert rates[1].item() == 1.0 and rates[2].item() == pytest.approx(0.75, abs=0.01)
    # independent across modalities: P(keep a and keep c) = 0.3096 · 0.75
    assert (keep[:, 0] & keep[:, 2]).float().mean().item() == pytest.approx((1 - Q_HAND) * 0.75, abs=0.01)


def test_dropped_features_are_masked_and_rescaled():
    features = {"a": torch.ones(3, 2), "v": 2 * torch.ones(3, 2, 4)}  # any trailing shape
    keep = torch.tensor([[True, True], [False, True], [True, False]])
    theta = torch.tensor(0.5)
    out = dropped_features(features, ["a", "v"], keep, theta)
    assert out["a"].tolist() == [[2.0, 2.0], [0.0, 0.0], [2.0, 2.0]]
    assert out["v"][:, 0, 0].tolist() == [4.0, 4.0, 0.0]


def test_kept_cross_entropy_drops_samples_with_nothing_kept():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    kept = torch.tensor([True, False, True])
    # rows 0 and 2: ln(1 + e^{-2}) = 0.126928, ln 2 = 0.693147 -> mean 0.410038
    loss = kept_cross_entropy(logits, labels, kept)
    assert loss.item() == pytest.approx((LN(1 + math.exp(-2)) + LN(2)) / 2, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(2))
    # per-sample weights multiply each kept sample's CE; none kept: 0
    weighted = kept_cross_entropy(logits, labels, kept, torch.tensor([2.0, 1.0, 0.0]))
    assert weighted.item() == pytest.approx(LN(1 + math.exp(-2)), rel=1e-6)
    assert kept_cross_entropy(logits, labels, torch.zeros(3, dtype=torch.bool)).item() == 0.0


# -- the plugin on the hand batch ---------------------------------------------------------------------------
def test_dominant_modality_dropped_for_sure_leaves_the_other_rescaled():
    # q_base 1, λ 0: q_a = 1, q_v = 0 -> every sample drops a; widths (2, 2): θ = 0.5, f̃_v = 2 f_v
    # fused logits 2 (ln 2/3, 0) -> p(y) = (4/9) / (4/9 + 1) = 4/13, CE = ln(13/4) = 1.178655
    batch = hand_batch()
    record = joint_opm(q_base=1.0, lam=0.0, p_exe=1.0).training_step(hand_model(), batch, context())
    assert record.logs["opm/q/a"].item() == 1.0 and record.logs["opm/q/v"].item() == 0.0
    assert record.logs["opm/executed"] == 1.0 and record.logs["opm/theta"].item() == 0.5
    assert record.logs["opm/kept/a"].item() == 0.0 and record.logs["opm/kept/v"].item() == 1.0
    assert record.losses["fused"].item() == pytest.approx(LN(13 / 4), rel=1e-6)
    assert record.logits.argmax(-1).tolist() == [0, 0]  # the objective's logits (undropped) stay for accuracy
    record.loss.backward()
    # dCE/dz = p − onehot = (−9/13, 9/13) per sample, / 2 samples, × 2 (the rescaling) -> (−9/13, 9/13)
    assert torch.allclose(batch.inputs["v"].grad, torch.tensor([[-9 / 13, 9 / 13]] * 2), atol=1e-6)
    assert torch.equal(batch.inputs["a"].grad, torch.zeros(2, 2))


def test_no_execution_or_no_discrepancy_leaves_the_fused_loss_as_it_was():
    plain = F.cross_entropy(torch.tensor([[LN(4) + LN(2 / 3), 0.0]] * 2), torch.tensor([0, 0])).item()
    record = joint_opm(p_exe=0.0).training_step(hand_model(), hand_batch(), context())
    assert record.logs["opm/executed"] == 0.0 and record.losses["fused"].item() == pytest.approx(plain, rel=1e-6)
    # equal scores: ρ < 1 for both -> q = 0; executed, but f̃ = f exactly
    record = joint_opm(p_exe=1.0).training_step(hand_model(), hand_batch(a=LN(2 / 3)), context())
    assert record.logs["opm/executed"] == 1.0 and record.logs["opm/theta"].item() == 0.0
    expected = F.cross_entropy(torch.tensor([[2 * LN(2 / 3), 0.0]] * 2), torch.tensor([0, 0])).item()
    assert record.losses["fused"].item() == pytest.approx(expected, rel=1e-6)


def test_the_drop_rate_over_many_steps_is_p_exe_times_q():
    method = joint_opm(p_exe=0.7)
    ctx = context(seed=4)
    model = hand_model()
    executed, kept = [], []
    big = Batch({"a": torch.tensor([[LN(4), 0.0]] * 64), "v": torch.tensor([[LN(2 / 3), 0.0]] * 64)},
                torch.zeros(64, dtype=torch.long), torch.arange(64))
    for _ in range(400):
        record = method.training_step(model, big, ctx)
        executed.append(record.logs["opm/executed"])
        if record.logs["opm/executed"]:
            kept.append(record.logs["opm/kept/a"].item())
            assert record.logs["opm/kept/v"].item() == 1.0
    assert sum(executed) / 400 == pytest.approx(0.7, abs=0.06)
    assert sum(kept) / len(kept) == pytest.approx(1 - Q_HAND, abs=0.01)


def test_each_process_draws_its_own_masks_but_the_same_execution():
    class FakeDist(DistributedState):
        def mean(self, values):  # the batch statistics of every process are this one's
            return values

    big = Batch({"a": torch.tensor([[LN(4), 0.0]] * 64), "v": torch.tensor([[LN(2 / 3), 0.0]] * 64)},
                torch.zeros(64, dtype=torch.long), torch.arange(64))
    losses, states = [], []
    for rank in (0, 1):
        ctx = context(seed=2, dist=FakeDist(rank=rank, world_size=2))
        record = joint_opm(p_exe=1.0).training_step(hand_model(), big, ctx)
        losses.append(record.losses["fused"].item())
        states.append(ctx.generator.get_state())
    assert losses[0] != losses[1]  # different masks
    assert torch.equal(states[0], states[1])  # the run generator moved alike on both


# -- the OGM variants ---------------------------------------------------------------------------------------
def hand_params():
    params = {m: [nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4))] for m in "av"}
    for group in params.values():
        for p in group:
            p.grad = torch.ones_like(p)
    return params


def ogm_step(**options):
    params = hand_params()
    ctx = context(params=params)
    method = joint_opm(**options)
    record = method.training_step(hand_model(), hand_batch(), ctx)
    method.after_backward(record, ctx)
    return record, params


def test_ogm_variant_damps_the_dominant_encoder_without_noise():
    # ρ_a = 2, α = 0.5 -> k_a = 1 − tanh(1) = 0.2384; no GE by default: exactly k · ones
    record, params = ogm_step(variant="OGM", alpha=0.5)
    assert record.logs["opm/coefficient/a"].item() == pytest.approx(1 - math.tanh(1), abs=1e-5)
    assert torch.allclose(params["a"][0].grad, torch.full((4, 4), 1 - math.tanh(1)), atol=1e-5)
    assert torch.equal(params["a"][1].grad, torch.ones(4)) and torch.equal(params["v"][0].grad, torch.ones(4, 4))
    assert "fused" in record.losses and "opm/executed" not in record.logs  # no dropping in the OGM variants


def test_ogm_plus_amplifies_the_other_modality():
    # constant: v (ρ = 0.5) × 4, a × 1
    _, params = ogm_step(variant="OGM_plus")
    assert torch.equal(params["v"][0].grad, torch.full((4, 4), 4.0)) and torch.equal(params["a"][0].grad, torch.ones(4, 4))
    assert torch.equal(params["v"][1].grad, torch.ones(4))  # biases untouched
    # tanh: 1 + tanh(α / ρ_v) = 1 + tanh(0.8 · 2) = 1.921669
    _, params = ogm_step(variant="OGM_plus", plus_rule="tanh")
    assert params["v"][0].grad[0, 0].item() == pytest.approx(1 + math.tanh(1.6), abs=1e-4)
    rule = ogm_plus_coefficients(torch.tensor([3.0, 1.25, 0.375]), "constant", 4.0, 0.8)
    assert rule.tolist() == [1.0, 1.0, 4.0]


def test_ogm_variant_with_ge_adds_noise_of_the_gradient_std():
    params = hand_params()
    g = torch.linspace(-1, 1, 16).reshape(4, 4)  # std 0.6157
    params["v"][0].grad = g.clone()
    ctx = context(params=params)
    method = joint_opm(variant="OGM", alpha=0.5, ge=True)
    method.after_backward(method.training_step(hand_model(), hand_batch(), ctx), ctx)
    noise = params["v"][0].grad - g  # k_v = 1
    assert 0.2 < noise.std().item() < 1.2  # 16 draws of N(0, 0.6157²)
    reference = torch.Generator().manual_seed(0)
    step_seed(reference)  # one seed drawn for the step
    assert torch.equal(ctx.generator.get_state(), reference.get_state())


# -- M > 2 --------------------------------------------------------------------------------------------------
def test_three_modalities_drop_every_modality_ahead():
    s = torch.tensor([4.0, 2.0, 1.0])
    # mean_pairwise ρ = (3, 1.25, 0.375): q = 0.5 (1 + 0.5 tanh 2), 0.5 (1 + 0.5 tanh 0.25), 0
    q = drop_probabilities(discrepancy_ratios(s, "mean_pairwise"), 0.5, 0.5)
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(2)), 0.5 * (1 + 0.5 * math.tanh(0.25)), 0.0], abs=1e-5)
    # sum_others ρ = (4/3, 0.4, 1/6): only the first is dropped, q = 0.5 (1 + 0.5 tanh 1/3)
    q = drop_probabilities(discrepancy_ratios(s, "sum_others"), 0.5, 0.5)
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(1 / 3)), 0.0, 0.0], abs=1e-5)
    # through the plugin: p(y) a 0.8, b 0.4, c 0.2 -> s ∝ (4, 2, 1)
    inputs = {"a": [LN(4), 0.0], "b": [LN(2 / 3), 0.0], "c": [LN(1 / 4), 0.0]}
    batch = Batch({m: torch.tensor([x] * 2) for m, x in inputs.items()}, torch.tensor([0, 0]), torch.arange(2))
    record = joint_opm("abc", p_exe=1.0).training_step(hand_model("abc"), batch, context())
    assert [record.logs[f"opm/q/{m}"].item() for m in "abc"] == pytest.approx(
        [0.5 * (1 + 0.5 * math.tanh(2)), 0.5 * (1 + 0.5 * math.tanh(0.25)), 0.0], abs=1e-5)
    assert record.logs["opm/kept/c"].item() == 1.0


# -- window, options ----------------------------------------------------------------------------------------
def test_no_dropping_during_the_official_warm_up_of_six_epochs():
    config = METHODS.get("opm").Config()
    assert (config.modulation_starts, config.q_base, config.lam, config.p_exe, config.variant) == (6, 0.5, 0.5, 0.7, "OPM")
    for epoch, active in ((0, False), (5, False), (6, True)):
        ctx = context(epoch=epoch)
        state = ctx.generator.get_state()
        record = joint_opm(p_exe=1.0).training_step(hand_model(), hand_batch(), ctx)
        assert record.logs["opm/modulating"] == float(active)
        assert ("opm/executed" in record.logs) == active
        assert torch.equal(ctx.generator.get_state(), state) != active  # nothing drawn outside the window


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="opm.variant"):
        build_config(overrides=["opm.variant=OPM_plus"], method="opm")
    with pytest.raises(ConfigError, match="opm.q_base"):
        build_config(overrides=["opm.q_base=1.5"], method="opm")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("opm", modulation_starts=10, modulation_ends=5)


# -- §16: determinism, outside the window, resume; MIDAS; runs ---------------------------------------------------
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


def test_two_runs_with_the_same_seed_give_the_same_steps():
    runs = []
    for _ in range(2):
        t = trainer("joint+opm[modulation_starts=0]")
        logs = [t.train_step(b).losses["fused"].item() for b in list(t.train_loader)[:4]]
        runs.append((logs, [p.detach().clone() for p in t.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("variant", ["OPM", "OGM", "OGM_plus"])
def test_outside_the_window_gradients_equal_joint_exactly(variant):
    plain, modulated = trainer("joint"), trainer(f"joint+opm[variant={variant},ge=true]")
    modulated.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    _, expected = step_gradients(plain, batch, epoch=5)
    _, grads = step_gradients(modulated, batch, epoch=5)
    assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in grads)


@pytest.mark.parametrize("variant", ["OPM", "OGM_plus"])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(variant):
    spec = f"joint+opm[variant={variant},modulation_starts=0,ge=true]"
    t = trainer(spec)
    batches = list(t.train_loader)[:3]
    for batch in batches[:2]:
        t.train_step(batch)
    saved = copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizer": t.ctx.optimizer.state_dict(), "generator": t.ctx.generator.get_state(),
    })
    loss = t.train_step(batches[2]).loss.item()
    expected = [p.detach().clone() for p in t.model.parameters()]
    fresh = trainer(spec)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    fresh.ctx.generator.set_state(saved["generator"])
    assert fresh.train_step(batches[2]).loss.item() == loss
    assert all(torch.equal(a, b) for a, b in zip(expected, fresh.model.parameters()))


def test_midas_plus_opm_replaces_only_the_fused_term():
    """midas+opm: the fused term is CE on dropped features; MIDAS's unimodal and misaligned terms are unchanged."""
    extra = ["midas.modulation_starts=0"]
    alone, composed = trainer("midas", extra), trainer("midas+opm[modulation_starts=0,p_exe=1.0]", extra)
    composed.model.load_state_dict(alone.model.state_dict())
    batch = next(iter(alone.train_loader))
    reference, _ = step_gradients(alone, batch, epoch=0)
    record, _ = step_gradients(composed, batch, epoch=0)
    assert set(record.losses) == set(reference.losses) == {"fused", "unimodal", "misaligned"}
    for term in ("unimodal", "misaligned"):
        assert record.losses[term].item() == reference.losses[term].item()
    assert record.logs["opm/executed"] == 1.0
    dropped = any(record.logs[f"opm/kept/{m}"].item() < 1 for m in ("strong", "weak"))
    assert dropped == (record.losses["fused"].item() != reference.losses["fused"].item())
    # during MIDAS's warm-up the fusion head has no task loss: OPM leaves the step alone
    warm = trainer("midas+opm[modulation_starts=0,p_exe=1.0]", ["midas.modulation_starts=1"])
    record, _ = step_gradients(warm, batch, epoch=0)
    assert set(record.losses) == {"unimodal"} and "opm/executed" not in record.logs


def test_midas_plus_opm_trains(tmp_path):
    config = build_config(overrides=[*TINY, "midas.modulation_starts=0", "opm.modulation_starts=0"], method="midas+opm")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 < lines[0]["method"]["opm/executed"] <= 1 and "loss/misaligned" in lines[0]["method"]
    assert metrics["method"] == "midas+opm"


@pytest.mark.parametrize("modalities", [2, 3])
def test_joint_plus_opm_runs_two_epochs(modalities, tmp_path):
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    overrides = [*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}", "opm.modulation_starts=0"]
    metrics = train_run(build_config(overrides=overrides, method="joint+opm"), tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert len([k for k in lines[-1]["method"] if k.startswith("opm/q/")]) == modalities
    assert len(metrics["test"]["modality_accuracy"]) == modalities
