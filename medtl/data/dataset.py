"""MONAI loading: manifest rows to ``{"image": [C, S, S], "label": int, "row": str}`` items.

The transform chain is deterministic first (read, channel handling, resize, float32), then
random (augmentation, train only), so that MONAI's ``CacheDataset`` (memory) and
``PersistentDataset`` (disk) cache everything up to the first random transform. Intensities
stay in ``[0, 1]``: normalisation to a backbone's mean / std happens in the model, and entropy
masking needs the raw intensities.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import worker_init_fn
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityFixedMeand,
    Resize,
    ScaleIntensityRanged,
    SpatialPadd,
)
from pydantic import BaseModel, Field, model_validator
from torch.utils.data import DataLoader

from medtl.data.manifest import Manifest, check_relative_path, check_root, resolve
from medtl.data.readers import read_array
from medtl.errors import ConfigError, DataError, MedtlError

log = logging.getLogger(__name__)

KEYS = ("image",)
# Bump when the deterministic transforms change, so that disk caches written before are unused.
PIPELINE_VERSION = 1
# ITU-R BT.601 luma weights: RGB -> one grey channel.
LUMA_601 = (0.299, 0.587, 0.114)
Augment = Literal["none", "light", "medium"]


class LoaderConfig(BaseModel, extra="forbid"):
    """How images are read, resized, cached and normalised: the recipe's ``data.loader``.

    Augmentation and batch size are not here: each stage sets its own (``pretrain.augment``,
    ``finetune.batch_size``, ...) and builds a :class:`DataConfig` from this one.
    """

    image_size: int = Field(128, ge=8, description="Side S of the square model input, in pixels.")
    channels: Literal[1, 3] = Field(
        3,
        description="Channels given to the model: 3 repeats grey images, 1 converts RGB to "
        "luminance (ITU-R 601). An alpha channel is always dropped.",
    )
    resize: Literal["squash", "letterbox"] = Field(
        "squash",
        description="'squash' resizes to S x S ignoring the aspect ratio; 'letterbox' resizes "
        "the longest side to S and pads the other with zeros.",
    )
    cache: Literal["none", "memory", "disk"] = Field(
        "none",
        description="Cache the deterministic part of the pipeline: 'memory' (MONAI "
        "CacheDataset, filled when the dataset is built) or 'disk' (PersistentDataset in "
        "cache_dir, reused across runs).",
    )
    cache_dir: str | None = Field(
        None,
        description="Folder of the disk cache; required when cache is 'disk'. Each manifest and "
        "resize setting gets its own subfolder.",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="Threads that fill the memory cache, and the worker processes of "
        "build_loader (the training stages' DataLoader workers are pretrain.num_workers and "
        "finetune.num_workers).",
    )
    normalize: Literal["backbone", "dataset"] = Field(
        "backbone",
        description="Standardisation before the network: 'backbone' uses the backbone's "
        "mean/std (ImageNet's: what ImageNet weights expect); 'dataset' the training split's "
        "per-channel mean/std at this size, computed when training starts and stored with the "
        "model, for images far darker or brighter than photographs trained from scratch or "
        "from a medtl encoder (ConvNeXt's LayerNorms discard a large shared offset).",
    )

    @model_validator(mode="after")
    def _disk_cache_needs_dir(self) -> LoaderConfig:
        if self.cache == "disk" and not self.cache_dir:
            raise ValueError("cache 'disk' needs cache_dir: set data.cache_dir to a folder")
        return self

    def data_config(self, augment: Augment = "none", batch_size: int = 32) -> DataConfig:
        """This loader with a stage's augmentation and batch size."""
        return DataConfig(**self.model_dump(), augment=augment, batch_size=batch_size)


class DataConfig(LoaderConfig):
    """How images are read, resized, augmented, cached and batched: a :class:`LoaderConfig`
    plus what a stage sets for itself."""

    augment: Augment = Field(
        "none",
        description="Train-time augmentation: 'light' is a horizontal flip and a small affine "
        "(rotation within 10 degrees, scale 0.9-1.1); 'medium' adds contrast and gamma jitter "
        "and Gaussian noise.",
    )
    batch_size: int = Field(32, ge=1, description="Images per batch.")


