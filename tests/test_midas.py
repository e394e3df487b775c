"""The MIDAS objective: warm-up and window, named loss terms, α's update from the record, and full runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import ModelConfig, build_config
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods.base import Plugin
from mmbalance.methods.compose import Method
from mmbalance.methods.midas import STATS
from mmbalance.methods.record import StepRecord
from mmbalance.models import Encoder, build_model
from mmbalance.models.fusion import SumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.registry import METHODS
from mmbalance.training import Trainer, resume_run, train_run
from mmbalance.training.context import TrainContext
from mmbalance.training.distributed import DistributedState

LN = math.log

# The hand batch's unimodal cross-entropies (heads are identities, features are logits):
# a: sample 0 [ln 9, 0] gives its label 0.9, sample 1 [0, ln 4] gives 0.8 -> (ln 10/9 + ln 5/4) / 2 ~ 0.164252
# b: [ln 7, ln 3] for both gives 0.7 (label 0) and 0.3 (label 1)      -> (ln 10/7 + ln 10/3) / 2 ~ 0.780324
HAND_CE_A = (LN(10 / 9) + LN(5 / 4)) / 2
HAND_CE_B = (LN(10 / 7) + LN(10 / 3)) / 2


def context(epoch=0, max_epochs=10, seed=0):
    return TrainContext(
        epoch=epoch, max_epochs=max_epochs, steps_per_epoch=1, device=torch.device("cpu"), modalities=[],
        num_classes=3, generator=torch.Generator().manual_seed(seed), dist=DistributedState(),
    )


def midas(modalities=("a", "b"), num_classes=3, **options):
    cls = METHODS.get("midas")
    return cls(cls.Config(**options), list(modalities), num_classes)


def small_model(modalities=("a", "b"), fusion="concat"):
    shapes = {m: (3 + k,) for k, m in enumerate(modalities)}
    return build_model(ModelConfig(feature_dim=4, hidden_dim=8, fusion=fusion), list(modalities), shapes, 3)


def small_batch(modalities=("a", "b")):
    torch.manual_seed(0)
    inputs = {m: torch.randn(6, 3 + k) for k, m in enumerate(modalities)}
    return Batch(inputs, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))


class Identity(Encoder):
    def forward(self, x):
        return x


def hand_model():
    """Inputs are features, features are the heads' logits, fusion sums them (test_misalignment's hand batch)."""
    model = MultimodalModel({m: Identity((2,), 2) for m in "ab"}, SumFusion({"a": 2, "b": 2}, 2), 2)
    with torch.no_grad():
        for layer in [*model.fusion.linears.values(), *model.unimodal_heads.values()]:
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    inputs = {"a": torch.tensor([[LN(9), 0.0], [0.0, LN(4)]]), "b": torch.tensor([[LN(7), LN(3)], [LN(7), LN(3)]])}
    return model, Batch(inputs, torch.tensor([0, 1]), torch.arange(2))


def hand_stats(confidence, fused_confidence, count=4.0):
    """A ``midas/stats`` entry as the objective publishes it (the official-rule fields are not read by the paper rule)."""
    return {
        "confidence": torch.tensor(confidence),
        "fused_confidence": torch.tensor(fused_confidence),
        "unimodal_confidence": torch.tensor([0.5, 0.5]),
        "fused_probability": torch.tensor([0.5, 0.5]),
        "count": torch.tensor(count),
    }


def record_with(stats=None, modalities=("a", "b")):
    """A record holding only (optionally) MIDAS's statistics: what after_step reads."""
    batch = Batch({m: torch.zeros(1, 1) for m in modalities}, torch.tensor([0]), torch.arange(1))
    record = StepRecord(batch=batch, fuse=lambda f: None, modalities=list(modalities))
    if stats is not None:
        record.shared[STATS] = stats
    return record


