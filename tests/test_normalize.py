"""``data.loader.normalize``: the backbone's mean/std by default, or the training split's,
computed from the training split only and carried with the encoder and the classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtl.data.dataset import DataConfig, build_dataset, channel_stats
from medtl.data.manifest import Manifest
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.finetune.loop import FinetuneConfig, finetune, load_classifier, predict
from medtl.models import IMAGENET_MEAN, IMAGENET_STD
from medtl.pretrain.loop import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    base = tmp_path_factory.mktemp("normalize")
    root = make_phantom(base / "phantom", n=24, size=32, duplicates=0)
    return prepare("folder", root, base / "m.csv", workers=1).manifest, root


def test_channel_stats_are_the_training_split_pixels_mean_and_std(
    phantom: tuple[Manifest, Path],
) -> None:
    manifest, root = phantom
    cfg = DataConfig(image_size=32, channels=1, cache="memory")
    mean, std = channel_stats(manifest, root, cfg)
    train = build_dataset(manifest, "train", root, cfg)
    pixels = torch.stack([train[i]["image"] for i in range(len(train))]).double()
    assert mean == pytest.approx([pixels.mean().item()], abs=1e-9)
    assert std == pytest.approx([pixels.std(unbiased=False).item()], abs=1e-9)
    val = build_dataset(manifest, "val", root, cfg)
    val_mean = torch.stack([val[i]["image"] for i in range(len(val))]).double().mean().item()
    assert mean[0] != pytest.approx(val_mean, abs=1e-6)  # val and test are never read


def test_dataset_statistics_travel_with_encoder_and_classifier(
    phantom: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = phantom
    cfg = DataConfig(image_size=32, channels=1, normalize="dataset", batch_size=8)
    mean, std = channel_stats(manifest, root, cfg)
    pre = PretrainConfig(backbone="medtl_tiny_convnext", epochs=1, batch_size=8)
    encoder = pretrain(pre, manifest, root, cfg, tmp_path / "pre", progress=False)
    assert encoder.meta["normalize"]["source"] == "dataset"
    assert encoder.meta["normalize"]["mean"] == pytest.approx(mean, rel=1e-6)

    ft = FinetuneConfig(backbone="medtl_tiny_convnext", epochs=1, batch_size=8, min_epochs=1)
    result = finetune(
        ft, manifest, root, cfg, tmp_path / "ft", weights=encoder.encoder, progress=False
    )
    assert result.meta["normalize"]["std"] == pytest.approx(std, rel=1e-6)
    model, _ = load_classifier(tmp_path / "ft")
    assert model.normalize.mean.flatten().tolist() == pytest.approx(mean, rel=1e-6)
    val = build_dataset(manifest, "val", root, cfg)
    _, _, logits = predict(model, val, 8, "cpu")
    assert np.allclose(logits, result.val.logits, atol=1e-5)


def test_default_is_the_backbones_statistics(
    phantom: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = phantom
    cfg = DataConfig(image_size=32, channels=3, batch_size=8)
    ft = FinetuneConfig(backbone="medtl_tiny_convnext", epochs=1, batch_size=8, min_epochs=1)
    result = finetune(ft, manifest, root, cfg, tmp_path / "ft", progress=False)
    stats = result.meta["normalize"]
    assert stats["source"] == "backbone"
    assert stats["mean"] == pytest.approx(IMAGENET_MEAN) and stats["std"] == pytest.approx(
        IMAGENET_STD
    )
    saved = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert saved["normalize"] == stats
