"""AGM (a plugin): Shapley mono-modal responses, scores, ratios and κ on hand values, the gradient
re-routing through the responses, the BalanceMM variant, clipping, the window, state, MIDAS and runs."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbalance.methods.agm  # noqa: F401  (registers "agm")
from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.evaluation.shapley import all_coalitions, shapley_values
from mmbalance.methods import Method
from mmbalance.methods.agm import (
    clip_when_fusion_gradient_exceeds,
    modulation_coefficients,
    modulation_term,
    mono_modal_responses,
    response_matrix,
    response_scores,
    running_average,
)
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import ConcatFusion
from mmbalance.models.multimodal import MultimodalModel, zero_out
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
THREE = [o for o in TINY if not o.startswith("synthetic.dims")] + ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def context(model=None, epoch=0, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=3, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
        params=ParameterGroups.of(model) if model is not None else None,
    )


def part(name, modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


def joint_agm(modalities=("a", "b"), num_classes=3, **options):
    return Method([part("joint", modalities, num_classes), part("agm", modalities, num_classes, **options)])


def small_setup(modalities=("a", "b"), fusion="film", seed=0):
    torch.manual_seed(seed)
    dims = {m: (3 + i,) for i, m in enumerate(modalities)}
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8, fusion=fusion), list(modalities), dims, 3)
    inputs = {m: torch.randn(6, *d) for m, d in dims.items()}
    return model, Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


def official_gradients(model, batch, kappa, modalities, extra_loss=None):
    """The authors' construction: L = CE(Σ_m φ'_m), φ'_m = κ_m φ_m + (1 − κ_m) φ_m.detach(), plus the probes."""
    features = model.encode(batch.inputs)
    coalitions = [c for c in all_coalitions(modalities) if c]
    outputs = torch.stack([model.fuse(zero_out(features, c)) for c in coalitions])
    _, matrix = response_matrix(list(modalities))
    phi = torch.einsum("mk,kbc->mbc", matrix.float(), outputs)
    k = kappa[:, None, None]
    loss = F.cross_entropy((k * phi + (1 - k) * phi.detach()).sum(0), batch.labels)
    probes = model.heads({m: f.detach() for m, f in features.items()})
    loss = loss + sum(F.cross_entropy(z, batch.labels) for z in probes.values())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step_gradients(model, method, batch, ctx):
    record = method.training_step(model, batch, ctx)
    record.loss.backward()
    method.after_backward(record, ctx)
    return record, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def kappa_of(record, modalities=("a", "b")):
    return torch.stack([record.logs[f"agm/coefficient/{m}"] for m in modalities])


# -- responses ----------------------------------------------------------------------------------

def test_two_modal_responses_are_half_of_full_minus_other_plus_own():
    coalitions, matrix = response_matrix(["a", "v"])
    assert coalitions == [frozenset("a"), frozenset("v"), frozenset("av")]
    # φ_a = ½[F(a,v) − F(v) + F(a)]: columns F(a), F(v), F(a,v)
    assert matrix.tolist() == [[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]
    # F(a) = (1, 0), F(v) = (0, 2), F(a,v) = (3, 1):
    # φ_a = ½[(3, 1) − (0, 2) + (1, 0)] = (2, −0.5); φ_v = ½[(3, 1) − (1, 0) + (0, 2)] = (1, 1.5); Σ = (3, 1)
    outputs = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 1.0]]])
    phi = mono_modal_responses(outputs, matrix)
    assert torch.equal(phi, torch.tensor([[[2.0, -0.5]], [[1.0, 1.5]]]))
    assert torch.equal(phi.sum(0), outputs[-1])


