"""G²D (objective ``g2d``) and its Sequential Modality Prioritization (plugin ``g2d_smp``): the spec's hand
values (BASELINES-2025 §2), the freeze variants, the window, teachers trained once and resumed exactly, the
§16 checks, compositions (g2d+arl, g2d+ogm_ge, the refusal of g2d+g2d_smp; joint+g2d_smp and midas+g2d_smp
with the plugin's own teachers) and three modalities."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import mmbalance.methods.g2d  # noqa: F401  (registration)
import mmbalance.methods.g2d_smp  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import Method
from mmbalance.methods.g2d import (
    CONFIDENCE,
    G2D,
    feature_distillation,
    g2d_loss,
    logit_distillation,
    prioritization,
    smp_window,
    teacher_confidence,
)
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.parameters import ParameterGroups
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
TINY3 = [o for o in TINY if not o.startswith("synthetic.dims")] + ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]

# -- the spec's hand batch: M = 2, C = 3, y = [0, 2], z = 0 --------------------------------------------------
# l^T_a = [[2,0,0],[0,0,1]]: p = [e², 1, 1] / (e² + 2) = [0.786986, 0.106507, 0.106507] and
#                            p = [1, 1, e] / (2 + e)   = [0.211942, 0.211942, 0.576117]
# l^T_v = [[0,0,0],[1,0,0]]: p = [1/3, 1/3, 1/3] and [0.576117, 0.211942, 0.211942]
# ρ_a = 0.786986 + 0.576117 = 1.363103; ρ_v = 0.333333 + 0.211942 = 0.545275 (v is weaker: κ_a = 0, κ_v = 1)
# KL(p ‖ uniform) = ln 3 − H(p): ln 3 − 0.665573 = 0.433040 and ln 3 − 0.975328 = 0.123284, and 0 for uniform
# KL_a = (0.433040 + 0.123284) / 2 = 0.278162; KL_v = (0 + 0.123284) / 2 = 0.061642; CE = ln 3 = 1.098612
# f_a = [[1,2],[0,0]], f^T_a = 0: MSE_a = (1 + 4) / 4 = 1.25; f_v = f^T_v: MSE_v = 0
# L = 1.098612 + 1.25 + 0.278162 + 0.061642 = 2.688417
LABELS = torch.tensor([0, 2])
TEACHER_LOGITS = {"a": torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), "v": torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}
F_A = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
F_V = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
RHO = [1.363103, 0.545275]
KL_A, KL_V, CE, MSE_A, TOTAL = 0.278162, 0.061642, math.log(3), 1.25, 2.688417


def part(name, modalities=("a", "v"), num_classes=3, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


class Scaled(Encoder):
    """f = k · x + w: a 4-D "kernel" k (so freeze=code has something to zero) and a 1-D shift w (which it leaves)."""

    def __init__(self):
        super().__init__((2,), 2)
        self.k = nn.Parameter(torch.ones(1, 1, 1, 1))
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x * self.k.reshape(()) + self.w


class FixedTeacher(nn.Module):
    """A teacher whose features f^T and logits l^T are the hand values, whatever the input."""

    def __init__(self, features, logits):
        super().__init__()
        self.register_buffer("features", features)
        self.register_buffer("logits", logits)

    def encode(self, x):
        return self.features

    def head(self, features):
        return self.logits

    def forward(self, x):
        return self.head(self.encode(x))


def hand_model():
    """Sum fusion whose rows are orthogonal to the hand features: z = 0 exactly, yet dz/df ≠ 0 (gradients reach both encoders)."""
    model = MultimodalModel({"a": Scaled(), "v": Scaled()}, SumFusion({"a": 2, "v": 2}, 3), 3)
    with torch.no_grad():
        model.fusion.linears["a"].weight.copy_(torch.tensor([[2.0, -1.0], [4.0, -2.0], [0.0, 0.0]]))  # ⊥ [1, 2]
        model.fusion.linears["v"].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]))  # ⊥ [1, −1]
        for layer in model.fusion.linears.values():
            layer.bias.zero_()
        for head in model.unimodal_heads.values():  # the probes: fixed too, so two hand models are the same
            head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
            head.bias.zero_()
    return model


def context(model, epoch=0, max_epochs=10):
    return TrainContext(
        epoch=epoch, max_epochs=max_epochs, steps_per_epoch=1, device=torch.device("cpu"), modalities=list(model.modalities),
        num_classes=3, generator=torch.Generator().manual_seed(0), dist=DistributedState(),
        params=ParameterGroups.of(model),
    )


def with_hand_teachers(part, model, ctx):
    """Set up ``part`` and, if it has teachers, replace them by the hand ones (f^T_a = 0, f^T_v = f_v), marked trained."""
    part.setup(model, ctx)
    if hasattr(part, "teachers"):
        part.teachers.teachers["a"] = FixedTeacher(torch.zeros(2, 2), TEACHER_LOGITS["a"])
        part.teachers.teachers["v"] = FixedTeacher(F_V.clone(), TEACHER_LOGITS["v"])
        part.teachers.ready.fill_(True)


def hand_step(parts, epoch=0):
    """One step of ``Method(parts)`` on the hand batch; returns the record and every gradient of the model."""
    model = hand_model()
    ctx = context(model, epoch)
    method = Method(parts)
    for p in parts:
        with_hand_teachers(p, model, ctx)
    with torch.no_grad():  # f_v = k x_v + w_v with w_v = 0.5: x_v is not f_v, so dL/dk_v ≠ 0 either
        model.encoders["v"].w.fill_(0.5)
    batch = Batch({"a": F_A.clone(), "v": F_V - 0.5}, LABELS.clone(), torch.arange(2))
    record = method.training_step(model, batch, ctx)
    record.loss.backward()
    method.after_backward(record, ctx)
    return record, {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.fixture
def g2d_with_teachers(register_part):
    """G²D's objective without its exclusive role: an 'objective with teachers' that g2d_smp may join."""

    class TeachersOnly(G2D):
        """G²D's losses and teachers, combinable with g2d_smp (tests only)."""

        exclusive = ()

    register_part("_g2d_teachers")(TeachersOnly)
    return "_g2d_teachers"


