"""``mmbalance data prepare``: raw audio-visual clips -> the folder layout the loaders read.

Decoding a video or a WAV every epoch costs more than the ResNet step on a
small machine, so this does it once: frames are extracted to JPEG folders
(ffmpeg), the soundtrack to a 16-bit mono WAV at the loader's sample rate,
and the loader's own ``Spectrogram`` is cached as ``.npy``. The loader then
reads the cached array as it is, so training sees the same tensor it would
have computed from the WAV.

Raw layout (``--raw DIR``), any of the media folders may be absent::

    videos/<clip_id>.{mp4,avi,flv,mkv,webm,mov}   (or video/, VideoFlash/, AVE/)
    audio/<clip_id>.wav                           (or wav/, AudioWAV/, Audio-1004-SE/; wins over
                                                   the video's soundtrack)
    frames/<clip_id>/*.jpg                        (or Image-01-FPS/, visual/; copied instead of
                                                   extracting frames from the video)
    the loader's list files (cremad: train.csv, test.csv[, val.csv]; ave: trainSet.txt,
    valSet.txt, testSet.txt; kinetics_sounds: train.csv, test.csv[, val.csv]), copied.
    cremad only: without lists, train.csv/test.csv are written from the emotion in each
    clip id (a stratified, seeded --test-fraction is test).

Output (``--out DIR``)::

    audio/<clip_id>.npy          the cached (F, T) spectrogram (no WAV beside it, so the loader uses it)
    <frames folder>/<clip_id>/   Image-01-FPS/ for cremad and ave, frames/ for kinetics_sounds
    wav/<clip_id>.wav            the soundtrack extracted from a video (not read by the loader)
    the list files, and prepare.json (the spectrogram options the cache was computed with)

Every file and frame folder is written under a temporary name and renamed,
so a killed run leaves nothing torn and a rerun skips what is complete.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import build_config
from ..errors import DataError, MMBalanceError
from ..registry import unknown_name_message
from ..files import atomic_write_bytes, atomic_write_text
from .benchmarks.audiovisual import AVE, CREMAD_CLASSES, AudioVisualBenchmark, CremaD, KineticsSounds, emotion_of
from .benchmarks.media import IMAGE_SUFFIXES, Spectrogram
from .splits import stratified_split

PREPARABLE: dict[str, type[AudioVisualBenchmark]] = {"cremad": CremaD, "ave": AVE, "kinetics_sounds": KineticsSounds}
RAW_VIDEO_DIRS = ("videos", "video", "VideoFlash", "AVE")
RAW_WAV_DIRS = ("audio", "wav", "AudioWAV", "Audio-1004-SE")
RAW_FRAME_DIRS = ("frames", "Image-01-FPS", "visual")
VIDEO_SUFFIXES = (".mp4", ".avi", ".flv", ".mkv", ".webm", ".mov")
SPECTROGRAM_DIR = "audio"  # an audio folder every audio-visual loader accepts
WAV_DIR = "wav"  # no loader reads it: a WAV beside the .npy would win over the cache
MANIFEST = "prepare.json"
SPECTROGRAM_OPTIONS = ("sample_rate", "audio_seconds", "n_fft", "hop_length")
FFMPEG_MISSING = (
    "ffmpeg is needed to extract frames from videos; install it (e.g. apt-get install ffmpeg) "
    "or provide frames as JPEG folders"
)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def benchmark_of(name: str) -> type[AudioVisualBenchmark]:
    if name not in PREPARABLE:
        raise MMBalanceError(unknown_name_message("preparable dataset", name, list(PREPARABLE)))
    return PREPARABLE[name]


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def find_raw_media(raw: Path) -> dict[str, dict[str, Path]]:
    """``{clip_id: {"video"|"wav"|"frames": path}}`` for every clip with some raw media."""
    clips: dict[str, dict[str, Path]] = {}
    found = {
        "video": (RAW_VIDEO_DIRS, lambda p: p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES),
        "wav": (RAW_WAV_DIRS, lambda p: p.is_file() and p.suffix.lower() == ".wav"),
        "frames": (RAW_FRAME_DIRS, lambda p: p.is_dir() and not p.name.startswith(".")),
    }
    for kind, (names, accept) in found.items():
        folder = _first_dir(raw, names)
        if folder is None:
            continue
        for path in sorted(folder.iterdir()):
            if accept(path):
                clips.setdefault(path.stem if kind != "frames" else path.name, {})[kind] = path
    return clips


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _run_ffmpeg(args: list[str], clip: str) -> None:
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DataError(f"ffmpeg failed on clip {clip}: {reason}")


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then rename it: the target is complete or absent."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if not _has_images(tmp):
            raise DataError(f"no frames were produced for clip {target.name}")
        if target.exists():  # an empty or broken leftover: replaced, never merged
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _copy_images(source: Path) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        for image in sorted(source.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                shutil.copy2(image, tmp / image.name)
    return fill


def _extract_frames(video: Path, fps: float, clip: str) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        _run_ffmpeg(["-i", str(video), "-vf", f"fps={fps}", "-q:v", "2", str(tmp / "%05d.jpg")], clip)
    return fill


def _extract_wav(video: Path, target: Path, sample_rate: int, clip: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        _run_ffmpeg(["-i", str(video), "-vn", "-ac", "1", "-ar", str(sample_rate), "-acodec", "pcm_s16le",
                     "-f", "wav", str(tmp)], clip)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_leftovers(folders: list[Path]) -> None:
    """Temporaries of a killed run: never complete, so never kept."""
    for folder in folders:
        for path in folder.glob(".*.tmp") if folder.is_dir() else ():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, lambda handle: np.save(handle, array, allow_pickle=False))


def write_lists(benchmark: type[AudioVisualBenchmark], raw: Path, out: Path, clips: list[str],
                test_fraction: float, seed: int) -> list[str]:
    """Copy the loader's list files from ``raw``; for CREMA-D, derive them from the clip ids if absent."""
    copied = []
    for file in dict.fromkeys(benchmark.lists.values()):
        if (raw / file).is_file():
            atomic_write_bytes(out / file, lambda handle, f=file: handle.write((raw / f).read_bytes()))
            copied.append(file)
    if copied:
        return copied
    if benchmark is not CremaD:
        wanted = ", ".join(n for s, n in benchmark.lists.items() if s != "val")
        raise DataError(f"{raw} has no {benchmark.name} list files ({wanted}); copy them there first")
    labelled = [c for c in clips if emotion_of(c) in CREMAD_CLASSES]
    if not labelled:
        raise DataError(f"no clip id in {raw} names a CREMA-D emotion (e.g. 1001_DFA_ANG_XX)")
    labels = np.array([CREMAD_CLASSES.index(emotion_of(c)) for c in labelled])
    test, train = stratified_split(labels, (test_fraction,), seed)
    for file, rows in (("train.csv", train), ("test.csv", test)):
        atomic_write_text(out / file, "".join(f"{labelled[k]},{emotion_of(labelled[k])}\n" for k in sorted(rows)))
    return ["train.csv", "test.csv"]


