"""ARL (a plugin): weights from fusion-head predictions on a hand batch, gradient scaling, the auxiliary
loss, its schedules, composition with MIDAS, and full runs."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.arl import balance_weights
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel, zero_out
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


def part(name, modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def arl(modalities=("a", "b"), num_classes=3, **options):
    return part("arl", modalities, num_classes, **options)


def joint_arl(modalities=("a", "b"), num_classes=3, **options):
    """``joint+arl``: the joint objective (detached probe heads) with ARL on top."""
    return Method([part("joint", modalities, num_classes), arl(modalities, num_classes, **options)])


def plain_joint(modalities=("a", "b"), num_classes=3):
    return Method([part("joint", modalities, num_classes)])


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


def hand_batch():
    """a: one logit of 1 on the true class; b: ln 19 on class 0 for both samples (labels 0, 1).

    The inputs are the encoders' outputs (identity encoders), so their .grad is the gradient
    that reaches the encoders, after ARL's scaling.
    """
    inputs = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[LN(19), 0.0], [LN(19), 0.0]])}
    for x in inputs.values():
        x.requires_grad_(True)
    return Batch(inputs, torch.tensor([0, 1]), torch.arange(2))


# hand batch: entropies a: both rows p = (e, 1)/(1 + e): H = ln(1 + e) − e/(1 + e) ~ 0.582203
#             b: p = (0.95, 0.05): H = ln 20 − 0.95 ln 19 ~ 0.198515
H_A, H_B = LN(1 + math.e) - math.e / (1 + math.e), LN(20) - 0.95 * LN(19)
# normalised 0.745727, 0.254273 -> b floored at 0.3; q ∝ (1/0.745727, 1/0.3) = (1.340973, 3.333333) -> (0.286882, 0.713118)
Q_A = (1 / (H_A / (H_A + H_B))) / (1 / (H_A / (H_A + H_B)) + 1 / 0.3)
# c: Σ_classes batch-mean |logit|: a 0.5 + 0.5 = 1, b ln 19 ~ 2.944439 -> (0.253522, 0.746478)
C_A = 1 / (1 + LN(19))
# w = softmax(8 [c_b q_a, c_a q_b]) = softmax(8 [0.214150, 0.180790]) -> w_a = 1/(1 + e^{−0.266877}) ~ 0.566326
W_A = 1 / (1 + math.exp(-8 * ((1 - C_A) * Q_A - C_A * (1 - Q_A))))
W_HAND = {"a": W_A, "b": 1 - W_A}
# Σ_m CE(fuse(f^{m}), y): a: both rows CE = ln(1 + e^{−1}) ~ 0.313262;
# b: row 0 (label 0) ln(20/19) ~ 0.051293, row 1 (label 1) ln 20 ~ 2.995732, mean ~ 1.523513
CE_SUM_HAND = LN(1 + math.exp(-1)) + (LN(20 / 19) + LN(20)) / 2  # ~ 1.836775


def hand_step(method, epoch):
    """One step of ``method`` on the hand batch; the record and the gradients reaching each encoder."""
    batch = hand_batch()
    record = method.training_step(hand_model(), batch, context(epoch))
    record.loss.backward()
    return record, {m: x.grad.clone() for m, x in batch.inputs.items()}


def test_weights_of_a_hand_batch():
    record = joint_arl(num_classes=2).training_step(hand_model(), hand_batch(), context())
    logs = record.logs
    assert logs["arl/entropy/a"].item() == pytest.approx(H_A / (H_A + H_B), rel=1e-5)
    assert logs["arl/entropy/b"].item() == pytest.approx(0.3, rel=1e-6)
    assert logs["arl/q/a"].item() == pytest.approx(Q_A, rel=1e-5)
    assert logs["arl/c/a"].item() == pytest.approx(C_A, rel=1e-5)
    assert logs["arl/weight/a"].item() == pytest.approx(W_A, rel=1e-5)
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
    torch.manual_seed(0)
    batch = Batch({"a": torch.randn(3, 2), "b": torch.randn(3, 2)}, torch.tensor([0, 1, 0]), torch.arange(3))
    record = joint_arl(num_classes=2).training_step(model, batch, context())
    features = batch.inputs
    assert torch.allclose(record.zeroed_logits()[0], features["a"] + torch.tensor([1.5, 1.0]))  # all of the bias
    assert torch.allclose(record.restricted_logits()[0], features["a"] + torch.tensor([0.75, 0.5]))  # half of it
    assert torch.allclose(record.restricted_logits().sum(0), model.fuse(features))
    # ARL with restricted logits reads d_m: c_a = Σ_classes batch-mean |d_a|
    restricted = joint_arl(num_classes=2, unimodal_logits="restricted").training_step(model, batch, context())
    d = record.restricted_logits().detach().abs().mean(1).sum(-1)
    assert restricted.logs["arl/c/a"].item() == pytest.approx((d[0] / d.sum()).item(), rel=1e-5)


def small_setup():
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8), ["a", "b"], {"a": (3,), "b": (4,)}, 3)
    inputs = {"a": torch.randn(6, 3), "b": torch.randn(6, 4)}
    return model, Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


def gradients(model, method, batch, epoch, seed=0):
    result = method.training_step(model, batch, context(epoch, seed))
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hand_weights(model, batch, temperature=8.0, floor=0.3):
    """ARL's w for two modalities, from the fusion head with the other modality zeroed, written out."""
    with torch.no_grad():
        features = model.encode(batch.inputs)
        zeroed = {m: model.fuse(zero_out(features, [m])) for m in "ab"}
        entropy = {m: -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean() for m, z in zeroed.items()}
        dependence = {m: z.abs().mean(0).sum() for m, z in zeroed.items()}
    h = {m: max(entropy[m] / (entropy["a"] + entropy["b"]), floor) for m in "ab"}
    q = {m: (1 / h[m]) / (1 / h["a"] + 1 / h["b"]) for m in "ab"}
    c = {m: dependence[m] / (dependence["a"] + dependence["b"]) for m in "ab"}
    # w = softmax(T [c_b q_a, c_a q_b])
    w_a = 1 / (1 + torch.exp(-temperature * (c["b"] * q["a"] - c["a"] * q["b"])))
    return {"a": w_a.item(), "b": 1 - w_a.item()}


