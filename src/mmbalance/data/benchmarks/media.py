"""Turning media files into tensors: spectrograms, frame stacks, images.

Readers are small picklable objects (so ``train.num_workers > 0`` works);
each has ``__call__(record) -> Tensor`` that decodes and ``probe(record)``
that only checks the file is there and its header parses. Every failure is a
``DataError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ...errors import DataError
from ...extras import require

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUDIO_SUFFIXES = (".wav", ".npy")
PICKLE_CACHE = (
    "is a pickled spectrogram, which mmbalance never loads (unpickling can run code); caches are .npy now: "
    "re-run `mmbalance data prepare`, or save each array with numpy.save"
)
LOG_FLOOR = 1e-7


def _soundfile():
    """The WAV decoder, an extra: cached spectrograms (.npy) and images need none."""
    return require("soundfile", extra="audio", feature="reading .wav audio")


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# -- audio --------------------------------------------------------------------
class Spectrogram:
    """Log-magnitude STFT of a fixed-length clip, shape ``(1, n_fft // 2 + 1, frames)``.

    A waveform is averaged to mono, linearly resampled to ``sample_rate``,
    repeated (if short) and cut to ``seconds``, then transformed with
    ``torch.stft`` (Hann window of ``n_fft``, ``hop_length``, centred) and
    ``log(|X| + 1e-7)``, as in OGM-GE's preprocessing. A precomputed
    spectrogram (``.npy``, shape ``(F, T)`` with the same F) is used as it
    is, cut or zero-padded to the same number of frames. ``record[key]`` is
    the path without suffix; ``.wav`` then ``.npy`` are tried. A ``.pkl``
    cache is refused, never unpickled: a pickle in a data folder could run
    code, and ``.npy`` is read without pickle (``allow_pickle=False``).
    """

    def __init__(self, key: str = "audio", sample_rate: int = 16000, seconds: float = 3.0,
                 n_fft: int = 512, hop_length: int = 353):
        self.key = key
        self.sample_rate = sample_rate
        self.samples = int(round(sample_rate * seconds))
        self.n_fft = n_fft
        self.hop_length = hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.n_fft // 2 + 1, 1 + self.samples // self.hop_length)

    def locate(self, record: dict) -> Path:
        base = Path(record[self.key])
        for suffix in AUDIO_SUFFIXES:
            path = base.with_name(base.name + suffix)
            if path.is_file():
                return path
        stale = base.with_name(base.name + ".pkl")
        if stale.is_file():
            raise DataError(f"audio file {stale} {PICKLE_CACHE}")
        raise DataError(f"audio file not found: {base}{{{','.join(AUDIO_SUFFIXES)}}}")

    def probe(self, record: dict) -> None:
        path = self.locate(record)
        soundfile = _soundfile() if path.suffix == ".wav" else None  # a missing extra is not a bad file
        try:
            if soundfile is not None:
                soundfile.info(str(path))
            else:
                self._precomputed(path)  # memory-mapped: reads the header, checks the shape
        except DataError:
            raise
        except Exception as exc:  # every decoder error means the same thing: an unreadable file
            raise DataError(f"cannot read audio file {path}: {_reason(exc)}") from None

    def __call__(self, record: dict) -> torch.Tensor:
        path = self.locate(record)
        if path.suffix == ".wav":
            spec = self.from_waveform(self._waveform(path))
        else:
            spec = self._fit_frames(self._precomputed(path), path)
        return spec.unsqueeze(0)

    def _waveform(self, path: Path) -> torch.Tensor:
        soundfile = _soundfile()
        try:
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:
            raise DataError(f"cannot read audio file {path}: {_reason(exc)}") from None
        if data.shape[0] == 0:
            raise DataError(f"audio file {path} has no samples")
        wave = torch.from_numpy(data.mean(axis=1))
        if rate != self.sample_rate:
            length = max(1, int(round(wave.shape[0] * self.sample_rate / rate)))
            wave = torch.nn.functional.interpolate(wave[None, None], size=length, mode="linear", align_corners=False)
            wave = wave[0, 0]
        return wave

    def from_waveform(self, wave: torch.Tensor) -> torch.Tensor:
        repeats = -(-self.samples // wave.shape[0])
        wave = wave.repeat(repeats)[: self.samples]
        window = torch.hann_window(self.n_fft)
        stft = torch.stft(wave, self.n_fft, self.hop_length, window=window, center=True, return_complex=True)
        return torch.log(stft.abs() + LOG_FLOOR)

    def _precomputed(self, path: Path) -> np.ndarray:
        """The cached array, memory-mapped so that a huge declared shape is checked, not allocated."""
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(f"cannot read audio file {path}: {_reason(exc)}") from None
        freqs = self.n_fft // 2 + 1
        if array.ndim != 2 or array.shape[0] != freqs:
            raise DataError(
                f"spectrogram {path} has shape {array.shape}, expected ({freqs}, frames) for n_fft={self.n_fft}"
            )
        if array.dtype.kind not in "biuf":
            raise DataError(f"spectrogram {path} has dtype {array.dtype}, expected numbers")
        return array

    def _fit_frames(self, array: np.ndarray, path: Path) -> torch.Tensor:
        frames = self.shape[2]
        spec = torch.as_tensor(np.nan_to_num(np.array(array[:, :frames], dtype=np.float32)))
        if spec.shape[1] < frames:
            spec = torch.nn.functional.pad(spec, (0, frames - spec.shape[1]))
        return spec


# -- images -------------------------------------------------------------------
def read_image(path: Path, mode: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Pixels as float32 ``(H, W, C)`` in [0, 1]; ``size`` is an int (square) or (width, height)."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size) if isinstance(size, int) else size, Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image file {path}: {_reason(exc)}") from None
    return array.reshape(array.shape[0], array.shape[1], -1)


def probe_image(path: Path) -> None:
    """The file exists and Pillow recognises its header."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (header only)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image file {path}: {_reason(exc)}") from None


