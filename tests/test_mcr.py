"""MCR (a plugin): the permutation JSD, its game routing and the contrastive and bottleneck terms on hand
batches, the spec's check (identical features give no MIPD term), determinism, the window, the state
round trip, composition with MIDAS and full runs with M = 2 and 3."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import mmbalance.methods.mcr  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.mcr import (
    ceb_loss,
    draw_permutations,
    js_divergence,
    permutation_divergences,
    permuted_sets,
    supervised_nt_xent,
)
from mmbalance.methods.record import StepRecord
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
THREE = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]

# JSD between (0.75, 0.25) and (0.5, 0.5): M = (0.625, 0.375);
# KL(P‖M) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.0353749, KL(Q‖M) = 0.5 ln 0.8 + 0.5 ln(4/3) = 0.0322693
JSD_HAND = 0.5 * (0.75 * LN(1.2) + 0.25 * LN(2 / 3) + 0.5 * LN(0.8) + 0.5 * LN(4 / 3))  # 0.0338221


def context(epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"],
        num_classes=2, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def mcr(modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get("mcr")
    return cls(cls.Config(**options), list(modalities), num_classes)


def hand_fuse(features):
    """Two classes, logits (f_a + f_b, 0): P(class 0) = σ(f_a + f_b)."""
    u = features["a"] + features["b"]
    return torch.cat([u, torch.zeros_like(u)], dim=-1)


def hand_record(labels=(0, 1)):
    """f_a = (ln 3, 0): the real prediction is (0.75, 0.25) on sample 0, (0.5, 0.5) on sample 1;
    f_b = (0, 0) for both samples, so permuting b changes nothing (the spec's check)."""
    features = {"a": torch.tensor([[LN(3)], [0.0]], requires_grad=True), "b": torch.zeros(2, 1, requires_grad=True)}
    labels = torch.tensor(labels)
    batch = Batch({m: f.detach() for m, f in features.items()}, labels, torch.arange(2))
    record = StepRecord(batch=batch, fuse=hand_fuse, modalities=["a", "b"], features=features, logits=hand_fuse(features))
    return record, features


HAND_SEED = 1  # its six permutations of two samples: five swap a's rows, one leaves them (seed 0 swaps none)


def mipd_only(**options):
    return mcr(contrastive_weight=0, **options)


def test_js_divergence_of_hand_distributions():
    p, q = torch.tensor([[LN(3), 0.0]]), torch.tensor([[0.0, 0.0]])
    assert js_divergence(p, q).item() == pytest.approx(JSD_HAND, rel=1e-5)
    assert js_divergence(q, p).item() == pytest.approx(JSD_HAND, rel=1e-5)  # symmetric
    assert js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    # the upper bound ln 2 for disjoint supports
    assert js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])).item() == pytest.approx(LN(2), rel=1e-5)


def test_identical_features_of_a_modality_give_no_mipd_term():
    """Spec: with f_m identical for all samples, the permuted prediction equals the real one ⇒ contribution 0."""
    torch.manual_seed(0)
    features = {"a": torch.randn(1, 3).repeat(5, 1).requires_grad_(), "b": torch.randn(5, 3).requires_grad_()}
    fuse = nn.Linear(6, 4)

    def fused(f):
        return fuse(torch.cat([f["a"], f["b"]], dim=-1))

    labels = torch.tensor([0, 1, 2, 3, 0])
    permutations = draw_permutations(6, 2, 5, torch.Generator().manual_seed(1))
    divergences, _ = permutation_divergences(
        fused, features, ["a", "b"], fused(features).detach(), labels, permutations, [(0,), (1,)], -1.0, "any"
    )
    assert divergences[0].item() == pytest.approx(0.0, abs=1e-7)
    assert divergences[1].item() > 1e-4  # b's features differ, so permuting them does change the prediction
    (grad_a,) = torch.autograd.grad(divergences[0], features["a"], retain_graph=True)
    assert grad_a.abs().max().item() < 1e-6  # JSD is flat where the two predictions agree


