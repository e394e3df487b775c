"""CAL: Shapley contributions, W and ρ, the bottleneck, gradient acceleration, logs and a full run."""

import copy
import json
import math

import pytest
import torch

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.cal import compression_strength, contribution, gaussian_kl
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log


def context(epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=3, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def cal(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("cal")
    return cls(cls.Config(**options), list(modalities), num_classes)


def small_model(modalities=("a", "b")):
    torch.manual_seed(0)
    shapes = {m: (3 + k,) for k, m in enumerate(modalities)}
    return build_model(ModelConfig(feature_dim=4, hidden_dim=8), list(modalities), shapes, 3)


def small_batch(modalities=("a", "b")):
    torch.manual_seed(1)
    inputs = {m: torch.randn(6, 3 + k) for k, m in enumerate(modalities)}
    return Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model(modalities):
    """Features are the inputs; the fusion head sums them and each unimodal head is the identity."""
    model = MultimodalModel({m: Identity((2,), 2) for m in modalities}, SumFusion({m: 2 for m in modalities}, 2), 2)
    with torch.no_grad():
        for layer in [*model.fusion.linears.values(), *model.unimodal_heads.values()]:
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def statistics(modalities, features, labels, **options):
    model = hand_model(modalities)
    method = cal(modalities, num_classes=2, bottleneck=False, **options)
    return method.batch_statistics(model, features, model.heads(features), labels)


def test_shapley_and_confidence_of_two_modalities():
    # label 0; a multiplies the odds of class 0 by 3, b by 2 (sample 1 is the mirror image, label 1)
    features = {"a": torch.tensor([[LN(3), 0.0], [0.0, LN(3)]]), "b": torch.tensor([[LN(2), 0.0], [0.0, LN(2)]])}
    marginal, confidence = statistics("ab", features, torch.tensor([0, 1]))
    # v(∅) = 1/2, v(a) = 3/4, v(b) = 2/3, v(ab) = 6/7
    # I(a) = ½(3/4 − 1/2) + ½(6/7 − 2/3) = ½(1/4 + 4/21) = 37/168; I(b) = ½(1/6 + 3/28) = 23/168
    assert torch.allclose(marginal, torch.tensor([37 / 168, 23 / 168]))
    assert marginal.sum().item() == pytest.approx(6 / 7 - 1 / 2)  # efficiency
    assert torch.allclose(confidence, torch.tensor([3 / 4, 2 / 3]))  # the unimodal heads' true-class probabilities


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


def test_rho_is_a_softmax_of_the_smoothed_contribution():
    method = cal(temperature=4.0)
    marginal = torch.tensor([0.3, 0.1])  # shares 3/4, 1/4
    _, weight, rho = method.update_contribution(marginal, torch.tensor([2 / 3, 0.4]))  # W = (0.5, 0.1), taken as is
    assert torch.allclose(weight, torch.tensor([0.5, 0.1]))
    # ρ_a = e^{4·0.5} / (e^{4·0.5} + e^{4·0.1}) = 1 / (1 + e^{−1.6}) ~ 0.832018
    assert torch.allclose(rho, torch.tensor([1 / (1 + math.exp(-1.6)), 1 / (1 + math.exp(1.6))]))
    _, weight, rho = method.update_contribution(marginal, torch.tensor([0.4, 0.8]))  # W = (0.3, 0.2)
    # EMA, momentum 0.9: 0.9 (0.5, 0.1) + 0.1 (0.3, 0.2) = (0.48, 0.11); ρ_a = 1 / (1 + e^{−4·0.37})
    assert torch.allclose(weight, torch.tensor([0.48, 0.11]))
    assert rho[0].item() == pytest.approx(1 / (1 + math.exp(-1.48)), rel=1e-6)
    assert method.updates.item() == 2


def test_confidence_moving_average_option():
    method = cal(confidence="ema", contribution="confidence")
    method.update_contribution(torch.zeros(2), torch.tensor([0.2, 0.6]))
    confidence, weight, _ = method.update_contribution(torch.zeros(2), torch.tensor([0.4, 1.0]))
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


def test_evaluation_reads_mu_and_training_samples():
    model, method = small_model(), cal()
    method.setup(model, context())
    inputs = small_batch().inputs
    features = model.encode(inputs)
    sampled = [method.encode(model, inputs)["a"] for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])
    method.eval()
    codes = method.encode(model, inputs)
    assert torch.equal(codes["a"], method.mu["a"](features["a"]))
    assert torch.equal(method.predict(model, inputs), method.predict(model, inputs))
    assert torch.equal(method.predict(model, inputs), model.fuse({m: method.mu[m](f) for m, f in features.items()}))


def gradients(model, method, epoch, seed=0):
    result = method.training_step(model, small_batch(), context(epoch, seed))
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in [*model.named_parameters(), *method.named_parameters()]}


