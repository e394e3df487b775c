"""InfoReg (a plugin): the spec's hand values (scores, gaps, α, the prime window, the proximal gradient,
three modalities, the code variant), the Fisher-trace bookkeeping, the §16 checks, MIDAS + InfoReg
and runs with two and three modalities."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import mmbalance.methods.inforeg  # noqa: F401  (registration)
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.inforeg import (
    COEFFICIENTS,
    add_proximal_gradient_,
    code_gradient_trace,
    code_window,
    log_probability_scores,
    prime_window,
    probability_sums,
    regulation_coefficients,
    score_gaps,
    squared_gradient_norm,
)
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN2 = math.log(2)
# The spec's hand batch: y = [0, 1], d_a = [[2, 0], [0, 1]], d_v = 0.
# s_a = mean(log p) = −(ln(1 + e^−2) + ln(1 + e^−1)) / 2 = −(0.126928 + 0.313262) / 2 = −0.220095
S_A = -(math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
S_V = -LN2  # −0.693147
# Δ_a = s_a − s_v = 0.473052, Δ_v = 0; α_a = exp(0.9 tanh 0.473052) = exp(0.9 · 0.440662) = 1.486755
GAP_A = 0.473052
ALPHA_A = 1.486755
# code variant: S_a = σ(2) + σ(1) = 0.880797 + 0.731059 = 1.611856, S_v = 2 · 0.5 = 1;
# α_a = 0.95 exp(tanh 0.611856) = 0.95 · 1.725354 = 1.639086
ALPHA_CODE = 1.639086

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
TINY3 = [o for o in TINY if not o.startswith("synthetic.dims")] + ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def part(name, modalities=("a", "v"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


class Shift(Encoder):
    """Features = input + w: a parameter of the encoder the regulation can pull, the logits set by the input."""

    def __init__(self):
        super().__init__((2,), 2)
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x + self.w


def hand_model(modalities=("a", "v")):
    """Sum fusion with identity weights and zero bias: fuse(f^{m}) = f_m and fuse(f^∅) = 0, so d_m = f_m."""
    model = MultimodalModel({m: Shift() for m in modalities}, SumFusion({m: 2 for m in modalities}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def context(model, epoch=2):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=list(model.modalities),
        num_classes=2, generator=torch.Generator().manual_seed(0), dist=DistributedState(),
        params=ParameterGroups.of(model),
    )


def set_(param, values):
    with torch.no_grad():
        param.copy_(torch.tensor(values))


def hand_setup(history_a=(1.0, 1.25), history_v=(1.0, 2.0), **options):
    """joint+inforeg on the hand model at epoch 2, w_a = [1, −2] with w0_a = [0.5, −2], w_v = 0.3 with w0_v = 0.

    T_a[0] = 1.0, T_a[1] = 1.25: ratio (1.25 − 1) / 1.25 = 0.2 > K = 0.04, open. T_v = [1, 2]: ratio 0.5, open
    (the visual modality is open too, so only Δ_v = 0 keeps it unregulated).
    """
    model = hand_model()
    inforeg = part("inforeg", **options)
    method = Method([part("joint"), inforeg])
    ctx = context(model)
    method.setup(model, ctx)
    with torch.no_grad():
        inforeg.trace_history[0, -2:] = torch.tensor(history_a)
        inforeg.trace_history[1, -2:] = torch.tensor(history_v)
        inforeg.epochs_traced.fill_(2)
    set_(model.encoders["a"].w, [0.5, -2.0])
    set_(model.encoders["v"].w, [0.0, 0.0])
    method.on_epoch_start(model, ctx)  # snapshots w0
    set_(model.encoders["a"].w, [1.0, -2.0])
    set_(model.encoders["v"].w, [0.3, 0.3])
    # inputs = d − w, so that the features (and d_m) are the spec's logits
    inputs = {"a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]) - torch.tensor([1.0, -2.0]), "v": torch.full((2, 2), -0.3)}
    batch = Batch(inputs, torch.tensor([0, 1]), torch.arange(2))
    return model, method, inforeg, ctx, batch


def hand_step(**options):
    """One step on the hand batch; the encoder gradients are set to [0.1, 0.1] before after_backward."""
    model, method, inforeg, ctx, batch = hand_setup(**options)
    record = method.training_step(model, batch, ctx)
    record.loss.backward()
    for m in ("a", "v"):
        set_(model.encoders[m].w.grad, [0.1, 0.1])
    method.after_backward(record, ctx)
    return record, {m: model.encoders[m].w.grad.clone() for m in ("a", "v")}, inforeg


# -- the spec's "Test it by" lines -------------------------------------------------------------------
def test_scores_gaps_and_alpha_of_the_hand_batch():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    scores = log_probability_scores(logits, torch.tensor([0, 1]))
    assert scores.tolist() == pytest.approx([S_A, S_V], abs=1e-6)
    assert scores.tolist() == pytest.approx([-0.220095, -0.693147], abs=1e-6)
    gaps = score_gaps(scores)
    assert gaps.tolist() == pytest.approx([GAP_A, 0.0], abs=1e-6)
    alpha = regulation_coefficients(gaps, 0.9)
    assert alpha.tolist() == pytest.approx([ALPHA_A, 0.0], abs=1e-6)  # the worse modality gets none


def test_the_plugin_logs_the_hand_scores_gaps_and_alpha():
    record, _, _ = hand_step()
    logs = {k: float(v) for k, v in record.logs.items()}
    assert logs["inforeg/score/a"] == pytest.approx(-0.220095, abs=1e-6)
    assert logs["inforeg/score/v"] == pytest.approx(-0.693147, abs=1e-6)
    assert logs["inforeg/gap/a"] == pytest.approx(GAP_A, abs=1e-6) and logs["inforeg/gap/v"] == 0.0
    assert logs["inforeg/alpha/a"] == pytest.approx(ALPHA_A, abs=1e-6) and logs["inforeg/alpha/v"] == 0.0
    assert logs["inforeg/regulating"] == 1.0
    assert set(record.losses) == {"fused", "probe"}  # unimodal_weight 0 (the paper's InfoReg): no extra term


def test_the_window_opens_when_the_trace_rises_faster_than_k():
    history = torch.zeros(2, 11)
    history[0, -2:] = torch.tensor([1.0, 1.25])  # (1.25 − 1) / 1.25 = 0.2 > 0.04: open
    history[1, -2:] = torch.tensor([1.0, 1.04])  # 0.04 / 1.04 = 0.038462 ≤ 0.04: closed
    ratio, open_ = prime_window(history, 2, 0.04)
    assert ratio.tolist() == pytest.approx([0.2, 0.04 / 1.04], abs=1e-6)
    assert open_.tolist() == [True, False]
    assert prime_window(history, 1, 0.04)[1].tolist() == [False, False]  # t < 2: never open
    assert prime_window(torch.zeros(2, 11), 5, 0.0)[1].tolist() == [False, False]  # T[t−1] = 0: closed
    # through the plugin: on_epoch_start reads the history and stores flags and ratios as buffers
    _, _, inforeg, _, _ = hand_setup()
    assert inforeg.window_open.tolist() == [True, True]
    assert inforeg.window_ratio.tolist() == pytest.approx([0.2, 0.5], abs=1e-6)


def test_regulation_adds_alpha_times_the_pull_to_the_leading_encoder_only():
    record, grads, _ = hand_step()
    # a: 0.1 + 1.486755 · (1 − 0.5) = 0.843378, 0.1 + α · (−2 − (−2)) = 0.1
    assert grads["a"].tolist() == pytest.approx([0.843378, 0.1], abs=1e-6)
    # v: w − w0 = 0.3 ≠ 0, open window, but Δ_v = 0: unchanged
    assert grads["v"].tolist() == [pytest.approx(0.1), pytest.approx(0.1)]
    assert torch.equal(grads["v"], torch.tensor([0.1, 0.1]))
    assert record.shared[COEFFICIENTS].tolist() == pytest.approx([ALPHA_A, 0.0], abs=1e-6)


def test_a_closed_window_or_a_step_outside_the_modulation_window_leaves_the_gradient():
    # T_a = [1, 1.04]: ratio 0.038462 ≤ K, closed: the leading modality is not regulated
    record, grads, _ = hand_step(history_a=(1.0, 1.04))
    assert float(record.logs["inforeg/alpha/a"]) == 0.0
    assert torch.equal(grads["a"], torch.tensor([0.1, 0.1]))
    # open window, but epoch 2 is before modulation_starts = 3
    record, grads, _ = hand_step(modulation_starts=3)
    assert record.logs["inforeg/regulating"] == 0.0 and COEFFICIENTS not in record.shared
    assert torch.equal(grads["a"], torch.tensor([0.1, 0.1]))


def test_three_modalities_each_leading_modality_gets_its_own_alpha():
    gaps = score_gaps(torch.tensor([-0.2, -0.7, -0.5]))
    # Δ_a = mean(0.5, 0.3) = 0.4, Δ_v = 0 (lowest), Δ_t = 0.2 (only v is lower)
    assert gaps.tolist() == pytest.approx([0.4, 0.0, 0.2], abs=1e-6)
    # α = exp(0.9 tanh 0.4) = exp(0.9 · 0.379949) = 1.407696, none, exp(0.9 tanh 0.2) = exp(0.9 · 0.197375) = 1.194393
    assert regulation_coefficients(gaps, 0.9).tolist() == pytest.approx([1.407696, 0.0, 1.194393], abs=1e-6)
    # ties: no modality is below another, so nobody is regulated
    assert score_gaps(torch.tensor([-0.3, -0.3, -0.3])).tolist() == [0.0, 0.0, 0.0]


def test_code_variant_scores_alpha_and_window():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    sums = probability_sums(logits, torch.tensor([0, 1]))
    assert sums.tolist() == pytest.approx([1.611856, 1.0], abs=1e-6)
    alpha = regulation_coefficients(score_gaps(sums), 1.0, torch.tensor([0.95, 0.1]))
    assert alpha.tolist() == pytest.approx([ALPHA_CODE, 0.0], abs=1e-6)
    # the second modality ahead by the same gap: α_v = 0.1 · exp(tanh 0.611856) = 0.172535
    alpha = regulation_coefficients(score_gaps(sums.flip(0)), 1.0, torch.tensor([0.95, 0.1]))
    assert alpha.tolist() == pytest.approx([0.0, 0.1 * ALPHA_CODE / 0.95], abs=1e-6)
    # audio traces [2, 3] at t = 2: k = (T[1] − T[−9]) / (T[−8] + … + T[1]) = (3 − 0) / 5 = 0.6 > 0.05
    history = torch.zeros(2, 11)
    history[0, -2:] = torch.tensor([2.0, 3.0])
    k, open_ = code_window(history, 2, 0.05)
    assert k[0].item() == pytest.approx(0.6) and open_[0].item()
    assert code_window(history, 0, 0.05)[0].tolist() == [1.0, 1.0]  # k_0 = 1: open in epoch 0
    one = torch.zeros(2, 11)
    one[:, -1] = 4.0
    assert code_window(one, 1, 0.05)[0].tolist() == [1.0, 1.0]  # t = 1: (T[0] − 0) / T[0] = 1: open in epoch 1
    # 11 epochs of a flat trace: (T[t−1] − T[t−11]) / Σ = 0: closed
    assert code_window(torch.ones(2, 11), 11, 0.05)[1].tolist() == [False, False]


def test_code_variant_in_the_plugin_regulates_with_one_flag_from_the_first_modality():
    # audio traces [2, 3] (k = 0.6, open); visual [0, 0] would be closed on its own: the code uses audio's flag
    record, grads, inforeg = hand_step(variant="code", history_a=(2.0, 3.0), history_v=(0.0, 0.0))
    assert inforeg.window_open.tolist() == [True, True]
    assert inforeg.window_ratio[0].item() == pytest.approx(0.6)
    logs = {k: float(v) for k, v in record.logs.items()}
    assert logs["inforeg/score/a"] == pytest.approx(1.611856, abs=1e-6) and logs["inforeg/score/v"] == pytest.approx(1.0)
    assert logs["inforeg/alpha/a"] == pytest.approx(ALPHA_CODE, abs=1e-6)
    # 0.1 + 1.639086 · 0.5 = 0.919543
    assert grads["a"].tolist() == pytest.approx([0.919543, 0.1], abs=1e-6)
    assert torch.equal(grads["v"], torch.tensor([0.1, 0.1]))
    # the code's loss has the unimodal terms: Σ_m CE(d_m, y) = −(s_a + s_v) = 0.220095 + 0.693147 = 0.913242
    assert record.losses["inforeg_unimodal"].item() == pytest.approx(0.913242, abs=1e-6)


# -- the Fisher trace ---------------------------------------------------------------------------------
def test_paper_trace_is_the_mean_squared_gradient_norm_before_regulation():
    assert squared_gradient_norm([torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0]])]).item() == pytest.approx(30.0)
    _, _, inforeg = hand_step()
    # one step, gradients [0.1, 0.1] before the regulation: 0.01 + 0.01 = 0.02 for both (not 0.843378² + 0.01)
    assert inforeg.trace_sum.tolist() == pytest.approx([0.02, 0.02], abs=1e-7)
    assert inforeg.trace_steps.item() == 1
    with torch.no_grad():
        inforeg.trace_sum.add_(torch.tensor([0.04, 0.0]))
        inforeg.trace_steps.add_(1)
    logs = inforeg.on_epoch_end(None, None)
    # T[2] = A / n = (0.06 / 2, 0.02 / 2); the history moves left by one epoch
    assert logs["inforeg/trace/a"] == pytest.approx(0.03) and logs["inforeg/trace/v"] == pytest.approx(0.01)
    assert logs["inforeg/open/a"] == 1.0 and logs["inforeg/window_ratio/a"] == pytest.approx(0.2)
    assert inforeg.trace_history[0, -3:].tolist() == pytest.approx([1.0, 1.25, 0.03])
    assert inforeg.epochs_traced.item() == 3


def test_code_trace_sums_per_tensor_means_of_the_final_gradient():
    # a [2, 2] weight with g² mean (1 + 4 + 9 + 16) / 4 = 7.5, a 1-D bias is left out (not a Conv/Linear weight)
    assert code_gradient_trace([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0])]).item() == pytest.approx(7.5)
    weight = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    weight.grad = torch.tensor([[0.5, 0.5]])
    add_proximal_gradient_([weight], [torch.tensor([[0.0, 2.0]])], 2.0)
    assert weight.grad.tolist() == [[2.5, 0.5]]  # 0.5 + 2 · 1, 0.5 + 2 · 0
    assert code_gradient_trace([weight.grad]).item() == pytest.approx((6.25 + 0.25) / 2)  # after the regulation
    # in the plugin the code's trace is summed over steps, not averaged
    _, _, inforeg = hand_step(variant="code", history_a=(2.0, 3.0))
    assert inforeg.trace_sum.tolist() == [0.0, 0.0]  # the hand encoders have only 1-D parameters
    with torch.no_grad():
        inforeg.trace_sum.copy_(torch.tensor([0.5, 0.25]))
        inforeg.trace_steps.fill_(4)
    assert inforeg.on_epoch_end(None, None)["inforeg/trace/a"] == 0.5


def test_unimodal_loss_is_the_sum_of_the_restricted_cross_entropies():
    record, _, _ = hand_step(unimodal_weight=2.0)
    # 2 · (0.220095 + 0.693147) = 1.826485
    assert record.losses["inforeg_unimodal"].item() == pytest.approx(2 * 0.913242, abs=1e-6)


def test_heads_as_score_logits_read_the_objectives_unimodal_heads():
    model, method, inforeg, ctx, batch = hand_setup(score_logits="heads")
    with torch.no_grad():
        for head in model.unimodal_heads.values():
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
        model.unimodal_heads["v"].bias.copy_(torch.tensor([1.0, 0.0]))
    record = method.training_step(model, batch, ctx)
    # head a = identity on f_a = d_a: the hand score −0.220095
    assert float(record.logs["inforeg/score/a"]) == pytest.approx(-0.220095, abs=1e-6)
    # head v = [1, 0] on f_v = 0 (d_v would give −ln 2): (ln σ(1) + ln(1 − σ(1))) / 2 = (−0.313262 − 1.313262) / 2
    assert float(record.logs["inforeg/score/v"]) == pytest.approx(-0.813262, abs=1e-6)
    with pytest.raises(ConfigError, match="inforeg.score_logits=heads"):
        inforeg.on_forward(Method([part("joint")]).objective.record(model, batch, model.encode(batch.inputs)), ctx)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="inforeg.variant=code"):
        part("inforeg", modalities=("a", "b", "c"), variant="code")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("inforeg", modulation_starts=3, modulation_ends=2)
    with pytest.raises(ConfigError, match="inforeg.variant"):
        build_config(overrides=["inforeg.variant=authors"], method="inforeg")
    with pytest.raises(ConfigError, match="inforeg.code_factors"):
        build_config(overrides=["inforeg.code_factors=[0.95]"], method="inforeg")
    paper, code = part("inforeg"), part("inforeg", variant="code")
    assert (paper.beta, paper.threshold, paper.unimodal_weight) == (0.9, 0.04, 0.0)
    assert (code.beta, code.threshold, code.unimodal_weight) == (1.0, 0.05, 1.0)
    assert part("inforeg", variant="code", threshold=0.1, beta=0.5, unimodal_weight=0.0).unimodal_weight == 0.0
    assert build_config(method="inforeg").method == "joint+inforeg"


# -- §16 checks ----------------------------------------------------------------------------------------
def read_run(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    config = build_config(overrides=TINY + ["train.epochs=3"], method="joint+inforeg[variant=code]")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    one, two = read_run(tmp_path / "one"), read_run(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["method"] == b["method"] and a["train_loss"] == b["train_loss"]
    assert first["test"] == second["test"]
    assert any(line["method"]["inforeg/alpha/strong"] + line["method"]["inforeg/alpha/weak"] > 0 for line in one)
    assert one[0]["method"]["inforeg/open/strong"] == 1.0  # the code's window is open in epoch 0


def trainer(spec, extra=(), base=TINY):
    return Trainer(build_config(overrides=[*base, *extra], method=spec), None, quiet=True)


def step_gradients(t, batch):
    t._zero_grad()
    record = t.method.training_step(t.model, batch, t.ctx)
    record.loss.backward()
    t._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def pull_anchors(t, inforeg, scale=0.01):
    """w0 = w − δ with a fixed δ, as after some steps into the epoch (at its first step w = w0)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m, anchor in zip(inforeg.modalities, inforeg.anchors):
            for a, p in zip(anchor.tensors(), t.ctx.params.encoder[m]):
                a.copy_(p - scale * torch.randn(p.shape, generator=generator))


