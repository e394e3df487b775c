"""MMCosine (an objective): the cosine logits and their scale by hand, where W_m comes from (concat blocks,
sum layers, unimodal heads, own weights) and which fusion heads are refused, the readouts every plugin and
metric sees, prediction and evaluation, the zero-feature gradient, the supplement's NCE term by hand,
determinism, the state round trip, and runs of mmcosine, mmcosine+arl and mmcosine+ogm_ge with M = 2 and 3."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers ogm_ge, arl)
import mmbalance.methods.mmcosine  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.compose import resolve
from mmbalance.methods.mmcosine import cosine_logits, modality_cosine_logits, nce_loss, normalise
from mmbalance.models.fusion import ConcatFusion, SumFusion
from mmbalance.models.readouts import coalition_logits, modality_scores
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.checkpoint import load_checkpoint

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def mmcosine(modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get("mmcosine")
    return cls(cls.Config(**options), list(modalities), num_classes)


def trainer(spec="mmcosine", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def hand_concat_model():
    """Concat head over a (2 dims) and b (3 dims), two classes, with a large bias the cosine head must ignore.

    W = [[1, 0 | 0, 0, 2],      b = [100, −100]
         [0, 2 | 3, 0, 0]]
    """
    fusion = ConcatFusion({"a": 2, "b": 3}, 2)
    with torch.no_grad():
        fusion.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 2.0, 3.0, 0.0, 0.0]]))
        fusion.linear.bias.copy_(torch.tensor([100.0, -100.0]))
    return SimpleNamespace(fusion=fusion, feature_dims={"a": 2, "b": 3}, fuse=fusion)


HAND_FEATURES = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.0, 0.0, -5.0]])}


# -- the spec's "Test it by" -----------------------------------------------------------------------------

def test_cosine_logit_of_the_spec_example():
    # f = (3, 4), W_c = (1, 0), s = 10: cos = 3/5 ⇒ logit 6; a second class W = (0, 2): cos = 4/5 ⇒ 8
    logits = cosine_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 10.0)
    assert logits.flatten().tolist() == pytest.approx([6.0, 8.0], abs=1e-6)
    # s = 15 (BalanceMM's value): 9 and 12
    assert cosine_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 15.0).flatten().tolist() == (
        pytest.approx([9.0, 12.0], abs=1e-6)
    )


def test_scaling_features_or_weights_by_a_positive_factor_leaves_the_logits_unchanged():
    torch.manual_seed(0)
    features = [torch.randn(5, 4), torch.randn(5, 3)]
    weights = [torch.randn(6, 4), torch.randn(6, 3)]
    z = modality_cosine_logits(features, weights, 10.0).sum(0)
    for factor_f, factor_w in [(7.5, 1.0), (1.0, 0.01), (1e3, 1e-3), (0.2, 40.0)]:
        scaled = modality_cosine_logits([f * factor_f for f in features], [w * factor_w for w in weights], 10.0).sum(0)
        assert torch.allclose(scaled, z, atol=1e-5)
    # scaling one modality's feature is also invisible (the point: norms cannot make a modality dominate)
    one = modality_cosine_logits([features[0] * 100, features[1]], weights, 10.0).sum(0)
    assert torch.allclose(one, z, atol=1e-5)
    # while a negative factor flips that modality's logits
    flipped = modality_cosine_logits([-features[0], features[1]], weights, 10.0)
    assert torch.allclose(flipped[0], -modality_cosine_logits(features, weights, 10.0)[0], atol=1e-6)


# -- where W_m comes from ---------------------------------------------------------------------------------

def test_fused_logits_by_hand_on_a_concat_head_with_unequal_blocks():
    # a: f = (3, 4), blocks (1, 0) and (0, 2) ⇒ 10 · (0.6, 0.8) = (6, 8)
    # b: f = (0, 0, −5), blocks (0, 0, 2) and (3, 0, 0) ⇒ 10 · (−1, 0) = (−10, 0)
    # z = (−4, 8); the bias (100, −100) is not used (the plain head gives (3 − 10 + 100, 8 + 0 − 100) = (93, −92))
    model = hand_concat_model()
    part = mmcosine()
    per_modality = part.modality_logits(model, HAND_FEATURES)
    assert per_modality.flatten().tolist() == pytest.approx([6.0, 8.0, -10.0, 0.0], abs=1e-5)
    assert part.fuse(model, HAND_FEATURES).flatten().tolist() == pytest.approx([-4.0, 8.0], abs=1e-5)
    assert model.fusion(HAND_FEATURES).flatten().tolist() == pytest.approx([93.0, -92.0])
    # the blocks are views of the head's weight: the cosine loss trains the fusion head itself
    part.fuse(model, HAND_FEATURES).sum().backward()
    assert model.fusion.linear.weight.grad is not None and model.fusion.linear.bias.grad is None


def test_sum_head_uses_each_modalitys_layer():
    # a's layer rows (1, 0), (0, 1); b's rows (0, 2), (−2, 0); f_a = (1, 1), f_b = (0, 3), s = 2:
    # a: 2 · (1/√2, 1/√2) = (√2, √2); b: 2 · (1, 0) = (2, 0) ⇒ z = (√2 + 2, √2)
    fusion = SumFusion({"a": 2, "b": 2}, 2)
    with torch.no_grad():
        fusion.linears["a"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        fusion.linears["b"].weight.copy_(torch.tensor([[0.0, 2.0], [-2.0, 0.0]]))
    z = mmcosine(scale=2.0).fuse(SimpleNamespace(fusion=fusion), {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[0.0, 3.0]])})
    assert z.flatten().tolist() == pytest.approx([math.sqrt(2) + 2, math.sqrt(2)], abs=1e-6)


def test_weights_heads_reads_the_unimodal_heads_and_the_heads_give_cosine_logits():
    t = trainer("mmcosine[weights=heads]")
    part, model = t.method.objective, t.model
    batch = next(iter(t.train_loader))
    record = t.method.training_step(model, batch, t.ctx)
    features = record.features
    expected = sum(cosine_logits(features[m], model.unimodal_heads[m].weight, 10.0) for m in part.modalities)
    assert torch.allclose(record.logits, expected, atol=1e-6)
    assert set(record.losses) == {"fused"}  # the heads are trained by the cosine loss, no probe
    heads = part.heads(model, features)
    for m in part.modalities:
        assert torch.allclose(heads[m], record.unimodal[m]) and heads[m].abs().max() <= 10 + 1e-5
    record.loss.backward()
    assert all(model.unimodal_heads[m].weight.grad is not None for m in part.modalities)
    assert all(p.grad is None for p in model.fusion.parameters())


def test_weights_own_works_with_any_fusion_head_and_is_trained():
    t = trainer("mmcosine[weights=own]", ["model.fusion=film"])
    part = t.method.objective
    assert {m: tuple(w.shape) for m, w in part.cosine_weights.items()} == {m: (4, 8) for m in part.modalities}
    assert all(any(p is w for p in t.parameters) for w in part.cosine_weights.values())  # in the optimizer
    before = {m: w.detach().clone() for m, w in part.cosine_weights.items()}
    record = t.train_step(next(iter(t.train_loader)))
    assert set(record.losses) == {"fused", "probe"}
    assert all(not torch.equal(before[m], part.cosine_weights[m]) for m in part.modalities)
    assert all(p.grad is None for p in t.model.fusion.parameters())  # the FiLM head goes unused


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_fusion_weights_refuse_heads_without_per_modality_blocks_in_one_line(fusion):
    with pytest.raises(ConfigError) as error:
        trainer("mmcosine", [f"model.fusion={fusion}"])
    message = str(error.value)
    assert "\n" not in message and f"model.fusion={fusion}" in message and "mmcosine.weights=own" in message


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError) as error:
        mmcosine(variant="official", weights="own")
    assert "\n" not in str(error.value) and "mmcosine.weights=fusion" in str(error.value)
    with pytest.raises(ConfigError) as error:  # NCE compares features across modalities: equal sizes
        mmcosine(lam=0.5).setup(hand_concat_model(), None)
    assert "\n" not in str(error.value) and "mmcosine.lam=0.5" in str(error.value)
    with pytest.raises(Exception):
        build_config(overrides=[*TINY, "mmcosine.scale=0"], method="mmcosine")
    assert build_config(overrides=[*TINY, "mmcosine.scale=15"], method="mmcosine").section("mmcosine").scale == 15
    with pytest.raises(ConfigError, match="two objectives"):
        resolve("midas+mmcosine")


# -- what plugins and metrics read --------------------------------------------------------------------------

def test_coalition_and_restricted_readouts_are_the_per_modality_cosine_logits():
    # a zeroed modality has no direction: cos = 0, so fuse(f^S) = s Σ_{m∈S} cos(f_m, W_m), fuse(f^∅) = 0
    # and d_m = fuse(f^{m}) − (M−1)/M · 0 = s cos(f_m, W_m) exactly, summing to z
    t = trainer("mmcosine", M3)
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    part = t.method.objective
    per_modality = part.modality_logits(t.model, record.features)
    assert torch.equal(coalition_logits(record.fuse, record.features, []), torch.zeros_like(record.logits))
    assert torch.equal(record.zeroed_logits(), per_modality)
    assert torch.equal(record.restricted_logits(), per_modality)
    assert torch.allclose(record.restricted_logits().sum(0), record.logits, atol=1e-6)
    pair = part.modalities[:2]
    assert torch.allclose(coalition_logits(record.fuse, record.features, pair), per_modality[:2].sum(0), atol=1e-6)
    # logged: the batch-mean true-class logit per modality
    true_logit = per_modality.gather(-1, batch.labels.expand(3, -1).unsqueeze(-1)).squeeze(-1).mean(-1)
    for k, m in enumerate(part.modalities):
        assert record.logs[f"mmcosine/true_logit/{m}"].item() == pytest.approx(true_logit[k].item(), abs=1e-6)
        assert record.logs[f"mmcosine/feature_norm/{m}"].item() == pytest.approx(record.features[m].norm(dim=-1).mean().item())


def test_prediction_and_evaluation_use_the_cosine_logits():
    t = trainer()
    batch = next(iter(t.heldout_loader))
    with torch.no_grad():
        features = t.method.encode(t.model, batch.inputs)
        cosine = t.method.objective.fuse(t.model, features)
        assert torch.equal(t.method.predict(t.model, batch.inputs), cosine)
        assert not torch.allclose(t.model.fuse(features), cosine)
    labels = torch.cat([b.labels for b in t.heldout_loader])
    predicted = torch.cat([t.method.predict(t.model, b.inputs).argmax(-1) for b in t.heldout_loader])
    metrics = t.evaluate_loader(t.heldout_loader)
    assert metrics["accuracy"] == pytest.approx((predicted == labels).float().mean().item())

    official = trainer("mmcosine[variant=official]")
    with torch.no_grad():
        features = official.method.encode(official.model, batch.inputs)
        assert torch.equal(official.method.predict(official.model, batch.inputs), official.model.fuse(features))
        # training still reads the cosine head
        record = official.method.training_step(official.model, batch, official.ctx)
        assert torch.equal(record.logits, official.method.objective.fuse(official.model, record.features))


def test_a_zero_feature_has_cosine_zero_and_no_gradient():
    # F.normalize gives the zero vector the gradient 1/eps = 1e12; the part's normalise gives it 0
    x = torch.zeros(1, 3, requires_grad=True)
    logits = cosine_logits(x, torch.tensor([[1.0, 2.0, 2.0]]), 10.0)
    assert logits.item() == 0.0
    logits.sum().backward()
    assert torch.equal(x.grad, torch.zeros(1, 3))
    y = torch.zeros(1, 3, requires_grad=True)
    (F.normalize(y, dim=-1) @ torch.tensor([1.0, 2.0, 2.0])).sum().backward()
    assert y.grad.abs().max() > 1e11
    # away from zero it is x / ‖x‖
    v = torch.tensor([[3.0, 4.0, 0.0]])
    assert torch.equal(normalise(v), F.normalize(v, dim=-1))


# -- the supplement's NCE term ------------------------------------------------------------------------------

def test_nce_term_by_hand():
    # labels (0, 0, 1), T = 1, f1 = (e1, e1, e2), f2 = (e1, e2, e2) ⇒ cos rows (1,0,0), (1,0,0), (0,1,1)
    # rows 0, 1: p = (e, 1, 1)/(e+2); positives j = 0, 1, negative j = 2:
    #   ½[−log(e/(e+2)) − log(1/(e+2))] − log(1 − 1/(e+2)) = 1.2896277403458793
    # row 2: p = (1, e, e)/(1+2e); positive j = 2, negatives j = 0, 1:
    #   −log(e/(1+2e)) + ½[−log(1 − 1/(1+2e)) − log(1 − e/(1+2e))] = 1.220785174077418
    # mean = (2 · 1.2896277403458793 + 1.220785174077418)/3 = 1.2666802182563923
    f1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    assert nce_loss(f1, f2, labels, 1.0).item() == pytest.approx(1.2666802182563923, abs=1e-8)
    # the softmax runs over f2 for each f1 (not symmetric): swapped arguments give another value
    assert nce_loss(f2, f1, labels, 1.0).item() != pytest.approx(1.2666802182563923, abs=1e-3)
    # scale-free, like the logits; a batch of one class has no negatives and stays finite
    assert nce_loss(5 * f1, 0.1 * f2, labels, 1.0).item() == pytest.approx(1.2666802182563923, abs=1e-8)
    assert math.isfinite(nce_loss(f1, f2, torch.zeros(3, dtype=torch.long), 1.0).item())


@pytest.mark.parametrize("extra", [[], M3])
def test_nce_term_is_weighted_by_lam_and_averaged_over_pairs(extra):
    t = trainer("mmcosine[lam=0.5,nce_temperature=0.2]", extra)
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    f, ms = record.features, t.method.objective.modalities
    pairs = [(a, b) for i, a in enumerate(ms) for b in ms[i + 1:]]
    expected = 0.5 * sum(nce_loss(f[a], f[b], batch.labels, 0.2) for a, b in pairs) / len(pairs)
    assert record.losses["nce"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert "nce" not in trainer("mmcosine", extra).method.training_step(t.model, batch, t.ctx).losses


# -- determinism, state, runs -------------------------------------------------------------------------------

def run(tmp_path, name, spec="mmcosine", extra=()):
    config = build_config(overrides=[*TINY, *extra], method=spec)
    metrics = train_run(config, tmp_path / name, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


def test_runs_are_deterministic(tmp_path):
    first, lines_a = run(tmp_path, "a", "mmcosine[weights=own]")
    second, lines_b = run(tmp_path, "b", "mmcosine[weights=own]")
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for key, value in last[0]["method"].items():
        assert torch.equal(value, last[1]["method"][key]), key
    assert any("cosine_weights" in key for key in last[0]["method"])


@pytest.mark.parametrize("spec", ["mmcosine", "mmcosine[weights=own,lam=0.1]"])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(spec):
    first = trainer(spec)
    batches = [b for _, b in zip(range(3), first.train_loader)]
    for batch in batches[:2]:
        first.train_step(batch)
    saved = {
        "model": {k: v.clone() for k, v in first.model.state_dict().items()},
        "method": {k: v.clone() for k, v in first.method.state_dict().items()},
        "optimizers": {k: o.state_dict() for k, o in first.optimizers.items()},
    }
    saved = copy.deepcopy(saved)
    expected = first.train_step(batches[2])

    fresh = trainer(spec)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    again = fresh.train_step(batches[2])
    assert again.loss.item() == expected.loss.item()
    assert torch.equal(again.logits, expected.logits)


def test_arl_reads_the_cosine_logits_and_scales_the_encoder_gradients():
    t = trainer("mmcosine+arl[modulation_starts=0]")
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    per_modality = t.method.objective.modality_logits(t.model, record.features)
    # ARL's auxiliary loss is γ Σ_m CE(fuse(f^{m})) on the cosine per-modality logits
    expected = 4.0 * sum(F.cross_entropy(z, batch.labels) for z in per_modality)
    assert record.losses["arl_unimodal"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert record.logs["arl/accelerating"] == 1.0


def test_ogm_ge_scores_are_those_of_the_cosine_logits():
    t = trainer("mmcosine+ogm_ge")
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    scores = modality_scores(t.method.objective.modality_logits(t.model, record.features), batch.labels)
    for k, m in enumerate(t.method.objective.modalities):
        assert record.logs[f"ogm_ge/score/{m}"].item() == pytest.approx(scores[k].item(), abs=1e-5)
    record.loss.backward()
    t._finish_gradients(record)  # OGM-GE modulates the encoders' gradients of the cosine loss
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in t.method.objective.modalities for p in t.ctx.params.encoder[m])


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", ["mmcosine", "mmcosine+arl", "mmcosine+ogm_ge"])
def test_runs_two_epochs(spec, modalities, tmp_path):
    metrics, lines = run(tmp_path, "r", spec, M3 if modalities == 3 else ())
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert any(key.startswith("mmcosine/true_logit/") for key in lines[-1]["method"])
    for plugin in ("arl", "ogm_ge"):
        if plugin in spec:
            assert any(key.startswith(f"{plugin}/") for key in lines[-1]["method"])
