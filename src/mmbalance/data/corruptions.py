"""Test-time corruptions for the noise-robustness protocol (CAL.md, "Noise-robustness protocol").

A corruption is built with a level ε ≥ 0, the fraction of samples it touches
(0.5 by default, as in CAL and QMF) and a seed, then applied to a Batch for
one or more modalities: ``Gaussian(1.0)(batch, ["image"])``. ε = 0 leaves
every batch unchanged, so the ε = 0 point of a curve is the clean accuracy.

Reproducibility: every random number a sample gets comes from its own
``torch.Generator``, seeded from (seed, stream, the sample's ``batch.index``).
Which samples are touched and their noise therefore depend neither on batch
size nor on order. The draws also do not depend on ε (common random numbers):
a larger ε scales the same noise, or masks a superset of the same positions,
so accuracy-vs-ε curves are not jagged from resampling. The touched samples
are the same for every modality, so corrupting two modalities corrupts both
in the same samples.

Level definitions (each documented on its class):

- ``gaussian``: additive noise with std ε × the sample's own std over the
  modality's elements (``absolute=true``: std ε);
- ``salt_pepper``: each element set to the sample's min or max (half each)
  with probability ``rate`` × ε (rate 0.1);
- ``blur``: Gaussian blur with sigma ``sigma_per_level`` × ε pixels (1 pixel);
- ``token_mask``: each non-padding token replaced by ``unk_id`` with
  probability ``rate`` × ε (rate 0.1, as in CAL.md);
- ``feature_dropout``: each element zeroed with probability ε;
- ``missing``: the modality replaced by zeros (any ε > 0).

Probabilities above 1 are capped at 1.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config import Section, validate_section
from ..errors import MMBalanceError
from ..registry import CORRUPTIONS
from .batch import Batch

SEED_SPACE = 2**32  # torch's CPU generator keeps only the low 32 bits of a seed


def sample_seeds(seed: int, stream: str, index: Sequence[int]) -> list[int]:
    """One generator seed per sample: distinct within a (seed, stream), independent of the batch."""
    offset = zlib.crc32(f"{seed}/{stream}".encode())
    return [(offset + i) % SEED_SPACE for i in index]


class SampleDraws:
    """Random numbers drawn sample by sample, so no sample's draws depend on its neighbours."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.device = device

    def _draw(self, sampler, shape: tuple[int, ...]) -> Tensor:
        if not self.generators:
            return torch.empty(0, *shape, device=self.device)
        return torch.stack([sampler(shape, generator=g) for g in self.generators]).to(self.device)

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        """Shape ``[samples, *shape]``, uniform on [0, 1)."""
        return self._draw(torch.rand, shape)

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """Shape ``[samples, *shape]``, standard normal."""
        return self._draw(torch.randn, shape)


