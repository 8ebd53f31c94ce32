"""Exact frozen-prefix feature caching for search candidates.

When a candidate's first trainable block is ``k > 0``, blocks ``0 .. k-1`` are frozen and their
normalisation layers stay in eval mode (the ``genome`` strategy's ``train_mode``). Without
random augmentation and without dropout or drop-path in them, they compute the same function of
each image in every epoch. :func:`prefix_features` runs them once over a split and keeps the
output in memory; :class:`SuffixModel` then trains blocks ``k ..`` on those features. Forward
values, losses, gradients and updates equal those of the whole model up to floating-point
reassociation.

A model is cut by :func:`segments_of` into one :class:`Segment` per block of
:func:`~medtl.finetune.blocks.blocks_of`; running the segments in turn is the model's forward.
Supported timm families (others return ``None`` and train uncached):

- ConvNeXt: ``stem``, ``stages.0`` .. ``stages.{n-1}``, then ``norm_pre`` + ``forward_head``;
- ResNet: ``conv1 bn1 act1 maxpool``, ``layer1`` .. ``layer4``, then ``forward_head``;
- VisionTransformer: ``patch_embed`` + tokens + position embedding (+ ``patch_drop``,
  ``norm_pre``), ``blocks.0`` .. ``blocks.{n-1}``, then ``norm`` + ``forward_head``;
- EfficientNet (``efficientnet_lite0`` .. ``_lite4``, ``efficientnet_b*``): ``conv_stem bn1``,
  ``blocks.0`` .. ``blocks.{n-2}``, ``blocks.{n-1}`` with ``conv_head bn2`` (timm groups the
  head convolution with the last stage), then ``forward_head``.

The first segment also holds the :class:`~medtl.models.Classifier`'s input normalisation. The
last segment may use tensors of the block before it (ConvNeXt's ``head.norm`` and a ViT's final
``norm`` belong to the last stage): harmless, since a suffix can hold frozen tensors; what
caching needs, and :func:`check_segments` verifies, is that segment ``i`` uses tensors of blocks
``0 .. i`` only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from medtl.finetune.blocks import Block, backbone_of

log = logging.getLogger(__name__)

Run = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """One block's share of the forward pass: ``run(x)``, and the names (modules or tensors of
    the model) it uses."""

    names: tuple[str, ...]
    run: Run


# -- cutting a model ----------------------------------------------------------------------------
def segments_of(model: nn.Module) -> list[Segment] | None:
    """The model's forward as one segment per block, or ``None`` for an unsupported family."""
    backbone, prefix = backbone_of(model)
    normalize = getattr(model, "normalize", None) if prefix else None
    for family, cut in _FAMILIES:
        if isinstance(backbone, family):
            first, *rest = cut(backbone)
            names = tuple(prefix + n for n in first.names)
            if isinstance(normalize, nn.Module):
                names = ("normalize", *names)
                first = Segment(names, _then(normalize, first.run))
            else:
                first = Segment(names, first.run)
            return [first, *(Segment(tuple(prefix + n for n in s.names), s.run) for s in rest)]
    return None


def _then(before: nn.Module, run: Run) -> Run:
    return lambda x: run(before(x))


def _convnext(bb: Any) -> list[Segment]:
    stages = [Segment((f"stages.{i}",), stage) for i, stage in enumerate(bb.stages)]
    tail = Segment(("norm_pre", "head"), lambda x: bb.forward_head(bb.norm_pre(x)))
    return [Segment(("stem",), bb.stem), *stages, tail]


def _resnet(bb: Any) -> list[Segment]:
    def stem(x: torch.Tensor) -> torch.Tensor:
        return bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))

    layers = [Segment((f"layer{i}",), getattr(bb, f"layer{i}")) for i in range(1, 5)]
    tail = Segment(("global_pool", "fc"), bb.forward_head)
    return [Segment(("conv1", "bn1", "act1", "maxpool"), stem), *layers, tail]


def _vit(bb: Any) -> list[Segment]:
    def stem(x: torch.Tensor) -> torch.Tensor:
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))

    names = ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop")
    blocks = [Segment((f"blocks.{i}",), block) for i, block in enumerate(bb.blocks)]
    tail_names = ("norm", "fc_norm", "attn_pool", "head_drop", "head")
    tail = Segment(tail_names, lambda x: bb.forward_head(bb.norm(x)))
    return [Segment((*names, "norm_pre"), stem), *blocks, tail]


