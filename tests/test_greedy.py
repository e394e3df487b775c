"""Greedy (a 2-modal objective with MMTM blocks): the staged encoders compose to their forward bit for bit;
an MMTM block, the squeeze over frames, the BDR and the curation schedule by hand (the spec's "Test it by");
through the trainer: curation with c = 0 for exactly Q steps and one gate for every sample of the caring
modality, the μ sums from the step's gradients, ḡ as a cumulative mean (and the official variant's), MMTM
parameters trained; refusals (M = 3, unstaged encoders, placements, official widths); determinism, the
state round trip, greedy+arl, greedy+ogm_ge, 2-epoch runs with MLP and CNN encoders, a ResNet-18 frames step."""

import copy
import json
import math

import pytest
import torch

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.greedy  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.base import DataBundle
from mmbalance.errors import ConfigError
from mmbalance.methods.greedy import GATES, bypass_dominance, curation_transition, learning_speed
from mmbalance.models.encoders import MLPEncoder, ResNet18Encoder, SmallCNNEncoder
from mmbalance.models.mmtm import MMTM, excite, squeeze
from mmbalance.training import Trainer, train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def trainer(spec="greedy", extra=(), bundle=None):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True, bundle=bundle)


def greedy_of(t):
    return t.method.parts["greedy"]


