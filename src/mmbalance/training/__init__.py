"""The trainer, checkpoints and multi-process set-up."""

from .trainer import Trainer, resume_run, train_run

__all__ = ["Trainer", "resume_run", "train_run"]
