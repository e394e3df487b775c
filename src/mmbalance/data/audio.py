"""Audio helpers: WAV reading and fixed-size log-magnitude spectrograms.

Models need every sample of a modality to have one shape, so clips are
padded or cropped to a fixed number of samples before the short-time
Fourier transform; the log compresses the magnitudes' large dynamic range
so that quiet consonants are not drowned by loud vowels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..extras import require

LOG_FLOOR = 1e-5  # keeps log() finite on silence (the zero padding)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate; channels are averaged."""
    soundfile = require("soundfile", extra="audio", feature="reading .wav audio")  # an extra: only audio data needs it

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises its own error types, varying by version
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read WAV file {path}: {reason}") from None
    if samples.shape[0] == 0:
        raise DataError(f"WAV file {path} has no samples")
    return samples.mean(axis=1), int(rate)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad a short clip at its end; crop a long one around its middle, where the speech is."""
    if samples.shape[0] >= length:
        start = (samples.shape[0] - length) // 2
        return samples[start : start + length]
    return np.pad(samples, (0, length - samples.shape[0]))


def log_spectrograms(waves: Tensor, n_fft: int, hop: int, bands: int | None = None) -> Tensor:
    """``(N, L)`` waveforms -> ``(N, bins, 1 + L // hop)`` log-magnitude spectrograms (Hann window).

    ``bins`` is ``n_fft // 2 + 1``, or ``bands`` when given: the magnitudes
    of adjacent frequency bins are then averaged into that many equal bands,
    a coarser picture that is much cheaper for a convolutional encoder.
    """
    window = torch.hann_window(n_fft, dtype=waves.dtype)
    spectrum = torch.stft(waves, n_fft, hop_length=hop, window=window, center=True, return_complex=True)
    magnitude = spectrum.abs()
    if bands is not None and bands < magnitude.shape[1]:
        magnitude = F.adaptive_avg_pool1d(magnitude.transpose(1, 2), bands).transpose(1, 2)
    return torch.log(magnitude + LOG_FLOOR)
