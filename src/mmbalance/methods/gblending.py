"""G-Blending: Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal
Classification Networks Hard?", CVPR 2020), as an objective (BASELINES §6).

The loss is a blend of K = M + 1 cross-entropies, one per head: each
unimodal head on its encoder's features (its gradient reaches that encoder)
and the fused head, L = Σ_k w_k CE_k with Σ_k w_k = 1. The weights say how
much each head generalises relative to how much it overfits, measured
empirically: at the start of every super-epoch (``super_epoch`` = N epochs,
``schedule=online``; once at the start with ``offline``), for every head k a
copy of the current model trains on CE_k alone for N epochs (unimodal k:
encoder k and head k; fused: every encoder and the fusion head; a fresh
optimizer from ``ctx.make_optimizer``), and the mean per-sample losses on
training data (T) and held-out data (V) are read before and after:

    ΔG_k = L^V_k(0) − L^V_k(N)                                   generalisation gained
    ΔO_k = [L^V_k(N) − L^T_k(N)] − [L^V_k(0) − L^T_k(0)]          overfitting gained
    w_k  = (ΔG_k / ΔO_k²) / Σ_j (ΔG_j / ΔO_j²)

with the spec's guards: ΔG_k ← max(ΔG_k, 0), ΔO_k² ← max(ΔO_k², ``overfit_floor``),
uniform weights when no ΔG is positive. V is ``ctx.heldout_loader`` (the
validation split, or with ``data.heldout=carve`` a carve of the training
split); T is a fixed random subset of ``ctx.train_eval_loader``'s data as
large as V (``train_losses=full``: all of it). The test split is never read.
The estimation works on copies inside a forked random stream: the real
model, its gradients, the optimizer state and the run's random numbers are
left exactly as they were.

``variant=multibench`` is MultiBench's ``gradient_blend.py``: w_k ∝ |G_k / O_k²|
with G_k = L^V_k(N) and O_k = L^V_k(N) − L^T_k(N) (O ≤ 0 → 1e-4), and after every
super-epoch a separate copy of the fused head is fine-tuned for
``finetune_epochs`` on frozen training features; once fine-tuned it is the
prediction head.

State (buffers, so a resume is exact): the weights, the last estimation's
four loss vectors, the super-epoch last estimated and the counters.
"""

from __future__ import annotations

import copy
import time
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import Section
from ..errors import ConfigError, MMBalanceError
from ..registry import METHODS
from ..search_space import Choice, IntRange
from .base import Objective, cross_entropy

FUSED = "fused"
SEED_OFFSET = 0x47424C  # "GBL": the draws of this method differ from every other use of the run's seed
LOSS_ROWS = ("train_start", "heldout_start", "train_end", "heldout_end")  # rows of the [4, K] loss table


# -- the method's core, on plain tensors -------------------------------------------------------------

def generalisation_and_overfitting(losses: Tensor) -> tuple[Tensor, Tensor]:
    """(ΔG, ΔO) per head from a [4, K] table of mean losses (rows ``LOSS_ROWS``: L^T(0), L^V(0), L^T(N), L^V(N)).

    ΔG = L^V(0) − L^V(N): how much the held-out loss fell (positive is good);
    ΔO = [L^V(N) − L^T(N)] − [L^V(0) − L^T(0)]: how much the train/held-out gap grew.
    """
    train_start, heldout_start, train_end, heldout_end = losses
    gain = heldout_start - heldout_end
    overfit = (heldout_end - train_end) - (heldout_start - train_start)
    return gain, overfit


def blend_weights(gain: Tensor, overfit: Tensor, overfit_floor: float = 1e-8) -> Tensor:
    """w_k = (ΔG_k / ΔO_k²) / Σ_j (ΔG_j / ΔO_j²), with the spec's guards.

    ΔG_k < 0 (the held-out loss rose) counts as 0; ΔO_k² is floored at
    ``overfit_floor`` so a head that did not overfit gets a large, finite
    weight; when no head gained, the weights are uniform.
    """
    gain = gain.clamp_min(0)
    raw = gain / (overfit * overfit).clamp_min(overfit_floor)
    total = raw.sum()
    if not bool(total > 0):
        return torch.full_like(raw, 1 / raw.numel())
    return raw / total