def test_mipd_term_of_a_hand_batch():
    record, _ = hand_record()
    plugin = mipd_only()
    plugin.on_forward(record, context(seed=HAND_SEED))
    # a: every swap gives JSD_HAND on both samples; identities (same label) are not kept; b: 0
    assert record.logs["mcr/jsd/a"].item() == pytest.approx(JSD_HAND, rel=1e-5)
    assert record.logs["mcr/jsd/b"].item() == pytest.approx(0.0, abs=1e-7)
    # −λ_M Σ_S JSD_S with λ_M = 0.1
    assert record.losses["mcr_mipd"].item() == pytest.approx(-0.1 * JSD_HAND, rel=1e-5)
    # the kept fraction is the fraction of the six drawn permutations of two samples that swap them
    swaps = (draw_permutations(6, 2, 2, torch.Generator().manual_seed(HAND_SEED))[:, 0, 0] == 1).float().mean().item()
    assert 0 < swaps < 1  # this seed draws both kinds, so the normalisation below is seen
    assert record.logs["mcr/kept/a"].item() == pytest.approx(swaps)


def test_mean_runs_over_kept_rows_only():
    # same label on both samples: no partner of another label, nothing is kept, the term is 0
    record, _ = hand_record(labels=(1, 1))
    mipd_only().on_forward(record, context(seed=HAND_SEED))
    assert record.losses["mcr_mipd"].item() == 0.0
    # partners=any keeps the identities too, which add JSD 0: the mean shrinks by the fraction of swaps
    record, _ = hand_record(labels=(1, 1))
    mipd_only(partners="any").on_forward(record, context(seed=HAND_SEED))
    swaps = (draw_permutations(6, 2, 2, torch.Generator().manual_seed(HAND_SEED))[:, 0, 0] == 1).float().mean().item()
    assert record.losses["mcr_mipd"].item() == pytest.approx(-0.1 * JSD_HAND * swaps, rel=1e-5)


# Gradients of −λ_M JSD_a (λ_M = 0.1) on the hand batch, per swapped row, with u = f_a + f_b the logit
# difference: ∂JSD/∂q_c = ½ ln(q_c / m_c), so ∂JSD/∂u = ½ q_0 q_1 (ln(q_0/m_0) − ln(q_1/m_1)).
# Row 0 reads f_a[1] + f_b[0] = 0: q = (0.5, 0.5) against (0.75, 0.25): ∂JSD/∂u = 0.125 (ln 0.8 − ln 4/3) = −0.0638532
# Row 1 reads f_a[0] + f_b[1] = ln 3: q = (0.75, 0.25) against (0.5, 0.5): 0.09375 (ln 1.2 − ln 2/3) = 0.0551050
# The mean over the 2 rows of each kept swap, times −0.1:
DROW0 = 0.125 * (LN(0.8) - LN(4 / 3))
DROW1 = 0.09375 * (LN(1.2) - LN(2 / 3))
GRAD_A = [-0.1 * DROW1 / 2, -0.1 * DROW0 / 2]  # f_a[0] feeds row 1, f_a[1] feeds row 0: (−0.0027553, 0.0031927)
GRAD_B_OWN = [-0.1 * DROW0 / 2, -0.1 * DROW1 / 2]  # f_b[0] feeds row 0, f_b[1] feeds row 1 (before the factor k)


@pytest.mark.parametrize("k", [-1.0, 0.0, 0.5, 1.0])
def test_the_game_multiplies_the_gradient_reaching_the_other_modality_by_k(k):
    record, features = hand_record()
    mipd_only(k=k).on_forward(record, context(seed=HAND_SEED))
    record.losses["mcr_mipd"].backward()
    assert features["a"].grad.flatten().tolist() == pytest.approx(GRAD_A, rel=1e-4)
    assert features["b"].grad.flatten().tolist() == pytest.approx([k * g for g in GRAD_B_OWN], rel=1e-4, abs=1e-9)
    # k routes gradients only: the loss value is the same for every k
    assert record.losses["mcr_mipd"].item() == pytest.approx(-0.1 * JSD_HAND, rel=1e-5)


def test_an_attached_reference_also_carries_gradient():
    record, features = hand_record()
    mipd_only(reference="attached").on_forward(record, context(seed=HAND_SEED))
    record.losses["mcr_mipd"].backward()
    # ∂JSD/∂p_c = ½ ln(p_c / m_c) too: the real row 0 (p = (0.75, 0.25) against q = (0.5, 0.5)) gets DROW1,
    # the real row 1 (p = (0.5, 0.5) against (0.75, 0.25)) gets DROW0; row i reads f_a[i] + f_b[i]
    reference = [-0.1 * DROW1 / 2, -0.1 * DROW0 / 2]
    expected_a = [GRAD_A[0] + reference[0], GRAD_A[1] + reference[1]]  # = 2 GRAD_A on this batch
    expected_b = [-GRAD_B_OWN[0] + reference[0], -GRAD_B_OWN[1] + reference[1]]  # k = −1 on the permuted pass
    assert features["a"].grad.flatten().tolist() == pytest.approx(expected_a, rel=1e-4)
    assert features["b"].grad.flatten().tolist() == pytest.approx(expected_b, rel=1e-4, abs=1e-9)