def encoder_factor(name, weight):
    return 1 + weight[name.split(".")[1]] if name.startswith("encoders.") else 1.0


def test_before_modulation_starts_gradients_are_those_of_the_plain_loss():
    model, batch = small_setup()
    reference = copy.deepcopy(model)
    result, grads = gradients(model, joint_arl(modulation_starts=1), batch, epoch=0)
    features = reference.encode(batch.inputs)
    # CE(fused) + 4 Σ_m CE(fusion head with the other modality zeroed) + the heads' detached probes
    loss = F.cross_entropy(reference.fuse(features), batch.labels) + 4 * sum(
        F.cross_entropy(reference.fuse(zero_out(features, [m])), batch.labels) for m in "ab"
    )
    probes = reference.heads({m: f.detach() for m, f in features.items()})
    loss = loss + sum(F.cross_entropy(z, batch.labels) for z in probes.values())
    loss.backward()
    assert set(result.losses) == {"fused", "probe", "arl_unimodal"}
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert result.logs["arl/accelerating"] == 0.0
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-8), name


def test_from_modulation_starts_each_encoder_gradient_is_scaled_by_one_plus_its_weight():
    model, batch = small_setup()
    _, plain = gradients(copy.deepcopy(model), joint_arl(modulation_starts=1), batch, epoch=0)
    result, scaled = gradients(model, joint_arl(modulation_starts=1), batch, epoch=1)
    assert result.logs["arl/accelerating"] == 1.0
    weight = {m: result.logs[f"arl/weight/{m}"].item() for m in "ab"}
    assert weight == pytest.approx(hand_weights(model, batch), rel=1e-5)
    assert weight["a"] != weight["b"]
    for name, grad in scaled.items():
        assert torch.allclose(grad, encoder_factor(name, weight) * plain[name], rtol=1e-5, atol=1e-8), name


def test_outside_the_window_encoder_gradients_equal_plain_joint_exactly():
    model, batch = small_setup()
    _, plain = gradients(copy.deepcopy(model), plain_joint(), batch, epoch=0)
    for epoch in (0, 1):  # modulation_starts = 2: both before the window
        result, grads = gradients(copy.deepcopy(model), joint_arl(modulation_starts=2, unimodal_weight=0), batch, epoch)
        assert set(result.losses) == {"fused", "probe"}  # γ = 0: no auxiliary term
        assert result.logs["arl/accelerating"] == 0.0
        assert grads.keys() == plain.keys()
        for name in grads:
            assert torch.equal(grads[name], plain[name]), (epoch, name)
    # at modulation_starts the same step scales the encoders' gradients, and only theirs
    result, grads = gradients(copy.deepcopy(model), joint_arl(modulation_starts=2, unimodal_weight=0), batch, epoch=2)
    weight = hand_weights(model, batch)
    for name in grads:
        assert torch.allclose(grads[name], encoder_factor(name, weight) * plain[name], rtol=1e-5, atol=1e-8), name
    # after modulation_ends the step is plain again
    _, grads = gradients(copy.deepcopy(model), joint_arl(modulation_starts=0, modulation_ends=1, unimodal_weight=0), batch, 2)
    assert all(torch.equal(grads[name], plain[name]) for name in grads)