# -- transforms ---------------------------------------------------------------------------
class LoadSampled(MapTransform):
    """Read ``d["image"]`` (a path relative to ``root``) as ``float32 [C, H, W]`` in [0, 1].

    Paths go through :func:`medtl.data.manifest.resolve`, so nothing outside the data root is
    read; pixels through :func:`medtl.data.readers.read_array` (MONAI's
    ``PILReader(reverse_indexing=False)`` for image files), addressed by ``d["locator"]``.
    An item may carry its own ``d["root"]`` (a pretraining corpus pools several roots).
    """

    def __init__(self, root: str | Path, keys: Sequence[Hashable] = KEYS) -> None:
        super().__init__(keys)
        self.root = Path(root)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        locator = str(d.get("locator", ""))
        root = Path(d["root"]) if "root" in d else self.root
        for key in self.key_iterator(d):
            file = resolve(root, str(d[key]))
            pixels = read_array(file, locator)
            if pixels.shape[0] not in (1, 2, 3, 4):
                raise DataError(
                    f"{file} has {pixels.shape[0]} channels; medtl reads grey, RGB and RGBA "
                    "images (1 to 4 channels): convert or remove it"
                )
            # contiguous: an RGB image arrives as a channel-last view, which torch pools slowly
            d[key] = torch.from_numpy(np.ascontiguousarray(pixels))
        return d


