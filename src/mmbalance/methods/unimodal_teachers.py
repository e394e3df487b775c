"""Unimodal teachers trained inside a run: what UMT distils from, UME ensembles (BASELINES §12) and
G²D distils from and prioritises modalities by (``g2d``, ``g2d_smp``; BASELINES-2025 §2).

Teacher T_m is a copy of the multimodal model's encoder for modality m
(same architecture, so its features have the student's shape) plus a linear
head, trained with cross-entropy on modality m alone through
``ctx.fit_teacher`` (the run's optimizer settings, its own shuffle order,
the best epoch on the held-out data, a checkpoint per epoch in
``RUN/teachers/unimodal_M.pt``, exact resume when killed mid-teacher).

The teachers are submodules of the part that owns them, so once trained
they are saved in last.pt and best.pt with the method's state; the buffer
``ready`` records that they were trained, so a resumed run never trains
them again. They are frozen (no ``requires_grad``, never in the main
optimizer) and always in eval mode: ``train()`` on the method leaves them
in eval mode, so dropout is off and batch-norm statistics stay those of
the trained teacher (BMM runs its loaded teachers in train mode, which
moves their batch-norm statistics during joint training).

Initialisation (``teacher_init``): ``student`` (default) copies the
student encoder's initial weights, so each encoder type's own initial
scheme and any ``model.pretrained`` weights carry over; ``fresh`` draws new
weights with PyTorch's default initialiser of every layer
(``reset_parameters``), dropping encoder-specific schemes and pretrained
weights. Either way the teachers' random numbers come from a generator
seeded with the run's seed, so setup leaves the run's random stream alone,
and the teachers of UMT, UME and G²D runs with the same seed and teacher
options are identical (their checkpoint files share the names
``unimodal_M``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError

#: teacher checkpoint names in RUN/teachers: the same for every part, so UMT and UME share teachers
TEACHER_PREFIX = "unimodal_"
#: added to the run's seed for the teachers' initial weights
TEACHER_SEED_OFFSET = 104_729


class TeacherConfig(Section):
    """Options of the parts that train unimodal teachers."""

    teacher_epochs: Optional[int] = Field(
        None, ge=1, description="epochs each teacher trains (its best held-out epoch is kept); unset: train.epochs"
    )
    teacher_init: Literal["student", "fresh"] = Field(
        "student",
        description="student: start each teacher from the student encoder's initial weights (pretrained ones too); "
        "fresh: PyTorch's default initialiser of every layer, seeded with the run's seed",
    )
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict,
        description="modality -> teacher file to load instead of training (RUN/teachers/unimodal_M.pt of an "
        "earlier run, or a state dict of encoder.* and head.*); it must not have seen this run's held-out or test data",
    )


def check_teacher_config(config: TeacherConfig, modalities: list[str], part: str) -> None:
    unknown = [m for m in config.teacher_checkpoints if m not in modalities]
    if unknown:
        raise ConfigError(
            f"invalid value for {part}.teacher_checkpoints: modality '{unknown[0]}' is not one of the dataset's "
            f"({', '.join(modalities)})"
        )


def teacher_epochs(config: TeacherConfig, max_epochs: int) -> int:
    return config.teacher_epochs if config.teacher_epochs is not None else max_epochs


def reinitialise_(module: nn.Module) -> None:
    """Draw new weights for every layer with its PyTorch default initialiser (and reset norm statistics)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
        if callable(reset):
            reset()