def _efficientnet(bb: Any) -> list[Segment]:
    *stages, last = bb.blocks

    def final(x: torch.Tensor) -> torch.Tensor:
        return bb.bn2(bb.conv_head(last(x)))

    blocks = [Segment((f"blocks.{i}",), stage) for i, stage in enumerate(stages)]
    tail = Segment(("global_pool", "classifier"), bb.forward_head)
    stem = Segment(("conv_stem", "bn1"), lambda x: bb.bn1(bb.conv_stem(x)))
    return [stem, *blocks, Segment((f"blocks.{len(stages)}", "conv_head", "bn2"), final), tail]


_FAMILIES: tuple[tuple[type, Callable[[Any], list[Segment]]], ...] = (
    (ConvNeXt, _convnext),
    (ResNet, _resnet),
    (VisionTransformer, _vit),
    (EfficientNet, _efficientnet),
)


def _owned(name: str, names: Sequence[str]) -> bool:
    return any(name == n or name.startswith(f"{n}.") for n in names)


def check_segments(model: nn.Module, blocks: Sequence[Block], segments: Sequence[Segment]) -> str:
    """Why ``segments`` cannot cut ``model`` at its block boundaries ("" when they can): one
    segment per block, every parameter used by some segment, and segment ``i`` using tensors
    of blocks ``0 .. i`` only."""
    if len(segments) != len(blocks):
        return f"{len(segments)} segments for {len(blocks)} blocks"
    params = [n for n, _ in model.named_parameters()]
    unused = [n for n in params if not any(_owned(n, s.names) for s in segments)]
    if unused:
        return f"no segment uses {unused[0]!r}"
    allowed: set[str] = set()
    for block, segment in zip(blocks, segments, strict=True):
        allowed |= set(block.param_names)
        late = [n for n in params if _owned(n, segment.names) and n not in allowed]
        if late:
            return f"segment of block {block.name!r} uses {late[0]!r} of a later block"
    return ""


def stochastic_modules(model: nn.Module, segments: Sequence[Segment]) -> list[str]:
    """Modules of ``segments`` that are random in train mode (dropout, drop-path, patch
    dropout with a non-zero rate): a prefix holding one cannot be cached exactly."""
    found = []
    for name, module in model.named_modules():
        if not any(_owned(name, s.names) for s in segments) or "Drop" not in type(module).__name__:
            continue
        rate = next(
            (getattr(module, a) for a in ("p", "drop_prob", "prob") if hasattr(module, a)), 0
        )
        if isinstance(rate, (int, float)) and rate > 0:
            found.append(name)
    return found


def run_segments(segments: Sequence[Segment], x: torch.Tensor) -> torch.Tensor:
    for segment in segments:
        x = segment.run(x)
    return x


