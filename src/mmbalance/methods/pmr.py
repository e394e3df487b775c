"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wang, Wang, Guo, CVPR 2023), as a plugin for any objective.

Each modality gets a non-parametric classifier: one prototype per class, the
mean of that modality's encoder output over training samples of the class
(BASELINES §4). Prototypes are computed at every epoch start, in eval mode
without gradient, from the training split only (``ctx.train_eval_loader``;
by default a random ``proto_fraction`` = 10 % of it, drawn afresh each
epoch), and smoothed with momentum μ: c ← (1 − μ)·c_new + μ·c_old.

Per step, for every modality m: sim^m_{i,k} = −‖f_m,i − c^m_k‖₂ (prototypes
constant), the prototype score s^p_m = Σ_i softmax(sim^m_i)[y_i] and the
prototypical cross-entropy PCE_m = CE(sim^m, y). Inside the modulation window
the slow modality (the lower score; for M > 2 every modality below the best,
``multi_rule``) gets α·PCE_m added to the objective's loss, which pulls its
features toward its own prototypes without going through the fused head.
Optionally (off by default, [unverified]) the dominant modality's prototype
entropy is maximised for the first ``entropy_epochs`` epochs, the paper's
"prototypical entropy regularisation" that slows its early convergence.

``variant=official`` follows the authors' code, which also leaves the
prototypes made right after the first epoch unsmoothed. Unlike that code the
prototypes never come from the validation or test split.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from ..models.readouts import modality_scores
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin, cross_entropy
from .window import WindowConfig, in_window

SEED_OFFSET = 0x504D52  # the subset draw differs from every other use of the run's seed


# -- the method's core, usable on plain tensors --------------------------------------------------
def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """[B, C] sim_{i,k} = −‖f_i − c_k‖₂ (Euclidean, not squared) between features [B, d] and prototypes [C, d].

    ``torch.cdist`` in float32 (its matrix-product form from 25 rows on, ~10× faster
    for hundreds of classes); a feature equal to a prototype gets distance 0 and
    a zero (sub)gradient, never NaN.
    """
    return -torch.cdist(features.float(), prototypes.float())


def pce_weights(scores: Tensor, alpha: float, rule: str = "below_max") -> Tensor:
    """[M] β_m: α for the slow modalities, 0 for the others, from prototype scores s^p [M].

    M = 2: s_a > s_v ⇒ (0, α); s_a < s_v ⇒ (α, 0); equal ⇒ (0, 0) (the paper's
    rule). For M > 2 ([unverified]) ``below_max`` gives α to every modality
    scoring below the best, ``weakest`` only to the lowest-scoring one(s); both
    reduce to the two-modality rule.
    """
    top = scores.max()
    weak = scores < top
    if rule == "weakest":
        weak = weak & (scores == scores.min())
    elif rule != "below_max":
        raise ValueError(f"unknown rule {rule!r} (allowed: below_max, weakest)")
    return alpha * weak.to(scores.dtype)


def dominant_mask(scores: Tensor) -> Tensor:
    """[M] True for the best-scoring modality (or tied best), none when all modalities score alike."""
    return (scores == scores.max()) & (scores > scores.min())


def prototype_entropy(similarities: Tensor) -> Tensor:
    """Batch mean of H(softmax(sim_i)): how undecided the prototype classifier is."""
    log_p = similarities.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(Σ_{i: y_i = k} f_i [C, d], counts [C]), by a one-hot product (deterministic on GPU, unlike index_add_)."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    return one_hot.T @ features.float(), one_hot.sum(0)


def updated_prototypes(old: Tensor, sums: Tensor, counts: Tensor, seen: Tensor, momentum: float, smooth: bool) -> Tensor:
    """The next prototypes from one pass: class means, smoothed with the old ones where there are old ones.

    c_k = (1 − μ)·mean_k + μ·c_k^old for classes seen now and before (when
    ``smooth``); the plain mean for classes seen for the first time (or when
    not smoothing); a class absent from this pass keeps its old prototype
    (zeros if it was never seen; the authors' code would divide by zero).
    """
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    if smooth:
        means = torch.where(seen.unsqueeze(-1), (1 - momentum) * means + momentum * old, means)
    return torch.where(present.unsqueeze(-1), means, old)


