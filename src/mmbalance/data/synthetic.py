"""Synthetic data with controlled modality imbalance, for any number of modalities.

Each sample has a latent class. The *strong* modality (the first) sees the
class only coarsely: classes come in groups, and its class means differ
between groups at a high signal-to-noise ratio in many dimensions, so it is
learned at once (and, being high-dimensional, easily memorised) but cannot
tell the classes of a group apart. The *weak* modalities see every class,
but each sample shows its class mean with a random sign: only a nonlinear
encoder can read them, and it learns them slowly. They carry exactly the
information the strong modality lacks.

With ``synthetic.multi_label=true`` a sample has several latent classes
(1 to ``labels_per_sample``, drawn uniformly, the classes at random) and its
label is their 0/1 row; each modality shows the sum of its means of those
classes (the weak ones with one random sign per sample), so the strong
modality tells which groups are present and the weak ones which classes,
with the same knobs of imbalance.

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
from ..tasks import stratification_key
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
        num_samples: int = Field(3000, ge=20, description="samples generated, before the train/val/test split")
        num_classes: int = Field(20, ge=2, description="classes; the strong modality tells only strong_groups groups of them apart")
        num_modalities: int = Field(2, ge=2, description="modalities: one strong, the rest weak (weak1.. for more than 2)")
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
        multi_label: bool = Field(
            False, description="several latent classes per sample, labelled as a 0/1 row (multi-label classification)"
        )
        labels_per_sample: int = Field(
            3, ge=1, description="multi_label: each sample has 1 to this many classes, the count drawn uniformly"
        )

        @model_validator(mode="after")
        def _consistent(self):
            if self.dims is not None:
                if len(self.dims) != self.num_modalities or any(d < 1 for d in self.dims):
                    raise ValueError(f"dims must list {self.num_modalities} positive sizes, got {self.dims}")
            if self.strong_groups > self.num_classes:
                raise ValueError(f"strong_groups ({self.strong_groups}) cannot exceed num_classes ({self.num_classes})")
            if self.multi_label and self.labels_per_sample > self.num_classes:
                raise ValueError(
                    f"labels_per_sample ({self.labels_per_sample}) cannot exceed num_classes ({self.num_classes})"
                )
            return self

    @staticmethod
    def modality_names(count: int) -> list[str]:
        if count == 2:
            return ["strong", "weak"]
        return ["strong"] + [f"weak{k}" for k in range(1, count)]

    @classmethod
    def generate(cls, options: "SyntheticDataset.Config") -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Inputs per modality, labels, and each modality's class means (for the Bayes rule)."""
        if options.multi_label:
            return cls.generate_multi_label(options)
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

    @classmethod
    def generate_multi_label(cls, options: "SyntheticDataset.Config") -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Inputs per modality, labels [N, C] of 0/1, and each modality's class means.

        Sample i has k_i ~ U{1..labels_per_sample} distinct classes Y_i; modality
        m shows Σ_{c ∈ Y_i} μ^m_c (+ unit noise), the weak ones times one random
        sign s_i per sample, as the single-label data show μ^m_{y_i}.
        """
        rng = np.random.default_rng(options.seed)
        n, c = options.num_samples, options.num_classes
        dims = options.dims or [256] + [64] * (options.num_modalities - 1)
        counts = rng.integers(1, options.labels_per_sample + 1, size=n)
        position = rng.random((n, c)).argsort(axis=1).argsort(axis=1)  # each class's place in a random order
        labels = (position < counts[:, None]).astype(np.float64)
        names = cls.modality_names(options.num_modalities)
        inputs: dict[str, np.ndarray] = {}
        class_means: dict[str, np.ndarray] = {}
        group_of = (np.arange(c) * options.strong_groups) // c
        group_means = _unit_rows(rng, options.strong_groups, dims[0]) * options.strong_snr
        within = _unit_rows(rng, c, dims[0]) * options.strong_within_snr
        strong_means = group_means[group_of] + within
        inputs[names[0]] = labels @ strong_means + rng.standard_normal((n, dims[0]))
        class_means[names[0]] = strong_means
        for name, dim in zip(names[1:], dims[1:]):
            means = _unit_rows(rng, c, dim) * options.weak_snr
            signs = rng.choice([-1.0, 1.0], size=(n, 1)) if options.weak_sign_flip else np.ones((n, 1))
            inputs[name] = signs * (labels @ means) + rng.standard_normal((n, dim))
            class_means[name] = means
        return {m: x.astype(np.float32) for m, x in inputs.items()}, labels.astype(np.float32), class_means

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
        strata = stratification_key(labels)
        train, val, test = train_val_test(strata, config.data.val_fraction, config.data.test_fraction, split_seed(config))
        tensors = {m: torch.from_numpy(arrays[m]) for m in views}
        if options.multi_label:  # no closed-form Bayes rule for label sets: the report is single-label only
            info = {"labels_per_sample": options.labels_per_sample, "mean_labels": float(labels.sum(1).mean())}
            return DataBundle.from_tensors(tensors, torch.from_numpy(labels), (train, val, test), options.num_classes, info=info)
        flipped = set(cls.modality_names(options.num_modalities)[1:]) if options.weak_sign_flip else set()
        return DataBundle.from_tensors(
            tensors,
            torch.from_numpy(labels),
            (train, val, test),
            options.num_classes,
            info={"bayes_accuracy": cls._bayes_report(arrays, labels, class_means, views, test, flipped)},
        )
