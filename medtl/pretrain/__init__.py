"""Pretraining stage: patch masking strategies and masked autoencoders on timm backbones."""

from __future__ import annotations

from medtl.pretrain.mae import ConvNeXtMAE, MaskedAutoencoder, ViTMAE, build_mae
from medtl.pretrain.masking import (
    MASKING,
    EntropyMasking,
    MaskingStrategy,
    RandomMasking,
    build_masking,
    patch_entropy,
)

__all__ = [
    "MASKING",
    "ConvNeXtMAE",
    "EntropyMasking",
    "MaskedAutoencoder",
    "MaskingStrategy",
    "RandomMasking",
    "ViTMAE",
    "build_mae",
    "build_masking",
    "patch_entropy",
]
