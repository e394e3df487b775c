"""ARL: weights from fusion-head predictions on a hand batch, gradient scaling, loss and a full run."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.arl import balance_weights
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel, zero_out
from mmbalance.registry import METHODS
from mmbalance.training import train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log


def context(epoch=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=3, generator=torch.Generator().manual_seed(0), dist=DistributedState(),
    )


def arl(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("arl")
    return cls(cls.Config(**options), list(modalities), num_classes)


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """Features are the inputs and the fusion head sums them: fuse(f^{m}) = f^m."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def test_weights_of_a_hand_batch():
    model, method = hand_model(), arl(num_classes=2)
    inputs = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[LN(19), 0.0], [LN(19), 0.0]])}
    logs = method.training_step(model, Batch(inputs, torch.tensor([0, 1]), torch.arange(2)), context()).logs
    # entropies: a, both rows p = (e, 1)/(1 + e): H = ln(1 + e) − e/(1 + e) ~ 0.582203
    #            b, p = (0.95, 0.05): H = ln 20 − 0.95 ln 19 ~ 0.198515
    h_a, h_b = LN(1 + math.e) - math.e / (1 + math.e), LN(20) - 0.95 * LN(19)
    # normalised: 0.745727, 0.254273 -> b floored at 0.3
    assert logs["arl/entropy/a"].item() == pytest.approx(h_a / (h_a + h_b), rel=1e-5)
    assert logs["arl/entropy/b"].item() == pytest.approx(0.3, rel=1e-6)
    # q ∝ (1/0.745727, 1/0.3) = (1.340973, 3.333333) -> (0.286882, 0.713118)
    q_a = (1 / (h_a / (h_a + h_b))) / (1 / (h_a / (h_a + h_b)) + 1 / 0.3)
    assert logs["arl/q/a"].item() == pytest.approx(q_a, rel=1e-5)
    # c: Σ_classes batch-mean |logit|: a 0.5 + 0.5 = 1, b ln 19 ~ 2.944439 -> (0.253522, 0.746478)
    c_a = 1 / (1 + LN(19))
    assert logs["arl/c/a"].item() == pytest.approx(c_a, rel=1e-5)
    # w = softmax(8 [c_b q_a, c_a q_b]) = softmax(8 [0.214150, 0.180790]) -> w_a = 1/(1 + e^{−0.266877}) ~ 0.566326
    w_a = 1 / (1 + math.exp(-8 * ((1 - c_a) * q_a - c_a * (1 - q_a))))
    assert logs["arl/weight/a"].item() == pytest.approx(w_a, rel=1e-5)
    assert logs["arl/weight/a"].item() + logs["arl/weight/b"].item() == pytest.approx(1.0)


def test_more_than_two_modalities_use_the_mean_dependence_of_the_others():
    stats = balance_weights(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 1.0]), temperature=4.0, entropy_floor=0.3)
    # H normalised (0.25, 0.25, 0.5) -> floored (0.3, 0.3, 0.5); q ∝ (10/3, 10/3, 2) = (5, 5, 3)/13
    assert torch.allclose(stats["q"], torch.tensor([5.0, 5.0, 3.0]) / 13)
    # c = (0.25, 0.5, 0.25); others' mean (0.375, 0.25, 0.375); × q = (1.875, 1.25, 1.125)/13; × T = 4
    assert torch.allclose(stats["weight"], torch.softmax(torch.tensor([7.5, 5.0, 4.5]) / 13, dim=0))
    # two modalities: exactly [c_b q_a, c_a q_b]
    two = balance_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]), temperature=2.0, entropy_floor=0.3)
    assert torch.allclose(two["weight"], torch.softmax(2.0 * torch.tensor([0.75 * 0.5, 0.25 * 0.5]), dim=0))


def test_degenerate_batches_give_equal_weights():
    stats = balance_weights(torch.zeros(2), torch.zeros(2), temperature=8.0, entropy_floor=0.3)
    assert torch.equal(stats["weight"], torch.tensor([0.5, 0.5]))


def test_restricted_logits_add_up_to_the_fused_logits():
    model = hand_model()
    with torch.no_grad():
        model.fusion.linears["a"].bias.copy_(torch.tensor([1.0, -1.0]))
        model.fusion.linears["b"].bias.copy_(torch.tensor([0.5, 2.0]))
    features = {"a": torch.randn(3, 2), "b": torch.randn(3, 2)}
    zeroed = arl(num_classes=2).unimodal_from_fusion(model, features)
    restricted = arl(num_classes=2, unimodal_logits="restricted").unimodal_from_fusion(model, features)
    assert torch.allclose(zeroed[0], features["a"] + torch.tensor([1.5, 1.0]))  # all of the bias
    assert torch.allclose(restricted[0], features["a"] + torch.tensor([0.75, 0.5]))  # half of it
    assert torch.allclose(restricted.sum(0), model.fuse(features))


def small_setup():
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8), ["a", "b"], {"a": (3,), "b": (4,)}, 3)
    inputs = {"a": torch.randn(6, 3), "b": torch.randn(6, 4)}
    return model, Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


def gradients(model, method, batch, epoch):
    result = method.training_step(model, batch, context(epoch))
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_before_start_epoch_gradients_are_those_of_the_plain_loss():
    model, batch = small_setup()
    reference = copy.deepcopy(model)
    result, grads = gradients(model, arl(start_epoch=1), batch, epoch=0)
    features = reference.encode(batch.inputs)
    # CE(fused) + 4 Σ_m CE(fusion head with the other modality zeroed) + the heads' detached probes
    loss = F.cross_entropy(reference.fuse(features), batch.labels) + 4 * sum(
        F.cross_entropy(reference.fuse(zero_out(features, [m])), batch.labels) for m in "ab"
    )
    probes = reference.heads({m: f.detach() for m, f in features.items()})
    loss = loss + sum(F.cross_entropy(z, batch.labels) for z in probes.values())
    loss.backward()
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert result.logs["arl/accelerating"] == 0.0
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-8), name


def test_from_start_epoch_each_encoder_gradient_is_scaled_by_one_plus_its_weight():
    model, batch = small_setup()
    _, plain = gradients(copy.deepcopy(model), arl(start_epoch=1), batch, epoch=0)
    result, scaled = gradients(model, arl(start_epoch=1), batch, epoch=1)
    weight = {m: result.logs[f"arl/weight/{m}"].item() for m in "ab"}
    assert weight["a"] != weight["b"]
    for name, grad in scaled.items():
        factor = 1 + weight[name.split(".")[1]] if name.startswith("encoders.") else 1.0
        assert torch.allclose(grad, factor * plain[name], rtol=1e-5, atol=1e-8), name


def test_config_and_modalities_are_validated():
    with pytest.raises(ConfigError, match="arl.unimodal_logits"):
        build_config(overrides=["arl.unimodal_logits=heads"], method="arl")
    assert build_config(overrides=["arl.temperature=4"], method="arl").method_config.temperature == 4.0
    with pytest.raises(ConfigError, match="two modalities"):
        arl(modalities=("a",))


def test_run_logs_arl_weights(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "arl.start_epoch=1"]
    train_run(build_config(overrides=overrides, method="arl"), tmp_path, quiet=True)
    lines = [json.loads(l)["method"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["arl/accelerating"] for l in lines] == [0.0, 1.0]
    last = lines[-1]
    assert {f"arl/{name}/{m}" for name in ("weight", "entropy", "q", "c") for m in ("strong", "weak")} <= set(last)
    assert last["arl/weight/strong"] + last["arl/weight/weak"] == pytest.approx(1.0)