# -- the spec's "Test it by" lines ------------------------------------------------------------------------------
def test_teacher_confidence_and_prioritization_of_the_hand_batch():
    confidence = teacher_confidence(torch.stack([TEACHER_LOGITS["a"], TEACHER_LOGITS["v"]]), LABELS)
    assert confidence.tolist() == pytest.approx(RHO, abs=1e-6)
    assert prioritization(confidence).tolist() == [0.0, 1.0]  # the audio teacher is more confident: audio freezes


def test_loss_terms_of_the_hand_batch():
    z = torch.zeros(2, 3)
    assert logit_distillation(z, TEACHER_LOGITS["a"]).item() == pytest.approx(KL_A, abs=1e-6)
    assert logit_distillation(z, TEACHER_LOGITS["v"]).item() == pytest.approx(KL_V, abs=1e-6)
    assert feature_distillation(F_A, torch.zeros(2, 2)).item() == pytest.approx(MSE_A)
    assert feature_distillation(F_V, F_V).item() == 0.0
    total = g2d_loss(z, LABELS, {"a": F_A, "v": F_V}, {"a": torch.zeros(2, 2), "v": F_V}, TEACHER_LOGITS)
    assert total.item() == pytest.approx(TOTAL, abs=1e-6)
    assert total.item() == pytest.approx(CE + MSE_A + KL_A + KL_V, abs=1e-6)
    # τ² · KL at τ: τ = 2 is 4 × the τ = 1 divergence of the halved logits
    assert logit_distillation(z, TEACHER_LOGITS["a"], 2.0).item() == pytest.approx(
        4 * logit_distillation(z, TEACHER_LOGITS["a"] / 2).item(), rel=1e-6)


