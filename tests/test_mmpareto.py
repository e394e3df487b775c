"""MMPareto (a plugin): the Pareto weights and magnitude rule on hand-made 2-D gradients, the plugin's
wiring (which terms are multimodal and unimodal, for joint, joint with trained heads and MIDAS), the
window, determinism, the state round trip, M = 3, and two processes against one."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbalance.methods.mmpareto  # noqa: F401  (registers mmpareto until the package imports it)
from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.methods import Method, Objective
from mmbalance.methods.mmpareto import GRADIENT, pareto_gradient, pareto_weights
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

T = torch.tensor
TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]


def tiny(modalities=2, extra=()):
    dims = "[8,8]" if modalities == 2 else "[8,8,8]"
    return [*TINY, f"synthetic.num_modalities={modalities}", f"synthetic.dims={dims}", *extra]


def part(name, modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def context(model, epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=list(model.modalities),
        num_classes=model.num_classes, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
        params=ParameterGroups.of(model),
    )


# -- the rule on hand-made gradients ------------------------------------------------------------------
def test_conflicting_gradients_take_the_min_norm_weights_and_keep_the_plain_magnitude():
    """The spec's line: g_mm = (1, 0), g_u = (−1, 1)."""
    g_mm, g_u = T([1.0, 0.0]), T([-1.0, 1.0])
    # g_mm·g_u = −1 < 0: conflict. w_mm = (‖g_u‖² − g_mm·g_u) / ‖g_mm − g_u‖² = (2 + 1) / ‖(2, −1)‖² = 3/5
    weights = pareto_weights(g_mm, g_u)
    assert weights.tolist() == pytest.approx([0.6, 0.4], abs=1e-7)
    # 0.6 (1, 0) + 0.4 (−1, 1) = (0.2, 0.4), orthogonal to g_mm − g_u = (2, −1): the segment's closest point
    combination = weights[0] * g_mm + weights[1] * g_u
    assert combination.tolist() == pytest.approx([0.2, 0.4], abs=1e-7)
    assert torch.dot(combination, g_mm - g_u).item() == pytest.approx(0.0, abs=1e-7)
    # ĝ = 2 (0.2, 0.4) = (0.4, 0.8), ‖ĝ‖ = √0.8 ≈ 0.894427 < n = ‖g_mm + g_u‖ = ‖(0, 1)‖ = 1
    # -> ĝ n/‖ĝ‖ = (0.4, 0.8)/√0.8 = (0.447214, 0.894427); × γ = 1.5 -> (0.670820, 1.341641)
    gradient, _ = pareto_gradient(g_mm, g_u)
    assert gradient.tolist() == pytest.approx([1.5 * 0.4 / math.sqrt(0.8), 1.5 * 0.8 / math.sqrt(0.8)], rel=1e-6)
    assert gradient.tolist() == pytest.approx([0.671, 1.342], abs=5e-4)


def test_agreeing_gradients_are_summed_and_scaled_by_gamma():
    g_mm, g_u = T([1.0, 2.0]), T([3.0, 0.0])
    # g_mm·g_u = 3 > 0: (½, ½); ĝ = 2 (½ g_mm + ½ g_u) = (4, 2) = g_mm + g_u, so ‖ĝ‖ = n: no stretch
    gradient, weights = pareto_gradient(g_mm, g_u, gamma=1.5)
    assert weights.tolist() == [0.5, 0.5]
    assert gradient.tolist() == pytest.approx([6.0, 3.0])  # 1.5 (4, 2)
    # γ is the only scale: γ = 1 gives the plain sum back
    assert pareto_gradient(g_mm, g_u, gamma=1.0)[0].tolist() == pytest.approx([4.0, 2.0])


