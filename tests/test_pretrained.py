"""torchvision-format ResNet-18 weights load into our resnet18 encoder (model.pretrained), key by key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbalance
from mmbalance.config import ModelConfig
from mmbalance.errors import ConfigError
from mmbalance.models.encoders import build_encoder
from mmbalance.models.multimodal import build_model
from mmbalance.models.pretrained import TORCHVISION_RESNET18, torchvision_resnet_key


def batch_norm(prefix: str, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(width, generator=generator) + 0.5,
        f"{prefix}.bias": torch.randn(width, generator=generator),
        f"{prefix}.running_mean": torch.randn(width, generator=generator),
        f"{prefix}.running_var": torch.rand(width, generator=generator) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000),
    }


def torchvision_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision.models.resnet18().state_dict()'s keys and shapes, with random values (no torchvision needed)."""
    g = torch.Generator().manual_seed(seed)
    state = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), **batch_norm("bn1", 64, g)}
    widths = {1: 64, 2: 128, 3: 256, 4: 512}
    for layer, width in widths.items():
        for block in (0, 1):
            prefix = f"layer{layer}.{block}"
            cin = widths[layer - 1] if layer > 1 and block == 0 else width
            state[f"{prefix}.conv1.weight"] = torch.randn(width, cin, 3, 3, generator=g)
            state.update(batch_norm(f"{prefix}.bn1", width, g))
            state[f"{prefix}.conv2.weight"] = torch.randn(width, width, 3, 3, generator=g)
            state.update(batch_norm(f"{prefix}.bn2", width, g))
            if layer > 1 and block == 0:
                state[f"{prefix}.downsample.0.weight"] = torch.randn(width, cin, 1, 1, generator=g)
                state.update(batch_norm(f"{prefix}.downsample.1", width, g))
    state["fc.weight"] = torch.randn(1000, 512, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def saved(tmp_path, state, name="resnet18.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_the_test_state_dict_has_torchvisions_layout():
    state = torchvision_resnet18_state()
    assert len(state) == 122  # len(torchvision.models.resnet18().state_dict())
    assert state["layer3.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert [torchvision_resnet_key(k) for k in ("conv1.weight", "bn1.running_var", "layer2.0.downsample.1.bias", "fc.weight")] == [
        "stem.0.weight", "stem.1.running_var", "stages.1.0.shortcut.1.bias", None]


def test_spectrogram_encoder_gets_every_tensor_and_the_mean_of_the_rgb_filters(tmp_path):
    state = torchvision_resnet18_state()
    encoder = build_encoder("resnet18", (1, 32, 32), 512, 16, 0.0)
    report = encoder.load_pretrained(saved(tmp_path, state))
    ours = encoder.state_dict()
    assert torch.equal(ours["stem.0.weight"], state["conv1.weight"].mean(dim=1, keepdim=True))
    assert ours["stem.0.weight"].shape == (64, 1, 7, 7)
    for theirs, value in state.items():
        if theirs.startswith("fc.") or theirs == "conv1.weight":
            continue
        assert torch.equal(ours[torchvision_resnet_key(theirs)], value), theirs
    # a few mapped by hand
    assert torch.equal(ours["stem.1.running_mean"], state["bn1.running_mean"])
    assert torch.equal(ours["stages.1.0.shortcut.0.weight"], state["layer2.0.downsample.0.weight"])
    assert torch.equal(ours["stages.3.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert report is encoder.pretrained_report and report.layout == TORCHVISION_RESNET18
    assert len(report.loaded) == 120 and report.not_loaded == [] and report.ignored == ["fc.weight", "fc.bias"]
    summary = report.summary()
    assert "\n" not in summary and summary.startswith("loaded 120 of 120 tensors from ")
    assert "conv1 averaged over its RGB inputs for 1 input channel" in summary and "ignored fc.weight, fc.bias" in summary
    encoder.eval()
    assert encoder(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_flow_repeats_the_mean_and_rgb_frames_take_the_filters_as_they_are(tmp_path):
    state = torchvision_resnet18_state(seed=1)
    path = saved(tmp_path, state)
    flow = build_encoder("resnet18", (2, 32, 32), 16, 16, 0.0)
    report = flow.load_pretrained(path)
    mean = state["conv1.weight"].mean(dim=1, keepdim=True)
    assert torch.equal(flow.state_dict()["stem.0.weight"], torch.cat([mean, mean], dim=1))
    assert report.not_loaded == ["proj.weight", "proj.bias"]  # feature_dim 16 adds a projection of our own
    assert "kept as initialised: proj.weight, proj.bias" in report.summary()
    frames = build_encoder("resnet18", (3, 3, 32, 32), 512, 16, 0.0)  # (T, C, H, W)
    report = frames.load_pretrained(path)
    assert torch.equal(frames.state_dict()["stem.0.weight"], state["conv1.weight"]) and report.adapted == []


def test_model_pretrained_reads_torchvision_weights_and_training_says_so(tmp_path, capsys):
    path = saved(tmp_path, torchvision_resnet18_state())
    config = ModelConfig(encoders={"image": "resnet18"}, pretrained={"image": str(path)}, feature_dim=8, hidden_dim=16)
    model = build_model(config, ["image", "audio"], {"image": (1, 8, 8), "audio": (5,)}, 3)
    assert torch.equal(model.encoders["image"].stem[0].weight, torchvision_resnet18_state()["conv1.weight"].mean(1, keepdim=True))

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    data = mmbalance.DataBundle.from_tensors(
        {"image": rng.standard_normal((60, 1, 8, 8)), "audio": rng.standard_normal((60, 5))}, labels, seed=0)
    overrides = {"model.encoders": {"image": "resnet18"}, "model.pretrained": {"image": str(path)}, "train.epochs": 1,
                 "model.feature_dim": 8, "model.hidden_dim": 16}
    mmbalance.train(data=data, out=tmp_path / "run", overrides=overrides, quiet=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("image encoder: ")]
    assert len(lines) == 1 and "loaded 120 of 122 tensors" in lines[0] and "kept as initialised: proj.weight" in lines[0]


def test_own_layout_still_loads_exactly(tmp_path):
    source = build_encoder("resnet18", (1, 16, 16), 8, 16, 0.0)
    target = build_encoder("resnet18", (1, 16, 16), 8, 16, 0.0)
    report = target.load_pretrained(saved(tmp_path, source.state_dict()))
    assert report.layout == "own" and len(report.loaded) == 122 and "its own layout" in report.summary()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    # our layout without the projection: the exact load names what is missing
    bare = build_encoder("resnet18", (1, 16, 16), 512, 16, 0.0)
    with pytest.raises(ConfigError, match=r"^resnet18 encoder weights in .* do not fit: Missing key\(s\).*proj"):
        target.load_pretrained(saved(tmp_path, bare.state_dict(), "bare.pt"))


class NotAWeight:
    pass


def test_weights_in_no_known_layout_are_one_line(tmp_path):
    encoder = build_encoder("resnet18", (1, 16, 16), 512, 16, 0.0)

    def refused(state, pattern):
        with pytest.raises(ConfigError) as caught:
            encoder.load_pretrained(saved(tmp_path, state, "w.pt"))
        message = str(caught.value)
        assert "\n" not in message and pattern in message, message

    refused({"features.0.weight": torch.zeros(3)}, "fit neither its own layout (stem.0.weight")
    deeper = torchvision_resnet18_state()
    deeper["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # ResNet-34 has three blocks in layer1
    refused(deeper, "has 'layer1.2.conv1.weight', which ResNet-18 does not")
    partial = torchvision_resnet18_state()
    del partial["layer4.1.bn2.weight"]
    refused(partial, "lacks 'layer4.1.bn2.weight'")
    misshapen = torchvision_resnet18_state()
    misshapen["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    refused(misshapen, "'layer2.0.conv1.weight' in")
    refused({"conv1.weight": NotAWeight(), "layer1.0.conv1.weight": torch.zeros(1)}, "cannot load resnet18 encoder weights")
    # counters older PyTorch did not save are not needed
    old = {k: v for k, v in torchvision_resnet18_state().items() if not k.endswith("num_batches_tracked")}
    report = encoder.load_pretrained(saved(tmp_path, old, "old.pt"))
    assert len(report.loaded) == 100 and all(k.endswith("num_batches_tracked") for k in report.not_loaded)
