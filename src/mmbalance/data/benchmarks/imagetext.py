"""Image + text classification benchmarks: UPMC Food-101 and MVSA-Single.

Both use the JSON-lines layout of MMBT, which QMF (Zhang et al., ICML 2023)
ships for these datasets: ``train.jsonl``, ``dev.jsonl`` (validation) and
``test.jsonl``, one object per line with ``text``, ``img`` (a path relative
to ``data.root``) and ``label`` (a class name). The official splits are
kept. Images become ``(3, image_size, image_size)`` ImageNet-normalised
tensors, text ``(max_length,)`` token ids from a vocabulary of the train
split (``tokenizer.Tokenizer``), encoded by the ``text`` encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Optional

import torch
from pydantic import Field

from ...errors import DataError
from ...registry import DATASETS
from ..base import DataBundle
from ..loading import data_root
from .common import RESNET_SGD_DEFAULTS, FileConfig, bundle_from_records, class_index, inside_root, require_dir
from .media import ImageReader
from .tokenizer import MAX_VOCAB, Tokenizer

LIST_FILES = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}


class ImageTextConfig(FileConfig):
    image_size: int = Field(224, ge=8, description="images are resized to image_size x image_size")
    max_length: int = Field(128, ge=1, description="tokens per text; longer texts are cut, shorter padded")
    min_count: int = Field(1, ge=1, description="a word needs this many train occurrences to get its own id")
    max_vocab: int = Field(MAX_VOCAB, ge=3, le=MAX_VOCAB, description="vocabulary size including <pad> and <unk>")


class TokenReader:
    """The token ids stored in the record when the dataset was loaded."""

    dtype = torch.int64  # token ids, read by the ``text`` encoder

    def __call__(self, record: dict) -> torch.Tensor:
        return torch.from_numpy(record["tokens"])

    def probe(self, record: dict) -> None:
        return None


def read_jsonl(path: Path, layout: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each non-empty line, checked to have string text, img and label."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not JSON (expected {layout})") from None
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in ("img", "label", "text")):
            raise DataError(f"{path} line {number} lacks a string 'img', 'label' or 'text' (expected {layout})")
        entries.append((number, entry))
    return entries


class ImageTextBenchmark:
    name: ClassVar[str]
    Config: ClassVar[type[ImageTextConfig]]
    defaults: ClassVar[dict] = {**RESNET_SGD_DEFAULTS, "model.encoders": {"text": "text"}}

    @classmethod
    def layout(cls) -> str:
        return 'ROOT/{train,dev,test}.jsonl with one {"text", "img", "label"} object per line, img relative to ROOT'

    @classmethod
    def classes(cls, labels: list[str], options) -> dict[str, int]:
        raise NotImplementedError

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section(cls.name)
        root = data_root(config, cls.name)
        require_dir(root, cls.name, cls.layout())
        missing = [file for file in LIST_FILES.values() if not (root / file).is_file()]
        if missing:
            raise DataError(f"{root} does not have the {cls.name} layout: no {missing[0]} (expected {cls.layout()})")
        entries = {split: read_jsonl(root / file, cls.layout()) for split, file in LIST_FILES.items()}
        index = cls.classes([e["label"] for _, e in entries["train"]], options)
        tokenizer = Tokenizer.build(
            (e["text"] for _, e in entries["train"]), options.max_length, options.min_count, options.max_vocab
        )
        splits = {}
        for split, items in entries.items():
            records = []
            for line, e in items:
                if e["label"] not in index:
                    raise DataError(
                        f"{root / LIST_FILES[split]}: label {e['label']!r} of {e['img']} is not a train class"
                    )
                tokens = tokenizer.encode(e["text"])
                image_path = inside_root(root, e["img"], root / LIST_FILES[split], line)
                records.append({"image": str(image_path), "tokens": tokens, "label": index[e["label"]]})
            splits[split] = records
        image = ImageReader("image", options.image_size)
        text = TokenReader()
        return bundle_from_records(
            config,
            cls.name,
            splits,
            {"image": image, "text": text},
            {"image": image.probe, "text": text.probe},
            {"image": image.shape, "text": (options.max_length,)},
            sorted(index, key=index.get),
            {"root": str(root), "vocabulary": len(tokenizer.vocabulary)},
        )


@DATASETS.register("food101")
class Food101(ImageTextBenchmark):
    """UPMC Food-101: recipe web pages, image + text, 101 dishes (MMBT/QMF jsonl layout).

    Layout under ``data.root``::

        train.jsonl, dev.jsonl, test.jsonl   {"text": ..., "img": "images/train/apple_pie/x.jpg", "label": "apple_pie"}
        images/...                           the paths named by "img", relative to data.root

    Classes are the sorted train labels; ``food101.num_classes`` (101) is checked.
    """

    name = "food101"

    class Config(ImageTextConfig):
        num_classes: Optional[int] = Field(101, ge=2, description="expected number of classes; null accepts any")

    @classmethod
    def classes(cls, labels, options):
        return class_index(labels, options.num_classes, "the food101 train list", "food101.num_classes")


MVSA_CLASSES = ["negative", "neutral", "positive"]


@DATASETS.register("mvsa")
class MVSASingle(ImageTextBenchmark):
    """MVSA-Single: 4,511 tweets, image + text, 3 sentiments (QMF jsonl layout).

    Layout under ``data.root``::

        train.jsonl, dev.jsonl, test.jsonl   {"id": "4141", "text": ..., "img": "data/4141.jpg", "label": "neutral"}
        data/<id>.jpg

    Labels are negative, neutral, positive (ids 0, 1, 2).
    """

    name = "mvsa"

    class Config(ImageTextConfig):
        max_length: int = Field(64, ge=1, description="tokens per text; longer texts are cut, shorter padded")

    @classmethod
    def classes(cls, labels, options):
        unknown = sorted(set(labels) - set(MVSA_CLASSES))
        if unknown:
            raise DataError(f"the mvsa train list has label {unknown[0]!r} (allowed: {', '.join(MVSA_CLASSES)})")
        return {name: k for k, name in enumerate(MVSA_CLASSES)}

