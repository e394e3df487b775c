"""The ``mmbalance`` command.

Every user mistake ends as one line on stderr and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import MMBalanceError

LISTABLE = ("methods", "datasets", "encoders", "fusions", "corruptions", "metrics")


def _register_all(modules: list[str]) -> None:
    """The built-ins (importing the package registers them), installed extensions, and ``--import`` modules."""
    from .extensions import load_extensions

    load_extensions(modules)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (below the flags and --set)")
    _add_set(p, "override a config key, e.g. --set train.lr=0.01 (repeatable; see: mmbalance list options NAME)")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE``: every command that builds or reads a configuration takes its keys this one way."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    """--set for a finished run: only what leaves the trained model as it is."""
    _add_set(p, "a setting that does not change the model, e.g. --set train.device=cpu or data.root=DIR (repeatable)")


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--debug and --quiet, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    default = False if defaults else argparse.SUPPRESS
    common.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    common.add_argument("--quiet", action="store_true", default=default,
                        help="stderr carries only errors and warnings: no progress bars, epoch or per-run lines")
    common.add_argument("--import", dest="imports", action="append", default=[] if defaults else argparse.SUPPRESS,
                        metavar="MODULE", help="import MODULE first, so the parts it registers can be used (repeatable)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbalance", description="Balanced multimodal learning.", parents=[_common_options(True)]
    )
    parser.add_argument("--version", action="version", version=f"mmbalance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: its options)")
    common = [_common_options(False)]

    p = sub.add_parser("train", parents=common, help="train one run")
    _add_run_identity(p)
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run in DIR (with --set train.epochs=N: extend it to N epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out DIR holds already")
    _add_config_args(p)

    p = sub.add_parser("eval", parents=common, help="evaluate a run's best checkpoint")
    p.add_argument("--run", required=True, metavar="DIR", help="a finished run folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to evaluate (default test)")
    _add_run_settings(p)

    p = sub.add_parser("predict", parents=common, help="a run's predictions on new inputs, as a CSV file")
    p.add_argument("--run", required=True, metavar="DIR", help="a finished run folder")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="an .npz file with one array per modality of the run (an optional 'label' array gives accuracies)")
    p.add_argument("--out", required=True, metavar="FILE", help="the CSV: one row per sample")
    p.add_argument("--overwrite", action="store_true", help="replace --out FILE if it exists")
    _add_run_settings(p)

    p = sub.add_parser("robust", parents=common, help="test accuracy of runs under a corruption, against its level")
    p.add_argument("--run", dest="runs", action="append", required=True, metavar="DIR", help="run folder (repeatable)")
    p.add_argument("--corruption", required=True, help="see: mmbalance list corruptions")
    p.add_argument("--modality", dest="modalities", action="append", metavar="M",
                   help="modality to corrupt (repeatable; 'all' = every modality at once; default: each in turn)")
    p.add_argument("--levels", required=True, help="comma-separated levels ε, e.g. 0,0.5,1,2")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of test samples corrupted (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of which samples are corrupted and how (default 0)")
    _add_set(p, "an option of the corruption, in its own section: --set token_mask.unk_id=3 "
                "(repeatable; see: mmbalance list options CORRUPTION)")
    # deprecated spelling of --set CORRUPTION.KEY=VALUE, kept working (hidden from --help)
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="report folder")

    p = sub.add_parser("list", parents=common, help="list registered components")
    p.add_argument("what", choices=(*LISTABLE, "options"),
                   help=f"{', '.join(LISTABLE)}, or options NAME: every option of one part, dataset, corruption or section")
    p.add_argument("name", nargs="?",
                   help="with 'options': a method part, dataset, corruption or section (train, data, model, log)")

    p = sub.add_parser("config", parents=common, help="the resolved configuration of a run, without training it")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION", help="show")
    f = config_sub.add_parser("show", parents=common,
                              help="print the config.yaml that train would write for these settings")
    _add_run_identity(f)
    _add_config_args(f)

    p = sub.add_parser("data", parents=common, help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="fetch or prepare")
    f = data_sub.add_parser("fetch", parents=common, help="download a dataset into its data folder")
    f.add_argument("name", help="a dataset that can be downloaded, e.g. mfeat or mnist_hog")
    f.add_argument("--root", help="destination folder (default: the dataset's cache folder)")
    f = data_sub.add_parser("prepare", parents=common,
                            help="raw audio-visual clips -> the loader's layout (frames, cached spectrograms, lists)")
    f.add_argument("name", help="cremad, ave or kinetics_sounds")
    f.add_argument("--raw", required=True, metavar="DIR", help="raw videos/, audio/*.wav, frames/ and list files")
    f.add_argument("--out", required=True, metavar="DIR", help="prepared folder (use as data.root)")
    f.add_argument("--fps", type=float, default=1.0, help="frames per second extracted from videos (default 1)")
    f.add_argument("--test-fraction", type=float, default=0.1,
                   help="cremad without list files: stratified test fraction (default 0.1)")
    f.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    _add_set(f, "loader option for the spectrogram, e.g. --set cremad.hop_length=353 (repeatable)")

    p = sub.add_parser("bench", parents=common, help="every method x seed on one dataset, with a summary")
    p.add_argument("--dataset", required=True, help="see: mmbalance list datasets")
    p.add_argument("--methods", required=True,
                   help="comma-separated method specs; NAME[key=value,...] adds options, '+' combines parts: "
                        "'joint,midas,midas[lam=0.5]+arl'; 'linear' adds the linear reference (vector features only)")
    p.add_argument("--seeds", default="5", help=SEEDS_HELP.format(default=5))
    p.add_argument("--out", required=True, metavar="DIR", help="bench folder: one folder per run, results.jsonl, summary.md")
    p.add_argument("--robust", metavar="CORRUPTION:LEVELS",
                   help="after the runs, a robustness report into OUT/robustness, e.g. gaussian:0,1,2")
    p.add_argument("--baseline", metavar="SPEC",
                   help="the method every other is compared with, paired by seed (default: joint if listed, else the first)")
    p.add_argument("--test", default="t", choices=["t", "wilcoxon"],
                   help="p-values of the comparison: paired t-test (default) or exact Wilcoxon signed-rank")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="first tune each method with N trials on the first seed (studies in OUT/tune), then run its best config")
    p.add_argument("--jobs", type=int, default=1, metavar="K",
                   help="runs at once, in K processes of one thread each (OMP_NUM_THREADS sets it); same results as one at a time")
    _add_config_args(p)

    p = sub.add_parser("tune", parents=common, help="search a method's options for the best validation accuracy (Optuna)")
    p.add_argument("--dataset", help="see: mmbalance list datasets (default: synthetic)")
    p.add_argument("--method", required=True, help="method spec; its bracketed options and --set keys stay fixed")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished trials in all: rerunning continues the study up to N")
    p.add_argument("--out", required=True, metavar="DIR", help="study folder: best.yaml, trials.csv/.md, search.png, study.db")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial's run and of the sampler (default 0)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna database URL (postgresql://..., mysql://...) shared by several machines (default: DIR/study.db)")
    p.add_argument("--tune-train", action="store_true", help="also tune train.lr and train.weight_decay")
    p.add_argument("--overwrite", action="store_true", help="replace the study that DIR (or --storage) holds for other settings")
    _add_config_args(p)

    p = sub.add_parser("plot", parents=common, help="draw a run's curves as PNG and PDF files")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder (its metrics.jsonl)")
    p.add_argument("--out", help="folder for the PNG and PDF files (default: DIR/plots)")

    p = sub.add_parser("demo", parents=common, help="joint, unimodal and MIDAS training on the built-in synthetic data")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="report folder (default runs/demo)")
    p.add_argument("--seeds", default="3", help=SEEDS_HELP.format(default=3))
    _add_set(p, "override a config key of every run, e.g. --set train.epochs=10 (repeatable)")
    return parser


SEEDS_HELP = "a count (5: seeds 0..4) or the seeds themselves, comma-separated (0,3,7; one seed: 7,) (default {default})"


def _add_run_identity(p: argparse.ArgumentParser) -> None:
    """--dataset, --method and --seed: what train and config show resolve a configuration from."""
    p.add_argument("--dataset", help="see: mmbalance list datasets (default: synthetic)")
    p.add_argument("--method", help="objective and plugins joined by '+', with options in brackets: 'midas[lam=0.5]+arl'")
    p.add_argument("--seed", type=int, help="seed of the run and, unless data.split_seed is set, of the split (default 0)")


def parse_seeds(text: str) -> int | list[int]:
    """``'5'`` -> 5 (a count); ``'0,3,7'`` -> [0, 3, 7] (exactly those); a single seed is ``'7,'``."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        if len(parts) == 1:
            return int(parts[0])
        return [int(part) for part in parts if part]
    except ValueError:
        raise MMBalanceError(f"--seeds {text!r}: expected a count (5) or comma-separated seeds (0,3,7)") from None


