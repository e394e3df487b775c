"""Synthetic data with controlled modality imbalance, for any number of modalities.

Each sample has a latent class. The *strong* modality (the first) sees the
class only coarsely: classes come in groups and its class means differ
mainly between groups, at a high signal-to-noise ratio, so it is learned
fast but cannot tell the classes of a group apart. The *weak* modalities see
every class, at a low signal-to-noise ratio spread over many dimensions: they
learn slowly but carry exactly the information the strong one lacks. A
model that uses every modality can be far more accurate than one that leans
on the strong modality, which is what joint training does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from ..config import Section
from ..registry import DATASETS
from .base import DataBundle, TensorDataset, select_views
from .splits import train_val_test


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@DATASETS.register("synthetic")
class SyntheticDataset:
    """Controlled imbalance: a fast, coarse strong modality and slow, fine weak ones."""

    class Config(Section):
        num_samples: int = Field(3000, ge=20)
        num_classes: int = Field(10, ge=2)
        num_modalities: int = Field(2, ge=2)
        dims: Optional[list[int]] = Field(None, description="feature size per modality; default 32 each")
        strong_snr: float = Field(3.0, gt=0, description="separation of the strong modality's group means")
        strong_groups: int = Field(5, ge=1, description="how many class groups the strong modality can tell apart")
        strong_within_snr: float = Field(0.4, ge=0, description="the strong modality's faint hint inside a group")
        weak_snr: float = Field(1.2, ge=0, description="separation of the weak modalities' class means")
        seed: int = Field(1234, ge=0, description="seed of the generator (the data), independent of the run seed")

        @model_validator(mode="after")
        def _consistent(self):
            if self.dims is not None:
                if len(self.dims) != self.num_modalities or any(d < 1 for d in self.dims):
                    raise ValueError(f"dims must list {self.num_modalities} positive sizes, got {self.dims}")
            if self.strong_groups > self.num_classes:
                raise ValueError(f"strong_groups ({self.strong_groups}) cannot exceed num_classes ({self.num_classes})")
            return self

    @staticmethod
    def modality_names(count: int) -> list[str]:
        if count == 2:
            return ["strong", "weak"]
        return ["strong"] + [f"weak{k}" for k in range(1, count)]

    @classmethod
    def generate(cls, options: "SyntheticDataset.Config") -> tuple[dict[str, np.ndarray], np.ndarray]:
        rng = np.random.default_rng(options.seed)
        n, c = options.num_samples, options.num_classes
        dims = options.dims or [32] * options.num_modalities
        labels = np.arange(n) % c
        rng.shuffle(labels)
        names = cls.modality_names(options.num_modalities)
        inputs: dict[str, np.ndarray] = {}
        group_of = (np.arange(c) * options.strong_groups) // c
        group_means = _unit_rows(rng, options.strong_groups, dims[0]) * options.strong_snr
        within = _unit_rows(rng, c, dims[0]) * options.strong_within_snr
        strong_means = group_means[group_of] + within
        inputs[names[0]] = strong_means[labels] + rng.standard_normal((n, dims[0]))
        for name, dim in zip(names[1:], dims[1:]):
            means = _unit_rows(rng, c, dim) * options.weak_snr
            inputs[name] = means[labels] + rng.standard_normal((n, dim))
        return {m: x.astype(np.float32) for m, x in inputs.items()}, labels.astype(np.int64)

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("synthetic")
        arrays, labels = cls.generate(options)
        views = select_views(arrays, config.data.views, "synthetic")
        split_seed = config.seed if config.data.split_seed is None else config.data.split_seed
        train, val, test = train_val_test(labels, config.data.val_fraction, config.data.test_fraction, split_seed)
        tensors = {m: torch.from_numpy(arrays[m]) for m in views}
        full = TensorDataset(tensors, torch.from_numpy(labels))
        return DataBundle(
            train=full.subset(train),
            val=full.subset(val),
            test=full.subset(test),
            num_classes=options.num_classes,
            modalities=views,
            input_shapes={m: tuple(tensors[m].shape[1:]) for m in views},
            info={"strong_groups": options.strong_groups},
        )
