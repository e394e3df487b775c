"""Audio-visual classification benchmarks: CREMA-D, AVE, Kinetics-Sounds.

All three follow the layout of OGM-GE's preprocessing (Peng et al., CVPR
2022): list files of clip ids and labels, one audio file per clip and one
folder of extracted frames per clip. Audio becomes a log-magnitude
spectrogram ``(1, F, T)`` (see ``media.Spectrogram``), frames a stack
``(T, 3, H, W)``; ResNet-18 encoders (``model.encoder: resnet18``) as in
the papers.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np

from pydantic import Field

from ...errors import DataError
from ...registry import DATASETS
from ..base import DataBundle
from ..loading import data_root, split_seed
from .common import (
    RESNET_SGD_DEFAULTS,
    FileConfig,
    bundle_from_records,
    class_index,
    first_existing,
    inside_root,
    read_numbered_rows,
    require_dir,
)
from .media import FramesReader, Spectrogram

HEADER_WORDS = {"label", "labels", "class", "emotion", "category", "name", "id", "clip", "clip_id", "youtube_id"}

AV_DEFAULTS = {**RESNET_SGD_DEFAULTS, "train.scheduler": "step", "train.step_size": 70, "train.gamma": 0.1}


class AudioVisualConfig(FileConfig):
    frames: int = Field(3, ge=1, description="frames per clip, evenly spaced")
    image_size: int = Field(224, ge=8, description="frames are resized to image_size x image_size")
    sample_rate: int = Field(16000, ge=1000, description="audio is resampled to this rate (Hz)")
    audio_seconds: float = Field(10.0, gt=0, description="audio is repeated or cut to this length")
    n_fft: int = Field(512, ge=16, description="STFT window; the spectrogram has n_fft // 2 + 1 bins")
    hop_length: int = Field(160, ge=1, description="STFT hop; frames = 1 + samples // hop_length")


class AudioVisualBenchmark:
    """Shared loader; subclasses say where the lists and media live and how a list row reads."""

    name: ClassVar[str]
    lists: ClassVar[dict[str, str]]  # split -> list file; "val" may be absent from disk
    delimiter: ClassVar[str] = ","
    audio_dirs: ClassVar[tuple[str, ...]]
    frame_dirs: ClassVar[tuple[str, ...]]
    layout: ClassVar[str]
    Config: ClassVar[type[AudioVisualConfig]]
    defaults: ClassVar[dict] = AV_DEFAULTS

    @classmethod
    def parse(cls, rows: list[tuple[int, list[str]]], path: Path) -> list[tuple[str, str, int]]:
        """``(clip_id, class name, line)`` of each numbered row; a header row is dropped."""
        pairs = []
        for k, (number, row) in enumerate(rows):
            if len(row) < 2 or not row[0]:
                raise DataError(f"{path} line {number} is not 'clip_id{cls.delimiter}label' (expected {cls.layout})")
            if k == 0 and row[1].lower() in HEADER_WORDS:
                continue
            pairs.append((row[0], row[1], number))
        return pairs

    @classmethod
    def classes(cls, names: list[str], options) -> dict[str, int]:
        return class_index(names, options.num_classes, f"the {cls.name} lists", f"{cls.name}.num_classes")

    @classmethod
    def regroup(cls, splits: dict[str, list[dict]], options, config) -> dict[str, list[dict]]:
        """The splits to train and test on; the shipped lists unless a benchmark offers another protocol."""
        return splits

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section(cls.name)
        root = data_root(config, cls.name)
        require_dir(root, cls.name, cls.layout)
        audio_dir = first_existing(root, cls.audio_dirs)
        frame_dir = first_existing(root, cls.frame_dirs)
        missing = [name for name in ("train", "test") if not (root / cls.lists[name]).is_file()]
        if missing or audio_dir is None or frame_dir is None:
            what = cls.lists[missing[0]] if missing else ("an audio folder" if audio_dir is None else "a frames folder")
            raise DataError(f"{root} does not have the {cls.name} layout: no {what} (expected {cls.layout})")
        parsed = {
            split: cls.parse(read_numbered_rows(root / file, cls.delimiter), root / file)
            for split, file in cls.lists.items()
            if (root / file).is_file()
        }
        index = cls.classes([label for pairs in parsed.values() for _, label, _ in pairs], options)
        splits: dict[str, list[dict]] = {}
        for split, pairs in parsed.items():
            source = root / cls.lists[split]
            splits[split] = [
                {
                    "audio": str(inside_root(root, clip, source, line, audio_dir)),
                    "frames": str(inside_root(root, clip, source, line, frame_dir)),
                    "label": index[label],
                    "clip": clip,
                }
                for clip, label, line in pairs
            ]
        splits = cls.regroup(splits, options, config)
        spectrogram = Spectrogram(
            "audio", options.sample_rate, options.audio_seconds, options.n_fft, options.hop_length
        )
        frames = FramesReader("frames", options.frames, options.image_size)
        readers = {"audio": spectrogram, "visual": frames}
        return bundle_from_records(
            config,
            cls.name,
            splits,
            readers,
            {"audio": spectrogram.probe, "visual": frames.probe},
            {"audio": spectrogram.shape, "visual": frames.shape},
            sorted(index, key=index.get),
            {"root": str(root), "audio_dir": audio_dir.name, "frame_dir": frame_dir.name},
        )


CREMAD_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # OGM-GE's order


SPEAKER_TEST_SEED = 20_240_601  # the speaker-disjoint test set is one fixed set, the same for every run


def emotion_of(clip: str) -> str:
    parts = clip.split("_")
    return parts[2] if len(parts) > 2 else ""


def speaker_of(clip: str) -> str:
    """The actor of a CREMA-D clip id (``1001`` in ``1001_DFA_ANG_XX``)."""
    return clip.split("_")[0]


def speaker_split(records: list[dict], test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Train/val/test with every actor in exactly one split.

    The test actors are drawn once with a fixed seed (so test is the same set
    for every run, like an official list); the validation actors are drawn
    from the rest with ``seed`` (``data.split_seed``). Each split keeps the
    order of ``records``.
    """
    speakers = sorted({speaker_of(r["clip"]) for r in records})
    if len(speakers) < 3:
        raise DataError(f"cremad.split=speaker needs at least 3 actors, the lists have {len(speakers)}")

    def draw(pool: list[str], fraction: float, generator_seed: int) -> set[str]:
        count = min(max(1, round(fraction * len(pool))), len(pool) - 1)
        order = np.random.default_rng(generator_seed).permutation(len(pool))
        return {pool[k] for k in order[:count]}

    test = draw(speakers, test_fraction, SPEAKER_TEST_SEED)
    rest = [s for s in speakers if s not in test]
    val = draw(rest, val_fraction, seed)
    where = {s: "test" if s in test else "val" if s in val else "train" for s in speakers}
    return {split: [r for r in records if where[speaker_of(r["clip"])] == split] for split in ("train", "val", "test")}


