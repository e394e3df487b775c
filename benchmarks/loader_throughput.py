"""Samples per second of the audio-visual loaders, against the ResNet-18 training step rate.

Loading is only a bottleneck if it delivers batches slower than the model
consumes them, so this times the CREMA-D loader (the trainer's DataLoader
settings: ``collate_batch``, persistent workers) on a synthetic fixture at
realistic sizes, reading raw WAVs or the spectrograms cached by
``mmbalance data prepare``, with 0 and 2 workers, and divides each rate by
the joint ResNet-18 step rate on the same shapes (timed here with
``step_time.py``'s machinery, or given with ``--step-seconds``). A ratio
above 1 means the loader keeps up. With 0 workers decoding runs in the main
process on torch's intra-op threads, which a busy machine can slow down
many times over; ``--threads 1`` shows how much of that is contention.

    python benchmarks/loader_throughput.py                       # 64 clips, 3 s audio, 224x224 frames
    python benchmarks/loader_throughput.py --workers 0 --step-seconds 2.5 --markdown loaders.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time.py, this script's sibling

import step_time  # noqa: E402
from mmbalance.config import build_config  # noqa: E402
from mmbalance.data import load_dataset  # noqa: E402
from mmbalance.data.batch import collate_batch  # noqa: E402
from mmbalance.data.benchmarks.audiovisual import CREMAD_CLASSES  # noqa: E402
from mmbalance.data.prepare import prepare  # noqa: E402

DATASET = "cremad"
SOURCES = {"raw WAV": "raw", "cached spectrogram": "prepared"}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- fixture --------------------------------------------------------------------
def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour fields plus mild noise: JPEGs of natural-image size, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_fixture(root: Path, clips: int, seconds: float, sample_rate: int, image_size: int,
                  frames_per_clip: int, seed: int) -> None:
    """A CREMA-D folder (AudioWAV/, Image-01-FPS/, train/val/test.csv) of noise clips with cycling emotions."""
    rng = np.random.default_rng(seed)
    ids = [f"{1001 + k}_DFA_{CREMAD_CLASSES[k % len(CREMAD_CLASSES)]}_XX" for k in range(clips)]
    (root / "AudioWAV").mkdir(parents=True)
    for clip in ids:
        wave = rng.uniform(-0.3, 0.3, int(round(seconds * sample_rate))).astype(np.float32)
        soundfile.write(str(root / "AudioWAV" / f"{clip}.wav"), wave, sample_rate, subtype="PCM_16")
        folder = root / "Image-01-FPS" / clip
        folder.mkdir(parents=True)
        for f in range(frames_per_clip):
            photo_like(rng, image_size).save(folder / f"{f + 1:05d}.jpg", quality=90)
    held = max(1, clips // 10)
    parts = {"val.csv": ids[:held], "test.csv": ids[held:2 * held], "train.csv": ids[2 * held:]}
    for name, part in parts.items():
        (root / name).write_text("".join(f"{c},{c.split('_')[2]}\n" for c in part))


def loader_options(args) -> list[str]:
    return [f"{DATASET}.sample_rate={args.sample_rate}", f"{DATASET}.audio_seconds={args.seconds}",
            f"{DATASET}.image_size={args.image_size}", f"{DATASET}.frames={args.frames}"]


def all_clips(root: Path, args):
    bundle = load_dataset(build_config(overrides=[f"data.root={root}", *loader_options(args)], dataset=DATASET))
    return ConcatDataset([bundle.train, bundle.val, bundle.test]), bundle.input_shapes


# -- timing ---------------------------------------------------------------------
def time_loader(dataset, batch_size: int, workers: int, passes: int, label: str) -> float:
    """Samples per second over ``passes`` full passes, after one untimed pass (worker start, page cache)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch,
                        num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    for k in range(passes):
        for _ in loader:
            pass
        log(f"[{label}] pass {k + 1}/{passes}")
    return passes * len(dataset) / (time.perf_counter() - started)


def time_training_step(input_shapes: dict, batch_size: int, steps: int, warmup: int, seed: int) -> float:
    """Median seconds of a joint ResNet-18 step on CPU at the loader's shapes (step_time.py's method runner)."""
    setting = step_time.Setting("resnet18", dict(input_shapes), batch_size, steps)
    device = torch.device("cpu")
    batch = step_time.synthetic_batch(setting, device, torch.Generator().manual_seed(seed))
    run = step_time.MethodUnderTest("joint", setting, batch, device, seed, warmup + steps)
    seconds = []
    for step in range(warmup + steps):
        elapsed = run.step()
        if step >= warmup:
            seconds.append(elapsed)
        log(f"[training step] {'warmup' if step < warmup else 'step'} {step + 1}/{warmup + steps}: {elapsed:.3f} s")
    return statistics.median(seconds)


