"""AUG (an objective): the spec's "Test it by" (loss terms, π, the residual, the M = 2 assignment), the M > 2
rule, the schedules, the step's losses against the learners read by hand, that new learners join the
optimizer and are trained (and stay at their initialisation under variant=code), the sequential step's use of
the updated H, prediction and readouts, the cap, config errors, determinism, the state round trip after a
learner joined, an exact resume of a stopped run, and runs of aug, aug+arl, aug+ogm_ge with M = 2 and 3."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.aug  # noqa: F401
from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.methods.aug import (
    assign_learners,
    assignment_due,
    ensemble_loss,
    residual_loss,
    weighted_prediction,
)
from mmbalance.models.multimodal import zero_out
from mmbalance.training import Trainer, train_run
from mmbalance.training.checkpoint import load_checkpoint

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
#: SGD with momentum and weight decay: a parameter the optimizer touched without a gradient would move
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=0.01"]
SMALL = "hidden_dim=16,max_learners=4"


def trainer(spec="aug", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def objective(t):
    return t.method.objective


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def moved(module, before) -> bool:
    return all(not torch.equal(p.detach(), before[name]) for name, p in module.named_parameters())


def unmoved(module, before) -> bool:
    return all(torch.equal(p.detach(), before[name]) for name, p in module.named_parameters())


def end_epoch(t, epoch, scores):
    """Run the assignment of ``epoch`` on forged scores s_m (sums), as if the epoch had produced them."""
    aug = objective(t)
    aug.scores.copy_(torch.tensor(scores, dtype=torch.float64))
    aug.seen.fill_(100.0)
    t.ctx.epoch = epoch
    return aug.on_epoch_end(t.model, t.ctx)


# -- the spec's "Test it by" -------------------------------------------------------------------------------

# n = 2, C = 2, y = [0, 1], λ = 0.5, q₁ = [[1,0],[0,0]], q₂ = [[0,0],[1,0]]
Q = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
Y = torch.tensor([0, 1])


def test_loss_terms_of_the_spec_example():
    # o = q₁ + q₂ = [[1,0],[1,0]]: CE = −log(e/(1+e)) = 0.313262 (y=0), −log(1/(1+e)) = 1.313262 (y=1), mean 0.813262
    # P = q₁: (0.313262 + ln 2) / 2 = 0.503204; π = p(P)[y] = (e/(1+e), ½) = (0.731059, 0.5)
    # residual (R = q₂): (1 − ½·0.731059)·ln 2 = 0.439782 and (1 − ½·½)·1.313262 = 0.984946, mean 0.712364
    terms = ensemble_loss(Q, Y, 0.5)
    assert terms["ensemble"].item() == pytest.approx(0.813262, abs=1e-6)
    assert terms["previous"].item() == pytest.approx(0.503204, abs=1e-6)
    assert terms["pi"].tolist() == pytest.approx([0.731059, 0.5], abs=1e-6)
    assert terms["residual"].item() == pytest.approx(0.712364, abs=1e-6)
    total = terms["ensemble"] + terms["previous"] + terms["residual"]
    assert total.item() == pytest.approx(2.028830, abs=1e-6)
    # the slots matter: swapping the learners (P = q₂, R = q₁) gives other numbers
    # P = q₂: CE = (ln 2 + 1.313262)/2 = 1.003204; π = (½, 0.268941); residual ((1−¼)·0.313262 + (1−0.134471)·ln 2)/2
    swapped = ensemble_loss(Q.flip(0), Y, 0.5)
    assert swapped["previous"].item() == pytest.approx(1.003204, abs=1e-6)
    assert swapped["residual"].item() == pytest.approx((0.75 * 0.313262 + (1 - 0.5 * 0.268941) * math.log(2)) / 2, abs=1e-6)


def test_residual_per_sample_and_with_sample_weights():
    # per-sample weights (a plugin's batch.weight) weigh each term before the mean: (2·0.439782 + 0)/2
    loss, pi = residual_loss(Q[0], Q[1], Y, 0.5, weight=torch.tensor([2.0, 0.0]))
    assert loss.item() == pytest.approx(0.439782, abs=1e-6)
    loss, _ = residual_loss(Q[0], Q[1], Y, 0.5, weight=torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx(0.984946, abs=1e-6)
    # λ = 0: plain CE of R, ((ln 2) + 1.313262)/2 = 1.003204; the target's π is detached
    loss, _ = residual_loss(Q[0], Q[1], Y, 0.0)
    assert loss.item() == pytest.approx(1.003204, abs=1e-6)
    previous = Q[0].clone().requires_grad_()
    newest = Q[1].clone().requires_grad_()
    residual_loss(previous, newest, Y, 0.5)[0].backward()
    assert previous.grad is None and newest.grad is not None


def test_one_learner_is_plain_cross_entropy():
    terms = ensemble_loss(Q[:1], Y, 0.5)
    assert terms["ensemble"].item() == pytest.approx(0.503204, abs=1e-6)
    assert terms["previous"].item() == 0.0 and terms["residual"].item() == 0.0 and terms["pi"] is None


def test_assignment_of_the_spec_example():
    # s_a = 40, s_v = 30: r = 1.3333 > σ + τ = 1.01 → v (index 1) gets a learner
    assert assign_learners([40.0, 30.0], 1.0, 0.01) == [1]
    # s_a = 30, s_v = 30.2: r = 0.993377 ∈ [0.99, 1.01] → nothing
    assert assign_learners([30.0, 30.2], 1.0, 0.01) == []
    # s_a = 30, s_v = 40: r = 0.75 < 0.99 → a (index 0)
    assert assign_learners([30.0, 40.0], 1.0, 0.01) == [0]
    # the difference reading of the paper: 30 − 30.2 = −0.2 < −τ → a, where the ratio sees a dead zone
    assert assign_learners([30.0, 30.2], 1.0, 0.01, comparison="difference") == [0]
    assert assign_learners([30.0, 30.005], 1.0, 0.01, comparison="difference") == []
    # a modality that got nothing right: x / 0 = ∞ → it gets the learner; 0 / 0 → nothing
    assert assign_learners([5.0, 0.0]) == [1] and assign_learners([0.0, 0.0]) == []


def test_assignment_for_more_modalities():
    # weakest: max / min = 40 / 20 = 2 > 1.01 → argmin (index 2)
    assert assign_learners([30.0, 40.0, 20.0]) == [2]
    # 30.2 / 30 = 1.006667 < 1.01 → nothing; with τ = 0 → the weakest (index 0)
    assert assign_learners([30.0, 30.1, 30.2]) == []
    assert assign_learners([30.0, 30.1, 30.2], tau=0.0) == [0]
    # difference: 30.2 − 30 = 0.2 > 0.01 → index 0
    assert assign_learners([30.0, 30.1, 30.2], comparison="difference") == [0]
    # the deleted script: s_m / Σ_{k≠m} s_k = 10/70 = 0.143, 40/40 = 1, 30/50 = 0.6 → only index 0 (< 0.4)
    assert assign_learners([10.0, 40.0, 30.0], many_rule="script") == [0]
    # 5/75 = 0.067 and 10/70 = 0.143 both below 0.4 → both get one; 60/15 = 4
    assert assign_learners([5.0, 10.0, 60.0], many_rule="script") == [0, 1]


def test_assignment_schedules():
    # t_N = 3: paper after epochs 2, 5, 8 (0-based); code also after epoch 0
    assert [e for e in range(9) if assignment_due(e, 3, "paper")] == [2, 5, 8]
    assert [e for e in range(9) if assignment_due(e, 3, "code")] == [0, 2, 5, 8]
    assert [e for e in range(3) if assignment_due(e, 1)] == [0, 1, 2]


def test_no_assignment_after_the_last_epoch_under_the_papers_schedule():
    # t_N = 10, 20 epochs: the paper's schedule assigns after epoch 9 only (after 19 the learner would never
    # train); the code's after 0, 9 and 19; assign_stop overrides; an extended run keeps its original stop
    paper = trainer(f"aug[{SMALL}]", ["train.epochs=20"])
    code = trainer(f"aug[{SMALL},variant=code]", ["train.epochs=20"])
    for t, added in ((paper, [9]), (code, [0, 9, 19])):
        got = [e for e in (0, 9, 19) if end_epoch(t, e, [40.0, 30.0])["aug/added/weak"] == 1.0]
        assert got == added
    cls = type(objective(paper))
    assert cls.pinned_options(objective(paper).config, 20) == {"assign_stop": 19}
    assert cls.pinned_options(objective(code).config, 20) == {"assign_stop": 20}
    late = trainer(f"aug[{SMALL},assign_stop=20]", ["train.epochs=20"])
    assert end_epoch(late, 19, [40.0, 30.0])["aug/added/weak"] == 1.0
    assert cls.pinned_options(objective(late).config, 20) == {}


# -- the objective in the trainer ------------------------------------------------------------------------

def test_the_assignment_in_on_epoch_end_adds_to_the_weaker_modality():
    t = trainer(f"aug[{SMALL},assign_period=2]", ["train.epochs=10"])
    aug = objective(t)
    assert aug.counts.tolist() == [1, 1]
    logs = end_epoch(t, 0, [40.0, 30.0])  # not due after epoch 0 (paper schedule, t_N = 2)
    assert aug.counts.tolist() == [1, 1] and logs["aug/added/weak"] == 0.0
    logs = end_epoch(t, 1, [40.0, 30.0])  # due: r = 1.3333 → the second modality
    assert aug.counts.tolist() == [1, 2]
    assert logs["aug/added/weak"] == 1.0 and logs["aug/learners/weak"] == 2.0 and logs["aug/ratio"] == pytest.approx(4 / 3)
    assert logs["aug/score/strong"] == pytest.approx(0.4) and logs["aug/score/weak"] == pytest.approx(0.3)
    assert aug.scores.tolist() == [0.0, 0.0] and aug.seen.item() == 0.0  # the next epoch starts afresh
    end_epoch(t, 3, [30.0, 30.2])  # dead zone
    assert aug.counts.tolist() == [1, 2]
    end_epoch(t, 5, [30.0, 40.0])
    assert aug.counts.tolist() == [2, 2]
    # the code's schedule also assigns after epoch 0
    code = trainer(f"aug[{SMALL},assign_period=2,assign_schedule=code]", ["train.epochs=10"])
    end_epoch(code, 0, [40.0, 30.0])
    assert objective(code).counts.tolist() == [1, 2]


def test_the_cap_is_logged_and_adds_nothing():
    t = trainer("aug[hidden_dim=16,max_learners=2,assign_period=1]", ["train.epochs=10"])
    end_epoch(t, 0, [40.0, 30.0])
    with pytest.warns(UserWarning, match="already has aug.max_learners=2"):
        logs = end_epoch(t, 1, [40.0, 30.0])
    assert objective(t).counts.tolist() == [1, 2]
    assert logs["aug/capped/weak"] == 1.0 and logs["aug/added/weak"] == 0.0 and logs["aug/capped/strong"] == 0.0


def test_scores_are_the_epochs_true_class_probabilities_of_the_ensembles():
    t = trainer(f"aug[{SMALL}]")
    aug = objective(t)
    t.ctx.epoch = 0
    aug.on_epoch_start(t.model, t.ctx)
    batches = [b for _, b in zip(range(2), t.train_loader)]
    expected = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        with torch.no_grad():  # s_m is read from the step's forward pass, before its update
            features = t.model.encode(batch.inputs)
            for k, m in enumerate(aug.modalities):
                o = aug.learner_logits(m, features[m], 1).sum(0)
                expected[k] += o.softmax(-1).gather(-1, batch.labels[:, None]).sum().double()
        t.train_step(batch)
    assert torch.allclose(aug.scores, expected, atol=1e-5)
    assert aug.seen.item() == sum(len(b) for b in batches)


def test_the_steps_losses_are_those_of_the_learners_read_by_hand():
    t = trainer(f"aug[{SMALL},lam=0.33]")
    aug = objective(t)
    aug.counts.copy_(torch.tensor([1, 3]))
    batch = next(iter(t.train_loader))
    record = t.method.training_step(t.model, batch, t.ctx)
    features = t.model.encode(batch.inputs)
    head = aug.shared_head
    by_hand = {}
    for m, n in zip(aug.modalities, (1, 3)):
        q = torch.stack([head(torch.relu(aug.learners[m][j](features[m]))) for j in range(n)])
        by_hand[m] = q
    strong = F.cross_entropy(by_hand["strong"][0], batch.labels)
    weak_o = by_hand["weak"].sum(0)
    weak_p = by_hand["weak"][:2].sum(0)
    pi = weak_p.softmax(-1).gather(-1, batch.labels[:, None]).squeeze(-1)
    residual = ((1 - 0.33 * pi) * -by_hand["weak"][2].log_softmax(-1).gather(-1, batch.labels[:, None]).squeeze(-1)).mean()
    assert record.losses["ensemble"].item() == pytest.approx((strong + F.cross_entropy(weak_o, batch.labels)).item(), abs=1e-6)
    assert record.losses["previous"].item() == pytest.approx(F.cross_entropy(weak_p, batch.labels).item(), abs=1e-6)
    assert record.losses["residual"].item() == pytest.approx(residual.item(), abs=1e-6)
    assert record.logs["aug/pi/weak"].item() == pytest.approx(pi.mean().item(), abs=1e-6)
    assert "aug/pi/strong" not in record.logs
    # the record: unimodal = o_m, logits = Σ_m ½ o_m
    assert torch.allclose(record.unimodal["weak"], weak_o, atol=1e-6)
    assert torch.allclose(record.logits, (by_hand["strong"][0] + weak_o) / 2, atol=1e-6)


def test_new_learners_join_the_optimizer_and_are_trained():
    t = trainer(f"aug[{SMALL},assign_period=1]", [*SGD, "train.epochs=10"])
    aug = objective(t)
    optimizer = t.optimizers["main"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in aug.parameters())  # preallocated: every learner from the start
    batches = [b for _, b in zip(range(3), t.train_loader)]
    t.ctx.epoch = 0
    aug.on_epoch_start(t.model, t.ctx)
    for batch in batches:
        t.train_step(batch)
    end_epoch(t, 0, [40.0, 30.0])
    assert aug.counts.tolist() == [1, 2]
    weak, strong = aug.learners["weak"], aug.learners["strong"]
    before = {"new": snapshot(weak[1]), "unused": snapshot(weak[2]), "strong_unused": snapshot(strong[1]),
              "first": snapshot(weak[0]), "head": snapshot(aug.shared_head)}
    assert all(p not in optimizer.state for p in weak[1].parameters())  # no state before its first step
    t.ctx.epoch = 1
    aug.on_epoch_start(t.model, t.ctx)
    for batch in batches:
        t.train_step(batch)
    assert moved(weak[1], before["new"]) and moved(weak[0], before["first"]) and moved(aug.shared_head, before["head"])
    assert all(p in optimizer.state for p in weak[1].parameters())
    # learners not yet in an ensemble: no gradient, so no momentum or weight decay moves them
    assert unmoved(weak[2], before["unused"]) and unmoved(strong[1], before["strong_unused"])
    assert all(p not in optimizer.state for p in [*weak[2].parameters(), *strong[1].parameters()])
    # the model's own fusion head and unimodal heads are unused
    assert all(p not in optimizer.state for p in [*t.model.fusion.parameters(), *t.model.unimodal_heads.parameters()])


def test_the_codes_new_learners_stay_at_their_initialisation():
    t = trainer(f"aug[{SMALL},variant=code]", SGD)
    aug = objective(t)
    assert aug.manual_optimization and t.method.manual_optimization
    optimizer = t.optimizers["main"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for m in aug.modalities:
        assert all(id(p) in in_optimizer for p in aug.learners[m][0].parameters())
        assert all(id(p) not in in_optimizer for j in range(1, 4) for p in aug.learners[m][j].parameters())
    aug.counts.copy_(torch.tensor([1, 2]))
    weak = aug.learners["weak"]
    before = {"new": snapshot(weak[1]), "first": snapshot(weak[0]), "head": snapshot(aug.shared_head),
              "encoder": snapshot(t.model.encoders["weak"])}
    record = None
    for _, batch in zip(range(3), t.train_loader):
        record = t.train_step(batch)
    assert unmoved(weak[1], before["new"]) and all(p.grad is None for p in weak[1].parameters())
    # yet it is part of the ensemble: the residual term exists and reaches the first learner, H and the encoder
    assert record.losses["residual"].item() > 0
    assert moved(weak[0], before["first"]) and moved(aug.shared_head, before["head"])
    assert moved(t.model.encoders["weak"], before["encoder"])
    # the same without the rest of the variant: train_new_learners=false alone, one step per batch
    alone = trainer(f"aug[{SMALL},train_new_learners=false]", SGD)
    assert not alone.method.manual_optimization
    assert not any(p.requires_grad for p in objective(alone).learners["weak"][1].parameters())


def test_sequential_steps_use_the_head_the_previous_modality_left():
    # plain SGD (no momentum, no decay): after modality a's step H₁ = H₀ − lr ∇_H L_a, and L_v is read with H₁
    sgd = ["train.optimizer=sgd", "train.lr=0.5", "train.momentum=0.0", "train.weight_decay=0.0"]
    t = trainer(f"aug[{SMALL},optimization=sequential]", sgd)
    aug = objective(t)
    aug.counts.copy_(torch.tensor([2, 1]))
    batch = next(iter(t.train_loader))
    model, head = copy.deepcopy(t.model), copy.deepcopy(aug.shared_head)
    learners = copy.deepcopy(aug.learners)
    features = model.encode(batch.inputs)

    def logits(m, n, h):
        return torch.stack([h(torch.relu(learners[m][j](features[m]))) for j in range(n)])

    terms = ensemble_loss(logits("strong", 2, head), batch.labels, 0.5)
    loss_a = terms["ensemble"] + terms["previous"] + terms["residual"]
    grads = torch.autograd.grad(loss_a, list(head.parameters()))
    with torch.no_grad():
        for p, g in zip(head.parameters(), grads):
            p -= 0.5 * g
    loss_v = ensemble_loss(logits("weak", 1, head), batch.labels, 0.5)["ensemble"]
    record = t.train_step(batch)
    assert record.logs["aug/loss/strong"].item() == pytest.approx(loss_a.item(), abs=1e-6)
    assert record.logs["aug/loss/weak"].item() == pytest.approx(loss_v.item(), abs=1e-6)
    # M optimizer steps per batch: with AdamW, H has stepped twice, each encoder once
    adam = trainer(f"aug[{SMALL},variant=code]")
    adam.train_step(batch)
    state = adam.optimizers["main"].state
    assert state[objective(adam).shared_head.weight]["step"].item() == 2
    assert all(state[p]["step"].item() == 1 for p in adam.model.encoders["weak"].parameters())


def test_sequential_plugins_after_backward_runs_once_per_sub_step(register_part):
    from mmbalance.methods.base import Plugin

    seen = []

    @register_part("_aug_sub_steps")
    class SubSteps(Plugin):
        """Records what each after_backward call sees."""

        def after_backward(self, record, ctx):
            with_grad = {m for m, ps in ctx.params.encoder.items() if any(p.grad is not None for p in ps)}
            seen.append((record.shared.get("aug/modality"), with_grad))

    t = trainer(f"aug[{SMALL},variant=code]+_aug_sub_steps", M3)
    t.train_step(next(iter(t.train_loader)))
    assert seen == [(m, {m}) for m in t.bundle.modalities]


def test_prediction_and_readouts_by_hand():
    t = trainer(f"aug[{SMALL},fusion_weights=[0.4,0.6]]")
    aug = objective(t)
    aug.counts.copy_(torch.tensor([2, 1]))
    batch = next(iter(t.train_loader))
    with torch.no_grad():
        features = t.model.encode(batch.inputs)
        o = {m: aug.learner_logits(m, features[m], n).sum(0) for m, n in zip(aug.modalities, (2, 1))}
        assert torch.allclose(t.method.predict_from_features(t.model, features), 0.4 * o["strong"] + 0.6 * o["weak"], atol=1e-6)
        heads = t.method.heads(t.model, features)
        assert all(torch.allclose(heads[m], o[m]) for m in aug.modalities)
        # modality-only: the other modality's features are zeroed, its ensemble adds the constant w_k o_k(0)
        only = t.method.fuse(t.model, zero_out(features, ["strong"]))
        constant = 0.6 * aug.shared_head(torch.relu(aug.learners["weak"][0].bias))
        assert torch.allclose(only, 0.4 * o["strong"] + constant, atol=1e-6)
        assert torch.allclose(only - only[:1], 0.4 * (o["strong"] - o["strong"][:1]), atol=1e-6)  # same offset for all
    assert weighted_prediction(torch.ones(2, 1, 3), torch.tensor([0.25, 0.5])).tolist() == [[0.75, 0.75, 0.75]]
    # uniform by default: ½ each
    plain = trainer(f"aug[{SMALL}]")
    assert objective(plain).fusion.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0]])
def test_bad_fusion_weights_are_refused_in_one_line(weights):
    with pytest.raises(ConfigError, match="aug.fusion_weights=.* must hold 2 weights"):
        trainer(f"aug[fusion_weights={weights}]".replace(" ", ""))


# -- the cross-method checks (§16) ----------------------------------------------------------------------------

def run(tmp_path, name, spec, extra=()):
    metrics = train_run(build_config(overrides=[*TINY, *extra], method=spec), tmp_path / name, quiet=True)
    lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


ADDING = f"aug[{SMALL},assign_period=1,tau=0.0]"  # τ = 0: every epoch adds a learner somewhere
FAST = ["train.lr=0.01", "train.epochs=3"]


def test_runs_are_deterministic(tmp_path):
    first, lines_a = run(tmp_path, "a", ADDING, FAST)
    second, lines_b = run(tmp_path, "b", ADDING, FAST)
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    assert [l["train_loss"] for l in lines_a] == [l["train_loss"] for l in lines_b]
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for key, value in last[0]["method"].items():
        assert torch.equal(value, last[1]["method"][key]), key
    assert last[0]["method"]["parts.aug.counts"].sum().item() == 2 + 2  # one learner per epoch but the last


@pytest.mark.parametrize("options", ["", ",variant=code"])
def test_state_round_trip_after_a_learner_joined_reproduces_the_next_step(options):
    spec = f"aug[{SMALL},assign_period=1{options}]"
    first = trainer(spec, [*SGD, "train.epochs=10"])
    batches = [b for _, b in zip(range(3), first.train_loader)]
    first.ctx.epoch = 0
    objective(first).on_epoch_start(first.model, first.ctx)
    first.train_step(batches[0])
    end_epoch(first, 0, [40.0, 30.0])  # the second modality gets its second learner
    first.ctx.epoch = 1
    objective(first).on_epoch_start(first.model, first.ctx)
    for batch in batches[:2]:
        first.train_step(batch)
    saved = copy.deepcopy({
        "model": first.model.state_dict(), "method": first.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in first.optimizers.items()},
    })
    expected = first.train_step(batches[2])

    fresh = trainer(spec, [*SGD, "train.epochs=10"])
    fresh.ctx.epoch = 1
    objective(fresh).on_epoch_start(fresh.model, fresh.ctx)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    assert objective(fresh).counts.tolist() == [1, 2]
    again = fresh.train_step(batches[2])
    assert again.loss.item() == expected.loss.item()
    assert torch.equal(again.logits, expected.logits)
    for (name, p), q in zip(first.method.named_parameters(), fresh.method.parameters()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(first.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(objective(first).scores, objective(fresh).scores)


def test_a_stopped_run_resumes_to_the_same_metrics_after_learners_joined(tmp_path, monkeypatch):
    from mmbalance.training import resume_run

    config = build_config(overrides=[*TINY, *SGD, "train.epochs=4"], method=ADDING)
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def stops_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["method"]["parts.aug.counts"].sum().item() == 4
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    lines = [[json.loads(l)["method"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("full", "stopped")]
    assert lines[0] == lines[1] and len(lines[0]) == 4
    states = [load_checkpoint(tmp_path / name / "last.pt")["method"] for name in ("full", "stopped")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", [ADDING, f"{ADDING}+arl[modulation_starts=0]", f"{ADDING}+ogm_ge",
                                  f"aug[{SMALL},variant=code,assign_period=1,tau=0.0]"])
def test_runs_two_epochs(spec, modalities, tmp_path):
    metrics, lines = run(tmp_path, "r", spec, M3 if modalities == 3 else ())
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    names = metrics["modalities"]
    assert len(names) == modalities and len(metrics["test"]["modality_accuracy"]) == modalities
    assert set(metrics["val"]["unimodal_accuracy"]) == set(names)
    assert 0 <= metrics["test"]["accuracy"] <= 1
    # one learner after every epoch but the last (the code's schedule: after the last too)
    assert sum(lines[-1]["method"][f"aug/learners/{m}"] for m in names) == modalities + (2 if "code" in spec else 1)
    for plugin in ("arl", "ogm_ge"):
        if f"+{plugin}" in spec:
            assert any(key.startswith(f"{plugin}/") for key in lines[-1]["method"])
    if "+arl" in spec:
        assert "loss/arl_unimodal" in lines[-1]["method"]


def test_arl_reads_the_ensembles_and_reaches_the_encoders():
    t = trainer(f"aug[{SMALL}]+arl[modulation_starts=0]", SGD)
    t.ctx.epoch = 0
    t._zero_grad()
    record = t.method.training_step(t.model, next(iter(t.train_loader)), t.ctx)
    assert {"ensemble", "previous", "residual", "arl_unimodal"} <= set(record.losses)
    # ARL's unimodal predictions are fuse(f^{m}) = w_m o_m + the zeroed modality's constant
    aug = objective(t)
    with torch.no_grad():
        only = aug.fuse(t.model, zero_out(record.features, ["weak"]))
    assert torch.allclose(record.zeroed_logits()[1].detach(), only, atol=1e-6)
    record.loss.backward()
    t._finish_gradients(record)
    assert all(p.grad is not None for m in aug.modalities for p in t.ctx.params.encoder[m])
    assert all(p.grad is None for p in t.ctx.params.fusion)


def test_under_sequential_optimisation_a_plugins_forward_pass_work_changes_nothing():
    # ARL acts in on_forward, which runs after the sub-steps on a detached record: documented as inert there
    batches = [b for _, b in zip(range(2), trainer(f"aug[{SMALL}]").train_loader)]
    alone, composed = trainer(f"aug[{SMALL},variant=code]", SGD), trainer(f"aug[{SMALL},variant=code]+arl[modulation_starts=0]", SGD)
    for t in (alone, composed):
        t.ctx.epoch = 0
        for batch in batches:
            record = t.train_step(batch)
    assert "arl_unimodal" in record.losses
    for (name, p), q in zip(alone.method.named_parameters(), composed.method.named_parameters()):
        assert torch.equal(p, q[1]), name
    for (name, p), q in zip(alone.model.named_parameters(), composed.model.parameters()):
        assert torch.equal(p, q), name
