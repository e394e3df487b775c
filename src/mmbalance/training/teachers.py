"""Teachers trained inside a run: unimodal models some methods distil from (UMT, UME, G2D).

A part builds its teachers in ``setup`` (frozen modules of its own) and
trains them on its first ``on_epoch_start`` with ``ctx.fit_teacher(name,
module, loss, predict, epochs)``. The fit is a small training loop of its
own, with the run's optimizer settings, its own shuffle order, progress,
and a checkpoint per epoch in ``RUN/teachers/NAME.pt`` (weights, optimizer,
RNG states, the best epoch so far), so a run killed while a teacher trains
resumes it exactly. The best epoch is chosen on the held-out data
(``ctx.heldout_loader``), never on test. Its time counts in the run's.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..errors import MMBalanceError
from .checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from .distributed import ShardedShuffleSampler

TEACHER_FOLDER = "teachers"


class TeacherFit:
    """``ctx.fit_teacher``: trains one teacher module to its best held-out epoch, resumably."""

    def __init__(self, trainer):
        self.trainer = trainer

    def path(self, name: str) -> Path | None:
        out = self.trainer.out_dir
        return None if out is None else out / TEACHER_FOLDER / f"{name}.pt"

    def __call__(
        self,
        name: str,
        module: nn.Module,
        loss: Callable[[nn.Module, Batch], Tensor],
        predict: Callable[[nn.Module, Batch], Tensor],
        epochs: int,
    ) -> dict:
        """Train ``module`` with ``loss(module, batch)`` for ``epochs``; keep the epoch whose
        ``predict(module, batch)`` is most accurate on the held-out data. Returns a summary."""
        trainer = self.trainer
        parameters = [p for p in module.parameters()]
        for p in parameters:
            p.requires_grad_(True)
        optimizer = trainer.make_optimizer(parameters)
        state = {"epoch": 0, "best_accuracy": -1.0, "best_epoch": 0, "seconds": 0.0}
        best = copy.deepcopy(module.state_dict())
        path = self.path(name)
        if path is not None and path.is_file():
            saved = load_checkpoint(path, ("module", "best", "optimizer", "state", "rng"))
            module.load_state_dict(saved["module"])
            best = saved["best"]
            optimizer.load_state_dict(saved["optimizer"])
            state.update(saved["state"])
            set_rng_state(saved["rng"])
        dist = trainer.dist
        sampler = ShardedShuffleSampler(len(trainer.train_data), trainer.config.seed * 7 + sum(map(ord, name)),
                                        dist.rank, dist.world_size)
        loader = trainer._loader(trainer.train_data, trainer.config.train.batch_size, sampler)
        try:
            for epoch in range(state["epoch"], epochs):
                started = time.perf_counter()
                module.train()
                sampler.set_epoch(epoch)
                bar = trainer.progress.epoch_bar(loader, epoch, epochs, label=f"teacher {name}")
                for batch in bar:
                    batch = batch.to(trainer.device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    value = loss(module, batch)
                    if not torch.isfinite(value.detach()).item():
                        raise MMBalanceError(f"non-finite loss while training teacher {name} (epoch {epoch + 1}); try a lower train.lr")
                    value.backward()
                    dist.average_gradients(parameters)
                    if trainer.config.train.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(parameters, trainer.config.train.grad_clip)
                    optimizer.step()
                accuracy = self.accuracy(module, predict)
                state["epoch"] = epoch + 1
                state["seconds"] += time.perf_counter() - started
                if accuracy > state["best_accuracy"]:
                    state.update(best_accuracy=accuracy, best_epoch=epoch + 1)
                    best = copy.deepcopy(module.state_dict())
                trainer.progress.epoch_summary(
                    f"teacher {name} epoch {epoch + 1}/{epochs}  held-out acc {accuracy:.4f}"
                )
                if path is not None and dist.is_main:
                    path.parent.mkdir(exist_ok=True)
                    atomic_save({"module": module.state_dict(), "best": best, "optimizer": optimizer.state_dict(),
                                 "state": dict(state), "rng": rng_state()}, path)
        finally:
            for p in parameters:
                p.requires_grad_(False)
                p.grad = None
        module.load_state_dict(best)
        module.eval()
        return dict(state)

    @torch.no_grad()
    def accuracy(self, module: nn.Module, predict: Callable[[nn.Module, Batch], Tensor]) -> float:
        """Accuracy of ``predict(module, batch)`` on the held-out data (never test), summed over processes."""
        trainer = self.trainer
        was_training = module.training
        module.eval()
        counts = torch.zeros(2, dtype=torch.float64, device=trainer.device)
        for batch in trainer.heldout_loader:
            batch = batch.to(trainer.device)
            counts[0] += (predict(module, batch).argmax(-1) == batch.labels).sum()
            counts[1] += len(batch)
        counts = trainer.dist.all_reduce_sum(counts).tolist()
        module.train(was_training)
        return counts[0] / max(counts[1], 1)