def test_weights_are_per_encoder_and_the_magnitude_is_restored_per_tensor():
    # one encoder of two tensors, p1 (2 elements) and p2 (1): g_mm = ((1, 0), 1), g_u = ((−1, 1), −1)
    g_mm, g_u = T([1.0, 0.0, 1.0]), T([-1.0, 1.0, -1.0])
    # over the whole encoder: g_mm·g_u = −2, ‖g_mm‖² = 2, ‖g_u‖² = 3, ‖g_mm − g_u‖² = ‖(2, −1, 2)‖² = 9
    # -> w_mm = (3 + 2)/9 = 5/9; combination (1/9, 4/9, 1/9); ĝ = (2/9, 8/9, 2/9); plain g_mm + g_u = (0, 1, 0)
    gradient, weights = pareto_gradient(g_mm, g_u, sizes=[2, 1])
    assert weights.tolist() == pytest.approx([5 / 9, 4 / 9], rel=1e-6)
    # p1: ‖(2/9, 8/9)‖ = √68/9 ≈ 0.916 < n1 = 1 -> (2, 8)/√68, × 1.5 = (0.363803, 1.455214)
    # p2: n2 = |0| = 0 is not above ‖ĝ2‖ = 2/9: kept, × 1.5 = 1/3
    expected = [1.5 * 2 / math.sqrt(68), 1.5 * 8 / math.sqrt(68), 1 / 3]
    assert gradient.tolist() == pytest.approx(expected, rel=1e-6)
    # rescaling the encoder as one vector would give p2 1.5 · (2/9) · 1/(√72/9) = 0.353553 instead
    assert gradient[2].item() != pytest.approx(1.5 * 2 / math.sqrt(72), rel=1e-3)


def test_a_zero_gradient_hits_the_solver_edges_and_a_zero_integration_keeps_the_plain_gradient():
    # g_u = 0: g_mm·g_u = 0 is no agreement; 0 ≥ ‖g_u‖² = 0 -> w_mm = 0.001 (the solver's edge)
    # ĝ = 0.002 (3, 4), stretched to n = ‖(3, 4)‖ = 5 -> (3, 4); × 1.5 = (4.5, 6)
    gradient, weights = pareto_gradient(T([3.0, 4.0]), T([0.0, 0.0]))
    assert weights.tolist() == pytest.approx([0.001, 0.999])
    assert gradient.tolist() == pytest.approx([4.5, 6.0], rel=1e-6)
    # g_mm = 0: 0 ≥ ‖g_mm‖² -> w_mm = 0.999; ĝ = 0.002 g_u, stretched to ‖g_u‖ -> 1.5 g_u
    gradient, weights = pareto_gradient(T([0.0, 0.0]), T([0.0, -2.0]))
    assert weights.tolist() == pytest.approx([0.999, 0.001])
    assert gradient.tolist() == pytest.approx([0.0, -3.0], rel=1e-6)
    # both zero: ĝ = 0, no direction to rescale (the BMM snapshot divides by zero here): the plain gradient stays
    gradient, _ = pareto_gradient(T([0.0, 0.0]), T([0.0, 0.0]), total=T([3.0, 4.0]))
    assert gradient.tolist() == [3.0, 4.0]
    assert torch.isfinite(gradient).all()


def test_the_official_variant_leaves_the_min_norm_weight_unclipped():
    # orthogonal, very different lengths: g_mm = (100, 0), g_u = (0, 1); w_mm = 1/(10000 + 1) ≈ 1.0e-4
    g_mm, g_u = T([100.0, 0.0]), T([0.0, 1.0])
    official, weights = pareto_gradient(g_mm, g_u, variant="official")
    assert weights[0].item() == pytest.approx(1 / 10001, rel=1e-5)
    # combination ∝ (100, 10000)/10001 ∝ (1, 100); stretched to n = ‖(100, 1)‖ = √10001 = ‖(1, 100)‖ -> (1, 100); × 1.5
    assert official.tolist() == pytest.approx([1.5, 150.0], rel=1e-5)
    # paper (BASELINES §5): w_mm clipped to 0.001 -> direction (0.1, 0.999), norm √10001, × 1.5
    paper, weights = pareto_gradient(g_mm, g_u, variant="paper")
    assert weights.tolist() == pytest.approx([0.001, 0.999])
    scale = 1.5 * math.sqrt(10001) / math.sqrt(0.1**2 + 0.999**2)
    assert paper.tolist() == pytest.approx([0.1 * scale, 0.999 * scale], rel=1e-5)  # (14.941, 149.26)


# -- the plugin on a hand objective: the spec's numbers through the hooks ------------------------------
class Theta(Encoder):
    """A 2-vector parameter θ_m, output as every sample's feature."""

    def __init__(self):
        super().__init__((2,), 2)
        self.theta = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x * 0 + self.theta


#: hand gradients: encoder a conflicts (the spec's example), encoder b agrees
G_MM = {"a": T([1.0, 0.0]), "b": T([1.0, 2.0])}
G_U = {"a": T([-1.0, 1.0]), "b": T([3.0, 0.0])}


