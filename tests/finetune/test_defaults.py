"""Start-dependent fine-tuning defaults: pretrained starts and scratch each get their own, the
resolved values reach the optimizer, the loss and the transforms, and the model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from medtl.artifacts import ModelCard
from medtl.errors import ConfigError
from medtl.finetune import defaults, loop, plan
from medtl.finetune.defaults import START_DEFAULTS, defaults_for, defaults_markdown, start_of
from medtl.finetune.loop import FinetuneConfig
from medtl.models import build_classifier
from tests.conftest import train_tiny

# what medtl used for every start before the distinction: scratch must keep it
SCRATCH_BEFORE = {
    "warmup_epochs": 1.0,
    "label_smoothing": 0.0,
    "augment": "light",
    "backbone_lr_scale": 1.0,
    "layer_decay": 1.0,
}
KNOBS = set(SCRATCH_BEFORE)


# a pretrained column unlike the scratch one in every knob, so that the tests below tell the two
# starts apart whatever values medtl's own table holds
DISTINCT = {
    "backbone_lr_scale": 0.5,
    "layer_decay": 0.8,
    "warmup_epochs": 3.0,
    "label_smoothing": 0.1,
    "augment": "medium",
}


@pytest.fixture
def distinct(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    table = tuple(replace(d, pretrained=DISTINCT[d.key]) for d in defaults.START_DEFAULTS)
    monkeypatch.setattr(defaults, "START_DEFAULTS", table)
    return DISTINCT


def _scales(p: object) -> dict[str, float]:
    return {g["name"].removesuffix(".no_decay"): g["lr_scale"] for g in p.param_groups}  # type: ignore[attr-defined]


def test_scratch_defaults_are_the_values_used_before() -> None:
    assert defaults_for("scratch") == SCRATCH_BEFORE
    resolved = FinetuneConfig(backbone="test_resnet").for_start()
    assert {k: getattr(resolved, k) for k in KNOBS} == SCRATCH_BEFORE
    assert resolved.strategy_options == {"backbone_lr_scale": 1.0, "layer_decay": 1.0}


@pytest.mark.parametrize("weights", ["pretrain", "imagenet:efficientnet_lite0"])
def test_a_pretrained_start_takes_the_pretrained_column(
    weights: str, distinct: dict[str, object]
) -> None:
    backbone = "efficientnet_lite0" if weights.startswith("imagenet") else "test_resnet"
    cfg = FinetuneConfig(backbone=backbone, weights=weights)
    assert cfg.start == "pretrained" and cfg.label_smoothing is None
    resolved = cfg.for_start()
    assert {k: getattr(resolved, k) for k in KNOBS} == distinct
    assert resolved.strategy_options == {"backbone_lr_scale": 0.5, "layer_decay": 0.8}
    scratch = FinetuneConfig(backbone=backbone).for_start()  # same table, no weights
    assert {k: getattr(scratch, k) for k in KNOBS} == SCRATCH_BEFORE


def test_the_pretrained_column_is_valid_for_every_key() -> None:
    """medtl's own table: each pretrained value passes the key's validation."""
    FinetuneConfig(backbone="test_resnet", weights="pretrain", **defaults_for("pretrained"))


def test_values_given_in_the_recipe_win_for_either_start() -> None:
    given = {"warmup_epochs": 0.0, "label_smoothing": 0.2, "augment": "medium"}
    for weights in (None, "pretrain"):
        cfg = FinetuneConfig(
            backbone="test_resnet", weights=weights, backbone_lr_scale=0.5, **given
        )
        resolved = cfg.for_start()
        assert {k: getattr(resolved, k) for k in given} == given
        assert resolved.strategy_options["backbone_lr_scale"] == 0.5


def test_strategy_options_win_and_a_conflict_is_one_error() -> None:
    cfg = FinetuneConfig(
        backbone="test_resnet", weights="pretrain", strategy_options={"layer_decay": 0.5}
    )
    resolved = cfg.for_start()
    assert resolved.layer_decay == 0.5 and resolved.strategy_options["layer_decay"] == 0.5
    both = FinetuneConfig(
        backbone="test_resnet", layer_decay=0.7, strategy_options={"layer_decay": 0.5}
    )
    with pytest.raises(ConfigError, match=r"finetune\.layer_decay=0\.7 and"):
        both.for_start()


def test_a_strategy_without_backbone_rates_refuses_the_key_and_ignores_the_default(
    distinct: dict[str, object],
) -> None:
    linear = FinetuneConfig(backbone="test_resnet", weights="pretrain", strategy="linear")
    resolved = linear.for_start()
    assert resolved.backbone_lr_scale is None and resolved.strategy_options == {}
    assert resolved.label_smoothing == distinct["label_smoothing"]
    with pytest.raises(ConfigError, match="strategy 'linear' takes no backbone_lr_scale"):
        FinetuneConfig(backbone="test_resnet", strategy="linear", backbone_lr_scale=0.1).for_start()


def test_an_unresolved_section_has_no_schedule() -> None:
    with pytest.raises(ValueError, match="for_start"):
        FinetuneConfig(backbone="test_resnet").schedule()
    assert (
        FinetuneConfig(backbone="test_resnet").for_start("pretrained").schedule().warmup_epochs
        == (defaults_for("pretrained")["warmup_epochs"])
    )


def test_start_of() -> None:
    assert start_of(None) == "scratch" and start_of("") == "scratch"
    assert start_of("pretrain") == "pretrained" and start_of(Path("w.safetensors")) == "pretrained"


def test_the_docs_table_is_generated_from_the_defaults() -> None:
    table = defaults_markdown()
    docs = (Path(__file__).resolve().parents[2] / "docs/finetune.md").read_text(encoding="utf-8")
    assert table in docs
    for d in START_DEFAULTS:
        assert f"`finetune.{d.key}`" in table


# -- layer-wise decay: the optimizer's groups -------------------------------------------------------
def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("medtl_tiny_convnext", num_classes=3, in_chans=1)


def test_layer_decay_lowers_each_block_towards_the_input() -> None:
    p = plan("full", _tiny(), backbone_lr_scale=0.5, layer_decay=0.5)
    want = {
        "stem": 0.5 * 0.5**5,
        "stage1": 0.5 * 0.5**4,
        "stage2": 0.5 * 0.5**3,
        "stage3": 0.5 * 0.5**2,
        "stage4": 0.5 * 0.5,
        "head": 1.0,
    }
    assert _scales(p) == pytest.approx(want)
    opt = torch.optim.AdamW(p.param_groups, lr=1e-3)  # lrs as fit sets them
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    lrs = {g["name"].removesuffix(".no_decay"): g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({k: 1e-3 * v for k, v in want.items()})
    with pytest.raises(ConfigError, match=r"layer_decay=1\.5"):
        plan("full", _tiny(), layer_decay=1.5)


def test_lpft_applies_layer_decay_after_the_probe() -> None:
    model = _tiny()
    p = plan("lpft", model, probe_epochs=1, layer_decay=0.5)
    assert p.on_epoch_start is not None
    assert set(_scales(p).values()) == {0.0, 1.0}
    p.on_epoch_start(model, 1)
    assert _scales(p) == pytest.approx(
        {"stem": 0.5**5, "stage1": 0.5**4, "stage2": 0.5**3, "stage3": 0.25, "stage4": 0.5}
        | {"head": 1.0}
    )


# -- end to end: finetune resolves for the start it loads and the card records it --------------------
def test_finetune_resolves_for_its_start_and_the_card_records_it(
    tmp_path: Path, distinct: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    train_tiny(tmp_path / "a", scratch, n=24, epochs=1, batch_size=8)
    card = ModelCard.load(scratch / "meta.json")
    assert card.defaults_for == "scratch"
    assert {k: card.config[k] for k in KNOBS} == SCRATCH_BEFORE
    assert {g["lr_scale"] for g in card.plan["groups"]} == {1.0}

    warm = tmp_path / "warm"
    augments: list[str] = []
    real_build = loop.build_dataset

    def spy(manifest: Any, split: str, root: Any, cfg: Any, **kwargs: Any) -> Any:
        if split == "train":
            augments.append(cfg.augment)
        return real_build(manifest, split, root, cfg, **kwargs)

    monkeypatch.setattr(loop, "build_dataset", spy)
    _finetune_from(tmp_path / "a", scratch / "model.safetensors", warm)
    assert augments == [distinct["augment"]]  # the resolved augmentation reaches the transforms
    card = ModelCard.load(warm / "meta.json")
    assert card.defaults_for == "pretrained"
    want: dict[str, float] = distinct  # type: ignore[assignment]
    assert {k: card.config[k] for k in KNOBS} == want
    head = [g for g in card.plan["groups"] if g["name"].startswith("head")]
    stem = [g for g in card.plan["groups"] if g["name"].startswith("stem")]
    assert {g["lr_scale"] for g in head} == {1.0}
    assert [g["lr_scale"] for g in stem] == pytest.approx(
        [want["backbone_lr_scale"] * want["layer_decay"] ** 5] * len(stem)
    )


def _finetune_from(base: Path, weights: Path, out: Path) -> None:
    """One epoch of ``medtl_tiny_convnext`` on ``train_tiny``'s phantom, from ``weights``."""
    from medtl.data.dataset import DataConfig
    from medtl.data.manifest import Manifest
    from medtl.finetune.loop import finetune

    cfg = FinetuneConfig(
        backbone="medtl_tiny_convnext", weights=str(weights), epochs=1, batch_size=8, min_epochs=1
    )
    manifest = Manifest.load(base / "m.csv")
    data = DataConfig(image_size=32, channels=1, batch_size=8)
    finetune(cfg, manifest, base / "phantom", data, out, weights=weights, progress=False)