def test_three_modal_responses_match_the_authors_formula_and_sum_to_the_fused_logits():
    coalitions, matrix = response_matrix(["a", "v", "t"])
    assert [set(c) for c in coalitions] == [{"a"}, {"v"}, {"t"}, {"a", "v"}, {"a", "t"}, {"v", "t"}, {"a", "v", "t"}]
    # φ_a = 1/3 (F(avt) − F(vt)) + 1/6 (F(av) − F(v) + F(at) − F(t)) + 1/3 F(a)
    assert torch.allclose(matrix[0], torch.tensor([1 / 3, -1 / 6, -1 / 6, 1 / 6, 1 / 6, -1 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(matrix.sum(0), torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64))
    # Shapley values (empty coalition included) plus v(∅)/M, for an arbitrary game: v(∅) cancels
    torch.manual_seed(1)
    values = {c: float(torch.randn(())) for c in all_coalitions("avt")}
    shapley = shapley_values(values, "avt")
    phi = matrix @ torch.tensor([values[c] for c in coalitions], dtype=torch.float64)
    for i, m in enumerate("avt"):
        assert phi[i].item() == pytest.approx(shapley[m] + values[frozenset()] / 3, abs=1e-12)


def test_responses_of_a_linear_concat_head_are_w_f_plus_half_the_bias():
    model, batch = linear_model()
    features = model.encode(batch.inputs)
    outputs = torch.stack([model.fuse(zero_out(features, c)) for c in ("a", "v", "av")])
    phi = mono_modal_responses(outputs, response_matrix(["a", "v"])[1])
    weight, bias = model.fusion.linear.weight, model.fusion.linear.bias
    assert torch.allclose(phi[0], features["a"] @ weight[:, :2].T + bias / 2, atol=1e-6)
    assert torch.allclose(phi[1], features["v"] @ weight[:, 2:].T + bias / 2, atol=1e-6)


def test_responses_sum_to_the_fused_logits_of_a_nonlinear_head_with_three_modalities():
    model, batch = small_setup(("a", "b", "c"), fusion="film")
    record = joint_agm(("a", "b", "c")).training_step(model, batch, context())
    agm = part("agm", ("a", "b", "c"))
    outputs = agm.coalition_outputs(record, with_grad=False)
    assert outputs.shape == (7, 6, 3) and torch.equal(outputs[-1], record.logits.detach())
    phi = mono_modal_responses(outputs, agm.response_weights)
    assert torch.allclose(phi.sum(0), record.logits.detach(), atol=1e-6)


# -- scores, ratios, coefficients --------------------------------------------------------------------

def test_scores_are_the_clamped_cross_entropy_of_each_response():
    # a: logits (ln 3, 0) on label 0 → p = 3/4 → −ln 0.75 = 0.287682; second row (0, 0) on label 1 → ln 2
    # b: (−100, 100) on label 0 → p = e^{−200} < 1e-8 → −ln 1e-8 = 18.420681; (0, 0) → ln 2
    responses = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]], [[-100.0, 100.0], [0.0, 0.0]]])
    scores = response_scores(responses, torch.tensor([0, 1]))
    assert scores[0].item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2, rel=1e-6)
    assert scores[1].item() == pytest.approx((-math.log(1e-8) + math.log(2)) / 2, rel=1e-6)


def test_ratios_and_coefficients_of_the_spec_example():
    # s = (0.5, 1.0), ŝ = (1, 1), α = 0.1: r_a = e^{0.5} = 1.6487, κ_a = exp(−0.0649) = 0.9372;
    # r_v = e^{−0.5} = 0.6065, κ_v = exp(0.0393) = 1.0401; the targets r̂ are both 1
    stats = modulation_coefficients(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), alpha=0.1, cap=10.0)
    assert stats["ratio"].tolist() == pytest.approx([math.exp(0.5), math.exp(-0.5)], rel=1e-6)
    assert stats["target"].tolist() == [1.0, 1.0]
    assert stats["coefficient"].tolist() == pytest.approx([math.exp(0.1 * (1 - math.exp(0.5))), math.exp(0.1 * (1 - math.exp(-0.5)))], rel=1e-6)
    assert stats["coefficient"].tolist() == pytest.approx([0.9372, 1.0401], abs=1e-4)


