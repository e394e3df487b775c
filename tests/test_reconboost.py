"""ReconBoost (an objective): the boosting loss and the memory-consolidation term by hand (the spec's
"Test it by"), the stage schedule, which parameters each phase moves, the step's losses against the model
read by hand, fresh per-phase optimizers and their rates, prediction with the boosted ensemble, config
errors, determinism, the state round trip in both phases, an exact resume after a real kill, and runs of
reconboost, reconboost+arl and reconboost+ogm_ge with M = 2 and 3."""

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
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.reconboost  # noqa: F401
from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.methods.reconboost import (
    boosting_loss,
    consolidation_loss,
    learners_added,
    stage_schedule,
    true_class_weights,
)
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.checkpoint import load_checkpoint

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
#: plain SGD with momentum and weight decay: a frozen parameter that the optimizer touched would move
SGD = ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9", "train.weight_decay=0.01", "train.epochs=6"]
LN2 = math.log(2)


def trainer(spec="reconboost", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def start_epoch(t, epoch):
    t.ctx.epoch = epoch
    t.method.on_epoch_start(t.model, t.ctx)


def end_epoch(t, epoch):
    t.ctx.epoch = epoch
    return t.method.on_epoch_end(t.model, t.ctx)


def objective(t):
    return t.method.objective


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def moved(module, before) -> dict[str, bool]:
    return {name: not torch.equal(p.detach(), before[name]) for name, p in module.named_parameters()}


def all_moved(module, before) -> bool:
    return all(moved(module, before).values())


def none_moved(module, before) -> bool:
    return not any(moved(module, before).values())


def logits_of(probabilities):
    return torch.tensor(probabilities).log()


# -- the spec's "Test it by" ---------------------------------------------------------------------------

def test_boosting_loss_of_the_spec_example():
    # C = 2, y = 0, q = (0.8, 0.2), p(h_m) = (0.5, 0.5): ℓ = ½ · (0.8 − 5) · log ½ = 2.1 · ln 2 = 1.455609
    logits = torch.zeros(1, 2, requires_grad=True)
    others = logits_of([[0.8, 0.2]])
    loss = boosting_loss(logits, torch.tensor([0]), others, w1=5.0, w2=1.0)
    assert loss.item() == pytest.approx(2.1 * LN2, abs=1e-6) and loss.item() == pytest.approx(1.4556, abs=1e-4)
    # ∂ℓ/∂z = −weight · (onehot(y) − p) = −2.1 · (0.5, −0.5) = (−1.05, 1.05): the true class is pushed up
    loss.backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-1.05, 1.05], abs=1e-6)


def test_the_others_probability_is_read_at_each_samples_own_label():
    # second sample: y = 1, q = (0.8, 0.2) ⇒ q_y = 0.2, weight (5 − 0.2)/2 = 2.4, ℓ = 2.4 ln 2 = 1.663553;
    # the batch mean is (1.455609 + 1.663553) / 2 = 1.559581 (reading q at the wrong slot would swap 2.1 and 2.4)
    others = logits_of([[0.8, 0.2], [0.8, 0.2]])
    labels = torch.tensor([0, 1])
    weight, q_true = true_class_weights(others, labels, 2, 5.0, 1.0)
    assert q_true.tolist() == pytest.approx([0.8, 0.2], abs=1e-6)
    assert weight.tolist() == pytest.approx([2.1, 2.4], abs=1e-6)
    loss = boosting_loss(torch.zeros(2, 2), labels, others)
    assert loss.item() == pytest.approx((2.1 + 2.4) / 2 * LN2, abs=1e-6)
    # per-sample weights (a plugin's batch.weight) weigh each ℓ_i before the mean: (2 · 1.455609 + 0) / 2
    weighted = boosting_loss(torch.zeros(2, 2), labels, others, sample_weight=torch.tensor([2.0, 0.0]))
    assert weighted.item() == pytest.approx(2.1 * LN2, abs=1e-6)


