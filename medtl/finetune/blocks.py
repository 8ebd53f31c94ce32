"""A backbone cut into ordered blocks (stem, stages, head) from timm's own parameter grouping.

timm models describe their layer structure with ``group_matcher(coarse=True)``: regexes (or a
function) that map every parameter name to a stage. ``timm.models.group_with_matcher`` turns
that into ordered groups, so one code path serves ConvNeXt, ResNet, DenseNet, EfficientNet and
ViT without per-architecture index tables. Block names:

- ``stem``: timm's first group (patch embedding and tokens for a ViT);
- ``stage1`` .. ``stageN``: the following groups in forward order. For CNNs these are the
  stages (ResNet ``layerK``, ConvNeXt ``stages.K``, EfficientNet ``blocks.K``, DenseNet's
  ``denseblockK`` with the transition after it); for a ViT timm's coarse groups are the
  transformer blocks, so ``stageK`` is ``blocks.{K-1}``;
- ``head``: the classifier named by ``pretrained_cfg["classifier"]`` (:func:`head_keys`),
  always last.

Parameters no matcher claims (DenseNet's ``features.norm5``, ConvNeXt's ``head.norm``, a ViT's
``fc_norm``) sit after the last stage in forward order and join it, as timm's own matchers
do for a final norm (``MATCH_PREV_GROUP``). Buffers (BatchNorm running statistics) follow their
module into the same block. Given a :class:`~medtl.models.Classifier`, names are those of
``classifier.named_parameters()`` (prefixed ``backbone.``), since strategies act on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from timm.models._manipulate import group_with_matcher
from torch import nn

from medtl.errors import ConfigError
from medtl.models import head_keys

HEAD = "head"
STEM = "stem"


@dataclass
class Block:
    """One trainable unit of a backbone: its name, position and tensor names."""

    name: str
    index: int
    param_names: list[str]
    buffer_names: list[str] = field(default_factory=list)


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The timm model inside ``model`` and the prefix of its names within ``model``.

    A timm model is its own backbone (prefix ``""``); a wrapper with a ``backbone`` attribute
    (the :class:`~medtl.models.Classifier`) gives ``(model.backbone, "backbone.")``.
    """
    if hasattr(model, "group_matcher"):
        return model, ""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "group_matcher"):
        return inner, "backbone."
    raise ConfigError(
        f"{type(model).__name__} has no timm parameter grouping (group_matcher); "
        "fine-tuning strategies need a timm backbone"
    )


def blocks_of(model: nn.Module) -> list[Block]:
    """The ordered blocks of a timm model or a Classifier: stem, stage1..N, head.

    Every parameter and buffer of the backbone belongs to exactly one block.
    """
    backbone, prefix = backbone_of(model)
    heads = head_keys(backbone)
    params = [n for n, _ in backbone.named_parameters()]
    buffers = [n for n, _ in backbone.named_buffers()]
    body = [n for n in params + buffers if n not in heads]
    matcher = _matcher(backbone)
    groups = _body_groups(matcher, body, set(params))
    names = _group_names(matcher, groups)
    blocks = [
        Block(
            name,
            i,
            [prefix + n for n in params if n in group],
            [prefix + n for n in buffers if n in group],
        )
        for i, (name, group) in enumerate(zip(names, groups, strict=True))
    ]
    head = Block(
        HEAD,
        len(blocks),
        [prefix + n for n in params if n in heads],
        [prefix + n for n in buffers if n in heads],
    )
    return [*blocks, head]


def block_parameters(model: nn.Module, block: Block) -> list[nn.Parameter]:
    """The parameters of ``block`` in ``model``, in ``block.param_names`` order."""
    named = dict(model.named_parameters())
    missing = [n for n in block.param_names if n not in named]
    if missing:
        raise ValueError(
            f"block {block.name!r} names {missing[0]!r}, which the model lacks; were the blocks "
            "computed for another model, or before LoRA changed its modules?"
        )
    return [named[n] for n in block.param_names]


def block_modules(model: nn.Module, block: Block) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each module of ``model`` whose own parameters and buffers (at
    least one) all belong to ``block``: e.g. its BatchNorm layers, to keep frozen ones in eval."""
    owned = set(block.param_names) | set(block.buffer_names)
    found = []
    for name, module in model.named_modules():
        own = [f"{name}.{n}" if name else n for n, _ in _own_tensors(module)]
        if own and all(n in owned for n in own):
            found.append((name, module))
    return found


def _own_tensors(module: nn.Module) -> list[tuple[str, Any]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _matcher(backbone: nn.Module) -> Any:
    try:
        return backbone.group_matcher(coarse=True)  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError) as exc:
        raise ConfigError(
            f"{type(backbone).__name__} has no usable timm group_matcher ({exc}); "
            "fine-tuning strategies need one to cut the backbone into blocks"
        ) from None


def _body_groups(matcher: Any, body: list[str], params: set[str]) -> list[set[str]]:
    """Non-head tensor names in timm's groups, in forward order. Names no rule claims (timm
    sorts them last) join the last group; a group without parameters joins its neighbour."""
    grouped = group_with_matcher(((n, None) for n in body), matcher)
    unclaimed = {n for n in body if _unclaimed(matcher, n)}
    groups: list[set[str]] = []
    carry: set[str] = set()
    for lid in sorted(grouped):
        names = set(grouped[lid]) - unclaimed
        if names & params:
            groups.append(names | carry)
            carry = set()
        elif groups:
            groups[-1] |= names
        else:
            carry |= names
    if groups:
        groups[-1] |= unclaimed | carry
    elif (carry | unclaimed) & params:
        groups.append(carry | unclaimed)
    return groups


def _unclaimed(matcher: Any, name: str) -> bool:
    """Whether no rule of timm's matcher claims ``name`` (timm sorts such names last)."""
    if callable(matcher):
        order = matcher(name)
        first = order[0] if isinstance(order, (tuple, list)) else order
        return first == float("inf")
    return not any(_matches(spec, name) for spec in matcher.values())


def _matches(spec: Any, name: str) -> bool:
    if spec is None:
        return False
    patterns = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
    return any(re.match(p, name) for p in patterns)


def _group_names(matcher: Any, groups: list[set[str]]) -> list[str]:
    """``stem`` for a first group the matcher's ``stem`` rule claims, then ``stage1``..; a
    callable matcher puts the stem first by timm's convention."""
    has_stem = bool(groups) and (
        callable(matcher) or any(_matches(matcher.get(STEM), n) for n in groups[0])
    )
    stages = [f"stage{k}" for k in range(1, len(groups) + 1 - has_stem)]
    return [STEM, *stages] if has_stem else stages