class UnimodalTeacher(nn.Module):
    """One modality's teacher: an encoder of the student's architecture and a linear head."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class UnimodalTeachers(nn.Module):
    """The teachers of every modality, their training state and their held-out accuracies."""

    def __init__(self, encoders: dict[str, nn.Module], num_classes: int, init: str = "student", seed: int = 0):
        super().__init__()
        self.modalities = list(encoders)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + TEACHER_SEED_OFFSET)
            teachers = {}
            for m, encoder in encoders.items():
                copied = copy.deepcopy(encoder)
                if init == "fresh":
                    reinitialise_(copied)
                teachers[m] = UnimodalTeacher(copied, encoder.feature_dim, num_classes)
        self.teachers = nn.ModuleDict(teachers)
        self.requires_grad_(False)
        count = len(self.modalities)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("accuracy", torch.zeros(count, dtype=torch.float64))  # best held-out accuracy
        self.register_buffer("best_epoch", torch.zeros(count, dtype=torch.long))  # 0: loaded from a file
        self.loaded: set[str] = set()  # not state: set again by every setup from the config
        self.train(False)

    @classmethod
    def for_model(cls, model, config: TeacherConfig, num_classes: int, ctx, part: str) -> "UnimodalTeachers":
        """Teachers for ``model``'s encoders, seeded with the run's seed, loading ``teacher_checkpoints``."""
        teachers = cls(dict(model.encoders), num_classes, config.teacher_init, ctx.generator.initial_seed())
        for m, path in config.teacher_checkpoints.items():
            teachers.load(m, path, f"{part}.teacher_checkpoints")
        return teachers

    def train(self, mode: bool = True) -> "UnimodalTeachers":
        """Teachers stay in eval mode whatever the method's mode (``fit_teacher`` trains them by itself)."""
        return super().train(False)

    def load(self, modality: str, path: str, option: str) -> None:
        from ..training.checkpoint import check_state_fits, load_checkpoint  # here: methods load before training

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"invalid value for {option}: teacher file for '{modality}' not found: {path}")
        saved = load_checkpoint(path, required=())
        state = saved["best"] if isinstance(saved.get("best"), dict) else saved
        teacher = self.teachers[modality]
        check_state_fits(state, teacher.state_dict(), f"teacher of '{modality}'", path)
        teacher.load_state_dict(state)
        self.loaded.add(modality)

    def fit(self, ctx, epochs: int) -> None:
        """Train every teacher not yet trained (nothing after a resume: ``ready`` is in the checkpoint)."""
        if bool(self.ready):
            return
        if ctx.fit_teacher is None:
            raise RuntimeError("unimodal teachers are trained by the trainer's ctx.fit_teacher, which this context lacks")
        for k, m in enumerate(self.modalities):
            teacher = self.teachers[m]
            if m in self.loaded:
                self.accuracy[k] = ctx.fit_teacher.accuracy(teacher, lambda t, batch, m=m: t(batch.inputs[m]))
                continue
            summary = ctx.fit_teacher(
                TEACHER_PREFIX + m, teacher,
                loss=lambda t, batch, m=m: F.cross_entropy(t(batch.inputs[m]), batch.labels),
                predict=lambda t, batch, m=m: t(batch.inputs[m]),
                epochs=epochs,
            )
            self.accuracy[k] = summary["best_accuracy"]
            self.best_epoch[k] = summary["best_epoch"]
        self.ready.fill_(True)
        self.train(False)

    @torch.no_grad()
    def encode(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """T_m.encode(x_m) for every modality (no graph)."""
        return {m: self.teachers[m].encode(inputs[m]) for m in self.modalities}

    @torch.no_grad()
    def logits(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """T_m(x_m), the teachers' unimodal logits (no graph)."""
        return {m: self.teachers[m](inputs[m]) for m in self.modalities}

    @torch.no_grad()
    def outputs(self, inputs: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """(f^T_m, l^T_m) = (T_m.encode(x_m), T_m.head(f^T_m)) for every modality: one encoder pass each, no graph."""
        result = {}
        for m in self.modalities:
            teacher = self.teachers[m]
            features = teacher.encode(inputs[m])
            result[m] = (features, teacher.head(features))
        return result

    def logs(self, prefix: str) -> dict[str, float]:
        """Per-epoch logs: each teacher's held-out accuracy (0 until trained)."""
        return {f"{prefix}/teacher_accuracy/{m}": float(a) for m, a in zip(self.modalities, self.accuracy.tolist())}