def test_three_modal_ratios_use_m_over_m_minus_one_or_the_given_factor():
    scores, averages = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0])
    # mean 2; factor 3/2: r = (e^{1.5}, 1, e^{−1.5}); r̂ = 1; κ = exp(0.1 (1 − r)) = (0.705980, 1, 1.080784)
    stats = modulation_coefficients(scores, averages, alpha=0.1, cap=10.0)
    assert stats["ratio"].tolist() == pytest.approx([math.exp(1.5), 1.0, math.exp(-1.5)], rel=1e-6)
    assert stats["coefficient"].tolist() == pytest.approx([0.705980, 1.0, 1.080784], rel=1e-5)
    # factor 1 (one authors' 3-modal script): r = (e, 1, e^{−1})
    one = modulation_coefficients(scores, averages, alpha=0.1, cap=10.0, factor=1.0)
    assert one["ratio"].tolist() == pytest.approx([math.e, 1.0, 1 / math.e], rel=1e-6)


def test_the_exponent_is_capped():
    # ŝ = (0, 5), s = (0, 0): r̂_a = e^5 = 148.41, r_a = 1 → r̂_a − r_a = 147.4, capped to 10 → κ_a = e^{0.1·10} = e;
    # r̂_v = e^{−5}, r_v = 1 → κ_v = exp(0.1 (e^{−5} − 1)) = 0.905447 (the cap bounds only from above)
    stats = modulation_coefficients(torch.zeros(2), torch.tensor([0.0, 5.0]), alpha=0.1, cap=10.0)
    assert stats["coefficient"].tolist() == pytest.approx([math.e, math.exp(0.1 * (math.exp(-5) - 1))], rel=1e-6)
    assert stats["coefficient"][1].item() == pytest.approx(0.905447, rel=1e-5)
    # BalanceMM's cap 7: κ_a = e^{0.7} = 2.013753
    assert modulation_coefficients(torch.zeros(2), torch.tensor([0.0, 5.0]), 0.1, 7.0)["coefficient"][0].item() == pytest.approx(2.013753, rel=1e-6)
    assert part("agm", variant="encoder_grad").cap == 7.0 and part("agm").cap == 10.0 and part("agm", cap=3.0).cap == 3.0


def test_running_average_is_the_mean_of_all_steps_and_is_updated_after_the_coefficients():
    average = torch.zeros(2)
    for t, scores in enumerate([torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 2.0])], start=1):
        average = running_average(average, scores, t)
    assert average.tolist() == pytest.approx([2.0, 2.0])  # (1 + 3 + 2)/3, (4 + 0 + 2)/3

    model, batch = small_setup()
    method = joint_agm()
    agm = method.parts["agm"]
    logged = []
    for _ in range(3):
        record = method.training_step(model, batch, context(model))
        # κ of this step reads ŝ before this step's scores: the average logged is the previous one
        assert torch.equal(record.logs["agm/average/a"], agm.score_average[0])
        logged.append(torch.stack([record.logs["agm/score/a"], record.logs["agm/score/b"]]))
        method.after_step(record, context(model))
    assert agm.steps.item() == 3
    assert torch.allclose(agm.score_average, torch.stack(logged).mean(0), atol=1e-6)


# -- the gradient ---------------------------------------------------------------------------------

class LinearEncoder(Encoder):
    def __init__(self, weight):
        super().__init__((2,), 2)
        self.linear = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x):
        return self.linear(x)


def linear_model():
    """Linear encoders and a linear concat head: z = W_a f_a + W_v f_v + b."""
    encoders = {"a": LinearEncoder(torch.tensor([[1.0, 0.5], [-0.5, 1.0]])), "v": LinearEncoder(torch.tensor([[0.3, -1.0], [2.0, 0.1]]))}
    model = MultimodalModel(encoders, ConcatFusion({"a": 2, "v": 2}, 3), 3)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.2], [0.3, 0.8, -0.4, 1.0], [-0.7, 0.1, 0.9, -0.3]]))
        model.fusion.linear.bias.copy_(torch.tensor([0.2, -0.1, 0.4]))
    inputs = {"a": torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), "v": torch.tensor([[0.5, -1.0], [2.0, 1.0]])}
    return model, Batch(inputs, torch.tensor([0, 2]), torch.arange(2))


