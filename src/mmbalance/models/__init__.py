"""Encoders, fusion heads and the multimodal model."""

from .encoders import Encoder, build_encoder
from .fusion import Fusion, build_fusion
from .multimodal import MultimodalModel, build_model, zero_out
from . import sequence, text  # noqa: F401  (registers the transformer and text encoders)

__all__ = ["Encoder", "Fusion", "MultimodalModel", "build_encoder", "build_fusion", "build_model", "zero_out"]
