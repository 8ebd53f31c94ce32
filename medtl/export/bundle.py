"""A MONAI bundle of the calibrated network: ``configs/metadata.json``, ``configs/inference.json``
and ``models/model.ts`` (TorchScript, so the bundle runs without medtl installed).

The inference config reads images with MONAI's ``LoadImaged`` (``PILReader``,
``reverse_indexing=False``, as medtl does), fixes the channel count as medtl does (alpha
dropped, grey repeated, RGB to ITU-R 601 luminance), scales 8-bit intensities to [0, 1] and
resizes as the model card says. ``run`` writes ``predictions.json`` (file, calibrated
probability per class). Run it with::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \
        --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \
        --input_files "['scan1.png', 'scan2.png']"
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

from medtl import __version__
from medtl.artifacts import ModelCard
from medtl.data.dataset import LUMA_601
from medtl.io import write_json

BUNDLE_VERSION = "0.1.0"


def write_bundle(net: nn.Module, example: torch.Tensor, card: ModelCard, out: Path) -> None:
    """The bundle folder ``out`` (created) for ``net`` (calibrated probabilities)."""
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    with torch.no_grad():
        traced = torch.jit.trace(net.eval(), example)
    traced.save(str(out / "models" / "model.ts"))
    write_json(out / "configs" / "metadata.json", metadata(card))
    write_json(out / "configs" / "inference.json", inference_config(card))


def metadata(card: ModelCard) -> dict[str, Any]:
    """MONAI's bundle metadata: versions, task and the network's input and output formats."""
    size = [card.image_size, card.image_size]
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medtl {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": f"medtl {card.backbone} classifier",
        "task": f"classification into {', '.join(card.classes)}",
        "description": f"{card.backbone} fine-tuned with the {card.strategy} strategy; outputs "
        f"calibrated probabilities ({card.calibrator.label()}). Not a medical device.",
        "authors": "medtl export",
        "copyright": "see the model card's licence of the pretrained source",
        "intended_use": "research",
        "data_source": f"manifest SHA-256 {card.manifest_sha256}",
        "data_type": "image",
        "image_classes": f"{card.in_chans}-channel image in [0, 1]",
        "label_classes": ", ".join(card.classes),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "n/a",
                    "num_channels": card.in_chans,
                    "spatial_shape": size,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): f"channel {i}" for i in range(card.in_chans)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(card.classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): c for i, c in enumerate(card.classes)},
                }
            },
        },
        "python_version": platform.python_version(),
    }


def _channel_fix(in_chans: int) -> str:
    """A ``$`` expression: ``[C, H, W]`` with C in 1-4 to ``[in_chans, H, W]``, as medtl's
    ``EnsureChannelsd``."""
    if in_chans == 3:
        return "$lambda x: x.repeat(3, 1, 1) if x.shape[0] == 1 else x"
    luma = list(LUMA_601)
    return (
        f"$lambda x: (x * torch.tensor({luma}, dtype=x.dtype).view(3, 1, 1)).sum(0, "
        "keepdim=True) if x.shape[0] == 3 else x"
    )


def preprocessing(card: ModelCard) -> dict[str, Any]:
    s = card.image_size
    transforms: list[dict[str, Any]] = [
        {
            "_target_": "LoadImaged",
            "keys": "image",
            "reader": "PILReader",
            "reverse_indexing": False,
            "image_only": True,
            "ensure_channel_first": True,
        },
        {
            "_target_": "Lambdad",
            "keys": "image",
            "func": "$lambda x: x[:-1] if x.shape[0] in (2, 4) else x",
        },
        {"_target_": "Lambdad", "keys": "image", "func": _channel_fix(card.in_chans)},
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": 0.0,
            "a_max": 255.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    ]
    if card.resize == "squash":
        transforms.append(
            {"_target_": "Resized", "keys": "image", "spatial_size": [s, s], "mode": "area"}
        )
    else:
        transforms += [
            {
                "_target_": "Resized",
                "keys": "image",
                "spatial_size": s,
                "size_mode": "longest",
                "mode": "area",
            },
            {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [s, s]},
        ]
    transforms.append(
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": False}
    )
    return {"_target_": "Compose", "transforms": transforms}


def inference_config(card: ModelCard) -> dict[str, Any]:
    """``configs/inference.json``: override ``input_files`` (a list of paths) and optionally
    ``output_file`` and ``device``; ``run`` writes the predictions."""
    write = (
        "$open(@output_file, 'w').write(json.dumps([{'file': f, 'probabilities': dict(zip("
        "@classes, p))} for f, p in zip(@input_files, @probabilities.tolist())], indent=1))"
    )
    return {
        "imports": ["$import json", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "classes": list(card.classes),
        "input_files": [],
        "output_file": "$@bundle_root + '/predictions.json'",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "network": "$@network_def.eval()",
        "preprocessing": preprocessing(card),
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': f} for f in @input_files]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 16,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "probabilities": "$torch.cat([@inferer(b['image'].to(@device), @network).detach().cpu() for b in "
        "@dataloader]) if @input_files else torch.zeros(0, len(@classes))",
        "run": [write],
    }
