import pytest
import torch

from mmbalance.config import ModelConfig
from mmbalance.errors import ConfigError
from mmbalance.models import build_model, zero_out
from mmbalance.models.encoders import build_encoder


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("mlp", (12,), 8),
        ("cnn", (40,), 8),  # a raw 1-D signal
        ("cnn", (2, 40), 8),  # 1-D with channels
        ("cnn", (1, 20, 16), 8),  # a spectrogram
        ("cnn", (3, 3, 16, 16), 8),  # frames folded into the batch
        ("resnet18", (1, 32, 24), 8),
        ("resnet18", (2, 32, 32), 8),  # optical flow
        ("resnet18", (2, 3, 32, 32), 512 // 64),
    ],
)
def test_encoders_give_batch_by_feature(name, shape, expected):
    feature_dim = 8
    encoder = build_encoder(name, shape, feature_dim, 16, 0.0)
    out = encoder(torch.randn(5, *shape))
    assert out.shape == (5, feature_dim)


def test_frames_are_pooled_over_time():
    encoder = build_encoder("cnn", (3, 1, 8, 8), 4, 8, 0.0).eval()
    frame = torch.randn(2, 1, 1, 8, 8)
    same = frame.repeat(1, 3, 1, 1, 1)
    single = build_encoder("cnn", (1, 1, 8, 8), 4, 8, 0.0).eval()
    single.load_state_dict(encoder.state_dict())
    assert torch.allclose(encoder(same), single(frame), atol=1e-6)


def test_resnet_refuses_vectors():
    with pytest.raises(ConfigError, match="resnet18 needs 2-D inputs"):
        build_encoder("resnet18", (12,), 8, 16, 0.0)


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_model_encode_fuse_heads_with_any_feature_dict(fusion):
    config = ModelConfig(fusion=fusion, feature_dim=6, hidden_dim=10)
    model = build_model(config, ["a", "b", "c"], {"a": (4,), "b": (7,), "c": (1, 8, 8)}, num_classes=5)
    inputs = {"a": torch.randn(3, 4), "b": torch.randn(3, 7), "c": torch.randn(3, 1, 8, 8)}
    features = model.encode(inputs)
    assert {m: f.shape for m, f in features.items()} == {m: (3, 6) for m in "abc"}
    assert model.fuse(features).shape == (3, 5)
    assert model(inputs).shape == (3, 5)
    swapped = {"a": features["a"], "b": features["b"].flip(0), "c": features["c"]}
    assert model.fuse(swapped).shape == (3, 5)
    zeroed = zero_out(features, ["a"])
    assert torch.equal(zeroed["b"], torch.zeros(3, 6)) and torch.equal(zeroed["a"], features["a"])
    assert model.fuse(zeroed).shape == (3, 5)
    assert {m: z.shape for m, z in model.heads(features).items()} == {m: (3, 5) for m in "abc"}


def test_concat_fusion_is_additive_over_zeroed_modalities():
    """For a linear concat head fuse(f) = fuse(f^a) + fuse(f^b) - fuse(0)."""
    model = build_model(ModelConfig(feature_dim=4), ["a", "b"], {"a": (3,), "b": (3,)}, 3)
    f = model.encode({"a": torch.randn(2, 3), "b": torch.randn(2, 3)})
    lhs = model.fuse(f)
    rhs = model.fuse(zero_out(f, ["a"])) + model.fuse(zero_out(f, ["b"])) - model.fuse(zero_out(f, []))
    assert torch.allclose(lhs, rhs, atol=1e-6)


def test_parameter_groups_partition_the_model():
    model = build_model(ModelConfig(fusion="gated"), ["audio", "visual"], {"audio": (5,), "visual": (6,)}, 3)
    groups = model.parameter_groups()
    grouped = [id(p) for role in groups.values() for params in role.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len(grouped) == len(set(grouped))


def test_unknown_modality_in_encoder_override():
    config = ModelConfig(encoders={"depth": "cnn"})
    with pytest.raises(ConfigError, match="model.encoders names modality 'depth'"):
        build_model(config, ["a", "b"], {"a": (3,), "b": (3,)}, 2)


def test_model_loads_local_pretrained_encoder_weights(tmp_path):
    source = build_encoder("mlp", (5,), 6, 8, 0.0)
    path = tmp_path / "audio.pt"
    torch.save(source.state_dict(), path)
    config = ModelConfig(feature_dim=6, hidden_dim=8, pretrained={"audio": str(path)})
    model = build_model(config, ["audio", "video"], {"audio": (5,), "video": (3,)}, 2)
    for name, value in source.state_dict().items():
        assert torch.equal(model.encoders["audio"].state_dict()[name], value)
    with pytest.raises(ConfigError, match=r"^mlp encoder weights in .*audio.pt do not fit: "):
        build_model(ModelConfig(feature_dim=4, pretrained={"audio": str(path)}), ["audio", "video"], {"audio": (5,), "video": (3,)}, 2)
    with pytest.raises(ConfigError, match="mlp encoder weights not found"):
        build_model(ModelConfig(pretrained={"audio": str(tmp_path / "no.pt")}), ["audio", "video"], {"audio": (5,), "video": (3,)}, 2)
    with pytest.raises(ConfigError, match="model.pretrained names modality 'depth'"):
        build_model(ModelConfig(pretrained={"depth": str(path)}), ["audio", "video"], {"audio": (5,), "video": (3,)}, 2)
