"""The MIDAS method: warm-up, total loss, α's update in the step, and full runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log


def context(epoch=0, max_epochs=10, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=max_epochs, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=3, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def midas(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("midas")
    return cls(cls.Config(**options), list(modalities), num_classes)


def small_model(modalities=("a", "b"), fusion="concat"):
    shapes = {m: (3 + k,) for k, m in enumerate(modalities)}
    return build_model(ModelConfig(feature_dim=4, hidden_dim=8, fusion=fusion), list(modalities), shapes, 3)


def small_batch(modalities=("a", "b")):
    torch.manual_seed(0)
    inputs = {m: torch.randn(6, 3 + k) for k, m in enumerate(modalities)}
    return Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """Inputs are features, features are the heads' logits, fusion sums them (test_misalignment's hand batch)."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in [*model.fusion.linears.values(), *model.unimodal_heads.values()]:
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    inputs = {"a": torch.tensor([[LN(9), 0.0], [0.0, LN(4)]]), "b": torch.tensor([[LN(7), LN(3)], [LN(7), LN(3)]])}
    return model, Batch(inputs, torch.tensor([0, 1]), torch.arange(2))


def test_total_loss_of_the_hand_batch():
    model, batch = hand_model()
    method = midas(num_classes=2, lam=2.0, warmup=False)
    result = method.training_step(model, batch, context())
    # aligned fused: sample 0 [ln 63, ln 3] -> p(0) = 21/22; sample 1 [ln 7, ln 12] -> p(1) = 12/19
    align = (LN(22 / 21) + LN(19 / 12)) / 2  # ~ 0.253026
    # heads: a gives 0.9 and 0.8 to the labels, b gives 0.7 (label 0) and 0.3 (label 1)
    unimodal = (LN(10 / 9) + LN(5 / 4)) / 2 + (LN(10 / 7) + LN(10 / 3)) / 2  # ~ 0.164252 + 0.780324
    # the only partners are 0 <-> 1; rows (a_0, b_1) and (a_1, b_0), w = 2 each (f^b_0 = f^b_1), α = 1:
    # c = (0.75, 0.25), p~ = (21/22, 1/22); c = (8/15, 7/15), p~ = (7/19, 12/19) with slot a on label 1
    misaligned = -(0.75 * LN(21 / 22) + 0.25 * LN(1 / 22)) - (8 / 15 * LN(12 / 19) + 7 / 15 * LN(7 / 19))  # ~ 1.518715
    assert result.loss.item() == pytest.approx(align + unimodal + 2.0 * misaligned, rel=1e-5)  # ~ 4.235032
    assert result.logs["midas/misaligned_loss"].item() == pytest.approx(misaligned, rel=1e-5)
    assert result.logs["midas/misaligned_samples"].item() == 4  # each anchor emits both swaps: every row twice
    assert result.logs["midas/confidence/b"].item() == pytest.approx((0.25 + 7 / 15) / 2, rel=1e-5)
    assert result.logs["midas/fused_confidence/b"].item() == pytest.approx((1 / 22 + 7 / 19) / 2, rel=1e-5)
    # α moves after the step: α_b = 1 + 0.05 * ((0.25 + 7/15)/2 - (1/22 + 7/19)/2) ~ 1.0075698
    method.after_step(model, context())
    delta = (0.25 + 7 / 15) / 2 - (1 / 22 + 7 / 19) / 2
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.0, 1 + 0.05 * delta]))
    assert method.on_epoch_end(model, context())["midas/alpha/b"] == pytest.approx(1 + 0.05 * delta, rel=1e-6)


def test_warmup_trains_heads_only_and_alpha_restarts_at_one():
    model, method = small_model(), midas(warmup_epochs=1)
    batch = small_batch()
    result = method.training_step(model, batch, context(epoch=0))
    features = model.encode(batch.inputs)
    expected = sum(F.cross_entropy(z, batch.labels) for z in model.heads(features).values())
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(k.startswith("midas/") for k in result.logs)
    model.zero_grad()
    result.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("fusion"))  # no task loss reaches the fusion head
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(("encoders", "unimodal_heads")))
    method.after_step(model, context(epoch=0))
    assert torch.equal(method.misalignment.alpha, torch.ones(2))
    assert method.on_epoch_end(model, context(epoch=0))["midas/warmup"] == 1.0

    method.misalignment.alpha.fill_(3.0)
    method.on_epoch_start(model, context(epoch=1))  # main training starts
    assert torch.equal(method.misalignment.alpha, torch.ones(2))
    assert method.on_epoch_end(model, context(epoch=1))["midas/warmup"] == 0.0
    assert "midas/misaligned_loss" in method.training_step(model, batch, context(epoch=1)).logs


