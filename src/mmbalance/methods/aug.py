"""AUG: sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang, "Rethinking Multimodal
Learning from the Perspective of Mitigating Classification Ability Disproportion", NeurIPS 2025), as an
objective.

The paper reads modality imbalance as a gap in *classifier* strength, so it
gives the weaker modality more classifiers (BASELINES-2025 §3). Modality m
owns a boosting ensemble of learners, all reading its encoder's features
f_m and all sharing one final layer H: Linear(h → C) (h = ``hidden_dim``):

    q_{m,j} = H(ReLU(A_{m,j} f_m)),   o_m = Σ_{j ≤ n_m} q_{m,j},

A_{m,1} = E_m a Linear(d_m → h) (default init), A_{m,j≥2} Linear(d_m → h)
with Xavier-normal weights and zero bias; n_m starts at 1. The model's own
fusion head and unimodal heads are unused.

Loss of modality m (``ensemble_loss``): CE(o_m, y) when n_m = 1; otherwise,
with P = Σ_{j<n} q_{m,j}, R = q_{m,n}, π_i = sg(p(P)_i[y_i]):

    L_m = CE(o_m, y) + CE(P, y) + mean_i (1 − λ π_i) · (−log p(R)_i[y_i]),

the newest learner fitting the soft residual target y − λ y ⊙ p(P). The
default optimises L = Σ_m L_m with one step per batch (our reading of the
paper's Algorithm 1); ``optimization=sequential`` (the authors' code) computes
every f_m first and then, modality by modality, builds o_m with the current
H, backpropagates L_m and steps (M optimizer steps per batch, through
``ctx.manual_step``).

Adaptive classifier assignment (``on_epoch_end``): s_m = Σ over the epoch's
training samples of p(o_m)[y], accumulated from the training forward passes
in buffers and summed across processes. Every t_N epochs (``assign_period``;
``assign_schedule=code``: also after epoch 0, the code's t = 0 or
(t+1) mod t_N = 0; never after the run's last epoch under the paper's
schedule, ``assign_stop``) ``assign_learners`` picks who gets one more learner: for
M = 2 r = s_a / s_v (a, v the dataset's first and second modality),
r > σ + τ → n_v += 1, r < σ − τ → n_a += 1; for M > 2 (our generalisation)
argmin_m s_m when max s / min s > σ + τ (``many_rule=script``: the deleted
authors' NVGesture script, every m with s_m / Σ_{k≠m} s_k below
``script_threshold``).

New learners must be trained. Every modality's ``max_learners`` learners are
created in ``setup`` (so the trainer's optimizer holds them from the start
and a checkpoint restores them exactly); a learner not yet in its ensemble is
never evaluated, so it has no gradient (the trainer zeroes with
``set_to_none``) and the optimizer skips it: no momentum or weight-decay
drift before it joins; its optimizer state starts at its first step, at the
current learning rate. When a modality already has ``max_learners``, a due
assignment is logged (``aug/capped/m``) and adds nothing; the paper has no
cap. ``train_new_learners=false`` (the authors' code, which never registers
new classifiers with its optimizer) takes learners j ≥ 2 out of the
optimizer (``requires_grad`` off): they stay at their random initialisation,
though gradients still flow through them into H and the encoder.

Prediction (``fuse`` = ``predict_from_features``): Σ_m w_m o_m, w_m = 1/M
unless ``fusion_weights`` (the code: audio 0.4, video 0.6). ``heads`` returns
o_m, so a run's unimodal accuracy is each ensemble's. The modality-only
accuracy of evaluation is fuse(f^{m}): w_m o_m(f_m) plus, for every zeroed
modality k, the constant w_k o_k(0) = w_k Σ_j H(ReLU(b_{k,j})), a class
offset equal for every sample.

``variant=code`` is the released code: sequential optimisation, new learners
untrained, the code's assignment schedule (each also settable alone). With
sequential optimisation every part's ``after_backward`` runs once per
sub-step, on that sub-step's record (``shared["aug/modality"]`` names the
modality); a plugin's ``on_forward`` runs once after the sub-steps on a
record whose features are detached, so its gradient hooks and loss terms do
not train anything.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..registry import METHODS
from ..search_space import FloatRange, IntRange
from .base import Objective

#: record.shared key of a sequential sub-step's record
MODALITY = "aug/modality"
LOSS_TERMS = ("ensemble", "previous", "residual")


# -- the rules, on plain tensors ------------------------------------------------------------------
def _mean(per_sample: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample.mean()


def residual_loss(previous_logits: Tensor, newest_logits: Tensor, labels: Tensor, lam: float,
                  weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(mean_i (1 − λ π_i) · (−log p(R)_i[y_i]), π): the newest learner's residual term.

    π_i = p(P)_i[y_i] (detached) is how sure the earlier learners already are,
    so samples they get right weigh less: CE against the soft target
    y − λ y ⊙ p(P). ``weight``: per-sample loss weights (a plugin's). E.g.
    λ = 0.5, P = [[1, 0], [0, 0]], R = [[0, 0], [1, 0]], y = [0, 1]:
    π = (0.731059, 0.5), terms (0.439782, 0.984946), mean 0.712364.
    """
    pi = previous_logits.detach().float().softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    nll = -newest_logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return _mean((1 - lam * pi) * nll, weight), pi


