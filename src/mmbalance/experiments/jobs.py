"""Several runs of a bench at once on one machine (``bench --jobs K``).

Each run goes to one of K worker processes (spawned: safe with CUDA and
OpenMP), which trains it exactly as a serial bench would, in the same run
folder under the same lock, so the folders and reports are the same whatever
K is. The CPU is shared out: each worker uses ``threads`` torch/OpenMP threads,
by default ``OMP_NUM_THREADS`` if set, else one. Workers import the modules
that registered the parent's own parts (``--import``, entry points), so those
parts run there too. A run that fails stops the bench as a serial one would:
runs not yet started are cancelled, runs in flight finish (their folders
complete), then the error is reported. Progress bars are off in workers; the
bench logs each run as it ends.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

from ..errors import MMBalanceError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def check_jobs(jobs: int) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise MMBalanceError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    return jobs


def default_threads() -> int:
    text = os.environ.get("OMP_NUM_THREADS", "")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def registering_modules() -> list[str]:
    """The modules that registered this process's parts, datasets and the rest: a worker imports them too."""
    from .. import registry

    kinds = (registry.METHODS, registry.DATASETS, registry.ENCODERS, registry.FUSIONS, registry.CORRUPTIONS,
             registry.METRICS)
    modules = {getattr(kind.get(name), "__module__", None) for kind in kinds for name in kind.names()}
    return sorted(m for m in modules if m and m != "__main__" and not m.startswith("mmbalance."))


def _start_worker(threads: int, modules: list[str]) -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from ..extensions import load_extensions

    load_extensions()  # installed entry points, as the command loads them
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a run that needs a part it failed to register then fails by the part's name
            pass


def _run(task: tuple) -> tuple[dict, list[str]]:
    from .bench import run_planned

    k, total, label, name, config, out_dir = task
    lines: list[str] = []
    metrics = run_planned(k, total, label, name, config, Path(out_dir), True, lines.append)
    return metrics, lines


def run_in_processes(plan: list, out_dir: Path, jobs: int, log: Callable[[str], None],
                     threads: int | None = None) -> list[dict]:
    """Every planned run in ``jobs`` processes; the metrics in plan order, as a serial bench returns them."""
    threads = threads or default_threads()
    tasks = [(k, len(plan), label, name, config, str(out_dir)) for k, (label, name, config) in enumerate(plan, 1)]
    results: list[dict | None] = [None] * len(tasks)
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})  # the workers start with them set
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(threads, registering_modules())) as pool:
            futures = {pool.submit(_run, task): k for k, task in enumerate(tasks)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        metrics, lines = future.result()  # a run's error is raised here, as a serial bench raises it
                        for line in lines:
                            log(line)
                        results[futures[future]] = metrics
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return results