@DATASETS.register("cremad")
class CremaD(AudioVisualBenchmark):
    """CREMA-D: 7,442 acted clips, 6 emotions, audio + frames (OGM-GE layout).

    Layout under ``data.root``::

        train.csv, test.csv       rows  clip_id,EMOTION  (e.g. 1001_DFA_ANG_XX,ANG; EMOTION in
                                  NEU HAP SAD FEA DIS ANG; a header row is allowed; a row of just
                                  clip_id takes the emotion from the id; optional val.csv)
        AudioWAV/<clip_id>.wav    (or audio/<clip_id>.{wav,npy}; .npy: a precomputed (257, T) spectrogram)
        Image-01-FPS/<clip_id>/*.jpg   (or frames/<clip_id>/, visual/<clip_id>/)

    Without val.csv, a stratified ``data.val_fraction`` of train (seeded by
    ``data.split_seed``) is the validation split; test stays official.
    ``cremad.split=speaker`` pools the lists and splits by actor instead (the
    shipped lists put every actor in both train and test): a fixed
    ``cremad.test_speakers`` fraction of the actors is test, a seeded
    ``data.val_fraction`` of the others validation.
    Audio: 22,050 Hz, 3 s, n_fft 512, hop 353 -> (1, 257, 188), as OGM-GE.
    """

    name = "cremad"
    lists = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
    audio_dirs = ("AudioWAV", "audio")
    frame_dirs = ("Image-01-FPS", "frames", "visual")
    layout = (
        "ROOT/{train,test}.csv with rows clip_id,EMOTION, ROOT/AudioWAV/<clip_id>.wav "
        "and ROOT/Image-01-FPS/<clip_id>/*.jpg"
    )

    class Config(AudioVisualConfig):
        frames: int = Field(1, ge=1, description="frames per clip, evenly spaced")
        sample_rate: int = Field(22050, ge=1000, description="audio is resampled to this rate (Hz)")
        audio_seconds: float = Field(3.0, gt=0, description="audio is repeated or cut to this length")
        hop_length: int = Field(353, ge=1, description="STFT hop; frames = 1 + samples // hop_length")
        split: Literal["lists", "speaker"] = Field(
            "lists", description="lists: the shipped train/test lists (every actor in both); speaker: actors disjoint across train, val and test"
        )
        test_speakers: float = Field(0.1, gt=0, lt=1, description="split=speaker: fraction of the actors held out as test (one fixed set)")

    @classmethod
    def regroup(cls, splits, options, config):
        if options.split == "lists":
            return splits
        pooled = [r for split in ("train", "val", "test") for r in splits.get(split, [])]
        return speaker_split(pooled, options.test_speakers, config.data.val_fraction, split_seed(config))

    @classmethod
    def parse(cls, rows, path):
        # A one-column list is allowed: the emotion is the third field of the clip id (1001_DFA_ANG_XX).
        rows = [(n, row if len(row) >= 2 else [row[0], emotion_of(row[0])]) for n, row in rows]
        pairs = super().parse(rows, path)
        for clip, label, _ in pairs:
            if label not in CREMAD_CLASSES:
                raise DataError(f"{path}: clip {clip} has label {label!r} (allowed: {', '.join(CREMAD_CLASSES)})")
        return pairs

    @classmethod
    def classes(cls, names, options):
        return {name: k for k, name in enumerate(CREMAD_CLASSES)}