def test_the_objective_step_on_the_hand_batch_freezes_the_audio_encoder_only():
    record, grads = hand_step([part("g2d")])
    assert record.losses["fused"].item() == pytest.approx(CE, abs=1e-6)
    assert record.losses["feature_distill"].item() == pytest.approx(MSE_A, abs=1e-6)
    assert record.losses["logit_distill"].item() == pytest.approx(KL_A + KL_V, abs=1e-6)
    without_probe = sum(v.item() for k, v in record.losses.items() if k != "probe")
    assert without_probe == pytest.approx(TOTAL, abs=1e-6)
    assert record.shared[CONFIDENCE].tolist() == pytest.approx(RHO, abs=1e-6)
    assert float(record.logs["g2d/kappa/a"]) == 0.0 and float(record.logs["g2d/kappa/v"]) == 1.0
    assert float(record.logs["g2d/teacher_confidence/a"]) == pytest.approx(RHO[0] / 2, abs=1e-6)
    assert record.logs["g2d/prioritizing"] == 1.0
    _, plain = hand_step([part("g2d", smp=False)])
    for name in grads:
        if name.startswith("encoders.a."):
            assert torch.equal(grads[name], torch.zeros_like(plain[name])) and plain[name].abs().sum() > 0, name
        else:
            assert torch.equal(grads[name], plain[name]), name
    assert grads["encoders.v.k"].abs().sum() > 0 and grads["encoders.v.w"].abs().sum() > 0


def test_code_variant_zeroes_the_4d_kernels_only_and_hard_freeze_drops_them():
    _, plain = hand_step([part("g2d", smp=False)])
    _, code = hand_step([part("g2d", freeze="code")])
    assert torch.equal(code["encoders.a.k"], torch.zeros(1, 1, 1, 1))  # the conv kernel: zeroed
    assert torch.equal(code["encoders.a.w"], plain["encoders.a.w"])  # a bias-like 1-D tensor keeps learning (code)
    assert all(torch.equal(code[n], plain[n]) for n in plain if n.startswith("encoders.v."))
    _, hard = hand_step([part("g2d", hard_freeze=True)])
    assert hard["encoders.a.k"] is None and hard["encoders.a.w"] is None
    assert all(torch.equal(hard[n], plain[n]) for n in plain if n.startswith("encoders.v."))


def test_hard_freeze_keeps_momentum_and_weight_decay_from_moving_the_frozen_encoder():
    # a parameter with momentum from an earlier step: a zeroed gradient still moves it, a dropped one does not
    for hard, moves in ((False, True), (True, False)):
        model = hand_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        model.encoders["a"].k.grad = torch.ones(1, 1, 1, 1)
        optimizer.step()
        before = model.encoders["a"].k.detach().clone()
        model.encoders["a"].k.grad = torch.ones(1, 1, 1, 1)
        mmbalance.methods.g2d.prioritize_gradients_(
            ParameterGroups.of(model).encoder, ["a", "v"], torch.tensor([0.0, 1.0]), "all_encoder_grads", hard)
        optimizer.step()
        assert (not torch.equal(model.encoders["a"].k, before)) == moves


def test_ties_leave_every_tied_modality_learning_and_three_modalities_keep_only_the_weakest():
    assert prioritization(torch.tensor([0.7, 0.7])).tolist() == [1.0, 1.0]  # the code raises here; we freeze nothing
    assert prioritization(torch.tensor([1.2, 0.4, 0.9])).tolist() == [0.0, 1.0, 0.0]
    assert prioritization(torch.tensor([0.4, 0.4, 0.9])).tolist() == [1.0, 1.0, 0.0]