class Linear(Objective):
    """L_mm = Σ_m G_MM[m]·θ_m + the fused CE, L_u = Σ_m G_U[m]·θ_m: hand-chosen encoder gradients."""

    class Config(Objective.Config):
        pass

    def training_step(self, model, batch, ctx):
        features = self.encode(model, batch.inputs)
        logits = self.fuse(model, {m: f.detach() for m, f in features.items()})  # trains the fusion head only
        record = self.record(model, batch, features, logits=logits)
        theta = {m: model.encoders[m].theta for m in self.modalities}
        record.add_loss("fused", F.cross_entropy(logits, batch.labels) + sum(G_MM[m] @ theta[m] for m in self.modalities))
        record.add_loss("unimodal", sum(G_U[m] @ theta[m] for m in self.modalities))
        return record


def hand_model():
    return MultimodalModel({m: Theta() for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)


def hand_batch():
    return Batch({m: torch.ones(2, 2) for m in "ab"}, T([0, 1]), torch.arange(2))


def test_the_plugin_replaces_each_encoder_gradient_by_the_integrated_one():
    model = hand_model()
    method = Method([Linear(Linear.Config(), ["a", "b"], 2), part("mmpareto", num_classes=2)])
    ctx = context(model)
    method.setup(model, ctx)
    record = method.training_step(model, hand_batch(), ctx)
    assert set(record.losses) == {"fused", "unimodal"}  # the objective's unimodal term: no term of its own
    record.loss.backward()
    # before after_backward: the plain gradients g_mm + g_u
    assert model.encoders["a"].theta.grad.tolist() == [0.0, 1.0]
    fusion = [p.grad.clone() for p in model.fusion.parameters()]
    method.after_backward(record, ctx)
    # a: the spec's example -> (0.670820, 1.341641); b: agreement -> 1.5 (4, 2)
    assert model.encoders["a"].theta.grad.tolist() == pytest.approx([1.5 * 0.4 / math.sqrt(0.8), 1.5 * 0.8 / math.sqrt(0.8)], rel=1e-6)
    assert model.encoders["b"].theta.grad.tolist() == pytest.approx([6.0, 3.0], rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.fusion.parameters(), fusion))  # fusion untouched
    logs = record.logs
    assert logs["mmpareto/weight_mm/a"].item() == pytest.approx(0.6, rel=1e-6)
    assert logs["mmpareto/cos/a"].item() == pytest.approx(-1 / math.sqrt(2), rel=1e-6)
    assert logs["mmpareto/weight_mm/b"].item() == 0.5
    assert logs["mmpareto/cos/b"].item() == pytest.approx(3 / (math.sqrt(5) * 3), rel=1e-6)
    assert logs["mmpareto/active"] == 1.0


def test_gamma_reaches_the_plugin():
    model = hand_model()
    method = Method([Linear(Linear.Config(), ["a", "b"], 2), part("mmpareto", num_classes=2, gamma=1.0)])
    ctx = context(model)
    record = method.training_step(model, hand_batch(), ctx)
    record.loss.backward()
    method.after_backward(record, ctx)
    assert model.encoders["b"].theta.grad.tolist() == pytest.approx([4.0, 2.0])  # γ = 1: the plain sum


# -- the plugin with real objectives: against gradients taken one loss at a time -------------------------
def small_setup(modalities=("a", "b")):
    torch.manual_seed(0)
    shapes = {m: (3 + i,) for i, m in enumerate(modalities)}
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8), list(modalities), shapes, 3)
    inputs = {m: torch.randn(6, *shape) for m, shape in shapes.items()}
    return model, Batch(inputs, T([0, 1, 2, 0, 1, 2]), torch.arange(6))


def encoder_gradient(loss, model, m):
    grads = torch.autograd.grad(loss, list(model.encoders[m].parameters()), retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, model.encoders[m].parameters())])


def expected_encoder_gradients(model, multimodal, unimodal, **options):
    """MMPareto's encoder gradients from the two losses, each differentiated on its own (the spec's M + 1 calls)."""
    out = {}
    for m in model.modalities:
        g_mm = encoder_gradient(multimodal, model, m)
        g_u = sum(encoder_gradient(u, model, m) for u in unimodal)
        sizes = [p.numel() for p in model.encoders[m].parameters()]
        out[m] = (pareto_gradient(g_mm, g_u, sizes=sizes, **options)[0], g_mm, g_u)
    return out


def step(model, method, batch, epoch=0, seed=0):
    ctx = context(model, epoch, seed)
    method.setup(model, ctx)
    record = method.training_step(model, batch, ctx)
    record.loss.backward()
    method.after_backward(record, ctx)
    return record, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def flat_encoder(grads, m):
    return torch.cat([g.reshape(-1) for n, g in grads.items() if n.startswith(f"encoders.{m}.")])