def _check_manifest(out: Path, name: str, options: dict) -> None:
    """Refuse to resume into a cache computed with other spectrogram options: it would be silently wrong."""
    path = out / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("dataset") != name or previous.get("spectrogram") != options:
            raise MMBalanceError(
                f"{out} was prepared for {previous.get('dataset')} with spectrogram options "
                f"{previous.get('spectrogram')}, not {options}; use another --out"
            )
    atomic_write_text(path, json.dumps({"dataset": name, "spectrogram": options}, indent=2) + "\n")


def prepare(name: str, raw: Path, out: Path, overrides: list[str] | None = None, fps: float = 1.0,
            test_fraction: float = 0.1, seed: int = 0, log: Callable[[str], None] | None = _stderr) -> dict:
    """Prepare ``out`` from ``raw`` (see the module docstring); returns counts of what was done."""
    benchmark = benchmark_of(name)
    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    log = log or (lambda text: None)
    if not raw.is_dir():
        raise DataError(f"raw folder not found: {raw}")
    if out.resolve() == raw.resolve():
        raise MMBalanceError("--out must differ from --raw (the prepared audio folder would mix with raw WAVs)")
    options = build_config(overrides=[f"data.root={out}", *(overrides or [])], dataset=name).section(name)
    spectrogram = Spectrogram("audio", options.sample_rate, options.audio_seconds, options.n_fft, options.hop_length)
    media = find_raw_media(raw)
    if not media:
        raise DataError(f"{raw} has no clips (expected videos/<clip>.mp4, audio/<clip>.wav or frames/<clip>/)")
    needs_ffmpeg = any("video" in m and ("frames" not in m or "wav" not in m) for m in media.values())
    if needs_ffmpeg and shutil.which("ffmpeg") is None:
        raise MMBalanceError(FFMPEG_MISSING)

    frames_root, spec_root, wav_root = out / benchmark.frame_dirs[0], out / SPECTROGRAM_DIR, out / WAV_DIR
    for folder in (frames_root, spec_root):
        folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers([frames_root, spec_root, wav_root, out])
    _check_manifest(out, name, {k: getattr(options, k) for k in SPECTROGRAM_OPTIONS})
    lists = write_lists(benchmark, raw, out, sorted(media), test_fraction, seed)

    counts = {"clips": len(media), "written": 0, "skipped": 0, "failed": 0, "lists": lists}
    failures: list[str] = []
    for k, (clip, sources) in enumerate(sorted(media.items()), start=1):
        done = []
        try:
            frames = frames_root / clip
            if not _has_images(frames) and ("frames" in sources or "video" in sources):
                fill = (_copy_images(sources["frames"]) if "frames" in sources
                        else _extract_frames(sources["video"], fps, clip))
                _atomic_dir(frames, fill)
                done.append("frames")
            wav = sources.get("wav")
            if wav is None and "video" in sources:
                wav = wav_root / f"{clip}.wav"
                if not wav.is_file():
                    wav_root.mkdir(exist_ok=True)
                    _extract_wav(sources["video"], wav, options.sample_rate, clip)
                    done.append("wav")
            npy = spec_root / f"{clip}.npy"
            if wav is not None and not npy.is_file():
                # The loader's own reader on the WAV: the cache is exactly what it would compute.
                _save_npy(npy, spectrogram({"audio": str(wav.with_suffix(""))})[0].numpy())
                done.append("spectrogram")
        except DataError as exc:
            counts["failed"] += 1
            failures.append(str(exc))
            log(f"[prepare {name}] clip {k}/{len(media)} {clip}: failed: {exc}")
            continue
        counts["written" if done else "skipped"] += 1
        log(f"[prepare {name}] clip {k}/{len(media)} {clip}: {', '.join(done) if done else 'skipped (complete)'}")
    if failures:
        raise DataError(f"{len(failures)} of {len(media)} clips failed (first: {failures[0]}); rerun to retry them")
    return counts
