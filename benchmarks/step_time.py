"""Seconds per training step, by encoder setting and training method.

A balancing method is only worth its accuracy if its cost per step is known,
so this script times full optimisation steps (the trainer's own
``train_step``: zero_grad, the method's hooks, backward, clipping, optimizer
step) on synthetic batches at realistic shapes. Joint training is the
reference: every other method is timed interleaved with it, one step of each
in turn, so that load from other processes lands on all of them alike and
each method's ratio to joint stays meaningful on a busy machine.

    python benchmarks/step_time.py                                # joint, every setting
    python benchmarks/step_time.py --encoders resnet18 --methods joint,midas --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import mmbalance  # noqa: F401  (registers every method in METHODS)
from mmbalance.config import build_config
from mmbalance.data.base import DataBundle
from mmbalance.data.batch import Batch
from mmbalance.errors import MMBalanceError
from mmbalance.methods.spec import split_methods
from mmbalance.registry import METHODS, unknown_name_message
from mmbalance.training import Trainer

REFERENCE_METHOD = "joint"
NUM_CLASSES = 10
FEATURE_DIM = 512
LEARNING_RATE = 1e-3
MOMENTUM = 0.9
EPOCHS = 100
# past every default warm-up (MIDAS 14 of 100 epochs, ARL and CAL 5, OPM 6) and inside every
# default modulation window (OGM-GE and G²D's prioritization: epochs 0-50)
TIMED_EPOCH = 25
AUDIO_VISUAL_SHAPES = {"audio": (1, 257, 188), "visual": (3, 3, 224, 224)}


@dataclass(frozen=True)
class Setting:
    """One row group of the benchmark: an encoder at fixed input shapes and batch size."""

    encoder: str
    input_shapes: dict[str, tuple[int, ...]]
    batch_size: int
    default_steps: int

    def describe_inputs(self) -> str:
        return " + ".join(f"{m} {'x'.join(map(str, shape))}" for m, shape in self.input_shapes.items())


SETTINGS: dict[str, Setting] = {
    # The field's audio-visual setting: a spectrogram and 3 RGB frames per sample.
    "resnet18": Setting("resnet18", AUDIO_VISUAL_SHAPES, batch_size=16, default_steps=10),
    "cnn": Setting("cnn", AUDIO_VISUAL_SHAPES, batch_size=16, default_steps=20),
    # Two pre-extracted feature vectors, where the encoders cost little.
    "mlp": Setting("mlp", {"audio": (512,), "visual": (256,)}, batch_size=64, default_steps=50),
}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock reads the time the step really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(setting: Setting, device: torch.device, generator: torch.Generator) -> Batch:
    """Random inputs and labels, made once so that data generation is never timed."""
    size = setting.batch_size
    inputs = {m: torch.randn(size, *shape, generator=generator) for m, shape in setting.input_shapes.items()}
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return Batch(inputs=inputs, labels=labels, index=torch.arange(size)).to(device)


class MethodUnderTest:
    """One method training its own copy of the model through the trainer's own step.

    Every copy starts from the same weights (same seed) and is built as a run
    is: the method's recommended settings (e.g. gradient clipping) apply,
    ``setup`` runs before the optimizers are built, and each timed step is
    ``Trainer.train_step`` (zero_grad, the parts' hooks, backward, averaging,
    clipping, optimizer step). The step is taken in epoch ``TIMED_EPOCH`` of
    ``EPOCHS``, so every method is past its warm-up and inside its default
    modulation window. The held-out loaders yield the benchmark batch;
    teachers (UMT, UME, G²D) are trained in the untimed ``on_epoch_start``.
    """

    def __init__(self, name: str, setting: Setting, batch: Batch, device: torch.device, seed: int, total_steps: int,
                 extra: list[str] = ()):
        self.name = name
        self.device = device
        self.batch = batch
        overrides = [
            f"model.encoder={setting.encoder}", "model.fusion=concat", f"model.feature_dim={FEATURE_DIM}",
            "train.optimizer=sgd", f"train.lr={LEARNING_RATE}", f"train.momentum={MOMENTUM}", "train.weight_decay=0",
            f"train.batch_size={setting.batch_size}", f"train.epochs={EPOCHS}", f"train.device={device.type}",
            *extra,
        ]
        config = build_config(overrides=overrides, method=name, seed=seed)
        cpu = batch.to("cpu")
        rows = torch.arange(len(cpu))
        bundle = DataBundle.from_tensors(cpu.inputs, cpu.labels, (rows, rows, rows), NUM_CLASSES)
        torch.manual_seed(seed)
        self.trainer = Trainer(config, None, quiet=True, bundle=bundle)
        self.trainer.ctx.epoch = TIMED_EPOCH
        self.trainer.model.train()
        self.trainer.method.train()
        self.trainer.method.on_epoch_start(self.trainer.model, self.trainer.ctx)
        self.steps_done = 0
        self.seconds: list[float] = []

    def step(self) -> float:
        """One full optimisation step; returns its wall-clock seconds."""
        ctx = self.trainer.ctx
        ctx.global_step = ctx.step_in_epoch = self.steps_done
        synchronize(self.device)
        started = time.perf_counter()
        self.trainer.train_step(self.batch)
        synchronize(self.device)
        elapsed = time.perf_counter() - started
        self.steps_done += 1
        return elapsed


def benchmark_setting(
    setting_name: str, methods: list[str], steps: int, warmup: int, device: torch.device, seed: int,
    overrides: list[str] = (),
) -> list[dict]:
    """Time every method on one setting, interleaved step by step; one result row per method."""
    setting = SETTINGS[setting_name]
    batch = synthetic_batch(setting, device, torch.Generator().manual_seed(seed))
    runs = [MethodUnderTest(name, setting, batch, device, seed, warmup + steps, list(overrides)) for name in methods]
    for step in range(warmup + steps):
        phase = f"warmup {step + 1}/{warmup}" if step < warmup else f"step {step - warmup + 1}/{steps}"
        # Reverse the order every other step so that no method always runs right after another.
        for run in runs if step % 2 == 0 else reversed(runs):
            seconds = run.step()
            if step >= warmup:
                run.seconds.append(seconds)
            print(f"[{setting_name}] {phase} {run.name}: {seconds:.3f} s", file=sys.stderr, flush=True)
    reference = statistics.median(next(r.seconds for r in runs if r.name == REFERENCE_METHOD))
    return [
        {
            "encoder": setting_name,
            "inputs": setting.describe_inputs(),
            "method": run.name,
            "batch_size": setting.batch_size,
            "steps": steps,
            "warmup": warmup,
            "median_s": statistics.median(run.seconds),
            "min_s": min(run.seconds),
            "max_s": max(run.seconds),
            "ratio_to_joint": statistics.median(run.seconds) / reference,
            "seconds": run.seconds,
        }
        for run in runs
    ]


# -- command line -------------------------------------------------------------
def comma_list(text: str) -> list[str]:
    return split_methods(text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="step_time.py",
        description="Seconds per training step by encoder setting and method, with each method's ratio to joint.",
    )
    parser.add_argument("--encoders", type=comma_list, default=list(SETTINGS),
                        help=f"comma-separated settings (default: {','.join(SETTINGS)})")
    parser.add_argument("--methods", type=comma_list, default=[REFERENCE_METHOD],
                        help="comma-separated method specs (midas+arl, midas[level=input]); joint is always timed "
                             "as the reference (default: joint)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per method (default: " + ", ".join(f"{n} {s.default_steps}" for n, s in SETTINGS.items()) + ")")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method, e.g. --set train.grad_clip=0 (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as a Markdown table")
    return parser.parse_args(argv)


def check_names(encoders: list[str], methods: list[str], overrides: list[str] = ()) -> None:
    """Fail on a bad name before any model is built: a ResNet run is too slow to waste."""
    if not encoders:
        raise MMBalanceError(f"--encoders is empty (allowed: {', '.join(SETTINGS)})")
    if not methods:
        raise MMBalanceError(f"--methods is empty (allowed: {', '.join(METHODS.names())})")
    for name in encoders:
        if name not in SETTINGS:
            raise MMBalanceError(unknown_name_message("encoder setting", name, list(SETTINGS)))
    for spec in methods:
        build_config(method=spec, overrides=overrides)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MMBalanceError("--device cuda, but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def with_reference_first(methods: list[str]) -> list[str]:
    """Joint first, then the others once each: ratios need joint measured in the same run."""
    return list(dict.fromkeys([REFERENCE_METHOD, *methods]))


def environment(device: torch.device, command: str) -> dict:
    return {
        "command": command,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# -- output -------------------------------------------------------------------
COLUMNS = ["encoder", "method", "batch", "steps", "median s/step", "min s", "max s", "ratio vs joint"]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The same formatted numbers for the terminal and the Markdown table."""
    return [
        [
            row["encoder"],
            row["method"],
            str(row["batch_size"]),
            str(row["steps"]),
            f"{row['median_s']:#.4g}",
            f"{row['min_s']:#.4g}",
            f"{row['max_s']:#.4g}",
            f"{row['ratio_to_joint']:.2f}",
        ]
        for row in rows
    ]


def text_table(rows: list[dict]) -> str:
    cells = [COLUMNS, *table_cells(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    numeric_from = 2  # encoder and method are left-aligned, numbers right-aligned
    lines = [
        "  ".join(cell.ljust(w) if i < numeric_from else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"
    body = ["| " + " | ".join(line) + " |" for line in table_cells(rows)]
    return "\n".join([header, rule, *body])


def environment_line(env: dict) -> str:
    return f"torch {env['torch']}, device {env['device']}, {env['torch_threads']} torch threads, {env['cpu_count']} CPUs"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_names(args.encoders, args.methods, args.overrides)
        device = pick_device(args.device)
    except MMBalanceError as exc:
        print(f"step_time.py: error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = with_reference_first(args.methods)
    command = " ".join(["python", "benchmarks/step_time.py", *(sys.argv[1:] if argv is None else argv)])
    env = environment(device, command)
    print(environment_line(env), file=sys.stderr, flush=True)
    rows: list[dict] = []
    for name in args.encoders:
        steps = args.steps or SETTINGS[name].default_steps
        rows += benchmark_setting(name, methods, steps, args.warmup, device, args.seed, args.overrides)
    print(environment_line(env))
    print(text_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(f"{environment_line(env)}\n\n{markdown_table(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
