"""UMT and UME (objectives with unimodal teachers): the distillation term and the ensemble by hand, the
spec's f_m=(1,2), teacher (0,0), λ=10 ⇒ 25 through a real step, frozen teachers (weights and batch-norm
statistics) after a step, teachers trained once (never again after a resume), exact resume of a run
killed while a teacher trains, no test-split reads, determinism, UME's diagnostics being its teachers',
teachers loaded from files, the window, and runs of umt+arl, umt+ogm_ge, ume+arl with M = 2 and 3."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import mmbalance.methods.umt  # noqa: F401
from mmbalance.config import build_config
from mmbalance.errors import ConfigError
from mmbalance.methods.umt import UMT, distillation_loss, distillation_terms, ensemble_logits
from mmbalance.methods.unimodal_teachers import TEACHER_PREFIX
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training import teachers as teacher_training

TINY = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
        "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16"]
THREE = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def config_for(method: str, *extra: str):
    return build_config(overrides=[*TINY, *extra], method=method)


def trainer_for(method: str, *extra: str) -> Trainer:
    return Trainer(config_for(method, *extra), None, quiet=True)


def first_batch(trainer: Trainer):
    return next(iter(trainer.train_loader))


def history(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


# -- the rules by hand ------------------------------------------------------------------------------
def test_distillation_term_by_hand():
    # the spec's line: f_m = (1, 2), teacher (0, 0), λ = 10: 10 · (1 + 4) / 2 = 25
    assert distillation_loss({"a": torch.tensor([[1.0, 2.0]])}, {"a": torch.zeros(1, 2)}, weight=10.0).item() == 25.0
    # two modalities, B = 2, different widths: every modality's MSE is over all its elements
    # a: f = [[1,2],[3,4]], t = 0: (1+4+9+16)/4 = 7.5;  b: one element differs by 2 of 6: 4/6
    features = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.ones(2, 3)}
    targets = {"a": torch.zeros(2, 2), "b": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0]])}
    terms = distillation_terms(features, targets)
    assert terms["a"].item() == 7.5 and terms["b"].item() == pytest.approx(4 / 6, abs=1e-7)
    assert distillation_loss(features, targets, weight=10.0).item() == pytest.approx(10 * (7.5 + 4 / 6), abs=1e-5)
    # per-sample weights (1, 0) as cross_entropy takes them: mean_i w_i · mean_j (f−t)²
    # a: per sample 2.5 and 12.5 → (2.5·1 + 12.5·0)/2 = 1.25;  b: 0 and 4/3 → 0
    weighted = distillation_terms(features, targets, torch.tensor([1.0, 0.0]))
    assert weighted["a"].item() == 1.25 and weighted["b"].item() == 0.0


def test_ensemble_by_hand_and_zeroed_modalities_drop_out():
    third = math.log(3.0)
    logits = {"a": torch.tensor([[0.0, third]]), "b": torch.tensor([[third, -third]])}
    # probabilities: a (1/4, 3/4), b (9/10, 1/10): mean (0.575, 0.425) → class 0
    probabilities = ensemble_logits(logits, "probabilities")
    assert torch.allclose(probabilities.softmax(-1), torch.tensor([[0.575, 0.425]]), atol=1e-6)
    assert torch.allclose(probabilities.exp().sum(-1), torch.ones(1), atol=1e-6)  # log-probabilities already
    # logits: mean (ln3/2, 0) → class 0 with p0 = √3/(1+√3)
    mean = ensemble_logits(logits, "logits")
    assert torch.allclose(mean, torch.tensor([[third / 2, 0.0]]), atol=1e-7)
    assert mean.softmax(-1)[0, 0].item() == pytest.approx(3 ** 0.5 / (1 + 3 ** 0.5), abs=1e-6)
    # a zeroed modality (its logits 0: uniform) leaves the other one's decision: a alone says class 1
    only_a = {"a": logits["a"], "b": torch.zeros(1, 2)}
    for mode in ("probabilities", "logits"):
        assert ensemble_logits(only_a, mode).argmax(-1).item() == 1


# -- a real step ------------------------------------------------------------------------------------
def constant_(encoder, value):
    """An MLP encoder whose output is ReLU(value) for every input: last layer weight 0, bias ``value``."""
    last = encoder.net[4]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(value))


def test_a_step_distils_the_spec_value_through_the_trainer():
    trainer = trainer_for("umt", "model.feature_dim=2")
    umt = trainer.method.objective
    teachers = umt.teachers
    teachers.ready.fill_(True)  # the teachers are set by hand below, not trained
    constant_(trainer.model.encoders["strong"], [1.0, 2.0])  # f_strong = (1, 2)
    constant_(teachers.teachers["strong"].encoder, [0.0, 0.0])  # teacher (0, 0): MSE 2.5
    constant_(trainer.model.encoders["weak"], [3.0, 3.0])  # f_weak equals its teacher's: MSE 0
    constant_(teachers.teachers["weak"].encoder, [3.0, 3.0])
    record = trainer.method.training_step(trainer.model, first_batch(trainer), trainer.ctx)
    assert record.losses["distil"].item() == 25.0  # λ = 10 (the default) · (2.5 + 0)
    assert record.logs["umt/mse/strong"].item() == 2.5 and record.logs["umt/mse/weak"].item() == 0.0
    assert set(record.losses) == {"fused", "distil", "probe"} and set(record.unimodal) == {"strong", "weak"}


def test_teachers_stay_frozen_weights_and_batch_norm_statistics():
    trainer = trainer_for("umt", "model.encoder=cnn")  # batch norm in every encoder
    teachers = trainer.method.objective.teachers
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)  # epoch 0: trains them (no run folder)
    assert bool(teachers.ready)
    trainer.model.train()
    trainer.method.train()
    assert not any(module.training for module in teachers.modules())
    optimized = {id(p) for group in trainer.ctx.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized or p.requires_grad for p in teachers.parameters())
    before = copy.deepcopy(teachers.state_dict())
    encoder_before = copy.deepcopy(trainer.model.encoders.state_dict())
    trainer.train_step(first_batch(trainer))
    after = teachers.state_dict()
    assert any("running_mean" in key for key in after)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    moved = trainer.model.encoders.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in encoder_before.items() if v.is_floating_point())


def test_teachers_start_from_the_students_weights_or_a_seeded_fresh_draw():
    student = trainer_for("umt")
    for m, encoder in student.model.encoders.items():
        teacher = student.method.objective.teachers.teachers[m].encoder.state_dict()
        assert all(torch.equal(teacher[k], v) for k, v in encoder.state_dict().items())
    fresh = [trainer_for("umt[teacher_init=fresh]") for _ in range(2)]
    for m, encoder in fresh[0].model.encoders.items():
        one, two = (t.method.objective.teachers.teachers[m].encoder.state_dict() for t in fresh)
        assert all(torch.equal(one[k], two[k]) for k in one)  # seeded: the same in every run
        assert any(not torch.equal(one[k], v) for k, v in encoder.state_dict().items())  # not the student's
    # the teachers' random numbers do not touch the run's stream: after setup it is joint's
    states = []
    for method in ("joint", "umt[teacher_init=fresh]", "ume"):
        trainer_for(method)
        states.append(torch.get_rng_state())
    assert all(torch.equal(state, states[0]) for state in states)


def test_outside_the_window_a_umt_step_is_a_joint_step():
    plain, umt = trainer_for("joint"), trainer_for("umt[modulation_starts=1]")
    umt.model.load_state_dict(plain.model.state_dict())
    batch = first_batch(plain)
    grads = []
    for trainer in (plain, umt):
        trainer.ctx.epoch = 0
        trainer._zero_grad()
        record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
        assert "distil" not in record.losses
        record.loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_ume_step_trains_nothing_and_records_the_ensemble_loss():
    trainer = trainer_for("ume")
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    before = copy.deepcopy(trainer.model.state_dict())
    teachers_before = copy.deepcopy(trainer.method.state_dict())
    batch = first_batch(trainer)
    record = trainer.train_step(batch)
    logits = trainer.method.objective.teachers.logits(batch.inputs)
    expected = torch.nn.functional.cross_entropy(ensemble_logits(logits), batch.labels)
    assert set(record.losses) == {"ensemble"} and torch.allclose(record.losses["ensemble"], expected)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(v, teachers_before[k]) for k, v in trainer.method.state_dict().items())


# -- runs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["umt", "ume"])
def test_teachers_are_trained_once_and_not_again_after_a_resume(method, tmp_path, monkeypatch):
    config = config_for(method)
    calls = []
    original = teacher_training.TeacherFit.__call__

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(teacher_training.TeacherFit, "__call__", counted)
    full = train_run(config, tmp_path / "full", quiet=True)
    assert calls == [TEACHER_PREFIX + "strong", TEACHER_PREFIX + "weak"]

    original_epoch = Trainer._train_epoch

    def stops_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.setattr(Trainer, "_train_epoch", original_epoch)
    calls.clear()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert calls == []  # the teachers came back from last.pt
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    assert history(tmp_path / "stopped") == history(tmp_path / "full")


@pytest.mark.parametrize("method", ["umt", "ume"])
def test_a_run_killed_while_a_teacher_trains_resumes_exactly(method, tmp_path, monkeypatch):
    config = config_for(f"{method}[teacher_epochs=3]")
    full = train_run(config, tmp_path / "full", quiet=True)
    original = teacher_training.TeacherFit.accuracy
    calls = {"n": 0}

    def killed_in_the_second_teacher(self, module, predict):
        calls["n"] += 1
        if calls["n"] == 5:  # 'strong' done (3 epochs), 'weak' killed after its second epoch's training
            raise KeyboardInterrupt
        return original(self, module, predict)

    monkeypatch.setattr(teacher_training.TeacherFit, "accuracy", killed_in_the_second_teacher)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "killed", quiet=True)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert (killed / "teachers" / f"{TEACHER_PREFIX}weak.pt").is_file() and not (killed / "last.pt").exists()
    resumed = resume_run(killed, quiet=True)
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    assert history(killed) == history(tmp_path / "full")


class Sentinel(torch.utils.data.Dataset):
    """The test split, refusing every read until the final report."""

    def __init__(self, base):
        self.base, self.labels, self.modalities = base, base.labels, base.modalities
        self.open = False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        assert self.open, "the test split was read during training"
        return self.base[i]

    def __getitems__(self, indices):
        assert self.open, "the test split was read during training"
        return self.base.__getitems__(indices)


@pytest.mark.parametrize("method", ["umt", "ume"])
def test_neither_teachers_nor_training_read_the_test_split(method, tmp_path, monkeypatch):
    from mmbalance.data.loading import load_dataset

    config = config_for(method)
    bundle = load_dataset(config)
    bundle.test = sentinel = Sentinel(bundle.test)
    original = Trainer.finish

    def finish(self):
        sentinel.open = True
        return original(self)

    monkeypatch.setattr(Trainer, "finish", finish)
    metrics = train_run(config, tmp_path / "r", quiet=True, bundle=bundle)
    assert metrics["test"]["num_samples"] == len(sentinel)


def test_runs_are_deterministic_and_umt_and_ume_share_their_teachers(tmp_path):
    for name in ("a", "b"):
        train_run(config_for("umt"), tmp_path / name, quiet=True)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    train_run(config_for("ume"), tmp_path / "ume", quiet=True)
    for m in ("strong", "weak"):
        files = [torch.load(tmp_path / run / "teachers" / f"{TEACHER_PREFIX}{m}.pt", weights_only=True)
                 for run in ("a", "b", "ume")]
        for saved in files[1:]:
            assert saved["state"]["best_epoch"] == files[0]["state"]["best_epoch"]
            assert all(torch.equal(saved["best"][k], v) for k, v in files[0]["best"].items())


def test_ume_predicts_with_its_teachers_and_its_diagnostics_are_theirs(tmp_path):
    trainer = Trainer(config_for("ume"), tmp_path / "r", quiet=True)
    initial = copy.deepcopy(trainer.model.state_dict())
    metrics = trainer.fit()
    assert all(torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())  # never trained
    teachers = trainer.method.objective.teachers
    correct = {"ensemble": 0, "strong": 0, "weak": 0}
    count = 0
    for batch in trainer.val_loader:
        logits = teachers.logits(batch.inputs)
        probabilities = torch.stack([z.softmax(-1) for z in logits.values()]).mean(0)
        correct["ensemble"] += int((probabilities.argmax(-1) == batch.labels).sum())
        for m, z in logits.items():
            correct[m] += int((z.argmax(-1) == batch.labels).sum())
        count += len(batch)
    val = metrics["val"]
    assert val["accuracy"] == correct["ensemble"] / count
    for m in ("strong", "weak"):
        assert val["modality_accuracy"][m] == val["unimodal_accuracy"][m] == correct[m] / count
    logged = history(tmp_path / "r")[0]["method"]
    for k, m in enumerate(("strong", "weak")):
        assert logged[f"ume/teacher_accuracy/{m}"] == float(teachers.accuracy[k]) > 0


def test_teachers_load_from_an_earlier_runs_files_instead_of_training(tmp_path, monkeypatch):
    trained = train_run(config_for("ume"), tmp_path / "trained", quiet=True)
    files = {m: str(tmp_path / "trained" / "teachers" / f"{TEACHER_PREFIX}{m}.pt") for m in ("strong", "weak")}
    option = "ume.teacher_checkpoints={" + ",".join(f"{m}: {p}" for m, p in files.items()) + "}"

    def never(*args, **kwargs):
        raise AssertionError("a loaded teacher was trained")

    monkeypatch.setattr(teacher_training.TeacherFit, "__call__", never)
    loaded = train_run(config_for("ume", option), tmp_path / "loaded", quiet=True)
    assert loaded["val"] == trained["val"] and loaded["test"] == trained["test"]
    assert history(tmp_path / "loaded")[0]["method"] == history(tmp_path / "trained")[0]["method"]


def test_user_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="umt.teacher_checkpoints: modality 'audio'"):
        trainer_for("umt", "umt.teacher_checkpoints={audio: x.pt}")
    with pytest.raises(ConfigError, match="teacher file for 'weak' not found"):
        trainer_for("ume", f"ume.teacher_checkpoints={{weak: {tmp_path / 'missing.pt'}}}")
    with pytest.raises(ConfigError):
        trainer_for("umt[modulation_starts=3,modulation_ends=1]")


def test_teacher_epochs_follow_train_epochs_and_are_pinned_when_a_run_is_extended():
    assert UMT.pinned_options(UMT.Config(), 7) == {"teacher_epochs": 7}
    assert UMT.pinned_options(UMT.Config(teacher_epochs=3), 7) == {}


@pytest.mark.parametrize("spec,modalities", [
    ("umt", 3), ("ume", 3), ("umt+arl[modulation_starts=0]", 2), ("umt+arl[modulation_starts=0]", 3),
    ("umt+ogm_ge", 2), ("ume+arl", 2), ("ume+ogm_ge", 3),
])
def test_compositions_and_three_modalities_train(spec, modalities, tmp_path):
    metrics = train_run(config_for(spec, *(THREE if modalities == 3 else [])), tmp_path / "r", quiet=True)
    rows = history(tmp_path / "r")
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r["method"].values())
    assert len(metrics["val"]["modality_accuracy"]) == modalities
    teachers = list((tmp_path / "r" / "teachers").iterdir())
    assert len(teachers) == modalities
    if spec.startswith("umt+arl"):
        assert rows[0]["method"]["arl/accelerating"] == 1.0 and "loss/distil" in rows[0]["method"]
