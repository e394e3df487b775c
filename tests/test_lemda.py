"""LeMDA (an objective with two optimizers): the spec's "G = identity ⇒ L_task = 2·CE(z)", the consistency
mask and KL, the VAE's KL and reparameterisation by hand; through the trainer: each network moves only
through its own optimizer (no gradient crosses), G's gradient is exactly that of its loss, G steps every k-th
step only, both optimizers' states are checkpointed; §16 (determinism, state round trip mid-epoch), an exact
resume after a real SIGKILL, and runs with plugins (lemda+arl, lemda+ogm_ge) and with M = 2 and 3."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import mmbalance  # noqa: F401  (registers arl, ogm_ge)
import mmbalance.methods.lemda  # noqa: F401
from mmbalance.config import build_config
from mmbalance.methods.lemda import (
    AUGMENTER,
    NOISE,
    TASK,
    concat_features,
    confidence_mask,
    consistency_loss,
    gaussian_kl,
    reparameterize,
    split_features,
)
from mmbalance.training import Trainer, train_run

TINY = [
    "synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2",
    "synthetic.dims=[8,8]", "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16",
]
M3 = ["synthetic.num_modalities=3", "synthetic.dims=[8,8,8]"]


def trainer(spec="lemda", extra=()):
    return Trainer(build_config(overrides=[*TINY, *extra], method=spec), None, quiet=True)


def first_batch(t):
    return next(iter(t.train_loader))


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def lemda_of(t):
    return t.method.objective


# -- the spec's "Test it by": with G = identity, L_task = 2·CE(z) --------------------------------------------
@pytest.mark.parametrize("augmenter", ["vae", "mlp"])
def test_with_an_identity_augmenter_the_task_loss_is_twice_the_cross_entropy(augmenter):
    # G's last layer starts at zero, so f̂ = x + 0 = x whatever the noise: fuse(f̂) = fuse(f) = z exactly
    t = trainer(f"lemda[augmenter={augmenter}]")
    batch = first_batch(t)
    record = t.method.training_step(t.model, batch, t.ctx)
    ce = F.cross_entropy(record.logits, batch.labels)
    assert torch.equal(record.losses["augmented"], record.losses["fused"])
    assert torch.allclose(record.losses["fused"] + record.losses["augmented"], 2 * ce, rtol=0, atol=1e-6)
    # the released code averages CE over the 2B rows: ½ CE(z) + ½ CE(ẑ) = CE(z)
    official = trainer(f"lemda[augmenter={augmenter},variant=official]")
    official.model.load_state_dict(t.model.state_dict())
    record = official.method.training_step(official.model, batch, official.ctx)
    assert torch.allclose(record.losses["fused"] + record.losses["augmented"], ce, rtol=0, atol=1e-6)
    # and, with p(ẑ) = p(z), its consistency term on the fusion head is 0
    assert record.losses["consistency_head"].item() == pytest.approx(0.0, abs=1e-7)


# -- hand values: the consistency mask and KL on a tiny example ----------------------------------------------
def test_consistency_mask_and_kl_by_hand():
    # sample 1: z = (2, 0), p = (e²/(e²+1), 1/(e²+1)) = (0.880797, 0.119203), max 0.88 > 0.5: confident;
    # sample 2: z = (0, 0), p = (0.5, 0.5), max 0.5 is not > 0.5 (strict): masked out.
    original = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    augmented = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # p(ẑ_1) = (0.5, 0.5); sample 2 must not count
    assert confidence_mask(original, 0.5).tolist() == [1.0, 0.0]
    assert confidence_mask(original, 0.88).tolist() == [1.0, 0.0]
    assert confidence_mask(original, 0.881).tolist() == [0.0, 0.0]
    # KL(p ‖ u) = ln 2 − H(p) = 0.693147 − (0.880797·0.126928 + 0.119203·2.126928) = 0.693147 − 0.365334
    #           = 0.327813; the mean over both samples (the masked one counts 0) is 0.163907
    loss, mask = consistency_loss(original, augmented, 0.5, "original")
    assert mask.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx(0.163907, abs=1e-6)
    # the code's direction KL(u ‖ p) = −ln 2 − ½(ln 0.880797 + ln 0.119203) = −0.693147 + ½(0.126928 + 2.126928)
    #           = 0.433781; mean 0.216890
    loss, _ = consistency_loss(original, augmented, 0.5, "augmented")
    assert loss.item() == pytest.approx(0.216890, abs=1e-6)
    # with τ = 0 both count: sample 2's KL((0.5, 0.5) ‖ softmax(1, 0)) = −ln 2 − ½(ln 0.731059 + ln 0.268941)
    #           = −0.693147 + ½(0.313262 + 1.313262) = 0.120115; mean (0.327813 + 0.120115)/2 = 0.223964
    loss, _ = consistency_loss(original, augmented, 0.0, "original")
    assert loss.item() == pytest.approx(0.223964, abs=1e-6)


def test_the_consistency_target_is_fixed():
    original = torch.tensor([[2.0, 0.0]], requires_grad=True)
    augmented = torch.tensor([[0.0, 0.0]], requires_grad=True)
    consistency_loss(original, augmented, 0.5)[0].backward()
    assert original.grad is None and augmented.grad is not None
    # d KL(p ‖ q)/d ẑ = q − p = (0.5 − 0.880797, 0.5 − 0.119203)
    assert torch.allclose(augmented.grad, torch.tensor([[-0.380797, 0.380797]]), atol=1e-6)


def test_vae_kl_and_reparameterisation_by_hand():
    # −½ · mean((1 + 0 − 1 − 1), (1 + ln 2 − 0 − 2)) = −½ · (−1 − 0.306853)/2 = 0.326713
    mean, log_variance = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    assert gaussian_kl(mean, log_variance).item() == pytest.approx(0.326713, abs=1e-6)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    # z = μ + exp(½ ln 4)·ε = (1 + 1·2, 0 + 2·(−1)) = (3, −2)
    z = reparameterize(mean, torch.tensor([[0.0, math.log(4.0)]]), torch.tensor([[2.0, -1.0]]))
    assert torch.allclose(z, torch.tensor([[3.0, -2.0]]))


def test_concatenation_and_split_in_modality_order():
    features = {"b": torch.arange(6.0).reshape(2, 3), "a": 10 + torch.arange(4.0).reshape(2, 2)}
    x = concat_features(features, ["a", "b"])
    assert x.tolist() == [[10, 11, 0, 1, 2], [12, 13, 3, 4, 5]]
    back = split_features(x, features, ["a", "b"])
    assert all(torch.equal(back[m], features[m]) for m in features)


def test_the_noise_comes_from_the_run_generator():
    t = trainer()
    expected_state = t.ctx.generator.get_state()
    record = t.method.training_step(t.model, first_batch(t), t.ctx)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(expected_state)
    noise = record.shared[NOISE]
    assert noise.shape == (len(record.batch), 8)
    assert torch.equal(noise, torch.randn(noise.shape, generator=replay))
    assert torch.equal(t.ctx.generator.get_state(), replay.get_state())  # one draw per step, nothing else


# -- each network moves only through its own optimizer ---------------------------------------------------------
def grad_presence(params) -> list[bool]:
    return [p.grad is not None for p in params]


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_no_gradient_crosses_between_the_task_model_and_the_augmenter(schedule, variant):
    t = trainer(f"lemda[schedule={schedule},variant={variant}]")
    augmenter_params = list(lemda_of(t).augmenter.parameters())
    own = {id(p) for p in augmenter_params}
    task_params = [p for p in t.parameters if id(p) not in own]
    assert {id(p) for g in t.optimizers[TASK].param_groups for p in g["params"]} == {id(p) for p in task_params}
    assert {id(p) for g in t.optimizers[AUGMENTER].param_groups for p in g["params"]} == own
    seen = {TASK: [], AUGMENTER: []}

    def watch(name):
        def hook(optimizer, args, kwargs):
            seen[name].append((grad_presence(task_params), grad_presence(augmenter_params)))
        return hook

    for name in (TASK, AUGMENTER):
        t.optimizers[name].register_step_pre_hook(watch(name))
    t.train_step(first_batch(t))
    # the task step: encoders and fusion head have gradients, G none
    [(task_has, augmenter_has)] = seen[TASK]
    assert any(task_has) and not any(augmenter_has)
    # the augmenter optimizer steps twice: the trainer's step after the task backward (G has no gradient, so
    # nothing moves) and G's own step, where every G parameter has a gradient and no task parameter has one
    assert len(seen[AUGMENTER]) == 2
    g_step = [s for s in seen[AUGMENTER] if any(s[1])]
    assert len(g_step) == 1 and all(g_step[0][1]) and not any(g_step[0][0])
    assert all(p.grad is None for p in augmenter_params)  # G's are reset after its step


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
def test_the_task_step_is_the_same_whether_or_not_g_steps(schedule):
    # G steps on global steps divisible by augmenter_every: step 1 with every=1 (G steps) and every=2 (it does not)
    runs = {}
    for every in (1, 2):
        t = trainer(f"lemda[schedule={schedule},augmenter_every={every}]")  # one seed: the same initial weights
        batch = first_batch(t)
        t.ctx.global_step = 1
        initial = snapshot(t.model)
        before = snapshot(lemda_of(t).augmenter)
        record = t.train_step(batch)
        after = snapshot(lemda_of(t).augmenter)
        runs[every] = (t, before, after, record, initial)
    assert all(torch.equal(runs[1][4][k], runs[2][4][k]) for k in runs[1][4])
    stepped, skipped = runs[1], runs[2]
    assert all(torch.equal(a, b) for a, b in zip(stepped[0].model.state_dict().values(),
                                                 skipped[0].model.state_dict().values()))
    assert any(not torch.equal(stepped[1][k], stepped[2][k]) for k in stepped[1])  # G moved
    assert all(torch.equal(skipped[1][k], skipped[2][k]) for k in skipped[1])  # G did not
    assert "lemda/augmenter_loss" in stepped[3].logs and "lemda/augmenter_loss" not in skipped[3].logs


def test_g_steps_on_every_kth_global_step():
    t = trainer("lemda[augmenter_every=3]")
    batches = list(t.train_loader)  # 5 batches of the 140 training samples
    stepped = []
    for step, batch in enumerate(batches):
        t.ctx.global_step = step
        before = snapshot(lemda_of(t).augmenter)
        record = t.train_step(batch)
        moved = any(not torch.equal(before[k], v) for k, v in snapshot(lemda_of(t).augmenter).items())
        assert moved == ("lemda/augmenter_loss" in record.logs)
        stepped.append(moved)
    assert stepped == [True, False, False, True, False]


# -- G's gradient is that of L_G, by autograd on G's parameters alone ------------------------------------------
@pytest.mark.parametrize("variant,schedule", [("paper", "alternating"), ("paper", "simultaneous"), ("official", "simultaneous")])
def test_the_augmenter_gradient_is_that_of_its_loss(variant, schedule):
    # τ = 0 so every sample counts; distinct weights so a swapped slot shows; plain SGD so nothing clips
    weights = {"adversarial_weight": 0.5, "consistency_weight": 0.3, "kl_weight": 0.2, "l2_weight": 0.7}
    options = ",".join(f"{k}={v}" for k, v in weights.items())
    t = trainer(f"lemda[variant={variant},schedule={schedule},confidence_threshold=0.0,{options}]",
                ["train.optimizer=sgd", "train.lr=0.5", "train.momentum=0"])
    lemda = lemda_of(t)
    # move G off the identity first, so every term has a non-trivial gradient
    with torch.no_grad():
        for p in lemda.augmenter.out.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    batch = first_batch(t)
    state = copy.deepcopy(t.ctx.generator.get_state())
    features = {m: f.detach() for m, f in t.model.encode(batch.inputs).items()}
    checked = []

    def expected_gradient(optimizer, args, kwargs):
        params = list(lemda.augmenter.parameters())
        if not any(p.grad is not None for p in params):
            return  # the trainer's no-op step of the augmenter optimizer
        replay = torch.Generator().manual_seed(0)
        replay.set_state(state)
        x = concat_features(features, lemda.modalities)
        noise = torch.randn((x.shape[0], 8), generator=replay)
        with torch.enable_grad():
            augmented, mean, log_variance = lemda.augmenter(x, noise)
            scale = 0.5 if variant == "official" else 1.0
            ce = scale * F.cross_entropy(t.model.fuse(split_features(augmented, features, lemda.modalities)), batch.labels)
            p = t.model.fuse(split_features(x, features, lemda.modalities)).detach().log_softmax(-1)
            q = t.model.fuse(split_features(augmented, features, lemda.modalities)).log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1).mean() if variant == "paper" else (q.exp() * (q - p)).sum(-1).mean()
            vae = -0.5 * (1 + log_variance - mean ** 2 - log_variance.exp()).mean()
            loss = -0.5 * ce + 0.3 * kl + 0.2 * vae + 0.7 * ((augmented - x) ** 2).mean()
            expected = torch.autograd.grad(loss, params)
        for param, grad in zip(params, expected):
            assert torch.allclose(param.grad, grad, rtol=1e-4, atol=1e-7)
        checked.append(True)

    t.optimizers[AUGMENTER].register_step_pre_hook(expected_gradient)
    t.train_step(batch)
    assert checked == [True]


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_both_optimizers_states_are_in_the_checkpoint(tmp_path):
    config = build_config(overrides=TINY, method="lemda")
    train_run(config, tmp_path / "r", quiet=True)
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert set(last["optimizers"]) == {TASK, AUGMENTER}
    g_params = [k for k in last["method"] if k.startswith("parts.lemda.augmenter.")]
    assert g_params and any(k.endswith("out.weight") for k in g_params)
    g_state = last["optimizers"][AUGMENTER]["state"]
    assert len(g_state) == len(g_params) and all("exp_avg" in s and s["step"] > 0 for s in g_state.values())
    assert len(last["optimizers"][TASK]["state"]) > 0
    # and a trainer built from that checkpoint holds them again
    t = Trainer(config, None, quiet=True)
    t._restore(last, tmp_path / "r" / "last.pt")
    restored = t.optimizers[AUGMENTER].state_dict()["state"]
    assert all(torch.equal(restored[k]["exp_avg"], g_state[k]["exp_avg"]) for k in g_state)


CLI_SETTINGS = [
    "--set", "synthetic.num_samples=600", "--set", "synthetic.num_classes=4", "--set", "synthetic.strong_groups=2",
    "--set", "synthetic.dims=[8,8]", "--set", "train.epochs=30", "--set", "train.batch_size=32",
    "--set", "model.feature_dim=8", "--set", "model.hidden_dim=16", "--set", "train.optimizer=sgd",
    "--set", "train.lr=0.05",
]


def test_a_killed_run_resumes_to_the_same_metrics(tmp_path):
    """A real SIGKILL after the first epoch's checkpoint, then ``train --resume DIR``: G, both optimizers' states
    and the generator come back, so the metrics are the uninterrupted run's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mmbalance", "--import", "mmbalance.methods.lemda", "--quiet", "train"]
    common = ["--method", "lemda[adversarial_weight=0.01,consistency_weight=0.1]", *CLI_SETTINGS]
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
    per_epoch = [[json.loads(line)["method"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                 for name in ("full", "killed")]
    assert len(per_epoch[0]) == 30 and per_epoch[0] == per_epoch[1]  # every logged G loss, shift and accuracy
    lasts = [torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("full", "killed")]
    assert all(torch.equal(lasts[0]["method"][k], lasts[1]["method"][k]) for k in lasts[0]["method"])
    for name in (TASK, AUGMENTER):
        states = [last["optimizers"][name]["state"] for last in lasts]
        assert all(torch.equal(states[0][i][key], states[1][i][key]) for i in states[0] for key in states[0][i])


# -- §16 -----------------------------------------------------------------------------------------------------
def test_two_runs_with_one_seed_are_identical():
    runs = []
    for _ in range(2):
        t = trainer()
        logs = []
        for step, batch in zip(range(4), t.train_loader):
            t.ctx.global_step = step
            record = t.train_step(batch)
            logs.append({k: float(v) for k, v in record.logs.items()})
        runs.append((snapshot(t.model), snapshot(t.method), logs))
    assert runs[0][2] == runs[1][2]
    for a, b in ((runs[0][0], runs[1][0]), (runs[0][1], runs[1][1])):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
def test_state_round_trip_mid_epoch_reproduces_the_next_step(schedule):
    spec = f"lemda[schedule={schedule}]"
    t = trainer(spec)
    batches = [b for _, b in zip(range(3), t.train_loader)]
    for step, batch in enumerate(batches[:2]):
        t.ctx.global_step = step
        t.train_step(batch)
    saved = copy.deepcopy({
        "model": t.model.state_dict(), "method": t.method.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in t.optimizers.items()},
        "generator": t.ctx.generator.get_state(), "rng": torch.get_rng_state(),
    })
    t.ctx.global_step = 2
    expected = t.train_step(batches[2])
    expected_method = snapshot(t.method)

    fresh = trainer(spec)
    fresh.model.load_state_dict(saved["model"])
    fresh.method.load_state_dict(saved["method"])
    for k, o in fresh.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    fresh.ctx.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["rng"])
    fresh.ctx.global_step = 2
    again = fresh.train_step(batches[2])
    assert again.loss.item() == expected.loss.item()
    assert float(again.logs["lemda/augmenter_loss"]) == float(expected.logs["lemda/augmenter_loss"])
    assert all(torch.equal(v, snapshot(fresh.method)[k]) for k, v in expected_method.items())


