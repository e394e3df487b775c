"""Audio-visual digits: a spoken digit paired with a picture of the same digit.

Built the way AV-MNIST is: the audio is the Free Spoken Digit Dataset
(FSDD; WAVs named ``{digit}_{speaker}_{take}.wav``, 8 kHz mono, CC BY-SA
4.0), the image a real handwritten digit of the same label from
scikit-learn's bundled 8x8 digits (UCI optical digits; no download). The two
modalities share nothing but the label, so a model must learn each one.

Splits follow FSDD's own rule: takes 0-4 of every speaker and digit are the
test set; validation is carved from the rest, stratified and seeded. The
image pool is split into disjoint train, validation and test parts before
pairing, so no test image is ever seen in training. ``data.test_fraction``
is therefore not used.

Audio: each clip is padded (at its end) or cropped (around its middle) to
``clip_seconds``, then turned into a log-magnitude spectrogram with a Hann
window of ``n_fft`` samples and a hop of ``hop`` samples, its frequency bins
averaged into ``bands`` bands, each band standardised with train statistics.
The defaults (1 s, 256, 256, 32 bands) give a ``(1, 32, 32)`` input of 32 ms
frames, cheap enough for a CPU.
Spectrograms are computed once per process and kept in memory (reading and
transforming all 3,000 files takes a few seconds, so no disk cache is kept).

The imbalance is set by the knobs in ``Config``: image resolution and
noise make the picture harder to read, ``audio_noise`` the sound. The
picture is learned within an epoch or two, the sound much more slowly, so
joint training leaves the audio encoder under-trained. The default image
noise (0.5) makes the picture the weaker modality alone, so that this
under-use costs accuracy (clean pictures alone are ~98 % accurate, leaving
a joint model nothing to gain from the audio); the figures are in
docs/results.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Section
from ..errors import DataError
from ..extras import require
from ..registry import DATASETS
from .audio import fit_length, log_spectrograms, read_wav
from .base import DataBundle, select_views
from .loading import data_root, split_seed
from .splits import stratified_split
from .standardise import standardise

SAMPLE_RATE = 8000
TEST_TAKES = 5  # FSDD's split: takes 0..4 of each speaker and digit are the test set
NUM_CLASSES = 10
FILE_PATTERN = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[A-Za-z0-9-]+)_(?P<take>[0-9]+)\.wav$")
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
MODALITIES = ("audio", "image")
CACHE_ENTRIES = 4


@dataclass
class Recordings:
    """The readable FSDD clips of a folder, as unstandardised log spectrograms."""

    spectrograms: torch.Tensor  # (N, F, T)
    labels: np.ndarray
    takes: np.ndarray
    skipped: list[str] = field(default_factory=list)


_CACHE: dict[tuple, Recordings] = {}


def list_recordings(root: Path, speakers: Optional[list[str]], max_takes: Optional[int]) -> list[Path]:
    """The WAV files of ``root`` that the options select, in a stable order."""
    if not root.is_dir():
        raise DataError(
            f"FSDD recordings not found in {root}; get the Free Spoken Digit Dataset from {FSDD_URL} "
            "and set data.root to its recordings folder (--set data.root=PATH/recordings)"
        )
    files = sorted(p for p in root.iterdir() if p.suffix.lower() == ".wav")
    chosen = []
    for path in files:
        match = FILE_PATTERN.match(path.name)
        if match:  # a badly named file is kept here and reported when read
            if speakers is not None and match["speaker"] not in speakers:
                continue
            if max_takes is not None and int(match["take"]) >= max_takes:
                continue
        chosen.append(path)
    if not chosen:
        raise DataError(
            f"no FSDD recordings ({{digit}}_{{speaker}}_{{take}}.wav) selected in {root}; "
            "check data.root and avdigits.speakers"
        )
    return chosen


def read_recordings(
    files: list[Path], clip_samples: int, n_fft: int, hop: int, bands: Optional[int], skip_bad: bool
) -> Recordings:
    """Read and transform ``files``, cached per process on their identity and the parameters."""
    stats = [p.stat() for p in files]  # a rewritten file gets a new key, so the cache never serves stale data
    identity = tuple((str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in zip(files, stats))
    key = (identity, clip_samples, n_fft, hop, bands, skip_bad)
    if key in _CACHE:
        return _CACHE[key]
    waves, labels, takes, skipped = [], [], [], []
    for path in files:
        try:
            match = FILE_PATTERN.match(path.name)
            if not match:
                raise DataError(f"{path} is not named {{digit}}_{{speaker}}_{{take}}.wav")
            samples, rate = read_wav(path)
            if rate != SAMPLE_RATE:
                raise DataError(f"WAV file {path} has a sample rate of {rate} Hz, expected {SAMPLE_RATE}")
        except DataError:
            if not skip_bad:
                raise
            skipped.append(path.name)
            continue
        waves.append(fit_length(samples, clip_samples))
        labels.append(int(match["digit"]))
        takes.append(int(match["take"]))
    if not waves:
        raise DataError(f"none of the {len(files)} selected FSDD files could be read")
    spectrograms = log_spectrograms(torch.from_numpy(np.stack(waves)), n_fft, hop, bands)
    result = Recordings(spectrograms, np.array(labels), np.array(takes), skipped)
    if len(_CACHE) >= CACHE_ENTRIES:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = result
    return result


def digit_images(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(N, 1, size, size)`` in [0, 1]; a smaller size averages pixels."""
    sklearn_datasets = require("sklearn.datasets", extra="avdigits", feature="avdigits")

    digits = sklearn_datasets.load_digits()  # bundled with scikit-learn, read from disk
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.adaptive_avg_pool2d(images, size)
    return images, digits.target.astype(np.int64)