def test_the_window_lasts_half_of_training_unless_set():
    config = G2D.Config()
    assert smp_window(config, 300) == (0, 150)  # the authors' epochs 0–150 of 300, inclusive
    assert smp_window(config, 2) == (0, 1)
    assert smp_window(G2D.Config(modulation_starts=6), 10) == (6, 11)  # half of training long, from its start
    assert smp_window(G2D.Config(modulation_starts=2, modulation_ends=7), 10) == (2, 7)
    assert G2D.pinned_options(config, 30) == {"modulation_ends": 15, "teacher_epochs": 30}
    assert G2D.pinned_options(G2D.Config(modulation_ends=3, teacher_epochs=4), 30) == {}
    # epoch 6 of 10 is past the default end (5): no prioritization, the gradients of smp=false
    record, grads = hand_step([part("g2d")], epoch=6)
    _, plain = hand_step([part("g2d", smp=False)], epoch=6)
    assert record.logs["g2d/prioritizing"] == 0.0 and "g2d/kappa" not in record.shared
    assert float(record.logs["g2d/kappa/a"]) == 1.0
    assert all(torch.equal(grads[n], plain[n]) for n in plain)


def test_the_plugin_on_the_hand_batch_is_the_objectives_own_smp(g2d_with_teachers):
    record, grads = hand_step([part(g2d_with_teachers, smp=False), part("g2d_smp")])
    _, own = hand_step([part("g2d")])
    assert float(record.logs["g2d_smp/kappa/a"]) == 0.0 and float(record.logs["g2d_smp/kappa/v"]) == 1.0
    assert all(torch.equal(grads[n], own[n]) for n in own)
    _, code = hand_step([part(g2d_with_teachers, smp=False), part("g2d_smp", freeze="code")])
    assert torch.equal(code["encoders.a.k"], torch.zeros(1, 1, 1, 1)) and code["encoders.a.w"].abs().sum() > 0


@pytest.mark.parametrize("objective", [{"name": "joint", "unimodal_weight": 1.0}, {"name": "midas", "modulation_starts": 0}],
                         ids=["joint", "midas"])
def test_the_plugin_on_an_objective_without_teachers_freezes_by_its_own_teachers(objective):
    # joint and midas publish no ρ: g2d_smp asks its own teachers (here the hand ones, ρ_a = 1.363103 >
    # ρ_v = 0.545275), so κ = (0, 1): the audio encoder's gradients are zeroed, every other one is the objective's own
    record, grads = hand_step([part(**objective), part("g2d_smp")])
    _, plain = hand_step([part(**objective)])
    assert CONFIDENCE not in record.shared
    assert record.shared["g2d_smp/kappa"].tolist() == [0.0, 1.0]
    assert float(record.logs["g2d_smp/kappa/a"]) == 0.0 and float(record.logs["g2d_smp/kappa/v"]) == 1.0
    assert grads.keys() == plain.keys()
    for name in plain:
        if name.startswith("encoders.a."):
            assert torch.equal(grads[name], torch.zeros_like(plain[name])), name
        elif plain[name] is None:
            assert grads[name] is None, name
        else:
            assert torch.equal(grads[name], plain[name]), name
    # the objective's own step moves both encoders (the hand fusion alone gives them no gradient: the unimodal
    # heads' losses, which joint[unimodal_weight=1] and midas train, do)
    assert sum(plain[n].abs().sum() for n in ("encoders.a.k", "encoders.a.w")) > 0
    assert sum(plain[n].abs().sum() for n in ("encoders.v.k", "encoders.v.w")) > 0
    # past the window (epoch 6 of 10; it ends at 5) the plugin changes nothing
    record, late = hand_step([part(**objective), part("g2d_smp")], epoch=6)
    _, plain_late = hand_step([part(**objective)], epoch=6)
    assert record.logs["g2d_smp/prioritizing"] == 0.0 and "g2d_smp/kappa" not in record.shared
    assert all((late[n] is None and plain_late[n] is None) or torch.equal(late[n], plain_late[n]) for n in plain_late)


