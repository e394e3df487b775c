"""Encoders: one per modality, each mapping an input batch to ``(B, feature_dim)``.

``auto`` picks by input shape: vectors get an MLP, 1-D signals ``(C, L)`` and
images ``(C, H, W)`` a small CNN; ResNet-18 is chosen explicitly for
spectrograms and frames. Inputs with frames ``(T, C, H, W)`` are folded into
the batch and their features averaged over time.

``Encoder.staged()`` splits an encoder's forward into pieces (``EncoderStages``)
for methods that act between its stages (Greedy's MMTM blocks); composing the
pieces is the forward pass bit for bit, and encoders without stages return None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import ENCODERS
from .pretrained import PretrainedReport, from_torchvision_resnet, looks_like_torchvision_resnet


FLOAT_ENCODERS = (
    "mlp (vectors), cnn or resnet18 (signals, images, spectrograms, frames), transformer (sequences (T, D))"
)


@dataclass(frozen=True)
class EncoderStages:
    """An encoder's forward pass in pieces: ``finish(stage_K(…stage_1(prepare(x))), frames)`` is ``encoder(x)``.

    ``prepare(x)`` returns ``(h, frames)``: the input as the first stage reads
    it (float, frame stacks (T, C, H, W) folded into the batch, so ``h`` has
    B·frames rows; frames = 1 without them). ``stages`` are applied in order;
    stage k's output is (B·frames, widths[k], *spatial) or, for vectors,
    (B, widths[k]). ``finish(h, frames)`` pools, projects and averages the
    frames of each sample. The pieces share the encoder's modules: nothing is
    copied and the state dict is the encoder's own.
    """

    prepare: Callable[[Tensor], tuple[Tensor, int]]
    stages: tuple[Callable[[Tensor], Tensor], ...]
    widths: tuple[int, ...]
    finish: Callable[[Tensor, int], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        h, frames = self.prepare(x)
        for stage in self.stages:
            h = stage(h)
        return self.finish(h, frames)


class Encoder(nn.Module):
    """Base: knows its input shape (without the batch) and its output width."""

    # True for encoders that look token ids up in a table: float features are not ids.
    reads_token_ids: ClassVar[bool] = False
    #: what ``load_pretrained`` loaded (None until it runs)
    pretrained_report: Optional[PretrainedReport] = None

    def __init__(self, input_shape: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.feature_dim = feature_dim

    def staged(self) -> Optional[EncoderStages]:
        """The forward pass split into stages (``EncoderStages``), or None for an encoder without stages."""
        return None

    def load_pretrained(self, path: str | Path) -> PretrainedReport:
        """Load local weights with one-line errors; returns what was loaded (kept as ``pretrained_report``).

        The encoder's own layout (``torch.save(encoder.state_dict(), path)``)
        must fit exactly; an encoder may also read another library's layout
        (``foreign_weights``: torchvision's ResNet-18 for ``resnet18``).
        """
        kind = getattr(self, "registry_name", type(self).__name__)
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{kind} encoder weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means the same: not a usable state dict
            raise ConfigError(f"cannot load {kind} encoder weights from {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{path} does not hold a state dict (got {type(state).__name__})")
        own = self.state_dict()
        foreign = None if set(state) == set(own) else self.foreign_weights(state, path)
        if foreign is None:
            try:
                self.load_state_dict(state)
            except RuntimeError as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                detail = lines[1] if len(lines) > 1 else lines[0]  # the first line only names the module
                raise ConfigError(f"{kind} encoder weights in {path} do not fit: {detail}") from None
            report = PretrainedReport(path=path, layout="own", loaded=list(own))
        else:
            mapped, report = foreign
            self.load_state_dict(mapped, strict=False)  # every key and shape checked; the rest is reported
        self.pretrained_report = report
        return report

    def foreign_weights(self, state: dict, path: Path) -> Optional[tuple[dict[str, Tensor], PretrainedReport]]:
        """Weights in another library's layout mapped onto ours, with a report; None: read as our own layout."""
        return None


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
    """Two-layer perceptron for feature vectors (inputs are flattened)."""

    def __init__(self, input_shape, feature_dim=64, hidden_dim=128, dropout=0.0):
        super().__init__(input_shape, feature_dim)
        in_dim = int(torch.tensor(input_shape).prod())
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, feature_dim),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())

    def staged(self) -> EncoderStages:
        """One stage: the hidden layer (flatten, linear, ReLU, dropout), (B, hidden_dim)."""
        return EncoderStages(
            prepare=lambda x: (x.float(), 1),
            stages=(self.net[:4],),
            widths=(self.net[1].out_features,),
            finish=lambda h, frames: self.net[4:](h),
        )


