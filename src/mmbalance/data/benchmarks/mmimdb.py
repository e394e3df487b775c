"""MM-IMDB: movie posters and plots, 23 genres, several per movie (multi-label).

The public release (Arevalo et al., ICLR workshop 2017) keeps its layout
under ``data.root``::

    split.json             {"train": [id, ...], "dev": [...], "test": [...]}  (dev is validation)
    dataset/<id>.json      metadata with "plot" (a list of plot summaries, or one string) and "genres"
    dataset/<id>.jpeg      the poster

The official splits are kept. A movie's label is its row of 0/1 over the 23
genres in the usual order (``GENRES``); genres outside them are left out
(and counted in ``info``). The text is the first plot summary
(``mmimdb.plot=first``, as MMBT and MMF read it) or all of them joined
(``all``), as ``(max_length,)`` token ids from a vocabulary of the train
split (``tokenizer.Tokenizer``) for the ``text`` encoder; posters become
``(3, image_size, image_size)`` ImageNet-normalised tensors for the image
encoders (``cnn``, ``resnet18``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ...errors import DataError
from ...registry import DATASETS
from ...tasks import MULTI_LABEL
from ..base import DataBundle, select_views
from ..loading import data_root
from .common import RESNET_SGD_DEFAULTS, Checker, FileConfig, FileDataset, require_dir
from .imagetext import TokenReader
from .media import ImageReader
from .tokenizer import MAX_VOCAB, Tokenizer

#: the 23 genres of MM-IMDB, in the order of the release's label vectors
GENRES = [
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror", "Documentary", "Mystery",
    "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music", "Animation", "Musical", "Western",
    "Sport", "Short", "Film-Noir",
]
SPLIT_KEYS = {"train": "train", "val": "dev", "test": "test"}
LAYOUT = (
    'ROOT/split.json ({"train": [ids], "dev": [ids], "test": [ids]}) and ROOT/dataset/<id>.json '
    '({"plot": [...], "genres": [...]}) with ROOT/dataset/<id>.jpeg'
)


class MultiLabelFileDataset(FileDataset):
    """A lazily read split whose labels are 0/1 rows ([N, C], float32), one per record."""

    def __init__(self, records: list[dict], readers: dict, labels: np.ndarray, index: np.ndarray):
        self.records = records
        self.readers = readers
        self.modalities = list(readers)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32).reshape(len(records), -1))
        self.index = torch.as_tensor(np.asarray(index, dtype=np.int64))

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        sample = {m: read(record) for m, read in self.readers.items()}
        sample["label"] = self.labels[i]
        sample["index"] = int(self.index[i])
        return sample


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path} (expected {LAYOUT})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None


def read_split(root: Path) -> dict[str, list[str]]:
    """The train/dev/test ids of ``split.json``, as strings."""
    path = root / "split.json"
    data = read_json(path, "mmimdb split file")
    if not isinstance(data, dict) or any(key not in data for key in SPLIT_KEYS.values()):
        raise DataError(f"{path} must map train, dev and test to lists of movie ids (expected {LAYOUT})")
    splits = {}
    for split, key in SPLIT_KEYS.items():
        ids = data[key]
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, (str, int)) for i in ids):
            raise DataError(f"{path}: '{key}' must be a list of movie ids (strings), got {type(ids).__name__}")
        splits[split] = [str(i) for i in ids]
        for movie in splits[split]:
            # ids are data: each must name a file inside the dataset folder, nothing else
            if not movie or movie in (".", "..") or any(c in movie for c in "/\\\x00"):
                raise DataError(f"{path}: id {movie!r} in '{key}' is not a plain file name")
    return splits


def plot_text(plot, path: Path, mode: str) -> str:
    """The movie's text: the first plot summary, or all of them joined (a single string is its only summary)."""
    if isinstance(plot, str):
        return plot
    if not isinstance(plot, list) or not plot or any(not isinstance(p, str) for p in plot):
        raise DataError(f"{path}: 'plot' must be a string or a non-empty list of strings")
    return plot[0] if mode == "first" else " ".join(plot)


