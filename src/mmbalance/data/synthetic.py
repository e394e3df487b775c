"""Synthetic data with controlled modality imbalance, for any number of modalities.

Each sample has a latent class. The *strong* modality (the first) sees the
class only coarsely: classes come in groups, and its class means differ
between groups at a high signal-to-noise ratio in many dimensions, so it is
learned at once (and, being high-dimensional, easily memorised) but cannot
tell the classes of a group apart. The *weak* modalities see every class,
but each sample shows its class mean with a random sign: only a nonlinear
encoder can read them, and it learns them slowly. They carry exactly the
information the strong modality lacks.

Joint training fits the strong modality first and leaves the weak encoder
under-trained; the Bayes-optimal accuracy (computed exactly from the
generator, ``info["bayes_accuracy"]``) shows how much a model that used every
modality could reach. The defaults were calibrated for that gap; the
figures are in docs/results.md.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from ..config import Section
from ..registry import DATASETS
from .base import DataBundle, select_views
from .loading import split_seed
from .splits import train_val_test


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@DATASETS.register("synthetic")
class SyntheticDataset:
    """Controlled imbalance: a fast, coarse strong modality and slow, fine weak ones."""

    class Config(Section):
        num_samples: int = Field(3000, ge=20)
        num_classes: int = Field(20, ge=2)
        num_modalities: int = Field(2, ge=2)
        dims: Optional[list[int]] = Field(None, description="feature size per modality; default 256 for the strong, 64 for each weak")
        strong_snr: float = Field(5.0, gt=0, description="separation of the strong modality's group means")
        strong_groups: int = Field(5, ge=1, description="how many class groups the strong modality can tell apart")
        strong_within_snr: float = Field(0.0, ge=0, description="the strong modality's faint hint inside a group")
        weak_snr: float = Field(3.5, ge=0, description="separation of the weak modalities' class means")
        weak_sign_flip: bool = Field(
            True,
            description="weak signals appear with a random sign per sample, so only a nonlinear encoder can read them",
        )
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
    def generate(cls, options: "SyntheticDataset.Config") -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Inputs per modality, labels, and each modality's class means (for the Bayes rule)."""
        rng = np.random.default_rng(options.seed)
        n, c = options.num_samples, options.num_classes
        dims = options.dims or [256] + [64] * (options.num_modalities - 1)
        labels = np.arange(n) % c
        rng.shuffle(labels)
        names = cls.modality_names(options.num_modalities)
        inputs: dict[str, np.ndarray] = {}
        class_means: dict[str, np.ndarray] = {}
        group_of = (np.arange(c) * options.strong_groups) // c
        group_means = _unit_rows(rng, options.strong_groups, dims[0]) * options.strong_snr
        within = _unit_rows(rng, c, dims[0]) * options.strong_within_snr
        strong_means = group_means[group_of] + within
        inputs[names[0]] = strong_means[labels] + rng.standard_normal((n, dims[0]))
        class_means[names[0]] = strong_means
        for name, dim in zip(names[1:], dims[1:]):
            means = _unit_rows(rng, c, dim) * options.weak_snr
            signs = rng.choice([-1.0, 1.0], size=(n, 1)) if options.weak_sign_flip else np.ones((n, 1))
            inputs[name] = signs * means[labels] + rng.standard_normal((n, dim))
            class_means[name] = means
        return {m: x.astype(np.float32) for m, x in inputs.items()}, labels.astype(np.int64), class_means

    @staticmethod
    def bayes_predictions(
        inputs: dict[str, np.ndarray], class_means: dict[str, np.ndarray], use: list[str], sign_flip: set[str] = frozenset()
    ) -> np.ndarray:
        """The Bayes-optimal classes given the modalities in ``use``.

        Classes are equally likely and the noise is unit Gaussian, so the
        posterior's log is minus half the summed squared distances to the
        class means. Its accuracy is the ceiling any model can reach: the
        figure that shows how much joint training leaves on the table.
        """
        scores = 0.0
        for m in use:
            x, mu = inputs[m].astype(np.float64), class_means[m]
            log_lik = -0.5 * ((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
            if m in sign_flip:  # an equal mixture of +mu and -mu
                log_lik = np.logaddexp(log_lik, -0.5 * ((x[:, None, :] + mu[None, :, :]) ** 2).sum(-1))
            scores = scores + log_lik
        return np.asarray(scores).argmax(axis=1)

    @classmethod
    def _bayes_report(cls, arrays, labels, class_means, views, rows, flipped) -> dict[str, float]:
        """Bayes-optimal test accuracy with all modalities and with each alone."""
        test_inputs = {m: arrays[m][rows] for m in views}

        def accuracy(use):
            return float((cls.bayes_predictions(test_inputs, class_means, use, flipped) == labels[rows]).mean())

        return {"all": accuracy(views), **{m: accuracy([m]) for m in views}}

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("synthetic")
        arrays, labels, class_means = cls.generate(options)
        views = select_views(arrays, config.data.views, "synthetic")
        train, val, test = train_val_test(labels, config.data.val_fraction, config.data.test_fraction, split_seed(config))
        tensors = {m: torch.from_numpy(arrays[m]) for m in views}
        flipped = set(cls.modality_names(options.num_modalities)[1:]) if options.weak_sign_flip else set()
        return DataBundle.from_tensors(
            tensors,
            torch.from_numpy(labels),
            (train, val, test),
            options.num_classes,
            info={"bayes_accuracy": cls._bayes_report(arrays, labels, class_means, views, test, flipped)},
        )