def test_outside_the_window_gradients_equal_joints_and_inside_they_do_not():
    plain = trainer("joint")
    batch = next(iter(plain.train_loader))
    # the code variant's window is open from epoch 0, so only modulation_starts keeps the regulation off
    for starts, equal in ((3, True), (0, False)):
        modulated = trainer(f"joint+inforeg[variant=code,unimodal_weight=0,modulation_starts={starts}]")
        modulated.model.load_state_dict(plain.model.state_dict())
        grads = []
        for t in (plain, modulated):
            t.ctx.epoch = 1
            t.method.on_epoch_start(t.model, t.ctx)
        inforeg = modulated.method.parts["inforeg"]
        pull_anchors(modulated, inforeg)
        assert inforeg.window_open.all()
        for t in (plain, modulated):
            grads.append(step_gradients(t, batch)[1])
        assert grads[0].keys() == grads[1].keys()
        encoders = [n for n in grads[0] if n.startswith("encoders.")]
        others = [n for n in grads[0] if not n.startswith("encoders.")]
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in others)
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in encoders) == equal


def state_of(t):
    return copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in t.optimizers.items()},
        "generator": t.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })


def load_state(t, state):
    t.model.load_state_dict(state["model"])
    t.method.load_state_dict(state["method"])
    for k, o in t.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    t.ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])


