"""Pretraining stage: patch masking strategies and masked autoencoders on timm backbones
(ConvNeXt, ViT, and BatchNorm CNNs: EfficientNet, ResNet)."""

from __future__ import annotations

from medtl.pretrain.cnn import CNNMAE
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
    "CNNMAE",
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