def test_sets_of_modalities_permuted_together():
    assert permuted_sets(2, "single") == permuted_sets(2, "subsets") == [(0,), (1,)]
    assert permuted_sets(3, "single") == [(0,), (1,), (2,)]
    assert permuted_sets(3, "subsets") == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]


def test_permutations_come_from_the_generator():
    a = draw_permutations(6, 3, 10, torch.Generator().manual_seed(4))
    b = draw_permutations(6, 3, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (6, 3, 10)
    assert torch.equal(a.sort(dim=-1).values, torch.arange(10).expand(6, 3, 10))  # each row a permutation


def test_supervised_contrastive_of_hand_features():
    labels = torch.tensor([0, 1])
    eye = torch.eye(2)
    # rows a0, a1, b0, b1 with labels 0, 1, 0, 1: positive pairs (a0, b0), (b0, a0), (a1, b1), (b1, a1).
    # Same features: s_pos = 1/0.5 = 2, the anchor's negatives (the other label) both at 0:
    # softplus(ln(e^0 + e^0) − 2) = ln(1 + 2 e^−2) = 0.2395447 for each pair
    assert supervised_nt_xent([eye, eye], labels, 0.5).item() == pytest.approx(LN(1 + 2 * math.exp(-2)), rel=1e-5)
    # scaling a feature changes nothing (cosine similarity)
    assert supervised_nt_xent([3 * eye, eye], labels, 0.5).item() == pytest.approx(LN(1 + 2 * math.exp(-2)), rel=1e-5)
    # b's rows swapped: s_pos = 0 and one negative at 2: ln(1 + 1 + e^2) = 2.2395447 for each pair
    assert supervised_nt_xent([eye, eye.flip(0)], labels, 0.5).item() == pytest.approx(LN(2 + math.exp(2)), rel=1e-5)
    # positives by sample: with two distinct labels the pairs are the same, so the value is too
    assert supervised_nt_xent([eye, eye], None, 0.5).item() == pytest.approx(LN(1 + 2 * math.exp(-2)), rel=1e-5)
    # one label only: no negatives, every pair gives softplus(−inf) = 0
    assert supervised_nt_xent([eye, eye], torch.tensor([0, 0]), 0.5).item() == 0.0


def test_bottleneck_of_a_hand_decoder():
    decoder = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        decoder[0].weight.copy_(torch.eye(2))
        decoder[2].weight.copy_(torch.eye(2))
    logits = torch.tensor([[1.0, -1.0]], requires_grad=True)
    # g(z) = relu(z) = (1, 0); features (3, 0): MSE = ((3 − 1)² + 0²) / 2 = 2
    loss = ceb_loss(decoder, logits, [torch.tensor([[3.0]]), torch.tensor([[0.0]])])
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert logits.grad is None  # the fused logits are read detached


class Identity(Encoder):
    def forward(self, x):
        return x


def test_setup_builds_the_bottleneck_and_refuses_contrast_between_unequal_features():
    model = MultimodalModel({"a": Identity((2,), 2), "b": Identity((2,), 2)}, SumFusion({"a": 2, "b": 2}, 3), 3)
    plugin = mcr(num_classes=3, ceb_weight=0.5)
    plugin.setup(model, context())
    assert [tuple(p.shape) for p in plugin.ceb.parameters()] == [(2, 3), (4, 2)]  # C -> max dim -> Σ dims
    assert not hasattr(mcr(num_classes=3), "ceb")  # nothing to train when the term is off
    unequal = MultimodalModel({"a": Identity((2,), 2), "b": Identity((3,), 3)}, SumFusion({"a": 2, "b": 3}, 3), 3)
    with pytest.raises(ConfigError, match="contrastive_weight"):
        mcr(num_classes=3).setup(unequal, context())
    mcr(num_classes=3, contrastive_weight=0).setup(unequal, context())


def test_window_bounds_are_checked():
    with pytest.raises(ConfigError, match="modulation_ends"):
        mcr(modulation_starts=3, modulation_ends=1)


# -- through the trainer ----------------------------------------------------------------------------

def trainer_for(spec, extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def steps(trainer, count):
    out = []
    for _, batch in zip(range(count), trainer.train_loader):
        record = trainer.train_step(batch)
        out.append((record.loss.item(), {k: float(v) for k, v in record.logs.items()}))
    return out


def test_two_runs_with_one_seed_are_identical():
    first, second = steps(trainer_for("joint+mcr"), 3), steps(trainer_for("joint+mcr"), 3)
    assert first == second
    assert all("mcr/jsd/strong" in logs for _, logs in first)


def gradients(trainer, batch, epoch):
    trainer.ctx.epoch = epoch
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    trainer._zero_grad()
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    record.loss.backward()
    trainer._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec,epoch", [
    ("joint+mcr[modulation_starts=3]", 1),  # outside the window, every term at its default weight
    ("joint+mcr[mipd_weight=0,contrastive_weight=0,ceb_weight=0]", 1),  # inside, auxiliary weights 0
])
def test_gradients_are_joint_training_s_when_mcr_adds_nothing(spec, epoch):
    plain, modulated = trainer_for("joint"), trainer_for(spec)
    modulated.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    _, expected = gradients(plain, batch, epoch)
    record, got = gradients(modulated, batch, epoch)
    assert not any(name.startswith("mcr") for name in record.losses)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert torch.equal(plain.ctx.generator.get_state(), modulated.ctx.generator.get_state())  # no draw either


