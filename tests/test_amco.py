"""AMCo (an objective): the spec's two "Test it by" lines (mask ratio and mask size; block masses and the
dependent set), both ramps by hand, the loss on a hand-worked example (as plain functions and through the
objective), the masks the objective draws (logits and features), the unmasked prediction, d_m for linear
heads and the refusal of other heads, the dependent set's life cycle, the modulation window, determinism,
the state round trip, and runs of amco, amco+arl and amco+ogm_ge with M = 2 and 3."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.amco  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.amco import (
    amco_losses,
    dependence_masses,
    dependent_modalities,
    draw_mask,
    mask_logits,
    mask_ratio,
    masked_units,
    ramp_position,
)
from mmbalance.methods.compose import resolve
from mmbalance.models.readouts import modality_scores, zeroed_logits
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.checkpoint import load_checkpoint

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
STRONG, WEAK = "strong", "weak"  # the synthetic dataset's modalities, in this order


def trainer(spec="amco", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def at_position(t, epoch, step_in_epoch=0, global_step=0):
    t.ctx.epoch, t.ctx.step_in_epoch, t.ctx.global_step = epoch, step_in_epoch, global_step


# -- the spec's "Test it by" -------------------------------------------------------------------------------

def test_mask_ratio_and_mask_size_of_the_spec_example():
    # ε = 0.3, ℓ_t = 0.15: p_t = sin(π/2 · 0.15/0.3) = sin(π/4) = 0.70710678; ⌊0.7071 · 10⌋ = 7 zeros of C = 10
    p = mask_ratio(0.15, 0.3)
    assert p == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert masked_units(p, 10) == 7
    generator = torch.Generator().manual_seed(0)
    masks = [draw_mask(10, p, generator) for _ in range(20)]
    for mask in masks:
        assert mask.shape == (10,) and set(mask.tolist()) <= {0.0, 1.0}
        assert int((mask == 0).sum()) == 7
    assert len({tuple(m.tolist()) for m in masks}) > 1  # the positions are random, the count is not


def test_mask_size_of_the_spec_example_in_a_training_step():
    # C = 10, ramp=progress at global step 3 of 2 epochs × 10 steps: ℓ_t = 0.15 ⇒ 7 of the 10 logits of the
    # dependent modality are zeroed. With A = identity, Σ_m d_m − z'_train = (1 − mask) ⊙ d_strong shows them.
    t = trainer("amco[ramp=progress,mixer_init=identity]", ["synthetic.num_classes=10"])
    t.ctx.max_epochs, t.ctx.steps_per_epoch = 2, 10
    at_position(t, epoch=0, global_step=3)
    amco = t.method.objective
    amco.dependent.copy_(torch.tensor([True, False]))
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    assert record.logs["amco/mask_ratio"] == pytest.approx(0.70710678, abs=1e-8)
    assert record.logs[f"amco/masked_units/{STRONG}"] == 7.0 and record.logs[f"amco/masked_units/{WEAK}"] == 0.0
    removed = t.model.fuse(record.features) - record.logits  # [B, 10]
    zeroed_columns = (removed.abs() > 1e-6).any(0)
    assert int(zeroed_columns.sum()) == 7
    d = amco.modality_logits(t.model, record.features)
    assert torch.allclose(removed[:, zeroed_columns], d[0][:, zeroed_columns], atol=1e-5)


def test_block_masses_of_the_spec_example():
    # C = 2, d_1 = (10, 0), d_2 = (0, 0): softmax over (10, 0, 0, 0) gives block masses
    # (e^10 + 1)/(e^10 + 3) = 0.99990920 and 2/(e^10 + 3) = 0.00009080 ⇒ only modality 1 is dependent
    d = torch.tensor([[[10.0, 0.0]], [[0.0, 0.0]]])  # [M, B, C]
    masses = dependence_masses(d)
    e10 = math.exp(10)
    assert masses.tolist() == pytest.approx([(e10 + 1) / (e10 + 3), 2 / (e10 + 3)], abs=1e-7)
    assert masses.tolist() == pytest.approx([0.99991, 0.00009], abs=1e-5)
    assert dependent_modalities(masses, 0.5).tolist() == [True, False]
    # the batch mean: a second sample mirrored gives (0.5, 0.5), which does not *exceed* σ = 0.5
    mirrored = torch.tensor([[[10.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [10.0, 0.0]]])
    assert dependence_masses(mirrored).tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    assert dependent_modalities(dependence_masses(mirrored), 0.5).tolist() == [False, False]
    # the concatenated softmax, not each modality's own confidence: (10, 0) vs (30, 20) has the same
    # margin, yet modality 2's logits are larger, so modality 2 holds the mass
    assert dependence_masses(torch.tensor([[[10.0, 0.0]], [[30.0, 20.0]]]))[1] > 0.999


def test_spec_masses_through_the_objective_make_only_modality_1_dependent():
    # a concat head over 2-dim features with W = [I | I], b = 0 gives d_1 = f_1, d_2 = f_2: the spec's logits
    t = trainer("amco", ["synthetic.num_classes=2", "model.feature_dim=2"])
    hand_head(t)
    at_position(t, epoch=0)
    amco = t.method.objective
    amco.encode = lambda model, inputs: {STRONG: torch.tensor([[10.0, 0.0]]), WEAK: torch.tensor([[0.0, 0.0]])}
    record = t.method.training_step(t.model, one_sample(label=0), t.ctx)
    assert record.logs[f"amco/mass/{STRONG}"].item() == pytest.approx(0.99991, abs=1e-5)
    t.method.after_step(record, t.ctx)
    assert amco.dependent.tolist() == [True, False]


# -- the ramps ---------------------------------------------------------------------------------------------

def test_per_epoch_ramp_by_hand():
    # ℓ_t = k · e / 10 (batch k, epoch e, 0-based), ε = 0.3: epoch 0 is never masked;
    # epoch 1: k = 1 → sin(π/2 · 1/3) = 0.5, k = 2 → sin(π/3) = 0.8660, k ≥ 3 → 1; epoch 3: k = 1 → 1
    def p(epoch, k):
        return mask_ratio(ramp_position("per_epoch", epoch, k, 0, 100), 0.3)

    assert [p(0, k) for k in (0, 1, 50)] == [0.0, 0.0, 0.0]
    assert [p(1, k) for k in range(5)] == pytest.approx([0.0, 0.5, math.sqrt(3) / 2, 1.0, 1.0], abs=1e-12)
    assert p(2, 1) == pytest.approx(math.sqrt(3) / 2, abs=1e-12)
    assert [p(3, 0), p(3, 1)] == [0.0, 1.0]
    # p_t = sin(π/6) evaluates to 0.49999999999999994; ⌊0.5 · 4⌋ is still 2 masked units, ⌊0.866 · 4⌋ = 3
    assert [masked_units(p(1, k), 4) for k in range(4)] == [0, 2, 3, 4]


def test_progress_ramp_by_hand_and_its_pinned_length():
    # ℓ_t = t / T: T = 20, t = 3 → 0.15 → 0.7071; t ≥ 6 → 1
    assert mask_ratio(ramp_position("progress", 5, 0, 3, 20), 0.3) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert mask_ratio(ramp_position("progress", 5, 0, 6, 20), 0.3) == 1.0
    cls = METHODS.get("amco")
    assert cls.pinned_options(cls.Config(ramp="progress"), 30) == {"ramp_epochs": 30}
    assert cls.pinned_options(cls.Config(ramp="progress", ramp_epochs=12), 30) == {}
    assert cls.pinned_options(cls.Config(), 30) == {}
    # the objective reads T = ramp_epochs × steps per epoch
    t = trainer("amco[ramp=progress,ramp_epochs=4]")
    t.ctx.steps_per_epoch = 5
    at_position(t, epoch=0, global_step=3)  # ℓ = 3/20
    assert t.method.objective.mask_ratio_at(t.ctx) == pytest.approx(math.sqrt(0.5), abs=1e-12)


# -- the loss by hand --------------------------------------------------------------------------------------

def test_loss_by_hand():
    # d_1 = (2, 0) (dependent), d_2 = (0, 1), y = 0, mask = (0, 1), A = [[1, 0], [0, 2]], no bias:
    # Σ_m M_m ⊙ d_m = (0, 0) + (0, 1) = (0, 1); z' = (0, 2); CE(z', 0) = log(1 + e²) = 2.12692801
    # co-optimisation: CE((0, 0), 0) + CE((0, 1), 0) = log 2 + log(1 + e) = 0.69314718 + 1.31326169
    # unmasked co-optimisation: CE((2, 0), 0) + CE((0, 1), 0) = log(1 + e⁻²) + log(1 + e) = 0.12692801 + 1.31326169
    d = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    labels = torch.tensor([0])
    masked = mask_logits(d, torch.tensor([True, False]), torch.tensor([0.0, 1.0]))
    assert masked.tolist() == [[[0.0, 0.0]], [[0.0, 1.0]]]

    def mixer(x):
        return x @ torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T

    z, fused, co_opt = amco_losses(masked.sum(0), masked, mixer, labels)
    assert z.tolist() == [[0.0, 2.0]]
    assert fused.item() == pytest.approx(math.log(1 + math.e ** 2), abs=1e-6)
    assert co_opt.item() == pytest.approx(math.log(2) + math.log(1 + math.e), abs=1e-6)
    _, _, unmasked = amco_losses(masked.sum(0), d, mixer, labels)
    assert unmasked.item() == pytest.approx(math.log(1 + math.e ** -2) + math.log(1 + math.e), abs=1e-6)
    # masking the wrong modality would leave Σ = (2, 1), z' = (2, 2) and CE = log 2 instead
    wrong = mask_logits(d, torch.tensor([False, True]), torch.tensor([0.0, 1.0]))
    assert amco_losses(wrong.sum(0), wrong, mixer, labels)[1].item() == pytest.approx(math.log(2), abs=1e-6)
    # per-sample weights scale every term as the fused cross-entropy does
    _, fused_w, co_opt_w = amco_losses(masked.sum(0), masked, mixer, labels, torch.tensor([0.5]))
    assert (fused_w.item(), co_opt_w.item()) == pytest.approx((0.5 * fused.item(), 0.5 * co_opt.item()), abs=1e-6)


def hand_head(t):
    """Concat head over two 2-dim features, W = [I | I], b = 0: d_m = f_m exactly; A = [[1, 0], [0, 2]], no bias."""
    with torch.no_grad():
        t.model.fusion.linear.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        t.model.fusion.linear.bias.zero_()
        t.method.objective.mixer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        t.method.objective.mixer.bias.zero_()


def one_sample(label):
    return Batch(inputs={STRONG: torch.zeros(1, 8), WEAK: torch.zeros(1, 8)}, labels=torch.tensor([label]), index=torch.tensor([0]))


@pytest.mark.parametrize("unmasked", [False, True])
def test_loss_by_hand_through_the_objective_and_the_prediction_is_unmasked(unmasked):
    # the example above through the objective: f_strong = (2, 0) → d_1, f_weak = (0, 1) → d_2, 𝒟 = {strong};
    # at ℓ_t ≥ ε, p_t = 1 and both of the C = 2 logits of d_1 are zeroed (the same numbers as mask (0, 1),
    # since d_1's second logit is 0). The prediction is A(d_1 + d_2) = A((2, 1)) = (2, 2), without masks.
    spec = f"amco[ramp=progress,co_opt_unmasked={str(unmasked).lower()}]"
    t = trainer(spec, ["synthetic.num_classes=2", "model.feature_dim=2"])
    hand_head(t)
    t.ctx.steps_per_epoch = 5
    at_position(t, epoch=1, global_step=9)  # ℓ = 9/10 ≥ 0.3
    amco = t.method.objective
    features = {STRONG: torch.tensor([[2.0, 0.0]]), WEAK: torch.tensor([[0.0, 1.0]])}
    amco.encode = lambda model, inputs: features
    amco.dependent.copy_(torch.tensor([True, False]))
    record = t.method.training_step(t.model, one_sample(label=0), t.ctx)
    assert record.logits.tolist() == [[0.0, 2.0]]
    assert record.losses["fused"].item() == pytest.approx(math.log(1 + math.e ** 2), abs=1e-6)
    expected = math.log(1 + math.e ** -2) if unmasked else math.log(2)
    assert record.losses["co_opt"].item() == pytest.approx(expected + math.log(1 + math.e), abs=1e-6)
    assert record.logs[f"amco/masked_units/{STRONG}"] == 2.0
    # prediction, evaluation's read-out and the record's fuse: all unmasked
    assert t.method.predict_from_features(t.model, features).tolist() == [[2.0, 2.0]]
    assert record.fuse(features).tolist() == [[2.0, 2.0]]


def test_evaluation_predicts_with_the_unmasked_read_out():
    t = trainer("amco")
    batch = next(iter(t.train_loader))
    amco = t.method.objective
    amco.dependent.fill_(True)
    at_position(t, epoch=1, step_in_epoch=4)  # p_t = 1: every logit of both modalities masked in training
    record = t.method.training_step(t.model, batch, t.ctx)
    # all masked: Σ_m M_m ⊙ d_m = 0 up to rounding, so z'_train = A(0) = A's bias
    assert torch.allclose(record.logits, amco.mixer.bias.expand_as(record.logits), atol=1e-5)
    features = amco.encode(t.model, batch.inputs)
    expected = amco.mixer(t.model.fuse(features))
    assert torch.equal(t.method.predict(t.model, batch.inputs), expected)
    assert type(amco).overrides_prediction()


# -- the masks the objective draws ---------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["logits", "features"])
def test_the_step_uses_the_mask_drawn_from_the_run_generator(space):
    # ramp per_epoch, epoch 1, batch 1: p_t = 0.5 ⇒ logits: ⌊0.5 · 4⌋ = 2 of C = 4; features: ⌊0.5 · 8⌋ = 4 of 8
    t = trainer(f"amco[mask_space={space}]")
    at_position(t, epoch=1, step_in_epoch=1)
    amco = t.method.objective
    amco.dependent.copy_(torch.tensor([False, True]))
    batch = next(iter(t.train_loader))
    replay = torch.Generator().set_state(t.ctx.generator.get_state())
    record = t.method.training_step(t.model, batch, t.ctx)
    features = record.features
    d = amco.modality_logits(t.model, features)
    if space == "logits":
        mask = draw_mask(4, 0.5, replay)
        assert int((mask == 0).sum()) == 2
        masked = d.clone()
        masked[1] = d[1] * mask
        expected_sum, expected_co_opt = masked.sum(0), masked
    else:
        mask = draw_mask(8, 0.5, replay)
        assert int((mask == 0).sum()) == 4
        masked_features = {STRONG: features[STRONG], WEAK: features[WEAK] * mask}
        expected_sum = t.model.fuse(masked_features)
        expected_co_opt = amco.modality_logits(t.model, masked_features)
    assert torch.allclose(record.logits, amco.mixer(expected_sum), atol=1e-6)
    co_opt = sum(F.cross_entropy(z, batch.labels) for z in expected_co_opt)
    assert record.losses["co_opt"].item() == pytest.approx(co_opt.item(), rel=1e-6)
    assert record.logs[f"amco/masked_units/{WEAK}"] == (2.0 if space == "logits" else 4.0)
    assert record.logs[f"amco/masked_units/{STRONG}"] == 0.0
    # the generator moved on by exactly that one draw
    assert torch.equal(replay.get_state(), t.ctx.generator.get_state())


# -- d_m and the fusion heads ------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_modality_logits_sum_to_the_fused_logits_of_linear_heads(fusion):
    t = trainer("amco", [f"model.fusion={fusion}"])
    batch = next(iter(t.train_loader))
    amco = t.method.objective
    features = amco.encode(t.model, batch.inputs)
    d = amco.modality_logits(t.model, features)
    assert d.shape == (2, 32, 4)
    assert torch.allclose(d.sum(0), t.model.fuse(features), atol=1e-5)
    if fusion == "concat":  # d_m = W_m f_m + b/M
        weight, bias = t.model.fusion.linear.weight, t.model.fusion.linear.bias
        assert torch.allclose(d[0], features[STRONG] @ weight[:, :8].T + bias / 2, atol=1e-5)
    assert torch.allclose(amco.fuse(t.model, features), amco.mixer(d.sum(0)), atol=1e-5)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_nonlinear_fusion_heads_are_refused_in_one_line_and_heads_logits_work(fusion):
    with pytest.raises(ConfigError) as error:
        trainer("amco", [f"model.fusion={fusion}"])
    message = str(error.value)
    assert "\n" not in message and "amco.score_logits=fusion" in message and f"model.fusion={fusion}" in message
    t = trainer("amco[score_logits=heads]", [f"model.fusion={fusion}"])
    batch = next(iter(t.train_loader))
    amco = t.method.objective
    amco.dependent.copy_(torch.tensor([True, False]))
    at_position(t, epoch=1, step_in_epoch=1)
    record = t.train_step(batch)
    heads = t.model.heads(record.features)
    assert torch.allclose(amco.fuse(t.model, record.features), amco.mixer(heads[STRONG] + heads[WEAK]), atol=1e-6)
    assert set(record.losses) == {"fused", "co_opt"} and set(record.unimodal) == {STRONG, WEAK}
    assert all(p.grad is None for p in t.model.fusion.parameters())  # the fusion head is not read
    assert all(p.grad is not None for m in (STRONG, WEAK) for p in t.model.unimodal_heads[m].parameters())


@pytest.mark.parametrize("options, named", [
    ("sigma=1.5", "sigma"), ("epsilon=0", "epsilon"), ("ramp=linear", "ramp"), ("mask_space=inputs", "mask_space"),
    ("ramp_epochs=0", "ramp_epochs"), ("modulation_starts=3,modulation_ends=1", "modulation_ends"),
])
def test_config_errors_are_one_line(options, named):
    with pytest.raises(ConfigError) as error:
        trainer(f"amco[{options}]")
    assert "\n" not in str(error.value) and named in str(error.value)


# -- the dependent set -------------------------------------------------------------------------------------

def test_dependent_set_comes_from_the_previous_step_and_is_empty_at_epoch_start():
    t = trainer("amco[sigma=0.3]")  # masses near 0.5 each: both modalities exceed 0.3
    amco = t.method.objective
    batches = [b for _, b in zip(range(2), t.train_loader)]
    at_position(t, epoch=2, step_in_epoch=2)  # p_t = 1
    t.method.on_epoch_start(t.model, t.ctx)
    first = t.train_step(batches[0])
    # 𝒟 was empty for this step: nothing masked, although p_t = 1
    assert all(first.logs[f"amco/dependent/{m}"] == 0.0 and first.logs[f"amco/masked_units/{m}"] == 0.0 for m in (STRONG, WEAK))
    masses = torch.stack([first.logs[f"amco/mass/{m}"] for m in (STRONG, WEAK)])
    assert torch.allclose(masses.sum(), torch.tensor(1.0))
    assert amco.dependent.tolist() == (masses > 0.3).tolist() == [True, True]
    second = t.train_step(batches[1])
    assert second.logs[f"amco/dependent/{STRONG}"] == 1.0 and second.logs[f"amco/masked_units/{STRONG}"] == 4.0
    t.method.on_epoch_start(t.model, t.ctx)
    assert amco.dependent.tolist() == [False, False]


@pytest.mark.parametrize("rule, expected", [("step", [False, True]), ("sticky", [True, True])])
def test_step_replaces_the_set_and_sticky_keeps_it_until_the_epoch_ends(rule, expected):
    t = trainer(f"amco[dependence={rule}]")
    amco = t.method.objective
    amco.dependent.copy_(torch.tensor([True, False]))
    record = t.method.training_step(t.model, next(iter(t.train_loader)), t.ctx)
    record.shared["amco/masses"] = torch.tensor([0.2, 0.8])
    t.method.after_step(record, t.ctx)
    assert amco.dependent.tolist() == expected


# -- the window -------------------------------------------------------------------------------------------

def test_outside_the_window_the_loss_is_the_read_out_alone_and_with_identity_a_joint_gradient():
    # modulation_starts = 3, epoch 1: no co-optimisation term, no mask, 𝒟 not updated; with A = identity
    # z' = fuse(f) exactly, so every model gradient is joint training's
    plain, amco_t = trainer("joint"), trainer("amco[modulation_starts=3,mixer_init=identity,ramp=progress]")
    amco_t.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    grads = []
    for t in (plain, amco_t):
        at_position(t, epoch=1, step_in_epoch=3, global_step=9)
        t.method.on_epoch_start(t.model, t.ctx)
        if t is amco_t:
            t.method.objective.dependent.fill_(True)  # would mask everything if the window were open
        t._zero_grad()
        record = t.method.training_step(t.model, batch, t.ctx)
        record.loss.backward()
        t._finish_gradients(record)
        t.method.after_step(record, t.ctx)
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    assert set(record.losses) == {"fused", "probe"} and record.logs["amco/mask_ratio"] == 0.0
    assert t.method.objective.dependent.tolist() == [True, True]  # untouched outside the window
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# -- determinism, state, runs ------------------------------------------------------------------------------

def run(tmp_path, name, spec="amco", extra=()):
    config = build_config(overrides=[*TINY, *extra], method=spec)
    metrics = train_run(config, tmp_path / name, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


def test_runs_are_deterministic(tmp_path):
    spec = "amco[sigma=0.45,mask_space=features]"  # masks drawn in the second epoch
    first, lines_a = run(tmp_path, "a", spec)
    second, lines_b = run(tmp_path, "b", spec)
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    assert lines_a[1]["method"]["amco/mask_ratio"] > 0
    assert any(v > 0 for k, v in lines_a[1]["method"].items() if k.startswith("amco/masked_units/"))
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for key, value in last[0]["method"].items():
        assert torch.equal(value, last[1]["method"][key]), key
    assert any(key.endswith("mixer.weight") for key in last[0]["method"])
    assert any(key.endswith("dependent") for key in last[0]["method"])


@pytest.mark.parametrize("spec", ["amco[sigma=0.3]", "amco[sigma=0.3,mask_space=features,co_opt_unmasked=true]"])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(spec):
    first = trainer(spec)
    batches = [b for _, b in zip(range(3), first.train_loader)]

    def step(t, k, batch):
        at_position(t, epoch=1, step_in_epoch=k)  # p_t = 0, 0.5, 0.866: masks of growing size
        return t.train_step(batch)

    first.method.on_epoch_start(first.model, first.ctx)
    for k, batch in enumerate(batches[:2]):
        step(first, k, batch)
    assert first.method.objective.dependent.any()
    saved = copy.deepcopy({
        "model": first.model.state_dict(), "method": first.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in first.optimizers.items()},
        "generator": first.ctx.generator.get_state(),
    })
    expected = step(first, 2, batches[2])
    assert any(expected.logs[f"amco/masked_units/{m}"] > 0 for m in (STRONG, WEAK))

    fresh = trainer(spec)
    fresh.method.on_epoch_start(fresh.model, fresh.ctx)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    fresh.ctx.generator.set_state(saved["generator"])
    again = step(fresh, 2, batches[2])
    assert again.loss.item() == expected.loss.item()
    assert torch.equal(again.logits, expected.logits)
    assert torch.equal(fresh.method.objective.dependent, first.method.objective.dependent)


def test_arl_reads_the_amco_read_out():
    t = trainer("amco+arl[modulation_starts=0]")
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    amco = t.method.objective
    # ARL's unimodal predictions are fuse(f^{m}) of AMCo's read-out: A(fusion head on f^{m})
    readouts = zeroed_logits(lambda f: amco.mixer(t.model.fuse(f)), record.features, amco.modalities)
    expected = 4.0 * sum(F.cross_entropy(z, batch.labels) for z in readouts)
    assert record.losses["arl_unimodal"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert record.logs["arl/accelerating"] == 1.0


def test_ogm_ge_scores_come_from_the_amco_read_out():
    t = trainer("amco+ogm_ge")
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    scores = modality_scores(record.restricted_logits(), batch.labels)
    for k, m in enumerate(t.method.objective.modalities):
        assert record.logs[f"ogm_ge/score/{m}"].item() == pytest.approx(scores[k].item(), abs=1e-5)
    record.loss.backward()
    t._finish_gradients(record)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in (STRONG, WEAK) for p in t.ctx.params.encoder[m])


def test_compositions():
    assert [p.name for p in resolve("amco+arl+ogm_ge")] == ["amco", "arl", "ogm_ge"]
    with pytest.raises(ConfigError):
        resolve("amco+mmcosine")  # two objectives


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", ["amco", "amco+arl", "amco+ogm_ge", "amco[score_logits=heads,mask_space=features,ramp=progress]"])
def test_runs_two_epochs(spec, modalities, tmp_path):
    metrics, lines = run(tmp_path, "r", spec, M3 if modalities == 3 else ())
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    assert 0 <= metrics["test"]["accuracy"] <= 1
    names = [k.split("/")[-1] for k in lines[-1]["method"] if k.startswith("amco/mass/")]
    assert len(names) == modalities
    masses = sum(lines[-1]["method"][f"amco/mass/{m}"] for m in names)
    assert masses == pytest.approx(1.0, abs=1e-6)
    for plugin in ("arl", "ogm_ge"):
        if plugin in spec:
            assert any(key.startswith(f"{plugin}/") for key in lines[-1]["method"])