def cmd_train(args) -> int:
    from .config import build_config
    from .training import resume_run, train_run

    if args.resume:
        extra = [name for name in ("dataset", "method", "seed", "out", "config") if getattr(args, name) is not None]
        if extra or args.overwrite:
            flag = "--overwrite" if args.overwrite else f"--{extra[0]}"
            raise MMBalanceError(
                f"--resume DIR continues a run as configured; {flag} does not combine with it "
                f"(only --set train.epochs=N and the other keys safe to change)"
            )
        metrics = resume_run(Path(args.resume), quiet=args.quiet, overrides=args.overrides)
    else:
        if not args.out:
            raise MMBalanceError("train needs --out DIR (the run folder), or --resume DIR")
        config = build_config(args.config, args.overrides, dataset=args.dataset, method=args.method, seed=args.seed)
        metrics = train_run(config, Path(args.out), quiet=args.quiet, overwrite=args.overwrite)
    print(_metrics_line(metrics))
    return 0


def _metrics_line(metrics: dict) -> str:
    test = metrics["test"]
    if metrics.get("task") == "multi_label":  # F1 scores at the run's threshold; modality-only on micro-F1
        only = ", ".join(f"{m} {100 * v:.1f}%" for m, v in test["modality_micro_f1"].items())
        return (
            f"{metrics['method']} on {metrics['dataset']} (seed {metrics['seed']}, multi-label): "
            f"test micro-F1 {100 * test['micro_f1']:.2f}%, macro-F1 {100 * test['macro_f1']:.2f}%, "
            f"mAP {100 * test['mAP']:.2f}% (threshold {test['threshold']:g}), "
            f"modality-only micro-F1 [{only}], best epoch {metrics['best_epoch']}"
        )
    only = ", ".join(f"{m} {100 * v:.1f}%" for m, v in test["modality_accuracy"].items())
    return (
        f"{metrics['method']} on {metrics['dataset']} (seed {metrics['seed']}): "
        f"test accuracy {100 * test['accuracy']:.2f}%, macro-F1 {100 * test['macro_f1']:.2f}%, "
        f"modality-only [{only}], best epoch {metrics['best_epoch']}"
    )