def test_midas_plus_arl_scales_midas_encoder_gradients_by_one_plus_w():
    """The acceptance test: with γ = 0, midas+arl's step is MIDAS's with each encoder's gradient × (1 + w_m)."""
    model, batch = small_setup()
    assert len(set(batch.labels.tolist())) > 1  # labels differ: MIDAS finds misaligned partners
    midas_options = {"modulation_starts": 0}  # no warm-up: the fused and misaligned losses are on
    alone = Method([part("midas", **midas_options)])
    composed = Method([part("midas", **midas_options), arl(modulation_starts=0, unimodal_weight=0)])
    # the same generator seed: both draw the same misaligned samples
    reference, plain = gradients(copy.deepcopy(model), alone, batch, epoch=0, seed=7)
    record, scaled = gradients(copy.deepcopy(model), composed, batch, epoch=0, seed=7)
    assert set(record.losses) == set(reference.losses) == {"fused", "unimodal", "misaligned"}
    assert record.logs["midas/misaligned_samples"].item() == reference.logs["midas/misaligned_samples"].item() > 0
    assert record.loss.item() == reference.loss.item()  # ARL changes no value of the forward pass
    assert record.logs["arl/accelerating"] == 1.0
    weight = hand_weights(model, batch)
    assert record.logs["arl/weight/a"].item() == pytest.approx(weight["a"], rel=1e-5)
    assert weight["a"] != pytest.approx(weight["b"])
    assert scaled.keys() == plain.keys()
    assert any(n.startswith("unimodal_heads.") for n in plain) and any(n.startswith("fusion.") for n in plain)
    for name in scaled:
        if name.startswith("encoders."):
            assert torch.allclose(scaled[name], (1 + weight[name.split(".")[1]]) * plain[name], rtol=1e-5, atol=1e-8), name
            assert not torch.allclose(scaled[name], plain[name]), name  # the scaling is visible
        else:  # fusion and unimodal heads: unchanged
            assert torch.equal(scaled[name], plain[name]), name


def test_official_schedule_gamma_one_in_warmup_and_scaling_from_the_epoch_after_modulation_starts():
    method = joint_arl(num_classes=2, modulation_starts=2, unimodal_weight=3.0, schedule="official")
    plain_record, plain = hand_step(plain_joint(num_classes=2), epoch=0)
    # warm-up (epoch 1 < 2): γ = 1, no scaling: Σ_m CE ~ 1.836775
    record, grads = hand_step(method, epoch=1)
    assert record.losses["arl_unimodal"].item() == pytest.approx(CE_SUM_HAND, rel=1e-5)
    assert record.logs["arl/accelerating"] == 0.0
    # epoch == modulation_starts: γ as configured (3 × 1.836775 ~ 5.510325), still no scaling
    record, at_start = hand_step(method, epoch=2)
    assert record.losses["arl_unimodal"].item() == pytest.approx(3 * CE_SUM_HAND, rel=1e-5)
    assert record.logs["arl/accelerating"] == 0.0
    # modulation_starts + 1: the same loss, each encoder's gradient × (1 + w_m), w_a ~ 0.566326
    record, after = hand_step(method, epoch=3)
    assert record.losses["arl_unimodal"].item() == pytest.approx(3 * CE_SUM_HAND, rel=1e-5)
    assert record.logs["arl/accelerating"] == 1.0
    for m in "ab":
        assert torch.allclose(after[m], (1 + W_HAND[m]) * at_start[m], rtol=1e-5, atol=1e-7), m
    # the gradient reaching the encoders is g_fused + γ g_aux (the probes read detached features):
    # plain joint gives g_fused, the warm-up g_fused + g_aux, epoch 2 g_fused + 3 g_aux
    assert plain_record.losses.keys() == {"fused", "probe"}
    for m in "ab":
        assert torch.allclose(at_start[m] - grads[m], 2 * (grads[m] - plain[m]), atol=1e-6), m
        assert not torch.allclose(grads[m], plain[m]), m


def test_paper_schedule_scales_from_modulation_starts_with_gamma_throughout():
    method = joint_arl(num_classes=2, modulation_starts=2, unimodal_weight=3.0)
    record, before = hand_step(method, epoch=1)
    assert record.losses["arl_unimodal"].item() == pytest.approx(3 * CE_SUM_HAND, rel=1e-5)  # γ before the window too
    assert record.logs["arl/accelerating"] == 0.0
    record, at_start = hand_step(method, epoch=2)
    assert record.losses["arl_unimodal"].item() == pytest.approx(3 * CE_SUM_HAND, rel=1e-5)
    assert record.logs["arl/accelerating"] == 1.0
    for m in "ab":
        assert torch.allclose(at_start[m], (1 + W_HAND[m]) * before[m], rtol=1e-5, atol=1e-7), m


