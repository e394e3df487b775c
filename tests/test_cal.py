"""CAL: Shapley contributions, W and ρ, the bottleneck, gradient acceleration (objective and plugin), logs and runs."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.cal import compression_strength, gaussian_kl
from mmbalance.methods.contribution import ContributionConfig, ContributionTracker, contribution, moving_average, shapley_matrix
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log


def context(epoch=0, seed=0, num_classes=3):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=num_classes, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def part(name, modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


#: the reconstruction's first settings, for which the hand values below were worked out
#: (the defaults since chosen on validation differ: test_defaults_chosen_on_validation)
RECONSTRUCTION = dict(modulation_starts=5, temperature=4.0, momentum=0.9, contribution="both",
                      bottleneck_init="random", beta0=1e-3, unimodal_weight=1.0)


def cal(modalities=("a", "b"), num_classes=3, **options):
    return part("cal", modalities, num_classes, **{**RECONSTRUCTION, **options})


def test_defaults_chosen_on_validation():
    defaults = METHODS.get("cal").Config()
    chosen = dict(modulation_starts=0, temperature=4.104, momentum=0.7674, contribution="marginal",
                  confidence="probability", bottleneck_init="identity", beta0=0.001062, unimodal_weight=0.7412)
    assert {k: getattr(defaults, k) for k in chosen} == chosen


def cal_accel(modalities=("a", "b"), num_classes=3, **options):
    return part("cal_accel", modalities, num_classes, **options)


def small_model(modalities=("a", "b")):
    torch.manual_seed(0)
    shapes = {m: (3 + k,) for k, m in enumerate(modalities)}
    return build_model(ModelConfig(feature_dim=4, hidden_dim=8), list(modalities), shapes, 3)


def small_batch(modalities=("a", "b"), seed=1):
    torch.manual_seed(seed)
    inputs = {m: torch.randn(6, 3 + k) for k, m in enumerate(modalities)}
    return Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


class Identity(Encoder):
    def forward(self, x):
        return x


class IdentityLinear(Encoder):
    """A linear encoder started at the identity: features equal the inputs, yet the encoder has weights to train."""

    def __init__(self):
        super().__init__((2,), 2)
        self.linear = nn.Linear(2, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(2))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x)


def hand_model(modalities, encoder=lambda: Identity((2,), 2)):
    """Features are the inputs; the fusion head sums them and each unimodal head is the identity."""
    model = MultimodalModel({m: encoder() for m in modalities}, SumFusion({m: 2 for m in modalities}, 2), 2)
    with torch.no_grad():
        for layer in [*model.fusion.linears.values(), *model.unimodal_heads.values()]:
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def tracker(modalities=("a", "b"), num_classes=3, **options):
    return ContributionTracker(ContributionConfig(**options), list(modalities), num_classes)


def statistics(modalities, features, labels, **options):
    model = hand_model(modalities)
    return tracker(modalities, num_classes=2, **options).batch_statistics(model.fuse, features, model.heads(features), labels)


# -- the hand batch of two modalities, used by the acceleration and log checks below ---------------
# label 0 (sample 1 is the mirror image, label 1); a multiplies the odds of the true class by 3, b by 2
HAND_INPUTS = {"a": [[LN(3), 0.0], [0.0, LN(3)]], "b": [[LN(2), 0.0], [0.0, LN(2)]]}
# v(∅) = 1/2, v(a) = 3/4, v(b) = 2/3, v(ab) = 6/7
# I(a) = ½(3/4 − 1/2) + ½(6/7 − 2/3) = ½(1/4 + 4/21) = 37/168; I(b) = ½(1/6 + 3/28) = 23/168
HAND_I = (37 / 168, 23 / 168)
# D: the identity unimodal heads' true-class probabilities
HAND_D = (3 / 4, 2 / 3)
# positive shares 37/60, 23/60; W = share · D = (37/80, 23/90) ~ (0.4625, 0.255556), taken as is on the first step
HAND_W = (37 / 80, 23 / 90)
# ρ = softmax(4 W): ρ_a = 1 / (1 + e^{−4 (37/80 − 23/90)}) = 1 / (1 + e^{−149/180}) ~ 0.695902
HAND_RHO_A = 1 / (1 + math.exp(-149 / 180))
HAND_RHO = (HAND_RHO_A, 1 - HAND_RHO_A)


def hand_batch():
    return Batch({m: torch.tensor(x) for m, x in HAND_INPUTS.items()}, torch.tensor([0, 1]), torch.arange(2))


# -- the contribution math -------------------------------------------------------------------------
def test_shapley_and_confidence_of_two_modalities():
    features = {m: torch.tensor(x) for m, x in HAND_INPUTS.items()}
    marginal, confidence = statistics("ab", features, torch.tensor([0, 1]))
    assert torch.allclose(marginal, torch.tensor(HAND_I))
    assert marginal.sum().item() == pytest.approx(6 / 7 - 1 / 2)  # efficiency
    assert torch.allclose(confidence, torch.tensor(HAND_D))  # the unimodal heads' true-class probabilities


def test_shapley_of_three_modalities_with_a_harmful_one():
    # label 0; odds of class 0 multiplied by 2 (a), 3 (b) and 1/2 (c)
    features = {"a": torch.tensor([[LN(2), 0.0]]), "b": torch.tensor([[LN(3), 0.0]]), "c": torch.tensor([[0.0, LN(2)]])}
    marginal, _ = statistics("abc", features, torch.tensor([0]))
    v = {"": 1 / 2, "a": 2 / 3, "b": 3 / 4, "c": 1 / 3, "ab": 6 / 7, "ac": 1 / 2, "bc": 3 / 5, "abc": 3 / 4}
    # weights 1/3 for |S| = 0 and 2, 1/6 for |S| = 1
    a = (v["a"] - v[""]) / 3 + (v["ab"] - v["b"]) / 6 + (v["ac"] - v["c"]) / 6 + (v["abc"] - v["bc"]) / 3  # ~ 0.151190
    b = (v["b"] - v[""]) / 3 + (v["ab"] - v["a"]) / 6 + (v["bc"] - v["c"]) / 6 + (v["abc"] - v["ac"]) / 3  # ~ 0.208532
    c = (v["c"] - v[""]) / 3 + (v["ac"] - v["a"]) / 6 + (v["bc"] - v["b"]) / 6 + (v["abc"] - v["ab"]) / 3  # ~ −0.109722
    assert torch.allclose(marginal, torch.tensor([a, b, c]))
    assert c < 0 and marginal.sum().item() == pytest.approx(3 / 4 - 1 / 2)


def test_shapley_matrix_of_two_modalities():
    # coalitions in the order of all_coalitions: ∅, {a}, {b}, {a, b}
    # φ_a = ½(v(a) − v(∅)) + ½(v(ab) − v(b)) -> row (−½, ½, −½, ½); φ_b -> (−½, −½, ½, ½)
    expected = torch.tensor([[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]])
    assert torch.allclose(shapley_matrix(["a", "b"]), expected)
    # efficiency: the rows add up to v(N) − v(∅) for every game
    three = shapley_matrix(["a", "b", "c"])
    assert three.shape == (3, 8)
    assert torch.allclose(three.sum(0), torch.tensor([-1.0, 0, 0, 0, 0, 0, 0, 1.0]))


def test_entropy_confidence():
    features = {"a": torch.tensor([[LN(3), 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    _, confidence = statistics("ab", features, torch.tensor([0]), confidence="entropy")
    # a: p = (3/4, 1/4), H = ln 4 − ¾ ln 3 ~ 0.562335, 1 − H / ln 2 ~ 0.188722; b: uniform, 1 − 1 = 0
    assert torch.allclose(confidence, torch.tensor([1 - (LN(4) - 0.75 * LN(3)) / LN(2), 0.0]), atol=1e-6)


def test_contribution_from_marginal_and_confidence():
    marginal, confidence = torch.tensor([0.3, 0.1, -0.2]), torch.tensor([0.5, 0.8, 0.9])
    # positive shares 0.3/0.4 = 0.75, 0.25, 0 -> W = 0.375, 0.2, 0
    assert torch.allclose(contribution(marginal, confidence), torch.tensor([0.375, 0.2, 0.0]))
    assert torch.allclose(contribution(marginal, confidence, "marginal"), torch.tensor([0.75, 0.25, 0.0]))
    assert torch.equal(contribution(marginal, confidence, "confidence"), confidence)
    # no positive I: equal shares 1/3 -> W = D / 3
    assert torch.allclose(contribution(torch.tensor([-0.1, 0.0, -0.3]), confidence), confidence / 3)


def test_moving_average_takes_the_first_value_as_it_is():
    average, value = torch.tensor([0.5, 0.1]), torch.tensor([0.3, 0.2])
    assert torch.equal(moving_average(average, value, 0.9, torch.tensor(False)), value)
    # 0.9 (0.5, 0.1) + 0.1 (0.3, 0.2) = (0.48, 0.11)
    assert torch.allclose(moving_average(average, value, 0.9, torch.tensor(True)), torch.tensor([0.48, 0.11]))


def test_rho_is_a_softmax_of_the_smoothed_contribution():
    method = cal(temperature=4.0)
    marginal = torch.tensor([0.3, 0.1])  # shares 3/4, 1/4
    _, weight, rho = method.tracker.update(marginal, torch.tensor([2 / 3, 0.4]))  # W = (0.5, 0.1), taken as is
    assert torch.allclose(weight, torch.tensor([0.5, 0.1]))
    # ρ_a = e^{4·0.5} / (e^{4·0.5} + e^{4·0.1}) = 1 / (1 + e^{−1.6}) ~ 0.832018
    assert torch.allclose(rho, torch.tensor([1 / (1 + math.exp(-1.6)), 1 / (1 + math.exp(1.6))]))
    _, weight, rho = method.tracker.update(marginal, torch.tensor([0.4, 0.8]))  # W = (0.3, 0.2)
    # EMA, momentum 0.9: 0.9 (0.5, 0.1) + 0.1 (0.3, 0.2) = (0.48, 0.11); ρ_a = 1 / (1 + e^{−4·0.37})
    assert torch.allclose(weight, torch.tensor([0.48, 0.11]))
    assert rho[0].item() == pytest.approx(1 / (1 + math.exp(-1.48)), rel=1e-6)
    assert method.tracker.updates.item() == 2


def test_confidence_moving_average_option():
    method = cal(confidence="ema", contribution="confidence")
    method.tracker.update(torch.zeros(2), torch.tensor([0.2, 0.6]))
    confidence, weight, _ = method.tracker.update(torch.zeros(2), torch.tensor([0.4, 1.0]))
    # D: 0.9 (0.2, 0.6) + 0.1 (0.4, 1.0) = (0.22, 0.64); W = D only, then W's own EMA: 0.9 (0.2, 0.6) + 0.1 (0.22, 0.64)
    assert torch.allclose(confidence, torch.tensor([0.22, 0.64]))
    assert torch.allclose(weight, torch.tensor([0.202, 0.604]))


def test_kl_term_and_beta_ordering():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, LN(2)], [0.0, 0.0]])
    # row 0: ½[(1 + 1 − 0 − 1) + (0 + 2 − ln 2 − 1)] = 1 − ½ ln 2; row 1: 0; batch mean: half of it
    assert gaussian_kl(mu, logvar).item() == pytest.approx((1 - LN(2) / 2) / 2)
    # β = 1e-3 (1 − ρ) M / (M − 1): (0.8, 0.2) -> (4e-4, 1.6e-3): the weaker modality is compressed harder
    assert torch.allclose(compression_strength(torch.tensor([0.8, 0.2]), 1e-3), torch.tensor([4e-4, 1.6e-3]))
    # three modalities: 1e-3 · (0.5, 0.7, 0.8) · 3/2; the mean stays β_0
    beta = compression_strength(torch.tensor([0.5, 0.3, 0.2]), 1e-3)
    assert torch.allclose(beta, torch.tensor([7.5e-4, 1.05e-3, 1.2e-3]))
    assert beta.mean().item() == pytest.approx(1e-3)


# -- the cal objective ------------------------------------------------------------------------------
def test_evaluation_reads_mu_and_training_samples():
    model, method = small_model(), cal()
    method.setup(model, context())
    run = Method([method])
    inputs = small_batch().inputs
    features = model.encode(inputs)
    sampled = [method.encode(model, inputs)["a"] for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])
    method.eval()
    codes = method.encode(model, inputs)
    assert torch.equal(codes["a"], method.mu["a"](features["a"]))
    assert torch.equal(run.predict(model, inputs), run.predict(model, inputs))
    assert torch.equal(run.predict(model, inputs), model.fuse({m: method.mu[m](f) for m, f in features.items()}))


def gradients(model, method, epoch, seed=0, batch=None, num_classes=3):
    batch = small_batch() if batch is None else batch
    result = method.training_step(model, batch, context(epoch, seed, num_classes))
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in [*model.named_parameters(), *method.named_parameters()] if p.grad is not None}


def test_acceleration_multiplies_encoder_gradients_by_one_plus_rho_inside_the_window():
    model, method = small_model(), cal(modulation_starts=1)
    method.setup(model, context())
    copies = [(copy.deepcopy(model), copy.deepcopy(method)) for _ in range(3)]
    before, plain = gradients(*copies[0], epoch=0)
    after, accelerated = gradients(*copies[1], epoch=1)
    assert after.loss.item() == before.loss.item()  # same noise, same forward pass
    assert set(after.losses) == {"fused", "unimodal", "kl"}
    assert after.encoder_outputs is not after.features  # scaled before the bottleneck, heads read the codes
    logs = copies[1][1].on_epoch_end(None, context(1))  # ρ of the one step taken
    assert logs["cal/accelerating"] == 1.0
    rho = {m: logs[f"cal/rho/{m}"] for m in "ab"}
    for name, grad in accelerated.items():
        factor = 1 + rho[name.split(".")[1]] if name.startswith("encoders.") else 1.0
        assert torch.allclose(grad, factor * plain[name], rtol=1e-5, atol=1e-8), name
    copies[2][1].config.acceleration = False
    _, switched_off = gradients(*copies[2], epoch=1)
    assert all(torch.equal(switched_off[n], plain[n]) for n in switched_off if n.startswith("encoders."))


def test_without_bottleneck_and_before_the_window_it_trains_like_joint_with_unimodal_heads():
    model, method = small_model(), cal(bottleneck=False)
    method.setup(model, context())
    assert len(method.mu) == 0 and not list(method.parameters())
    result, grads = gradients(copy.deepcopy(model), method, epoch=4)  # modulation_starts defaults to 5
    reference_model = copy.deepcopy(model)
    expected = part("joint", unimodal_weight=1.0).training_step(reference_model, small_batch(), context())
    expected.loss.backward()
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    for name, p in reference_model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-8), name
    logs = method.on_epoch_end(model, context(4))
    assert logs["cal/KL/a"] == 0.0 and logs["cal/accelerating"] == 0.0


def test_epoch_logs_are_means_over_the_steps():
    model, method = small_model(), cal()
    method.setup(model, context())
    method.on_epoch_start(model, context())
    for _ in range(2):
        method.training_step(model, small_batch(), context())
    logs = method.on_epoch_end(model, context())
    keys = {f"cal/{name}/{m}" for name in ("I", "D", "W", "rho", "beta", "KL") for m in "ab"}
    assert keys <= set(logs)
    assert logs["cal/rho/a"] + logs["cal/rho/b"] == pytest.approx(1.0)
    assert (logs["cal/beta/a"] > logs["cal/beta/b"]) == (logs["cal/rho/a"] < logs["cal/rho/b"])
    method.on_epoch_start(model, context(1))
    assert method.on_epoch_end(model, context(1)) == {"cal/accelerating": 0.0}


def test_epoch_logs_of_a_hand_batch():
    # both parts see the hand batch twice; the same batch twice leaves W's moving average where it was
    model = hand_model("ab")
    objective = cal(num_classes=2, bottleneck=False)
    objective.setup(model, context(num_classes=2))
    plugin = cal_accel(num_classes=2)
    for method, parts in ((Method([objective]), [objective]), (Method([part("joint", num_classes=2), plugin]), [plugin])):
        method.on_epoch_start(model, context(num_classes=2))
        for _ in range(2):
            method.training_step(model, hand_batch(), context(num_classes=2))
    logs = Method([objective]).on_epoch_end(model, context(num_classes=2))
    # β = 1e-3 (1 − ρ) · 2/1 = 2e-3 (ρ_b, ρ_a); no bottleneck: KL = 0
    expected = {"I": HAND_I, "D": HAND_D, "W": HAND_W, "rho": HAND_RHO, "beta": (2e-3 * HAND_RHO[1], 2e-3 * HAND_RHO[0]), "KL": (0.0, 0.0)}
    assert set(logs) == {"cal/accelerating"} | {f"cal/{name}/{m}" for name in expected for m in "ab"}
    for name, values in expected.items():
        for m, value in zip("ab", values):
            assert logs[f"cal/{name}/{m}"] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, m)
    logs = plugin.on_epoch_end(model, context(num_classes=2))
    # the plugin logs the contribution only: no bottleneck, so no β or KL
    assert set(logs) == {"cal_accel/accelerating"} | {f"cal_accel/{name}/{m}" for name in ("I", "D", "W", "rho") for m in "ab"}
    assert logs["cal_accel/accelerating"] == 0.0  # modulation_starts defaults to 5
    for name in ("I", "D", "W", "rho"):
        for m, value in zip("ab", expected[name]):
            assert logs[f"cal_accel/{name}/{m}"] == pytest.approx(value, rel=1e-5), (name, m)
    assert plugin.tracker.updates.item() == 2


def test_state_dict_keeps_the_moving_averages_and_the_bottleneck():
    model, method = small_model(), cal(confidence="ema")
    method.setup(model, context())
    method.tracker.update(torch.tensor([0.3, 0.1]), torch.tensor([0.6, 0.4]))
    method.tracker.update(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.7]))
    restored = cal(confidence="ema")
    restored.setup(model, context())
    restored.load_state_dict(method.state_dict())
    for name in ("contribution_average", "confidence_average", "updates"):
        assert torch.equal(getattr(restored.tracker, name), getattr(method.tracker, name))
    assert torch.equal(restored.mu["b"].weight, method.mu["b"].weight)
    assert not any("shapley_weights" in key for key in method.state_dict())  # a constant of the modalities


def test_config_and_modalities_are_validated():
    with pytest.raises(ConfigError, match="cal.contribution"):
        build_config(overrides=["cal.contribution=shapley"], method="cal")
    with pytest.raises(ConfigError, match="cal.warmup_epochs"):  # the old name of modulation_starts
        build_config(overrides=["cal.warmup_epochs=1"], method="cal")
    with pytest.raises(ConfigError, match="cal_accel.temperature"):
        build_config(overrides=["cal_accel.temperature=0"], method="joint+cal_accel")
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        cal(modalities=("a",))
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        cal_accel(modalities=("a",))
    with pytest.raises(ConfigError, match="modulation_ends"):
        cal_accel(modulation_starts=3, modulation_ends=2)


def test_cal_and_cal_accel_are_refused_together():
    with pytest.raises(ConfigError) as error:
        build_config(method="cal+cal_accel")
    message = str(error.value)
    assert "\n" not in message and "'cal'" in message and "'cal_accel'" in message
    # both recommend the same gradient clipping, so either one alone sets it
    assert build_config(method="cal").train.grad_clip == 40.0
    assert build_config(method="midas+cal_accel").train.grad_clip == 40.0


def test_run_logs_cal_quantities(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "cal.modulation_starts=1"]
    train_run(build_config(overrides=overrides, method="cal"), tmp_path, quiet=True)
    lines = [json.loads(l)["method"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["cal/accelerating"] for l in lines] == [0.0, 1.0]
    expected = {f"cal/{name}/{m}" for name in ("I", "D", "W", "rho", "beta", "KL") for m in ("strong", "weak")}
    assert expected <= set(lines[-1])
    assert all(math.isfinite(v) for v in lines[-1].values())


# -- the cal_accel plugin ---------------------------------------------------------------------------
OBJECTIVES = {
    "joint": {},  # fused loss and detached probes: the probes give D
    "midas": {"modulation_starts": 0},  # fused, unimodal and misaligned losses from the first epoch
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_plugin_multiplies_encoder_gradients_by_one_plus_rho_inside_the_window_only(objective):
    model = hand_model("ab", encoder=IdentityLinear)  # features are the hand inputs: ρ = HAND_RHO
    options = OBJECTIVES[objective]

    def run(epoch, plugin=None):
        parts = [part(objective, num_classes=2, **options)] + ([plugin] if plugin is not None else [])
        return gradients(copy.deepcopy(model), Method(parts), epoch, batch=hand_batch(), num_classes=2)

    for epoch, inside in ((0, False), (1, True), (2, True), (3, False)):
        plain_record, plain = run(epoch)
        plugin = cal_accel(num_classes=2, modulation_starts=1, modulation_ends=2)
        record, grads = run(epoch, plugin)
        if objective == "midas":
            assert record.losses["misaligned"].item() > 0  # the misaligned loss reaches the encoders too
        assert record.loss.item() == plain_record.loss.item()  # the forward pass is the objective's
        assert set(grads) == set(plain) and any(name.startswith("encoders.") for name in grads)
        # the tracker moves on every step, in the window or not: first observation taken as it is
        assert plugin.tracker.updates.item() == 1
        assert torch.allclose(plugin.tracker.contribution_average, torch.tensor(HAND_W))
        logs = plugin.on_epoch_end(None, context(epoch, num_classes=2))
        assert logs["cal_accel/accelerating"] == float(inside)
        assert logs["cal_accel/rho/a"] == pytest.approx(HAND_RHO[0], rel=1e-5)
        for name, grad in grads.items():
            if not inside:
                assert torch.equal(grad, plain[name]), (epoch, name)  # exactly the objective's gradients
                continue
            # encoders.a.linear.weight -> 1 + ρ_a ~ 1.695902; encoders.b... -> 1 + ρ_b ~ 1.304098; heads, fusion: 1
            factor = 1 + HAND_RHO["ab".index(name.split(".")[1])] if name.startswith("encoders.") else 1.0
            assert torch.allclose(grad, factor * plain[name], rtol=1e-5, atol=1e-7), (epoch, name)
            if name.startswith("encoders.") and name.endswith("weight"):  # (the mirror-image batch cancels the bias')
                assert plain[name].abs().sum() > 0, name


def test_plugin_reads_the_fused_head_when_the_objective_has_no_unimodal_heads():
    # a record without unimodal logits: D comes from the fused head's zeroed logits fuse(f^{m})
    model = hand_model("ab")
    plugin = cal_accel(num_classes=2)
    objective = part("joint", num_classes=2)
    record = objective.record(model, hand_batch(), model.encode(hand_batch().inputs))
    assert record.unimodal is None
    plugin.on_epoch_start(model, context(num_classes=2))
    plugin.on_forward(record, context(num_classes=2))
    logs = plugin.on_epoch_end(model, context(num_classes=2))
    # with the summing fusion and zero biases, fuse(f^{a}) = f^a: the same D as the identity heads
    for name, values in (("I", HAND_I), ("D", HAND_D), ("rho", HAND_RHO)):
        for m, value in zip("ab", values):
            assert logs[f"cal_accel/{name}/{m}"] == pytest.approx(value, rel=1e-5), (name, m)
    # ... and the fused head's readouts of the unscaled model, cached for any other part
    assert "zeroed" in record._cache


def test_plugin_state_round_trip_gives_the_same_rho():
    model = small_model()
    plugin = cal_accel(confidence="ema", modulation_starts=0)
    method = Method([part("joint"), plugin])
    for seed in (2, 3, 4):  # different batches, so the moving averages hold a history
        method.training_step(model, small_batch(seed=seed), context())
    state = plugin.state_dict()
    assert set(state) == {"tracker.contribution_average", "tracker.confidence_average", "tracker.updates"}
    assert state["tracker.updates"].item() == 3

    def next_rho(candidate):
        candidate.on_epoch_start(model, context())
        Method([part("joint"), candidate]).training_step(model, small_batch(seed=5), context())
        logs = candidate.on_epoch_end(model, context())
        return torch.tensor([logs[f"cal_accel/rho/{m}"] for m in "ab"])

    restored = cal_accel(confidence="ema", modulation_starts=0)
    restored.load_state_dict(state)
    fresh = cal_accel(confidence="ema", modulation_starts=0)
    expected = next_rho(copy.deepcopy(plugin))
    assert torch.equal(next_rho(restored), expected)
    assert not torch.allclose(next_rho(fresh), expected)  # the restored history is what made them equal
    assert restored.tracker.updates.item() == 4


def test_run_of_midas_with_cal_accel(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "cal_accel.modulation_starts=1"]
    config = build_config(overrides=overrides, method="midas+cal_accel")
    assert config.parts == ["midas", "cal_accel"] and config.section("cal_accel").modulation_starts == 1
    train_run(config, tmp_path, quiet=True)
    lines = [json.loads(l)["method"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["cal_accel/accelerating"] for l in lines] == [0.0, 1.0]
    expected = {f"cal_accel/{name}/{m}" for name in ("I", "D", "W", "rho") for m in ("strong", "weak")}
    expected |= {f"midas/alpha/{m}" for m in ("strong", "weak")}
    for line in lines:
        assert expected <= set(line)
        assert not any(key.startswith("cal/") for key in line)
        assert all(math.isfinite(v) for v in line.values())
        assert line["cal_accel/rho/strong"] + line["cal_accel/rho/weak"] == pytest.approx(1.0)


def test_an_identity_bottleneck_starts_by_passing_the_features_through():
    overrides = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
                 "train.epochs=1", "model.feature_dim=8", "model.hidden_dim=16", "cal.bottleneck_init=identity"]
    trainer = Trainer(build_config(overrides=overrides, method="cal"), None, quiet=True)
    cal = trainer.method.objective
    features = {m: torch.randn(5, 8) for m in cal.modalities}
    cal.eval()
    codes, _ = cal.compress(features)
    assert all(torch.equal(codes[m], features[m]) for m in cal.modalities)  # μ = f at evaluation
    assert all(torch.all(cal.logvar[m].bias == -4.0) and torch.all(cal.logvar[m].weight == 0) for m in cal.modalities)