def cmd_eval(args) -> int:
    from .api import load_run

    run = load_run(Path(args.run), args.overrides)
    metrics = run.evaluate(args.split)
    epoch = run.metrics.get("best_epoch") if run.metrics else None
    print(json.dumps({"run": str(run.path), "method": run.method, "split": args.split, "epoch": epoch, **metrics}, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .api import load_run
    from .prediction import read_input_file, refuse_existing

    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    inputs, labels = read_input_file(args.input)
    run = load_run(Path(args.run), args.overrides)
    predictions = run.predict(inputs, run.config.train.eval_batch_size)
    line = f"{len(predictions)} predictions written to {out}"
    if labels is not None and len(labels):
        scores = predictions.accuracy(labels)
        only = ", ".join(f"{m} {100 * v:.1f}%" for m, v in scores["modality_accuracy"].items())
        line += f"; accuracy {100 * scores['accuracy']:.2f}% against 'label' (modality-only: {only})"
    predictions.write_csv(out, labels, overwrite=args.overwrite)
    print(line)
    return 0


def corruption_options(corruption: str, settings: list[str], deprecated: list[str]) -> dict:
    """``--set CORRUPTION.KEY=VALUE`` -> ``{KEY: VALUE}``.

    A corruption's options live in a section named after it, as a method's
    do (``token_mask.unk_id``), so they cannot be taken for a run's keys.
    ``deprecated`` holds the old ``--option KEY=VALUE`` spelling, still read.
    """
    from .config import parse_override
    from .registry import CORRUPTIONS

    CORRUPTIONS.get(corruption)  # an unknown name first, with its did-you-mean
    options = {}
    for text in settings:
        key, value = parse_override(text)
        section, _, option = key.partition(".")
        if section != corruption or not option:
            raise MMBalanceError(
                f"robust --set takes options of the corruption, as {corruption}.KEY=VALUE (see: mmbalance list options "
                f"{corruption}); '{key}' is not one"
            )
        options[option] = value
    for text in deprecated:
        if "=" not in text:
            raise MMBalanceError(f"bad --option '{text}': expected KEY=VALUE; use --set {corruption}.KEY=VALUE")
        key, value = parse_override(text)
        warnings.warn(f"--option is deprecated: use --set {corruption}.{key}=...", FutureWarning)
        options[key] = value
    return options


def cmd_robust(args, command: str) -> int:
    from .experiments.robustness import parse_levels, robustness_report

    options = corruption_options(args.corruption, args.overrides, args.options)
    robustness_report(args.runs, args.corruption, parse_levels(args.levels), Path(args.out), args.modalities,
                      args.fraction, args.seed, options, command=command,
                      log=(lambda text: None) if args.quiet else None)
    print((Path(args.out) / "robustness.md").read_text())
    return 0


def cmd_list(args) -> int:
    from .registry import CORRUPTIONS, DATASETS, ENCODERS, FUSIONS, METHODS, METRICS

    if args.what == "options":
        from .options import options_table

        if not args.name:
            raise MMBalanceError("list options needs a NAME: a method part, dataset or section, e.g. list options midas")
        print(options_table(args.name))
        return 0
    if args.name:
        raise MMBalanceError(f"list {args.what} takes no name (list options NAME shows one part's options)")
    registry = {"methods": METHODS, "datasets": DATASETS, "encoders": ENCODERS, "fusions": FUSIONS,
                "corruptions": CORRUPTIONS, "metrics": METRICS}[args.what]
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        kind = getattr(registry.get(name), "kind", None) if args.what == "methods" else None
        prefix = f"{kind:<9}  " if kind else ""
        print(f"{name:<{width}}  {prefix}{registry.describe(name)}")
    return 0


def cmd_config(args) -> int:
    from .config import build_config

    config = build_config(args.config, args.overrides, dataset=args.dataset, method=args.method, seed=args.seed)
    sys.stdout.write(config.to_yaml())
    return 0


def cmd_data(args) -> int:
    if args.data_command == "prepare":
        return cmd_data_prepare(args)
    from .data.loading import default_data_root
    from .registry import DATASETS

    plugin = DATASETS.get(args.name)
    if not hasattr(plugin, "fetch"):
        fetchable = [n for n in DATASETS.names() if hasattr(DATASETS.get(n), "fetch")]
        raise MMBalanceError(
            f"dataset '{args.name}' has nothing to fetch (fetchable: {', '.join(fetchable) or 'none'})"
        )
    root = Path(args.root) if args.root else default_data_root(args.name)
    path = plugin.fetch(root)
    print(f"{args.name}: ready in {path}")
    return 0


def cmd_data_prepare(args) -> int:
    from .data.prepare import prepare

    counts = prepare(args.name, Path(args.raw), Path(args.out), args.overrides, fps=args.fps,
                     test_fraction=args.test_fraction, seed=args.seed, log=None if args.quiet else _stderr)
    print(f"{args.name}: {counts['clips']} clips ({counts['written']} written, {counts['skipped']} already complete) "
          f"ready in {args.out}; train with --set data.root={args.out}")
    return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _silent(text: str) -> None:
    """The log of --quiet."""


def cmd_bench(args, command: str) -> int:
    from .experiments.bench import run_bench
    from .experiments.robustness import parse_sweep
    from .methods.spec import split_methods

    methods = split_methods(args.methods)
    robust = parse_sweep(args.robust) if args.robust else None
    if args.tune < 0:
        raise MMBalanceError(f"--tune must be a number of trials >= 1 (or 0: no tuning), got {args.tune}")
    run_bench(args.dataset, methods, parse_seeds(args.seeds), Path(args.out), args.overrides, args.config, tune=args.tune,
              jobs=args.jobs, quiet=args.quiet, command=command, robust=robust, baseline=args.baseline, test=args.test,
              log=_silent if args.quiet else None)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_tune(args, command: str) -> int:
    from .experiments.tune import short_value, tune

    result = tune(args.dataset, args.method, args.trials, Path(args.out), args.overrides, args.config, seed=args.seed,
                  storage=args.storage, tune_train=args.tune_train, overwrite=args.overwrite, quiet=args.quiet,
                  command=command)
    counts = result["counts"]
    done = f"{counts['complete']} complete, {counts['pruned']} pruned"
    best = result["best"]
    if best is None:
        print(f"study {result['study']}: {done}; no trial has completed yet")
        return 0
    shown = ", ".join(f"{key}={short_value(value)}" for key, value in best["params"].items())
    print(f"study {result['study']}: {done}; best validation accuracy {100 * best['value']:.2f}% "
          f"(trial {best['number']}: {shown})")
    print(f"train it: mmbalance train --config {Path(args.out) / 'best.yaml'} --out RUN")
    return 0


def cmd_plot(args) -> int:
    from .evaluation.plots import plot_run

    for path in plot_run(Path(args.run), args.out):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from .experiments.bench import run_bench

    out = Path(args.out)
    command = shlex.join(["mmbalance", "demo", "--out", args.out, "--seeds", args.seeds,
                          *(word for setting in args.overrides for word in ("--set", setting))])
    run_bench("synthetic", ["joint", "unimodal", "midas"], parse_seeds(args.seeds), out, args.overrides,
              quiet=args.quiet, command=command, log=_silent if args.quiet else None)
    print((out / "summary.md").read_text())
    print(f"Report folder: {out} (summary.md, summary.png/.pdf, results.jsonl, one folder per run)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that left early (`| head`) is found here at the latest
        return status
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of stdout closed it (``mmbalance list methods | head -1``): it has what it wanted, so not an error.

    Python's documented recipe: point stdout at devnull, so that the flush at
    exit does not fail again, and end quietly.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (captured in tests): nothing left to flush there
        pass
    return 0


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "mmbalance " + shlex.join(argv)
    handlers = {
        "train": cmd_train,
        "eval": cmd_eval,
        "predict": cmd_predict,
        "list": cmd_list,
        "config": cmd_config,
        "data": cmd_data,
        "bench": lambda a: cmd_bench(a, command),
        "robust": lambda a: cmd_robust(a, command),
        "demo": cmd_demo,
        "plot": cmd_plot,
        "tune": lambda a: cmd_tune(a, command),
    }
    # Warnings of libraries (numpy's RuntimeWarnings on odd data, say) are held back: after an
    # error the one-line message stands alone; after success each distinct one is one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always" if args.debug else "default")
        status = _run(handlers[args.command], args)
    if args.debug or status == 0:
        for text in dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught):
            print(f"mmbalance: warning: {text}", file=sys.stderr)
    return status


def _run(handler, args) -> int:
    try:
        _register_all(args.imports)
        return handler(args)
    except MMBalanceError as exc:
        if args.debug:
            raise
        print(f"mmbalance: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmbalance: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left: main ends quietly
        raise
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"mmbalance: internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