class Corruption:
    """Base class: picks the touched samples; subclasses say how a touched input changes."""

    class Config(Section):
        pass

    requirement = "a floating-point tensor"

    def __init__(self, level: float, fraction: float = 0.5, seed: int = 0, config: Section | dict | None = None):
        if not (math.isfinite(level) and level >= 0):
            raise MMBalanceError(f"corruption level must be a finite number >= 0, got {level}")
        if not 0 <= fraction <= 1:
            raise MMBalanceError(f"corruption fraction must be between 0 and 1, got {fraction}")
        if seed < 0:
            raise MMBalanceError(f"corruption seed must be >= 0, got {seed}")
        self.level = float(level)
        self.fraction = float(fraction)
        self.seed = int(seed)
        if not isinstance(config, Section):
            config = validate_section(self.name, self.Config, config or {})
        self.config = config

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def accepts(self, sample_shape: torch.Size, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    def check(self, modality: str, x: Tensor) -> None:
        """One-line error when this corruption makes no sense for the modality's inputs."""
        if not self.accepts(x.shape[1:], x.dtype):
            raise MMBalanceError(
                f"corruption '{self.name}' cannot apply to modality '{modality}' "
                f"(per-sample shape {tuple(x.shape[1:])}, dtype {str(x.dtype).replace('torch.', '')}): "
                f"it needs {self.requirement}"
            )

    def touched(self, index: Tensor) -> Tensor:
        """Boolean mask of the samples this corruption changes; a function of (seed, index) only."""
        draws = SampleDraws(sample_seeds(self.seed, "touched", index.tolist()))
        return draws.uniform(()) < self.fraction

    def __call__(self, batch: Batch, modalities: Sequence[str]) -> Batch:
        for modality in modalities:
            if modality not in batch.inputs:
                raise MMBalanceError(f"unknown modality '{modality}' (allowed: {', '.join(batch.inputs)})")
            self.check(modality, batch.inputs[modality])
        if self.level == 0:
            return batch
        index = batch.index.cpu()
        rows = self.touched(index).nonzero().flatten()
        if len(rows) == 0:
            return batch
        touched_index = index[rows].tolist()
        inputs = dict(batch.inputs)
        for modality in modalities:
            x = inputs[modality].clone()
            draws = SampleDraws(sample_seeds(self.seed, f"noise/{modality}", touched_index), x.device)
            device_rows = rows.to(x.device)
            x[device_rows] = self.corrupt(x[device_rows], draws).to(x.dtype)
            inputs[modality] = x
        return dataclasses.replace(batch, inputs=inputs)

    def corrupt(self, x: Tensor, draws: SampleDraws) -> Tensor:
        """The corrupted version of ``x``, the touched samples only (batch in dimension 0)."""
        raise NotImplementedError


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """Reshape one value per sample to broadcast over a ``ndim``-dimensional batch."""
    return values.view(-1, *([1] * (ndim - 1)))


def _capped(probability: float) -> float:
    return min(probability, 1.0)


@CORRUPTIONS.register("gaussian")
class Gaussian(Corruption):
    """Additive Gaussian noise, std = ε x the sample's std (or ε with absolute=true)."""

    class Config(Section):
        absolute: bool = Field(False, description="std is ε itself, for inputs already on a unit scale")

    def corrupt(self, x, draws):
        if self.config.absolute:
            scale = torch.ones(len(x), device=x.device)
        else:
            # The sample's own spread sets the unit, so ε means the same on any input scale.
            scale = x.flatten(1).float().std(dim=1, correction=0)
        return x + self.level * _per_sample(scale, x.dim()) * draws.normal(tuple(x.shape[1:]))


@CORRUPTIONS.register("salt_pepper")
class SaltPepper(Corruption):
    """Each element set to the sample's min or max with probability rate x ε (images, spectrograms)."""

    class Config(Section):
        rate: float = Field(0.1, gt=0, description="density per unit of ε")

    requirement = "a floating-point image or spectrogram (at least 2 dimensions per sample)"

    def accepts(self, sample_shape, dtype):
        return dtype.is_floating_point and len(sample_shape) >= 2

    def corrupt(self, x, draws):
        shape = tuple(x.shape[1:])
        hit = draws.uniform(shape) < _capped(self.config.rate * self.level)
        salt = draws.uniform(shape) < 0.5
        flat = x.flatten(1)
        low = _per_sample(flat.min(dim=1).values, x.dim()).expand_as(x)
        high = _per_sample(flat.max(dim=1).values, x.dim()).expand_as(x)
        return torch.where(hit, torch.where(salt, high, low), x)


@CORRUPTIONS.register("blur")
class Blur(Corruption):
    """Gaussian blur with sigma = sigma_per_level x ε pixels (images (C,H,W) or videos (T,C,H,W))."""

    class Config(Section):
        sigma_per_level: float = Field(1.0, gt=0, description="blur sigma in pixels per unit of ε")

    requirement = "a floating-point image (C,H,W) or video (T,C,H,W)"

    def accepts(self, sample_shape, dtype):
        return dtype.is_floating_point and len(sample_shape) in (3, 4)

    def corrupt(self, x, draws):
        sigma = self.config.sigma_per_level * self.level
        radius = math.ceil(3 * sigma)
        if radius == 0:
            return x
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(x.dtype)
        height, width = x.shape[-2:]
        planes = x.reshape(-1, 1, height, width)
        # Replicated borders: a constant image stays exactly constant.
        planes = F.pad(planes, (radius, radius, radius, radius), mode="replicate")
        planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
        planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
        return planes.reshape(x.shape)


@CORRUPTIONS.register("token_mask")
class TokenMask(Corruption):
    """Each token replaced by the unknown token with probability rate x ε (0.1 ε, as in CAL)."""

    class Config(Section):
        unk_id: int = Field(1, ge=0, description="id of the unknown token")
        pad_id: Optional[int] = Field(0, description="padding id, never replaced (null: replace every position)")
        rate: float = Field(0.1, gt=0, description="replacement probability per unit of ε")

    requirement = "integer token ids"

    def accepts(self, sample_shape, dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool

    def corrupt(self, x, draws):
        replace = draws.uniform(tuple(x.shape[1:])) < _capped(self.config.rate * self.level)
        if self.config.pad_id is not None:
            replace &= x != self.config.pad_id
        return torch.where(replace, torch.full_like(x, self.config.unk_id), x)


@CORRUPTIONS.register("feature_dropout")
class FeatureDropout(Corruption):
    """Each feature zeroed with probability ε."""

    def corrupt(self, x, draws):
        dropped = draws.uniform(tuple(x.shape[1:])) < _capped(self.level)
        return x.masked_fill(dropped, 0)


@CORRUPTIONS.register("missing")
class Missing(Corruption):
    """The modality replaced by zeros (any ε > 0): the missing-modality case."""

    requirement = "any tensor"

    def accepts(self, sample_shape, dtype):
        return True

    def corrupt(self, x, draws):
        return torch.zeros_like(x)


def build_corruption(name: str, level: float, fraction: float = 0.5, seed: int = 0, options: dict | None = None) -> Corruption:
    """A registered corruption by name; unknown names and options fail with one line."""
    return CORRUPTIONS.get(name)(level, fraction=fraction, seed=seed, config=options)