@pytest.mark.parametrize("spec", ["joint+inforeg[variant=code]", "joint+inforeg[unimodal_weight=1]"])
def test_state_round_trip_mid_epoch_reproduces_the_next_steps(spec):
    t = trainer(spec)
    batches = [b for _, b in zip(range(4), t.train_loader)]
    t.ctx.epoch = 2
    t.method.on_epoch_start(t.model, t.ctx)
    inforeg = t.method.parts["inforeg"]
    if not inforeg.code:  # the paper's window needs two traced epochs: give it a rising trace
        with torch.no_grad():
            inforeg.trace_history[:, -2:] = torch.tensor([1.0, 2.0])
            inforeg.epochs_traced.fill_(2)
        t.method.on_epoch_start(t.model, t.ctx)
    assert inforeg.window_open.all()
    for batch in batches[:2]:
        t.train_step(batch)
    saved = state_of(t)
    expected = [t.train_step(b) for b in batches[2:]]
    assert any(float(expected[0].logs[f"inforeg/alpha/{m}"]) > 0 for m in inforeg.modalities)
    after = {k: v.clone() for k, v in t.model.state_dict().items()}
    trace = inforeg.trace_sum.clone()

    fresh = trainer(spec)
    fresh.ctx.epoch = 2
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)  # snapshots its own w0; the loaded state replaces it
    load_state(fresh, saved)
    got = [fresh.train_step(b) for b in batches[2:]]
    assert [r.loss.item() for r in got] == [r.loss.item() for r in expected]
    assert all(torch.equal(after[k], v) for k, v in fresh.model.state_dict().items())
    assert torch.equal(fresh.method.parts["inforeg"].trace_sum, trace)


