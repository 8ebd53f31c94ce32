"""Patch masks for masked-autoencoder pretraining: uniform and entropy-guided.

A strategy turns raw images ``x: [B, C, H, W]`` in [0, 1] into a patch mask ``[B, h, w]``
(True = masked, ``h = H // patch``) with exactly ``round(ratio * h * w)`` masked patches per
image, drawn on ``x``'s device from a ``torch.Generator`` so that a seed reproduces the mask.

Entropy-guided masking (Florindo & Moura 2026) masks informative patches more often: the
per-patch Shannon entropy is standardised per image and patches are drawn without replacement
with probability proportional to ``exp(z / temperature)`` (Gumbel-top-k). Flat patches
(letterbox borders, padding) have the lowest entropy and so the lowest chance of being masked.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from medtl.errors import ConfigError
from medtl.registry import Registry

__all__ = [
    "MASKING",
    "EntropyMasking",
    "MaskingStrategy",
    "RandomMasking",
    "build_masking",
    "grid_size",
    "patch_entropy",
]


class MaskingStrategy(Protocol):
    """``strategy(x, patch, generator) -> mask [B, h, w]`` (bool, True = masked)."""

    @property
    def ratio(self) -> float:
        """The share of patches masked per image, in (0, 1)."""

    def __call__(
        self, x: torch.Tensor, patch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


MASKING: Registry[Callable[..., MaskingStrategy]] = Registry("masking strategy")


def grid_size(x: torch.Tensor, patch: int) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of images ``x: [B, C, H, W]``; H and W must be multiples of ``patch``."""
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if patch < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    height, width = x.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch}; "
            f"resize or pad to a multiple of {patch}"
        )
    return height // patch, width // patch


def patch_entropy(x: torch.Tensor, patch: int, bins: int = 32) -> torch.Tensor:
    """Shannon entropy in bits of each patch's intensity histogram: ``[B, C, H, W] -> [B, h, w]``.

    The histogram has ``bins`` fixed, equal bins on [0, 1] (values outside fall into the end
    bins) over one channel: the channel mean for RGB, the channel itself for grayscale. A
    constant patch has entropy 0; uniform noise approaches ``log2(bins)``.
    """
    h, w = grid_size(x, patch)
    if bins < 2:
        raise ValueError(f"entropy needs at least 2 histogram bins, got {bins}")
    gray = x.detach().float().mean(dim=1)  # [B, H, W]
    cells = gray.reshape(-1, h, patch, w, patch).transpose(2, 3).reshape(-1, h * w, patch * patch)
    index = (cells * bins).long().clamp_(0, bins - 1)  # bin k holds [k / bins, (k + 1) / bins)
    counts = torch.zeros(*index.shape[:2], bins, device=x.device)
    counts.scatter_add_(2, index, torch.ones_like(cells))
    prob = counts / (patch * patch)
    bits = -torch.special.xlogy(prob, prob).sum(dim=-1) / math.log(2)
    return bits.reshape(-1, h, w)


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio!r}")


def _check_generator(x: torch.Tensor, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the images are on {x.device}; "
            f"use torch.Generator(device=x.device)"
        )


def _uniform(x: torch.Tensor, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise ``[B, L]`` on x's device."""
    return torch.rand(x.shape[0], length, generator=generator, device=x.device)


def _topk_mask(scores: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Mask ``[B, h, w]`` with True at the ``k`` highest of ``scores: [B, L]`` in each row."""
    index = scores.topk(k, dim=1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)
    return mask.view(-1, *grid)


def _standardise(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row z-score of ``values: [B, L]``; a constant row becomes zeros."""
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, keepdim=True, correction=0)
    z = (values - mean) / std.clamp_min(eps)
    return torch.where(std > eps, z, torch.zeros_like(z))


@MASKING.register("random")
@dataclass(frozen=True)
class RandomMasking:
    """Uniform masking, as MAE: ``round(ratio * L)`` patches per image, every subset equally likely.

    The default ratio suits ConvNeXt (FCMAE: 0.6); ViTs usually take 0.75.
    """

    ratio: float = 0.6

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)

    def __call__(
        self, x: torch.Tensor, patch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x: [B, C, H, W] -> mask [B, H // patch, W // patch]`` (True = masked)."""
        grid = grid_size(x, patch)
        _check_generator(x, generator)
        length = grid[0] * grid[1]
        return _topk_mask(_uniform(x, length, generator), round(self.ratio * length), grid)


@MASKING.register("entropy")
@dataclass(frozen=True)
class EntropyMasking:
    """Entropy-guided masking: high-entropy patches are masked more often.

    Scores are ``z / temperature + Gumbel noise`` with ``z`` the per-image z-score of
    :func:`patch_entropy`; the top-k scores are masked, which samples patches without
    replacement with probability proportional to ``exp(z / temperature)``. Flat patches get
    the lowest scores, and the noise breaks their ties at random. ``temperature -> inf`` is
    uniform masking.

    ``random_share`` is a share of the masked *count*: ``round(random_share * k)`` of the
    ``k`` masked patches are first drawn uniformly (with the same draws as
    :class:`RandomMasking`, so ``random_share=1`` gives its masks for the same seed), and the
    rest are drawn by entropy among the remaining patches. It guarantees every patch a floor
    chance of being masked, which a temperature alone cannot.
    """

    ratio: float = 0.6
    temperature: float = 1.0
    random_share: float = 0.0
    bins: int = 32

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        if not self.temperature > 0.0:  # also refuses NaN
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.random_share <= 1.0:
            raise ValueError(f"random_share must be in [0, 1], got {self.random_share!r}")
        if self.bins < 2:
            raise ValueError(f"entropy needs at least 2 histogram bins, got {self.bins!r}")

    def __call__(
        self, x: torch.Tensor, patch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x: [B, C, H, W] in [0, 1] -> mask [B, H // patch, W // patch]`` (True = masked)."""
        grid = grid_size(x, patch)
        _check_generator(x, generator)
        length = grid[0] * grid[1]
        k = round(self.ratio * length)
        uniform = _uniform(x, length, generator)  # drawn first, as RandomMasking does
        scores = self.scores(x, patch, generator)
        k_random = round(self.random_share * k)
        if k_random:
            picked = uniform.topk(k_random, dim=1).indices
            scores = scores.scatter(1, picked, math.inf)
        return _topk_mask(scores, k, grid)

    def scores(
        self, x: torch.Tensor, patch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Perturbed scores ``[B, L]``: standardised entropy over temperature plus Gumbel noise."""
        z = _standardise(patch_entropy(x, patch, self.bins).flatten(1))
        exponential = torch.empty_like(z).exponential_(generator=generator)
        gumbel = -exponential.clamp_min(torch.finfo(z.dtype).tiny).log()
        return z / self.temperature + gumbel


def build_masking(name: str, **options: Any) -> MaskingStrategy:
    """The masking strategy registered as ``name`` (``"random"``, ``"entropy"``) with ``options``."""
    factory = MASKING.get(name)
    allowed = list(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"masking strategy {name!r} has no option {', '.join(unknown)} "
            f"(allowed: {', '.join(allowed)})"
        )
    return factory(**options)
