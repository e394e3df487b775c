"""PowMix (a plugin, BASELINES §15c): anisotropic mixing and cross-modal label mixing on a hand batch, more
mixed examples than samples, the draws, PowMix reduced to Mixup, the §16 checks (determinism, outside the
window, state round trip), MIDAS and runs with M = 2 and 3."""

import copy
import json
import math

import pytest
import torch

import mmbalance.methods.mixup  # noqa: F401  (registration)
import mmbalance.methods.powmix  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.methods import Method
from mmbalance.methods.mixing import Mixing, beta, draw_lambdas, draw_partners, label_weight, mix_features
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


def context(epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"],
        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def part(name, modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def fixed(plugin, first, partner, lambdas):
    plugin.draw = lambda features, ctx: Mixing(first, partner, {m: torch.as_tensor(v) for m, v in lambdas.items()})
    return plugin


def hand_step(plugin):
    return Method([part("joint"), plugin]).training_step(hand_model(), hand_batch(), context())


def test_anisotropic_mixing_and_cross_modal_label_weight_by_hand():
    # π = (2, 0, 1); a[π] = [[3,1],[1,0],[0,1]], b[π] = [[1,0],[0,2],[1,1]]
    first, partner = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    lambdas = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.25, 1.0])}
    mixed = mix_features(hand_batch().inputs, first, partner, lambdas, ["a", "b"])
    # a: dimension 0 from the sample itself, dimension 1 from its partner
    assert torch.equal(mixed["a"], torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 1.0]]))
    # b: dimension 0 = 0.25 b + 0.75 b[π], dimension 1 = b
    assert torch.equal(mixed["b"], torch.tensor([[0.75, 2.0], [0.25, 1.0], [1.0, 0.0]]))
    # label weight: mean over modalities of mean(λ_m) = (0.5 + 0.625) / 2 = 0.5625 (not λ_a's 0.5, not all 8 entries' mean)
    assert label_weight(lambdas).item() == 0.5625
    # z~ = [[1.75, 3], [0.25, 1], [4, 1]]; y = (0, 1, 1), y[π] = (1, 0, 1)
    w = 0.5625
    expected = (
        w * softplus(1.25) + (1 - w) * softplus(-1.25)  # row 0: class 1 leads by 1.25
        + w * softplus(-0.75) + (1 - w) * softplus(0.75)  # row 1: class 1 leads by 0.75
        + softplus(3)  # row 2: both labels 1, class 0 leads by 3
    ) / 3
    record = hand_step(fixed(part("powmix"), first, partner, lambdas))
    assert record.losses["fused"].item() == pytest.approx(expected, rel=1e-6)
    assert record.logs["powmix/label_weight"].item() == w
    assert record.logs["powmix/lambda/a"].item() == 0.5 and record.logs["powmix/lambda/b"].item() == 0.625


def test_more_mixed_examples_than_samples_by_hand():
    # K = 5 from N = 3: first = (0, 1, 2, 0, 1); partners: pass 1 π = (2, 0, 1), pass 2 (1, 2, 0) cut to (1, 2)
    first, partner = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 0, 1, 1, 2])
    record = hand_step(fixed(part("powmix", num_mixed=5, lambdas="batch"), first, partner, {"a": 0.75, "b": 0.75}))
    # rows 0-2 as Mixup's hand batch: z~ = [[1.75, 1.75], [1, 2], [3.25, 1.25]]
    # row 3 (0 with 1): f~_a = [0.75, 0.25], f~_b = [0.25, 1.75], z~ = [1, 2]; labels 0 (0.75) and 1 (0.25)
    # row 4 (1 with 2): f~_a = [0.75, 1], f~_b = [1, 0.75], z~ = [1.75, 1.75]: ln 2
    rows = [LN(2), 0.75 * softplus(-1) + 0.25 * softplus(1), softplus(2), 0.75 * softplus(1) + 0.25 * softplus(-1), LN(2)]
    assert record.losses["fused"].item() == pytest.approx(sum(rows) / 5, rel=1e-6)
    assert record.logs["powmix/mixed_samples"] == 5