# -- composition ---------------------------------------------------------------------------------------
def test_midas_plus_inforeg_is_midas_step_plus_the_proximal_pull():
    midas_options = ["midas.modulation_starts=0"]
    alone = trainer("midas", midas_options)
    composed = trainer("midas+inforeg", midas_options)
    composed.model.load_state_dict(alone.model.state_dict())
    batch = next(iter(alone.train_loader))
    inforeg = composed.method.parts["inforeg"]
    for t in (alone, composed):
        t.method.on_epoch_start(t.model, t.ctx)
    with torch.no_grad():
        inforeg.window_open.fill_(True)
    pull_anchors(composed, inforeg)
    reference, plain = step_gradients(alone, batch)
    record, regulated = step_gradients(composed, batch)
    assert record.loss.item() == reference.loss.item()  # InfoReg changes no value of MIDAS's forward pass
    assert set(record.losses) == {"fused", "unimodal", "misaligned"}
    coefficients = record.shared[COEFFICIENTS]
    assert (coefficients > 0).sum() == 1  # two modalities: the leading one, α ≥ 1
    assert coefficients.max() >= 1
    assert plain.keys() == regulated.keys()
    for slot, m in enumerate(inforeg.modalities):
        names = [n for n, _ in composed.model.encoders[m].named_parameters()]
        for name, p, a in zip(names, composed.ctx.params.encoder[m], inforeg.anchors[slot].tensors()):
            key = f"encoders.{m}.{name}"
            expected = plain[key] + coefficients[slot] * (p.detach() - a)
            assert torch.allclose(regulated[key], expected, rtol=1e-6, atol=1e-9), key
            assert torch.equal(regulated[key], plain[key]) == (coefficients[slot].item() == 0), key
    for key in plain:
        if not key.startswith("encoders."):
            assert torch.equal(regulated[key], plain[key]), key