def test_prediction_reads_the_original_features_only():
    t = trainer()
    with torch.no_grad():
        for p in lemda_of(t).augmenter.out.parameters():
            p.fill_(1.0)  # G far from the identity: a prediction through G would differ
    batch = first_batch(t)
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(t.method.predict(t.model, batch.inputs), t.model(batch.inputs))


# -- with plugins, and M = 2 and 3 ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec,extra", [
    ("lemda", []),
    ("lemda", M3),
    ("lemda[variant=official,augmenter=mlp]", M3),
    ("lemda+arl[modulation_starts=0]", []),
    ("lemda+ogm_ge[modulation_starts=0]", M3),
])
def test_runs_two_epochs(spec, extra, tmp_path):
    config = build_config(overrides=[*TINY, *extra], method=spec)
    metrics = train_run(config, tmp_path / "r", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(line["train_loss"]) for line in lines)
    assert all(math.isfinite(v) for line in lines for v in line["method"].values())
    modalities = 3 if extra else 2
    assert len(metrics["test"]["modality_accuracy"]) == modalities
    method_logs = lines[-1]["method"]
    assert "lemda/augmenter_loss" in method_logs and len([k for k in method_logs if k.startswith("lemda/shift/")]) == modalities
    if "+arl" in spec:
        assert method_logs["arl/accelerating"] == 1.0 and "loss/arl_unimodal" in method_logs


def test_arl_scales_the_task_steps_encoder_gradients():
    # ARL acts on LeMDA's task step (the trainer's): its gradient on the encoders differs from lemda alone's
    plain, with_arl = trainer("lemda"), trainer("lemda+arl[modulation_starts=0,unimodal_weight=0]")
    with_arl.model.load_state_dict(plain.model.state_dict())
    batch = first_batch(plain)
    grads = []
    for t in (plain, with_arl):
        t._zero_grad()
        record = t.method.training_step(t.model, batch, t.ctx)
        record.loss.backward()
        t._finish_gradients(record)
        grads.append({m: [p.grad.clone() for p in t.ctx.params.encoder[m]] for m in t.bundle.modalities})
    for m in plain.bundle.modalities:
        assert not torch.allclose(grads[0][m][0], grads[1][m][0])
    assert all(p.grad is None for p in lemda_of(with_arl).augmenter.parameters())