def genre_row(genres, path: Path) -> tuple[np.ndarray, list[str]]:
    """(0/1 row over ``GENRES``, the genres outside them)."""
    if not isinstance(genres, list) or any(not isinstance(g, str) for g in genres):
        raise DataError(f"{path}: 'genres' must be a list of genre names")
    row = np.zeros(len(GENRES), dtype=np.float32)
    other = []
    for genre in genres:
        if genre in GENRES:
            row[GENRES.index(genre)] = 1.0
        else:
            other.append(genre)
    return row, other


@DATASETS.register("mmimdb")
class MMIMDB:
    """MM-IMDB: 25,959 movies, poster + plot, 23 genres per movie as a multi-label task (official splits)."""

    defaults = {**RESNET_SGD_DEFAULTS, "model.encoders": {"text": "text"}}

    class Config(FileConfig):
        image_size: int = Field(224, ge=8, description="posters are resized to image_size x image_size")
        max_length: int = Field(256, ge=1, description="tokens per plot; longer plots are cut, shorter padded")
        min_count: int = Field(1, ge=1, description="a word needs this many train occurrences to get its own id")
        max_vocab: int = Field(MAX_VOCAB, ge=3, le=MAX_VOCAB, description="vocabulary size including <pad> and <unk>")
        plot: Literal["first", "all"] = Field(
            "first", description="text of a movie: its first plot summary (MMBT, MMF) or all summaries joined"
        )

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("mmimdb")
        root = data_root(config, "mmimdb")
        require_dir(root, "mmimdb", LAYOUT)
        splits = read_split(root)
        folder = root / "dataset"
        ignored: dict[str, int] = {}
        entries: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        for split, ids in splits.items():
            items = []
            for movie in ids:
                meta_path = folder / f"{movie}.json"
                meta = read_json(meta_path, "mmimdb metadata")
                if not isinstance(meta, dict) or "plot" not in meta or "genres" not in meta:
                    raise DataError(f"{meta_path} lacks 'plot' or 'genres' (expected {LAYOUT})")
                row, other = genre_row(meta["genres"], meta_path)
                for genre in other:
                    ignored[genre] = ignored.get(genre, 0) + 1
                items.append((movie, plot_text(meta["plot"], meta_path, options.plot), row))
            entries[split] = items
        tokenizer = Tokenizer.build(
            (text for _, text, _ in entries["train"]), options.max_length, options.min_count, options.max_vocab
        )
        image = ImageReader("image", options.image_size)
        text = TokenReader()
        readers = {"image": image, "text": text}
        probes = {"image": image.probe, "text": text.probe}
        views = select_views(readers, config.data.views, "mmimdb")
        readers = {m: readers[m] for m in views}
        checker = Checker(config.data.on_error, options.check, readers, probes)
        datasets = {}
        offset = 0
        for split, items in entries.items():
            records = [
                {"image": str(folder / f"{movie}.jpeg"), "tokens": tokenizer.encode(plot), "label": row, "id": movie}
                for movie, plot, row in items
            ]
            records = checker.filter(records)
            labels = np.stack([r["label"] for r in records]) if records else np.zeros((0, len(GENRES)), np.float32)
            datasets[split] = MultiLabelFileDataset(records, readers, labels, np.arange(offset, offset + len(records)))
            offset += len(records)
        shapes = {"image": image.shape, "text": (options.max_length,)}
        return DataBundle(
            train=datasets["train"],
            val=datasets["val"],
            test=datasets["test"],
            num_classes=len(GENRES),
            modalities=views,
            input_shapes={m: shapes[m] for m in views},
            class_names=list(GENRES),
            info={"root": str(root), "vocabulary": len(tokenizer.vocabulary), "plot": options.plot,
                  "ignored_genres": dict(sorted(ignored.items())), **checker.info()},
            task=MULTI_LABEL,
        )