# -- options and composition ---------------------------------------------------------------------------------
def test_options_are_validated():
    with pytest.raises(ConfigError, match="g2d.freeze"):
        build_config(overrides=["g2d.freeze=kernels"], method="g2d")
    with pytest.raises(ConfigError, match="g2d.temperature"):
        build_config(overrides=["g2d.temperature=0"], method="g2d")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("g2d", modulation_starts=3, modulation_ends=2)
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("g2d_smp", modulation_starts=3, modulation_ends=2)
    # freeze=code on encoders without 4-D kernels would never freeze anything: refused before training
    with pytest.raises(ConfigError, match="g2d.freeze=code zeroes 4-D convolution kernels only") as caught:
        Trainer(build_config(overrides=TINY + ["g2d.freeze=code"], method="g2d"), None, quiet=True)
    assert "\n" not in str(caught.value)
    Trainer(build_config(overrides=TINY + ["g2d.freeze=code", "g2d.smp=false"], method="g2d"), None, quiet=True)


def test_g2d_and_g2d_smp_are_refused_together():
    with pytest.raises(ConfigError) as caught:
        build_config(method="g2d+g2d_smp")
    message = str(caught.value)
    assert "\n" not in message and "'g2d'" in message and "'g2d_smp'" in message
    assert "sequential modality prioritization" in message


# -- teachers ----------------------------------------------------------------------------------------------
def count_teacher_fits(monkeypatch):
    from mmbalance.training import teachers

    calls = []
    original = teachers.TeacherFit.__call__

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(teachers.TeacherFit, "__call__", counted)
    return calls