def test_a_sample_the_others_classify_perfectly_still_has_weight_w1_minus_w2_over_c():
    # q_y = 1 ⇒ weight (w1 − w2)/C = (5 − 1)/2 = 2 > 0; with p = (0.5, 0.5): ℓ = 2 ln 2 = 1.386294
    labels = torch.tensor([0])
    perfect = torch.tensor([[100.0, -100.0]])
    weight, q_true = true_class_weights(perfect, labels, 2)
    assert q_true.item() == 1.0 and weight.item() == 2.0
    assert boosting_loss(torch.zeros(1, 2), labels, perfect).item() == pytest.approx(2 * LN2, abs=1e-6)
    # no other learner yet (stage 0): the authors' placeholder has the same effect, q_y = 1
    weight, q_true = true_class_weights(None, labels, 2)
    assert q_true.item() == 1.0 and weight.item() == 2.0
    assert boosting_loss(torch.zeros(1, 2), labels, None).item() == pytest.approx(2 * LN2, abs=1e-6)
    # other weights: w1 = 4, w2 = 1, C = 4, q_y = 1 ⇒ 3/4
    assert true_class_weights(None, labels, 4, 4.0, 1.0)[0].item() == 0.75


def test_consolidation_term_by_hand_and_where_its_gradient_flows():
    # p = (0.5, 0.5), p' = (0.8, 0.2): MSE over the 2 elements = (0.3² + 0.3²)/2 = 0.09
    current = torch.zeros(1, 2, requires_grad=True)
    previous = logits_of([[0.8, 0.2]]).requires_grad_()
    loss = consolidation_loss(current, previous, "current")
    assert loss.item() == pytest.approx(0.09, abs=1e-6)
    loss.backward()
    # ∂L/∂p = (p − p') = (−0.3, 0.3); softmax Jacobian at (½, ½) is ¼·[[1, −1], [−1, 1]] ⇒ ∂L/∂z = (−0.15, 0.15)
    assert current.grad.flatten().tolist() == pytest.approx([-0.15, 0.15], abs=1e-6)
    assert previous.grad is None  # the previous learner is a fixed target
    official = consolidation_loss(current, previous, "none")
    assert official.item() == pytest.approx(0.09, abs=1e-6) and not official.requires_grad  # no effect on training
    # per-sample weights: mean_i w_i · mean_c (p − p')²: (2 · 0.09 + 0 · 0) / 2 = 0.09
    pair = consolidation_loss(torch.zeros(2, 2), logits_of([[0.8, 0.2], [0.5, 0.5]]), sample_weight=torch.tensor([2.0, 1.0]))
    assert pair.item() == pytest.approx(0.09, abs=1e-6)