def subset_size(num_samples: int, steps_per_epoch: int, batch_size: int, fraction: float) -> int:
    """Samples of one prototype pass: ⌊fraction · training batches⌋ batches (at least one), as the authors' code reads."""
    batches = max(math.floor(steps_per_epoch * fraction), 1)
    return min(num_samples, batches * batch_size)


def prototype_indices(num_samples: int, size: int, subset: str, generator: torch.Generator) -> Optional[list[int]]:
    """Training-set rows of one prototype pass (ascending), or None for the whole set in its fixed order.

    ``first``: the first ``size`` rows of the fixed-order training pass;
    ``random``: ``size`` rows drawn from ``generator``, which the authors' code
    gets from the first batches of its shuffled training loader.
    """
    if size >= num_samples:
        return None
    if subset == "first":
        return list(range(size))
    return sorted(torch.randperm(num_samples, generator=generator)[:size].tolist())


@torch.no_grad()
def accumulate_prototypes(encode: Callable, loader, modalities: list[str], num_classes: int,
                          device: torch.device) -> tuple[list[Tensor], Tensor]:
    """Per-modality class sums [C, d_m] and class counts [C] of ``encode``'s features over ``loader``."""
    sums: list[Tensor] = []
    counts = torch.zeros(num_classes, device=device)
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        features = encode(batch.inputs)
        for slot, m in enumerate(modalities):
            total, count = class_sums(features[m].flatten(1), batch.labels, num_classes)
            if len(sums) <= slot:
                sums.append(total)
            else:
                sums[slot] += total
        counts += count
    return sums, counts