def test_inside_the_window_the_encoders_get_more():
    plain, modulated = trainer_for("joint"), trainer_for("joint+mcr")
    modulated.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    _, expected = gradients(plain, batch, 0)
    record, got = gradients(modulated, batch, 0)
    assert set(record.losses) == {"fused", "probe", "mcr_mipd", "mcr_contrastive"}
    assert any(not torch.equal(expected[n], got[n]) for n in expected if n.startswith("encoders."))


def state_of(trainer):
    return copy.deepcopy({
        "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "generator": trainer.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


def load_state(trainer, state):
    trainer.model.load_state_dict(state["model"])
    trainer.method.load_state_dict(state["method"])
    for k, o in trainer.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    trainer.ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    spec = "joint+mcr[ceb_weight=0.5]"  # the bottleneck's decoder is state too
    trainer = trainer_for(spec)
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    assert any(k.startswith("parts.mcr.ceb.") for k in trainer.method.state_dict())
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = state_of(trainer)
    expected = trainer.train_step(batches[2])
    fresh = trainer_for(spec)
    load_state(fresh, saved)
    got = fresh.train_step(batches[2])
    assert got.loss.item() == expected.loss.item()
    assert got.logs["mcr/jsd/weak"].item() == expected.logs["mcr/jsd/weak"].item()


def run_lines(spec, tmp_path, extra=()):
    metrics = train_run(build_config(overrides=[*TINY, *extra], method=spec), tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= metrics["test"]["accuracy"] <= 1
    return lines


def test_midas_with_mcr_trains(tmp_path):
    lines = run_lines("midas[modulation_starts=0]+mcr[ceb_weight=0.1]", tmp_path)
    for key in ("loss/misaligned", "loss/mcr_mipd", "loss/mcr_contrastive", "loss/mcr_ceb", "mcr/jsd/weak"):
        assert all(key in line["method"] for line in lines), key
    assert all(line["method"]["loss/mcr_mipd"] <= 0 for line in lines)


def test_joint_with_mcr_trains_with_two_modalities(tmp_path):
    lines = run_lines("joint[unimodal_weight=1]+mcr", tmp_path)
    assert {"loss/unimodal", "loss/mcr_mipd", "loss/mcr_contrastive"} <= set(lines[-1]["method"])


@pytest.mark.parametrize("sets", ["single", "subsets"])
def test_joint_with_mcr_trains_with_three_modalities(sets, tmp_path):
    lines = run_lines(f"joint+mcr[permuted_sets={sets}]", tmp_path, THREE)
    logged = {k.split("/", 2)[2] for k in lines[-1]["method"] if k.startswith("mcr/jsd/")}
    assert len(logged) == (3 if sets == "single" else 6), logged
    assert sum("+" in name for name in logged) == (0 if sets == "single" else 3)