def test_stage_schedule_by_hand():
    # E1 = 2, E2 = 1, M = 3: stages of 3 epochs, modalities round robin
    rows = [stage_schedule(e, 3, 2, 1) for e in range(10)]
    assert [r[0] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [r[1] for r in rows] == [1, 1, 2, 1, 1, 2, 1, 1, 2, 1]
    assert [r[2] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    assert [r[3] for r in rows] == [True, False, True, True, False, True, True, False, True, True]
    # E: a learner joins after its first phase 1
    assert [learners_added(e, 3, 2, 1) for e in (0, 1, 2, 3, 5, 6, 8, 9)] == [
        [False] * 3, [False] * 3, [True, False, False], [True, False, False],
        [True, True, False], [True, True, False], [True, True, True], [True, True, True],
    ]
    # BMM's 1 + 1 on two modalities; E2 = 0 (no rectification): every epoch is a new stage
    assert [stage_schedule(e, 2, 1, 1)[1:3] for e in range(4)] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert [stage_schedule(e, 2, 1, 0)[1:] for e in range(3)] == [(1, 0, True), (1, 1, True), (1, 0, True)]


# -- the steps in the trainer ------------------------------------------------------------------------

def test_each_phase_moves_only_its_own_learners():
    t = trainer(extra=SGD)
    rb = objective(t)
    encoders, head, boost = t.model.encoders, rb.shared_head, rb.boost
    batches = [b for _, b in zip(range(2), t.train_loader)]

    def step(epoch):
        start_epoch(t, epoch)
        before = {"strong": snapshot(encoders["strong"]), "weak": snapshot(encoders["weak"]), "head": snapshot(head),
                  "fusion": snapshot(t.model.fusion), "probes": snapshot(t.model.unimodal_heads), "boost": boost.detach().clone()}
        for batch in batches:
            t.train_step(batch)
        end_epoch(t, epoch)
        return before

    # stage 0, phase 1 (strong): its encoder and H learn; weak, β and the unused fusion head do not
    before = step(0)
    assert all_moved(encoders["strong"], before["strong"]) and all_moved(head, before["head"])
    assert none_moved(encoders["weak"], before["weak"]) and torch.equal(boost.detach(), before["boost"])
    assert none_moved(t.model.fusion, before["fusion"])
    assert all_moved(t.model.unimodal_heads, before["probes"])  # the detached probes, for the diagnostics
    # stage 0, phase 2: E = {strong}: strong, H and β learn; weak is not a learner yet
    before = step(1)
    assert all_moved(encoders["strong"], before["strong"]) and all_moved(head, before["head"])
    assert not torch.equal(boost.detach(), before["boost"])
    assert none_moved(encoders["weak"], before["weak"])
    # stage 1, phase 1 (weak): strong keeps its weights although it had momentum and weight decay a phase ago
    before = step(2)
    assert all_moved(encoders["weak"], before["weak"]) and all_moved(head, before["head"])
    assert none_moved(encoders["strong"], before["strong"]) and torch.equal(boost.detach(), before["boost"])
    # stage 1, phase 2: E = {strong, weak}: both encoders, H and β learn
    before = step(3)
    assert all_moved(encoders["strong"], before["strong"]) and all_moved(encoders["weak"], before["weak"])
    assert not torch.equal(boost.detach(), before["boost"])
    assert none_moved(t.model.fusion, before["fusion"])


def test_the_steps_losses_are_those_of_the_learners_read_by_hand():
    t = trainer(extra=SGD)
    rb = objective(t)
    batch = next(iter(t.train_loader))
    x, y = batch.inputs, batch.labels

    def learner(m):
        with torch.no_grad():
            return rb.shared_head(t.model.encoders[m](x[m]))

    # stage 0, phase 1 on strong: no other learner ⇒ (w1 − w2)/C · CE = (5 − 1)/4 · CE(H(f_strong), y); no GA term
    start_epoch(t, 0)
    expected = 1.0 * F.cross_entropy(learner("strong"), y)
    record = t.train_step(batch)
    assert set(record.losses) == {"boost", "probe"}
    assert record.losses["boost"].item() == pytest.approx(expected.item(), rel=1e-5)
    end_epoch(t, 0)
    # stage 1, phase 1 on weak: q = softmax(β H(f_strong)), GA = 0.5 · MSE(p(H(f_weak)), p(H(f_strong)))
    start_epoch(t, 2)
    beta = rb.boost.detach().clone()
    assert beta.item() == 1.0  # β has not learned yet (phase 2 has not run)
    others = beta * learner("strong")
    own = learner("weak")
    q_true = others.softmax(-1).gather(1, y[:, None]).squeeze(1)
    expected = ((5 - q_true) / 4 * -own.log_softmax(-1).gather(1, y[:, None]).squeeze(1)).mean()
    expected_ga = 0.5 * ((own.softmax(-1) - learner("strong").softmax(-1)) ** 2).mean()
    record = t.train_step(batch)
    assert set(record.losses) == {"boost", "ga", "probe"}
    assert record.losses["boost"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert record.losses["ga"].item() == pytest.approx(expected_ga.item(), rel=1e-5)
    assert record.logs["reconboost/q_true"].item() == pytest.approx(q_true.mean().item(), rel=1e-5)
    assert torch.allclose(record.logits, others + beta * own, atol=1e-5)  # the ensemble once weak joins
    # stage 1, phase 2: CE(β (H(f_strong) + H(f_weak)), y)
    start_epoch(t, 3)
    beta = rb.boost.detach().clone()
    expected = F.cross_entropy(beta * (learner("strong") + learner("weak")), y)
    record = t.train_step(batch)
    assert set(record.losses) == {"rectify", "probe"}
    assert record.losses["rectify"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ga_grad_none_adds_the_term_without_a_gradient():
    t = trainer("reconboost[ga_grad=none]", SGD)
    start_epoch(t, 2)
    record = t.method.training_step(t.model, next(iter(t.train_loader)), t.ctx)
    assert record.losses["ga"].item() > 0 and not record.losses["ga"].requires_grad
    off = trainer("reconboost[ga_weight=0]", SGD)
    start_epoch(off, 2)
    assert "ga" not in off.method.training_step(off.model, next(iter(off.train_loader)), off.ctx).losses


def test_every_phase_starts_with_a_fresh_optimizer_at_its_own_rate():
    t = trainer("reconboost[boosting_epochs=2,learner_lr=0.05,ensemble_lr=0.02]", SGD)
    optimizer = t.optimizers["main"]
    assert t.schedulers == {}  # lr_schedule=fixed: train.scheduler is not applied
    batch = next(iter(t.train_loader))
    rates = []
    for epoch in range(4):  # phase 1, phase 1, phase 2, phase 1 of the next stage
        start_epoch(t, epoch)
        rates.append(optimizer.param_groups[0]["lr"])
        first_of_phase = epoch != 1
        assert (len(optimizer.state) == 0) == first_of_phase  # momentum is kept only inside a phase
        t.train_step(batch)
        assert len(optimizer.state) > 0
        end_epoch(t, epoch)
    assert rates == [0.05, 0.05, 0.02, 0.05]
    unset = trainer("reconboost", SGD)
    start_epoch(unset, 1)
    assert unset.optimizers["main"].param_groups[0]["lr"] == 0.1  # train.lr
    scheduled = trainer("reconboost[lr_schedule=run]", [*SGD, "train.scheduler=step", "train.step_size=2"])
    assert set(scheduled.schedulers) == {"main"}


def test_prediction_is_the_boosted_ensemble_of_the_added_learners():
    t = trainer(extra=SGD)
    rb = objective(t)
    batch = next(iter(t.train_loader))
    features = t.model.encode(batch.inputs)
    with torch.no_grad():
        assert torch.equal(t.method.predict_from_features(t.model, features), torch.zeros(len(batch), 4))  # E = ∅
    start_epoch(t, 0)
    t.train_step(batch)
    end_epoch(t, 0)  # phase 1 is over: strong joins
    assert rb.members.tolist() == [True, False]
    with torch.no_grad():
        features = t.model.encode(batch.inputs)
        h = {m: rb.shared_head(f) for m, f in features.items()}
        assert torch.allclose(t.method.predict_from_features(t.model, features), rb.boost * h["strong"])
        rb.boost.fill_(0.5)
        rb.members.fill_(True)
        assert torch.allclose(t.method.predict_from_features(t.model, features), 0.5 * (h["strong"] + h["weak"]))
        # evaluation predicts with it
        correct = total = 0
        for b in t.val_loader:
            f = t.model.encode(b.inputs)
            correct += int((0.5 * (rb.shared_head(f["strong"]) + rb.shared_head(f["weak"]))).argmax(-1).eq(b.labels).sum())
            total += len(b)
    t.model.eval()
    assert t.evaluate("val")["accuracy"] == pytest.approx(correct / total)


def test_unimodal_heads_as_learners():
    t = trainer("reconboost[head=unimodal]", SGD)
    rb = objective(t)
    assert not hasattr(rb, "shared_head")
    batch = next(iter(t.train_loader))
    start_epoch(t, 0)
    heads = {m: snapshot(t.model.unimodal_heads[m]) for m in ("strong", "weak")}
    record = t.train_step(batch)
    assert set(record.losses) == {"boost"}  # the heads are the learners: no probe
    assert all_moved(t.model.unimodal_heads["strong"], heads["strong"])
    assert none_moved(t.model.unimodal_heads["weak"], heads["weak"])
    assert set(record.unimodal) == {"strong", "weak"}


def test_pretrained_learners_are_in_the_ensemble_from_the_start():
    t = trainer("reconboost[pretrained_learners=true]", SGD)
    rb = objective(t)
    start_epoch(t, 0)
    assert rb.members.tolist() == [True, True]
    batch = next(iter(t.train_loader))
    with torch.no_grad():
        others = rb.shared_head(t.model.encoders["weak"](batch.inputs["weak"]))
    record = t.train_step(batch)
    assert record.logs["reconboost/q_true"].item() == pytest.approx(
        others.softmax(-1).gather(1, batch.labels[:, None]).mean().item(), rel=1e-5)
    assert "ga" not in record.losses  # stage 0 has no previous learner to consolidate


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError) as error:
        trainer("reconboost[lr_schedule=run,learner_lr=0.01]")
    assert "\n" not in str(error.value) and "reconboost.learner_lr" in str(error.value)
    cls = METHODS.get("reconboost")
    part = cls(cls.Config(), ["a", "b"], 3)
    model = SimpleNamespace(feature_dims={"a": 8, "b": 16})
    with pytest.raises(ConfigError) as error:
        part.setup(model, None)
    assert "\n" not in str(error.value) and "reconboost.head=unimodal" in str(error.value)
    cls(cls.Config(head="unimodal"), ["a", "b"], 3).setup(model, None)  # unequal sizes are fine there


# -- the cross-method checks ----------------------------------------------------------------------------

def run(tmp_path, name, spec, extra=()):
    metrics = train_run(build_config(overrides=[*TINY, *extra], method=spec), tmp_path / name, quiet=True)
    lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


def test_runs_are_deterministic(tmp_path):
    first, lines_a = run(tmp_path, "a", "reconboost", ["train.epochs=4"])
    second, lines_b = run(tmp_path, "b", "reconboost", ["train.epochs=4"])
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    assert [l["train_loss"] for l in lines_a] == [l["train_loss"] for l in lines_b]
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for key, value in last[0]["method"].items():
        assert torch.equal(value, last[1]["method"][key]), key
    assert last[0]["method"]["parts.reconboost.members"].tolist() == [True, True]
    assert lines_a[-1]["method"]["reconboost/stage"] == 1.0


@pytest.mark.parametrize("epoch,options", [(0, ""), (1, ""), (2, ""), (3, ""), (1, "[boosting_epochs=3]")])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(epoch, options):
    spec = f"reconboost{options}"
    first = trainer(spec, SGD)
    batches = [b for _, b in zip(range(3), first.train_loader)]
    for e in range(epoch):  # earlier epochs, so E and the momentum are those of a real run
        start_epoch(first, e)
        first.train_step(batches[0])
        end_epoch(first, e)
    start_epoch(first, epoch)
    for batch in batches[:2]:
        first.train_step(batch)
    saved = copy.deepcopy({
        "model": first.model.state_dict(), "method": first.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in first.optimizers.items()},
    })
    expected = first.train_step(batches[2])

    fresh = trainer(spec, SGD)
    fresh.ctx.epoch = epoch  # a resumed run: the state is loaded after the trainer is built
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    if epoch == 1 and options:  # mid-phase: on_epoch_start must keep the loaded momentum
        start_epoch(fresh, epoch)
        assert len(fresh.optimizers["main"].state) > 0
    again = fresh.train_step(batches[2])
    assert again.loss.item() == expected.loss.item()
    assert torch.equal(again.logits, expected.logits)
    for (name, p), q in zip(first.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name


def test_killed_training_resumes_to_the_same_metrics(tmp_path):
    """A real SIGKILL after the first epoch's checkpoint (inside stage 0's phase 1 of 2 epochs), then ``train --resume``."""
    sets = [*TINY, "train.epochs=24", "synthetic.num_samples=600"]
    common = ["--method", "reconboost[boosting_epochs=2,rectification_epochs=2]", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mmbalance", "--quiet", "--import", "mmbalance.methods.reconboost", "train"]
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
    lines = [[json.loads(l)["method"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("full", "killed")]
    assert lines[0] == lines[1] and len(lines[0]) == 24


def test_arl_acts_inside_the_boosting_phase_without_reaching_the_frozen_learner():
    t = trainer("reconboost+arl[modulation_starts=0]", SGD)
    start_epoch(t, 0)
    t._zero_grad()
    record = t.method.training_step(t.model, next(iter(t.train_loader)), t.ctx)
    assert {"boost", "arl_unimodal", "probe"} <= set(record.losses)
    assert record.logs["arl/accelerating"] == 1.0
    record.loss.backward()
    t._finish_gradients(record)
    assert all(p.grad is None for p in t.ctx.params.encoder["weak"])
    assert objective(t).boost.grad is None
    assert all(p.grad is not None for p in t.ctx.params.encoder["strong"])


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("spec", ["reconboost", "reconboost+arl", "reconboost+ogm_ge"])
def test_runs_two_epochs(spec, modalities, tmp_path):
    metrics, lines = run(tmp_path, "r", spec, M3 if modalities == 3 else ())
    assert len(lines) == 2 and all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert [l["method"]["reconboost/phase"] for l in lines] == [1.0, 2.0]
    for plugin in ("arl", "ogm_ge"):
        if plugin in spec:
            assert any(key.startswith(f"{plugin}/") for key in lines[-1]["method"])


def test_three_modalities_take_turns():
    t = trainer("reconboost[rectification_epochs=0]", [*M3, *SGD])
    rb = objective(t)
    names = rb.modalities
    batch = next(iter(t.train_loader))
    for epoch in range(4):
        start_epoch(t, epoch)
        before = {m: snapshot(t.model.encoders[m]) for m in names}
        record = t.train_step(batch)
        active = names[epoch % 3]
        assert [all_moved(t.model.encoders[m], before[m]) for m in names] == [m == active for m in names]
        assert ("ga" in record.losses) == (epoch > 0)
        end_epoch(t, epoch)
        assert rb.members.tolist() == [k <= epoch for k in range(3)]