def test_teachers_train_once_to_their_best_heldout_epoch_and_stay_frozen(tmp_path, monkeypatch):
    calls = count_teacher_fits(monkeypatch)
    config = build_config(overrides=TINY + ["g2d.teacher_epochs=3"], method="g2d")
    train_run(config, tmp_path / "r", quiet=True)
    assert calls == ["unimodal_strong", "unimodal_weak"]  # once per modality, in epoch 0 only (UMT's recipe and files)
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    lines = [json.loads(l)["method"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for m in ("strong", "weak"):
        saved = torch.load(tmp_path / "r" / "teachers" / f"unimodal_{m}.pt", weights_only=True)
        assert saved["state"]["epoch"] == 3 and 1 <= saved["state"]["best_epoch"] <= 3
        for key, value in saved["best"].items():  # the best held-out epoch, untouched by the student's training
            assert torch.equal(last["method"][f"parts.g2d.teachers.teachers.{m}.{key}"], value), key
        assert lines[-1][f"g2d/teacher_accuracy/{m}"] == pytest.approx(saved["state"]["best_accuracy"])
    assert last["method"]["parts.g2d.teachers.ready"].item()


def test_teachers_stay_in_eval_mode_and_out_of_the_optimizer():
    trainer = Trainer(build_config(overrides=TINY, method="g2d"), None, quiet=True)
    g2d = trainer.method.objective
    trainer.method.train()
    assert trainer.method.training and not any(m.training for m in g2d.teachers.modules())
    teacher_params = {id(p) for p in g2d.teachers.parameters()}
    assert teacher_params and not teacher_params & {id(p) for g in trainer.optimizers.values() for pg in g.param_groups for p in pg["params"]}
    assert not any(p.requires_grad for p in g2d.teachers.parameters())


def test_a_run_killed_while_a_teacher_trains_resumes_exactly(tmp_path, monkeypatch):
    config = build_config(overrides=TINY + ["g2d.teacher_epochs=3"], method="g2d")
    full = train_run(config, tmp_path / "full", quiet=True)

    from mmbalance.training import teachers

    original = teachers.TeacherFit.accuracy
    calls = {"n": 0}

    def killed_in_the_second_teacher(self, module, predict):
        calls["n"] += 1
        if calls["n"] == 5:  # teacher 'strong' done (3 epochs), 'weak' killed after its second epoch's training
            raise KeyboardInterrupt
        return original(self, module, predict)

    monkeypatch.setattr(teachers.TeacherFit, "accuracy", killed_in_the_second_teacher)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "killed", quiet=True)
    monkeypatch.undo()
    assert (tmp_path / "killed" / "teachers" / "unimodal_weak.pt").is_file() and not (tmp_path / "killed" / "last.pt").exists()
    resumed = resume_run(tmp_path / "killed", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert read_lines(tmp_path / "killed") == read_lines(tmp_path / "full")


def test_a_run_resumed_after_its_first_epoch_does_not_train_the_teachers_again(tmp_path, monkeypatch):
    config = build_config(overrides=TINY, method="g2d")
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def stops_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    calls = count_teacher_fits(monkeypatch)
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert calls == []
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert read_lines(tmp_path / "stopped") == read_lines(tmp_path / "full")


# -- §16 checks ----------------------------------------------------------------------------------------------
def read_lines(path):
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    config = build_config(overrides=TINY + ["train.epochs=3"], method="g2d")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    one, two = read_lines(tmp_path / "one"), read_lines(tmp_path / "two")
    assert [l["method"] for l in one] == [l["method"] for l in two]
    assert [l["train_loss"] for l in one] == [l["train_loss"] for l in two]
    assert first["test"] == second["test"]
    assert one[0]["method"]["g2d/prioritizing"] == 1.0 and one[2]["method"]["g2d/prioritizing"] == 0.0  # window 0..1


class Sentinel(torch.utils.data.Dataset):
    """The test split, refusing every read until training has finished."""

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


def test_training_and_the_teachers_never_read_the_test_split(tmp_path, monkeypatch):
    from mmbalance.data.loading import load_dataset

    config = build_config(overrides=TINY, method="g2d")
    bundle = load_dataset(config)
    sentinel = Sentinel(bundle.test)
    bundle.test = sentinel
    original = Trainer.finish

    def finish(self):
        sentinel.open = True  # the final report reads test once, on the best checkpoint
        return original(self)

    monkeypatch.setattr(Trainer, "finish", finish)
    metrics = train_run(config, tmp_path / "r", quiet=True, bundle=bundle)
    assert metrics["test"]["num_samples"] == len(sentinel)
    assert (tmp_path / "r" / "teachers" / "unimodal_weak.pt").is_file()


def trainer(spec, extra=(), base=TINY):
    return Trainer(build_config(overrides=[*base, *extra], method=spec), None, quiet=True)


def ready(t):
    """Mark the run's teachers trained (untrained copies serve as well for gradient comparisons)."""
    for p in t.method:
        if hasattr(p, "teachers"):
            p.teachers.ready.fill_(True)
    return t


def step_gradients(t, batch, epoch):
    t.ctx.epoch = epoch
    t.method.on_epoch_start(t.model, t.ctx)
    t._zero_grad()
    record = t.method.training_step(t.model, batch, t.ctx)
    record.loss.backward()
    t._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_without_its_distillation_terms_and_outside_its_window_g2d_has_joints_gradients():
    plain = trainer("joint")
    g2d = ready(trainer("g2d[feature_weight=0,logit_weight=0,modulation_starts=3,modulation_ends=4]", ["train.epochs=5"]))
    g2d.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain.train_loader))
    _, reference = step_gradients(plain, batch, 1)
    record, grads = step_gradients(g2d, batch, 1)
    assert record.logs["g2d/prioritizing"] == 0.0
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[n], reference[n]) for n in reference)