def test_run_of_midas_plus_inforeg(tmp_path):
    config = build_config(overrides=TINY + ["midas.modulation_starts=0", "inforeg.variant=code"], method="midas+inforeg")
    metrics = train_run(config, tmp_path, quiet=True)
    assert metrics["method"] == "midas+inforeg" and metrics["parts"] == ["midas", "inforeg"]
    lines = [line["method"] for line in read_run(tmp_path)]
    assert len(lines) == 2
    for line in lines:
        assert {"loss/misaligned", "loss/inforeg_unimodal", "midas/alpha/strong", "inforeg/trace/strong"} <= set(line)
        assert all(math.isfinite(v) for v in line.values())
        assert line["inforeg/trace/strong"] > 0
    assert any(line["inforeg/alpha/strong"] + line["inforeg/alpha/weak"] > 0 for line in lines)


def test_three_modalities_step_regulates_every_leading_encoder_with_its_own_alpha():
    t = trainer("joint+inforeg", base=TINY3)
    plain = trainer("joint", base=TINY3)
    plain.model.load_state_dict(t.model.state_dict())
    batch = next(iter(t.train_loader))
    inforeg = t.method.parts["inforeg"]
    for x in (t, plain):
        x.method.on_epoch_start(x.model, x.ctx)
    with torch.no_grad():
        inforeg.window_open.fill_(True)
    pull_anchors(t, inforeg)
    record, grads = step_gradients(t, batch)
    _, reference = step_gradients(plain, batch)
    scores = torch.stack([record.logs[f"inforeg/score/{m}"] for m in inforeg.modalities])
    gaps = score_gaps(scores)
    assert torch.equal(torch.stack([record.logs[f"inforeg/gap/{m}"] for m in inforeg.modalities]), gaps)
    coefficients = record.shared[COEFFICIENTS]
    assert torch.allclose(coefficients, regulation_coefficients(gaps, 0.9))
    assert coefficients[scores.argmin()] == 0 and (coefficients > 0).sum() == 2  # all but the worst
    for slot, m in enumerate(inforeg.modalities):
        names = [n for n, _ in t.model.encoders[m].named_parameters()]
        for name, p, a in zip(names, t.ctx.params.encoder[m], inforeg.anchors[slot].tensors()):
            key = f"encoders.{m}.{name}"
            assert torch.allclose(grads[key], reference[key] + coefficients[slot] * (p.detach() - a), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("base", [TINY, TINY3], ids=["M=2", "M=3"])
def test_runs_of_joint_plus_inforeg(tmp_path, base):
    config = build_config(overrides=base + ["train.epochs=3", "inforeg.unimodal_weight=1"], method="inforeg")
    metrics = train_run(config, tmp_path, quiet=True)
    modalities = metrics["modalities"]
    assert len(modalities) == (2 if base is TINY else 3)
    lines = [line["method"] for line in read_run(tmp_path)]
    assert len(lines) == 3
    for epoch, line in enumerate(lines):
        assert {f"inforeg/{k}/{m}" for k in ("score", "gap", "alpha", "trace", "open") for m in modalities} <= set(line)
        assert all(math.isfinite(v) for v in line.values())
        if epoch < 2:  # the paper's window needs two traced epochs
            assert all(line[f"inforeg/open/{m}"] == 0.0 and line[f"inforeg/alpha/{m}"] == 0.0 for m in modalities)
    assert all(lines[0][f"inforeg/trace/{m}"] > 0 for m in modalities)