def multibench_weights(losses: Tensor, overfit_floor: float = 1e-4) -> Tensor:
    """MultiBench's rule (``delta=False``): w_k ∝ |G_k / O_k²|, G = L^V(N), O = L^V(N) − L^T(N).

    It reads the losses after training only, not their changes. A negative O
    becomes ``overfit_floor`` (1e-4, as MultiBench); so does an O of exactly 0,
    which MultiBench would divide by. Uniform weights if every G is 0.
    """
    _, _, train_end, heldout_end = losses
    overfit = heldout_end - train_end
    overfit = torch.where(overfit > 0, overfit, torch.full_like(overfit, overfit_floor))
    raw = (heldout_end / (overfit * overfit)).abs()
    total = raw.sum()
    if not bool(total > 0):
        return torch.full_like(raw, 1 / raw.numel())
    return raw / total


def blended_loss(weights: Tensor, fused: Tensor, unimodal: list[Tensor]) -> Tensor:
    """Σ_m w_m CE_m + w_fused CE_fused, from the heads' losses (weights ordered unimodal heads first, fused last)."""
    return (weights[:-1] * torch.stack(unimodal)).sum() + weights[-1] * fused


def head_logits(model, inputs: dict[str, Tensor], head: str) -> Tensor:
    """Logits of one head: a unimodal head on its own encoder only, or the fused head on every encoder."""
    if head == FUSED:
        return model.fuse(model.encode(inputs))
    return model.heads(model.encode(inputs, [head]))[head]