def test_total_loss_of_the_hand_batch():
    model, batch = hand_model()
    method = midas(num_classes=2, lam=2.0, modulation_starts=0)
    result = method.training_step(model, batch, context())
    # aligned fused: sample 0 [ln 63, ln 3] -> p(0) = 21/22; sample 1 [ln 7, ln 12] -> p(1) = 12/19
    align = (LN(22 / 21) + LN(19 / 12)) / 2  # ~ 0.253026
    unimodal = HAND_CE_A + HAND_CE_B  # the paper sums them: ~ 0.944576
    # the only partners are 0 <-> 1, both anchors kept: rows (a_0, b_1), (a_1, b_0) [shift 0 of anchors 0, 1]
    # and their mirrors (a_1, b_0), (a_0, b_1) [shift 1]. α = 1. Per row:
    # (a_0, b_1): c = (0.75, 0.25), p~ = (21/22, 1/22)              -> term T0 ~ 0.807651
    # (a_1, b_0): c = (8/15, 7/15), p~ = (12/19, 7/19) (a on label 1) -> term T1 ~ 0.711064
    # hard weights: shift-0 rows replace slot b, s = cos(f^b_0, f^b_1) = 1, w = 2;
    #               shift-1 rows replace slot a, s = cos([ln 9, 0], [0, ln 4]) = 0, w = 1.5
    # mean over the 4 rows: (2 T0 + 2 T1 + 1.5 T1 + 1.5 T0) / 4 = 0.875 (T0 + T1) ~ 1.328875
    t0 = -(0.75 * LN(21 / 22) + 0.25 * LN(1 / 22))
    t1 = -(8 / 15 * LN(12 / 19) + 7 / 15 * LN(7 / 19))
    misaligned = 0.875 * (t0 + t1)
    assert set(result.losses) == {"fused", "unimodal", "misaligned"}
    assert result.losses["fused"].item() == pytest.approx(align, rel=1e-5)
    assert result.losses["unimodal"].item() == pytest.approx(unimodal, rel=1e-5)
    assert result.losses["misaligned"].item() == pytest.approx(2.0 * misaligned, rel=1e-5)  # λ-weighted
    assert result.loss_logs()["loss/misaligned"].item() == pytest.approx(2.0 * misaligned, rel=1e-5)
    assert result.loss.item() == pytest.approx(align + unimodal + 2.0 * misaligned, rel=1e-5)  # ~ 3.855353
    assert result.logs["midas/misaligned_samples"].item() == 4  # each anchor emits both swaps: every row twice
    assert result.logs["midas/confidence/b"].item() == pytest.approx((0.25 + 7 / 15) / 2, rel=1e-5)
    assert result.logs["midas/fused_confidence/b"].item() == pytest.approx((1 / 22 + 7 / 19) / 2, rel=1e-5)
    # α moves after the step: α_b = 1 + 0.05 * ((0.25 + 7/15)/2 - (1/22 + 7/19)/2) ~ 1.0075698
    method.after_step(result, context())
    delta = (0.25 + 7 / 15) / 2 - (1 / 22 + 7 / 19) / 2
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.0, 1 + 0.05 * delta]))
    assert method.on_epoch_end(model, context())["midas/alpha/b"] == pytest.approx(1 + 0.05 * delta, rel=1e-6)


@pytest.mark.parametrize("starts", [0, 1], ids=["main", "warmup"])
def test_unimodal_term_is_summed_in_the_paper_and_averaged_in_the_official_variant(starts):
    model, batch = hand_model()
    paper = midas(num_classes=2, modulation_starts=starts).training_step(model, batch, context())
    official = midas(num_classes=2, modulation_starts=starts, variant="official").training_step(model, batch, context())
    # paper: Σ_m CE(u_m, y) = 0.164252 + 0.780324 ~ 0.944576; official: the mean over the 2 modalities ~ 0.472288
    assert paper.losses["unimodal"].item() == pytest.approx(HAND_CE_A + HAND_CE_B, rel=1e-5)
    assert official.losses["unimodal"].item() == pytest.approx((HAND_CE_A + HAND_CE_B) / 2, rel=1e-5)
    # the fused term is the same in both (0 in warm-up, where it is not recorded)
    assert ("fused" in paper.losses) == ("fused" in official.losses) == (starts == 0)
    if starts == 0:
        assert official.losses["fused"].item() == pytest.approx(paper.losses["fused"].item(), rel=1e-6)


