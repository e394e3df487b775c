import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.models import build_model
from mmbalance.registry import METHODS


def make(method, **options):
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8), ["a", "b"], {"a": (3,), "b": (5,)}, 3)
    cls = METHODS.get(method)
    return model, cls(cls.Config(**options), ["a", "b"], 3)


def batch():
    torch.manual_seed(0)
    return Batch({"a": torch.randn(6, 3), "b": torch.randn(6, 5)}, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_joint_loss_is_fused_ce_plus_detached_probe():
    model, method = make("joint")
    b = batch()
    result = method.training_step(model, b, None)
    assert set(result.losses) == {"fused", "probe"}
    features = model.encode(b.inputs)
    expected = F.cross_entropy(model.fuse(features), b.labels)
    probes = sum(F.cross_entropy(z, b.labels) for z in model.heads({m: f.detach() for m, f in features.items()}).values())
    assert result.loss.item() == pytest.approx((expected + probes).item(), rel=1e-6)
    g = grads(model, result.loss)
    g_fused = grads(model, F.cross_entropy(model.fuse(model.encode(b.inputs)), b.labels))
    for name, value in g.items():
        if name.startswith("encoders") or name.startswith("fusion"):
            assert torch.allclose(value, g_fused[name], atol=1e-6), name  # probes never reach the encoders


def test_joint_with_unimodal_weight_trains_heads_into_encoders():
    model, method = make("joint", unimodal_weight=0.5)
    b = batch()
    result = method.training_step(model, b, None)
    features = model.encode(b.inputs)
    heads = model.heads(features)
    expected = F.cross_entropy(model.fuse(features), b.labels) + 0.5 * sum(F.cross_entropy(z, b.labels) for z in heads.values())
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unimodal_keeps_modalities_apart():
    model, method = make("unimodal")
    b = batch()
    result = method.training_step(model, b, None)
    g = grads(model, result.loss)
    assert all(v is None or torch.count_nonzero(v) >= 0 for v in g.values())
    # the loss on 'a' alone does not depend on b's encoder and vice versa
    b2 = Batch({"a": b.inputs["a"], "b": torch.randn(6, 5)}, b.labels, b.index)
    first = method.training_step(model, b, None).losses["a"]
    second = method.training_step(model, b2, None).losses["a"]
    assert float(first.detach()) == pytest.approx(float(second.detach()))


def test_unimodal_single_modality_predicts_from_that_head():
    model, method = make("unimodal", modality="b")
    b = batch()
    logits = method.predict_from_features(model, method.encode(model, b.inputs))
    assert torch.allclose(logits, F.log_softmax(model.heads(model.encode(b.inputs))["b"], -1))


def test_unimodal_rejects_unknown_modality():
    with pytest.raises(ConfigError, match=r"unimodal.modality: 'c' \(allowed: all, a, b\)"):
        make("unimodal", modality="c")