class EnsureChannelsd(MapTransform):
    """``[C, H, W]`` with C in 1-4 to ``[channels, H, W]``.

    Alpha is dropped (RGBA -> RGB, grey+alpha -> grey), grey is repeated to 3 channels, and RGB
    becomes ITU-R 601 luminance for ``channels=1``.
    """

    def __init__(self, keys: Sequence[Hashable], channels: int) -> None:
        super().__init__(keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d

    def convert(self, img: torch.Tensor) -> torch.Tensor:
        """``img: [C, H, W]`` -> ``[channels, H, W]``."""
        if img.shape[0] in (2, 4):  # grey + alpha, RGBA
            img = img[:-1]
        if img.shape[0] not in (1, 3):
            raise ValueError(f"expected 1 to 4 channels, got image of shape {tuple(img.shape)}")
        if img.shape[0] == self.channels:
            return img
        if self.channels == 3:
            return img.repeat(3, 1, 1)
        weights = torch.tensor(LUMA_601, dtype=img.dtype, device=img.device)
        return (img * weights[:, None, None]).sum(dim=0, keepdim=True)


class AdaptiveResized(MapTransform):
    """MONAI ``Resize`` to side ``size``: ``area`` when shrinking, ``bilinear`` when enlarging.

    ``size_mode="all"`` gives ``[C, size, size]``; ``"longest"`` scales the longest side to
    ``size`` and keeps the aspect ratio. Area averaging needs no separate anti-aliasing filter
    (MONAI's Gaussian one cost more than decoding the PNG, 3 ms a BUSI image), and bilinear
    avoids the blocks that area (then nearest) gives when enlarging a small image.
    """

    def __init__(self, keys: Sequence[Hashable], size: int, size_mode: str = "all") -> None:
        super().__init__(keys)
        spatial = (size, size) if size_mode == "all" else size
        self.size = size
        self.shrink = Resize(spatial, size_mode=size_mode, mode="area")
        self.enlarge = Resize(spatial, size_mode=size_mode, mode="bilinear")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            resize = self.shrink if max(d[key].shape[1:]) > self.size else self.enlarge
            d[key] = resize(d[key])
        return d


def deterministic_transforms(cfg: DataConfig, root: str | Path) -> list[MapTransform]:
    """Read, fix channels, resize to ``[channels, S, S]`` float32: the cacheable part."""
    size = cfg.image_size
    chain: list[MapTransform] = [LoadSampled(root), EnsureChannelsd(KEYS, cfg.channels)]
    if cfg.resize == "squash":
        chain.append(AdaptiveResized(KEYS, size))
    else:
        chain.append(AdaptiveResized(KEYS, size, size_mode="longest"))
        chain.append(SpatialPadd(KEYS, spatial_size=(size, size), mode="constant"))
    chain.append(EnsureTyped(KEYS, dtype=torch.float32, track_meta=False))
    return chain


def augment_transforms(augment: str) -> list[MapTransform]:
    """Random train-time transforms on ``[C, S, S]``; the output is clipped back to [0, 1]."""
    if augment == "none":
        return []
    chain: list[MapTransform] = [
        RandFlipd(KEYS, prob=0.5, spatial_axis=1),  # axis 1 of (H, W): left-right
        RandAffined(
            KEYS,
            prob=0.5,
            rotate_range=math.radians(10),
            scale_range=(0.1, 0.1),
            padding_mode="zeros",
        ),
    ]
    if augment == "medium":
        chain += [
            RandScaleIntensityFixedMeand(KEYS, prob=0.5, factors=0.2),  # contrast
            RandAdjustContrastd(KEYS, prob=0.5, gamma=(0.7, 1.5)),  # gamma
            RandGaussianNoised(KEYS, prob=0.5, std=0.02),
        ]
    # identity map with clip=True: contrast scaling and noise must not leave [0, 1]
    chain.append(ScaleIntensityRanged(KEYS, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True))
    chain.append(EnsureTyped(KEYS, dtype=torch.float32, track_meta=False))
    return chain


def build_transforms(cfg: DataConfig, root: str | Path, train: bool, seed: int = 0) -> Compose:
    """The whole chain, deterministic part first; random transforms seeded with ``seed``."""
    chain = deterministic_transforms(cfg, root)
    if train:
        chain += augment_transforms(cfg.augment)
    return Compose(chain).set_random_state(seed=seed)


# -- datasets -----------------------------------------------------------------------------
@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a :class:`MedtlError` that MONAI wrapped in ``RuntimeError("applying ...")``."""
    try:
        yield
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, MedtlError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


class PlainDataset(Dataset):
    """MONAI ``Dataset`` whose user errors reach the caller unwrapped."""

    def _transform(self, index: int) -> Any:
        with user_errors():
            return super()._transform(index)


class MemoryCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` whose user errors reach the caller unwrapped."""

    def _load_cache_item(self, idx: int) -> Any:
        with user_errors():
            return super()._load_cache_item(idx)

    def _transform(self, index: int) -> Any:
        with user_errors():
            return super()._transform(index)


class DiskCacheDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` whose user errors reach the caller unwrapped."""

    def _transform(self, index: int) -> Any:
        with user_errors():
            return super()._transform(index)


def data_dicts(manifest: Manifest, split: str) -> list[dict[str, Any]]:
    """One dict per row of ``split``: path, locator, label index (-1 unlabelled) and row id."""
    return [
        {
            "image": check_relative_path(row.path),
            "locator": row.locator,
            "label": manifest.label_index(row.label),
            "row": row.id,
        }
        for row in manifest.split(split)
    ]


def cache_key(manifest: Manifest, cfg: DataConfig) -> str:
    """Disk-cache subfolder name: the manifest hash plus the deterministic settings."""
    settings = {
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "resize": cfg.resize,
        "pipeline": PIPELINE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{manifest.sha256[:16]}-{digest[:12]}"


def build_dataset(
    manifest: Manifest,
    split: str,
    root: str | Path,
    cfg: DataConfig,
    train: bool = False,
    seed: int = 0,
) -> Dataset:
    """MONAI dataset of one split; items are ``{"image": [C, S, S], "label", "row", ...}``.

    ``cfg.cache`` picks ``Dataset``, ``CacheDataset`` (filled here) or ``PersistentDataset``
    (in ``cache_dir/<manifest hash>-<settings hash>``).
    """
    root = check_root(root)
    data = data_dicts(manifest, split)
    transform = build_transforms(cfg, root, train=train, seed=seed)
    if cfg.cache == "memory":
        return MemoryCacheDataset(
            data, transform, num_workers=max(cfg.num_workers, 1), progress=False
        )
    if cfg.cache == "disk":
        if not cfg.cache_dir:  # DataConfig checks this, model_copy(update=...) does not
            raise ConfigError("cache 'disk' needs cache_dir: set data.cache_dir to a folder")
        cache_dir = Path(cfg.cache_dir) / cache_key(manifest, cfg)
        return DiskCacheDataset(data, transform, cache_dir=cache_dir)
    return PlainDataset(data, transform)


def channel_stats(
    manifest: Manifest, root: str | Path, cfg: DataConfig, split: str = "train"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``split`` as the model sees it (resized,
    not augmented), accumulated in float64; no other split is read."""
    plain = cfg.model_copy(update={"cache": "none" if cfg.cache == "memory" else cfg.cache})
    dataset = build_dataset(manifest, split, root, plain)
    total = torch.zeros(cfg.channels, dtype=torch.float64)
    squares = torch.zeros(cfg.channels, dtype=torch.float64)
    count = 0
    for i in range(len(dataset)):  # type: ignore[arg-type]
        image = torch.as_tensor(dataset[i]["image"], dtype=torch.float64).flatten(1)
        total += image.sum(dim=1)
        squares += image.pow(2).sum(dim=1)
        count += image.shape[1]
    if count == 0:
        raise DataError(
            f"split '{split}' of the manifest is empty: no statistics to normalise with"
        )
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def input_stats(
    manifest: Manifest, root: str | Path, data_cfg: DataConfig
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``data.loader.normalize``: the training split's per-channel mean / std (logged), or
    ``None`` for the backbone's own."""
    if data_cfg.normalize != "dataset":
        return None, None
    mean, std = channel_stats(manifest, root, data_cfg)
    log.info("normalising with the training split's mean %s and std %s", mean, std)
    return mean, std


def build_loader(
    dataset: Dataset, cfg: DataConfig, train: bool = False, seed: int = 0
) -> DataLoader:
    """Batches ``{"image": [B, C, S, S], "label": [B], "row": list[str]}``.

    Train loaders shuffle with a generator seeded by ``seed``; workers reseed the MONAI
    random transforms from it, so a run is reproducible for a given ``num_workers``.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=cfg.num_workers,
        generator=generator,
        worker_init_fn=worker_init_fn,
        persistent_workers=cfg.num_workers > 0,
    )
