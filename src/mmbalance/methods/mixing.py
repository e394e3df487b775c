"""Mixing feature tuples of one batch: what ``mixup`` (BASELINES §15b) and ``powmix`` (§15c) share.

A mixed example k interpolates two samples of the batch, its *first*
sample i_k and its *partner* j_k, in every modality before fusion:

    f~_m[k] = λ_m ⊙ f_m[i_k] + (1 − λ_m) ⊙ f_m[j_k]

and is trained towards both labels, the first weighted by the label weight
w = mean over modalities of mean(λ_m):

    L_mix = mean_k [ w · CE(fuse(f~)_k, y_{i_k}) + (1 − w) · CE(fuse(f~)_k, y_{j_k}) ].

λ_m is one coefficient for every modality (mixup), one per modality, or a
vector over modality m's feature dimensions (anisotropic); every entry is
drawn from Beta(a, a). Partners come from random permutations of the batch,
so with K = N mixed examples (i_k, j_k) = (k, π(k)), mixup's pairing.

The pieces are plain functions on tensors (usable in any loop and checkable
by hand); ``MixingPlugin`` applies them to a step record for the two
registered plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..misalignment import misaligned_features
from .base import Plugin
from .window import WindowConfig, in_window

#: how finely the mixing coefficient is drawn (see ``draw_lambdas``)
Granularity = Literal["batch", "modality", "dimension"]
#: the objective's loss term that the mixed loss takes the place of
FUSED_TERM = "fused"
#: at most one part of a run rewrites the objective's fused term (mixup, powmix, opm)
ROLE = "fused_loss_rewrite"


# -- drawing --------------------------------------------------------------------------------------
def _draw_device(generator: Optional[torch.Generator]) -> torch.device:
    # drawn where the generator lives (the trainer's is on the CPU), then moved: a run draws the same on any device
    return generator.device if generator is not None else torch.device("cpu")


def draw_partners(
    batch_size: int, count: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(first, partner), LongTensor[K] each: mixed example k mixes sample first[k] with sample partner[k].

    ``first`` walks through the batch in order, again and again (k mod N);
    ``partner`` is a fresh random permutation of the batch for every pass,
    cut to K. So every sample is a first sample ⌊K/N⌋ or ⌈K/N⌉ times, and
    with K = N the pairs are mixup's (i, π(i)) for one permutation π.
    """
    if batch_size == 0 or count == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    passes = -(-count // batch_size)
    draw_on = _draw_device(generator)
    partner = torch.cat([torch.randperm(batch_size, generator=generator, device=draw_on) for _ in range(passes)])
    first = torch.arange(count, device=device) % batch_size
    return first, partner[:count].to(device)


def beta(concentration: float, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
    """Samples of Beta(a, a) in ``shape``, on the generator's device.

    Beta(a, a) is the first component of a Dirichlet(a, a); torch's Dirichlet
    sampler takes a generator (``torch.distributions`` does not).
    """
    concentrations = torch.full((*shape, 2), float(concentration), device=_draw_device(generator))
    return torch._sample_dirichlet(concentrations, generator=generator)[..., 0]


def draw_lambdas(
    concentration: float,
    widths: Mapping[str, int],
    granularity: Granularity = "batch",
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """The mixing coefficients λ_m, each entry ~ Beta(a, a), one draw per step.

    ``widths`` maps each modality, in order, to its feature width (the last
    dimension of its features). ``batch``: one scalar λ shared by every
    modality (mixup, §15b); ``modality``: an independent scalar λ_m per
    modality; ``dimension``: a vector λ_m of length width_m per modality
    (anisotropic mixing), independent across modalities and dimensions.
    Scalars have shape [], vectors [width_m]: both broadcast over features.
    """
    names = list(widths)
    if granularity == "batch":
        shared = beta(concentration, (), generator).to(device)
        return {m: shared for m in names}
    if granularity == "modality":
        draws = beta(concentration, (len(names),), generator).to(device)
        return {m: draws[slot] for slot, m in enumerate(names)}
    if granularity == "dimension":
        draws = beta(concentration, (sum(widths.values()),), generator).to(device)
        return dict(zip(names, draws.split([widths[m] for m in names])))
    raise ValueError(f"unknown granularity {granularity!r} (allowed: batch, modality, dimension)")


def label_weight(lambdas: Mapping[str, Tensor]) -> Tensor:
    """w = mean over modalities of mean(λ_m): the weight of the first sample's label.

    Mixup's λ when it is shared; the mean of the modality λ's otherwise
    (PowMix's cross-modal label mixing, §15c), a vector counting as its mean.
    """
    return torch.stack([lam.float().mean() for lam in lambdas.values()]).mean()


# -- mixing and the loss ----------------------------------------------------------------------------
def mix_features(
    features: Mapping[str, Tensor],
    first: Tensor,
    partner: Tensor,
    lambdas: Mapping[str, Tensor],
    modalities: Sequence[str],
) -> dict[str, Tensor]:
    """f~_m[k] = λ_m ⊙ f_m[first[k]] + (1 − λ_m) ⊙ f_m[partner[k]], with gradient to both samples.

    The two tuples are MIDAS's misaligned tuples with every slot from the
    same sample (``misaligned_features`` with identical columns).
    """
    count = len(modalities)
    own = misaligned_features(features, first[:, None].expand(-1, count), modalities)
    other = misaligned_features(features, partner[:, None].expand(-1, count), modalities)
    mixed = {}
    for m in modalities:
        lam = lambdas[m].to(own[m].dtype)
        mixed[m] = lam * own[m] + (1 - lam) * other[m]
    return mixed


def mixed_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    first: Tensor,
    partner: Tensor,
    weight: Tensor | float,
    sample_weight: Optional[Tensor] = None,
) -> Tensor:
    """L_mix = mean_k [w · CE(z~_k, y[first_k]) + (1 − w) · CE(z~_k, y[partner_k])].

    ``sample_weight`` (per batch sample, as a plugin may set in
    ``batch.weight``) scales each label's term by its own sample's weight.
    Zero, not NaN, without mixed examples.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    own = F.cross_entropy(logits, labels[first], reduction="none")
    other = F.cross_entropy(logits, labels[partner], reduction="none")
    if sample_weight is not None:
        own, other = own * sample_weight[first], other * sample_weight[partner]
    return (weight * own + (1 - weight) * other).mean()


@dataclass
class Mixing:
    """One step's draw: mixed example k mixes ``first[k]`` with ``partner[k]`` by ``lambdas``."""

    first: Tensor
    partner: Tensor
    lambdas: dict[str, Tensor]

    @property
    def weight(self) -> Tensor:
        return label_weight(self.lambdas)


# -- the plugin ----------------------------------------------------------------------------------------
class MixingConfig(WindowConfig):
    alpha: float = Field(0.4, gt=0, le=1000, description="a of Beta(a, a), the law of every mixing coefficient λ")
    weight: float = Field(
        1.0, ge=0, description="weight of the mixed loss; 0 switches the plugin off (the step is the objective's)"
    )
    fused: Literal["replace", "add"] = Field(
        "replace",
        description="replace: the mixed loss takes the place of the objective's fused cross-entropy (its loss term "
        "'fused'; steps without one are left alone); add: it is added next to it as its own term",
    )


class MixingPlugin(Plugin):
    """Mixed feature tuples of the batch, fused and trained towards both labels (see the module docstring).

    Subclasses say how finely λ is drawn (``granularity``) and how many
    mixed examples a batch gives (``count``).
    """

    Config = MixingConfig
    auxiliary_options = ("weight",)
    exclusive = (ROLE,)


    def granularity(self) -> Granularity:
        raise NotImplementedError

    def count(self, batch_size: int) -> int:
        return batch_size

    def draw(self, features: Mapping[str, Tensor], ctx) -> Mixing:
        """Partners first, then coefficients, both from ``ctx.generator``."""
        reference = features[self.modalities[0]]
        size = reference.shape[0]
        first, partner = draw_partners(size, self.count(size), ctx.generator, reference.device)
        widths = {m: features[m].shape[-1] for m in self.modalities}
        lambdas = draw_lambdas(self.config.alpha, widths, self.granularity(), ctx.generator, reference.device)
        return Mixing(first, partner, lambdas)

    def on_forward(self, record, ctx):
        config = self.config
        if config.weight == 0 or not in_window(config, ctx.epoch):
            return
        replacing = config.fused == "replace"
        if (replacing and FUSED_TERM not in record.losses) or len(record.batch) == 0:
            return  # e.g. MIDAS's warm-up, where the fusion head has no task loss
        mixing = self.draw(record.features, ctx)
        logits = record.fuse(mix_features(record.features, mixing.first, mixing.partner, mixing.lambdas, self.modalities))
        weight = mixing.weight
        loss = config.weight * mixed_cross_entropy(
            logits, record.labels, mixing.first, mixing.partner, weight.to(logits.device), record.batch.weight
        )
        if replacing:
            record.losses[FUSED_TERM] = loss
        else:
            record.add_loss(self.name, loss)
        record.logs[f"{self.name}/label_weight"] = weight.detach()
        record.logs[f"{self.name}/mixed_samples"] = float(mixing.first.shape[0])
        for m in self.modalities:
            record.logs[f"{self.name}/lambda/{m}"] = mixing.lambdas[m].detach().float().mean()
