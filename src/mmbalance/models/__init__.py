"""Encoders, fusion heads and the multimodal model."""

from .encoders import Encoder, build_encoder
from .fusion import Fusion, build_fusion
from .multimodal import MultimodalModel, build_model, zero_out

__all__ = ["Encoder", "Fusion", "MultimodalModel", "build_encoder", "build_fusion", "build_model", "zero_out"]
