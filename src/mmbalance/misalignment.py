"""MIDAS's loss on misaligned samples, for any PyTorch training loop.

MIDAS (Hwang, Choi, Whang, NeurIPS 2025) also trains the fused model on
*misaligned* samples: tuples whose modalities come from samples of different
classes, e.g. (audio of a dog, video of a car). Their target is soft: each
source class gets the share of the probability that its modality's unimodal
head is confident of, so a fused model that reads only the dominant modality
is penalised. A weight α on the least confident modality's term grows while
the fused model under-credits it, and samples whose swapped-in feature
resembles the one it replaced (hard samples) weigh more.

Everything here is pure torch and knows nothing of mmbalance's trainer: the
pieces are functions with hand-checkable formulas, and ``MisalignmentLoss``
puts them together behind one call. Notation: N aligned samples, M
modalities (slots), K misaligned samples, C classes.

Multi-label data (labels [N, C] of 0/1; our generalisation, not the
paper's): a "different label" is a different label vector; a modality's
confidence in its source's labels is its mean sigmoid probability on that
source's positive labels (``tasks.label_confidence``); the soft target mixes
the sources' label vectors, Σ_m c^m y^(m), and the loss is binary
cross-entropy, L_mis = mean_k w_k Σ_m α_m c^m_k BCE(z~_k, y^(m)_k), which
for the soft target is BCE(z~, Σ_m c^m y^(m)) when α = 1 (BCE is linear in
its target). Everything else (pairs, α, hard-sample weights) is unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import is_multi_label, label_confidence, per_sample_loss

Similarity = Literal["cosine", "l2"]
AlphaRule = Literal["difference", "sign"]
Variant = Literal["paper", "official"]

_STATISTICS = ("confidence", "fused_confidence", "unimodal_confidence", "fused_probability")


# -- drawing misaligned samples ---------------------------------------------
def _generator_device(generator: torch.Generator | None) -> torch.device:
    # Random numbers are drawn where the generator lives (the trainer's is on
    # the CPU), then moved, so a run draws the same numbers on any device.
    return generator.device if generator is not None else torch.device("cpu")


def draw_sources(
    labels: Tensor,
    num_modalities: int,
    generator: torch.Generator | None = None,
    *,
    require_distinct: bool = True,
) -> tuple[Tensor, Tensor]:
    """Misaligned samples of a batch, as index tuples into it.

    Returns ``sources`` (LongTensor[K, M]): slot m of misaligned sample k is
    filled by modality m of batch sample ``sources[k, m]``; and ``valid``
    (BoolTensor[N]): the anchors that found a partner. K = M * valid.sum().
    ``labels`` are class ids [N] or multi-label rows [N, C]; two rows differ
    when any class does.

    Rule: every anchor i gets a group of M members: i, a partner j, and for
    M > 2 another M - 2 samples drawn uniformly from the batch (with
    replacement; i and j may recur). With ``require_distinct`` (the paper) j
    is uniform among the samples whose label differs from y_i, and anchors
    without such a sample are dropped (an all-one-label batch gives K = 0).
    Without it (the authors' code) j = perm(i) for a random permutation and
    labels are not checked. The members after i are put in a random order,
    and each of the group's M cyclic shifts is one misaligned sample: shift k
    fills slot m from member (m + k) mod M. Every misaligned sample thus holds
    the whole group, so i and j and at least two labels, and each member fills
    each slot once. For M = 2 the shifts are exactly the paper's pair
    (x^1_i, x^2_j) and (x^1_j, x^2_i).

    Rows are shift-major: rows 0..V-1 are shift 0 (slot 0 from the anchor) of
    the kept anchors in batch order, rows V..2V-1 shift 1, and so on; so row r
    belongs to anchor r mod V, and ``anchors_of`` reads it back.
    """
    if num_modalities < 2:
        raise ValueError(f"misaligned samples need at least 2 modalities, got {num_modalities}")
    n, device = labels.shape[0], labels.device
    if n == 0:
        return torch.zeros(0, num_modalities, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.bool, device=device)
    draw_on = _generator_device(generator)
    anchors = torch.arange(n, device=device)
    if require_distinct:
        other_label = labels[:, None] != labels[None, :]
        if is_multi_label(labels):
            other_label = other_label.any(dim=-1)
        scores = torch.rand(n, n, generator=generator, device=draw_on).to(device)
        partner = scores.masked_fill(~other_label, -1.0).argmax(dim=1)
        valid = other_label.any(dim=1)
    else:
        partner = torch.randperm(n, generator=generator, device=draw_on).to(device)
        valid = torch.ones(n, dtype=torch.bool, device=device)
    if num_modalities > 2:
        extras = torch.randint(n, (n, num_modalities - 2), generator=generator, device=draw_on).to(device)
        order = torch.rand(n, num_modalities - 1, generator=generator, device=draw_on).argsort(dim=1).to(device)
        others = torch.cat([partner[:, None], extras], dim=1).gather(1, order)
    else:
        others = partner[:, None]
    group = torch.cat([anchors[:, None], others], dim=1)[valid]  # [V, M]
    slots = torch.arange(num_modalities, device=device)
    member_of = (slots[:, None] + slots[None, :]) % num_modalities  # [shift, slot] -> member
    return group[:, member_of].transpose(0, 1).reshape(-1, num_modalities), valid


def anchors_of(sources: Tensor) -> Tensor:
    """Each misaligned sample's anchor (the batch sample whose group it is), LongTensor[K].

    The hard-sample weight needs it: a sample's replaced slots are those not
    filled by its anchor. Reads ``draw_sources``' layout, which sources given
    by hand must follow: K = M * V rows, shift-major, row r is shift r // V of
    anchor r mod V's group, so the anchor fills slot (M - shift) mod M (slot 0
    of the first V rows). For M = 2, anchor i and partner j: rows (i, j) and
    (j, i), V rows apart.
    """
    k, m = sources.shape
    if k % m:
        raise ValueError(f"{k} misaligned samples are not draw_sources' {m} shifts per anchor; pass anchors explicitly")
    shift = torch.arange(k, device=sources.device) // max(k // m, 1)
    return sources.gather(1, ((m - shift) % m)[:, None]).squeeze(1)


def misaligned_features(features: Mapping[str, Tensor], sources: Tensor, modalities: Sequence[str]) -> dict[str, Tensor]:
    """The misaligned tuples: slot m of sample k is ``features[m][sources[k, m]]``."""
    return {m: features[m][sources[:, slot]] for slot, m in enumerate(modalities)}


def misaligned_inputs(inputs: Mapping[str, Tensor], sources: Tensor, modalities: Sequence[str]) -> dict[str, Tensor]:
    """The same tuples built from raw inputs, to be encoded again (input-level augmentation)."""
    return misaligned_features(inputs, sources, modalities)


# -- targets, weights, loss -------------------------------------------------
def source_confidences(
    unimodal_logits: Mapping[str, Tensor], labels: Tensor, sources: Tensor, modalities: Sequence[str]
) -> Tensor:
    """a[k, m] = p^m_s[y_s] with s = sources[k, m]: each slot's unimodal confidence in its own label.

    Multi-label rows: a[k, m] = mean_{c: y_s,c = 1} σ(z^m_s)_c, the head's mean
    probability of the source's positive labels (``tasks.label_confidence``).
    Detached: confidences make targets, and a target must not be trained
    towards the prediction.
    """
    own_label = torch.stack([label_confidence(unimodal_logits[m], labels) for m in modalities], dim=1)  # [N, M]
    return own_label.gather(0, sources)


def soft_labels(confidences: Tensor) -> Tensor:
    """c^m = a_m / sum_m a_m: slot m's share of the soft target sum_m c^m onehot(y^(m)).

    E.g. a = (0.9, 0.3) -> c = (0.75, 0.25). The same normalisation of the
    fused model's probabilities of the source labels gives its normalised
    confidence q (the paper's confidence curves and the α rule).
    """
    confidences = confidences.detach()
    return confidences / confidences.sum(dim=1, keepdim=True).clamp_min(torch.finfo(confidences.dtype).tiny)


def fused_source_probabilities(fused_logits: Tensor, source_labels: Tensor) -> Tensor:
    """p~[k, y^(m)]: the fused model's probability of each slot's source label (detached), [K, M].

    Source labels are [K, M] class ids, or [K, M, C] rows (multi-label), for
    which it is the fused model's mean sigmoid probability of the slot's
    source's positive labels.
    """
    return label_confidence(fused_logits, source_labels)


def _similarity(u: Tensor, v: Tensor, kind: Similarity) -> Tensor:
    if kind == "cosine":
        return F.cosine_similarity(u, v, dim=1)
    if kind == "l2":
        energy = u.square().sum(1) + v.square().sum(1)
        return 1 - (u - v).square().sum(1) / energy.clamp_min(torch.finfo(u.dtype).tiny)
    raise ValueError(f"unknown similarity {kind!r} (allowed: cosine, l2)")


def hard_sample_weights(
    features: Mapping[str, Tensor],
    sources: Tensor,
    modalities: Sequence[str],
    similarity: Similarity = "cosine",
    anchors: Tensor | None = None,
) -> Tensor:
    """w = 1 + (s + 1) / 2 in [1, 2]: a swapped-in feature close to the one it replaced makes a hard sample.

    A sample is read as its anchor (``anchors``, LongTensor[K]; default
    ``anchors_of(sources)``) with some slots replaced: those whose source
    differs from the anchor. s is the similarity, in [-1, 1], between the
    anchor's own feature and the swapped-in one, averaged over the replaced
    slots. For M = 2, anchor i and partner j, (x^1_i, x^2_j) has s =
    cos(f^2_i, f^2_j) and its mirror (x^1_j, x^2_i) s = cos(f^1_i, f^1_j), as
    in the paper; reading every sample from slot 0 would give both the
    second. A sample with no replaced slot (only possible without the label
    check) has s = 1.

    ``similarity="l2"`` uses s = 1 - |u - v|^2 / (|u|^2 + |v|^2)
    = 2 u.v / (|u|^2 + |v|^2): the squared L2 distance relative to the pair's
    energy. It lies in [-1, 1], is 1 only for u = v and -1 for u = -v, equals
    the cosine when |u| = |v|, and unlike the cosine also counts a difference
    in length; being per pair, it needs no batch statistic and is scale-free.
    Features are detached: the weight scales a loss, it is not trained.
    """
    if anchors is None:
        anchors = anchors_of(sources)
    columns = []
    for slot, m in enumerate(modalities):
        feature = features[m].detach().flatten(1).float()
        columns.append(_similarity(feature[anchors], feature[sources[:, slot]], similarity))
    replaced = sources != anchors[:, None]
    similarities = torch.stack(columns, dim=1).masked_fill(~replaced, 0.0)  # [K, M]
    count = replaced.sum(1)
    mean = similarities.sum(1) / count.clamp_min(1)
    s = torch.where(count > 0, mean, torch.ones_like(mean))
    return 1 + (s + 1) / 2


def misaligned_loss(
    fused_logits: Tensor,
    source_labels: Tensor,
    soft: Tensor,
    alpha: Tensor | None = None,
    weights: Tensor | None = None,
    pos_weight: Tensor | None = None,
) -> Tensor:
    """L_mis = mean_k w_k * [-sum_m alpha_m c^m_k log p~_k[y^(m)_k]].

    Slots that share a label add their terms (the soft target's mass on that
    class). Zero, not NaN, when there is no misaligned sample. Multi-label
    source rows [K, M, C]: -log p~_k[y^(m)_k] becomes BCE(z~_k, y^(m)_k), the
    binary cross-entropy averaged over the classes (each class's positive
    term times ``pos_weight`` [C] when given).
    """
    if source_labels.ndim == 3:  # multi-label rows [K, M, C]
        count, slots, classes = source_labels.shape
        repeated = fused_logits[:, None, :].expand(count, slots, classes).reshape(count * slots, classes)
        slot_losses = per_sample_loss(repeated, source_labels.reshape(count * slots, classes), pos_weight)
        log_p = -slot_losses.view(count, slots)  # [K, M]
    else:
        log_p = F.log_softmax(fused_logits, dim=-1).gather(1, source_labels)  # [K, M]
    coefficients = soft if alpha is None else soft * alpha
    per_sample = -(coefficients * log_p).sum(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.sum() / max(per_sample.shape[0], 1)


# -- the weak-modality weight alpha --------------------------------------------
def paper_alpha_step(mean_confidence: Tensor, mean_fused_confidence: Tensor, rule: AlphaRule = "difference") -> tuple[Tensor, Tensor]:
    """(m^, delta): the slot whose α moves and by how much per unit of η (paper, section 4).

    m^ = argmin_m mean c^m (the least confident modality); delta = mean c^m^ -
    mean q^m^, positive when the fused model gives m^'s class less than its
    share of the soft target; ``rule="sign"`` keeps only its sign.
    """
    weak = mean_confidence.argmin()
    delta = mean_confidence[weak] - mean_fused_confidence[weak]
    return weak, delta.sign() if rule == "sign" else delta


def official_alpha_step(mean_unimodal_confidence: Tensor, mean_fused_probability: Tensor) -> tuple[Tensor, Tensor]:
    """(m_weak, +1 or -1): the authors' code's rule.

    The weak (dominant) modality has the lowest (highest) batch-mean unimodal
    confidence a^m; the unimodal ratio is mean a^dom / mean a^weak. α rises by
    η when the fused model's ratio mean p~[y^(dom)] / mean p~[y^(weak)] on the
    misaligned samples exceeds it (the fusion favours the dominant modality
    more than the unimodal heads justify), and falls by η otherwise.
    """
    weak, dominant = mean_unimodal_confidence.argmin(), mean_unimodal_confidence.argmax()
    tiny = torch.finfo(mean_unimodal_confidence.dtype).tiny
    unimodal_ratio = mean_unimodal_confidence[dominant] / mean_unimodal_confidence[weak].clamp_min(tiny)
    fused_ratio = mean_fused_probability[dominant] / mean_fused_probability[weak].clamp_min(tiny)
    return weak, torch.where(fused_ratio > unimodal_ratio, 1.0, -1.0).to(mean_unimodal_confidence)


def step_alpha(alpha: Tensor, weak: Tensor, delta: Tensor, eta: float, alpha_max: float = math.inf) -> Tensor:
    """A new α with α_weak <- clamp(α_weak + η * delta, 1, alpha_max); the others unchanged."""
    moved = (alpha[weak] + eta * delta).clamp(1.0, alpha_max)
    return torch.where(torch.arange(alpha.shape[0], device=alpha.device) == weak, moved, alpha)


class MisalignmentLoss(nn.Module):
    """MIDAS's misaligned-sample loss, holding the weak-modality weights α (a buffer).

    Use it in any loop; ``fuse`` is any callable on a feature dict::

        midas = MisalignmentLoss(["audio", "video"])        # .to(device) with the model
        generator = torch.Generator().manual_seed(0)
        for inputs, labels in loader:                        # after a warm-up of the heads
            features = {m: encoders[m](inputs[m]) for m in midas.modalities}
            unimodal = {m: heads[m](f) for m, f in features.items()}
            fused = fusion(features)
            mis_loss, stats = midas(features, unimodal, labels, fusion, generator)
            loss = (F.cross_entropy(fused, labels) + mis_loss  # lambda = 1
                    + sum(F.cross_entropy(z, labels) for z in unimodal.values()))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            midas.update_alpha(stats)                        # after the step, as in the paper

    Options mirror the paper's ablations: ``weak_weighting`` (α; off keeps it
    at 1), ``hard_weighting`` (w; off gives w = 1), ``similarity`` (cosine or
    l2, see ``hard_sample_weights``), ``eta`` and ``alpha_rule`` (α's step).

    ``variant="official"`` follows the authors' public code where it differs
    from the paper: pairs come from a random permutation without a label
    check; α moves by +-η by the ratio rule of ``official_alpha_step`` (weak
    modality from the batch-mean unimodal confidences instead of the
    normalised ones) and is clamped to [1, alpha_max]. The loss is the
    paper's mean over the 2N misaligned samples: the authors' loss is that
    mean already, so halving it again would halve λ. α stays per modality as
    in the paper, with only the weak one moving; this equals a single α on
    the weak modality for as long as the weak modality stays the same.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        weak_weighting: bool = True,
        hard_weighting: bool = True,
        similarity: Similarity = "cosine",
        eta: float = 0.05,
        alpha_rule: AlphaRule = "difference",
        variant: Variant = "paper",
        alpha_max: float = 10.0,
    ):
        super().__init__()
        for name, value, allowed in (
            ("similarity", similarity, ("cosine", "l2")),
            ("alpha_rule", alpha_rule, ("difference", "sign")),
            ("variant", variant, ("paper", "official")),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r} (allowed: {', '.join(allowed)})")
        if len(modalities) < 2:
            raise ValueError(f"misaligned samples need at least 2 modalities, got {list(modalities)}")
        self.modalities = list(modalities)
        self.weak_weighting = weak_weighting
        self.hard_weighting = hard_weighting
        self.similarity = similarity
        self.eta = eta
        self.alpha_rule = alpha_rule
        self.variant = variant
        self.alpha_max = alpha_max
        self.register_buffer("alpha", torch.ones(len(self.modalities)))

    def draw_sources(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``draw_sources`` with this variant's pairing rule (label check for the paper only)."""
        return draw_sources(labels, len(self.modalities), generator, require_distinct=self.variant == "paper")

    def forward(
        self,
        features: Mapping[str, Tensor],
        unimodal_logits: Mapping[str, Tensor],
        labels: Tensor,
        fuse: Callable[[dict[str, Tensor]], Tensor],
        generator: torch.Generator | None = None,
        *,
        sources: Tensor | None = None,
        misaligned: Callable[[Tensor], dict[str, Tensor]] | None = None,
        pos_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(L_mis, stats) for one aligned batch.

        ``sources`` fixes the misaligned samples (default: drawn with
        ``generator``) in ``draw_sources``' layout, from which the hard-sample
        weight reads each sample's anchor (``anchors_of``): shift-major rows,
        the anchors in slot 0 of the first V rows, e.g. (i, j), (j, i) for
        M = 2. ``misaligned`` maps sources to the misaligned feature dict; the
        default gathers ``features`` (feature level), input level passes e.g.
        ``lambda s: encode(misaligned_inputs(inputs, s, modalities))``.
        Confidences and hard-sample weights always come from the aligned batch.
        ``labels`` are class ids [N] or multi-label rows [N, C] (the module's
        generalisation); ``pos_weight`` [C] weighs each class's positive BCE term.

        ``stats`` (detached tensors): ``count`` misaligned samples; per slot
        means over them of ``confidence`` c^m, ``fused_confidence`` q^m (the
        confidence curves), ``unimodal_confidence`` a^m and
        ``fused_probability`` p~[y^(m)]; ``weak_modality`` (slot index, -1
        without samples) and ``delta_alpha``, the step this batch alone gives.
        """
        if sources is None:
            sources, _ = self.draw_sources(labels, generator)
        confidences = source_confidences(unimodal_logits, labels, sources, self.modalities)
        if sources.shape[0] == 0:  # no fused pass on an empty batch; both [0, M] tensors give zero means
            return torch.zeros((), device=labels.device), self._statistics(confidences, confidences)
        fused_logits = fuse(misaligned(sources) if misaligned is not None else misaligned_features(features, sources, self.modalities))
        source_labels = labels[sources]
        weights = hard_sample_weights(features, sources, self.modalities, self.similarity) if self.hard_weighting else None
        alpha = self.alpha if self.weak_weighting else None
        loss = misaligned_loss(fused_logits, source_labels, soft_labels(confidences), alpha, weights, pos_weight)
        return loss, self._statistics(confidences, fused_source_probabilities(fused_logits, source_labels))

    def _statistics(self, confidences: Tensor, fused_probabilities: Tensor) -> dict[str, Tensor]:
        count = confidences.shape[0]
        per_slot = {
            "confidence": soft_labels(confidences),
            "fused_confidence": soft_labels(fused_probabilities),
            "unimodal_confidence": confidences,
            "fused_probability": fused_probabilities,
        }
        stats = {k: v.sum(0) / max(count, 1) for k, v in per_slot.items()}
        stats["count"] = torch.tensor(float(count), device=confidences.device)
        weak, delta = self._alpha_step(stats)
        stats["weak_modality"] = weak if count else torch.full_like(weak, -1)
        stats["delta_alpha"] = delta if count else torch.zeros_like(delta)
        return stats

    def _alpha_step(self, stats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.variant == "official":
            return official_alpha_step(stats["unimodal_confidence"], stats["fused_probability"])
        return paper_alpha_step(stats["confidence"], stats["fused_confidence"], self.alpha_rule)

    @staticmethod
    def pool(stats: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The statistics of the union of every process's misaligned samples.

        ``reduce`` averages (or sums) a tensor over processes, e.g.
        ``DistributedState.mean``; the means are weighted by each process's count.
        """
        count = stats["count"].reshape(1)
        flat = reduce(torch.cat([stats[k] * count for k in _STATISTICS] + [count]))
        total = flat[-1]
        pooled = dict(zip(_STATISTICS, (flat[:-1] / total.clamp_min(1e-12)).view(len(_STATISTICS), -1)))
        pooled["count"] = total
        return pooled

    @torch.no_grad()
    def update_alpha(self, stats: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Move α by one step from a batch's ``stats``; call it after the optimizer step.

        With ``reduce`` every process pools its statistics first, so all
        apply the same step. A batch without misaligned samples leaves α as is.
        """
        if not self.weak_weighting:
            return
        if reduce is not None:
            stats = self.pool(stats, reduce)
        weak, delta = self._alpha_step(stats)
        ceiling = self.alpha_max if self.variant == "official" else math.inf
        moved = step_alpha(self.alpha, weak, delta, self.eta, ceiling)
        self.alpha.copy_(torch.where(stats["count"] > 0, moved, self.alpha))

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """α = 1 for every modality (done when main training starts)."""
        self.alpha.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"modalities={self.modalities}, variant={self.variant}, weak_weighting={self.weak_weighting}, "
            f"hard_weighting={self.hard_weighting}, similarity={self.similarity}, eta={self.eta}, alpha_rule={self.alpha_rule}"
        )
