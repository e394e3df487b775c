"""ReconBoost: modality-alternating boosting with reconcilement (Hua, Xu, Bao, Yang, Huang, "ReconBoost:
Boosting Can Achieve Modality Reconcilement", ICML 2024), as an objective.

Training never optimises all modalities at once against one loss. Each
modality m has a learner h_m(x) = H(encoder_m(x_m)), H a head shared by all
learners (``head=shared``: an MLP d → 256 → C, the authors' common space;
``head=unimodal``: the model's unimodal head of m). The ensemble is
F(x) = β · Σ_{m∈E} h_m(x), β a learnable boost rate, E the learners added so
far (BASELINES §8). Training runs in stages of E1 + E2 epochs; stage t
trains modality m_t = 𝓜[t mod M] (round robin):

- phase 1 (E1 epochs, "boosting"): only encoder m_t and H learn. With
  q = softmax(F_{−m}(x)), F_{−m} = β Σ_{k∈E, k≠m} h_k(x) under no-grad
  (q_y = 1 when no other learner exists yet), the per-sample loss is the
  KL-reconciled cross-entropy
      ℓ_i = (1/C) · (w2 · q_{i,y_i} − w1) · log p(h_m(x_i))_{y_i},
  a cross-entropy whose weight (w1 − w2 q_y)/C is largest where the others
  are wrong; from stage 1 on, plus the memory-consolidation term
  λ_GA · MSE(p(h_m(x)), p(h_{m_{t−1}}(x))) against the previous stage's
  learner (its side detached). At the end of phase 1, m_t joins E.
- phase 2 (E2 epochs, "global rectification"): every learner in E, H and β
  learn CE(F(x), y).

Prediction is F(x) over E. A learner is its modality's encoder itself, so
"only the newest learner per modality is kept" holds by construction.

Each step of either phase is one loss and one backward, so the method uses
ordinary optimisation (the trainer's backward, the plugins' hooks, one
optimizer step) rather than manual optimisation: plugins such as ARL, which
attach gradient hooks and loss terms in ``on_forward`` after the objective's
step, keep working. Parameters a phase does not train never get a gradient
(their features and logits are computed under no-grad, β is detached in
phase 1), and the trainer zeroes with ``set_to_none``, so the optimizer skips
them: no momentum or weight-decay drift on frozen learners. Each phase
starts with a fresh optimizer state (its state is cleared at the phase's
first epoch) and, with ``lr_schedule=fixed``, its own fixed learning rate.

The schedule is a function of the epoch; the stage, phase, active modality
and the set E are also kept in buffers, so a checkpoint (and prediction,
which has no epoch) knows which learners form the ensemble, and a run
resumed anywhere, mid-stage or mid-phase, continues exactly.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Objective, cross_entropy

#: the name of the one optimizer the method configures
OPTIMIZER = "main"


# -- the rules, on plain tensors ------------------------------------------------------------------
def true_class_weights(others_logits: Optional[Tensor], labels: Tensor, num_classes: int,
                       w1: float = 5.0, w2: float = 1.0) -> tuple[Tensor, Tensor]:
    """(weight, q_y) per sample: weight_i = (w1 − w2 · q_{i,y_i}) / C, q = softmax(F_{−m}), detached.

    ``others_logits`` None means no other learner exists yet: q_y = 1 (the
    effect of the authors' scalar placeholder). E.g. C = 2, y = 0,
    q = (0.8, 0.2): (5 − 0.8) / 2 = 2.1; q_y = 1: (5 − 1) / 2 = 2.
    """
    if others_logits is None:
        q_true = torch.ones(labels.shape, device=labels.device)
    else:
        q_true = others_logits.detach().float().softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (w1 - w2 * q_true) / num_classes, q_true


def boosting_loss(logits: Tensor, labels: Tensor, others_logits: Optional[Tensor] = None, w1: float = 5.0,
                  w2: float = 1.0, sample_weight: Optional[Tensor] = None) -> Tensor:
    """Phase 1's loss: mean_i (1/C) · (w2 · q_{i,y_i} − w1) · log p(h_m(x_i))_{y_i}.

    ``logits``: the learner's h_m(x) [B, C]; ``others_logits``: F_{−m}(x),
    the ensemble of the other modalities' learners (None: none exists yet,
    q_y = 1). ``sample_weight`` weighs each sample as ``cross_entropy`` does.
    C = 2, y = 0, q = (0.8, 0.2), p(h_m) = (0.5, 0.5): ½ · (0.8 − 5) · log ½ = 1.4556.
    """
    weight, _ = true_class_weights(others_logits, labels, logits.shape[-1], w1, w2)
    log_p = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    per_sample = -weight * log_p
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.dtype)
    return per_sample.mean()


def consolidation_loss(logits: Tensor, previous_logits: Tensor, grad: str = "current",
                       sample_weight: Optional[Tensor] = None) -> Tensor:
    """L_GA = MSE(p(h_m(x)), p(h_{m_{t−1}}(x))), averaged over every element [B, C].

    The previous learner's side is always detached; ``grad=none`` detaches
    the current side too (the authors' code: the term then has no gradient).
    p = (0.5, 0.5), p' = (0.8, 0.2): (0.09 + 0.09) / 2 = 0.09.
    """
    if grad not in ("current", "none"):
        raise ValueError(f"unknown ga_grad {grad!r} (allowed: current, none)")
    current = logits.float().softmax(-1)
    if grad == "none":
        current = current.detach()
    target = previous_logits.detach().float().softmax(-1)
    if sample_weight is None:
        return F.mse_loss(current, target)
    per_sample = (current - target).pow(2).mean(-1)
    return (per_sample * sample_weight.to(per_sample.dtype)).mean()


def stage_schedule(epoch: int, num_modalities: int, boosting_epochs: int,
                   rectification_epochs: int) -> tuple[int, int, int, bool]:
    """(stage t, phase 1 or 2, slot of m_t = t mod M, whether ``epoch`` is its phase's first epoch).

    E.g. E1 = 2, E2 = 1, M = 3: epochs 0, 1 are stage 0's phase 1 (slot 0),
    epoch 2 its phase 2, epoch 3 starts stage 1 (slot 1), epoch 9 stage 3 (slot 0).
    """
    length = boosting_epochs + rectification_epochs
    stage, within = divmod(epoch, length)
    phase = 1 if within < boosting_epochs else 2
    first = within == 0 or within == boosting_epochs
    return stage, phase, stage % num_modalities, first


def learners_added(epoch: int, num_modalities: int, boosting_epochs: int, rectification_epochs: int) -> list[bool]:
    """E while ``epoch`` trains: the slots whose phase 1 has finished before it (round robin)."""
    stage, phase, slot, _ = stage_schedule(epoch, num_modalities, boosting_epochs, rectification_epochs)
    added = [False] * num_modalities
    for past in range(min(stage, num_modalities)):
        added[past % num_modalities] = True
    if phase == 2:
        added[slot] = True
    return added


class SharedHead(nn.Module):
    """H, the learners' common space: Linear(d → hidden) → ReLU → Linear(hidden → C); hidden 0: one Linear."""

    def __init__(self, feature_dim: int, hidden: int, num_classes: int):
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# -- the objective --------------------------------------------------------------------------------
@METHODS.register("reconboost")
class ReconBoost(Objective):
    """Modality-alternating boosting: each modality's learner in turn corrects the others' ensemble (Hua et al., ICML 2024)."""

    class Config(Section):
        boosting_epochs: int = Field(
            1, ge=1, description="E1, epochs of a stage's phase 1 (one modality's learner; official 4, BMM 1)"
        )
        rectification_epochs: int = Field(
            1, ge=0, description="E2, epochs of a stage's phase 2 (all learners, H and β; official 4, BMM 1; 0: none)"
        )
        w1: float = Field(
            5.0, ge=0, description="w1 in ℓ = (1/C)(w2 q_y − w1) log p_y (official 5; 4 for AVE and ModelNet40)"
        )
        w2: float = Field(1.0, ge=0, description="w2, weight of the others' true-class probability q_y in ℓ")
        ga_weight: float = Field(0.5, ge=0, description="λ_GA, weight of the memory-consolidation MSE (from stage 1 on)")
        ga_grad: Literal["current", "none"] = Field(
            "current",
            description="current: gradient flows through p(h_m) [unverified]; none: both sides detached, the term has "
            "no gradient (the authors' code and BalanceMM)",
        )
        boost_rate: float = Field(
            1.0, gt=0, description="initial value of the learnable boost rate β (official 1.0; BMM 0.01)"
        )
        head: Literal["shared", "unimodal"] = Field(
            "shared",
            description="shared: one head H for every learner (the authors' common space; needs equal feature sizes); "
            "unimodal: learner m uses the model's unimodal head of m",
        )
        head_hidden: int = Field(
            256, ge=0, description="hidden width of the shared head H (official 256; 0: one linear layer)"
        )
        learner_lr: Optional[float] = Field(
            None, gt=0, description="learning rate of phase 1 (official m_lr 0.01 with SGD); unset: train.lr"
        )
        ensemble_lr: Optional[float] = Field(
            None, gt=0, description="learning rate of phase 2 (official e_lr 0.01 with SGD); unset: train.lr"
        )
        lr_schedule: Literal["fixed", "run"] = Field(
            "fixed",
            description="fixed: each phase keeps its rate and train.scheduler is not applied (official); run: the run's "
            "train.scheduler over the whole run (learner_lr and ensemble_lr must then be unset)",
        )
        pretrained_learners: bool = Field(
            False,
            description="every modality's learner is in the ensemble from the start (official --use_pretrain, with "
            "encoders from model.pretrained); off: a learner joins after its first phase 1",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options reconboost`)
    search_space = {
        "w1": FloatRange(1.0, 8.0),
        "w2": FloatRange(0.25, 2.0, log=True),
        "ga_weight": FloatRange(0.1, 2.0, log=True),
        "boost_rate": FloatRange(0.01, 1.0, log=True),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if config.lr_schedule == "run":
            for option in ("learner_lr", "ensemble_lr"):
                if getattr(config, option) is not None:
                    raise ConfigError(
                        f"reconboost.{option}={getattr(config, option)} needs reconboost.lr_schedule=fixed "
                        f"(with lr_schedule=run every phase uses train.lr and train.scheduler); unset it or use fixed"
                    )
        count = len(self.modalities)
        self.boost = nn.Parameter(torch.tensor(float(config.boost_rate)))
        # the schedule and E: functions of the epoch, kept for prediction and checkpoints
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("phase", torch.ones((), dtype=torch.long))
        self.register_buffer("active", torch.zeros((), dtype=torch.long))
        self.register_buffer("members", torch.full((count,), bool(config.pretrained_learners)))

    def setup(self, model, ctx):
        if self.config.head != "shared" or hasattr(self, "shared_head"):
            return
        dims = model.feature_dims
        if len({dims[m] for m in self.modalities}) > 1:
            shown = ", ".join(f"{m}: {dims[m]}" for m in self.modalities)
            raise ConfigError(
                f"reconboost.head=shared reads every modality's features with one head, which needs equal feature "
                f"sizes (got {shown}); set reconboost.head=unimodal"
            )
        self.shared_head = SharedHead(dims[self.modalities[0]], self.config.head_hidden, self.num_classes)

    def configure_optimizers(self, model, ctx):
        """One optimizer over every trainable parameter; a phase reaches only its own (the others have no gradient)."""
        optimizer = ctx.make_optimizer(ctx.params.trainable())
        if self.config.lr_schedule == "run":
            return {"optimizers": {OPTIMIZER: optimizer}}  # the trainer adds train.scheduler
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # train.lr, the rate of a phase whose own rate is unset
        return {"optimizers": {OPTIMIZER: optimizer}, "schedulers": {}}

    # -- the schedule -------------------------------------------------------------------------------
    def schedule(self, epoch: int) -> tuple[int, int, int, bool]:
        return stage_schedule(epoch, len(self.modalities), self.config.boosting_epochs, self.config.rectification_epochs)

    def members_at(self, epoch: int) -> list[bool]:
        """E while ``epoch`` trains (every learner with ``pretrained_learners``)."""
        if self.config.pretrained_learners:
            return [True] * len(self.modalities)
        return learners_added(epoch, len(self.modalities), self.config.boosting_epochs, self.config.rectification_epochs)

    def on_epoch_start(self, model, ctx):
        stage, phase, slot, first = self.schedule(ctx.epoch)
        self.stage.fill_(stage)
        self.phase.fill_(phase)
        self.active.fill_(slot)
        self.members.copy_(torch.tensor(self.members_at(ctx.epoch)))
        optimizer = ctx.optimizers.get(OPTIMIZER) if ctx.optimizers else None
        if optimizer is None:
            return
        if first:
            optimizer.state.clear()  # each phase has a fresh optimizer: no momentum or moments carried over
        if self.config.lr_schedule == "fixed":
            rate = self.config.learner_lr if phase == 1 else self.config.ensemble_lr
            for group in optimizer.param_groups:
                group["lr"] = rate if rate is not None else group["initial_lr"]

    def on_epoch_end(self, model, ctx):
        stage, phase, slot, _ = self.schedule(ctx.epoch)
        length = self.config.boosting_epochs + self.config.rectification_epochs
        if ctx.epoch % length == self.config.boosting_epochs - 1:
            self.members[slot] = True  # phase 1 is over: m_t joins (or stays in) the ensemble
        logs = {"reconboost/stage": float(stage), "reconboost/phase": float(phase),
                "reconboost/boost_rate": float(self.boost.detach())}
        for k, (m, member) in enumerate(zip(self.modalities, self.members.tolist())):
            logs[f"reconboost/active/{m}"] = float(k == slot)
            logs[f"reconboost/member/{m}"] = float(member)
        return logs

    # -- how this objective reads the model ----------------------------------------------------------
    def learner(self, model, modality: str, feature: Tensor) -> Tensor:
        """h_m's logits from modality m's features."""
        if self.config.head == "shared":
            return self.shared_head(feature)
        return model.unimodal_heads[modality](feature)

    def ensemble(self, model, features: dict[str, Tensor], members: list[str], boost: Tensor) -> Tensor:
        """β · Σ_{m ∈ members} h_m(x); zeros (a uniform prediction) when there is no member yet."""
        if not members:
            first = next(iter(features.values()))
            return first.new_zeros(first.shape[0], self.num_classes)
        return boost * torch.stack([self.learner(model, m, features[m]) for m in members]).sum(0)

    def member_names(self) -> list[str]:
        return [m for m, member in zip(self.modalities, self.members.tolist()) if member]

    def fuse(self, model, features):
        return self.ensemble(model, features, self.member_names(), self.boost)

    def predict_from_features(self, model, features):
        """F(x) = β Σ_{m∈E} h_m(x), the boosted ensemble."""
        return self.fuse(model, features)

    # -- one step -----------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        stage, phase, slot, _ = self.schedule(ctx.epoch)
        members = [m for m, member in zip(self.modalities, self.members_at(ctx.epoch)) if member]
        trained = [self.modalities[slot]] if phase == 1 else members
        features = model.encode(batch.inputs, trained)
        with torch.no_grad():
            features.update(model.encode(batch.inputs, [m for m in self.modalities if m not in trained]))
        features = {m: features[m] for m in self.modalities}
        if phase == 1:
            record = self._boosting_step(model, batch, features, members, stage, slot)
        else:
            record = self._rectification_step(model, batch, features, members)
        if self.config.head == "shared":
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        return record

    def _learners(self, model, features: dict[str, Tensor], trained: list[str]) -> dict[str, Tensor]:
        """Every modality's h_m(x): with gradient for ``trained``, under no-grad for the others."""
        logits = {}
        for m in self.modalities:
            if m in trained:
                logits[m] = self.learner(model, m, features[m])
            else:
                with torch.no_grad():
                    logits[m] = self.learner(model, m, features[m])
        return logits

    def _boosting_step(self, model, batch, features, members: list[str], stage: int, slot: int):
        config = self.config
        current = self.modalities[slot]
        learners = self._learners(model, features, [current])
        boost = self.boost.detach()  # β learns in phase 2 only
        others = [m for m in members if m != current]
        with torch.no_grad():
            others_logits = boost * torch.stack([learners[m] for m in others]).sum(0) if others else None
        loss = boosting_loss(learners[current], batch.labels, others_logits, config.w1, config.w2, batch.weight)
        logits = boost * learners[current] if others_logits is None else others_logits + boost * learners[current]
        in_ensemble = [m for m in self.modalities if m in members or m == current]
        record = self.record(model, batch, features, logits=logits)
        record.fuse = lambda f: self.ensemble(model, f, in_ensemble, boost)
        record.add_loss("boost", loss)
        weight, q_true = true_class_weights(others_logits, batch.labels, self.num_classes, config.w1, config.w2)
        record.logs["reconboost/q_true"] = q_true.mean()
        record.logs["reconboost/sample_weight"] = weight.mean()
        if stage > 0 and config.ga_weight > 0:
            previous = self.modalities[(stage - 1) % len(self.modalities)]
            consolidation = consolidation_loss(learners[current], learners[previous], config.ga_grad, batch.weight)
            record.add_loss("ga", config.ga_weight * consolidation)
        if config.head == "unimodal":
            record.unimodal = learners
        return record

    def _rectification_step(self, model, batch, features, members: list[str]):
        learners = self._learners(model, features, members)
        logits = self.boost * torch.stack([learners[m] for m in members]).sum(0)
        record = self.record(model, batch, features, logits=logits)
        record.fuse = lambda f: self.ensemble(model, f, members, self.boost)
        record.add_loss("rectify", cross_entropy(logits, batch))
        if self.config.head == "unimodal":
            record.unimodal = learners
        return record