def test_the_plugin_leaves_gradients_alone_outside_its_window_and_freezes_inside(g2d_with_teachers):
    base = ready(trainer(f"{g2d_with_teachers}[smp=false]", ["train.epochs=5"]))
    batch = next(iter(base.train_loader))
    for epoch, equal in ((1, True), (3, False)):
        modulated = ready(trainer(f"{g2d_with_teachers}[smp=false]+g2d_smp[modulation_starts=3,modulation_ends=4]",
                                  ["train.epochs=5"]))
        modulated.model.load_state_dict(base.model.state_dict())
        # the objective's teachers (the plugin reads their published ρ; its own teachers are not in base's state)
        modulated.method.objective.load_state_dict(base.method.objective.state_dict())
        _, reference = step_gradients(base, batch, epoch)
        record, grads = step_gradients(modulated, batch, epoch)
        assert record.logs["g2d_smp/prioritizing"] == float(not equal)
        same = {n: torch.equal(grads.get(n, torch.zeros(0)), reference[n]) for n in reference}
        assert all(same.values()) == equal
        if not equal:  # one encoder frozen (the more confident teacher's), everything else as before
            frozen = [m for m in ("strong", "weak") if float(record.logs[f"g2d_smp/kappa/{m}"]) == 0]
            assert len(frozen) == 1
            for n in reference:
                if n.startswith(f"encoders.{frozen[0]}."):
                    assert torch.equal(grads[n], torch.zeros_like(reference[n])), n
                else:
                    assert same[n], n


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


def test_state_round_trip_mid_epoch_reproduces_the_next_steps():
    t = trainer("g2d[hard_freeze=true]")
    batches = [b for _, b in zip(range(4), t.train_loader)]
    t.ctx.epoch = 0
    t.method.on_epoch_start(t.model, t.ctx)  # trains the teachers (in memory)
    for batch in batches[:2]:
        t.train_step(batch)
    saved = state_of(t)
    expected = [t.train_step(b) for b in batches[2:]]
    after = {k: v.clone() for k, v in t.model.state_dict().items()}

    fresh = ready(trainer("g2d[hard_freeze=true]"))  # its teachers come from the saved state
    load_state(fresh, saved)
    got = [fresh.train_step(b) for b in batches[2:]]
    assert [r.loss.item() for r in got] == [r.loss.item() for r in expected]
    assert all(torch.equal(after[k], v) for k, v in fresh.model.state_dict().items())


@pytest.mark.parametrize("objective", ["joint", "midas[modulation_starts=0]"])
def test_the_plugin_trains_its_own_teachers_and_freezes_the_more_confident_ones_encoder(objective, tmp_path, monkeypatch):
    spec = f"{objective}+g2d_smp[teacher_epochs=2]"
    calls = count_teacher_fits(monkeypatch)
    train_run(build_config(overrides=TINY, method=spec), tmp_path / "r", quiet=True)
    assert calls == ["unimodal_strong", "unimodal_weak"]  # once per modality, in epoch 0 only
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    lines = [l["method"] for l in read_lines(tmp_path / "r")]
    assert last["method"]["parts.g2d_smp.teachers.ready"].item()
    for m in ("strong", "weak"):
        saved = torch.load(tmp_path / "r" / "teachers" / f"unimodal_{m}.pt", weights_only=True)
        assert saved["state"]["epoch"] == 2
        for key, value in saved["best"].items():  # the kept teachers are the plugin's state
            assert torch.equal(last["method"][f"parts.g2d_smp.teachers.teachers.{m}.{key}"], value), key
        assert lines[-1][f"g2d_smp/teacher_accuracy/{m}"] == pytest.approx(saved["state"]["best_accuracy"])
    assert lines[0]["g2d_smp/prioritizing"] == 1.0 and lines[1]["g2d_smp/prioritizing"] == 1.0  # window 0..1

    # a step inside the window (epoch 0), teachers trained in memory: the encoder of the modality whose teacher is
    # more confident on the batch (ρ_m = Σ_i p(T_m(x_m,i))[y_i], worked out here from the teachers directly)
    # gets zero gradients, everything else the objective's own
    t, plain = trainer(spec), trainer(objective)
    plain.model.load_state_dict(t.model.state_dict())
    batch = next(iter(t.train_loader))
    grads = []
    for run in (t, plain):
        run.ctx.epoch = 0
        run.method.on_epoch_start(run.model, run.ctx)
        run.ctx.generator.manual_seed(5)  # midas's misaligned pairs: the same draws in both runs
        torch.manual_seed(5)
        run._zero_grad()
        record = run.method.training_step(run.model, batch, run.ctx)
        record.loss.backward()
        run._finish_gradients(record)
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
        if run is t:
            kept = record
    teachers = t.method.parts["g2d_smp"].teachers
    assert teachers.ready.item() and teachers.accuracy.min() > 0
    with torch.no_grad():
        rho = {m: teachers.teachers[m](batch.inputs[m]).softmax(-1).gather(1, batch.labels[:, None]).sum().item()
               for m in ("strong", "weak")}
    confident = max(rho, key=rho.get)
    assert rho["strong"] != rho["weak"]
    assert [float(kept.logs[f"g2d_smp/kappa/{m}"]) for m in ("strong", "weak")] == [
        float(m != confident) for m in ("strong", "weak")]
    modulated, reference = grads
    assert modulated.keys() == reference.keys()
    for n in reference:
        if n.startswith(f"encoders.{confident}."):
            assert torch.equal(modulated[n], torch.zeros_like(reference[n])), n
        else:
            assert torch.equal(modulated[n], reference[n]), n
    assert any(reference[n].abs().sum() > 0 for n in reference if n.startswith(f"encoders.{confident}."))