# -- the plugin --------------------------------------------------------------------------------
@METHODS.register("pmr")
class PMR(Plugin):
    """Prototypical modal rebalance: prototype CE on the slow modality (Fan et al., CVPR 2023)."""

    class Config(WindowConfig):
        alpha: float = Field(1.0, ge=0, description="α, weight of the slow modality's prototypical CE (official 1.0, BalanceMM 0.6)")
        momentum: float = Field(
            0.2, ge=0, lt=1, description="μ in c ← (1 − μ)·c_new + μ·c_old (official 0.2, BalanceMM 0.5)"
        )
        proto_fraction: float = Field(
            0.1, gt=0, le=1, description="share of the training batches each prototype pass reads (1: the whole training split)"
        )
        proto_subset: Literal["random", "first"] = Field(
            "random",
            description="which training samples a partial pass reads: a fresh random draw every epoch (as the authors' "
            "shuffled loader), or the first ones of the fixed-order training pass",
        )
        multi_rule: Literal["below_max", "weakest"] = Field(
            "below_max",
            description="M > 2 [unverified]: the prototypical CE for every modality scoring below the best, or for the weakest only",
        )
        entropy_weight: float = Field(
            0.0, ge=0,
            description="μ_per [unverified, not in the official code]: weight of the dominant modality's prototype "
            "entropy, maximised in the first entropy_epochs epochs; 0: off",
        )
        entropy_epochs: int = Field(10, ge=0, description="E_per [unverified]: epochs (from 0) in which the entropy term acts")
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="paper: every prototype pass after the first is smoothed; official (the authors' code): "
            "the first two are not",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options pmr`)
    search_space = {
        "alpha": FloatRange(0.1, 2.0, log=True),
        "momentum": FloatRange(0.0, 0.9),
    }

    auxiliary_options = ("alpha", "entropy_weight")

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))  # prototype passes made so far
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))  # classes with a prototype
        self.register_buffer("last_pass", torch.zeros(2))  # samples read, classes missing from the last pass

    # -- state --------------------------------------------------------------------------------
    def _allocate(self, feature_dims: dict[str, int], device) -> None:
        """One [C, d_m] prototype buffer per modality (by slot: modality names need not be attribute names)."""
        for slot, m in enumerate(self.modalities):
            name = f"prototypes_{slot}"
            if not hasattr(self, name):
                self.register_buffer(name, torch.zeros(self.num_classes, feature_dims[m], device=device))

    def prototypes(self, slot: int) -> Tensor:
        return getattr(self, f"prototypes_{slot}")

    def setup(self, model, ctx):
        self._allocate(model.feature_dims, self.passes.device)

    # -- prototypes ---------------------------------------------------------------------------
    def _prototype_loader(self, ctx):
        """The training data of this epoch's pass: ``ctx.train_eval_loader``, or a subset of its dataset."""
        base = ctx.train_eval_loader
        if base is None:
            raise ValueError("pmr computes its prototypes from ctx.train_eval_loader, which this context lacks")
        dataset = base.dataset
        steps = len(ctx.train_loader) if ctx.train_loader is not None else len(base)
        batch = (ctx.train_loader.batch_size if ctx.train_loader is not None else base.batch_size) * ctx.dist.world_size
        size = subset_size(len(dataset), steps, batch, self.config.proto_fraction)
        seed = (ctx.generator.initial_seed() * 1_000_003 + ctx.epoch * 7_919 + SEED_OFFSET) % 2**63
        rows = prototype_indices(len(dataset), size, self.config.proto_subset, torch.Generator().manual_seed(seed))
        if rows is None:
            return base
        rows = rows[ctx.dist.rank :: ctx.dist.world_size]
        return DataLoader(dataset, batch_size=base.batch_size, sampler=rows, collate_fn=base.collate_fn,
                          num_workers=base.num_workers, pin_memory=base.pin_memory)

    def on_epoch_start(self, model, ctx):
        self._allocate(model.feature_dims, self.passes.device)
        loader = self._prototype_loader(ctx)
        was_training = model.training
        model.eval()
        try:
            # iterating a DataLoader draws from the global RNG: keep training's random stream as it was
            with torch.random.fork_rng(devices=[]):
                sums, counts = accumulate_prototypes(model.encode, loader, self.modalities, self.num_classes, ctx.device)
        finally:
            model.train(was_training)
        if not sums:  # this process read no batch (more processes than rows): it contributes zeros
            sums = [torch.zeros_like(self.prototypes(slot)) for slot in range(len(self.modalities))]
        counts = ctx.dist.all_reduce_sum(counts.to(self.passes.device))
        smooth = bool(self.passes >= (2 if self.config.variant == "official" else 1))
        with torch.no_grad():
            for slot, total in enumerate(sums):
                old = self.prototypes(slot)
                total = ctx.dist.all_reduce_sum(total.to(old.device))
                old.copy_(updated_prototypes(old, total, counts, self.seen, self.config.momentum, smooth))
            self.seen |= counts > 0
            self.passes += 1
            self.last_pass.copy_(torch.stack([counts.sum(), (counts == 0).sum().float()]))

    # -- per step -----------------------------------------------------------------------------
    def on_forward(self, record, ctx):
        modulating = in_window(self.config, ctx.epoch)
        features = record.encoder_outputs
        if not modulating:  # scores and logs only: no graph to build
            features = {m: f.detach() for m, f in features.items()}
        similarities = torch.stack(
            [prototype_logits(features[m].flatten(1), self.prototypes(slot)) for slot, m in enumerate(self.modalities)]
        )  # [M, B, C]
        scores = ctx.dist.mean(modality_scores(similarities, record.labels))
        beta = pce_weights(scores, self.config.alpha, self.config.multi_rule)
        pce = torch.stack([cross_entropy(sim, record.batch) for sim in similarities])
        if modulating and self.config.alpha > 0:
            # β is 0 for the other modalities: their gradients get exact zeros added
            record.add_loss("pmr_pce", (beta * pce).sum())
        regularising = modulating and self.config.entropy_weight > 0 and ctx.epoch < self.config.entropy_epochs
        if regularising:
            dominant = dominant_mask(scores).to(similarities.dtype)
            entropy = torch.stack([prototype_entropy(sim) for sim in similarities])
            record.add_loss("pmr_entropy", -self.config.entropy_weight * (dominant * entropy).sum())
        record.logs["pmr/modulating"] = float(modulating)
        two = len(self.modalities) == 2
        if two:  # the paper's ρ = s^p_a / s^p_v
            record.logs["pmr/ratio"] = scores[0] / scores[1].clamp_min(1e-12)
        for slot, m in enumerate(self.modalities):
            record.logs[f"pmr/score/{m}"] = scores[slot]
            if not two:  # M > 2: each score over the best one
                record.logs[f"pmr/relative_score/{m}"] = scores[slot] / scores.max().clamp_min(1e-12)
            record.logs[f"pmr/beta/{m}"] = beta[slot]
            record.logs[f"pmr/pce/{m}"] = pce[slot].detach()

    def on_epoch_end(self, model, ctx):
        samples, missing = self.last_pass.tolist()
        return {"pmr/proto_samples": samples, "pmr/proto_missing_classes": missing}