def test_partners_walk_the_batch_with_a_fresh_permutation_per_pass():
    generator = torch.Generator().manual_seed(5)
    first, partner = draw_partners(3, 7, generator)
    assert first.tolist() == [0, 1, 2, 0, 1, 2, 0]
    replay = torch.Generator().manual_seed(5)
    passes = [torch.randperm(3, generator=replay) for _ in range(3)]
    assert torch.equal(partner, torch.cat(passes)[:7])
    assert sorted(partner[:3].tolist()) == sorted(partner[3:6].tolist()) == [0, 1, 2]
    # fewer mixed examples than samples: the first K samples, with the first K entries of one permutation
    first, partner = draw_partners(4, 2, torch.Generator().manual_seed(5))
    assert first.tolist() == [0, 1] and torch.equal(partner, torch.randperm(4, generator=torch.Generator().manual_seed(5))[:2])


def test_anisotropic_lambdas_are_one_beta_draw_per_feature_dimension():
    lambdas = draw_lambdas(0.4, {"a": 2, "b": 3}, "dimension", torch.Generator().manual_seed(2))
    assert lambdas["a"].shape == (2,) and lambdas["b"].shape == (3,)
    draws = beta(0.4, (5,), torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([lambdas["a"], lambdas["b"]]), draws)


def test_powmix_with_one_lambda_and_one_pass_is_mixup():
    """lambdas=batch, num_mixed unset: the same draws and the same loss as Mixup's."""
    steps = []
    for spec in ("joint+mixup", "joint+powmix[lambdas=batch]"):
        t = trainer(spec)
        steps.append([t.train_step(b).loss.item() for b in list(t.train_loader)[:3]])
    assert steps[0] == steps[1]


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
        t = trainer("joint+powmix[num_mixed=48]")
        steps = [t.train_step(b) for b in list(t.train_loader)[:4]]
        logs = [(s.loss.item(), s.logs["powmix/label_weight"].item()) for s in steps]
        runs.append((logs, [p.detach().clone() for p in t.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("spec", ["joint+powmix[modulation_starts=3,weight=0]", "joint+powmix[modulation_starts=3,num_mixed=64]",
                                  "joint+powmix[weight=0]"])
def test_outside_the_window_or_at_weight_zero_gradients_equal_joint_exactly(spec):
    plain, mixed = trainer("joint"), trainer(spec)
    mixed.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    reference, expected = step_gradients(plain, batch, epoch=1)
    record, grads = step_gradients(mixed, batch, epoch=1)
    assert set(record.losses) == set(reference.losses) and "powmix/label_weight" not in record.logs
    assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in grads)


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    spec = "joint+powmix[num_mixed=40]"
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


def test_midas_plus_powmix_mixes_only_the_fused_term():
    extra = ["midas.modulation_starts=0"]
    alone, composed = trainer("midas", extra), trainer("midas+powmix[num_mixed=64]", extra)
    composed.model.load_state_dict(alone.model.state_dict())
    batch = next(iter(alone.train_loader))
    reference, _ = step_gradients(alone, batch, epoch=0)
    record, _ = step_gradients(composed, batch, epoch=0)
    assert set(record.losses) == {"fused", "unimodal", "misaligned"}
    for term in ("unimodal", "misaligned"):
        assert record.losses[term].item() == reference.losses[term].item()
    assert record.logs["powmix/mixed_samples"] == 64


def test_midas_plus_powmix_trains(tmp_path):
    config = build_config(overrides=[*TINY, "midas.modulation_starts=0"], method="midas+powmix")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= lines[0]["method"]["powmix/label_weight"] <= 1 and "loss/misaligned" in lines[0]["method"]
    assert metrics["method"] == "midas+powmix"


@pytest.mark.parametrize("modalities", [2, 3])
def test_joint_plus_powmix_runs_two_epochs(modalities, tmp_path):
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    overrides = [*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}"]
    metrics = train_run(build_config(overrides=overrides, method="joint+powmix[num_mixed=48]"), tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert len([k for k in lines[-1]["method"] if k.startswith("powmix/lambda/")]) == modalities
    assert len(metrics["test"]["modality_accuracy"]) == modalities
