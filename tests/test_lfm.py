"""LFM (an objective): the alignment terms and α's update by hand, the loss it trains, which data the update
reads (never the test split), the lr_α schedule, determinism, the state round trip (α, lr_α, counters), exact
resume, and runs with ARL, OGM-GE and M = 3."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import mmbalance.methods.lfm  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data.loading import load_dataset
from mmbalance.errors import ConfigError
from mmbalance.methods.lfm import (
    alignment_loss,
    alpha_step,
    bmm_js_divergence,
    heuristic_alpha,
    hypergradient,
    info_nce,
    js_divergence,
    lr_alpha_halves,
    modality_pairs,
)
from mmbalance.models.readouts import restricted_logits
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.checkpoint import load_checkpoint

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def lfm(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("lfm")
    return cls(cls.Config(**options), list(modalities), num_classes)


def trainer_for(spec="lfm", extra=(), bundle=None):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True, bundle=bundle)


def run(tmp_path, name, spec="lfm", extra=(), epochs=2):
    config = build_config(overrides=[*TINY, *extra, f"train.epochs={epochs}"], method=spec)
    metrics = train_run(config, tmp_path / name, quiet=True)
    lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return metrics, lines


# -- the alignment term by hand -------------------------------------------------------------------------------

def test_js_alignment_is_zero_for_identical_predictions():
    # spec §14c: with identical unimodal predictions L_align(js) = 0 (and BMM's form too)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert js_divergence(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert bmm_js_divergence(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # logits shifted by a constant give the same prediction: still 0
    assert js_divergence(logits, logits + 5.0).item() == pytest.approx(0.0, abs=1e-6)


def test_js_and_bmm_js_by_hand():
    # p = softmax([0, 0]) = [.5, .5], q = softmax([ln 3, 0]) = [.75, .25], m = [.625, .375]
    # KL(p‖m) = .5 ln(.5/.625) + .5 ln(.5/.375) = 0.0322692603
    # KL(q‖m) = .75 ln(.75/.625) + .25 ln(.25/.375) = 0.0353748908  ->  JS = ½ (sum) = 0.0338220756
    # BMM: ½ [KL(m‖p) + KL(m‖q)] = ½ (0.0315839413 + 0.0380984437) = 0.0348411925 (mixture on the other side)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])
    assert js_divergence(p, q).item() == pytest.approx(0.0338220756, abs=1e-7)
    assert js_divergence(q, p).item() == pytest.approx(0.0338220756, abs=1e-7)  # symmetric
    assert bmm_js_divergence(p, q).item() == pytest.approx(0.0348411925, abs=1e-7)
    # batch mean: the same pair twice plus an agreeing pair -> 2/3 of the value
    both = js_divergence(torch.cat([p, p, p]), torch.cat([q, q, p]))
    assert both.item() == pytest.approx(2 / 3 * 0.0338220756, abs=1e-7)


def test_contrastive_alignment_by_hand():
    # f_a = [[2, 0], [0, 3]] -> normalised I; f_b = [[1, 1], [0, 1]] -> [[1/√2, 1/√2], [0, 1]]; τ = 0.1
    # S = f̂_a f̂_bᵀ / τ = [[7.0711, 0], [7.0711, 10]]
    # a→b (rows of S, targets 0, 1): log(1 + e^-7.0711) = 0.000848, log(1 + e^-2.9289) = 0.052075 -> mean 0.0264617
    # b→a (rows of Sᵀ = [[7.0711, 7.0711], [0, 10]]): log 2 = 0.693147, log(1 + e^-10) = 0.0000454 -> mean 0.3465963
    # L = ½ (0.0264617 + 0.3465963) = 0.1865290. Without the normalisation or with one direction only it differs.
    f_a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    f_b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert info_nce(f_a, f_b, 0.1).item() == pytest.approx(0.18652898, abs=1e-6)
    assert info_nce(f_b, f_a, 0.1).item() == pytest.approx(0.18652898, abs=1e-6)  # symmetric in the pair
    # perfectly matched directions: only e^-10 mass on the negatives
    assert info_nce(torch.eye(2), 5 * torch.eye(2), 0.1).item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-7)
    assert alignment_loss([f_a, f_b], "contrastive", 0.1).item() == pytest.approx(0.18652898, abs=1e-6)


def test_alignment_is_the_mean_over_pairs_for_three_modalities():
    assert modality_pairs(3) == [(0, 1), (0, 2), (1, 2)] and modality_pairs(2) == [(0, 1)]
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(5, 4, generator=g) for _ in range(3)]
    pairwise = [info_nce(feats[a], feats[b], 0.2) for a, b in [(0, 1), (0, 2), (1, 2)]]
    assert alignment_loss(feats, "contrastive", 0.2).item() == pytest.approx(sum(pairwise).item() / 3, rel=1e-6)
    logits = [torch.randn(5, 3, generator=g) for _ in range(3)]
    pairwise = [js_divergence(logits[a], logits[b]) for a, b in [(0, 1), (0, 2), (1, 2)]]
    assert alignment_loss(logits, "js").item() == pytest.approx(sum(pairwise).item() / 3, rel=1e-6)


# -- α's rule by hand ---------------------------------------------------------------------------------------

def test_alpha_step_from_given_gradients_by_hand():
    # ∇L_val = [1, 2], ∇L_align = [3, 1], ∇CE = [1, -1]: ⟨[1, 2], [2, 2]⟩ = 6
    h = hypergradient(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, -1.0]))
    assert h.item() == 6.0 and h.dtype == torch.float64
    # α = 0.5, lr_α = 1e-4, η = 0.1: 0.5 + 1e-4 · 0.1 · 6 = 0.50006 (a flipped sign would give 0.49994)
    assert alpha_step(0.5, h, 1e-4, 0.1).item() == pytest.approx(0.50006, abs=1e-12)
    assert alpha_step(0.5, -h, 1e-4, 0.1).item() == pytest.approx(0.49994, abs=1e-12)


def test_alpha_stays_within_its_bounds():
    # spec §14c: α_al stays within [0.05, 0.95] whatever the step
    assert alpha_step(0.5, 1e9, 1.0, 1.0).item() == 0.95
    assert alpha_step(0.5, -1e9, 1.0, 1.0).item() == 0.05
    assert alpha_step(0.06, -0.5, 0.1, 1.0).item() == 0.05  # 0.06 - 0.05 = 0.01, clipped
    assert alpha_step(0.5, 3.0, 0.1, 1.0, low=0.2, high=0.6).item() == 0.6  # the bounds are options


def test_lr_alpha_halving_and_heuristic_schedules():
    # lr_α halves before the updates for epochs 20, 40, ... (the epoch the new α steers), never for 0
    assert [t for t in range(61) if lr_alpha_halves(t, 20)] == [20, 40, 60]
    assert not any(lr_alpha_halves(t, 0) for t in range(50))
    # heuristic: clip(exp(-0.3 t), 0.05, 0.95): t = 0 -> 1 clipped to 0.95; t = 1 -> 0.7408182; t = 10 -> 0.0498 -> 0.05
    assert heuristic_alpha(0) == 0.95
    assert heuristic_alpha(1) == pytest.approx(0.7408182207, abs=1e-10)
    assert heuristic_alpha(10) == 0.05


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="alpha_init"):
        lfm(alpha_init=0.99)
    with pytest.raises(ConfigError, match="alpha_min"):
        lfm(alpha_min=0.6, alpha_max=0.4, alpha_init=0.5)
    part = lfm()
    with pytest.raises(ConfigError, match="alignment=contrastive"):
        part.setup(SimpleNamespace(feature_dims={"a": 8, "b": 4}), None)
    lfm(alignment="js").setup(SimpleNamespace(feature_dims={"a": 8, "b": 4}), None)  # js compares logits: fine


# -- the loss it trains -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alignment", ["contrastive", "js", "js,score_logits=heads"])
def test_loss_terms_are_weighted_by_alpha(alignment):
    trainer = trainer_for(f"lfm[alignment={alignment}]")
    part = trainer.method.objective
    part.alpha.fill_(0.25)
    batch = next(iter(trainer.train_loader))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    features = trainer.model.encode(batch.inputs)
    ce = torch.nn.functional.cross_entropy(trainer.model.fuse(features), batch.labels)
    if alignment == "contrastive":
        align = info_nce(features["strong"], features["weak"], 0.1)
    elif alignment == "js":
        d = restricted_logits(trainer.model.fuse, features, ["strong", "weak"])
        align = js_divergence(d[0], d[1])
    else:  # the unimodal heads' predictions, with gradient
        u = trainer.model.heads(features)
        align = js_divergence(u["strong"], u["weak"])
    # L = 2 · (0.75 · CE + 0.25 · L_align)
    assert record.losses["fused"].item() == pytest.approx(2 * 0.75 * ce.item(), rel=1e-6)
    assert record.losses["alignment"].item() == pytest.approx(2 * 0.25 * align.item(), rel=1e-6)
    assert set(record.losses) == {"fused", "alignment", "probe"}
    assert record.logs["lfm/alpha"].item() == 0.25
    assert set(record.unimodal) == {"strong", "weak"}  # probe logits for plugins and diagnostics


def test_heuristic_alpha_follows_the_epoch():
    trainer = trainer_for("lfm[alpha_update=heuristic]")
    batch = next(iter(trainer.train_loader))
    for epoch, expected in [(0, 0.95), (1, math.exp(-0.3)), (20, 0.05)]:
        trainer.ctx.epoch = epoch
        record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
        assert record.logs["lfm/alpha"].item() == pytest.approx(expected, rel=1e-6)
    assert trainer.method.on_epoch_end(trainer.model, trainer.ctx)["lfm/next_alpha"] == 0.05
    assert trainer.method.objective.updates.item() == 0  # nothing is learnt


# -- α's update on the run ---------------------------------------------------------------------------------------

def test_update_from_given_heldout_quantities(monkeypatch):
    # the end of epoch 19 learns α for epoch 20: lr_α = 10 halves to 5 first; η = train.lr = 1e-3; h = 6
    # α = 0.05 + 5 · 1e-3 · 6 = 0.08
    trainer = trainer_for("lfm[lr_alpha=10.0]")
    part = trainer.method.objective
    given = (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, -1.0]))
    monkeypatch.setattr(part, "estimate_gradients", lambda model, ctx: given)
    trainer.ctx.epoch = 19
    logs = trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert part.alpha.item() == pytest.approx(0.08, abs=1e-12)
    assert part.lr_alpha.item() == 5.0 and part.halvings.item() == 1 and part.updates.item() == 1
    assert logs == {"lfm/next_alpha": pytest.approx(0.08, abs=1e-12), "lfm/hypergradient": 6.0,
                    "lfm/lr_alpha": 5.0, "lfm/updates": 1.0}
    trainer.ctx.epoch = 20  # for epoch 21: no halving; 0.08 + 5 · 1e-3 · 6 = 0.11
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert part.alpha.item() == pytest.approx(0.11, abs=1e-12) and part.lr_alpha.item() == 5.0
    # virtual_lr replaces η: 0.05 + 10 · 1 · 6 -> clipped at 0.95
    other = trainer_for("lfm[lr_alpha=10.0,virtual_lr=1.0]")
    monkeypatch.setattr(other.method.objective, "estimate_gradients", lambda model, ctx: given)
    other.method.on_epoch_end(other.model, other.ctx)
    assert other.method.objective.alpha.item() == 0.95


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def test_update_uses_heldout_and_training_gradients_in_eval_mode():
    trainer = trainer_for("lfm[lr_alpha=100.0]", ["model.dropout=0.3"])
    model, ctx, part = trainer.model, trainer.ctx, trainer.method.objective
    params = [p for m in ctx.modalities for p in ctx.params.encoder[m]] + list(ctx.params.fusion)
    # the expected hypergradient, from the first held-out and the first training batch, with dropout off
    model.eval()
    held = next(iter(ctx.heldout_loader))
    g_val = flat_grad(torch.nn.functional.cross_entropy(model(held.inputs), held.labels), params)
    train = next(iter(ctx.train_eval_loader))
    features = model.encode(train.inputs)
    g_ce = flat_grad(torch.nn.functional.cross_entropy(model.fuse(features), train.labels), params)
    g_al = flat_grad(info_nce(features["strong"], features["weak"], 0.1), params)
    model.train()
    h = g_val.double().dot(g_al.double() - g_ce.double()).item()
    trainer.method.on_epoch_end(model, ctx)
    assert part.last_hypergradient.item() == pytest.approx(h, rel=1e-5)
    assert part.alpha.item() == pytest.approx(min(0.95, max(0.05, 0.05 + 100 * 1e-3 * h)), rel=1e-5)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


class Sentinel(torch.utils.data.Dataset):
    """A split that counts its reads and refuses them while ``closed``."""

    def __init__(self, base, name):
        self.base, self.labels, self.modalities, self.name = base, base.labels, base.modalities, name
        self.closed, self.reads = False, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        assert not self.closed, f"the {self.name} split was read by the α update"
        self.reads += 1
        return self.base[i]

    def input_dtype(self, modality):
        return self.base.input_dtype(modality)

    def __getitems__(self, indices):
        assert not self.closed, f"the {self.name} split was read by the α update"
        self.reads += len(indices)
        return self.base.__getitems__(indices)


class Refused:
    def __iter__(self):
        raise AssertionError("the shuffled training loader is not the α update's")


def sentinel_trainer(spec, heldout):
    config = build_config(overrides=[*TINY, f"data.heldout={heldout}", "train.eval_batch_size=16"], method=spec)
    bundle = load_dataset(config)
    splits = {name: Sentinel(getattr(bundle, name), name) for name in ("train", "val", "test")}
    for name, split in splits.items():
        setattr(bundle, name, split)
    trainer = Trainer(config, None, quiet=True, bundle=bundle)
    trainer.ctx.train_loader = Refused()
    return trainer, splits


def test_alpha_update_never_reads_the_test_split():
    # data.heldout=val (default): ∇L_val from one validation batch, the training gradients from one training
    # batch (fixed order); the test split stays closed (BMM reads it when a dataset has no validation split)
    trainer, splits = sentinel_trainer("lfm", "val")
    splits["test"].closed = True
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert trainer.method.objective.updates.item() == 1
    assert splits["val"].reads == 16 and splits["train"].reads == 16 and splits["test"].reads == 0


def test_alpha_update_with_a_carved_heldout_reads_training_data_only():
    trainer, splits = sentinel_trainer("lfm", "carve")
    splits["val"].closed = splits["test"].closed = True
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert trainer.method.objective.updates.item() == 1
    heldout = min(16, len(trainer.heldout_data))  # one held-out batch, carved from the training split
    assert splits["train"].reads == 16 + heldout and splits["val"].reads == splits["test"].reads == 0


def test_update_data_heldout_reads_the_heldout_batches_only():
    # BMM's estimate: every gradient from the held-out batches (here 2 of them)
    trainer, splits = sentinel_trainer("lfm[update_data=heldout,heldout_batches=2]", "val")
    splits["train"].closed = splits["test"].closed = True
    trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert trainer.method.objective.updates.item() == 1 and splits["val"].reads == 32


def test_update_at_epoch_start_steers_the_epoch_it_starts(monkeypatch):
    trainer = trainer_for("lfm[update_at=epoch_start,lr_alpha=10.0,lr_alpha_halving=2]")
    part = trainer.method.objective
    given = (torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0]))  # h = 2
    monkeypatch.setattr(part, "estimate_gradients", lambda model, ctx: given)
    trainer.ctx.epoch = 2  # the start of epoch 2 learns α for epoch 2: halving due (2 % 2 == 0)
    trainer.method.on_epoch_start(trainer.model, trainer.ctx)
    assert part.alpha.item() == pytest.approx(0.05 + 5 * 1e-3 * 2, abs=1e-12) and part.halvings.item() == 1
    logs = trainer.method.on_epoch_end(trainer.model, trainer.ctx)  # nothing more at the end
    assert part.updates.item() == 1 and "lfm/next_alpha" not in logs


# -- determinism, state, resume ---------------------------------------------------------------------------------------

MOVING = "lfm[lr_alpha=1000.0,lr_alpha_halving=1]"  # α moves visibly and lr_α halves every epoch


def test_runs_are_deterministic(tmp_path):
    first, lines_a = run(tmp_path, "a", MOVING, epochs=3)
    second, lines_b = run(tmp_path, "b", MOVING, epochs=3)
    assert [l["method"] for l in lines_a] == [l["method"] for l in lines_b]
    alphas = [l["method"]["lfm/next_alpha"] for l in lines_a]
    assert len(set(alphas)) > 1 and all(0.05 <= a <= 0.95 for a in alphas)
    assert [l["method"]["lfm/lr_alpha"] for l in lines_a] == [500.0, 250.0, 125.0]
    assert first["test"] == second["test"]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in "ab"]
    for part in ("model", "method"):
        for key, value in last[0][part].items():
            assert torch.equal(value, last[1][part][key]), key


def test_state_round_trip_holds_alpha_its_lr_and_the_counters():
    trainer = trainer_for(MOVING, ["train.epochs=5"])
    batches = list(trainer.train_loader)[:3]
    for epoch in range(2):
        trainer.ctx.epoch = epoch
        trainer.train_step(batches[epoch])
        trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    part = trainer.method.objective
    state = trainer.method.state_dict()
    assert state["parts.lfm.updates"].item() == 2 and state["parts.lfm.halvings"].item() == 2
    assert state["parts.lfm.lr_alpha"].item() == 250.0
    assert state["parts.lfm.alpha"].item() == part.alpha.item() != 0.05

    fresh = trainer_for(MOVING, ["train.epochs=5"])
    fresh.model.load_state_dict(trainer.model.state_dict())
    fresh.method.load_state_dict(state)
    restored = fresh.method.objective
    for name in ("alpha", "lr_alpha", "updates", "halvings", "last_hypergradient"):
        assert torch.equal(getattr(restored, name), getattr(part, name)), name
    fresh.optimizers["main"].load_state_dict(copy.deepcopy(trainer.optimizers["main"].state_dict()))  # no shared moments
    fresh.ctx.epoch = trainer.ctx.epoch = 2
    assert fresh.train_step(batches[2]).loss.item() == trainer.train_step(batches[2]).loss.item()
    assert fresh.method.on_epoch_end(fresh.model, fresh.ctx) == trainer.method.on_epoch_end(trainer.model, trainer.ctx)
    assert restored.lr_alpha.item() == 125.0 and restored.updates.item() == 3


def test_resume_is_exact(tmp_path, monkeypatch):
    config = build_config(overrides=[*TINY, "train.epochs=3"], method=MOVING)
    full = train_run(config, tmp_path / "full", quiet=True)
    original = Trainer._train_epoch

    def stops(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", stops)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "stopped", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    logs = [[json.loads(l)["method"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "stopped")]
    assert logs[0] == logs[1]
    last = [load_checkpoint(tmp_path / n / "last.pt") for n in ("full", "stopped")]
    assert last[0]["method"]["parts.lfm.updates"].item() == 3
    for key, value in last[0]["method"].items():
        assert torch.equal(value, last[1]["method"][key]), key


# -- composition and M = 3 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["lfm+arl[modulation_starts=0]", "lfm[alignment=js]+ogm_ge"])
def test_lfm_composes_with_gradient_plugins(spec, tmp_path):
    metrics, lines = run(tmp_path, "r", spec)
    assert metrics["parts"] == ["lfm", "arl" if "arl" in spec else "ogm_ge"]
    assert all(math.isfinite(l["train_loss"]) for l in lines)
    assert all(math.isfinite(v) for l in lines for v in l["method"].values())
    assert [l["method"]["lfm/updates"] for l in lines] == [1.0, 2.0]
    if "arl" in spec:
        assert lines[0]["method"]["arl/accelerating"] == 1.0 and "loss/arl_unimodal" in lines[0]["method"]


@pytest.mark.parametrize("alignment", ["contrastive", "js"])
def test_three_modalities(alignment, tmp_path):
    metrics, lines = run(tmp_path, "r", f"lfm[alignment={alignment},lr_alpha=1000.0]", M3)
    assert len(metrics["test"]["modality_accuracy"]) == 3
    assert all(math.isfinite(l["train_loss"]) and l["method"]["lfm/alignment"] > 0 for l in lines)
    assert all(0.05 <= l["method"]["lfm/next_alpha"] <= 0.95 for l in lines)
    # the step's alignment is the mean of the three pairwise terms
    trainer = trainer_for(f"lfm[alignment={alignment}]", M3)
    batch = next(iter(trainer.train_loader))
    record = trainer.method.training_step(trainer.model, batch, trainer.ctx)
    names = trainer.ctx.modalities
    if alignment == "contrastive":
        terms = [info_nce(record.features[names[a]], record.features[names[b]]) for a, b in modality_pairs(3)]
    else:
        d = record.restricted_logits()
        terms = [js_divergence(d[a], d[b]) for a, b in modality_pairs(3)]
    assert record.logs["lfm/alignment"].item() == pytest.approx(sum(t.item() for t in terms) / 3, rel=1e-6)
