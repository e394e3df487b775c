"""MLA (a manual-optimisation objective): the projector update and the gradient projection by hand, the α_b
schedule, the entropy gate by hand (per sample and the released code's per batch), fixed fusion; through the
trainer: each sub-step moves only its encoder and the shared head, the head's step is the projected
gradient's, the prediction and readouts; refusals; determinism, the state round trip, an exact resume after
a real SIGKILL; what plugins see per sub-step (mla+arl, mla+ogm_ge) and runs with M = 2 and 3."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.mla  # noqa: F401
from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.methods.base import Plugin
from mmbalance.methods.mla import (
    HEAD_INPUT,
    MODALITY,
    entropy_gate,
    gated_logits,
    project_gradient,
    projection_alpha,
    update_projection,
)
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
#: plain SGD at lr 1 without clipping: a step moves a parameter by exactly minus its (projected) gradient
PLAIN_SGD = ["train.optimizer=sgd", "train.lr=1.0", "train.momentum=0", "train.weight_decay=0", "train.grad_clip=0"]


def mla(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("mla")
    return cls(cls.Config(**options), list(modalities), num_classes)


def trainer(spec="mla", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the spec's "Test it by" (b): the projection by hand ------------------------------------------------------
def test_projector_update_and_projection_of_the_spec_example():
    # P = I_2, r = (1, 0), α = 0.1: k = P rᵀ = (1, 0)ᵀ, r k = 1,
    # P ← I − diag(1, 0) / 1.1 = diag(0.090909, 1); ‖P‖_F = sqrt(0.090909² + 1) = 1.0041237
    # ⇒ diag(0.0905357, 0.9958932); the raw head gradient row (1, 1) becomes (0.0905357, 0.9958932)
    P = update_projection(torch.eye(2), torch.tensor([1.0, 0.0]), 0.1)
    assert torch.allclose(P, torch.tensor([[0.0905357, 0.0], [0.0, 0.9958932]]), atol=1e-6)
    row = project_gradient(torch.tensor([[1.0, 1.0]]), P)
    assert torch.allclose(row, torch.tensor([[0.0905357, 0.9958932]]), atol=1e-6)


def test_projector_update_on_a_hand_subspace_that_is_not_axis_aligned():
    # P = I_2, r = (1, 1), α = 0.1: k = (1, 1)ᵀ, r k = 2 (a scalar; the released code's k r is a 2×2 matrix),
    # P ← I − [[1, 1], [1, 1]] / 2.1 = [[0.5238095, −0.4761905], [−0.4761905, 0.5238095]];
    # ‖P‖_F = sqrt(2 · 0.5238095² + 2 · 0.4761905²) = 1.0011331 ⇒ [[0.5232166, −0.4756515], ...]
    P = update_projection(torch.eye(2), torch.tensor([1.0, 1.0]), 0.1)
    assert torch.allclose(P, torch.tensor([[0.5232166, -0.4756515], [-0.4756515, 0.5232166]]), atol=1e-6)
    # a gradient along r, (1, 1), keeps (0.0475651, 0.0475651): what fitting r's direction would change is damped
    # 11-fold; one orthogonal to it, (1, −1), keeps (0.9988681, −0.9988681)
    assert torch.allclose(project_gradient(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), P),
                          torch.tensor([[0.0475651, 0.0475651], [0.9988681, -0.9988681]]), atol=1e-6)
    # a second update, r = (0, 1), from the spec example's P = diag(0.0905357, 0.9958932): k = (0, 0.9958932)ᵀ,
    # r k = 0.9958932, P₂₂ ← 0.9958932 − 0.9958932² / 1.0958932 = 0.0908750; ‖(0.0905357, 0.0908750)‖ = 0.1282770
    # ⇒ diag(0.7057829, 0.7084282): the two directions seen so far now weigh about the same
    P = update_projection(torch.tensor([[0.0905357, 0.0], [0.0, 0.9958932]]), torch.tensor([0.0, 1.0]), 0.1)
    assert torch.allclose(P, torch.tensor([[0.7057829, 0.0], [0.0, 0.7084282]]), atol=2e-6)


def test_the_gradient_is_multiplied_by_p_transposed():
    # P = [[1, 2], [0, 1]] (not symmetric), row (1, 1): ∇W Pᵀ = (1·1 + 1·2, 1·0 + 1·1) = (3, 1); ∇W P would be (1, 3)
    P = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    assert torch.equal(project_gradient(torch.tensor([[1.0, 1.0]]), P), torch.tensor([[3.0, 1.0]]))


def test_alpha_schedule():
    # α_b = 0.1^(1 + b/N_b), N_b = 4 steps: b = 0 → 0.1, b = 2 → 0.1^1.5 = 0.0316228, b = 3 → 0.1^1.75 = 0.0177828
    assert projection_alpha(0, 4) == pytest.approx(0.1)
    assert projection_alpha(2, 4) == pytest.approx(0.0316228, abs=1e-7)
    assert projection_alpha(3, 4) == pytest.approx(0.0177828, abs=1e-7)


# -- the spec's "Test it by" (c): the entropy gate by hand ------------------------------------------------------
def test_equal_entropies_give_equal_gates():
    # o_a = (2, 0, 0), o_b = (0, 0, 2): permuted, so the same entropy ⇒ g = (0.5, 0.5), output (1, 0, 1)
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 2.0]]])
    gate = entropy_gate(logits)
    assert torch.allclose(gate, torch.tensor([[0.5], [0.5]]))
    assert torch.allclose(gated_logits(logits, gate), torch.tensor([[1.0, 0.0, 1.0]]))


def test_the_surer_modality_weighs_more_by_hand():
    # o_a = (0, 0): p = (0.5, 0.5), e_a = ln 2 = 0.6931472; o_b = (ln 3, 0): p = (0.75, 0.25),
    # e_b = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351. max e = e_a:
    # g_a = 1 / (1 + e^{0.1308121}) = 0.4673435, g_b = 0.5326565; output = g_b · (ln 3, 0) = (0.5851829, 0).
    # Sample 2 swaps the two: its gates swap (a per-sample gate).
    a = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    b = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    logits = torch.stack([a, b])
    gate = entropy_gate(logits)
    assert torch.allclose(gate, torch.tensor([[0.4673435, 0.5326565], [0.5326565, 0.4673435]]), atol=1e-6)
    assert torch.allclose(gated_logits(logits, gate), torch.tensor([[0.5851829, 0.0], [0.5851829, 0.0]]), atol=1e-6)


def test_the_released_codes_gate_is_one_weight_per_batch():
    # softmax along the batch: o_a = [[0, 0], [0, 0]] gives columns (0.5, 0.5), (0.5, 0.5): E_a = 2 ln 2 = 1.3862944;
    # o_b = [[ln 3, 0], [0, 0]] gives columns (0.75, 0.25) and (0.5, 0.5): E_b = 0.5623351 + 0.6931472 = 1.2554823.
    # g_a = 1 / (1 + e^{0.1308121}) = 0.4673435 for both samples (per sample, sample 2 would get 0.5, 0.5)
    logits = torch.stack([torch.zeros(2, 2), torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])])
    assert torch.allclose(entropy_gate(logits, "batch"), torch.tensor([[0.4673435] * 2, [0.5326565] * 2]), atol=1e-6)
    assert torch.allclose(entropy_gate(logits, "sample")[:, 1], torch.tensor([0.5, 0.5]))


def hand_head(part, weight, bias):
    part.setup(SimpleNamespace(feature_dims={m: weight.shape[1] for m in part.modalities}), None)
    with torch.no_grad():
        part.shared_head.weight.copy_(weight)
        part.shared_head.bias.copy_(bias)
    return part


def test_prediction_readouts_and_fixed_fusion_by_hand():
    # H = identity on 2 features, no bias: o_a = f_a = (0, 0), o_b = f_b = (ln 3, 0) ⇒ the gated sum (0.5851829, 0)
    part = hand_head(mla(num_classes=2), torch.eye(2), torch.zeros(2))
    features = {"a": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([[math.log(3), 0.0]])}
    assert torch.allclose(part.predict_from_features(None, features), torch.tensor([[0.5851829, 0.0]]), atol=1e-6)
    assert torch.equal(part.fuse(None, features), part.predict_from_features(None, features))
    heads = part.heads(None, features)  # the shared head on each modality: the run's unimodal accuracy
    assert torch.equal(heads["b"], features["b"]) and torch.equal(heads["a"], features["a"])
    # fusion=fixed, weights (1, 3) in dataset order, normalised to (0.25, 0.75): 0.75 · (ln 3, 0) = (0.8239592, 0)
    fixed = hand_head(mla(num_classes=2, fusion="fixed", fixed_weights=[1.0, 3.0]), torch.eye(2), torch.zeros(2))
    assert torch.allclose(fixed.fuse(None, features), torch.tensor([[0.8239592, 0.0]]), atol=1e-6)
    # unset fixed weights: 1/M each (the authors' 0.5/0.5): 0.5 · (ln 3, 0) = (0.5493061, 0)
    equal = hand_head(mla(num_classes=2, fusion="fixed"), torch.eye(2), torch.zeros(2))
    assert torch.allclose(equal.fuse(None, features), torch.tensor([[0.5493061, 0.0]]), atol=1e-6)


def test_a_zeroed_modality_reads_as_the_heads_bias_with_its_own_gate():
    # H = identity, bias (1, 0): f_b zeroed gives o_b = (1, 0), e_b = entropy(0.7310586, 0.2689414) = 0.5822031;
    # o_a = (1, 1) + (1, 0) = (2, 1), the same entropy ⇒ g = (0.5, 0.5), fuse = (1.5, 0.5)
    part = hand_head(mla(num_classes=2), torch.eye(2), torch.tensor([1.0, 0.0]))
    zeroed = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.zeros(1, 2)}
    assert torch.allclose(part.fuse(None, zeroed), torch.tensor([[1.5, 0.5]]), atol=1e-6)


# -- the spec's "Test it by" (a): one sub-step moves only its encoder and the shared head -----------------------
def test_each_sub_step_moves_only_its_encoder_and_the_shared_head():
    # SGD with momentum and weight decay: an encoder that a sub-step does not reach must not drift either
    # (its gradient is None, so the optimizer skips it), even once it has a momentum buffer
    t = trainer(extra=["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9", "train.weight_decay=0.01",
                       "train.epochs=3", *M3])
    part = t.method.objective
    modalities = t.bundle.modalities
    steps = []
    original = t.ctx.manual_step

    def watched(loss, record=None, optimizer=None):
        before = snapshot(t.model), snapshot(part.shared_head)
        original(loss, record, optimizer)
        steps.append((record.shared[MODALITY], before, (snapshot(t.model), snapshot(part.shared_head))))

    t.ctx.manual_step = watched
    batches = iter(t.train_loader)
    for _ in range(2):
        t.train_step(next(batches))
    assert [m for m, _, _ in steps] == modalities * 2  # dataset order, one sub-step each per batch
    for m, (model_before, head_before), (model_after, head_after) in steps:
        moved = {k.split(".")[1] for k in model_before if k.startswith("encoders.")
                 and not torch.equal(model_before[k], model_after[k])}
        assert moved == {m}
        assert all(torch.equal(model_before[k], model_after[k]) for k in model_before if not k.startswith("encoders."))
        assert not torch.equal(head_before["weight"], head_after["weight"])
        assert not torch.equal(head_before["bias"], head_after["bias"])
    assert all(p.grad is None for p in t.parameters)


def test_the_heads_step_is_its_projected_gradient_and_p_is_a_resumable_buffer():
    # plain SGD at lr 1: ΔW = −∇W Pᵀ with P = update(P_before, mean f_m, α_b); the bias takes its raw gradient.
    # The run's very first sub-step (n = 0) is not projected and leaves P = I.
    t = trainer(extra=PLAIN_SGD)
    part = t.method.objective
    t.ctx.step_in_epoch = 2  # α_b = 0.1^(1 + 2/N_b)
    alpha = 0.1 ** (1 + 2 / t.ctx.steps_per_epoch)
    checked = []
    original = t.ctx.manual_step

    def watched(loss, record=None, optimizer=None):
        head = part.shared_head
        raw_w, raw_b = torch.autograd.grad(loss, [head.weight, head.bias], retain_graph=True)
        P, n = part.projection.clone(), int(part.substeps)
        w, b = head.weight.detach().clone(), head.bias.detach().clone()
        original(loss, record, optimizer)
        expected_P = update_projection(P, record.shared[HEAD_INPUT].mean(0), alpha) if n > 0 else P
        expected_w = w - (project_gradient(raw_w, expected_P) if n > 0 else raw_w)
        assert torch.allclose(part.projection, expected_P, atol=1e-6)
        assert torch.allclose(head.weight, expected_w, atol=1e-6)
        assert torch.allclose(head.bias, b - raw_b, atol=1e-6)
        checked.append((record.shared[MODALITY], n))

    t.ctx.manual_step = watched
    batches = iter(t.train_loader)
    t.train_step(next(batches))
    assert torch.equal(part.projection, part.projection.T) and not torch.allclose(part.projection, torch.eye(8))
    t.train_step(next(batches))
    assert checked == [("strong", 0), ("weak", 1), ("strong", 2), ("weak", 3)]
    assert int(part.substeps) == 4
    assert {"projection", "substeps", "shared_head.weight", "shared_head.bias"} <= set(part.state_dict())


def test_projection_off_and_the_official_variant_leave_the_head_gradient_raw():
    for options in ("mla[projection=false]", "mla[variant=official]"):
        t = trainer(options, PLAIN_SGD)
        part = t.method.objective
        batches = iter(t.train_loader)
        t.train_step(next(batches))
        t.train_step(next(batches))
        assert torch.equal(part.projection, torch.eye(8))
    official = trainer("mla[variant=official]").method.objective
    assert (official.projects, official.gate_kind) == (False, "batch")
    mixed = trainer("mla[variant=official,projection=true]").method.objective
    assert (mixed.projects, mixed.gate_kind) == (True, "batch")


def test_the_step_record_and_its_logs():
    t = trainer()
    batch = next(iter(t.train_loader))
    record = t.train_step(batch)
    assert set(record.losses) == {"alternating"}
    expected = (record.logs["mla/loss/strong"] + record.logs["mla/loss/weak"]) / 2  # the logged loss: mean_m ℓ_m
    assert torch.allclose(record.loss, expected)
    assert not record.features["strong"].requires_grad and not record.logits.requires_grad
    gates = record.logs["mla/gate/strong"] + record.logs["mla/gate/weak"]
    assert torch.allclose(gates, torch.tensor(1.0))
    assert float(record.logs["mla/head_gradient_kept/strong"]) == pytest.approx(1.0)  # the first sub-step: not projected
    assert 0 < float(record.logs["mla/head_gradient_kept/weak"]) < 1
    assert record.logs["mla/alpha"] == pytest.approx(0.1)


def test_shuffle_order_draws_from_the_run_generator():
    t = trainer("mla[shuffle_order=true]", M3)
    orders = [t.method.objective.order(t.ctx) for _ in range(6)]
    assert all(sorted(o) == sorted(t.bundle.modalities) for o in orders) and len({tuple(o) for o in orders}) > 1
    again = trainer("mla[shuffle_order=true]", M3)
    assert [again.method.objective.order(again.ctx) for _ in range(6)] == orders


# -- refusals ------------------------------------------------------------------------------------------------
def test_unequal_feature_sizes_are_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        mla().setup(SimpleNamespace(feature_dims={"a": 8, "b": 16}), None)
    message = str(error.value)
    assert "\n" not in message and "a: 8, b: 16" in message and "same feature size" in message


@pytest.mark.parametrize("weights, fusion", [([1.0], "fixed"), ([1.0, -1.0], "fixed"), ([0.0, 0.0], "fixed"),
                                             ([0.5, 0.5], "entropy")])
def test_bad_fixed_weights_are_refused_in_one_line(weights, fusion):
    with pytest.raises(ConfigError) as error:
        mla(fusion=fusion, fixed_weights=weights)
    assert "\n" not in str(error.value) and "mla.fixed_weights" in str(error.value)


# -- §16: determinism, state round trip, exact resume after a kill ------------------------------------------------
def test_runs_are_deterministic(tmp_path):
    config = build_config(overrides=[*TINY, "train.epochs=3"], method="mla[shuffle_order=true]")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    assert (tmp_path / "one" / "metrics.jsonl").read_text().count('"mla/gate/strong"') == 3
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]  # noqa: E731
    assert strip((tmp_path / "one" / "metrics.jsonl").read_text()) == strip((tmp_path / "two" / "metrics.jsonl").read_text())
    assert first["test"] == second["test"]
    states = [torch.load(tmp_path / name / "last.pt", weights_only=True)["method"] for name in ("one", "two")]
    assert torch.equal(states[0]["parts.mla.projection"], states[1]["parts.mla.projection"])
    steps = Trainer(config, None, quiet=True).ctx.steps_per_epoch
    assert int(states[0]["parts.mla.substeps"]) == 3 * steps * 2  # n counts sub-steps: epochs × batches × M


def state_of(t):
    return copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in t.optimizers.items()},
        "generator": t.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


@pytest.mark.parametrize("spec", ["mla", "mla[shuffle_order=true]", "mla[variant=official]"])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(spec):
    t = trainer(spec, ["train.optimizer=sgd", "train.momentum=0.9"])
    batches = list(zip(range(3), t.train_loader))
    for step, batch in batches[:2]:
        t.ctx.step_in_epoch = step
        t.train_step(batch)
    saved = state_of(t)
    t.ctx.step_in_epoch = 2
    expected = t.train_step(batches[2][1])
    after = snapshot(t.method)

    fresh = trainer(spec, ["train.optimizer=sgd", "train.momentum=0.9"])
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    fresh.ctx.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["rng"])
    fresh.ctx.step_in_epoch = 2
    again = fresh.train_step(batches[2][1])
    assert again.loss.item() == expected.loss.item()
    assert all(torch.equal(v, snapshot(fresh.method)[k]) for k, v in after.items())


CLI_SETTINGS = [
    "--set", "synthetic.num_samples=600", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=40", "--set", "train.batch_size=32",
    "--set", "model.feature_dim=8", "--set", "model.hidden_dim=16", "--set", "train.optimizer=sgd",
    "--set", "train.lr=0.05",
]


def test_a_killed_run_resumes_to_the_same_metrics(tmp_path):
    """A real SIGKILL after the first epoch's checkpoint, then ``train --resume DIR``: P, n, the head and the
    optimizer's momentum all come back, so the metrics are the uninterrupted run's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mmbalance", "--import", "mmbalance.methods.mla", "--quiet", "train"]
    common = ["--method", "mla[shuffle_order=true]", *CLI_SETTINGS]
    subprocess.run([*cli, "--out", str(tmp_path / "full"), *common], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cli, "--out", str(tmp_path / "killed"), *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it could be killed"
    done = subprocess.run([*cli, "--resume", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["best_epoch"] == full["best_epoch"]
    per_epoch = [[json.loads(line)["method"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                 for name in ("full", "killed")]
    assert len(per_epoch[0]) == 40 and per_epoch[0] == per_epoch[1]  # every logged gate, loss and projection ratio
    states = [torch.load(tmp_path / name / "last.pt", weights_only=True)["method"] for name in ("full", "killed")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# -- plugins: what after_backward means per sub-step ---------------------------------------------------------------
def test_plugins_after_backward_runs_once_per_sub_step_on_that_sub_steps_gradients(register_part):
    seen = []

    @register_part("_sub_steps")
    class SubSteps(Plugin):
        """Records what each after_backward call sees."""

        def after_backward(self, record, ctx):
            with_grad = {m for m, ps in ctx.params.encoder.items() if any(p.grad is not None for p in ps)}
            head = ctx.params.method["mla"]
            seen.append((record.shared.get(MODALITY), with_grad, all(p.grad is not None for p in head),
                         any(p.grad is not None for p in ctx.params.fusion)))

    t = trainer("mla+_sub_steps", M3)
    t.train_step(next(iter(t.train_loader)))
    assert seen == [(m, {m}, True, False) for m in t.bundle.modalities]


@pytest.mark.parametrize("plugin", ["arl", "ogm_ge", "cal_accel"])
def test_plugins_acting_on_the_forward_pass_are_refused(plugin):
    # they would run once after MLA's sub-steps, on a record whose backward passes are done: refused, not inert
    with pytest.raises(ConfigError, match=f"cannot combine 'mla' and '{plugin}': 'mla' runs its own backward passes"):
        build_config(method=f"mla+{plugin}")
    build_config(method="mla+relearning")  # epoch-level plugins still combine


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", ["mla", "mla+relearning", "mla[fusion=fixed,shuffle_order=true]"])
def test_runs_two_epochs(spec, modalities, tmp_path):
    extra = M3 if modalities == 3 else []
    metrics = train_run(build_config(overrides=[*TINY, *extra], method=spec), tmp_path / "r", quiet=True)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    names = metrics["modalities"]
    assert len(names) == modalities
    assert set(metrics["val"]["unimodal_accuracy"]) == set(names)
    assert all(f"mla/loss/{m}" in lines[-1]["method"] and f"mla/gate/{m}" in lines[-1]["method"] for m in names)
    assert 0 <= metrics["test"]["accuracy"] <= 1