def ensemble_loss(learner_logits: Tensor, labels: Tensor, lam: float,
                  weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """One modality's loss terms from its learners' logits q [n, B, C] (n ≥ 1).

    ``ensemble`` = CE(o, y), o = Σ_j q_j; with n ≥ 2 also ``previous`` =
    CE(P, y), P = Σ_{j<n} q_j, and ``residual`` (``residual_loss`` of the
    newest learner R = q_n); with n = 1 both are 0. ``pi``: π per sample (None
    when n = 1). L_m is the sum of the three terms. The spec's example
    (λ = 0.5, y = [0, 1], q₁ = [[1,0],[0,0]], q₂ = [[0,0],[1,0]]): 0.813262,
    0.503204, 0.712364, L = 2.028830.
    """
    ensemble = learner_logits.sum(0).float()
    terms = {"ensemble": _mean(F.cross_entropy(ensemble, labels, reduction="none"), weight)}
    if learner_logits.shape[0] < 2:
        zero = ensemble.new_zeros(())
        return {**terms, "previous": zero, "residual": zero, "pi": None}
    previous = learner_logits[:-1].sum(0).float()
    terms["previous"] = _mean(F.cross_entropy(previous, labels, reduction="none"), weight)
    terms["residual"], terms["pi"] = residual_loss(previous, learner_logits[-1], labels, lam, weight)
    return terms


def assignment_due(epoch: int, period: int, schedule: Literal["paper", "code"] = "paper") -> bool:
    """Whether the assignment runs at the end of 0-based ``epoch``: every ``period`` epochs (paper), or
    also after epoch 0 (code: t == 0 or (t+1) mod t_N == 0). E.g. t_N = 3: paper 2, 5, 8; code 0, 2, 5."""
    return (epoch + 1) % period == 0 or (schedule == "code" and epoch == 0)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with x/0 = ∞ (x > 0) and 0/0 = 1 (nothing to tell apart)."""
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else 1.0


def assign_learners(scores: Sequence[float], sigma: float = 1.0, tau: float = 0.01,
                    comparison: Literal["ratio", "difference"] = "ratio",
                    many_rule: Literal["weakest", "script"] = "weakest",
                    script_threshold: float = 0.4) -> list[int]:
    """The modalities (indices) that get one more learner, from the epoch's scores s_m.

    M = 2 (a = index 0, v = index 1), ``ratio`` (the code's form): r = s_a / s_v;
    r > σ + τ → [1], r < σ − τ → [0], else []. ``difference`` (the paper's
    garbled comparison read as s_a − σ s_v ≷ ±τ) compares s_a − σ s_v with ±τ.
    M > 2, ``weakest`` (our generalisation): [argmin s] when max s / min s > σ + τ
    (difference: max s − σ min s > τ); ``script``: every m with
    s_m / Σ_{k≠m} s_k < ``script_threshold``.
    E.g. (40, 30) → [1] (r = 1.3333); (30, 30.2) → [] (r = 0.993377, inside the dead zone).
    """
    scores = [float(s) for s in scores]
    if len(scores) == 2:
        a, v = scores
        if comparison == "ratio":
            gap, upper, lower = _ratio(a, v), sigma + tau, sigma - tau
        else:
            gap, upper, lower = a - sigma * v, tau, -tau
        if gap > upper:
            return [1]
        if gap < lower:
            return [0]
        return []
    if many_rule == "script":
        total = sum(scores)
        return [k for k, s in enumerate(scores) if _ratio(s, total - s) < script_threshold]
    weakest = min(range(len(scores)), key=lambda k: scores[k])
    low, high = scores[weakest], max(scores)
    fires = _ratio(high, low) > sigma + tau if comparison == "ratio" else high - sigma * low > tau
    return [weakest] if fires else []


def weighted_prediction(outputs: Tensor, weights: Tensor) -> Tensor:
    """Σ_m w_m o_m from the ensembles' logits [M, B, C] and weights [M]."""
    return (weights.to(outputs.dtype)[:, None, None] * outputs).sum(0)


# -- the objective --------------------------------------------------------------------------------
@METHODS.register("aug")
class AUG(Objective):
    """Per-modality boosting ensembles on a shared head; the weaker modality gets more learners (Jiang et al., NeurIPS 2025)."""

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options aug`)
    search_space = {
        "lam": FloatRange(0.1, 1.0),
        "assign_period": IntRange(1, 20),
        "tau": FloatRange(0.0, 0.2),
    }

    class Config(Section):
        variant: Literal["paper", "code"] = Field(
            "paper",
            description="paper: one step on Σ_m L_m per batch, new learners trained, assignment every t_N epochs; "
            "code: the released code (M steps per batch, new learners never trained, assignment also after epoch 0)",
        )
        optimization: Optional[Literal["joint", "sequential"]] = Field(
            None,
            description="joint: one step on Σ_m L_m; sequential: one step per modality with the current H "
            "(unset: joint for variant=paper, sequential for code)",
        )
        train_new_learners: Optional[bool] = Field(
            None,
            description="the optimizer trains learners j ≥ 2 (unset: yes for variant=paper; no for code, whose "
            "new classifiers are never registered with the optimizer and stay at their initialisation)",
        )
        assign_schedule: Optional[Literal["paper", "code"]] = Field(
            None,
            description="paper: assign after every t_N-th epoch; code: also after epoch 0 (unset: follows variant)",
        )
        assign_period: int = Field(
            10, ge=1, description="t_N, epochs between assignments (paper: 20 CREMA-D; 10 KS, VGGSound, NVGesture; "
            "5 Twitter; 1 Sarcasm)"
        )
        assign_stop: Optional[int] = Field(
            None, ge=0,
            description="assignments run only after epochs before this one (0-based, exclusive); unset: "
            "train.epochs − 1 for assign_schedule=paper (never after the last epoch, whose new learner would never "
            "be trained) [our choice], train.epochs for code (which assigns after its last epoch too)",
        )
        lam: float = Field(
            0.5, ge=0, le=1, description="λ of the residual target y − λ y ⊙ p(P) (searched in {0.1, 0.2, 0.33, 0.5, 1}; "
            "code 0.5 CREMA-D, 0.2 KS)"
        )
        sigma: float = Field(1.0, gt=0, description="σ, centre of the assignment's dead zone")
        tau: float = Field(0.01, ge=0, description="τ, half-width of the assignment's dead zone")
        comparison: Literal["ratio", "difference"] = Field(
            "ratio",
            description="ratio: s_a / s_v against σ ± τ (the code's); difference: s_a − σ s_v against ±τ (the "
            "paper's garbled comparison, one reading) [unverified]",
        )
        many_rule: Literal["weakest", "script"] = Field(
            "weakest",
            description="M > 2: weakest: one learner to argmin s when max s / min s > σ + τ (our generalisation); "
            "script: one to every m with s_m / Σ_{k≠m} s_k < script_threshold (the deleted NVGesture script)",
        )
        script_threshold: float = Field(0.4, gt=0, description="many_rule=script: the ratio below which m gets a learner")
        hidden_dim: int = Field(256, ge=1, description="h, width of every learner (the input size of the shared H)")
        max_learners: int = Field(
            8, ge=1, le=64,
            description="learners per modality, preallocated (our cap; the paper has none): a due assignment to a "
            "modality at the cap is logged and adds nothing",
        )
        fusion_weights: Optional[list[float]] = Field(
            None,
            description="w_m of the prediction Σ_m w_m o_m, one ≥ 0 per modality in dataset order (unset: 1/M each; "
            "the code: audio 0.4, video 0.6; the NVGesture script 0.33/0.33/0.34) [unverified]",
        )

    @staticmethod
    def resolved_schedule(config) -> str:
        return config.assign_schedule or ("code" if config.variant == "code" else "paper")

    @classmethod
    def pinned_options(cls, config, epochs):
        if config.assign_stop is not None:
            return {}
        return {"assign_stop": epochs - 1 if cls.resolved_schedule(config) == "paper" else epochs}

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        code = config.variant == "code"
        self.sequential = (config.optimization or ("sequential" if code else "joint")) == "sequential"
        self.trains_new = (not code) if config.train_new_learners is None else config.train_new_learners
        self.schedule = self.resolved_schedule(config)
        # instance-level: the trainer asks the method's parts, so only the sequential step is manual
        self.manual_optimization = self.sequential
        count = len(self.modalities)
        weights = config.fusion_weights
        if weights is not None and (len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ConfigError(
                f"aug.fusion_weights={weights} must hold {count} weights ≥ 0, not all 0, one per modality "
                f"({', '.join(self.modalities)})"
            )
        # follows the config, so not state: it only moves with the device
        self.register_buffer("fusion", torch.tensor(weights if weights is not None else [1.0 / count] * count),
                             persistent=False)
        #: n_m, learners in each modality's ensemble
        self.register_buffer("counts", torch.ones(count, dtype=torch.long))
        #: s_m summed over this epoch's training samples (this process's), and how many samples
        self.register_buffer("scores", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))
        self.shared_head: Optional[nn.Linear] = None

    def setup(self, model, ctx):
        if self.shared_head is not None:
            return
        hidden = self.config.hidden_dim
        dims = model.feature_dims
        self.shared_head = nn.Linear(hidden, self.num_classes)
        learners = {}
        for m in self.modalities:
            stack = nn.ModuleList([nn.Linear(dims[m], hidden) for _ in range(self.config.max_learners)])
            for j, layer in enumerate(stack):
                if j > 0:  # a new learner: Xavier-normal weights, zero bias (the authors' code)
                    nn.init.xavier_normal_(layer.weight)
                    nn.init.zeros_(layer.bias)
                    layer.requires_grad_(self.trains_new)
            learners[m] = stack
        self.learners = nn.ModuleDict(learners)

    # -- how AUG reads the model ----------------------------------------------------------------------
    def learner_counts(self) -> list[int]:
        return self.counts.tolist()

    def learner_logits(self, modality: str, feature: Tensor, count: int) -> Tensor:
        """[n, B, C]: q_{m,j} = H(ReLU(A_{m,j} f_m)) for the modality's first ``count`` learners only."""
        hidden = torch.stack([torch.relu(layer(feature)) for layer in self.learners[modality][:count]])
        return self.shared_head(hidden)

    def outputs(self, features: dict[str, Tensor], counts: list[int]) -> dict[str, Tensor]:
        """o_m = Σ_{j ≤ n_m} q_{m,j} for every modality in ``features``."""
        return {m: self.learner_logits(m, features[m], counts[k]).sum(0)
                for k, m in enumerate(self.modalities) if m in features}

    def combine(self, outputs: dict[str, Tensor]) -> Tensor:
        present = [k for k, m in enumerate(self.modalities) if m in outputs]
        stacked = torch.stack([outputs[self.modalities[k]] for k in present])
        return weighted_prediction(stacked, self.fusion[present])

    def fuse(self, model, features):
        return self.combine(self.outputs(features, self.learner_counts()))

    def heads(self, model, features):
        return self.outputs(features, self.learner_counts())

    def predict_from_features(self, model, features):
        """Σ_m w_m o_m."""
        return self.fuse(model, features)

    # -- one step -------------------------------------------------------------------------------------
    def _modality_step(self, modality: str, feature: Tensor, count: int, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(o_m, its loss terms), and s_m's batch sum added to the epoch's scores."""
        logits = self.learner_logits(modality, feature, count)
        terms = ensemble_loss(logits, batch.labels, self.config.lam, batch.weight)
        output = logits.sum(0)
        confidence = output.detach().float().softmax(-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
        k = self.modalities.index(modality)
        self.scores[k] += confidence.sum().double()
        terms["confidence"] = confidence.mean()
        return output, terms

    def training_step(self, model, batch, ctx):
        counts = self.learner_counts()
        features = self.encode(model, batch.inputs)
        self.seen += len(batch)
        outputs: dict[str, Tensor] = {}
        terms: dict[str, dict[str, Tensor]] = {}
        for k, m in enumerate(self.modalities):
            outputs[m], terms[m] = self._modality_step(m, features[m], counts[k], batch)
            if self.sequential:  # L_m alone, one optimizer step; the next modality sees the updated H
                sub = self.record(model, batch, features, logits=outputs[m], unimodal={m: outputs[m]})
                sub.fuse = lambda f: self.combine(self.outputs(f, counts))
                sub.add_loss("aug", sum(terms[m][name] for name in LOSS_TERMS))
                sub.shared[MODALITY] = m
                ctx.manual_step(sub.loss, sub)
                outputs[m] = outputs[m].detach()
                terms[m] = {name: (v.detach() if v is not None else None) for name, v in terms[m].items()}
        if self.sequential:
            features = {m: f.detach() for m, f in features.items()}
        record = self.record(model, batch, features, logits=self.combine(outputs), unimodal=outputs)
        record.fuse = lambda f: self.combine(self.outputs(f, counts))
        for name in LOSS_TERMS:
            record.add_loss(name, torch.stack([terms[m][name] for m in self.modalities]).sum())
        for k, m in enumerate(self.modalities):
            record.logs[f"aug/loss/{m}"] = sum(terms[m][name] for name in LOSS_TERMS).detach()
            record.logs[f"aug/confidence/{m}"] = terms[m]["confidence"]
            if terms[m]["pi"] is not None:
                record.logs[f"aug/pi/{m}"] = terms[m]["pi"].mean().detach()
        return record

    # -- adaptive classifier assignment ---------------------------------------------------------------
    def on_epoch_start(self, model, ctx):
        self.scores.zero_()
        self.seen.zero_()

    def on_epoch_end(self, model, ctx):
        totals = ctx.dist.all_reduce_sum(torch.cat([self.scores, self.seen.reshape(1)]))
        scores, seen = totals[:-1].tolist(), max(float(totals[-1]), 1.0)
        logs: dict[str, float] = {f"aug/score/{m}": s / seen for m, s in zip(self.modalities, scores)}
        if len(self.modalities) == 2:
            logs["aug/ratio"] = min(_ratio(scores[0], scores[1]), 1e6)
        stop = self.pinned_options(self.config, ctx.max_epochs).get("assign_stop", self.config.assign_stop)
        due = assignment_due(ctx.epoch, self.config.assign_period, self.schedule) and ctx.epoch < stop
        targets = assign_learners(scores, self.config.sigma, self.config.tau, self.config.comparison,
                                  self.config.many_rule, self.config.script_threshold) if due else []
        counts = self.learner_counts()
        for k, m in enumerate(self.modalities):
            added = capped = False
            if k in targets:
                if counts[k] < self.config.max_learners:
                    counts[k] += 1
                    added = True
                else:
                    capped = True
                    warnings.warn(
                        f"aug: modality '{m}' already has aug.max_learners={self.config.max_learners} learners; "
                        f"the learner due after epoch {ctx.epoch + 1} is not added",
                        stacklevel=2,
                    )
            logs[f"aug/added/{m}"] = float(added)
            logs[f"aug/capped/{m}"] = float(capped)
            logs[f"aug/learners/{m}"] = float(counts[k])
        self.counts.copy_(torch.tensor(counts, dtype=torch.long))
        self.scores.zero_()
        self.seen.zero_()
        return logs