@pytest.mark.parametrize("modalities", [("a", "b"), ("a", "b", "c")])
def test_with_joint_the_plugin_adds_the_unimodal_loss_and_the_heads_train_once(modalities):
    model, batch = small_setup(modalities)
    reference = copy.deepcopy(model)
    method = Method([part("joint", modalities), part("mmpareto", modalities)])
    record, grads = step(model, method, batch)
    assert set(record.losses) == {"fused", "probe", "mmpareto_unimodal"}

    features = reference.encode(batch.inputs)
    fused = F.cross_entropy(reference.fuse(features), batch.labels)
    unimodal = [F.cross_entropy(reference.unimodal_heads[m](features[m]), batch.labels) for m in modalities]
    assert record.losses["mmpareto_unimodal"].item() == pytest.approx(sum(unimodal).item(), rel=1e-6)
    expected = expected_encoder_gradients(reference, fused, unimodal)
    for m in modalities:
        assert torch.allclose(flat_encoder(grads, m), expected[m][0], rtol=1e-5, atol=1e-7), m
        cos = F.cosine_similarity(expected[m][1], expected[m][2], dim=0)
        assert record.logs[f"mmpareto/cos/{m}"].item() == pytest.approx(cos.item(), rel=1e-4, abs=1e-6)
    # the fusion head: the fused CE only; each head: its CE once (the probe), not twice
    (fused + sum(unimodal)).backward()
    for name, p in reference.named_parameters():
        if not name.startswith("encoders."):
            assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-8), name


def test_an_objective_unimodal_term_is_used_as_it_is():
    model, batch = small_setup()
    reference = copy.deepcopy(model)
    record, grads = step(model, Method([part("joint", unimodal_weight=0.5), part("mmpareto")]), batch)
    assert set(record.losses) == {"fused", "unimodal"}  # no term of the plugin's own
    features = reference.encode(batch.inputs)
    fused = F.cross_entropy(reference.fuse(features), batch.labels)
    unimodal = [0.5 * F.cross_entropy(reference.unimodal_heads[m](features[m]), batch.labels) for m in "ab"]
    expected = expected_encoder_gradients(reference, fused, unimodal)
    for m in "ab":
        assert torch.allclose(flat_encoder(grads, m), expected[m][0], rtol=1e-5, atol=1e-7), m


def test_midas_plus_mmpareto_integrates_midas_losses_and_leaves_fusion_and_heads_alone():
    model, batch = small_setup()
    midas = {"modulation_starts": 0}
    reference = copy.deepcopy(model)
    _, alone = step(copy.deepcopy(model), Method([part("midas", **midas)]), batch, seed=7)
    record, grads = step(model, Method([part("midas", **midas), part("mmpareto")]), batch, seed=7)
    assert set(record.losses) == {"fused", "unimodal", "misaligned"}
    assert record.logs["midas/misaligned_samples"].item() > 0
    for name in alone:
        if not name.startswith("encoders."):
            assert torch.equal(grads[name], alone[name]), name
    # reference: MIDAS's step again with the same draws; multimodal = fused + misaligned, unimodal = MIDAS's term
    ctx = context(reference, 0, seed=7)
    again = Method([part("midas", **midas)]).training_step(reference, batch, ctx)
    multimodal = again.losses["fused"] + again.losses["misaligned"]
    expected = expected_encoder_gradients(reference, multimodal, [again.losses["unimodal"]])
    for m in "ab":
        assert torch.allclose(flat_encoder(grads, m), expected[m][0], rtol=1e-5, atol=1e-7), m
        assert not torch.allclose(flat_encoder(grads, m), flat_encoder(alone, m))


def test_a_hook_scaling_plugin_placed_before_mmpareto_scales_the_integrated_gradient():
    """arl's hooks act on the plain and on the unimodal gradient alike: the weights do not change, the result is × (1 + w_m)."""
    model, batch = small_setup()
    _, plain = step(copy.deepcopy(model), Method([part("joint"), part("mmpareto")]), batch)
    arl = part("arl", modulation_starts=0, unimodal_weight=0)
    record, scaled = step(copy.deepcopy(model), Method([part("joint"), arl, part("mmpareto")]), batch)
    for m in "ab":
        factor = 1 + record.logs[f"arl/weight/{m}"].item()
        assert torch.allclose(flat_encoder(scaled, m), factor * flat_encoder(plain, m), rtol=1e-5, atol=1e-7), m