# -- command line ---------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loader_throughput.py",
        description="Audio-visual loader samples/s (raw WAV vs cached spectrograms, 0/2 workers) vs the ResNet-18 step rate.",
    )
    parser.add_argument("--clips", type=step_time.positive_int, default=64, help="fixture clips (default 64; >= 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio seconds per clip (default 3, CREMA-D's)")
    parser.add_argument("--sample-rate", type=step_time.positive_int, default=22050, help="Hz (default 22050)")
    parser.add_argument("--image-size", type=step_time.positive_int, default=224, help="frame side in pixels (default 224)")
    parser.add_argument("--frames-per-clip", type=step_time.positive_int, default=3,
                        help="JPEGs written per clip (default 3: 1 fps of 3 s)")
    parser.add_argument("--frames", type=step_time.positive_int, default=1, help="frames the loader reads (default 1, CREMA-D's)")
    parser.add_argument("--batch-size", type=step_time.positive_int, default=16)
    parser.add_argument("--workers", type=lambda t: [int(w) for w in t.split(",")], default=[0, 2],
                        help="comma-separated num_workers values (default 0,2)")
    parser.add_argument("--passes", type=step_time.positive_int, default=3, help="timed passes over the clips (default 3)")
    parser.add_argument("--steps", type=step_time.positive_int, default=3, help="timed training steps (default 3)")
    parser.add_argument("--warmup", type=step_time.non_negative_int, default=1, help="untimed training steps (default 1)")
    parser.add_argument("--step-seconds", type=float, default=None, help="use this training step time instead of timing it")
    parser.add_argument("--threads", type=step_time.positive_int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as a Markdown table")
    args = parser.parse_args(argv)
    if args.clips < 3:
        parser.error("--clips must be >= 3 (train, val and test each need a clip)")
    if any(w < 0 for w in args.workers):
        parser.error("--workers values must be >= 0")
    return args


COLUMNS = ["audio input", "workers", "samples/s", "batches/s", "loader / training step rate"]


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [[r["audio"], str(r["workers"]), f"{r['samples_per_s']:.1f}", f"{r['batches_per_s']:.2f}",
             f"{r['ratio_to_step_rate']:.2f}"] for r in rows]


def text_table(rows: list[dict]) -> str:
    cells = [COLUMNS, *table_cells(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    body = ["| " + " | ".join(line) + " |" for line in table_cells(rows)]
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1), *body])


def summary_line(info: dict) -> str:
    step = info["step_seconds"]
    source = "measured" if info["step_measured"] else "given"
    return (f"{info['clips']} clips, {info['audio_seconds']:g} s audio at {info['sample_rate']} Hz, "
            f"{info['image_size']}x{info['image_size']} JPEG frames, batch {info['batch_size']}; "
            f"ResNet-18 joint step {step:.3f} s ({source}) = {1 / step:.2f} batches/s; "
            f"torch {info['torch']}, {info['torch_threads']} torch threads, {info['cpu_count']} CPUs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = " ".join(["python", "benchmarks/loader_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="loader_throughput.") as tmp:
        roots = {"raw": Path(tmp) / "raw", "prepared": Path(tmp) / "prepared"}
        log(f"writing {args.clips} fixture clips to {roots['raw']}")
        write_fixture(roots["raw"], args.clips, args.seconds, args.sample_rate, args.image_size,
                      args.frames_per_clip, args.seed)
        log("caching spectrograms with mmbalance.data.prepare")
        prepare(DATASET, roots["raw"], roots["prepared"], loader_options(args), log=None)
        shapes = None
        for audio, folder in SOURCES.items():
            dataset, shapes = all_clips(roots[folder], args)
            for workers in args.workers:
                rate = time_loader(dataset, args.batch_size, workers, args.passes, f"{audio}, {workers} workers")
                rows.append({"audio": audio, "workers": workers, "samples_per_s": rate,
                             "batches_per_s": rate / args.batch_size})
    measured = args.step_seconds is None
    step = time_training_step(shapes, args.batch_size, args.steps, args.warmup, args.seed) if measured else args.step_seconds
    for row in rows:
        row["ratio_to_step_rate"] = row["batches_per_s"] * step
    info = {"command": command, "clips": args.clips, "audio_seconds": args.seconds, "sample_rate": args.sample_rate,
            "image_size": args.image_size, "frames": args.frames, "batch_size": args.batch_size,
            "input_shapes": {m: list(s) for m, s in shapes.items()}, "passes": args.passes,
            "step_seconds": step, "step_measured": measured, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    print(summary_line(info))
    print(text_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": info, "results": rows}, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(f"{summary_line(info)}\n\n{markdown_table(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
