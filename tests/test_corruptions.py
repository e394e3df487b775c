"""Test-time corruptions: their statistics, which samples they touch, and reproducibility."""

import pytest
import torch

from mmbalance.data.batch import Batch
from mmbalance.data.corruptions import build_corruption
from mmbalance.errors import MMBalanceError
from mmbalance.registry import CORRUPTIONS


def make_batch(n=2000, index=None, **inputs):
    return Batch(inputs=inputs, labels=torch.zeros(n, dtype=torch.long),
                 index=torch.arange(n) if index is None else index)


def corrupt(name, level, x, fraction=1.0, seed=0, options=None):
    batch = make_batch(len(x), m=x)
    return build_corruption(name, level, fraction, seed, options)(batch, ["m"]).inputs["m"]


def test_registry_lists_every_corruption():
    assert CORRUPTIONS.names() == ["blur", "feature_dropout", "gaussian", "missing", "salt_pepper", "token_mask"]


def test_gaussian_std_is_level_times_the_sample_std():
    x = 3 * torch.randn(2000, 256, generator=torch.Generator().manual_seed(1)) + 5
    noise = corrupt("gaussian", 0.5, x) - x
    ratio = noise.std(dim=1) / (0.5 * x.std(dim=1, correction=0))
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    absolute = corrupt("gaussian", 0.5, x, options={"absolute": True}) - x
    assert absolute.std().item() == pytest.approx(0.5, rel=0.01)


def test_only_the_requested_fraction_is_touched_and_the_rest_is_bit_identical():
    x = torch.randn(20000, 4)
    out = corrupt("gaussian", 1.0, x, fraction=0.3)
    touched = (out != x).any(dim=1)
    assert touched.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert torch.equal(out[~touched], x[~touched])
    assert (out[touched] != x[touched]).all()


def test_same_samples_touched_at_every_level_and_for_every_modality():
    x = torch.randn(500, 4)
    batch = make_batch(500, a=x, b=x.clone())
    touched = [
        (build_corruption("gaussian", level)(batch, ["a", "b"]).inputs[m] != x).any(dim=1)
        for level in (0.5, 1.0) for m in ("a", "b")
    ]
    assert all(torch.equal(t, touched[0]) for t in touched)
    both = build_corruption("gaussian", 1.0)(batch, ["a", "b"]).inputs
    assert not torch.equal(both["a"][touched[0]], both["b"][touched[0]])  # independent noise per modality


@pytest.mark.parametrize("name, x", [
    ("gaussian", torch.randn(300, 2, 6, 6)),
    ("salt_pepper", torch.rand(300, 1, 6, 6)),
    ("blur", torch.rand(300, 3, 6, 6)),
    ("token_mask", torch.randint(2, 100, (300, 12))),
    ("feature_dropout", torch.randn(300, 5)),
    ("missing", torch.randn(300, 5)),
])
def test_reproducible_and_independent_of_batch_size_and_order(name, x):
    corruption = build_corruption(name, 2.0, seed=7)
    whole = corruption(make_batch(300, m=x), ["m"]).inputs["m"]
    again = build_corruption(name, 2.0, seed=7)(make_batch(300, m=x), ["m"]).inputs["m"]
    assert torch.equal(whole, again)
    order = torch.randperm(300)
    pieces = [corruption(make_batch(len(rows), index=rows, m=x[rows]), ["m"]).inputs["m"] for rows in order.split(37)]
    assert torch.equal(torch.cat(pieces), whole[order])
    other_seed = build_corruption(name, 2.0, seed=8)(make_batch(300, m=x), ["m"]).inputs["m"]
    assert not torch.equal(other_seed, whole)


def test_level_zero_changes_nothing():
    batch = make_batch(10, m=torch.randn(10, 3))
    for name in ("gaussian", "feature_dropout", "missing"):
        assert build_corruption(name, 0.0)(batch, ["m"]) is batch


def test_salt_and_pepper_density_and_values():
    x = torch.rand(400, 1, 32, 32)
    out = corrupt("salt_pepper", 2.0, x)  # density 0.1 x 2
    changed = out != x
    assert changed.float().mean().item() == pytest.approx(0.2, abs=0.01)
    low = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    high = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    is_salt = out[changed] == high[changed]
    assert (is_salt | (out[changed] == low[changed])).all()
    assert is_salt.float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_token_mask_probability_is_a_tenth_of_the_level_and_keeps_padding():
    tokens = torch.randint(10, 1000, (2000, 50))
    tokens[:, 40:] = 0  # padding
    out = corrupt("token_mask", 3.0, tokens)
    replaced = out != tokens
    assert replaced[:, :40].float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert (out[replaced] == 1).all() and not replaced[:, 40:].any()
    custom = corrupt("token_mask", 3.0, tokens, options={"unk_id": 7})
    assert torch.equal(custom != tokens, replaced) and (custom[replaced] == 7).all()


def test_feature_dropout_probability_is_the_level():
    x = torch.rand(2000, 100) + 1
    assert (corrupt("feature_dropout", 0.25, x) == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_missing_gives_zeros_for_the_touched_samples():
    tokens = torch.randint(2, 100, (1000, 8))
    out = corrupt("missing", 1.0, tokens, fraction=0.5)
    touched = (out != tokens).any(dim=1)
    assert (out[touched] == 0).all() and torch.equal(out[~touched], tokens[~touched])
    assert touched.float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_blur_keeps_a_constant_image_and_reduces_variance():
    constant = torch.full((4, 3, 16, 16), 0.7)
    assert torch.allclose(corrupt("blur", 1.5, constant), constant)
    image = torch.rand(50, 3, 32, 32)
    mild, strong = corrupt("blur", 0.5, image), corrupt("blur", 2.0, image)
    assert mild.mean().item() == pytest.approx(image.mean().item(), abs=1e-3)
    assert image.var() > mild.var() > strong.var()
    video = torch.rand(2, 5, 3, 16, 16)
    assert corrupt("blur", 1.0, video).shape == video.shape


@pytest.mark.parametrize("name, x, expected", [
    ("blur", torch.randn(4, 8), "corruption 'blur' cannot apply to modality 'm' (per-sample shape (8,), dtype float32)"),
    ("salt_pepper", torch.randn(4, 8), "per-sample shape (8,)"),
    ("token_mask", torch.randn(4, 8), "corruption 'token_mask' cannot apply to modality 'm'"),
    ("gaussian", torch.randint(0, 9, (4, 8)), "dtype int64"),
])
def test_incompatible_modality_is_a_one_line_error(name, x, expected):
    with pytest.raises(MMBalanceError) as error:
        corrupt(name, 1.0, x)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("level, fraction, match", [(-1.0, 0.5, "level"), (float("nan"), 0.5, "level"), (1.0, 1.5, "fraction")])
def test_bad_level_or_fraction(level, fraction, match):
    with pytest.raises(MMBalanceError, match=match):
        build_corruption("gaussian", level, fraction)