def test_kappa_half_halves_the_audio_weight_and_encoder_gradients_and_leaves_visual_alone():
    def gradients(kappa):
        model, batch = linear_model()
        features = model.encode(batch.inputs)
        logits = model.fuse(features)
        loss = F.cross_entropy(logits, batch.labels)
        if kappa is not None:
            (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
            outputs = torch.stack([model.fuse(zero_out(features, "a")), model.fuse(zero_out(features, "v")), logits])
            term = modulation_term(outputs, response_matrix(["a", "v"])[1], torch.tensor(kappa), g)
            assert term.item() == 0.0  # the loss value is unchanged
            loss = loss + term
        loss.backward()
        weight = model.fusion.linear.weight.grad
        return {"W_a": weight[:, :2], "W_v": weight[:, 2:], "b": model.fusion.linear.bias.grad,
                "enc_a": model.encoders["a"].linear.weight.grad, "enc_v": model.encoders["v"].linear.weight.grad}

    plain, modulated = gradients(None), gradients([0.5, 1.0])
    assert plain["W_a"].abs().sum() > 0 and plain["enc_a"].abs().sum() > 0
    for name, factor in {"W_a": 0.5, "enc_a": 0.5, "W_v": 1.0, "enc_v": 1.0, "b": 0.75}.items():
        # the bias sits half in φ_a, half in φ_v: (0.5 + 1)/2 = 0.75 of its gradient
        assert torch.allclose(modulated[name], factor * plain[name], atol=1e-7), name


@pytest.mark.parametrize("modalities, fusion", [(("a", "b"), "film"), (("a", "b", "c"), "gated"), (("a", "b", "c"), "concat")])
def test_the_plugin_gives_the_authors_gradient_for_any_head(modalities, fusion):
    model, batch = small_setup(modalities, fusion)
    reference = copy.deepcopy(model)
    method = joint_agm(modalities, clip=False)
    agm = method.parts["agm"]
    agm.score_average.copy_(torch.tensor([0.2, 2.0, 0.5][: len(modalities)]))  # a target far from the batch's ratios
    agm.steps.fill_(4)
    record, grads = step_gradients(model, method, batch, context(model))
    kappa = kappa_of(record, modalities)
    assert record.logs["agm/modulating"] == 1.0 and (kappa - 1).abs().min() > 1e-3
    assert record.losses["agm_response"].item() == 0.0
    expected = official_gradients(reference, batch, kappa, modalities)
    assert grads.keys() == expected.keys()
    for name in grads:
        assert torch.allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_encoder_grad_variant_scales_encoder_weight_gradients_after_backward():
    model, batch = small_setup()
    _, plain = step_gradients(copy.deepcopy(model), Method([part("joint")]), batch, context(model))
    method = joint_agm(variant="encoder_grad", clip=False)
    method.parts["agm"].score_average.copy_(torch.tensor([0.3, 1.5]))
    record, grads = step_gradients(model, method, batch, context(model))
    assert "agm_response" not in record.losses and record.logs["agm/modulating"] == 1.0
    kappa = dict(zip("ab", kappa_of(record).tolist()))
    assert abs(kappa["a"] - 1) > 1e-3
    params = dict(model.named_parameters())
    for name, grad in grads.items():
        factor = kappa[name.split(".")[1]] if name.startswith("encoders.") and params[name].ndim >= 2 else 1.0
        assert torch.allclose(grad, factor * plain[name], rtol=1e-6, atol=1e-9), name


def test_gradient_clipping_when_a_fusion_weight_gradient_leaves_plus_minus_one():
    fusion, bias, encoder = nn.Parameter(torch.zeros(1, 2)), nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1, 2))
    # fusion weight gradient (2, 0) exceeds 1; global norm √(2² + 1.5²) = 2.5 → every gradient × 1/2.5
    fusion.grad, bias.grad, encoder.grad = torch.tensor([[2.0, 0.0]]), torch.tensor([0.0]), torch.tensor([[0.0, 1.5]])
    assert clip_when_fusion_gradient_exceeds([fusion], [fusion, bias, encoder], 1.0, 1.0).item() == 1.0
    assert torch.allclose(fusion.grad, torch.tensor([[0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(encoder.grad, torch.tensor([[0.0, 0.6]]), atol=1e-6)
    # within ±1 (−0.9): nothing changes, however large the others (and a large bias gradient does not count)
    fusion.grad, bias.grad, encoder.grad = torch.tensor([[-0.9, 0.5]]), torch.tensor([7.0]), torch.tensor([[0.0, 10.0]])
    assert clip_when_fusion_gradient_exceeds([fusion], [fusion, bias, encoder], 1.0, 1.0).item() == 0.0
    assert encoder.grad.tolist() == [[0.0, 10.0]] and bias.grad.tolist() == [7.0]
    # BalanceMM's rule: threshold 5, norm 5 — (6, 8) exceeds 5, norm 10 → (3, 4)
    fusion.grad = torch.tensor([[6.0, 8.0]])
    clip_when_fusion_gradient_exceeds([fusion], [fusion], 5.0, 5.0)
    assert torch.allclose(fusion.grad, torch.tensor([[3.0, 4.0]]), atol=1e-5)


def test_the_plugin_clips_inside_the_window_only():
    model, batch = small_setup()
    with torch.no_grad():
        model.fusion.out.weight.mul_(50)  # large fusion gradients
    grads = {}
    for epoch in (0, 1):
        copied = copy.deepcopy(model)
        record, grads[epoch] = step_gradients(copied, joint_agm(modulation_starts=1), batch, context(copied, epoch))
        assert record.logs.get("agm/clipped", torch.tensor(0.0)).item() == float(epoch)
    # outside the window a fusion weight gradient beyond ±1 is left as it is; inside, the global norm becomes 1
    assert max(g.abs().max().item() for n, g in grads[0].items() if n.startswith("fusion.") and g.ndim >= 2) > 1
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[1].values()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


# -- window, determinism, state --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["response_hook", "encoder_grad"])
@pytest.mark.parametrize("zeroing", ["feature", "input"])
def test_outside_the_window_gradients_equal_plain_joint_exactly(variant, zeroing):
    model, batch = small_setup()
    _, plain = step_gradients(copy.deepcopy(model), Method([part("joint")]), batch, context(model))
    for epoch, starts, ends in [(0, 1, None), (3, 0, 2)]:
        copied = copy.deepcopy(model)
        method = joint_agm(variant=variant, zeroing=zeroing, modulation_starts=starts, modulation_ends=ends)
        method.parts["agm"].score_average.copy_(torch.tensor([0.3, 1.5]))
        ctx = context(copied, epoch)
        method.setup(copied, ctx)
        record, grads = step_gradients(copied, method, batch, ctx)
        assert record.logs["agm/modulating"] == 0.0 and set(record.losses) == {"fused", "probe"}
        assert abs(record.logs["agm/coefficient/a"].item() - 1) > 1e-3  # κ is computed, not applied
        assert grads.keys() == plain.keys()
        for name in grads:
            assert torch.equal(grads[name], plain[name]), (epoch, name)


def test_input_zeroing_encodes_zeroed_inputs_in_eval_mode_and_restores_train_mode():
    model, batch = small_setup()
    model.encoders["a"].net.append(nn.Dropout(0.5))  # eval mode makes the re-encoding deterministic
    model.train()
    method = joint_agm(zeroing="input")
    method.setup(model, context(model))
    record = method.training_step(model, batch, context(model))
    outputs = method.parts["agm"].coalition_outputs(record, with_grad=False)
    assert all(module.training for module in model.modules())
    model.eval()
    with torch.no_grad():
        expected = [model.fuse(model.encode({m: x if m in c else torch.zeros_like(x) for m, x in batch.inputs.items()})) for c in ("a", "b")]
    assert torch.allclose(outputs[0], expected[0], atol=1e-6) and torch.allclose(outputs[1], expected[1], atol=1e-6)
    assert torch.equal(outputs[2], record.logits.detach())  # F(𝓜): the objective's own, train-mode logits


def test_input_zeroing_gives_the_authors_gradient_through_the_re_encodings():
    model, batch = small_setup()
    reference = copy.deepcopy(model)
    method = joint_agm(zeroing="input", clip=False)
    method.parts["agm"].score_average.copy_(torch.tensor([0.3, 1.5]))
    method.setup(model, context(model))
    record, grads = step_gradients(model, method, batch, context(model))
    kappa = kappa_of(record)
    # by hand: F(a), F(b) from zeroed inputs (eval mode), F(a,b) = the fused logits
    features = reference.encode(batch.inputs)
    logits = reference.fuse(features)
    singles = [reference.fuse(reference.encode({m: x if m == c else torch.zeros_like(x) for m, x in batch.inputs.items()})) for c in "ab"]
    phi = torch.einsum("mk,kbc->mbc", response_matrix(["a", "b"])[1].float(), torch.stack([*singles, logits]))
    k = kappa[:, None, None]
    loss = F.cross_entropy((k * phi + (1 - k) * phi.detach()).sum(0), batch.labels)
    loss = loss + sum(F.cross_entropy(z, batch.labels) for z in reference.heads({m: f.detach() for m, f in features.items()}).values())
    loss.backward()
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name


def trainer(spec="joint+agm", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def test_two_runs_with_the_same_seed_give_the_same_coefficients(tmp_path):
    logs = []
    for run in ("one", "two"):
        train_run(build_config(overrides=TINY, method="joint+agm"), tmp_path / run, quiet=True)
        lines = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in l["method"].items() if k.startswith("agm/")} for l in lines])
    assert logs[0] == logs[1] and "agm/coefficient/strong" in logs[0][0]


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    first = trainer()
    batches = [b for _, b in zip(range(3), first.train_loader)]
    for batch in batches[:2]:
        first.train_step(batch)
    assert first.method.parts["agm"].steps.item() == 2
    state = copy.deepcopy({"model": first.model.state_dict(), "method": first.method.state_dict(),
                           "optimizer": first.ctx.optimizer.state_dict()})
    assert set(state["method"]) >= {"parts.agm.score_average", "parts.agm.steps"}
    expected = first.train_step(batches[2])
    second = trainer()
    second.model.load_state_dict(state["model"])
    second.method.load_state_dict(state["method"])
    second.ctx.optimizer.load_state_dict(state["optimizer"])
    again = second.train_step(batches[2])
    assert again.loss.item() == expected.loss.item()
    for key in expected.logs:
        assert torch.equal(torch.as_tensor(again.logs[key]), torch.as_tensor(expected.logs[key])), key
    for (name, p), q in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(first.method.parts["agm"].score_average, second.method.parts["agm"].score_average)


# -- composition and runs ----------------------------------------------------------------------------

def test_midas_plus_agm_reroutes_the_fused_term_and_leaves_midas_other_terms_alone():
    model, batch = small_setup()
    midas = {"modulation_starts": 0}
    alone = Method([part("midas", **midas)])
    composed = Method([part("midas", **midas), part("agm", clip=False)])
    composed.parts["agm"].score_average.copy_(torch.tensor([0.3, 1.5]))
    reference, _ = step_gradients(copy.deepcopy(model), alone, batch, context(model, seed=7))
    record, grads = step_gradients(model, composed, batch, context(model, seed=7))
    assert set(record.losses) == {"fused", "unimodal", "misaligned", "agm_response"}
    assert record.loss.item() == reference.loss.item()  # AGM changes no value
    assert record.logs["midas/misaligned_samples"].item() == reference.logs["midas/misaligned_samples"].item() > 0
    kappa = kappa_of(record)
    # by hand: MIDAS's step with CE(z) replaced by CE(Σ φ'_m) (the same misaligned draw: generator seed 7)
    copied = copy.deepcopy(model)
    for p in copied.parameters():
        p.grad = None
    hand = Method([part("midas", **midas)]).training_step(copied, batch, context(copied, seed=7))
    features = hand.features
    outputs = torch.stack([copied.fuse(zero_out(features, c)) for c in ("a", "b")] + [hand.logits])
    phi = mono_modal_responses(outputs, response_matrix(["a", "b"])[1])
    k = kappa[:, None, None]
    loss = F.cross_entropy((k * phi + (1 - k) * phi.detach()).sum(0), batch.labels) + hand.losses["unimodal"] + hand.losses["misaligned"]
    loss.backward()
    for name, p in copied.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name
    # the unimodal heads see only MIDAS's unimodal term: untouched by AGM
    assert all(torch.equal(grads[n], p.grad) for n, p in copied.named_parameters() if n.startswith("unimodal_heads."))


def test_order_with_an_encoder_scaling_plugin_does_not_matter():
    # AGM's re-routing flows through the graph into the features, so ARL's hook on the encoder outputs
    # scales it together with the rest, whichever part comes first
    model, batch = small_setup()
    grads = []
    for order in (["agm", "arl"], ["arl", "agm"]):
        parts = {"agm": part("agm", clip=False), "arl": part("arl", modulation_starts=0)}
        parts["agm"].score_average.copy_(torch.tensor([0.3, 1.5]))
        method = Method([part("joint")] + [parts[name] for name in order])
        grads.append(step_gradients(copy.deepcopy(model), method, batch, context(model))[1])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-9), name


def test_midas_warmup_leaves_nothing_to_modulate():
    model, batch = small_setup()
    method = Method([part("midas", modulation_starts=5), part("agm")])
    record = method.training_step(model, batch, context(model))
    assert record.logs["agm/modulating"] == 0.0 and "agm_response" not in record.losses
    assert math.isfinite(record.logs["agm/score/a"].item())


def read_run(path):
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [line["method"] for line in lines], json.loads((path / "metrics.json").read_text())


def test_run_of_midas_plus_agm(tmp_path):
    config = build_config(overrides=[*TINY, "midas.modulation_starts=0"], method="midas+agm")
    train_run(config, tmp_path, quiet=True)
    lines, metrics = read_run(tmp_path)
    assert metrics["method"] == "midas+agm" and len(lines) == 2
    for line in lines:
        assert {"loss/fused", "loss/misaligned", "loss/agm_response", "agm/coefficient/strong", "midas/alpha/weak"} <= set(line)
        assert line["agm/modulating"] == 1.0 and line["loss/agm_response"] == 0.0
        assert all(math.isfinite(v) for v in line.values())


@pytest.mark.parametrize("options", [[], ["agm.variant=encoder_grad"], ["agm.zeroing=input", "agm.modulation_starts=1"]])
def test_runs_with_two_and_three_modalities(tmp_path, options):
    for count, overrides in [(2, TINY), (3, THREE)]:
        train_run(build_config(overrides=[*overrides, *options], method="joint+agm"), tmp_path / str(count), quiet=True)
        lines, metrics = read_run(tmp_path / str(count))
        assert len(metrics["modalities"]) == count and len(lines) == 2
        for line in lines:
            assert {f"agm/{k}/{m}" for k in ("score", "ratio", "target", "coefficient") for m in metrics["modalities"]} <= set(line)
            assert all(math.isfinite(v) for v in line.values())
        expected = [0.0, 1.0] if "agm.modulation_starts=1" in options else [1.0, 1.0]
        assert [line["agm/modulating"] for line in lines] == expected


def test_config_is_validated():
    with pytest.raises(ConfigError, match="agm.variant"):
        build_config(overrides=["agm.variant=bmm"], method="agm")
    with pytest.raises(ConfigError, match="agm.zeroing"):
        build_config(overrides=["agm.zeroing=logits"], method="agm")
    config = build_config(method="midas+agm")
    assert config.parts == ["midas", "agm"] and config.section("agm").alpha == 0.1
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("agm", modulation_starts=3, modulation_ends=2)
    with pytest.raises(ConfigError, match="agm needs at least 2 modalities"):
        part("agm", modalities=("a",))
    with pytest.warns(UserWarning, match="63 coalitions"):
        part("agm", modalities=tuple("abcdef"))