def normalise_rgb(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` in [0, 1] -> ImageNet-normalised ``(3, H, W)``."""
    return torch.from_numpy(((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


def normalise_gray(array: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` in [0, 1] -> ``(C, H, W)`` in [-1, 1]."""
    return torch.from_numpy(((array - 0.5) / 0.5).transpose(2, 0, 1).copy())


class ImageReader:
    """One image, resized to ``size`` x ``size``: RGB ``(3, H, W)`` ImageNet-normalised, or gray ``(1, H, W)``."""

    def __init__(self, key: str, size: int, mode: str = "RGB"):
        self.key, self.size, self.mode = key, size, mode

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3 if self.mode == "RGB" else 1, self.size, self.size)

    def probe(self, record: dict) -> None:
        probe_image(Path(record[self.key]))

    def __call__(self, record: dict) -> torch.Tensor:
        array = read_image(Path(record[self.key]), self.mode, self.size)
        return normalise_rgb(array) if self.mode == "RGB" else normalise_gray(array)


# -- frame folders ------------------------------------------------------------
def pick_frames(folder: Path, count: int) -> list[Path]:
    """``count`` evenly spaced images of a folder (sorted by name), repeating when there are fewer."""
    if not folder.is_dir():
        raise DataError(f"frame folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"frame folder {folder} has no .jpg/.jpeg/.png images")
    positions = np.linspace(0, len(images) - 1, count).round().astype(int)
    return [images[k] for k in positions]


class FramesReader:
    """``frames`` images of the folder ``record[key]``, evenly spaced in time, as ``(T, 3, size, size)``.

    Frames are resized with Pillow (bilinear) and ImageNet-normalised.
    Evenly spaced (not random) frames keep evaluation deterministic.
    """

    def __init__(self, key: str, frames: int, size: int):
        self.key, self.frames, self.size = key, frames, size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.frames, 3, self.size, self.size)

    def probe(self, record: dict) -> None:
        for path in pick_frames(Path(record[self.key]), self.frames):
            probe_image(path)

    def __call__(self, record: dict) -> torch.Tensor:
        paths = pick_frames(Path(record[self.key]), self.frames)
        return torch.stack([normalise_rgb(read_image(p, "RGB", self.size)) for p in paths])