def test_warmup_trains_heads_only_and_alpha_restarts_at_one():
    model, method = small_model(), midas(modulation_starts=1)
    batch = small_batch()
    result = method.training_step(model, batch, context(epoch=0))
    features = model.encode(batch.inputs)
    expected = sum(F.cross_entropy(z, batch.labels) for z in model.heads(features).values())
    assert set(result.losses) == {"unimodal"}
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(k.startswith("midas/") for k in result.logs)
    assert STATS not in result.shared
    model.zero_grad()
    result.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("fusion"))  # no task loss reaches the fusion head
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(("encoders", "unimodal_heads")))
    method.after_step(result, context(epoch=0))
    assert torch.equal(method.misalignment.alpha, torch.ones(2))
    assert method.on_epoch_end(model, context(epoch=0))["midas/warmup"] == 1.0

    method.misalignment.alpha.fill_(3.0)
    method.on_epoch_start(model, context(epoch=1))  # main training starts
    assert torch.equal(method.misalignment.alpha, torch.ones(2))
    assert method.on_epoch_end(model, context(epoch=1))["midas/warmup"] == 0.0
    assert "misaligned" in method.training_step(model, batch, context(epoch=1)).losses


def test_warmup_length():
    assert midas().warmup_epochs(70) == 10  # modulation_starts unset: 1/7 of the epochs, the authors' 10 of 70
    assert midas().warmup_epochs(2) == 0  # round(2/7) = 0
    assert midas(modulation_starts=3).warmup_epochs(70) == 3
    assert midas(modulation_starts=0).warmup_epochs(70) == 0  # no warm-up
    assert build_config(method="midas[modulation_starts=0]").section("midas").modulation_starts == 0
    assert build_config(method="midas").section("midas").modulation_starts is None


def test_window_warmup_then_misaligned_then_aligned_only():
    # train.epochs = 5, modulation_starts = 2, modulation_ends = 3:
    # epochs 0, 1 warm-up (unimodal only); 2, 3 all three terms; 4 the aligned terms only
    model, method = small_model(), midas(modulation_starts=2, modulation_ends=3, eta=1.0)
    batch = small_batch()
    expected_terms = [{"unimodal"}] * 2 + [{"fused", "unimodal", "misaligned"}] * 2 + [{"fused", "unimodal"}]
    for epoch, terms in enumerate(expected_terms):
        ctx = context(epoch=epoch, max_epochs=5)
        if epoch == 2:
            method.misalignment.alpha.fill_(3.0)
        if epoch == 4:
            method.misalignment.alpha.copy_(torch.tensor([1.5, 2.0]))
        method.on_epoch_start(model, ctx)
        if epoch == 2:
            assert torch.equal(method.misalignment.alpha, torch.ones(2))  # reset when the window opens
        before = method.misalignment.alpha.clone()
        record = method.training_step(model, batch, ctx)
        assert set(record.losses) == terms, epoch
        assert (STATS in record.shared) == ("misaligned" in terms), epoch
        assert any(k.startswith("midas/confidence/") for k in record.logs) == ("misaligned" in terms), epoch
        method.after_step(record, ctx)
        if "misaligned" not in terms:  # no statistics, no step: α stays (1 in warm-up, 1.5 / 2.0 after the window)
            assert torch.equal(method.misalignment.alpha, before), epoch
        logs = method.on_epoch_end(model, ctx)
        assert logs["midas/warmup"] == (1.0 if epoch < 2 else 0.0)
    assert torch.equal(method.misalignment.alpha, torch.tensor([1.5, 2.0]))  # epoch 4 did not move it


def test_window_is_checked():
    with pytest.raises(ConfigError, match=r"modulation_ends \(1\) is before modulation_starts \(2\)"):
        midas(modulation_starts=2, modulation_ends=1)
    # unset modulation_starts: the warm-up is round(70 / 7) = 10 epochs, so ending at 3 leaves no window;
    # refused in setup, before training, not when epoch 10 is reached
    late = midas(modulation_ends=3)
    with pytest.raises(ConfigError, match=r"modulation_ends \(3\) is before modulation_starts \(10\)"):
        late.setup(small_model(), context(max_epochs=70))
    late.setup(small_model(), context(max_epochs=14))  # round(14 / 7) = 2 <= 3: a window of epochs 2-3