def test_acceleration_multiplies_encoder_gradients_by_one_plus_rho_after_warmup():
    model, method = small_model(), cal(warmup_epochs=1)
    method.setup(model, context())
    copies = [(copy.deepcopy(model), copy.deepcopy(method)) for _ in range(3)]
    before, plain = gradients(*copies[0], epoch=0)
    after, accelerated = gradients(*copies[1], epoch=1)
    assert after.loss.item() == before.loss.item()  # same noise, same forward pass
    logs = copies[1][1].on_epoch_end(None, context(1))  # ρ of the one step taken
    assert logs["cal/accelerating"] == 1.0
    rho = {m: logs[f"cal/rho/{m}"] for m in "ab"}
    for name, grad in accelerated.items():
        factor = 1 + rho[name.split(".")[1]] if name.startswith("encoders.") else 1.0
        assert torch.allclose(grad, factor * plain[name], rtol=1e-5, atol=1e-8), name
    copies[2][1].config.acceleration = False
    _, switched_off = gradients(*copies[2], epoch=1)
    assert all(torch.equal(switched_off[n], plain[n]) for n in switched_off if n.startswith("encoders."))


def test_without_bottleneck_and_before_warmup_it_trains_like_joint_with_unimodal_heads():
    model, method = small_model(), cal(bottleneck=False)
    method.setup(model, context())
    assert len(method.mu) == 0 and not list(method.parameters())
    result, grads = gradients(copy.deepcopy(model), method, epoch=0)
    joint = METHODS.get("joint")
    reference_model = copy.deepcopy(model)
    expected = joint(joint.Config(unimodal_weight=1.0), ["a", "b"], 3).training_step(reference_model, small_batch(), context())
    expected.loss.backward()
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    for name, p in reference_model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-8), name
    logs = method.on_epoch_end(model, context())
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


def test_state_dict_keeps_the_moving_averages_and_the_bottleneck():
    model, method = small_model(), cal(confidence="ema")
    method.setup(model, context())
    method.update_contribution(torch.tensor([0.3, 0.1]), torch.tensor([0.6, 0.4]))
    method.update_contribution(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.7]))
    restored = cal(confidence="ema")
    restored.setup(model, context())
    restored.load_state_dict(method.state_dict())
    for name in ("contribution_average", "confidence_average", "updates"):
        assert torch.equal(getattr(restored, name), getattr(method, name))
    assert torch.equal(restored.mu["b"].weight, method.mu["b"].weight)
    assert "shapley_weights" not in method.state_dict()  # a constant of the modalities


def test_config_and_modalities_are_validated():
    with pytest.raises(ConfigError, match="cal.contribution"):
        build_config(overrides=["cal.contribution=shapley"], method="cal")
    with pytest.raises(ConfigError, match="two modalities"):
        cal(modalities=("a",))


def test_run_logs_cal_quantities(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "cal.warmup_epochs=1"]
    train_run(build_config(overrides=overrides, method="cal"), tmp_path, quiet=True)
    lines = [json.loads(l)["method"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["cal/accelerating"] for l in lines] == [0.0, 1.0]
    expected = {f"cal/{name}/{m}" for name in ("I", "D", "W", "rho", "beta", "KL") for m in ("strong", "weak")}
    assert expected <= set(lines[-1])
    assert all(math.isfinite(v) for v in lines[-1].values())