@pytest.mark.parametrize("schedule, expected", [("paper", [0, 1, 1, 0]), ("official", [0, 0, 1, 0])])
def test_scaling_stays_inside_the_window(schedule, expected):
    # window [1, 2]: the paper scales epochs 1 and 2; official starts one epoch later but still ends at 2
    method = joint_arl(num_classes=2, modulation_starts=1, modulation_ends=2, schedule=schedule)
    assert [hand_step(method, epoch)[0].logs["arl/accelerating"] for epoch in range(4)] == expected


def test_config_and_modalities_are_validated():
    with pytest.raises(ConfigError, match="arl.unimodal_logits"):
        build_config(overrides=["arl.unimodal_logits=heads"], method="arl")
    with pytest.raises(ConfigError, match="arl.schedule"):
        build_config(overrides=["arl.schedule=authors"], method="arl")
    config = build_config(overrides=["arl.temperature=4"], method="arl")
    assert config.method == "joint+arl" and config.parts == ["joint", "arl"]
    assert config.section("arl").temperature == 4.0
    assert config.section("arl").modulation_starts == 5 and config.section("arl").unimodal_weight == 4.0
    assert config.section("joint").unimodal_weight == 0.0  # the probe heads stay detached
    with pytest.raises(ConfigError, match="before modulation_starts"):
        arl(modulation_starts=3, modulation_ends=2)
    with pytest.raises(ConfigError, match="arl needs at least 2 modalities"):
        arl(modalities=("a",))


def test_grad_clip_is_recommended_unless_the_user_sets_it():
    assert build_config(method="midas+arl").train.grad_clip == 40.0
    assert build_config(method="arl").train.grad_clip == 40.0
    assert build_config(overrides=["train.grad_clip=1.5"], method="midas+arl").train.grad_clip == 1.5
    assert build_config(method="midas").train.grad_clip == 0.0


def read_run(path):
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [line["method"] for line in lines], json.loads((path / "metrics.json").read_text())


def test_run_logs_arl_weights(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "arl.modulation_starts=1"]
    train_run(build_config(overrides=overrides, method="arl"), tmp_path, quiet=True)
    lines, metrics = read_run(tmp_path)
    assert metrics["method"] == "joint+arl"
    assert [l["arl/accelerating"] for l in lines] == [0.0, 1.0]
    last = lines[-1]
    assert {f"arl/{name}/{m}" for name in ("weight", "entropy", "q", "c") for m in ("strong", "weak")} <= set(last)
    assert {"loss/fused", "loss/probe", "loss/arl_unimodal"} <= set(last)
    assert last["arl/weight/strong"] + last["arl/weight/weak"] == pytest.approx(1.0)


def test_run_of_midas_plus_arl_logs_both_parts(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["synthetic.num_samples=120", "midas.modulation_starts=0", "arl.modulation_starts=0"]
    config = build_config(overrides=overrides, method="midas+arl")
    assert config.train.grad_clip == 40.0
    train_run(config, tmp_path, quiet=True)
    lines, metrics = read_run(tmp_path)
    assert metrics["method"] == "midas+arl" and metrics["parts"] == ["midas", "arl"]
    assert len(lines) == 2
    for line in lines:
        assert {"arl/weight/strong", "arl/weight/weak", "midas/alpha/strong", "midas/alpha/weak"} <= set(line)
        assert {"loss/fused", "loss/unimodal", "loss/misaligned", "loss/arl_unimodal"} <= set(line)
        assert line["arl/accelerating"] == 1.0 and line["midas/warmup"] == 0.0
        assert line["arl/weight/strong"] + line["arl/weight/weak"] == pytest.approx(1.0)
        assert all(math.isfinite(v) for v in line.values())
    assert "grad_clip: 40.0" in (tmp_path / "config.yaml").read_text()


def test_run_with_three_modalities(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("synthetic.dims")]
    overrides += ["synthetic.num_samples=120", "synthetic.num_modalities=3", "synthetic.dims=[8,8,8]", "arl.modulation_starts=1"]
    train_run(build_config(overrides=overrides, method="arl"), tmp_path, quiet=True)
    lines, metrics = read_run(tmp_path)
    modalities = ["strong", "weak1", "weak2"]
    assert metrics["modalities"] == modalities and metrics["method"] == "joint+arl"
    assert [l["arl/accelerating"] for l in lines] == [0.0, 1.0]
    for line in lines:
        assert {f"arl/{name}/{m}" for name in ("weight", "entropy", "q", "c") for m in modalities} <= set(line)
        # each step's w, q and c sum to 1, so their epoch means do too
        for name in ("weight", "q", "c"):
            assert sum(line[f"arl/{name}/{m}"] for m in modalities) == pytest.approx(1.0, rel=1e-6)
        assert math.isfinite(line["loss/arl_unimodal"])