def test_alpha_moves_in_after_step_from_the_record_stats():
    method = midas(eta=0.5)
    # paper rule: m^ = argmin mean c = b (0.3 < 0.7); Δ = mean c_b - mean q_b = 0.3 - 0.2 = 0.1;
    # α_b = max(1, 1 + 0.5 * 0.1) = 1.05, α_a stays 1
    method.after_step(record_with(hand_stats([0.7, 0.3], [0.8, 0.2])), context())
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.0, 1.05]))
    # a record without statistics leaves α alone
    method.after_step(record_with(), context())
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.0, 1.05]))
    # now a is the weaker (0.4 < 0.6): Δ = 0.4 - 0.1 = 0.3, α_a = 1 + 0.5 * 0.3 = 1.15; α_b keeps 1.05
    method.after_step(record_with(hand_stats([0.4, 0.6], [0.1, 0.9])), context())
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.15, 1.05]))
    # Δ < 0 lowers α_a, never below 1: 1.15 + 0.5 * (0.4 - 0.9) = 0.9 -> 1
    method.after_step(record_with(hand_stats([0.4, 0.6], [0.9, 0.1])), context())
    assert torch.allclose(method.misalignment.alpha, torch.tensor([1.0, 1.05]))
    # the sign rule: α_b = 1 + 0.5 * sign(0.1) = 1.5
    signed = midas(eta=0.5, alpha_rule="sign")
    signed.after_step(record_with(hand_stats([0.7, 0.3], [0.8, 0.2])), context())
    assert torch.allclose(signed.misalignment.alpha, torch.tensor([1.0, 1.5]))


def test_alpha_reads_the_record_it_is_given_not_the_last_step():
    model, batch = small_model(), small_batch()
    method = midas(modulation_starts=0, eta=0.5)
    first = method.training_step(model, batch, context(seed=1))
    method.training_step(model, batch, context(seed=2))  # a later step: its statistics must not be the ones used
    stats = first.shared[STATS]
    weak = int(stats["confidence"].argmin())
    expected = torch.ones(2)
    expected[weak] = max(1.0, 1 + 0.5 * float(stats["confidence"][weak] - stats["fused_confidence"][weak]))
    method.misalignment.alpha.fill_(1.0)
    method.after_step(first, context())
    assert torch.allclose(method.misalignment.alpha, expected)


class Meddler(Plugin):
    """A plugin busy in every hook: its own loss term, shared value, logs and after_step."""

    def before_step(self, batch, ctx):
        self.steps = getattr(self, "steps", 0) + 1

    def on_forward(self, record, ctx):
        record.add_loss("meddler", 0.1 * record.logits.square().mean())
        record.shared["meddler/note"] = torch.tensor(1.0)

    def after_step(self, record, ctx):
        record.logs["meddler/after"] = torch.tensor(1.0)


def test_alpha_moves_with_a_plugin_in_the_method():
    model, batch = small_model(), small_batch()
    alone = midas(modulation_starts=0, eta=0.5)
    objective = midas(modulation_starts=0, eta=0.5)
    composed = Method([objective, Meddler(Plugin.Config(), ["a", "b"], 3)])
    for part in (alone, objective):
        part.misalignment.alpha.fill_(2.0)  # from 2, α_weak moves whatever the sign of Δ
    record = composed.training_step(model, batch, context(seed=4))
    assert set(record.losses) == {"fused", "unimodal", "misaligned", "meddler"}
    composed.after_step(record, context(seed=4))
    stats = record.shared[STATS]
    weak = int(stats["confidence"].argmin())
    expected = torch.full((2,), 2.0)
    expected[weak] = max(1.0, 2.0 + 0.5 * float(stats["confidence"][weak] - stats["fused_confidence"][weak]))
    assert not torch.equal(expected, torch.full((2,), 2.0))  # α moved, so the comparison means something
    assert torch.allclose(objective.misalignment.alpha, expected)
    # and exactly as without the plugin: the same model, batch and generator
    alone_record = alone.training_step(model, batch, context(seed=4))
    alone.after_step(alone_record, context(seed=4))
    assert torch.allclose(alone.misalignment.alpha, objective.misalignment.alpha)
    assert record.logs["meddler/after"].item() == 1.0  # the plugin's after_step ran too
    assert [m.name for m in composed.metrics()] == ["midas/alpha"]