def pair_images(
    audio_labels: np.ndarray, pool: np.ndarray, image_labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each audio sample, an image of its label from ``pool``; each image is used as evenly as possible."""
    chosen = np.empty(len(audio_labels), dtype=np.int64)
    for digit in np.unique(audio_labels):
        rows = np.flatnonzero(audio_labels == digit)
        candidates = pool[image_labels[pool] == digit]
        if candidates.size == 0:
            raise DataError(
                f"no image of digit {digit} left in a split's image pool; lower avdigits.image_test_fraction"
            )
        rounds = math.ceil(len(rows) / len(candidates))
        draw = np.concatenate([rng.permutation(candidates) for _ in range(rounds)])
        chosen[rows] = draw[: len(rows)]
    return chosen


def seeded_noise(shape: torch.Size, seed: int) -> torch.Tensor:
    """Standard Gaussian noise drawn once at load: a fixed corruption, the same in every epoch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@DATASETS.register("avdigits")
class AVDigitsDataset:
    """Spoken digits (FSDD spectrograms) paired with 8x8 digit images of the same label."""

    class Config(Section):
        clip_seconds: float = Field(1.0, gt=0, le=5, description="clip length (s); shorter are zero-padded")
        n_fft: int = Field(256, ge=16, le=4096, description="STFT window in samples (256 = 32 ms at 8 kHz)")
        hop: int = Field(256, ge=1, description="STFT hop in samples (256 = 32 ms: frames do not overlap)")
        bands: Optional[int] = Field(
            32, ge=2, description="frequency bins averaged into this many bands; null keeps all n_fft // 2 + 1"
        )
        audio_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the standardised spectrogram")
        image_size: int = Field(8, ge=1, le=8, description="image side; below 8, pixels are averaged (blurrier)")
        image_noise: float = Field(0.5, ge=0, description="std of Gaussian noise on the [0, 1] image")
        image_test_fraction: float = Field(0.3, gt=0, lt=0.6, description="share of the image pool kept for test")
        speakers: Optional[list[str]] = Field(None, description="only these speakers (all when unset)")
        max_takes: Optional[int] = Field(
            None, ge=TEST_TAKES + 2, description="only takes 0..N-1 of each speaker and digit (a small, fast subset)"
        )

    defaults = {"train.epochs": 10}

    @classmethod
    def load(cls, config) -> DataBundle:
        for module in ("soundfile", "sklearn"):  # extras: FSDD's WAV files, scikit-learn's digit images
            require(module, extra="avdigits", feature="avdigits")
        options = config.section("avdigits")
        views = select_views(dict.fromkeys(MODALITIES), config.data.views, "avdigits")
        root = data_root(config, "fsdd")
        files = list_recordings(root, options.speakers, options.max_takes)
        clip = int(round(options.clip_seconds * SAMPLE_RATE))
        skip_bad = config.data.on_error == "skip"
        audio = read_recordings(files, clip, options.n_fft, options.hop, options.bands, skip_bad)
        seed = split_seed(config)
        rng = np.random.default_rng(seed)

        labels = audio.labels
        test = np.flatnonzero(audio.takes < TEST_TAKES)
        rest = np.flatnonzero(audio.takes >= TEST_TAKES)
        val_part, train_part = stratified_split(labels[rest], (config.data.val_fraction,), seed)
        val, train = rest[val_part], rest[train_part]

        images, image_labels = digit_images(options.image_size)
        image_val, image_test, image_train = stratified_split(
            image_labels, (config.data.val_fraction, options.image_test_fraction), seed
        )
        paired = np.empty(len(labels), dtype=np.int64)
        for rows, pool in ((train, image_train), (val, image_val), (test, image_test)):
            paired[rows] = pair_images(labels[rows], pool, image_labels, rng)

        picture = images[torch.from_numpy(paired)]
        picture = picture + options.image_noise * seeded_noise(picture.shape, seed)
        # each frequency band on its own, so quiet high bands count as much as loud low ones; the sample
        # spread (ddof=1) these inputs have always had
        sound = standardise(audio.spectrograms, train, per_channel=True, ddof=1).unsqueeze(1)
        sound = sound + options.audio_noise * seeded_noise(sound.shape, seed + 1)
        image = standardise(picture, train, per_channel=False, ddof=1)
        tensors = {"audio": sound.float().contiguous(), "image": image.float().contiguous()}
        tensors = {m: tensors[m] for m in views}
        return DataBundle.from_tensors(
            tensors,
            torch.from_numpy(labels),
            (train, val, test),
            NUM_CLASSES,
            class_names=[str(digit) for digit in range(NUM_CLASSES)],
            info={
                "root": str(root),
                "recordings": int(len(labels)),
                "skipped_files": len(audio.skipped),
                "skipped": audio.skipped[:20],
                "image_pool": {"train": len(image_train), "val": len(image_val), "test": len(image_test)},
            },
        )
