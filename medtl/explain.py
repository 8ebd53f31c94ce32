"""Explanations: where a classifier looked, as Grad-CAM and occlusion-sensitivity maps.

Both come from MONAI (``monai.visualize.GradCAM`` / ``GradCAMpp`` and
``OcclusionSensitivity``). :func:`explain` is the one entry point (the report and
``medtl predict --explain`` call it); :func:`choose_examples` picks which test images to
explain: a seeded sample chosen by id alone (without looking at labels or predictions) plus
the most confident errors.

Grad-CAM needs a spatial feature map. Its layer is chosen from timm's ``feature_info`` (the
deepest stage whose map is at least :data:`MIN_SIDE` pixels a side at the model's input size),
not from hard-coded module names; a ViT's last-block tokens are laid out on their patch grid
by :class:`TokenGrid` so that the same Grad-CAM applies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.artifacts import ModelCard
from medtl.errors import ConfigError
from medtl.predictions import Predictions

METHODS = ("gradcam", "gradcampp", "occlusion")
MIN_SIDE = 7  # a Grad-CAM map coarser than 7 x 7 says little about where the model looked


@dataclass
class Explanation:
    """Maps of ``N`` images for the class each was explained for.

    ``maps[method]``: ``float32 [N, H, W]`` in ``[0, 1]`` (1 = most important); ``target``:
    ``[N]`` class indices; ``probs``: calibrated probabilities ``[N, K]``; ``layer``: the
    module Grad-CAM read.
    """

    maps: dict[str, np.ndarray]
    target: np.ndarray
    probs: np.ndarray
    layer: str


# -- the layer Grad-CAM reads --------------------------------------------------------------------
class TokenGrid(nn.Module):
    """A ViT classifier whose patch tokens, on their way into the last block, pass through
    ``grid`` laid out as ``[B, C, h, w]``: Grad-CAM's target layer for a transformer (after
    the last block only the class token reaches the head, so its patch tokens get no
    gradient). Same outputs as ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model
        self.grid = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit: Any = self.model.backbone
        tokens = vit.norm_pre(
            vit.patch_drop(vit._pos_embed(vit.patch_embed(self.model.normalize(x))))
        )
        tokens = vit.blocks[:-1](tokens)  # [B, prefix + h * w, C]
        prefix, patches = tokens[:, : vit.num_prefix_tokens], tokens[:, vit.num_prefix_tokens :]
        b, n, c = patches.shape
        h, w = _grid(vit, x, n)
        grid = self.grid(patches.transpose(1, 2).reshape(b, c, h, w))
        tokens = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        return vit.forward_head(vit.norm(vit.blocks[-1](tokens)))


def _grid(vit: Any, x: torch.Tensor, n: int) -> tuple[int, int]:
    patch = vit.patch_embed.patch_size
    h, w = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
    if h * w != n:
        raise ValueError(f"{n} patch tokens do not fill a {h} x {w} grid")
    return h, w


def cam_layer(model: nn.Module, image_size: int) -> tuple[nn.Module, str]:
    """``(module to hook, layer name)`` for Grad-CAM: the deepest feature of timm's
    ``feature_info`` with a map of at least :data:`MIN_SIDE` px a side (else the shallowest);
    for a ViT (patch tokens), the :class:`TokenGrid` wrapper and its ``grid``."""
    backbone: Any = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "num_prefix_tokens"):
        return TokenGrid(model), "grid"
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ConfigError(
            f"{type(backbone).__name__} has no timm feature_info, so no Grad-CAM layer can be "
            "chosen; use the occlusion method"
        )
    stages = [f for f in info if image_size // int(f["reduction"]) >= MIN_SIDE] or [info[0]]
    return model, f"backbone.{stages[-1]['module']}"


# -- the maps ------------------------------------------------------------------------------------
def explain(
    model: nn.Module,
    card: ModelCard,
    images: torch.Tensor,
    methods: tuple[str, ...] = ("gradcam", "occlusion"),
    target: torch.Tensor | None = None,
) -> Explanation:
    """Maps of ``images: [N, C, S, S]`` (raw, in [0, 1], at ``card.image_size``) for the class
    in ``target`` (default: the predicted class of the calibrated probabilities)."""
    from medtl.export.network import CalibratedClassifier

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown explanation method(s) {bad}; choose from {', '.join(METHODS)}")
    model = model.eval()
    calibrated = CalibratedClassifier(model, card.calibrator, len(card.classes)).eval()
    with torch.no_grad():
        probs = calibrated(images)
    target = probs.argmax(dim=1) if target is None else target
    hooked, layer = cam_layer(model, card.image_size)
    maps = {}
    for method in methods:
        if method == "occlusion":
            maps[method] = occlusion_maps(calibrated, images, probs, target)
        else:
            maps[method] = cam_maps(hooked, layer, images, target, plus=method == "gradcampp")
    return Explanation(maps, target.numpy(), probs.numpy(), layer)


def cam_maps(
    model: nn.Module, layer: str, images: torch.Tensor, target: torch.Tensor, plus: bool = False
) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) of each image for its ``target`` class: ``[N, H, W]`` in [0, 1]."""
    from monai.visualize import GradCAM, GradCAMpp

    cam = (GradCAMpp if plus else GradCAM)(nn_module=model, target_layers=layer)
    out = [cam(x=img[None], class_idx=int(t))[0, 0] for img, t in zip(images, target, strict=True)]
    return torch.stack(out).detach().float().numpy()


def occlusion_maps(
    calibrated: nn.Module, images: torch.Tensor, probs: torch.Tensor, target: torch.Tensor
) -> np.ndarray:
    """Occlusion sensitivity: how much the target's calibrated probability drops when a
    Gaussian patch of 1/4 of the side hides each region, scaled to [0, 1] per image."""
    from monai.visualize import OcclusionSensitivity

    size = images.shape[-1]
    occ = OcclusionSensitivity(
        calibrated, mask_size=max(2, size // 4), n_batch=32, verbose=False, activate=False
    )
    out = []
    with torch.no_grad():
        for img, p, t in zip(images, probs, target, strict=True):
            occluded = occ(img[None])[0][0, int(t)]  # [1, K, H, W] -> [H, W]
            out.append(_unit(p[int(t)] - occluded))
    return torch.stack(out).float().numpy()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to [0, 1] (all zero when constant)."""
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


# -- which images ---------------------------------------------------------------------------------
def seeded_sample(ids: list[str], k: int, seed: int = 0) -> list[int]:
    """Indices of ``k`` ids chosen by a seeded hash of the id alone: the same images whatever
    the labels, predictions or the order of the rows."""
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]
    return sorted(sorted(range(len(ids)), key=keys.__getitem__)[:k])


def choose_examples(
    pred: Predictions, probs: np.ndarray, k: int = 4, n_errors: int = 4, seed: int = 0
) -> tuple[list[int], list[int]]:
    """``(sample, errors)`` row indices of ``pred``: :func:`seeded_sample` of ``k`` rows, and
    the ``n_errors`` misclassified labelled rows with the highest calibrated probability
    (``probs: [N, K]``) for the wrong class, most confident first."""
    called = probs.argmax(axis=1)
    wrong = np.flatnonzero((pred.labels >= 0) & (called != pred.labels))
    order = np.argsort(-probs[wrong, called[wrong]], kind="stable")[:n_errors]
    return seeded_sample(pred.ids, k, seed), [int(wrong[i]) for i in order]