def head_parameters(model, head: str) -> list:
    """What a head's copy trains: encoder m and head m, or every encoder and the fusion head."""
    if head == FUSED:
        modules = [*model.encoders.values(), model.fusion]
    else:
        modules = [model.encoders[head], model.unimodal_heads[head]]
    return [p for module in modules for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def mean_losses(model, loader, heads: list[str], device, dist) -> Tensor:
    """[len(heads)] mean per-sample cross-entropy of each head over ``loader`` (pooled across processes, float64).

    Every modality is encoded once per batch; the model is read as it is
    (the caller sets eval mode).
    """
    totals = torch.zeros(len(heads) + 1, dtype=torch.float64, device=device)
    unimodal = [h for h in heads if h != FUSED]
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        features = model.encode(batch.inputs, unimodal if FUSED not in heads else None)
        head_out = model.heads({m: features[m] for m in unimodal}) if unimodal else {}
        for j, head in enumerate(heads):
            logits = model.fuse(features) if head == FUSED else head_out[head]
            totals[j] += F.cross_entropy(logits.float(), batch.labels, reduction="sum").double()
        totals[-1] += len(batch)
    totals = dist.all_reduce_sum(totals)
    if not bool(totals[-1] > 0):
        raise MMBalanceError("gblending: the loss estimate read no sample (is the held-out data empty?)")
    return totals[:-1] / totals[-1]


def shard_loader(template: DataLoader, rows: list[int], batch_size: int, dist) -> DataLoader:
    """A loader over ``rows`` of ``template``'s dataset, this process's share, with the template's collation and workers."""
    return DataLoader(template.dataset, batch_size=batch_size, sampler=rows[dist.rank :: dist.world_size],
                      collate_fn=template.collate_fn, num_workers=template.num_workers, pin_memory=template.pin_memory)


# -- the objective -------------------------------------------------------------------------------------

@METHODS.register("gblending")
class GBlending(Objective):
    """Gradient-Blending: fused and unimodal losses weighted by held-out generalisation / overfitting² (Wang et al., CVPR 2020)."""

    class Config(Section):
        schedule: Literal["online", "offline"] = Field(
            "online", description="online: re-estimate the weights at the start of every super-epoch; offline: once, at the start"
        )
        super_epoch: int = Field(10, ge=1, description="N, epochs per super-epoch (BalanceMM 10, MultiBench 20)")
        estimation_epochs: Optional[int] = Field(
            None, ge=1, description="epochs each head's copy trains during an estimation; unset: super_epoch (the paper)"
        )
        train_losses: Literal["subset", "full"] = Field(
            "subset",
            description="L^T on a fixed random subset of the training data as large as the held-out data (spec), "
            "or on all of it (MultiBench)",
        )
        overfit_floor: float = Field(1e-8, gt=0, description="floor of ΔO² in w = ΔG/ΔO² (ours; the paper has none)")
        variant: Literal["paper", "multibench"] = Field(
            "paper",
            description="paper: w ∝ ΔG/ΔO²; multibench (MultiBench's gradient_blend.py): w ∝ |L^V(N) / (L^V(N) − L^T(N))²| "
            "and a fused head fine-tuned on frozen features after every super-epoch, then used for prediction",
        )
        finetune_epochs: int = Field(
            25, ge=0, description="variant=multibench: epochs of the fused-head fine-tune after every super-epoch (0: none)"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options gblending`)
    search_space = {
        "super_epoch": IntRange(2, 10),
        "schedule": Choice(["online", "offline"]),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if FUSED in self.modalities:
            raise ConfigError(f"gblending names its fused head '{FUSED}'; rename the modality '{FUSED}'")
        self.head_names = [*self.modalities, FUSED]
        count = len(self.head_names)
        self.register_buffer("weights", torch.full((count,), 1 / count, dtype=torch.float64))
        self.register_buffer("losses", torch.zeros(len(LOSS_ROWS), count, dtype=torch.float64))
        self.register_buffer("estimated_super_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("estimated_epoch", torch.full((), -1, dtype=torch.long))  # the epoch of the last estimation
        self.register_buffer("estimations", torch.zeros((), dtype=torch.long))
        self.register_buffer("finetunes", torch.zeros((), dtype=torch.long))
        # wall time of the last estimation, for the epoch's log only: not state, so not checkpointed
        self.register_buffer("estimation_seconds", torch.zeros((), dtype=torch.float64), persistent=False)

    @property
    def multibench(self) -> bool:
        return self.config.variant == "multibench"

    def setup(self, model, ctx):
        if self.multibench and self.config.finetune_epochs > 0:
            # MultiBench fine-tunes one copy of the initial fused head, kept across super-epochs
            self.finetune_head = copy.deepcopy(model.fusion)

    # -- the step ----------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        features = self.encode(model, batch.inputs)
        logits = self.fuse(model, features)
        unimodal = self.heads(model, features)
        record = self.record(model, batch, features, logits=logits, unimodal=unimodal)
        weights = self.weights.float()
        for j, m in enumerate(self.modalities):
            record.add_loss(f"unimodal_{m}", weights[j] * cross_entropy(unimodal[m], batch))
        record.add_loss("fused", weights[-1] * cross_entropy(logits, batch))
        return record

    def predict_from_features(self, model, features):
        if self.multibench and int(self.finetunes) > 0 and hasattr(self, "finetune_head"):
            return self.finetune_head(features)
        return self.fuse(model, features)

    # -- schedule ------------------------------------------------------------------------------------
    def super_epoch_of(self, epoch: int) -> int:
        """The super-epoch whose weights epoch ``epoch`` trains with (always 0 when offline)."""
        return epoch // self.config.super_epoch if self.config.schedule == "online" else 0

    def estimation_due(self, epoch: int) -> bool:
        """True when this epoch's super-epoch has no estimate yet (epochs 0, N, 2N, ... in an uninterrupted run)."""
        return int(self.estimated_super_epoch) != self.super_epoch_of(epoch)

    def finetune_due(self, epoch: int, max_epochs: int) -> bool:
        """variant=multibench: after the last epoch of every super-epoch, and after the run's last epoch."""
        if not self.multibench or self.config.finetune_epochs == 0:
            return False
        return (epoch + 1) % self.config.super_epoch == 0 or epoch + 1 == max_epochs

    def seed(self, ctx, *salt: int) -> int:
        """A seed from the run's seed (not drawn: no random stream advances) and ``salt``."""
        value = ctx.generator.initial_seed() * 1_000_003 + SEED_OFFSET
        for s in salt:
            value = value * 7_919 + s
        return value % 2**63

    def on_epoch_start(self, model, ctx):
        if not self.estimation_due(ctx.epoch):
            return
        started = time.perf_counter()
        losses = self.estimate(model, ctx)
        if self.multibench:
            weights = multibench_weights(losses)
        else:
            weights = blend_weights(*generalisation_and_overfitting(losses), self.config.overfit_floor)
        with torch.no_grad():
            self.losses.copy_(losses)
            self.weights.copy_(weights)
            self.estimated_super_epoch.fill_(self.super_epoch_of(ctx.epoch))
            self.estimated_epoch.fill_(ctx.epoch)
            self.estimations += 1
            self.estimation_seconds.fill_(time.perf_counter() - started)

    # -- estimation ----------------------------------------------------------------------------------
    def train_loss_loader(self, ctx):
        """T: a fixed random subset of the training data as large as V (the same rows all run long), or all of it."""
        base = ctx.train_eval_loader
        if self.config.train_losses == "full":
            return base
        size = len(ctx.heldout_loader.dataset)
        total = len(base.dataset)
        if size >= total:
            return base
        rows = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed(ctx, 0)))[:size]
        return shard_loader(base, sorted(rows.tolist()), base.batch_size, ctx.dist)

    def copy_training_loader(self, ctx, estimation: int, epoch: int):
        """The training data of one copy epoch: a seeded permutation, padded so every process takes as many steps."""
        base = ctx.train_loader
        total = len(base.dataset)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed(ctx, 1, estimation, epoch))).tolist()
        world = ctx.dist.world_size
        order += order[: -(-total // world) * world - total]
        return shard_loader(base, order, base.batch_size, ctx.dist)

    def estimate(self, model, ctx) -> Tensor:
        """[4, K] losses (``LOSS_ROWS``) of every head before and after its copy trains alone.

        Runs in a forked random stream seeded from the run's seed and the
        estimation's number; the real model is only read, in eval mode, and
        its train/eval modes are restored.
        """
        for name in ("heldout_loader", "train_eval_loader", "train_loader", "make_optimizer"):
            if getattr(ctx, name) is None:
                raise ValueError(f"gblending estimates its weights with ctx.{name}, which this context lacks")
        heads, count = self.head_names, len(self.head_names)
        estimation = int(self.estimations)
        epochs = self.config.estimation_epochs or self.config.super_epoch
        train_losses = self.train_loss_loader(ctx)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        modes = [(module, module.training) for module in model.modules()]
        losses = torch.zeros(len(LOSS_ROWS), count, dtype=torch.float64, device=ctx.device)
        try:
            with torch.random.fork_rng(devices=devices):
                model.eval()
                losses[0] = mean_losses(model, train_losses, heads, ctx.device, ctx.dist)
                losses[1] = mean_losses(model, ctx.heldout_loader, heads, ctx.device, ctx.dist)
                for k, head in enumerate(heads):
                    torch.manual_seed(self.seed(ctx, 2, estimation, k))
                    trained = self.train_copy(model, head, epochs, estimation, ctx)
                    trained.eval()
                    losses[2, k] = mean_losses(trained, train_losses, [head], ctx.device, ctx.dist)[0]
                    losses[3, k] = mean_losses(trained, ctx.heldout_loader, [head], ctx.device, ctx.dist)[0]
                    del trained
        finally:
            for module, mode in modes:
                module.train(mode)
        return losses.to(self.weights.device)

    def train_copy(self, model, head: str, epochs: int, estimation: int, ctx):
        """A copy of ``model`` whose ``head`` (with its encoders) trained ``epochs`` epochs on that head's CE alone."""
        trained = copy.deepcopy(model)
        for p in trained.parameters():
            p.grad = None  # a deep copy carries the real model's last gradients
        params = head_parameters(trained, head)
        optimizer = ctx.make_optimizer(params)
        trained.train()
        for epoch in range(epochs):
            for batch in self.copy_training_loader(ctx, estimation, epoch):
                batch = batch.to(ctx.device, non_blocking=True)
                loss = F.cross_entropy(head_logits(trained, batch.inputs, head), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ctx.dist.average_gradients(params)
                optimizer.step()
        return trained

    # -- MultiBench's fine-tune of the fused head ----------------------------------------------------
    def finetune(self, model, ctx) -> None:
        """Train the separate fused head on frozen (eval-mode) training features, every process on all of them."""
        modes = [(module, module.training) for module in model.modules()]
        features: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        labels: list[Tensor] = []
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                model.eval()
                with torch.no_grad():
                    for batch in ctx.train_eval_loader:
                        batch = batch.to(ctx.device, non_blocking=True)
                        encoded = model.encode(batch.inputs)
                        for m in self.modalities:
                            features[m].append(encoded[m].cpu())
                        labels.append(batch.labels.cpu())
                table = {m: torch.cat(f) for m, f in features.items()}
                targets = torch.cat(labels)
                if ctx.dist.enabled:
                    gathered = ctx.dist.gather_objects((table, targets))
                    table = {m: torch.cat([g[0][m] for g in gathered]) for m in self.modalities}
                    targets = torch.cat([g[1] for g in gathered])
                head = self.finetune_head
                params = [p for p in head.parameters() if p.requires_grad]
                optimizer = ctx.make_optimizer(params)
                head.train()
                torch.manual_seed(self.seed(ctx, 3, int(self.finetunes)))
                size = ctx.train_loader.batch_size
                for epoch in range(self.config.finetune_epochs):
                    g = torch.Generator().manual_seed(self.seed(ctx, 4, int(self.finetunes), epoch))
                    order = torch.randperm(len(targets), generator=g)
                    for start in range(0, len(order), size):
                        rows = order[start : start + size]
                        logits = head({m: table[m][rows].to(ctx.device) for m in self.modalities})
                        loss = F.cross_entropy(logits, targets[rows].to(ctx.device))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                for p in params:
                    p.grad = None
        finally:
            for module, mode in modes:
                module.train(mode)
        self.finetunes += 1

    # -- per epoch -------------------------------------------------------------------------------------
    def on_epoch_end(self, model, ctx):
        if self.finetune_due(ctx.epoch, ctx.max_epochs):
            self.finetune(model, ctx)
        estimated = int(self.estimated_epoch) == ctx.epoch
        gain, overfit = generalisation_and_overfitting(self.losses)
        logs = {"gblending/estimated": float(estimated), "gblending/super_epoch": float(self.estimated_super_epoch)}
        if estimated:
            logs["gblending/estimation_seconds"] = float(self.estimation_seconds)
        for k, head in enumerate(self.head_names):
            logs[f"gblending/weight/{head}"] = float(self.weights[k])
            logs[f"gblending/gain/{head}"] = float(gain[k])
            logs[f"gblending/overfit/{head}"] = float(overfit[k])
            for row, name in enumerate(LOSS_ROWS):
                logs[f"gblending/loss_{name}/{head}"] = float(self.losses[row, k])
        if self.multibench:
            logs["gblending/finetunes"] = float(self.finetunes)
        return logs