def test_outside_the_window_every_gradient_is_joint_training_exactly():
    model, batch = small_setup()
    _, plain = step(copy.deepcopy(model), Method([part("joint")]), batch)
    for epoch in (0, 1):  # before modulation_starts = 2, with the unimodal loss on (weight 1)
        record, grads = step(copy.deepcopy(model), Method([part("joint"), part("mmpareto", modulation_starts=2)]), batch, epoch)
        assert set(record.losses) == {"fused", "probe"} and GRADIENT not in record.shared
        assert record.logs["mmpareto/active"] == 0.0
        assert grads.keys() == plain.keys() and all(torch.equal(grads[n], plain[n]) for n in grads)
    # from modulation_starts the encoders' gradients change; the fusion head's and the heads' (the probe's) do not
    _, grads = step(copy.deepcopy(model), Method([part("joint"), part("mmpareto", modulation_starts=2)]), batch, 2)
    assert not torch.equal(flat_encoder(grads, "a"), flat_encoder(plain, "a"))
    assert all(torch.equal(grads[n], plain[n]) for n in grads if not n.startswith("encoders."))
    # after modulation_ends: plain again
    _, grads = step(copy.deepcopy(model), Method([part("joint"), part("mmpareto", modulation_ends=1)]), batch, 2)
    assert all(torch.equal(grads[n], plain[n]) for n in grads)


def test_the_plugin_needs_setup_for_its_own_unimodal_loss():
    model, batch = small_setup()
    method = Method([part("joint"), part("mmpareto")])
    with pytest.raises(RuntimeError, match="setup"):
        method.training_step(model, batch, context(model))


# -- through the trainer -----------------------------------------------------------------------------
def trainer_for(spec="joint+mmpareto", extra=(), modalities=2):
    return Trainer(build_config(overrides=tiny(modalities, extra), method=spec), None, quiet=True)


def test_two_runs_with_the_same_seed_take_identical_steps():
    runs = []
    for _ in range(2):
        trainer = trainer_for()
        logs = []
        for _, batch in zip(range(3), trainer.train_loader):
            record = trainer.train_step(batch)
            logs.append({k: float(v) for k, v in record.logs.items()})
        runs.append((logs, copy.deepcopy(trainer.model.state_dict())))
    assert runs[0][0] == runs[1][0]
    assert any(k.startswith("mmpareto/weight_mm/") for k in runs[0][0][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_the_state_holds_no_model_weights_and_a_round_trip_reproduces_the_next_step():
    batches = [b for _, b in zip(range(3), trainer_for().train_loader)]
    trainer = trainer_for()
    assert not any(k.startswith("parts.mmpareto") for k in trainer.method.state_dict())  # the heads handle is not state
    for batch in batches[:2]:
        trainer.train_step(batch)
    saved = copy.deepcopy({
        "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
    })
    expected = trainer.train_step(batches[2])
    expected_grads = [p.grad.clone() for p in trainer.model.parameters()]
    fresh = trainer_for()
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    record = fresh.train_step(batches[2])
    assert record.loss.item() == expected.loss.item()
    assert all(torch.equal(p.grad, g) for p, g in zip(fresh.model.parameters(), expected_grads))


@pytest.mark.parametrize("spec, modalities", [("joint+mmpareto", 2), ("joint+mmpareto", 3), ("midas+mmpareto", 2)])
def test_two_epoch_runs(spec, modalities, tmp_path):
    metrics = train_run(build_config(overrides=tiny(modalities), method=spec), tmp_path / "r", quiet=True)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    names = list(metrics["test"]["modality_accuracy"])
    assert len(names) == modalities
    for m in names:
        assert f"mmpareto/cos/{m}" in lines[-1]["method"] and f"mmpareto/weight_mm/{m}" in lines[-1]["method"]
    assert 0 <= metrics["test"]["accuracy"] <= 1


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """g_u is averaged like the plain gradients, so the integration is the global batch's on every process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    options = ["--import", "mmbalance.methods.mmpareto", "--method", "joint+mmpareto"]
    for key in ["synthetic.num_samples=240", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
                "train.epochs=2", "model.feature_dim=8", "model.hidden_dim=16", "train.lr=0.01"]:
        options += ["--set", key]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {}
    for name, launcher, batch in (("two", torchrun, 16), ("one", [sys.executable], 32)):
        out = tmp_path / name
        result = subprocess.run(
            [*launcher, "-m", "mmbalance", "--quiet", "train", "--out", str(out), *options, "--set", f"train.batch_size={batch}"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["two"], runs["one"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        for key, value in b["method"].items():
            if key.startswith("mmpareto/weight_mm/"):
                assert a["method"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