@DATASETS.register("ave")
class AVE(AudioVisualBenchmark):
    """AVE (Audio-Visual Event): 4,143 ten-second clips, 28 event classes, audio + frames.

    Layout under ``data.root`` (the AVE release plus OGM-GE's extraction)::

        trainSet.txt, valSet.txt, testSet.txt   rows  Category&VideoID&Quality&StartTime&EndTime
                                                (a header row is allowed)
        Audio-1004-SE/<VideoID>.{wav,npy}   (or audio/...; .npy: a (257, T) spectrogram)
        Image-01-FPS/<VideoID>/*.jpg            (or frames/<VideoID>/, visual/<VideoID>/)

    The official train/val/test lists are kept. Classes are the sorted
    categories; ``ave.num_classes`` (28) is checked. Audio: 16 kHz, 10 s,
    n_fft 512, hop 160 -> (1, 257, 1001).
    """

    name = "ave"
    lists = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
    delimiter = "&"
    audio_dirs = ("Audio-1004-SE", "audio")
    frame_dirs = ("Image-01-FPS", "frames", "visual")
    layout = (
        "ROOT/{trainSet,valSet,testSet}.txt with rows Category&VideoID&Quality&Start&End, "
        "ROOT/Audio-1004-SE/<VideoID>.{wav,npy} and ROOT/Image-01-FPS/<VideoID>/*.jpg"
    )

    class Config(AudioVisualConfig):
        num_classes: Optional[int] = Field(28, ge=2, description="expected number of categories; null accepts any")

    @classmethod
    def parse(cls, rows, path):
        pairs = []
        for number, row in rows:
            if len(row) < 2 or not row[1]:
                raise DataError(f"{path} line {number} is not 'Category&VideoID&...' (expected {cls.layout})")
            if row[1] == "VideoID":
                continue
            pairs.append((row[1], row[0], number))
        return pairs


@DATASETS.register("kinetics_sounds")
class KineticsSounds(AudioVisualBenchmark):
    """Kinetics-Sounds: the 31 Kinetics classes that can be heard, audio + frames.

    Layout under ``data.root``::

        train.csv, test.csv       rows  clip_id,class name  (a header row is allowed; optional val.csv)
        audio/<clip_id>.{wav,npy}
        frames/<clip_id>/*.jpg    (or visual/<clip_id>/, Image-01-FPS/<clip_id>/)

    Classes are the sorted names; ``kinetics_sounds.num_classes`` (31) is
    checked. Without val.csv a stratified part of train is validation.
    Audio: 16 kHz, 10 s, n_fft 512, hop 160 -> (1, 257, 1001).
    """

    name = "kinetics_sounds"
    lists = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
    audio_dirs = ("audio",)
    frame_dirs = ("frames", "visual", "Image-01-FPS")
    layout = (
        "ROOT/{train,test}.csv with rows clip_id,class, ROOT/audio/<clip_id>.{wav,npy} "
        "and ROOT/frames/<clip_id>/*.jpg"
    )

    class Config(AudioVisualConfig):
        num_classes: Optional[int] = Field(31, ge=2, description="expected number of classes; null accepts any")