def test_warmup_length():
    assert midas().warmup_epochs(70) == 10  # 1/7 of the epochs, the authors' 10 of 70
    assert midas().warmup_epochs(2) == 0
    assert midas(warmup_epochs=3).warmup_epochs(70) == 3
    assert midas(warmup=False, warmup_epochs=3).warmup_epochs(70) == 0


def test_feature_and_input_level_give_the_same_loss():
    batch = small_batch()
    model = small_model()
    results = [midas(level=level, warmup=False).training_step(model, batch, context(seed=3)) for level in ("feature", "input")]
    assert results[0].loss.item() == pytest.approx(results[1].loss.item(), rel=1e-6)
    assert results[0].logs["midas/confidence/a"] == pytest.approx(results[1].logs["midas/confidence/a"])


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_three_modalities_with_any_fusion(fusion):
    modalities = ("x", "y", "z")
    model, method = small_model(modalities, fusion), midas(modalities, warmup=False, eta=1.0)
    ctx = context()
    result = method.training_step(model, small_batch(modalities), ctx)
    result.loss.backward()
    assert math.isfinite(result.loss.item())
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert result.logs["midas/misaligned_samples"].item() == 18  # 6 anchors (all have a partner) x 3 shifts
    assert sum(result.logs[f"midas/confidence/{m}"].item() for m in modalities) == pytest.approx(1.0)
    method.after_step(model, ctx)
    logs = method.on_epoch_end(model, ctx)
    assert {f"midas/alpha/{m}" for m in modalities} <= set(logs)
    assert sum(logs[f"midas/alpha/{m}"] != 1.0 for m in modalities) <= 1  # at most the weakest moved


def test_state_dict_keeps_alpha():
    method = midas()
    method.misalignment.alpha.copy_(torch.tensor([1.25, 2.0]))
    restored = midas()
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.misalignment.alpha, torch.tensor([1.25, 2.0]))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="midas.similarity"):
        build_config(overrides=["midas.similarity=dot"], method="midas")
    with pytest.raises(ConfigError, match="midas.lamda"):
        build_config(overrides=["midas.lamda=2"], method="midas")
    assert build_config(overrides=["midas.variant=official"], method="midas").method_config.alpha_max == 10.0


class Killed(Exception):
    pass


def test_runs_log_alpha_and_are_deterministic_and_resumable(tmp_path, tiny_overrides, monkeypatch):
    overrides = tiny_overrides + ["train.epochs=3", "train.lr=0.01", "midas.warmup_epochs=1", "midas.eta=1.0"]
    config = build_config(overrides=overrides, method="midas")

    def trajectory(run):
        lines = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(l["method"]["midas/warmup"], l["method"]["midas/alpha/strong"], l["method"]["midas/alpha/weak"]) for l in lines]

    first = train_run(config, tmp_path / "first", quiet=True)
    second = train_run(config, tmp_path / "second", quiet=True)
    assert [w for w, *_ in trajectory("first")] == [1.0, 0.0, 0.0]
    assert any(a != 1.0 for _, *alphas in trajectory("first") for a in alphas)  # α moved, so the comparison means something
    assert trajectory("first") == trajectory("second")
    assert first["test"] == second["test"]
    line = json.loads((tmp_path / "first" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"midas/misaligned_loss", "midas/confidence/weak", "midas/fused_confidence/strong"} <= set(line["method"])

    original = Trainer._train_epoch

    def dies_in_last_epoch(self, epoch):
        if epoch == 2:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies_in_last_epoch)
    with pytest.raises(Killed):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "resumed", quiet=True)
    assert trajectory("resumed") == trajectory("first")
    assert resumed["test"] == first["test"]