# -- training the suffix ------------------------------------------------------------------------
class SuffixModel(nn.Module):
    """Segments ``k ..`` of ``model``: ``features [B, ...] -> logits [B, K]``.

    ``model`` is a submodule, so its parameters (the same tensors, trained in place), its
    train/eval mode and its state dict (keys prefixed ``model.``) go with this wrapper.
    """

    def __init__(self, model: nn.Module, segments: Sequence[Segment], k: int) -> None:
        super().__init__()
        if not 0 <= k < len(segments):
            raise ValueError(f"cut index k={k} is outside 0..{len(segments) - 1}")
        self.model = model
        self.k = k
        self._segments = list(segments[k:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_segments(self._segments, x)


class FeatureSet(Dataset):
    """Cached prefix outputs as a dataset: item ``i`` is ``{"image": features[i], "label"}``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.features[i], "label": int(self.labels[i])}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block, each back to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def prefix_features(
    model: nn.Module,
    segments: Sequence[Segment],
    k: int,
    dataset: Dataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    autocast: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments ``0 .. k-1`` over every item of ``dataset`` in order, in eval mode:
    ``(features [N, ...] on the CPU, labels [N])``. ``autocast``: the context ``fit`` trains
    under (bfloat16 on CUDA with ``amp``), so that cached features match its forward."""
    feats, labels = [], []
    with eval_mode(model):
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with autocast if autocast is not None else _nothing():
                x = run_segments(segments[:k], batch["image"].to(device))
            feats.append(x.detach().cpu())
            labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(feats), torch.cat(labels)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def prefix_digest(model: nn.Module, segments: Sequence[Segment], k: int) -> str:
    """sha256 of every parameter and buffer used by segments ``0 .. k-1`` (names, shapes,
    dtypes and bytes): the identity of the frozen prefix's weights."""
    digest = hashlib.sha256(str(k).encode())
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if any(_owned(name, s.names) for s in segments[:k]):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def segment_shapes_and_flops(
    model: nn.Module, segments: Sequence[Segment], sample: torch.Tensor
) -> tuple[list[tuple[int, ...]], list[float]]:
    """For one input ``sample [1, C, H, W]``: each segment's input shape (without the batch
    dimension) and forward FLOPs (torch's ``FlopCounterMode``: matrix products and
    convolutions; element-wise and normalisation work is not counted)."""
    shapes, flops = [], []
    x = sample
    with torch.no_grad(), eval_mode(model):
        for segment in segments:
            shapes.append(tuple(x.shape[1:]))
            with FlopCounterMode(display=False) as counter:
                x = segment.run(x)
            flops.append(float(counter.get_total_flops()))
    return shapes, flops


class FeatureCache:
    """In-memory cache of prefix features, least recently used out beyond ``max_entries``.

    Keys are chosen by the caller: the cut index, :func:`prefix_digest` of the frozen weights
    and the data's identity; values are whatever the caller computes once per key.
    """

    def __init__(self, max_entries: int = 2) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, hit)``: the cached value, or ``compute()`` stored under ``key``."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], True
        value = compute()
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value, False


# -- where to cut, and what it costs ------------------------------------------------------------
@dataclass
class Cuts:
    """Where a model can be cut for caching and what training from each block costs.

    ``suffix_share[k]``: share of the forward FLOPs from block ``k`` on (parameter shares when
    the family has no segments); ``feature_bytes[k]``: bytes of the float32 features entering
    block ``k`` for ``rows`` images; ``max_cut``: the deepest cut whose prefix has no dropout
    or drop-path. Costs are epoch-equivalents: FLOPs run over those of one forward and backward
    pass of the whole model over the training split, with backward = 2 x forward.
    """

    segments: list[Segment] | None
    suffix_share: list[float]
    feature_bytes: list[int]
    max_cut: int

    @classmethod
    def of(cls, model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor, rows: int) -> Cuts:
        """Measure ``model`` (cut at ``blocks``) on ``sample [2, C, H, W]``."""
        segments = _checked_segments(model, blocks, sample)
        if segments is None:
            counts = [sum(model.get_parameter(n).numel() for n in b.param_names) for b in blocks]
            return cls(None, _tail_shares(counts), [0] * len(blocks), 0)
        shapes, flops = segment_shapes_and_flops(model, segments, sample[:1])
        stochastic = [k for k, s in enumerate(segments) if stochastic_modules(model, [s])]
        max_cut = min([*stochastic, len(segments) - 1])
        return cls(
            segments, _tail_shares(flops), [4 * rows * math.prod(s) for s in shapes], max_cut
        )

    def cacheable(self, k: int, max_bytes: float) -> bool:
        """Whether training from block ``k`` can run on cached features within ``max_bytes``."""
        return (
            self.segments is not None
            and 0 < k <= self.max_cut
            and self.feature_bytes[k] <= max_bytes
        )

    def epoch_cost(self, k: int, cached: bool, val_ratio: float = 0.0) -> float:
        """One epoch from block ``k`` with its validation pass (``val_ratio = n_val / n_train``):
        cached ``s_k + s_k * val_ratio / 3``; uncached ``(1 + 2 s_k) / 3 + val_ratio / 3`` (the
        frozen prefix runs forward only, autograd skips its backward)."""
        s = self.suffix_share[k]
        if cached:
            return s + s * val_ratio / 3.0
        return (1.0 + 2.0 * s) / 3.0 + val_ratio / 3.0

    def caching_cost(self, k: int, val_ratio: float = 0.0) -> float:
        """Filling the cache for cut ``k``: the prefix forward over train and val,
        ``(1 - s_k) / 3 * (1 + val_ratio)``; one epoch's saving, so caching pays from the second
        epoch that uses it."""
        return (1.0 - self.suffix_share[k]) / 3.0 * (1.0 + val_ratio)


def _checked_segments(
    model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor
) -> list[Segment] | None:
    """:func:`segments_of`, when they cut ``model`` at ``blocks`` and reproduce its output."""
    segments = segments_of(model)
    why = "family not supported" if segments is None else check_segments(model, blocks, segments)
    if segments is not None and not why:
        with torch.no_grad(), eval_mode(model):
            same = torch.allclose(
                run_segments(segments, sample), model(sample), rtol=1e-4, atol=1e-5
            )
        why = "" if same else "segments do not reproduce the model's forward"
    if why:
        log.info("%s: no prefix caching (%s)", type(model).__name__, why)
        return None
    return segments


def _tail_shares(values: Sequence[float]) -> list[float]:
    """``sum(values[k:]) / sum(values)`` for each ``k`` (1 everywhere when all are 0)."""
    total = float(sum(values))
    return [float(sum(values[k:])) / total if total > 0 else 1.0 for k in range(len(values))]
