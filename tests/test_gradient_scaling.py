"""The backward-only gradient scaling shared by CAL and ARL."""

import copy

import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig
from mmbalance.methods.gradient_scaling import scale_gradient_
from mmbalance.models import build_model


def test_forward_is_unchanged_and_the_gradient_is_multiplied():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = 2 * x
    before = y.clone()
    scale_gradient_(y, 3.0)
    loss = (y**2).sum()  # d loss / dx = 2y * 2 = 8x, scaled by 3 -> 24x
    assert torch.equal(y, before)
    assert loss.item() == 4 * (1 + 4 + 9)
    loss.backward()
    assert torch.equal(x.grad, torch.tensor([24.0, -48.0, 72.0]))


def test_every_use_of_the_tensor_is_scaled_and_a_tensor_factor_broadcasts():
    x = torch.ones(2, 2, requires_grad=True)
    y = x * 1.0
    scale_gradient_(y, torch.tensor([2.0, 0.5]))  # one factor per column
    (y.sum() + (3 * y).sum()).backward()  # unscaled gradient 1 + 3 = 4 everywhere
    assert torch.equal(x.grad, torch.tensor([[8.0, 2.0], [8.0, 2.0]]))


def test_a_tensor_without_gradient_is_left_alone():
    assert scale_gradient_(torch.ones(3), 2.0) is None


def test_only_the_scaled_encoder_sees_the_factor():
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8), ["a", "b"], {"a": (3,), "b": (5,)}, 3)
    reference = copy.deepcopy(model)
    inputs = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for net, factor in ((model, 1.5), (reference, None)):
        features = net.encode(inputs)
        if factor is not None:
            scale_gradient_(features["a"], factor)
        loss = F.cross_entropy(net.fuse(features), labels) + sum(F.cross_entropy(z, labels) for z in net.heads(features).values())
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        expected = 1.5 * q.grad if name.startswith("encoders.a.") else q.grad
        assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-8), name