def test_feature_and_input_level_give_the_same_loss():
    batch = small_batch()
    model = small_model()
    results = [midas(level=level, modulation_starts=0).training_step(model, batch, context(seed=3)) for level in ("feature", "input")]
    assert results[0].loss.item() == pytest.approx(results[1].loss.item(), rel=1e-6)
    assert results[0].losses["misaligned"].item() == pytest.approx(results[1].losses["misaligned"].item(), rel=1e-6)
    assert results[0].logs["midas/confidence/a"] == pytest.approx(results[1].logs["midas/confidence/a"])


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_three_modalities_with_any_fusion(fusion):
    modalities = ("x", "y", "z")
    model, method = small_model(modalities, fusion), midas(modalities, modulation_starts=0, eta=1.0)
    ctx = context()
    result = method.training_step(model, small_batch(modalities), ctx)
    result.loss.backward()
    assert math.isfinite(result.loss.item())
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert result.logs["midas/misaligned_samples"].item() == 18  # 6 anchors (all have a partner) x 3 shifts
    assert sum(result.logs[f"midas/confidence/{m}"].item() for m in modalities) == pytest.approx(1.0)
    method.after_step(result, ctx)
    logs = method.on_epoch_end(model, ctx)
    assert {f"midas/alpha/{m}" for m in modalities} <= set(logs)
    assert sum(logs[f"midas/alpha/{m}"] != 1.0 for m in modalities) <= 1  # at most the weakest moved


def test_state_dict_keeps_alpha():
    method = midas()
    method.misalignment.alpha.copy_(torch.tensor([1.25, 2.0]))
    restored = midas()
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.misalignment.alpha, torch.tensor([1.25, 2.0]))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="midas.similarity"):
        build_config(overrides=["midas.similarity=dot"], method="midas")
    with pytest.raises(ConfigError, match="midas.lamda"):
        build_config(overrides=["midas.lamda=2"], method="midas")
    for removed in ("warmup=false", "warmup_epochs=3"):  # replaced by modulation_starts
        with pytest.raises(ConfigError, match="midas.warmup"):
            build_config(overrides=[f"midas.{removed}"], method="midas")
    assert build_config(overrides=["midas.variant=official"], method="midas").section("midas").alpha_max == 10.0


def test_metrics_hold_alpha_and_the_misaligned_loss(tmp_path, tiny_overrides):
    config = build_config(overrides=tiny_overrides + ["midas.eta=1.0"], method="midas")  # 2 epochs: no warm-up
    metrics = train_run(config, tmp_path, quiet=True)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert {"loss/misaligned", "loss/fused", "loss/unimodal", "midas/alpha/strong", "midas/alpha/weak"} <= set(line["method"])
        assert line["method"]["midas/warmup"] == 0.0
        assert set(line["val"]["midas/alpha"]) == {"strong", "weak"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    best = lines[saved["best_epoch"] - 1]["method"]
    for split in ("val", "test"):
        # evaluated with the best checkpoint: its α is the one logged at the end of that epoch
        assert saved[split]["midas/alpha"] == {m: best[f"midas/alpha/{m}"] for m in ("strong", "weak")}
        assert saved[split]["midas/alpha"] == metrics[split]["midas/alpha"]
        assert all(a >= 1.0 for a in saved[split]["midas/alpha"].values())


class Killed(Exception):
    pass


def test_runs_log_alpha_and_are_deterministic_and_resumable(tmp_path, tiny_overrides, monkeypatch):
    overrides = tiny_overrides + ["train.epochs=3", "train.lr=0.01", "midas.modulation_starts=1", "midas.eta=1.0"]
    config = build_config(overrides=overrides, method="midas")

    def trajectory(run):
        lines = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(l["method"]["midas/warmup"], l["method"]["midas/alpha/strong"], l["method"]["midas/alpha/weak"]) for l in lines]

    first = train_run(config, tmp_path / "first", quiet=True)
    second = train_run(config, tmp_path / "second", quiet=True)
    assert [w for w, *_ in trajectory("first")] == [1.0, 0.0, 0.0]
    assert any(a != 1.0 for _, *alphas in trajectory("first") for a in alphas)  # α moved, so the comparison means something
    assert trajectory("first") == trajectory("second")
    assert first["test"] == second["test"]
    lines = [json.loads(l) for l in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/misaligned" not in lines[0]["method"] and "loss/fused" not in lines[0]["method"]  # warm-up epoch
    assert {"loss/misaligned", "midas/confidence/weak", "midas/fused_confidence/strong"} <= set(lines[-1]["method"])

    original = Trainer._train_epoch

    def dies_in_last_epoch(self, epoch):
        if epoch == 2:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", dies_in_last_epoch)
    with pytest.raises(Killed):
        train_run(config, tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "resumed", quiet=True)
    assert trajectory("resumed") == trajectory("first")
    assert resumed["test"] == first["test"]
