"""Multimodal Mixup (a plugin, BASELINES §15b): mixed features and mixed targets on a hand batch with
fixed partners and coefficients, λ = 1 is plain training, the draws, the per-modality λ option, the
§16 checks (determinism, outside the window, state round trip), MIDAS and runs with M = 2 and 3."""

import copy
import json
import math

import pytest
import torch

import mmbalance.methods.mixup  # noqa: F401  (registration)
import mmbalance.methods.powmix  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.mixing import Mixing, beta, draw_lambdas, draw_partners, label_weight, mix_features, mixed_cross_entropy
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log
TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def softplus(x):
    """ln(1 + e^x): the cross-entropy of two logits whose other class leads by x."""
    return LN(1 + math.exp(x))


# -- the hand batch -------------------------------------------------------------------------------------
class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """Features are the inputs and the fusion head sums them: z = f_a + f_b (2 classes)."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def hand_batch():
    inputs = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), "b": torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 0.0]])}
    return Batch(inputs, torch.tensor([0, 1, 1]), torch.arange(3))


FIRST, PARTNER = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])  # π = (2, 0, 1)
# λ = 0.75 for both modalities; a[π] = [[3,1],[1,0],[0,1]], b[π] = [[1,0],[0,2],[1,1]]
MIXED_A = [[1.5, 0.25], [0.25, 0.75], [2.25, 1.0]]  # 0.75 a + 0.25 a[π]
MIXED_B = [[0.25, 1.5], [0.75, 1.25], [1.0, 0.25]]  # 0.75 b + 0.25 b[π]
# z~ = [[1.75, 1.75], [1, 2], [3.25, 1.25]]; y = (0, 1, 1), y[π] = (1, 0, 1)
# row 0: equal logits, ln 2 for either label; row 1: 0.75 CE(class 1) + 0.25 CE(class 0) of logits (1, 2);
# row 2: both labels 1, class 0 leads by 2
LOSS_HAND = (LN(2) + 0.75 * softplus(-1) + 0.25 * softplus(1) + softplus(2)) / 3  # ~ 1.127779
# λ on the partner's label instead (a wrong slot) would give row 1 0.25 softplus(-1) + 0.75 softplus(1): 0.5 / 3 more


def context(epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"],
        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def part(name, modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def fixed(plugin, first, partner, lambdas):
    """The plugin with its draw replaced by given partners and coefficients."""
    plugin.draw = lambda features, ctx: Mixing(first, partner, {m: torch.as_tensor(v) for m, v in lambdas.items()})
    return plugin


def test_mixed_features_and_target_of_a_hand_batch():
    features = hand_batch().inputs
    lambdas = {"a": torch.tensor(0.75), "b": torch.tensor(0.75)}
    mixed = mix_features(features, FIRST, PARTNER, lambdas, ["a", "b"])
    assert torch.equal(mixed["a"], torch.tensor(MIXED_A)) and torch.equal(mixed["b"], torch.tensor(MIXED_B))
    logits = mixed["a"] + mixed["b"]
    loss = mixed_cross_entropy(logits, hand_batch().labels, FIRST, PARTNER, label_weight(lambdas))
    assert loss.item() == pytest.approx(LOSS_HAND, rel=1e-6)
    # per-sample weights (batch.weight) scale each label's term by its own sample's weight: w = (1, 2, 0)
    # row 0: 0.75·1·ln2 + 0.25·0·ln2; row 1: 0.75·2·CE(1) + 0.25·1·CE(0); row 2: 0.75·0 + 0.25·2·CE(1)
    weighted = mixed_cross_entropy(logits, hand_batch().labels, FIRST, PARTNER, 0.75, torch.tensor([1.0, 2.0, 0.0]))
    expected = (0.75 * LN(2) + 1.5 * softplus(-1) + 0.25 * softplus(1) + 0.5 * softplus(2)) / 3
    assert weighted.item() == pytest.approx(expected, rel=1e-6)


def test_the_plugin_replaces_the_fused_term_by_the_mixed_loss_on_a_hand_batch():
    batch = hand_batch()
    for x in batch.inputs.values():
        x.requires_grad_(True)
    mixup = fixed(part("mixup"), FIRST, PARTNER, {"a": 0.75, "b": 0.75})
    record = Method([part("joint"), mixup]).training_step(hand_model(), batch, context())
    assert set(record.losses) == {"fused", "probe"}
    assert record.losses["fused"].item() == pytest.approx(LOSS_HAND, rel=1e-6)
    assert record.logs["mixup/label_weight"].item() == 0.75 and record.logs["mixup/mixed_samples"] == 3
    # the gradient reaches both samples of every pair: d/dz~ of the mean loss is (softmax − target) / 3,
    # and sample 0 is the first of row 0 (λ = 0.75) and the partner of row 1 (1 − λ = 0.25)
    record.losses["fused"].backward()
    z = torch.tensor(MIXED_A) + torch.tensor(MIXED_B)
    target = 0.75 * torch.eye(2)[[0, 1, 1]] + 0.25 * torch.eye(2)[[1, 0, 1]]
    dz = (z.softmax(-1) - target) / 3
    expected = 0.75 * dz + 0.25 * dz[[1, 2, 0]]  # sample i is the partner of row π^{-1}(i) = (1, 2, 0)
    assert torch.allclose(batch.inputs["a"].grad, expected, atol=1e-7)
    assert torch.allclose(batch.inputs["b"].grad, expected, atol=1e-7)
    # fused=add keeps the clean term and adds the mixed one as its own term
    added = fixed(part("mixup", fused="add", weight=0.5), FIRST, PARTNER, {"a": 0.75, "b": 0.75})
    record = Method([part("joint"), added]).training_step(hand_model(), hand_batch(), context())
    clean = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 2.0], [1.0, 2.0], [4.0, 1.0]]), torch.tensor([0, 1, 1]))
    assert record.losses["fused"].item() == pytest.approx(clean.item(), rel=1e-6)
    assert record.losses["mixup"].item() == pytest.approx(0.5 * LOSS_HAND, rel=1e-6)


def test_per_modality_lambda_mixes_each_modality_by_its_own_and_averages_the_labels():
    # λ_a = 0.75, λ_b = 0.25: f~_a as above; f~_b = 0.25 b + 0.75 b[π] = [[0.75, 0.5], [0.25, 1.75], [1, 0.75]]
    # z~ = [[2.25, 0.75], [0.5, 2.5], [3.25, 1.75]]; label weight (0.75 + 0.25) / 2 = 0.5
    mixup = fixed(part("mixup", per_modality_lambda=True), FIRST, PARTNER, {"a": 0.75, "b": 0.25})
    record = Method([part("joint"), mixup]).training_step(hand_model(), hand_batch(), context())
    expected = (0.5 * (softplus(-1.5) + softplus(1.5)) + 0.5 * (softplus(-2) + softplus(2)) + softplus(1.5)) / 3
    assert record.losses["fused"].item() == pytest.approx(expected, rel=1e-6)
    assert record.logs["mixup/label_weight"].item() == 0.5
    features = hand_batch().inputs
    mixed = mix_features(features, FIRST, PARTNER, {"a": torch.tensor(0.75), "b": torch.tensor(0.25)}, ["a", "b"])
    assert torch.equal(mixed["b"], torch.tensor([[0.75, 0.5], [0.25, 1.75], [1.0, 0.75]]))


def test_draws_come_from_the_generator_partners_first_then_lambda():
    generator = torch.Generator().manual_seed(3)
    first, partner = draw_partners(5, 5, generator)
    lambdas = draw_lambdas(0.4, {"a": 2, "b": 3}, "batch", generator)
    replay = torch.Generator().manual_seed(3)
    assert torch.equal(first, torch.arange(5)) and torch.equal(partner, torch.randperm(5, generator=replay))
    assert lambdas["a"].shape == () and lambdas["a"] is lambdas["b"]  # one λ, shared by every modality
    assert lambdas["a"] == beta(0.4, (), replay)
    per_modality = draw_lambdas(0.4, {"a": 2, "b": 3}, "modality", torch.Generator().manual_seed(0))
    assert per_modality["a"] != per_modality["b"]
    # Beta(0.4, 0.4): mean 1/2, variance 1 / (4 (2a + 1)) = 1/7.2
    many = beta(0.4, (200_000,), torch.Generator().manual_seed(0))
    assert 0 <= many.min() and many.max() <= 1
    assert many.mean().item() == pytest.approx(0.5, abs=0.005) and many.var().item() == pytest.approx(1 / 7.2, abs=0.003)


def test_mixup_with_lambda_one_is_plain_training():
    plain, mixed = trainer("joint"), trainer("joint+mixup")
    mixed.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    partner = torch.randperm(len(batch), generator=torch.Generator().manual_seed(1))
    fixed(mixed.method.parts["mixup"], torch.arange(len(batch)), partner, {"strong": 1.0, "weak": 1.0})
    reference, expected = step_gradients(plain, batch, epoch=0)
    record, grads = step_gradients(mixed, batch, epoch=0)
    assert record.losses["fused"].item() == pytest.approx(reference.losses["fused"].item(), rel=1e-6)
    assert grads.keys() == expected.keys()
    for name in grads:
        assert torch.allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="alpha"):
        build_config(overrides=["mixup.alpha=0"], method="mixup")
    with pytest.raises(ConfigError, match="mixup.*powmix"):
        build_config(method="mixup+powmix")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("mixup", modulation_starts=4, modulation_ends=2)


# -- §16: determinism, outside the window, resume; MIDAS; runs ---------------------------------------------
def trainer(spec, extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def step_gradients(t, batch, epoch):
    t.ctx.epoch = epoch
    t.method.on_epoch_start(t.model, t.ctx)
    t._zero_grad()
    record = t.method.training_step(t.model, batch, t.ctx)
    record.loss.backward()
    t._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_two_runs_with_the_same_seed_give_the_same_steps():
    runs = []
    for _ in range(2):
        t = trainer("joint+mixup")
        steps = [t.train_step(b) for b in list(t.train_loader)[:4]]
        logs = [(s.loss.item(), s.logs["mixup/label_weight"].item()) for s in steps]
        runs.append((logs, [p.detach().clone() for p in t.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert len({w for _, w in runs[0][0]}) == 4  # a new λ every step
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("spec", ["joint+mixup[modulation_starts=3,weight=0]", "joint+mixup[modulation_starts=3]",
                                  "joint+mixup[weight=0]", "joint+mixup[modulation_starts=3,fused=add]"])
def test_outside_the_window_or_at_weight_zero_gradients_equal_joint_exactly(spec):
    plain, mixed = trainer("joint"), trainer(spec)
    mixed.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    reference, expected = step_gradients(plain, batch, epoch=1)
    record, grads = step_gradients(mixed, batch, epoch=1)
    assert set(record.losses) == set(reference.losses) and "mixup/label_weight" not in record.logs
    assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in grads)
    # nothing was drawn: the generator is where joint left it
    assert torch.equal(mixed.ctx.generator.get_state(), plain.ctx.generator.get_state())


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    spec = "joint+mixup[per_modality_lambda=true]"
    t = trainer(spec)
    batches = list(t.train_loader)[:3]
    for batch in batches[:2]:
        t.train_step(batch)
    saved = copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizer": t.ctx.optimizer.state_dict(), "generator": t.ctx.generator.get_state(),
    })
    loss = t.train_step(batches[2]).loss.item()
    expected = [p.detach().clone() for p in t.model.parameters()]
    fresh = trainer(spec)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    fresh.ctx.generator.set_state(saved["generator"])
    assert fresh.train_step(batches[2]).loss.item() == loss
    assert all(torch.equal(a, b) for a, b in zip(expected, fresh.model.parameters()))


def test_midas_plus_mixup_mixes_only_the_fused_term():
    """midas+mixup: the fused term is the mixed loss; MIDAS's unimodal and misaligned terms are unchanged."""
    extra = ["midas.modulation_starts=0"]
    alone, composed = trainer("midas", extra), trainer("midas+mixup", extra)
    composed.model.load_state_dict(alone.model.state_dict())
    batch = next(iter(alone.train_loader))
    reference, _ = step_gradients(alone, batch, epoch=0)
    record, _ = step_gradients(composed, batch, epoch=0)
    assert set(record.losses) == set(reference.losses) == {"fused", "unimodal", "misaligned"}
    for term in ("unimodal", "misaligned"):  # MIDAS draws its misaligned samples before mixup draws
        assert record.losses[term].item() == reference.losses[term].item()
    assert record.losses["fused"].item() != reference.losses["fused"].item()
    # during MIDAS's warm-up the fusion head has no task loss: mixup leaves the step alone
    warm = trainer("midas+mixup", ["midas.modulation_starts=1"])
    record, _ = step_gradients(warm, batch, epoch=0)
    assert set(record.losses) == {"unimodal"} and "mixup/label_weight" not in record.logs
    # fused=add: MIDAS's loss plus the mixup term
    added = trainer("midas+mixup[fused=add]", extra)
    added.model.load_state_dict(alone.model.state_dict())
    record, _ = step_gradients(added, batch, epoch=0)
    assert set(record.losses) == {"fused", "unimodal", "misaligned", "mixup"}
    assert record.losses["fused"].item() == reference.losses["fused"].item()


def test_midas_plus_mixup_trains(tmp_path):
    config = build_config(overrides=[*TINY, "midas.modulation_starts=0"], method="midas+mixup")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= lines[0]["method"]["mixup/label_weight"] <= 1 and "loss/misaligned" in lines[0]["method"]
    assert metrics["method"] == "midas+mixup"


@pytest.mark.parametrize("modalities", [2, 3])
def test_joint_plus_mixup_runs_two_epochs(modalities, tmp_path):
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    overrides = [*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}"]
    metrics = train_run(build_config(overrides=overrides, method="joint+mixup[per_modality_lambda=true]"), tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert len([k for k in lines[-1]["method"] if k.startswith("mixup/lambda/")]) == modalities
    assert len(metrics["test"]["modality_accuracy"]) == modalities