def image_bundle(shapes=((1, 8, 8), (1, 8, 8)), n=96, classes=3, seed=0):
    """Image-like inputs whose class shows as a brightness offset, with a strong and a weak modality."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    tensors = {}
    for name, shape, snr in zip(("strong", "weak"), shapes, (2.0, 0.5)):
        offset = (labels.float() * snr).view(-1, *([1] * len(shape)))
        tensors[name] = torch.randn(n, *shape, generator=g) + offset
    return DataBundle.from_tensors(tensors, labels, num_classes=classes, seed=0)


# -- the staged encoders ---------------------------------------------------------------------------------
ENCODERS = [
    ("mlp", MLPEncoder, (8,)), ("mlp", MLPEncoder, (2, 4)),
    ("cnn", SmallCNNEncoder, (12,)), ("cnn", SmallCNNEncoder, (3, 12)), ("cnn", SmallCNNEncoder, (3, 10, 10)),
    ("cnn", SmallCNNEncoder, (2, 3, 10, 10)),
    ("resnet18", ResNet18Encoder, (3, 24, 24)), ("resnet18", ResNet18Encoder, (2, 1, 24, 24)),
]


@pytest.mark.parametrize("name,cls,shape", ENCODERS, ids=[f"{n}-{'x'.join(map(str, s))}" for n, _, s in ENCODERS])
@pytest.mark.parametrize("feature_dim", [8, 512])
def test_staged_pieces_compose_to_the_forward_pass_bit_for_bit(name, cls, shape, feature_dim):
    torch.manual_seed(0)
    encoder = cls(shape, feature_dim=feature_dim, hidden_dim=16, dropout=0.0)
    keys = list(encoder.state_dict())
    staged = encoder.staged()
    assert list(encoder.state_dict()) == keys  # nothing registered, nothing renamed
    owned = {id(p) for p in encoder.parameters()}
    pieces = [p for stage in staged.stages for p in stage.parameters()]
    assert pieces and all(id(p) in owned for p in pieces)
    assert len(staged.stages) == {"mlp": 1, "cnn": 3, "resnet18": 4}[name] == len(staged.widths)
    x = torch.randn(3, *shape)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(staged(x), encoder(x))
        h, frames = staged.prepare(x)
        for stage, width in zip(staged.stages, staged.widths):
            h = stage(h)
            assert h.shape[:2] == (3 * frames, width)
        assert frames == (shape[0] if len(shape) == 4 else 1)
    # train mode: batch statistics and running buffers move alike
    one, two = copy.deepcopy(encoder).train(), copy.deepcopy(encoder).train()
    assert torch.equal(one.staged()(x), two(x))
    for (k, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), k


def test_an_encoder_without_stages_is_refused_at_setup_in_one_line():
    n = 60
    bundle = DataBundle.from_tensors(
        {"a": torch.randn(n, 8), "b": torch.randn(n, 5, 4)}, torch.arange(n) % 3, num_classes=3, seed=0
    )
    with pytest.raises(ConfigError) as error:
        trainer(extra=["model.encoders={b: transformer}"], bundle=bundle)
    message = str(error.value)
    assert "\n" not in message and "'b'" in message and "'transformer'" in message and "mlp, cnn, resnet18" in message


# -- MMTM by hand ----------------------------------------------------------------------------------------
def hand_block():
    block = MMTM((1, 1), ratio=4)  # squeeze layer 2 → int(2 · 2 / 4) = 1
    with torch.no_grad():
        block.squeeze_layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
        block.squeeze_layer.bias.zero_()
        block.excitation[0].weight.copy_(torch.tensor([[2.0]]))
        block.excitation[0].bias.zero_()
        block.excitation[1].weight.copy_(torch.tensor([[-1.0]]))
        block.excitation[1].bias.fill_(1.0)
    return block


def test_mmtm_forward_by_hand():
    # a: a 1-D map (B=2, C=1, L=2); b: a vector (B=2, C=1)
    a = torch.tensor([[[1.0, 3.0]], [[0.0, -2.0]]])
    b = torch.tensor([[0.5], [1.0]])
    # sample 0: a_0 = mean(1, 3) = 2, a_1 = 0.5; e = ReLU(2 − 0.5) = 1.5;
    #           g_0 = σ(2 · 1.5) = σ(3) = 0.9525741, g_1 = σ(−1.5 + 1) = σ(−0.5) = 0.3775407
    # sample 1: a_0 = mean(0, −2) = −1, a_1 = 1; e = ReLU(−2) = 0; g_0 = σ(0) = 0.5, g_1 = σ(1) = 0.7310586
    block = hand_block()
    g0, g1 = block.gates([a, b])
    assert torch.allclose(g0, torch.tensor([[0.9525741], [0.5]]), atol=1e-6)
    assert torch.allclose(g1, torch.tensor([[0.3775407], [0.7310586]]), atol=1e-6)
    out_a, out_b = block([a, b])
    # out = map ⊙ gate, the gate broadcast over the positions: (1, 3) · 0.9525741, (0, −2) · 0.5
    assert torch.allclose(out_a, torch.tensor([[[0.9525741, 2.8577223]], [[0.0, -1.0]]]), atol=1e-6)
    assert torch.allclose(out_b, torch.tensor([[0.5 * 0.3775407], [0.7310586]]), atol=1e-6)


def test_squeeze_and_excite_treat_the_frames_of_a_sample_as_one():
    # 2 samples × 2 frames folded into 4 rows, C = 1, 2 positions
    h = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]], [[0.0, 0.0]], [[2.0, 2.0]]])
    # sample 0: mean(1, 3, 5, 7) = 4; sample 1: mean(0, 0, 2, 2) = 1 (not per frame: 2, 6, 0, 2)
    assert torch.equal(squeeze(h, frames=2), torch.tensor([[4.0], [1.0]]))
    # a vector stage output is its own squeeze
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(squeeze(v), v)
    # the gate of a sample scales both its frames
    out = excite(h, torch.tensor([[0.5], [2.0]]), frames=2)
    assert torch.equal(out, torch.tensor([[[0.5, 1.5]], [[2.5, 3.5]], [[0.0, 0.0]], [[4.0, 4.0]]]))


def test_gate_means_are_cumulative_means():
    block = MMTM((2, 1))
    block.update_gate_means([torch.tensor([0.2, 0.4]), torch.tensor([1.0])])
    block.update_gate_means([torch.tensor([0.6, 0.0]), torch.tensor([0.0])])
    block.update_gate_means([torch.tensor([0.4, 0.8]), torch.tensor([0.5])])
    # (0.2 + 0.6 + 0.4) / 3 = 0.4, (0.4 + 0 + 0.8) / 3 = 0.4; (1 + 0 + 0.5) / 3 = 0.5
    assert torch.allclose(block.gate_mean(0), torch.tensor([0.4, 0.4])) and torch.allclose(block.gate_mean(1), torch.tensor([0.5]))
    assert int(block.gate_count) == 3


# -- the spec's "Test it by": BDR and the curation schedule by hand --------------------------------------
def test_bdr_and_the_curation_schedule_of_the_spec_example():
    # μ^byp = (0.1, 0.01), μ^main = (0.01, 0.01) ⇒ BDR = (log10 10, log10 1) = (1, 0), d = 1 > ε = 0.01
    bdr = bypass_dominance(torch.tensor([0.1, 0.01], dtype=torch.float64), torch.tensor([0.01, 0.01], dtype=torch.float64))
    assert torch.allclose(bdr, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    d = bdr[0] - bdr[1]
    state = (torch.tensor(False), torch.tensor(0), torch.tensor(0))
    state = curation_transition(*state, d, 0.01, 5, True)
    assert (bool(state[0]), int(state[2])) == (True, 0)  # curation, caring modality c = 0
    curated = 0
    while bool(state[0]):
        curated += 1  # this step runs in curation
        state = curation_transition(*state, d, 0.01, 5, True)
    assert curated == 5  # exactly Q steps; then the next measured step may start another
    # d < −ε cares for modality 1; |d| ≤ ε or before the start epoch: no curation, caring back to 0
    assert [int(v) for v in curation_transition(torch.tensor(False), torch.tensor(3), torch.tensor(1), -d, 0.01, 5, True)] == [1, 0, 1]
    assert [int(v) for v in curation_transition(torch.tensor(False), torch.tensor(0), torch.tensor(1), d * 0.005, 0.01, 5, True)] == [0, 0, 0]
    assert [int(v) for v in curation_transition(torch.tensor(False), torch.tensor(0), torch.tensor(1), d, 0.01, 5, False)] == [0, 0, 0]


def test_learning_speed_by_hand():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    q = torch.nn.Parameter(torch.tensor([0.0]))
    r = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient: counts as zero
    p.grad, q.grad = torch.tensor([1.0, 2.0]), torch.tensor([2.0])
    # (1 + 4 + 4) / (9 + 16 + 0 + 1) = 9 / 26
    assert math.isclose(float(learning_speed([p, q, r])), 9 / 26, rel_tol=1e-6)


# -- through the trainer -----------------------------------------------------------------------------------
def test_mmtm_blocks_are_trained_and_their_placement():
    t = trainer()
    part = greedy_of(t)
    assert part.positions == [0] and len(part.blocks) == 1 and part.blocks[0].dims == (16, 16)  # MLP: the hidden layer
    block_params = {id(p) for p in part.blocks.parameters()}
    in_optimizer = {id(p) for group in t.ctx.optimizer.param_groups for p in group["params"]}
    assert block_params <= in_optimizer and block_params == {id(p) for p in t.ctx.params.method["greedy"]}
    before = copy.deepcopy(part.blocks.state_dict())
    t.train_step(next(iter(t.train_loader)))
    after = part.blocks.state_dict()
    for key in ("0.squeeze_layer.weight", "0.excitation.0.weight", "0.excitation.1.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_mu_sums_are_the_steps_learning_speeds_per_modality():
    t = trainer()
    part = greedy_of(t)
    batch = next(iter(t.train_loader))
    t._zero_grad()
    record = t.method.training_step(t.model, batch, t.ctx)
    record.loss.backward()
    t._finish_gradients(record)
    block = part.blocks[0]

    def speed(params):
        params = list(params)
        return sum(float(p.grad.double().square().sum()) for p in params) / sum(float(p.detach().double().square().sum()) for p in params)

    shared = list(block.squeeze_layer.parameters())
    for i, m in enumerate(t.bundle.modalities):
        assert math.isclose(float(part.mu_main[i]), speed(t.model.encoders[m].parameters()), rel_tol=1e-5)
        assert math.isclose(float(part.mu_bypass[i]), speed([*block.excitation[i].parameters(), *shared]), rel_tol=1e-5)
    bdr = torch.log10(part.mu_bypass / part.mu_main)
    assert math.isclose(float(record.logs["greedy/d_bdr"]), float(bdr[0] - bdr[1]), rel_tol=1e-9)


def test_curation_lasts_q_steps_with_one_gate_for_every_sample_of_the_caring_modality():
    t = trainer(extra=["greedy.start_epoch=0", "greedy.curation_steps=3"])
    part = greedy_of(t)
    a, b = t.bundle.modalities
    # the spec example, scaled so that one step's speeds (< 10) cannot move d = 1 by more than 1e-8
    scale = 1e10
    part.mu_bypass.copy_(torch.tensor([0.1, 0.01], dtype=torch.float64) * scale)
    part.mu_main.copy_(torch.tensor([0.01, 0.01], dtype=torch.float64) * scale)
    batches = iter(t.train_loader)
    record = t.train_step(next(batches))
    assert float(record.logs[f"greedy/curation/{a}"]) == 0.0
    assert math.isclose(float(record.logs["greedy/d_bdr"]), 1.0, abs_tol=1e-6)
    assert bool(part.curation) and int(part.caring) == 0
    mu = (part.mu_bypass.clone(), part.mu_main.clone())
    for step in range(3):
        t._zero_grad()
        record = t.method.training_step(t.model, next(batches), t.ctx)
        assert float(record.logs[f"greedy/curation/{a}"]) == 1.0 and float(record.logs[f"greedy/curation/{b}"]) == 0.0
        for g0, g1 in record.shared[GATES]:
            assert torch.equal(g0, g0[:1].expand_as(g0))  # the caring modality's gate: the same for every sample
            assert torch.equal(g0[0], part.blocks[0].gate_mean(0))  # ḡ_0, this batch included
            assert not torch.equal(g1, g1[:1].expand_as(g1))  # the other modality's stays sample-specific
        record.loss.backward()
        # no gradient reaches W_0: modality 0 reads nothing sample-specific of modality 1
        assert not part.blocks[0].excitation[0].weight.grad.any()
        assert part.blocks[0].excitation[1].weight.grad.abs().sum() > 0
        t._finish_gradients(record)
        for opt in t.optimizers.values():
            opt.step()
        t.method.after_step(record, t.ctx)
        assert torch.equal(part.mu_bypass, mu[0]) and torch.equal(part.mu_main, mu[1])  # curation steps are not measured
        assert bool(part.curation) == (step < 2)
    record = t.train_step(next(batches))  # measured again, and d ≈ 1 still: the next curation starts
    assert float(record.logs[f"greedy/curation/{a}"]) == 0.0 and not torch.equal(part.mu_main, mu[1])
    assert bool(part.curation)


def test_no_curation_before_the_start_epoch_and_the_variants_start():
    t = trainer(extra=["greedy.epsilon=0.0"])  # any imbalance would start one
    part = greedy_of(t)
    assert part.start_epoch == 2 and greedy_of(trainer(extra=["greedy.variant=official"])).start_epoch == 1
    assert greedy_of(trainer(extra=["greedy.variant=official", "greedy.start_epoch=4"])).start_epoch == 4
    t.ctx.epoch = 1
    for batch in t.train_loader:
        t.train_step(batch)
        assert not bool(part.curation)
    t.ctx.epoch = 2
    t.train_step(next(iter(t.train_loader)))
    assert bool(part.curation)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_the_running_gate_mean_averages_the_training_batches(variant):
    t = trainer(extra=[f"greedy.variant={variant}"])
    part = greedy_of(t)
    means = []
    for _, batch in zip(range(3), t.train_loader):
        record = t.train_step(batch)
        means.append([g.mean(0) for g in record.shared[GATES][0]])
    block = part.blocks[0]
    expected_0 = sum(m[0] for m in means) / 3
    expected_1 = sum(m[0 if variant == "official" else 1] for m in means) / 3  # official: fed modality 0's gate
    assert torch.allclose(block.gate_mean(0), expected_0, atol=1e-6)
    assert torch.allclose(block.gate_mean(1), expected_1, atol=1e-6)
    assert int(block.gate_count) == 3
    # evaluation reads the plain gates (even in curation) and leaves ḡ alone
    part.curation.fill_(True)
    state = copy.deepcopy(part.state_dict())
    batch = next(iter(t.train_loader))
    with torch.no_grad():
        features, gates = part.lockstep(t.model, batch.inputs)
    assert not torch.equal(gates[0][0], gates[0][0][:1].expand_as(gates[0][0]))
    t.evaluate("val")
    assert all(torch.equal(v, part.state_dict()[k]) for k, v in state.items())


def test_refusals_in_one_line():
    with pytest.raises(ConfigError) as error:
        trainer(extra=M3)
    assert str(error.value).startswith("greedy needs 2 modalities") and "\n" not in str(error.value)
    mixed = image_bundle(shapes=((8,), (1, 8, 8)))  # an MLP (1 stage, 16 wide) and a CNN (3 stages, 32 wide first)
    t = trainer(bundle=mixed)
    assert greedy_of(t).positions == [0] and greedy_of(t).blocks[0].dims == (16, 32)
    record = t.train_step(next(iter(t.train_loader)))  # the CNN's stages 1 and 2 run after the only block
    assert [tuple(g.shape[1:]) for g in record.shared[GATES][0]] == [(16,), (32,)] and math.isfinite(record.loss.item())
    with pytest.raises(ConfigError) as error:
        trainer(extra=["greedy.placement=[1]"], bundle=mixed)
    assert "greedy.placement=[1]" in str(error.value) and "0..0" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        trainer(extra=["greedy.variant=official"], bundle=mixed)
    assert "16 and 32" in str(error.value) and "\n" not in str(error.value)


# -- §16: determinism, the state round trip --------------------------------------------------------------
def test_runs_are_deterministic(tmp_path):
    config = build_config(overrides=[*TINY, "train.epochs=3", "greedy.start_epoch=1"], method="greedy")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    lines = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    for line in lines:
        for record in line:
            record.pop("seconds")
    assert lines[0] == lines[1] and first["test"] == second["test"]
    assert sum(r["method"]["greedy/curation/strong"] + r["method"]["greedy/curation/weak"] for r in lines[0]) > 0
    states = [torch.load(tmp_path / n / "last.pt", weights_only=True)["method"] for n in ("one", "two")]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def state_of(t):
    return copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in t.optimizers.items()},
        "generator": t.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    extra = ["greedy.start_epoch=0", "greedy.epsilon=0.0", "train.optimizer=sgd", "train.momentum=0.9"]
    t = trainer(extra=extra)
    batches = [b for _, b in zip(range(3), t.train_loader)]
    for batch in batches[:2]:
        t.train_step(batch)
    assert bool(greedy_of(t).curation)  # the round trip happens inside a curation
    saved = state_of(t)
    expected = t.train_step(batches[2]).loss.item()
    after = copy.deepcopy(t.method.state_dict())

    fresh = trainer(extra=extra)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    fresh.ctx.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["rng"])
    assert fresh.train_step(batches[2]).loss.item() == expected
    assert all(torch.equal(v, fresh.method.state_dict()[k]) for k, v in after.items())


# -- compositions and runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["greedy", "greedy+arl[modulation_starts=0]", "greedy+ogm_ge"])
def test_runs_two_epochs(spec, tmp_path):
    config = build_config(overrides=[*TINY, "greedy.start_epoch=0"], method=spec)
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= metrics["test"]["accuracy"] <= 1 and "greedy/d_bdr" in lines[-1]["method"]
    if "arl" in spec:
        assert lines[-1]["method"]["arl/accelerating"] == 1.0 and "loss/arl_unimodal" in lines[-1]["method"]


def test_runs_two_epochs_with_cnn_encoders_on_images(tmp_path):
    config = build_config(overrides=[*TINY, "model.encoder=cnn", "greedy.start_epoch=0", "train.batch_size=16"], method="greedy")
    bundle = image_bundle()
    t = Trainer(config, None, quiet=True, bundle=bundle)
    part = greedy_of(t)
    assert part.positions == [0, 1, 2] and [b.dims for b in part.blocks] == [(32, 32), (64, 64), (16, 16)]
    metrics = train_run(config, tmp_path / "r", quiet=True, bundle=image_bundle())
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for v in line["method"].values())
    assert 0 <= metrics["test"]["accuracy"] <= 1


def test_a_resnet18_step_on_frame_stacks():
    bundle = image_bundle(shapes=((2, 3, 16, 16), (2, 1, 16, 16)), n=24)
    t = trainer(extra=["model.encoder=resnet18", "model.feature_dim=8", "train.batch_size=4"], bundle=bundle)
    part = greedy_of(t)
    assert part.positions == [0, 1, 2, 3] and [b.dims for b in part.blocks] == [(64, 64), (128, 128), (256, 256), (512, 512)]
    record = t.train_step(next(iter(t.train_loader)))
    assert all(g.shape == (4, w) for gates, block in zip(record.shared[GATES], part.blocks) for g, w in zip(gates, block.dims))
    assert all(p.grad is not None for p in part.blocks.parameters())
