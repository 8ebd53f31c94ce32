"""Blocks from timm's parameter grouping: coverage, order and names for each family."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import nn

from medtl.errors import ConfigError
from medtl.finetune.blocks import Block, block_modules, block_parameters, blocks_of
from medtl.models import Classifier, build_classifier, head_keys

# backbone, extra timm arguments, expected block names (worked out from timm's group_matcher)
FAMILIES: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "convnext": ("medtl_tiny_convnext", {}, ["stem", "stage1", "stage2", "stage3", "stage4"]),
    "vit": ("medtl_tiny_vit", {}, ["stem", "stage1", "stage2"]),  # stageK = blocks.{K-1}
    "resnet": ("test_resnet", {}, ["stem", "stage1", "stage2", "stage3", "stage4"]),
    "efficientnet": (
        "test_efficientnet",
        {},
        ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"],
    ),
    "densenet": (  # densenet121's layout with 1-2 layers per dense block, growth 4
        "densenet121",
        {"growth_rate": 4, "block_config": (1, 2, 1, 1), "bn_size": 2},
        ["stem", "stage1", "stage2", "stage3", "stage4"],
    ),
}


def _classifier(family: str) -> Classifier:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return build_classifier(name, num_classes=3, in_chans=1, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_in_exactly_one_block(family: str) -> None:
    model = _classifier(family)
    blocks = blocks_of(model)
    params = [n for b in blocks for n in b.param_names]
    buffers = [n for b in blocks for n in b.buffer_names]
    assert sorted(params) == sorted(n for n, _ in model.named_parameters())
    assert len(params) == len(set(params))
    assert sorted(buffers) == sorted(f"backbone.{n}" for n, _ in model.backbone.named_buffers())
    assert len(buffers) == len(set(buffers))
    assert all(b.param_names for b in blocks)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_names_and_order_stem_first_head_last(family: str) -> None:
    model = _classifier(family)
    blocks = blocks_of(model)
    assert [b.name for b in blocks] == [*FAMILIES[family][2], "head"]
    assert [b.index for b in blocks] == list(range(len(blocks)))
    heads = {f"backbone.{k}" for k in head_keys(model.backbone)}
    assert set(blocks[-1].param_names) == {n for n, _ in model.named_parameters() if n in heads}


def test_stages_follow_forward_order() -> None:
    blocks = blocks_of(_classifier("resnet"))
    for k in range(1, 5):
        names = blocks[k].param_names
        assert names and all(n.startswith(f"backbone.layer{k}.") for n in names)
    assert all(n.startswith(("backbone.conv1", "backbone.bn1")) for n in blocks[0].param_names)


@pytest.mark.parametrize(
    ("family", "final_norm"),
    [
        ("densenet", "backbone.features.norm5.weight"),
        ("convnext", "backbone.head.norm.weight"),
        ("vit", "backbone.norm.weight"),
        ("efficientnet", "backbone.bn2.weight"),
    ],
)
def test_final_norm_joins_the_last_stage(family: str, final_norm: str) -> None:
    blocks = blocks_of(_classifier(family))
    assert final_norm in blocks[-2].param_names


def test_plain_timm_model_has_unprefixed_names() -> None:
    torch.manual_seed(0)
    classifier = _classifier("convnext")
    plain = blocks_of(classifier.backbone)
    wrapped = blocks_of(classifier)
    assert [b.name for b in plain] == [b.name for b in wrapped]
    assert plain[2].param_names == [n.removeprefix("backbone.") for n in wrapped[2].param_names]


def test_block_parameters_are_the_model_tensors() -> None:
    model = _classifier("vit")
    blocks = blocks_of(model)
    named = dict(model.named_parameters())
    for block in blocks:
        got = block_parameters(model, block)
        assert [id(p) for p in got] == [id(named[n]) for n in block.param_names]


def test_block_modules_hold_each_batchnorm_once() -> None:
    model = _classifier("resnet")
    found = [
        name
        for b in blocks_of(model)
        for name, m in block_modules(model, b)
        if isinstance(m, nn.BatchNorm2d)
    ]
    every = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(found) == sorted(every) and len(every) > 5
    stem = blocks_of(model)[0]
    assert "backbone.bn1" in dict(block_modules(model, stem))


def test_stale_blocks_are_an_error() -> None:
    block = Block("stage9", 9, ["backbone.nowhere.weight"])
    with pytest.raises(ValueError, match="nowhere"):
        block_parameters(_classifier("vit"), block)


def test_a_module_without_timm_grouping_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="group_matcher"):
        blocks_of(nn.Sequential(nn.Linear(2, 2)))


def test_headless_backbone_has_an_empty_head_block() -> None:
    model = timm.create_model("medtl_tiny_convnext", pretrained=False, num_classes=0)
    blocks = blocks_of(model)
    assert blocks[-1].name == "head" and blocks[-1].param_names == []
    assert sum(len(b.param_names) for b in blocks) == len(list(model.parameters()))
