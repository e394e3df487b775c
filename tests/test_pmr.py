"""PMR (a plugin): prototype similarities and scores by hand, the slow modality's prototypical CE and
its gradient, the prototype pass (training data only, eval mode, momentum, absent classes, subsets),
the optional entropy term, M > 2 rules, determinism, the window, state round trips, and full runs."""

import io
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import mmbalance.methods.pmr  # noqa: F401  (registers "pmr")
from mmbalance.config import build_config
from mmbalance.data.base import MultimodalDataset, TensorDataset
from mmbalance.data.batch import Batch, collate_batch
from mmbalance.data.loading import load_dataset
from mmbalance.errors import ConfigError
from mmbalance.methods.compose import Method
from mmbalance.methods.pmr import (
    dominant_mask,
    pce_weights,
    prototype_entropy,
    prototype_indices,
    prototype_logits,
    subset_size,
    updated_prototypes,
)
from mmbalance.models import Encoder
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.readouts import modality_scores
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
    "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
TINY3 = [*TINY, "synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]
SIGMA = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def part(name, modalities=("a", "b"), num_classes=2, **options):
    cls = METHODS.get(name)
    return cls(cls.Config(**options), list(modalities), num_classes)


class Scaled(Encoder):
    """f = w·x, and ×10 in train mode: a prototype made in train mode would show it."""

    def __init__(self, dim=2):
        super().__init__((dim,), dim)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x * (10.0 if self.training else 1.0)


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model(encoder=Identity):
    model = MultimodalModel({m: encoder((2,), 2) if encoder is Identity else encoder() for m in "ab"},
                            SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in model.fusion.linears.values():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return model


def context(epoch=0, seed=0, loader=None, train_loader=None, num_classes=2):
    return TrainContext(
        epoch=epoch, max_epochs=10, steps_per_epoch=1, device=torch.device("cpu"), modalities=["a", "b"],
        num_classes=num_classes, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
        train_eval_loader=loader, train_loader=train_loader,
    )


def loader_of(inputs, labels, batch_size=2):
    dataset = TensorDataset({m: torch.tensor(x) for m, x in inputs.items()}, torch.tensor(labels))
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_batch)


# -- "Test it by" (a): prototypes c_0 = (0,0), c_1 = (3,4); feature (0,0) ⇒ sim = (0, −5), p = (0.9933, 0.0067)
def test_similarity_and_probability_of_the_spec_example():
    sim = prototype_logits(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert torch.equal(sim, torch.tensor([[0.0, -5.0]]))  # −‖·‖₂, not squared (that would be −25)
    p = sim.softmax(-1)[0]
    # p_0 = 1/(1 + e^{−5}) = 0.993307, p_1 = 0.006693
    assert p.tolist() == pytest.approx([0.993307, 0.006693], abs=1e-6)
    # the score is Σ_i p_i[y_i]: label 1 reads the second entry
    assert modality_scores(sim.unsqueeze(0), torch.tensor([1])).item() == pytest.approx(0.006693, abs=1e-6)


# -- "Test it by" (b): s_a = 30, s_v = 20 ⇒ only the visual PCE term, with weight α
def test_only_the_slow_modality_gets_weight_alpha():
    assert pce_weights(torch.tensor([30.0, 20.0]), 0.7).tolist() == pytest.approx([0.0, 0.7])
    assert pce_weights(torch.tensor([20.0, 30.0]), 0.7).tolist() == pytest.approx([0.7, 0.0])
    assert pce_weights(torch.tensor([25.0, 25.0]), 0.7).tolist() == [0.0, 0.0]  # ρ = 1: neither
    assert pce_weights(torch.tensor([30.0, 20.0]), 0.7, "weakest").tolist() == pytest.approx([0.0, 0.7])


def hand_batch():
    """Two samples, labels (0, 1); identity encoders, so the inputs are the features f_m.

    a = rows (0,0), (3,4) with prototypes (0,0), (3,4): sims (0,−5), (−5,0): p_true = σ(5) each, s_a = 2σ(5) = 1.986614
    b = rows (0,1), (0,1) with prototypes (0,0), (0,3): distances 1 and 2: sims (−1,−2) both rows:
        p = (σ(1), σ(−1)) = (0.731059, 0.268941): s_b = σ(1) + σ(−1) = 1
    """
    inputs = {"a": torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "b": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    for x in inputs.values():
        x.requires_grad_(True)
    return Batch(inputs, torch.tensor([0, 1]), torch.arange(2))


HAND_PROTOTYPES = {"a": [[0.0, 0.0], [3.0, 4.0]], "b": [[0.0, 0.0], [0.0, 3.0]]}


def with_prototypes(pmr, model, prototypes=HAND_PROTOTYPES):
    pmr.setup(model, context())
    with torch.no_grad():
        for slot, m in enumerate("ab"):
            pmr.prototypes(slot).copy_(torch.tensor(prototypes[m]))
    return pmr


def hand_step(method, epoch=0):
    batch = hand_batch()
    record = method.training_step(hand_model(), batch, context(epoch))
    record.loss.backward()
    return record, {m: x.grad.clone() for m, x in batch.inputs.items()}


def test_hand_step_adds_alpha_times_the_slow_modalitys_pce_and_its_gradient():
    model = hand_model()
    pmr = with_prototypes(part("pmr", alpha=0.5), model)
    record, grads = hand_step(Method([part("joint"), pmr]))
    _, plain = hand_step(Method([part("joint")]))
    assert record.logs["pmr/score/a"].item() == pytest.approx(2 * SIGMA(5), rel=1e-6)  # 1.986614
    assert record.logs["pmr/score/b"].item() == pytest.approx(1.0, rel=1e-6)
    assert record.logs["pmr/ratio"].item() == pytest.approx(2 * SIGMA(5), rel=1e-6)  # ρ > 1: b is slow
    assert [record.logs[f"pmr/beta/{m}"].item() for m in "ab"] == [0.0, 0.5]
    # PCE_b = mean(−ln σ(1), −ln σ(−1)) = (0.313262 + 1.313262)/2 = 0.813262; α = 0.5 ⇒ 0.406631
    assert record.logs["pmr/pce/b"].item() == pytest.approx(0.813262, abs=1e-6)
    assert record.losses["pmr_pce"].item() == pytest.approx(0.5 * 0.813262, abs=1e-6)
    assert set(record.losses) == {"fused", "probe", "pmr_pce"}
    # a (dominant) gets exactly joint's gradient; b gets α ∂PCE_b/∂f on top:
    # ∂sim_k/∂f = −(f − c_k)/‖f − c_k‖ = (0,−1) for c_0 and (0,1) for c_1; ∂CE_i/∂sim_i = (p − onehot)/2
    # row 0 (y=0): (−σ(−1), σ(−1))/2 ⇒ (0, σ(−1)) ; row 1 (y=1): (σ(1), −σ(1))/2 ⇒ (0, −σ(1)); × α = 0.5
    assert torch.equal(grads["a"], plain["a"])
    extra = torch.tensor([[0.0, 0.5 * SIGMA(-1)], [0.0, -0.5 * SIGMA(1)]])  # (0, 0.134471), (0, −0.365529)
    assert torch.allclose(grads["b"] - plain["b"], extra, atol=1e-6)


def test_entropy_term_on_the_dominant_modality_only_in_its_first_epochs():
    model = hand_model()
    pmr = with_prototypes(part("pmr", alpha=0.0, entropy_weight=0.1, entropy_epochs=2), model)
    method = Method([part("joint"), pmr])
    # a dominates; its rows have p = (σ(5), σ(−5)): H = −σ(5) ln σ(5) − σ(−5) ln σ(−5) = 0.040335
    h = -(SIGMA(5) * math.log(SIGMA(5)) + SIGMA(-5) * math.log(SIGMA(-5)))
    record, _ = hand_step(method, epoch=1)
    assert record.losses["pmr_entropy"].item() == pytest.approx(-0.1 * h, rel=1e-5)  # L −= μ_per H
    assert "pmr_pce" not in record.losses  # α = 0: no prototypical CE
    record, _ = hand_step(method, epoch=2)  # E_per = 2: epochs 0 and 1 only
    assert "pmr_entropy" not in record.losses
    assert prototype_entropy(torch.zeros(3, 4)).item() == pytest.approx(math.log(4))
    assert dominant_mask(torch.tensor([2.0, 2.0])).tolist() == [False, False]


# -- prototypes ---------------------------------------------------------------------------------
PASS_INPUTS = {"a": [[1.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 2.0]], "b": [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0], [1.0, 3.0]]}
PASS_LABELS = [0, 0, 1, 1]


def test_prototypes_are_eval_mode_class_means_smoothed_with_momentum():
    model = hand_model(Scaled)
    model.train()
    pmr = part("pmr", momentum=0.25, proto_fraction=1.0)
    ctx = context(loader=loader_of(PASS_INPUTS, PASS_LABELS))
    pmr.setup(model, ctx)
    pmr.on_epoch_start(model, ctx)
    assert model.training  # train mode restored
    # w = 1, eval mode (no ×10): a class 0 mean (2, 0), class 1 (0, 3); b (1, 1), (1, 2)
    assert torch.equal(pmr.prototypes(0), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert torch.equal(pmr.prototypes(1), torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    with torch.no_grad():
        model.encoders["a"].w.fill_(2.0)
    pmr.on_epoch_start(model, ctx)
    # new a means (4, 0), (0, 6); smoothed 0.75 new + 0.25 old: (3.5, 0), (0, 5.25); b unchanged
    assert torch.allclose(pmr.prototypes(0), torch.tensor([[3.5, 0.0], [0.0, 5.25]]))
    assert torch.equal(pmr.prototypes(1), torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    assert pmr.passes.item() == 2 and pmr.last_pass.tolist() == [4.0, 0.0]


def test_official_variant_leaves_the_second_pass_unsmoothed():
    model = hand_model(Scaled)
    pmr = part("pmr", momentum=0.25, proto_fraction=1.0, variant="official")
    ctx = context(loader=loader_of(PASS_INPUTS, PASS_LABELS))
    pmr.setup(model, ctx)
    for w in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.encoders["a"].w.fill_(w)
        pmr.on_epoch_start(model, ctx)
        if w == 2.0:  # the one made after epoch 0: the plain means (4, 0), (0, 6)
            assert torch.equal(pmr.prototypes(0), torch.tensor([[4.0, 0.0], [0.0, 6.0]]))
    # third pass: 0.75 (6, 0) + 0.25 (4, 0) = (5.5, 0); 0.75 (0, 9) + 0.25 (0, 6) = (0, 8.25)
    assert torch.allclose(pmr.prototypes(0), torch.tensor([[5.5, 0.0], [0.0, 8.25]]))


def test_a_partial_pass_reads_its_share_and_absent_classes_keep_their_prototype():
    model = hand_model(Scaled)
    loader = loader_of(PASS_INPUTS, PASS_LABELS, batch_size=1)
    # 4 training batches of 1; proto_fraction 0.5 ⇒ ⌊4 · 0.5⌋ = 2 batches: the first two rows (class 0 only)
    ctx = context(loader=loader, train_loader=loader)
    pmr = part("pmr", momentum=0.5, proto_fraction=0.5, proto_subset="first")
    pmr.setup(model, ctx)
    with torch.no_grad():
        pmr.prototypes(0).copy_(torch.tensor([[9.0, 9.0], [7.0, 7.0]]))
        pmr.seen[1] = True  # class 1 had a prototype, class 0 not yet
    pmr.on_epoch_start(model, ctx)
    # class 0: first seen ⇒ the plain mean (2, 0); class 1 absent ⇒ kept (7, 7)
    assert torch.equal(pmr.prototypes(0), torch.tensor([[2.0, 0.0], [7.0, 7.0]]))
    assert pmr.last_pass.tolist() == [2.0, 1.0]  # 2 samples read, 1 class missing
    # the plain function: present & seen ⇒ (1 − μ) mean + μ old; absent ⇒ old; unseen ⇒ mean
    old = torch.tensor([[4.0], [8.0], [6.0]])
    new = updated_prototypes(old, torch.tensor([[2.0], [0.0], [3.0]]), torch.tensor([1.0, 0.0, 1.0]),
                             torch.tensor([True, True, False]), momentum=0.5, smooth=True)
    assert new.flatten().tolist() == [3.0, 8.0, 3.0]


def test_subset_sizes_and_draws():
    # the authors' code: ⌊n_batches / 10⌋ batches, at least one
    assert subset_size(1000, steps_per_epoch=16, batch_size=64, fraction=0.1) == 64
    assert subset_size(1000, steps_per_epoch=160, batch_size=64, fraction=0.1) == 1000  # 16 × 64 > 1000
    assert subset_size(200, steps_per_epoch=7, batch_size=32, fraction=0.1) == 32
    assert subset_size(200, steps_per_epoch=7, batch_size=32, fraction=1.0) == 200
    assert prototype_indices(10, 10, "random", torch.Generator().manual_seed(0)) is None  # the whole fixed pass
    assert prototype_indices(10, 3, "first", torch.Generator()) == [0, 1, 2]
    drawn = prototype_indices(100, 10, "random", torch.Generator().manual_seed(1))
    assert drawn == sorted(drawn) and len(set(drawn)) == 10
    assert drawn == prototype_indices(100, 10, "random", torch.Generator().manual_seed(1))


class Recorder(MultimodalDataset):
    """A split that records the rows read from it, or refuses every read once armed."""

    def __init__(self, base, refuse=False):
        self.base, self.labels, self.modalities = base, base.labels, base.modalities
        self.refuse, self.armed, self.rows = refuse, False, []

    def input_dtype(self, modality):
        return self.base.input_dtype(modality)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices):
        assert not (self.armed and self.refuse), "pmr read a validation or test split"
        if self.armed:
            self.rows += list(indices)
        return self.base.__getitems__(indices)


@pytest.mark.parametrize("heldout", ["val", "carve"])
def test_prototype_passes_read_only_the_training_rows(heldout):
    config = build_config(overrides=[*TINY, f"data.heldout={heldout}", "pmr.proto_fraction=1.0"], method="joint+pmr")
    bundle = load_dataset(config)
    bundle.train, bundle.val, bundle.test = Recorder(bundle.train), Recorder(bundle.val, True), Recorder(bundle.test, True)
    trainer = Trainer(config, None, quiet=True, bundle=bundle)
    training_rows = list(range(len(bundle.train))) if heldout == "val" else trainer.train_data.rows.tolist()
    for split in (bundle.train, bundle.val, bundle.test):
        split.armed = True
    pmr = trainer.method.parts["pmr"]
    for epoch in range(2):
        trainer.ctx.epoch = epoch
        pmr.on_epoch_start(trainer.model, trainer.ctx)
    assert bundle.val.rows == [] and bundle.test.rows == []
    # every pass reads the training split exactly once, in its fixed order; a carved held-out part never
    assert bundle.train.rows == training_rows * 2
    assert pmr.last_pass[0].item() == len(training_rows)


def test_random_subset_is_a_fresh_tenth_of_the_training_rows_each_epoch():
    config = build_config(overrides=TINY, method="joint+pmr")
    bundle = load_dataset(config)
    bundle.train, bundle.val, bundle.test = Recorder(bundle.train), Recorder(bundle.val, True), Recorder(bundle.test, True)
    trainer = Trainer(config, None, quiet=True, bundle=bundle)
    for split in (bundle.train, bundle.val, bundle.test):
        split.armed = True
    pmr, draws = trainer.method.parts["pmr"], []
    for epoch in range(2):
        trainer.ctx.epoch = epoch
        before = torch.get_rng_state()
        pmr.on_epoch_start(trainer.model, trainer.ctx)
        assert torch.equal(torch.get_rng_state(), before)  # the pass leaves training's random stream alone
        draws.append(list(bundle.train.rows))
        bundle.train.rows.clear()
    # 200 samples, 7 training batches of 32: ⌊0.7⌋ ⇒ one batch of 32 samples
    assert [len(d) for d in draws] == [32, 32] and draws[0] != draws[1]
    assert pmr.last_pass[0].item() == 32


# -- the window, determinism, state ---------------------------------------------------------------
def trainer_for(spec, extra=(), overrides=TINY):
    return Trainer(build_config(overrides=[*overrides, *extra], method=spec), None, quiet=True)


def step_gradients(trainer, batch, epoch):
    trainer.ctx.epoch = epoch
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    trainer._zero_grad()
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    record.loss.backward()
    trainer._finish_gradients(record)
    return record, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def compared_step(extra, epoch, batch, weights):
    """(pmr's record, joint+pmr's gradients, joint's gradients) of one step from the same weights and seed."""
    out = []
    for spec, options in (("joint+pmr", extra), ("joint", [])):
        trainer = trainer_for(spec, ["model.dropout=0.3", *options])
        trainer.model.load_state_dict(weights)
        torch.manual_seed(5)  # the same dropout masks: the prototype pass must not shift them
        out.append(step_gradients(trainer, batch, epoch))
    return out[0][0], out[0][1], out[1][1]


def test_outside_the_window_gradients_equal_joint_exactly_and_inside_only_the_slow_encoder_changes():
    plain = trainer_for("joint")
    batch, weights = next(iter(plain.train_loader)), plain.model.state_dict()
    window = ["pmr.modulation_starts=2", "pmr.modulation_ends=3"]
    for epoch, alpha in [(1, 1.0), (4, 1.0), (2, 0.0)]:  # before, after the window; inside with α = 0
        record, grads, expected = compared_step([*window, f"pmr.alpha={alpha}"], epoch, batch, weights)
        assert "pmr_pce" not in record.losses and grads.keys() == expected.keys()
        assert all(torch.equal(grads[n], expected[n]) for n in grads), (epoch, alpha)
    # inside the window: the slow modality's encoder changes, everything else is joint's exactly
    record, grads, expected = compared_step(window, 2, batch, weights)
    slow = [m for m in ("strong", "weak") if record.logs[f"pmr/beta/{m}"].item() > 0]
    assert len(slow) == 1 and "pmr_pce" in record.losses
    for name in grads:
        changed = name.startswith(f"encoders.{slow[0]}.")
        assert torch.equal(grads[name], expected[name]) != changed, name


def run_logs(path):
    return [json.loads(line)["method"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_the_same_seed_have_the_same_trajectory(tmp_path):
    config = build_config(overrides=[*TINY, "train.epochs=3"], method="joint+pmr")
    first = train_run(config, tmp_path / "one", quiet=True)
    second = train_run(config, tmp_path / "two", quiet=True)
    logs = run_logs(tmp_path / "one")
    assert logs == run_logs(tmp_path / "two") and first["test"] == second["test"]
    assert all(math.isfinite(v) for line in logs for v in line.values())
    assert {"pmr/score/strong", "pmr/beta/weak", "pmr/ratio", "pmr/proto_samples"} <= set(logs[0])
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["method"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["method"]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    other = train_run(config.replace(seed=1), tmp_path / "three", quiet=True)
    assert run_logs(tmp_path / "three") != logs or other["test"] != first["test"]


def test_state_round_trip_mid_epoch_reproduces_the_next_step():
    trainer = trainer_for("joint+pmr", ["train.epochs=4"])
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    for epoch in range(2):  # two passes: the momentum has acted
        trainer.ctx.epoch = epoch
        trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    for batch in batches[:2]:
        trainer.train_step(batch)
    buffer = io.BytesIO()
    torch.save({"model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
                "optimizer": trainer.ctx.optimizer.state_dict()}, buffer)
    state = trainer.method.state_dict()
    assert {"parts.pmr.prototypes_0", "parts.pmr.prototypes_1", "parts.pmr.passes", "parts.pmr.seen"} <= set(state)
    assert state["parts.pmr.passes"].item() == 2
    expected = trainer.train_step(batches[2])

    fresh = trainer_for("joint+pmr", ["train.epochs=4"])
    fresh.ctx.epoch = 1  # no prototype pass of its own: everything comes from the checkpoint
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    fresh.ctx.optimizer.load_state_dict(saved["optimizer"])
    record = fresh.train_step(batches[2])
    assert record.loss.item() == expected.loss.item()
    for key in ("pmr/score/strong", "pmr/score/weak", "pmr/beta/strong", "pmr/beta/weak"):
        assert record.logs[key].item() == expected.logs[key].item(), key


# -- compositions and M > 2 ---------------------------------------------------------------------
def test_midas_plus_pmr_runs_and_adds_the_pce_term(tmp_path):
    config = build_config(overrides=TINY, method="midas+pmr")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    assert metrics["method"] == "midas+pmr" and 0 <= metrics["test"]["accuracy"] <= 1
    logs = run_logs(tmp_path / "r")
    assert all(math.isfinite(v) for line in logs for v in line.values())
    assert "loss/pmr_pce" in logs[-1] and "midas/alpha/weak" in logs[-1]
    # one composed step by hand: PMR's term is α·PCE of the slow modality on MIDAS's encoder outputs
    trainer = trainer_for("midas+pmr", ["midas.modulation_starts=0"])
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    batch = next(iter(trainer.train_loader))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    assert {"fused", "unimodal", "misaligned", "pmr_pce"} <= set(record.losses)
    pmr = trainer.method.parts["pmr"]
    with torch.no_grad():
        features = trainer.model.encode(batch.inputs)
        pce = [nn.functional.cross_entropy(prototype_logits(features[m], pmr.prototypes(s)), batch.labels)
               for s, m in enumerate(pmr.modalities)]
    beta = [record.logs[f"pmr/beta/{m}"].item() for m in pmr.modalities]
    assert sorted(beta) == [0.0, 1.0]
    assert record.losses["pmr_pce"].item() == pytest.approx(sum(b * p.item() for b, p in zip(beta, pce)), rel=1e-5)


def test_more_than_two_modalities_rules():
    scores = torch.tensor([3.0, 2.0, 1.0])
    assert pce_weights(scores, 1.0, "below_max").tolist() == [0.0, 1.0, 1.0]
    assert pce_weights(scores, 1.0, "weakest").tolist() == [0.0, 0.0, 1.0]
    assert pce_weights(torch.tensor([3.0, 3.0, 1.0]), 0.5).tolist() == [0.0, 0.0, 0.5]
    assert pce_weights(torch.tensor([2.0, 2.0, 2.0]), 0.5).tolist() == [0.0, 0.0, 0.0]
    assert dominant_mask(scores).tolist() == [True, False, False]


@pytest.mark.parametrize("rule", ["below_max", "weakest"])
def test_three_modality_run(tmp_path, rule):
    config = build_config(overrides=[*TINY3, f"pmr.multi_rule={rule}"], method="joint+pmr")
    metrics = train_run(config, tmp_path / "r", quiet=True)
    assert len(metrics["test"]["modality_accuracy"]) == 3
    logs = run_logs(tmp_path / "r")
    assert all(math.isfinite(v) for line in logs for v in line.values())
    names = ("strong", "weak1", "weak2")
    assert {f"pmr/beta/{m}" for m in names} <= set(logs[0]) and "pmr/ratio" not in logs[0]
    trainer = trainer_for("joint+pmr", [f"pmr.multi_rule={rule}"], overrides=TINY3)
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    record = trainer.train_step(next(iter(trainer.train_loader)))
    scores = torch.tensor([record.logs[f"pmr/score/{m}"].item() for m in names])
    beta = [record.logs[f"pmr/beta/{m}"].item() for m in names]
    assert beta == pce_weights(scores, 1.0, rule).tolist()


def test_config_is_validated():
    with pytest.raises(ConfigError, match="pmr.multi_rule"):
        build_config(overrides=["pmr.multi_rule=mean"], method="pmr")
    with pytest.raises(ConfigError, match="pmr.momentum"):
        build_config(overrides=["pmr.momentum=1.0"], method="pmr")
    with pytest.raises(ConfigError, match="before modulation_starts"):
        part("pmr", modulation_starts=3, modulation_ends=2)
    config = build_config(method="pmr")
    assert config.method == "joint+pmr" and config.section("pmr").alpha == 1.0
    assert config.section("pmr").momentum == 0.2 and config.section("pmr").proto_fraction == 0.1
    with pytest.raises(ValueError, match="train_eval_loader"):
        pmr = part("pmr")
        pmr.on_epoch_start(hand_model(), context())
    assert METHODS.get("pmr").auxiliary_options == ("alpha", "entropy_weight")
