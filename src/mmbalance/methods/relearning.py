"""Diagnosing and Re-learning (Wei, Li, Feng, Hu, ECCV 2024), as a plugin for any objective.

Diagnosing: every ``reinit_every`` epochs (R), at the end of the epoch, each
encoder's representation f_m is extracted (eval mode, no gradient) for the
training split in a fixed order (``ctx.train_eval_loader``) and for the
held-out data (``ctx.heldout_loader``: the validation split, or with
``data.heldout=carve`` a part of the training split; never the test split).
Per modality and per set the features are scaled to [−1, 1] per dimension
(min–max fitted on that set), clustered by K-means into C clusters (seeded),
and scored by purity P = (1/N) Σ_clusters max_class count. The learning
state is the purity gap g_m = |P_train − P_heldout|: a modality whose
representation separates training data much better than held-out data has
learnt (or memorised) more.

Re-learning: each encoder is softly re-initialised towards its initial
weights θ^init (snapshot in ``setup``), with strength a_m = tanh(λ g_m):
θ_m ← a_m θ^init_m + (1 − a_m) θ_m, for every parameter of encoder m.
Encoder buffers (BatchNorm statistics) and, by default, the optimizer's
state (momentum, Adam moments) are left as they are, as in the authors' code.
At most ``reinit_times`` (K) re-initialisations happen, at epochs e > 0 with
e % R == 0 inside the modulation window. The training loss is the
objective's, untouched.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..extras import require
from ..registry import METHODS
from ..search_space import FloatRange, IntRange
from .base import Plugin
from .window import WindowConfig, in_window

SETS = ("train", "heldout")
SKLEARN_FEATURE = "relearning.kmeans_backend=sklearn"  # what needs the extra, in the user's words


# -- the method's core, on plain tensors ------------------------------------------------------------

def minmax_scale(features: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Each column mapped linearly onto [low, high] by its own min and max (a constant column maps to ``low``).

    The scaling is fitted on the set it is applied to, so the clustering of
    each set does not depend on the other's range.
    """
    lo = features.min(dim=0).values
    span = features.max(dim=0).values - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (features - lo) / span * (high - low) + low


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """[N, k] squared Euclidean distances (matrix products only: deterministic on every device)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(1)).clamp_min(0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k initial centers by greedy k-means++ (2 + ⌊ln k⌋ candidates per center, the best kept).

    Random draws come from ``generator`` (CPU) and are moved to ``x``'s device.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = squared_distances(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) <= 0:  # every point sits on a center already: take any
            weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator).to(x.device)
        candidate_closest = torch.minimum(closest.unsqueeze(0), squared_distances(x, x[candidates]).T)
        best = int(candidate_closest.sum(1).argmin())
        centers.append(x[candidates[best]])
        closest = candidate_closest[best]
    return torch.stack(centers)


def kmeans(x: Tensor, k: int, generator: torch.Generator, restarts: int = 10, iterations: int = 300,
           tol: float = 1e-4) -> Tensor:
    """Cluster labels [N] of the lowest-inertia run of Lloyd's K-means over ``restarts`` k-means++ starts.

    A run stops when no label changes or the centers move by at most
    ``tol`` × the mean per-dimension variance (squared, summed over centers),
    as scikit-learn's does. An empty cluster keeps its previous center. With
    fewer points than clusters each point is its own cluster.
    """
    n = x.shape[0]
    k = min(k, n)
    threshold = tol * float(x.var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    best_labels, best_inertia = None, math.inf
    for _ in range(restarts):
        centers = kmeans_plus_plus(x, k, generator)
        labels = squared_distances(x, centers).argmin(1)
        for _ in range(iterations):
            onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
            counts = onehot.sum(0)
            sums = onehot.T @ x
            moved = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), centers)
            shift = float(((moved - centers) ** 2).sum())
            centers = moved
            new_labels = squared_distances(x, centers).argmin(1)
            unchanged = bool((new_labels == labels).all())
            labels = new_labels
            if unchanged or shift <= threshold:
                break
        inertia = float(squared_distances(x, centers).gather(1, labels.unsqueeze(1)).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def purity(labels: Tensor, clusters: Tensor) -> float:
    """(1/N) Σ_clusters (count of the cluster's most frequent class): how class-pure the clusters are."""
    labels, clusters = labels.long().cpu(), clusters.long().cpu()
    classes = int(labels.max()) + 1
    table = torch.bincount(clusters * classes + labels, minlength=(int(clusters.max()) + 1) * classes)
    return float(table.view(-1, classes).max(1).values.sum()) / labels.numel()


def sklearn_kmeans(x: Tensor, k: int, seed: int, restarts: int, iterations: int) -> Tensor:
    """Cluster labels from scikit-learn's KMeans (the authors' clustering), on the CPU."""
    cluster = require("sklearn.cluster", extra="sklearn", feature=SKLEARN_FEATURE)

    k = min(k, x.shape[0])
    found = cluster.KMeans(n_clusters=k, random_state=seed, n_init=restarts, max_iter=iterations).fit_predict(x.double().cpu().numpy())
    return torch.from_numpy(found).long()


def clustering_purity(features: Tensor, labels: Tensor, num_clusters: int, seed: int = 0, restarts: int = 10,
                      iterations: int = 300, backend: str = "torch") -> float:
    """The diagnosis of one modality on one set: min–max to [−1, 1], K-means (seeded with ``seed``), purity.

    ``backend=torch`` runs ``kmeans`` on the features' device with a fresh
    generator seeded ``seed``; ``sklearn`` runs scikit-learn's KMeans with
    ``random_state=seed`` on the CPU.
    """
    scaled = minmax_scale(features.flatten(1).float())
    if backend == "sklearn":
        clusters = sklearn_kmeans(scaled, num_clusters, seed, restarts, iterations)
    else:
        clusters = kmeans(scaled, num_clusters, torch.Generator().manual_seed(seed), restarts, iterations)
    return purity(labels, clusters)


def reinit_strength(purity_train: Tensor, purity_heldout: Tensor, lam: float) -> Tensor:
    """a_m = tanh(λ · |P_train − P_heldout|), per modality."""
    return torch.tanh(lam * (purity_train - purity_heldout).abs())


@torch.no_grad()
def soft_reinit_(params: list[Tensor], initial: list[Tensor], strength: float | Tensor) -> None:
    """θ ← a · θ^init + (1 − a) · θ in place (the same tensors, so optimizers keep referring to them)."""
    for p, p0 in zip(params, initial, strict=True):
        if p.shape != p0.shape:
            raise ValueError(f"initial weights of shape {tuple(p0.shape)} for a parameter of shape {tuple(p.shape)}")
        a = torch.as_tensor(strength, dtype=p.dtype, device=p.device)
        p.copy_(a * p0.to(p.dtype) + (1 - a) * p)


def reinit_due(epoch: int, every: int, times: int, done: int) -> bool:
    """Whether the end of ``epoch`` (0-based) re-initialises: e > 0, e % R == 0 and fewer than K done."""
    return epoch > 0 and epoch % every == 0 and done < times


# -- the plugin ----------------------------------------------------------------------------------------

@METHODS.register("relearning")
class ReLearning(Plugin):
    """Diagnosing & Re-learning: soft re-initialisation of encoders by their clustering purity gap (Wei et al., ECCV 2024).

    No extra work per step; each re-initialisation costs one encoder pass over the training and held-out
    data and 2·M K-means runs.
    """

    class Config(WindowConfig):
        strength_lambda: float = Field(
            3.0, ge=0, description="λ in the re-initialisation strength a_m = tanh(λ · |P_train − P_heldout|)"
        )
        reinit_every: int = Field(
            20, ge=1, description="R: re-initialise at the end of epochs e > 0 with e % R == 0 (BMM: 15)"
        )
        reinit_times: int = Field(3, ge=0, description="K: at most this many re-initialisations in a run (BMM: 2)")
        kmeans_restarts: int = Field(
            10, ge=1, le=100,
            description="k-means++ starts, the lowest inertia kept (scikit-learn's n_init: 10 until 1.4, 1 since) [unverified]",
        )
        kmeans_iterations: int = Field(
            300, ge=1, le=10_000, description="most Lloyd iterations per start (scikit-learn's max_iter)"
        )
        kmeans_seed: int = Field(0, ge=0, description="seed of every K-means (the authors' random_state=0)")
        kmeans_backend: Literal["torch", "sklearn"] = Field(
            "torch",
            description="torch: this module's K-means on the run's device; sklearn: scikit-learn's KMeans on the CPU, "
            "as in the authors' code",
        )
        optimizer_state: Literal["keep", "reset"] = Field(
            "keep",
            description="keep: the optimizer's state of re-initialised parameters is left as is (spec and "
            "authors' code); reset: it is dropped, so momentum and Adam moments restart from zero",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options relearning`)
    search_space = {
        "strength_lambda": FloatRange(0.5, 6.0, log=True),
        "reinit_times": IntRange(1, 4),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        # re-initialisations done so far, and the last diagnosis (for the logs and the record)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("purities", torch.zeros(len(SETS), len(self.modalities), dtype=torch.float64))
        self.register_buffer("strength", torch.zeros(len(self.modalities), dtype=torch.float64))
        self.initial = nn.Module()  # θ^init, buffer "m{j}_p{i}": parameter i of encoder j (ctx.params order)

    def setup(self, model, ctx):
        if self.config.kmeans_backend == "sklearn":  # an extra: found missing now, not at the first diagnosis
            require("sklearn.cluster", extra="sklearn", feature=SKLEARN_FEATURE)
        for j, m in enumerate(self.modalities):
            for i, p in enumerate(ctx.params.encoder[m]):
                self.initial.register_buffer(f"m{j}_p{i}", p.detach().clone())

    def initial_weights(self, j: int, count: int) -> list[Tensor]:
        return [getattr(self.initial, f"m{j}_p{i}") for i in range(count)]

    def due(self, epoch: int) -> bool:
        c = self.config
        return in_window(c, epoch) and reinit_due(epoch, c.reinit_every, c.reinit_times, int(self.count))

    # -- diagnosing ----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, model, loader, ctx) -> tuple[dict[str, Tensor], Tensor]:
        """Every modality's encoder output and the labels over ``loader``, in dataset-index order on every process."""
        chunks: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        labels, index = [], []
        for batch in loader:
            batch = batch.to(ctx.device)
            features = model.encode(batch.inputs)
            for m in self.modalities:
                chunks[m].append(features[m].flatten(1).float())
            labels.append(batch.labels)
            index.append(batch.index)
        out = {m: torch.cat(c) for m, c in chunks.items()}
        labels, index = torch.cat(labels), torch.cat(index)
        if ctx.dist.enabled:  # each process encoded its shard; everyone clusters the whole set
            gathered = ctx.dist.gather_objects(({m: f.cpu() for m, f in out.items()}, labels.cpu(), index.cpu()))
            out = {m: torch.cat([g[0][m] for g in gathered]).to(ctx.device) for m in self.modalities}
            labels = torch.cat([g[1] for g in gathered]).to(ctx.device)
            index = torch.cat([g[2] for g in gathered]).to(ctx.device)
        order = index.argsort()
        return {m: f[order] for m, f in out.items()}, labels[order]

    def diagnose(self, model, ctx) -> Tensor:
        """[2, M] purities (train, held-out) of every encoder's representation; the model's modes are restored."""
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            sets = [self.features(model, ctx.train_eval_loader, ctx), self.features(model, ctx.heldout_loader, ctx)]
        finally:
            for module, mode in modes:
                module.train(mode)
        c = self.config
        return torch.tensor([
            [clustering_purity(features[m], labels, self.num_classes, c.kmeans_seed, c.kmeans_restarts,
                               c.kmeans_iterations, c.kmeans_backend)
             for m in self.modalities]
            for features, labels in sets
        ], dtype=torch.float64)

    # -- re-learning -----------------------------------------------------------------------------------
    def reinitialise(self, ctx, strength: Tensor) -> None:
        """Move every encoder towards its initial weights by its strength; optionally drop its optimizer state."""
        for j, m in enumerate(self.modalities):
            params = ctx.params.encoder[m]
            soft_reinit_(params, self.initial_weights(j, len(params)), strength[j])
            if self.config.optimizer_state == "reset" and float(strength[j]) > 0:
                for optimizer in ctx.optimizers.values():
                    for p in params:
                        optimizer.state.pop(p, None)

    def on_epoch_end(self, model, ctx):
        due = self.due(ctx.epoch)
        logs = {"relearning/reinitialised": float(due)}
        if due:
            purities = self.diagnose(model, ctx)
            strength = reinit_strength(purities[0], purities[1], self.config.strength_lambda)
            self.reinitialise(ctx, strength)
            self.purities.copy_(purities)
            self.strength.copy_(strength)
            self.count += 1
            for j, m in enumerate(self.modalities):
                logs[f"relearning/purity_train/{m}"] = float(purities[0, j])
                logs[f"relearning/purity_heldout/{m}"] = float(purities[1, j])
                logs[f"relearning/gap/{m}"] = float((purities[0, j] - purities[1, j]).abs())
                logs[f"relearning/strength/{m}"] = float(strength[j])
        logs["relearning/count"] = float(self.count)
        return logs
