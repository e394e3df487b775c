"""CMU-MOSI and CMU-MOSEI from the aligned/unaligned pickles of the MulT preprocessing.

The pickle (Tsai et al., ACL 2019; the files ``mosi_data.pkl``,
``mosi_data_noalign.pkl``, ``mosei_senti_data.pkl``,
``mosei_senti_data_noalign.pkl``) is a dict with ``train``, ``valid`` and
``test``, each a dict of arrays: ``vision`` (N, T_v, D_v), ``audio``
(N, T_a, D_a), ``text`` (N, T_t, D_t, GloVe vectors) and ``labels``
(N, 1, 1) sentiment in [-3, 3]. The official splits are kept.

Sentiment is a regression score; it is turned into classes because the
library trains classifiers: ``labels: binary`` (default) is positive when
score >= 0, the "non-negative" binary accuracy of MulT's evaluation;
``labels: 7class`` rounds the score clipped to [-3, 3] to classes 0..6
(-3 -> 0). CMU-MOSEI also has six emotions, several per clip:
``mosei.labels: emotions`` reads pickles whose labels hold 7 values per
sample in CMU-MultimodalSDK's order (sentiment, then the intensities of
happiness, sadness, anger, surprise, disgust, fear; shape (N, 1, 7)) and
makes a multi-label task: an emotion is on when its intensity is above 0.
Non-finite features (MOSEI's audio has -inf) become 0, so a
time step that was all zeros stays padding for the ``transformer`` encoder.
The pickle is read by ``safe_pickle.load_arrays``, which admits numpy arrays
and plain data only, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ...config import Section
from ...errors import DataError
from ...registry import DATASETS
from ...tasks import MULTI_LABEL, SINGLE_LABEL
from ..base import DataBundle, TensorDataset, select_views
from ..loading import data_root
from ..safe_pickle import load_arrays

MODALITIES = ("audio", "vision", "text")
SPLITS = {"train": "train", "val": "valid", "test": "test"}
SEVEN = ["-3", "-2", "-1", "0", "1", "2", "3"]
#: CMU-MOSEI's emotions, in the order of the SDK's label vector (after the sentiment score)
EMOTIONS = ["happiness", "sadness", "anger", "surprise", "disgust", "fear"]


class SentimentConfig(Section):
    aligned: bool = Field(True, description="word-aligned pickle (all T = 50) or the unaligned one")
    labels: Literal["binary", "7class"] = Field(
        "binary", description="binary: score >= 0 is positive; 7class: score clipped to [-3, 3] and rounded"
    )


def emotion_rows(values: np.ndarray, path: Path, key: str) -> np.ndarray:
    """[N, 6] of 0/1 from label rows [N, 7] (sentiment, then six emotion intensities): on when above 0."""
    if values.shape[1] < 1 + len(EMOTIONS):
        raise DataError(
            f"{path}: labels=emotions needs {1 + len(EMOTIONS)} values per sample in '{key}/labels' (sentiment, then "
            f"the intensities of {', '.join(EMOTIONS)}), got {values.shape[1]}; the MulT sentiment pickles hold "
            "the sentiment score only"
        )
    return (values[:, 1 : 1 + len(EMOTIONS)] > 0).astype(np.float32)


def sentiment_classes(scores: np.ndarray, scheme: str) -> np.ndarray:
    if scheme == "binary":
        return (scores >= 0).astype(np.int64)
    return (np.round(np.clip(scores, -3, 3)) + 3).astype(np.int64)


def read_pickle(path: Path) -> dict:
    """The MulT pickle, through the restricted unpickler: a data file must not be able to run code."""
    return load_arrays(path)


def as_array(value, dtype, path: Path, key: str) -> np.ndarray:
    """``value`` as a numeric array, or one line naming the entry that is not numbers."""
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: '{key}' is not an array of numbers ({str(exc).splitlines()[0]})") from None


def check_layout(data, path: Path, layout: str) -> None:
    if not isinstance(data, dict) or any(not isinstance(data.get(s), dict) for s in SPLITS.values()):
        raise DataError(f"{path} does not have the MulT layout (expected {layout})")
    for split in SPLITS.values():
        missing = [key for key in (*MODALITIES, "labels") if key not in data[split]]
        if missing:
            raise DataError(f"{path}: split '{split}' has no '{missing[0]}' array (expected {layout})")


class SentimentBenchmark:
    name: ClassVar[str]
    files: ClassVar[dict[bool, str]]  # aligned -> file name
    Config = SentimentConfig
    defaults: ClassVar[dict] = {
        "train.epochs": 40,
        "train.batch_size": 32,
        "train.optimizer": "adamw",
        "train.lr": 1e-3,
        "train.grad_clip": 0.8,
        "model.encoder": "transformer",  # one for all: every modality is a (T, D) sequence, and views may drop any
        "model.feature_dim": 64,
        "model.hidden_dim": 64,
        "model.dropout": 0.1,
    }

    @classmethod
    def layout(cls) -> str:
        return (
            f"{cls.files[True]} or {cls.files[False]} in data.root (or data.path to the pickle), a dict with "
            "train/valid/test, each with vision, audio, text (N, T, D) and labels (N, 1, 1) arrays"
        )

    @classmethod
    def path_of(cls, config) -> Path:
        options = config.section(cls.name)
        if config.data.path:
            path = Path(config.data.path).expanduser()
        else:
            path = data_root(config, cls.name) / cls.files[options.aligned]
        if not path.is_file():
            raise DataError(f"{cls.name} pickle not found: {path} (expected {cls.layout()})")
        return path

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section(cls.name)
        path = cls.path_of(config)
        data = read_pickle(path)
        check_layout(data, path, cls.layout())
        views = select_views(dict.fromkeys(MODALITIES), config.data.views, cls.name)
        parts = {}
        offset = 0
        shapes: dict[str, tuple[int, ...]] = {}
        for split, key in SPLITS.items():
            arrays = data[key]
            labels = as_array(arrays["labels"], np.float64, path, f"{key}/labels")
            if labels.ndim == 0 or (labels.shape[0] and labels.size == 0):
                raise DataError(f"{path}: '{key}/labels' has shape {labels.shape}, expected (N, 1, 1) scores")
            width = max(int(np.prod(labels.shape[1:])), 1)
            values = labels.reshape(labels.shape[0], width) if labels.size else np.zeros((0, width))
            scores = values[:, 0]
            count = scores.shape[0]
            inputs = {}
            for m in views:
                features = as_array(arrays[m], np.float32, path, f"{key}/{m}")
                features = np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
                if features.ndim != 3 or features.shape[0] != count:
                    raise DataError(
                        f"{path}: '{key}/{m}' has shape {features.shape}, expected ({count}, T, D) for {count} labels"
                    )
                if shapes.setdefault(m, features.shape[1:]) != features.shape[1:]:
                    raise DataError(
                        f"{path}: '{key}/{m}' has shape {features.shape[1:]} per sample, other splits {shapes[m]}"
                    )
                inputs[m] = torch.from_numpy(features)
            if options.labels == "emotions":
                labels = torch.from_numpy(emotion_rows(values, path, key))
            else:
                labels = torch.from_numpy(sentiment_classes(scores, options.labels))
            parts[split] = TensorDataset(inputs, labels, torch.arange(offset, offset + count))
            offset += count
        class_names = {"binary": ["negative", "positive"], "7class": SEVEN, "emotions": EMOTIONS}[options.labels]
        return DataBundle(
            train=parts["train"],
            val=parts["val"],
            test=parts["test"],
            num_classes=len(class_names),
            modalities=views,
            input_shapes={m: tuple(shapes[m]) for m in views},
            class_names=class_names,
            info={"path": str(path), "labels": options.labels, "aligned": options.aligned},
            task=MULTI_LABEL if options.labels == "emotions" else SINGLE_LABEL,
        )


@DATASETS.register("mosi")
class MOSI(SentimentBenchmark):
    """CMU-MOSI: 2,199 opinion clips, audio + vision + text sequences (MulT pickles), binary or 7-class."""

    name = "mosi"
    files = {True: "mosi_data.pkl", False: "mosi_data_noalign.pkl"}

    class Config(SentimentConfig):
        pass


@DATASETS.register("mosei")
class MOSEI(SentimentBenchmark):
    """CMU-MOSEI: 22,856 opinion clips, audio + vision + text sequences (MulT pickles), binary or 7-class."""

    name = "mosei"
    files = {True: "mosei_senti_data.pkl", False: "mosei_senti_data_noalign.pkl"}

    class Config(SentimentConfig):
        labels: Literal["binary", "7class", "emotions"] = Field(
            "binary",
            description="binary: score >= 0 is positive; 7class: score clipped to [-3, 3] and rounded; emotions: the six "
            "emotions as a multi-label task (labels with 7 values per sample: sentiment, then the emotion intensities)",
        )