def _channels_of(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(channels, spatial_dims)`` for (L,), (C, L), (C, H, W) or (T, C, H, W) inputs."""
    if len(input_shape) == 1:
        return 1, 1
    if len(input_shape) == 2:
        return input_shape[0], 1
    if len(input_shape) in (3, 4):
        return input_shape[-3], 2
    raise ConfigError(f"no convolutional encoder for inputs of shape {tuple(input_shape)}")


class _FrameFolding(Encoder):
    """Shared handling of (T, C, H, W) frame stacks and of channel-less inputs."""

    def _prepare(self, x: Tensor) -> tuple[Tensor, int]:
        x = x.float()
        frames = 1
        if len(self.input_shape) == 1:
            x = x.unsqueeze(1)
        elif len(self.input_shape) == 4:
            batch, frames = x.shape[:2]
            x = x.reshape(batch * frames, *x.shape[2:])
        return x, frames

    @staticmethod
    def _pool_frames(features: Tensor, frames: int) -> Tensor:
        if frames == 1:
            return features
        return features.reshape(-1, frames, features.shape[-1]).mean(dim=1)


@ENCODERS.register("cnn")
class SmallCNNEncoder(_FrameFolding):
    """Three conv blocks and global average pooling; 1-D or 2-D by input shape."""

    def __init__(self, input_shape, feature_dim=64, hidden_dim=128, dropout=0.0):
        super().__init__(input_shape, feature_dim)
        channels, dims = _channels_of(self.input_shape)
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        widths = [channels, 32, 64, hidden_dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [conv(cin, cout, 3, stride=2, padding=1), norm(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, pool, nn.Flatten(), nn.Dropout(dropout))
        self.proj = nn.Linear(hidden_dim, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        x, frames = self._prepare(x)
        return self._pool_frames(torch.relu(self.proj(self.body(x))), frames)

    def staged(self) -> EncoderStages:
        """Three stages, one per conv block (conv, batch norm, ReLU); widths 32, 64, hidden_dim."""
        blocks = tuple(self.body[i:i + 3] for i in (0, 3, 6))
        return EncoderStages(
            prepare=self._prepare,
            stages=blocks,
            widths=tuple(block[1].num_features for block in blocks),
            finish=lambda h, frames: self._pool_frames(torch.relu(self.proj(self.body[9:](h))), frames),
        )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@ENCODERS.register("resnet18")
class ResNet18Encoder(_FrameFolding):
    """ResNet-18 for spectrograms (1 channel), flow (2) and RGB frames (3).

    Output is the 512-d pooled feature, as in the field's audio-visual
    baselines; ``feature_dim`` other than 512 adds a linear projection.
    """

    def __init__(self, input_shape, feature_dim=512, hidden_dim=128, dropout=0.0):
        super().__init__(input_shape, feature_dim)
        channels, dims = _channels_of(self.input_shape)
        if dims != 2:
            raise ConfigError(
                f"resnet18 needs 2-D inputs (C, H, W) or frames (T, C, H, W), got shape {self.input_shape}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.proj = nn.Identity() if feature_dim == 512 else nn.Linear(512, feature_dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x, frames = self._prepare(x)
        features = self.proj(self.pool(self.stages(self.stem(x))))
        return self._pool_frames(features, frames)

    def foreign_weights(self, state: dict, path: Path):
        """torchvision's ResNet-18 layout (``models/pretrained.py``); a dict in neither layout is one line."""
        if any(str(key).startswith(("stem.", "stages.")) for key in state):
            return None  # our own layout with keys missing or extra: the exact load names them
        kind = getattr(self, "registry_name", type(self).__name__)
        if looks_like_torchvision_resnet(state):
            return from_torchvision_resnet(state, self.state_dict(), path, kind)
        shown = ", ".join(repr(key) for key in list(state)[:3]) or "none"
        raise ConfigError(
            f"{kind} encoder weights in {path} fit neither its own layout (stem.0.weight, stages.0.0.conv1.weight, ...) "
            f"nor torchvision's ResNet-18 (conv1.weight, layer1.0.conv1.weight, ...); its keys begin {shown}"
        )

    def staged(self) -> EncoderStages:
        """Four stages, after layers 1–4 (the stem runs with layer 1); widths 64, 128, 256, 512."""
        first = nn.Sequential(self.stem, self.stages[0])
        return EncoderStages(
            prepare=self._prepare,
            stages=(first, *self.stages[1:]),
            widths=(64, 128, 256, 512),
            finish=lambda h, frames: self._pool_frames(self.proj(self.pool(h)), frames),
        )


def auto_encoder_name(input_shape: tuple[int, ...]) -> str:
    return "mlp" if len(input_shape) == 1 else "cnn"


def check_encoder_input(name: str, modality: str, input_dtype: torch.dtype) -> None:
    """Refuse a token-id encoder for float features, which it would otherwise truncate to ids or crash on."""
    if name == "auto":
        return  # auto picks by shape among the float encoders
    cls = ENCODERS.get(name)
    if getattr(cls, "reads_token_ids", False) and (input_dtype.is_floating_point or input_dtype.is_complex):
        raise ConfigError(
            f"encoder '{name}' for modality '{modality}' reads integer token ids, but '{modality}' holds "
            f"float features ({input_dtype}); for float inputs use {FLOAT_ENCODERS}"
        )


def build_encoder(
    name: str,
    input_shape,
    feature_dim: int,
    hidden_dim: int,
    dropout: float,
    *,
    modality: str | None = None,
    input_dtype: torch.dtype | None = None,
) -> Encoder:
    """An encoder by registry name; given ``input_dtype`` (and ``modality``), its input kind is checked first."""
    if input_dtype is not None:
        check_encoder_input(name, modality or "?", input_dtype)
    if name == "auto":
        name = auto_encoder_name(tuple(input_shape))
    cls = ENCODERS.get(name)
    return cls(tuple(input_shape), feature_dim=feature_dim, hidden_dim=hidden_dim, dropout=dropout)