# -- runs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["g2d+arl", "g2d+ogm_ge"])
def test_g2d_runs_with_gradient_plugins(tmp_path, spec):
    plugin = spec.split("+")[1]
    config = build_config(overrides=TINY + [f"{plugin}.modulation_starts=0"], method=spec)
    metrics = train_run(config, tmp_path, quiet=True)
    assert metrics["parts"] == ["g2d", plugin]
    lines = [l["method"] for l in read_lines(tmp_path)]
    assert len(lines) == 2
    for line in lines:
        assert all(math.isfinite(v) for v in line.values())
        assert {"loss/feature_distill", "loss/logit_distill", "g2d/kappa/strong"} <= set(line)
    key = "arl/accelerating" if plugin == "arl" else "ogm_ge/modulating"
    assert lines[0][key] == 1.0


@pytest.mark.parametrize("base", [TINY, TINY3], ids=["M=2", "M=3"])
def test_runs_of_g2d_and_of_the_plugin_with_teachers(tmp_path, base, g2d_with_teachers):
    for spec in ("g2d", f"{g2d_with_teachers}[smp=false]+g2d_smp"):
        out = tmp_path / spec.replace("+", "_").replace("[", "").replace("]", "").replace("=", "")
        metrics = train_run(build_config(overrides=base, method=spec), out, quiet=True)
        modalities = metrics["modalities"]
        assert len(modalities) == (2 if base is TINY else 3)
        lines = [l["method"] for l in read_lines(out)]
        prefix = "g2d_smp" if "g2d_smp" in spec else "g2d"
        for line in lines:
            assert all(math.isfinite(v) for v in line.values())
        assert lines[0][f"{prefix}/prioritizing"] == 1.0
        # inside the window every step keeps the weakest modality learning: the epoch means of κ sum to at least 1
        assert sum(lines[0][f"{prefix}/kappa/{m}"] for m in modalities) >= 1.0


def test_three_modalities_a_step_keeps_only_the_least_confident_modality_learning():
    t = ready(trainer("g2d", base=TINY3))
    plain = ready(trainer("g2d[smp=false]", base=TINY3))
    plain.model.load_state_dict(t.model.state_dict())
    plain.method.load_state_dict(t.method.state_dict())
    batch = next(iter(t.train_loader))
    record, grads = step_gradients(t, batch, 0)
    _, reference = step_gradients(plain, batch, 0)
    modalities = t.method.objective.modalities
    confidence = record.shared[CONFIDENCE]
    weakest = modalities[int(confidence.argmin())]
    assert [float(record.logs[f"g2d/kappa/{m}"]) for m in modalities] == [float(m == weakest) for m in modalities]
    for n in reference:
        frozen = n.startswith("encoders.") and not n.startswith(f"encoders.{weakest}.")
        expected = torch.zeros_like(reference[n]) if frozen else reference[n]
        assert torch.equal(grads[n], expected), n
