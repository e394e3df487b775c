"""The multimodal model: per-modality encoders, a fusion head, unimodal heads.

It knows nothing of training methods. Its three calls are everything a
method needs: ``encode`` the inputs, ``fuse`` any feature dict (aligned,
misaligned or with modalities zeroed), and read the unimodal ``heads``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .encoders import Encoder, build_encoder
from .fusion import Fusion, build_fusion


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, num_classes: int):
        super().__init__()
        self.modalities = list(encoders)
        self.num_classes = num_classes
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(enc.feature_dim, num_classes) for m, enc in encoders.items()}
        )

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: enc.feature_dim for m, enc in self.encoders.items()}

    def encode(self, inputs: dict[str, Tensor], modalities: Iterable[str] | None = None) -> dict[str, Tensor]:
        names = self.modalities if modalities is None else list(modalities)
        return {m: self.encoders[m](inputs[m]) for m in names}

    def fuse(self, features: dict[str, Tensor]) -> Tensor:
        return self.fusion(features)

    def heads(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.unimodal_heads[m](f) for m, f in features.items()}

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.fuse(self.encode(inputs))

    def parameter_groups(self) -> dict[str, dict[str, list[nn.Parameter]]]:
        """Parameters by role, so methods never guess ownership from names."""
        return {
            "encoder": {m: list(e.parameters()) for m, e in self.encoders.items()},
            "heads": {m: list(h.parameters()) for m, h in self.unimodal_heads.items()},
            "fusion": {"fusion": list(self.fusion.parameters())},
        }


def zero_out(features: dict[str, Tensor], keep: Iterable[str]) -> dict[str, Tensor]:
    """The feature dict with every modality outside ``keep`` replaced by zeros."""
    keep = set(keep)
    return {m: f if m in keep else torch.zeros_like(f) for m, f in features.items()}


def keep_features(features: dict[str, Tensor], keep: Tensor | None, modalities: list[str]) -> dict[str, Tensor]:
    """Per sample, zero the features of the modalities ``keep`` (B × M, in ``modalities`` order) drops."""
    if keep is None:
        return features
    return {m: f * keep[:, modalities.index(m)].to(f.dtype).view(-1, *([1] * (f.dim() - 1))) for m, f in features.items()}


def build_model(model_config, modalities: list[str], input_shapes: dict[str, tuple], num_classes: int,
                input_dtypes: dict | None = None) -> MultimodalModel:
    encoders = {}
    for m in modalities:
        name = model_config.encoders.get(m, model_config.encoder)
        encoders[m] = build_encoder(
            name, input_shapes[m], model_config.feature_dim, model_config.hidden_dim, model_config.dropout,
            modality=m, input_dtype=(input_dtypes or {}).get(m),
        )
    for key in ("encoders", "pretrained"):
        unknown = [m for m in getattr(model_config, key) if m not in modalities]
        if unknown:
            raise ConfigError(
                f"model.{key} names modality '{unknown[0]}', which the dataset lacks (modalities: {', '.join(modalities)})"
            )
    for m, path in model_config.pretrained.items():
        encoders[m].load_pretrained(path)
    fusion = build_fusion(model_config.fusion, {m: e.feature_dim for m, e in encoders.items()}, num_classes, model_config.hidden_dim)
    return MultimodalModel(encoders, fusion, num_classes)
