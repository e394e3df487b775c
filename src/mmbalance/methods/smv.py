"""SMV: sample-level modality valuation and re-sampling (Wei, Feng, Wang, Hu, "Enhancing Multimodal
Cooperation via Sample-level Modality Valuation", CVPR 2024), as a plugin.

A modality that contributes little to a sample's correct prediction is
under-trained on that sample; SMV values every modality of every training
sample with Shapley values and trains the weak ones more, by adding copies
of those samples that keep only the weak modality (BASELINES §14e).

Valuation (``on_epoch_end`` of every epoch from ``warmup_epochs − 1`` on, eval
mode, no gradient, over the training split): for each sample and coalition
S of modalities (features outside S zeroed, the run's own prediction),
v(S) = |S|·1[argmax ŷ(f^S) = y], v(∅) = 0, and φ_m is the Shapley value of v.
For M = 2, φ_a = (v(a) + v(a,v) − v(v))/2 ∈ {−0.5, 0, 0.5, 1, 1.5}. The |S|
scaling for M > 2 is our generalisation of the 2-modal game [unverified].

Next epoch (``epoch_plan``), ``level=sample`` (default): every sample once
with all modalities, plus, per sample and modality m, copies that keep only
m: 1 if 0.4 < φ_m < 0.9, 2 if −0.1 < φ_m < 0.4, 3 if φ_m < −0.1 (``copies``).
``level=modality``: φ̄_m, the mean of φ_m over a random 20 % of the training
samples (drawn with replacement), gap_m = 1 − φ̄_m, r = (2/3)·|gap_a − gap_v|·α
(``ratio``: linear; tanh(r); or ((2/3)|gap_a − gap_v|)^1.5·α), and ⌊r·N⌋ extra
samples drawn uniformly with replacement that keep only the modality with the
larger gap; for M > 2 the spread max gap − min gap replaces |gap_a − gap_v|
and the copies keep the modality of the largest gap [our generalisation].

Training on a plan: the objective zeroes the features of the modalities a
copy drops before fusing, CE(fuse(f ⊙ keep), y) for ``joint``; any objective
that honours ``batch.keep`` works (the composition rules refuse others).

State: the valuation (φ per training sample, N × M), whether one exists, and
the seed of the modality-level draw are buffers, so a resumed run plans the
same epochs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import Section
from ..data.plan import EpochPlan
from ..errors import ConfigError
from ..evaluation.shapley import all_coalitions
from ..models.multimodal import zero_out
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Plugin
from .contribution import shapley_matrix

SEED_DRAW_LIMIT = 2**62


# -- the method's core, on tensors --------------------------------------------------------------------
def coalition_values(correct: dict[frozenset[str], Tensor]) -> dict[frozenset[str], Tensor]:
    """v(S) = |S| · 1[correct with S], per sample; v(∅) = 0."""
    values = {S: len(S) * hit.float() for S, hit in correct.items() if S}
    some = next(iter(values.values()))
    values[frozenset()] = torch.zeros_like(some)
    return values


def sample_shapley(values: dict[frozenset[str], Tensor], modalities: list[str], matrix: Tensor | None = None) -> Tensor:
    """Per-sample Shapley values of the coalition game, N × M (columns in ``modalities`` order).

    Shapley values are linear in the game, so one product with CAL's
    ``shapley_matrix`` (pass it in to reuse it across batches) does it.
    """
    matrix = shapley_matrix(modalities) if matrix is None else matrix
    games = torch.stack([values[c].float() for c in all_coalitions(modalities)], dim=1)  # N × 2^M
    return games @ matrix.T.to(games)


def sample_copies(phi: Tensor, bounds: tuple[float, float, float] | list[float] = (0.9, 0.4, -0.1)) -> Tensor:
    """Extra single-modality copies per sample and modality: 1 in (b1, b0), 2 in (b2, b1), 3 below b2."""
    high, mid, low = bounds
    copies = torch.zeros_like(phi, dtype=torch.long)
    copies[(phi > mid) & (phi < high)] = 1
    copies[(phi > low) & (phi < mid)] = 2
    copies[phi < low] = 3
    return copies


def modality_ratio(mean_phi: Tensor, alpha: float, rule: str = "linear") -> tuple[float, int]:
    """(r, index of the modality with the largest gap) from the mean Shapley values φ̄_m."""
    gap = 1.0 - mean_phi
    spread = float(gap.max() - gap.min())
    base = 2.0 / 3.0 * spread
    if rule == "linear":
        r = base * alpha
    elif rule == "tanh":
        r = math.tanh(base * alpha)
    else:  # "power"
        r = base**1.5 * alpha
    return r, int(gap.argmax())


def plan_from_copies(copies: Tensor) -> EpochPlan:
    """Every sample once (all modalities) followed by ``copies[i, m]`` copies of sample i keeping only m."""
    n, count = copies.shape
    rows = [torch.arange(n)]
    keep = [torch.ones(n, count, dtype=torch.bool)]
    for j in range(count):
        extra = torch.repeat_interleave(torch.arange(n), copies[:, j])
        only = torch.zeros(len(extra), count, dtype=torch.bool)
        only[:, j] = True
        rows.append(extra)
        keep.append(only)
    return EpochPlan(torch.cat(rows), torch.cat(keep))


@METHODS.register("smv")
class SMV(Plugin):
    """SMV: Shapley valuation per sample and modality; weak modalities re-trained on single-modality copies (CVPR 2024)."""

    class Config(Section):
        warmup_epochs: int = Field(5, ge=1, description="plain training epochs; valuation starts at the end of epoch warmup_epochs − 1 (0-based)")
        level: Literal["sample", "modality"] = Field("sample", description="sample: copies per sample by φ; modality: ⌊r·N⌋ copies of the weakest modality")
        copy_bounds: list[float] = Field(
            [0.9, 0.4, -0.1], min_length=3, max_length=3, description="φ bounds (b0 > b1 > b2): 1 copy in (b1, b0), 2 in (b2, b1), 3 below b2"
        )
        alpha: float = Field(1.0, ge=0, description="modality level: scale of r (official 1; BalanceMM 0.5)")
        subset: float = Field(0.2, gt=0, le=1, description="modality level: fraction of the training set (with replacement) averaged into φ̄")
        ratio: Literal["linear", "tanh", "power"] = Field("linear", description="modality level: r = (2/3)·spread·α, tanh of it, or ((2/3)·spread)^1.5·α")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options smv`)
    search_space = {
        "level": Choice(["sample", "modality"]),
        "alpha": FloatRange(0.25, 2.0, log=True),
        "subset": FloatRange(0.1, 0.5),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        high, mid, low = config.copy_bounds
        if not high > mid > low:
            raise ConfigError(f"smv.copy_bounds must decrease (b0 > b1 > b2), got {list(config.copy_bounds)}")
        self.register_buffer("phi", torch.zeros(0, len(self.modalities)))
        self.register_buffer("valued", torch.zeros((), dtype=torch.bool))
        self.register_buffer("draw_seed", torch.zeros((), dtype=torch.long))

    def setup(self, model, ctx):
        size = len(ctx.train_eval_loader.dataset)
        self.phi = torch.zeros(size, len(self.modalities), device=self.phi.device)

    # -- valuation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def value(self, model, ctx) -> Tensor:
        """φ (N × M) of every training sample under the run's current prediction, the same on every process."""
        base = ctx.train_eval_loader
        positions = list(range(len(base.dataset)))[ctx.dist.rank :: ctx.dist.world_size]
        loader = DataLoader(base.dataset, batch_size=base.batch_size, sampler=positions, collate_fn=base.collate_fn,
                            num_workers=base.num_workers, pin_memory=base.pin_memory)
        coalitions = [S for S in all_coalitions(self.modalities) if S]
        matrix = shapley_matrix(self.modalities)
        chunks = []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in loader:
                    batch = batch.to(ctx.device)
                    features = ctx.encode(batch.inputs)
                    correct = {
                        S: ctx.predict_from_features(zero_out(features, S)).argmax(-1) == batch.labels for S in coalitions
                    }
                    chunks.append(sample_shapley(coalition_values(correct), self.modalities, matrix).cpu())
        finally:
            model.train(was_training)
        phi = torch.cat(chunks) if chunks else torch.zeros(0, len(self.modalities))
        if ctx.dist.enabled:
            gathered = ctx.dist.gather_objects((positions, phi))
            full = torch.zeros(len(base.dataset), len(self.modalities))
            for rows, values in gathered:
                full[torch.as_tensor(rows, dtype=torch.long)] = values
            phi = full
        return phi

    def on_epoch_end(self, model, ctx):
        if ctx.epoch < self.config.warmup_epochs - 1:
            return {}
        phi = self.value(model, ctx)
        self.phi = phi.to(self.phi.device)
        self.valued.fill_(True)
        seed = torch.randint(0, SEED_DRAW_LIMIT, (1,), generator=ctx.generator)
        self.draw_seed.fill_(int(seed))
        logs = {f"smv/phi/{m}": float(phi[:, j].mean()) for j, m in enumerate(self.modalities)}
        plan = self.plan()
        if plan.keep is not None:
            extra = plan.keep[len(phi):]
            for j, m in enumerate(self.modalities):
                logs[f"smv/copies/{m}"] = float(extra[:, j].sum())
        return logs

    # -- the next epoch ----------------------------------------------------------------------------
    def plan(self) -> EpochPlan:
        phi = self.phi.cpu()
        n, count = phi.shape
        c = self.config
        if c.level == "sample":
            return plan_from_copies(sample_copies(phi, c.copy_bounds))
        g = torch.Generator().manual_seed(int(self.draw_seed))
        subset = torch.randint(0, n, (max(1, int(c.subset * n)),), generator=g)
        r, weakest = modality_ratio(phi[subset].mean(dim=0), c.alpha, c.ratio)
        extra = torch.randint(0, n, (int(math.floor(r * n)),), generator=g)
        only = torch.zeros(len(extra), count, dtype=torch.bool)
        only[:, weakest] = True
        return EpochPlan(torch.cat([torch.arange(n), extra]), torch.cat([torch.ones(n, count, dtype=torch.bool), only]))

    def epoch_plan(self, model, ctx):
        return self.plan() if bool(self.valued) else None
