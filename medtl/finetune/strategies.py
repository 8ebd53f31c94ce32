"""Fine-tuning strategies: which blocks of a backbone train, and at what learning rate.

:func:`plan` turns a model and its blocks (:func:`~medtl.finetune.blocks.blocks_of`) into a
:class:`Plan` for :func:`medtl.train.fit`: parameter groups (each with a ``name``, an
``lr_scale`` and, for biases, norms, other 1-D tensors and the model's ``no_weight_decay()``
names, a ``weight_decay`` of 0; the other groups carry the ``weight_decay`` given to :func:`plan`
or, without one, none, so that the optimizer's default, ``fit``'s ``schedule.weight_decay``,
applies), a ``train_mode`` hook that puts the normalisation layers of frozen blocks back in eval
mode (their running statistics stay as loaded), and for ``autorgn`` and ``lpft`` an ``on_epoch_start`` hook. ``plan`` sets ``requires_grad=False`` on everything that
does not train, so frozen tensors get no gradient and, absent from the groups, no optimizer state.

Strategies by name; their options are plain JSON values, so a recipe can replay any of them:

- ``full``: every block at the base rate, or the blocks before the head at ``backbone_lr_scale``
  times it, lowered by ``layer_decay`` per block towards the input (layer-wise decay).
- ``linear``: the head only.
- ``surgical`` (Lee et al., ICLR 2023): the blocks listed in ``blocks``, or the ``first`` /
  ``last`` k blocks before the head; the head always trains.
- ``genome`` (BioTune, Davila et al. 2025): ``genes``, one in [0, 1] per block with the head as
  the last, and a ``threshold`` in [0, 1]. A block trains when its gene exceeds the threshold, at
  ``10 ** (2 * (gene - 0.5))`` times the base rate (0.1x to 10x). When no gene exceeds it the head
  trains at 1x (our guard: every genome then describes a trainable model).
- ``autorgn`` (Auto-RGN, Lee et al., ICLR 2023): every tensor trains, in its own group; at each
  epoch start its ``lr_scale`` becomes its relative gradient norm ``||g|| / ||w||``, averaged over
  the first ``n_batches`` calibration batches and divided by the largest. The batches come from
  ``plan(..., data=..., loss=...)``; see :class:`AutoRGN`. The head is new (medtl replaces the
  source's classifier and starts it small), so its relative norm dwarfs every pretrained tensor's
  and, in the ranking, would scale the whole body to almost nothing (a linear probe: measured on
  ImageNet ``efficientnet_lite0``, the median body weight was 0.0005). By default it trains at 1x
  and the body's tensors are ranked among themselves; ``rank_head=True`` ranks it with them, as
  the paper does for a head trained on the source.
- ``lpft`` (linear probe then fine-tune, Kumar et al., ICLR 2022): for the first
  ``probe_epochs`` epochs only the head moves (every other block at ``lr_scale`` 0, its
  normalisation layers in eval mode), then every block trains as in ``full`` (with its
  ``backbone_lr_scale`` and ``layer_decay``); see :class:`LPFT`.
- ``lora`` (Hu et al., ICLR 2022): low-rank adapters on the backbone's ``Linear`` and dense
  ``Conv2d`` layers, added to the model in place; base weights frozen, head trains. The adapters
  themselves live in :mod:`medtl.finetune.lora`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medtl.errors import ConfigError
from medtl.finetune.blocks import Block, backbone_of, block_modules, block_parameters, blocks_of
from medtl.finetune.lora import LORA_TARGETS, LoRA, add_lora, inside, merge_lora
from medtl.registry import Registry
from medtl.train import mix_seed

log = logging.getLogger(__name__)

__all__ = [
    "LPFT",
    "STRATEGIES",
    "AutoRGN",
    "EvalNorms",
    "LoRA",
    "Plan",
    "PlanContext",
    "add_lora",
    "cross_entropy",
    "merge_lora",
    "plan",
]

CalibrationData = Iterable[Any] | Callable[[], Iterable[Any]]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
STRATEGIES: Registry[Callable[..., Plan]] = Registry("fine-tuning strategy")


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class EvalNorms:
    """``train_mode`` hook: the named normalisation layers back to eval mode (after
    ``model.train()``), so frozen blocks neither update nor use batch statistics."""

    names: list[str]

    def __call__(self, model: nn.Module) -> None:
        for name in self.names:
            model.get_submodule(name).eval()


@dataclass
class Plan:
    """What :func:`fit` needs to fine-tune one way: ``fit(model, step, plan.param_groups, ...,
    train_mode=plan.train_mode, on_epoch_start=plan.on_epoch_start)``."""

    param_groups: list[dict[str, Any]]
    trainable_blocks: list[str]
    train_mode: Callable[[nn.Module], None]
    trainable_fraction: float  # trainable / all parameters of the model (adapters included)
    trainable_params: int
    total_params: int
    on_epoch_start: Callable[[nn.Module, int], None] | None = None
    strategy: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary for logs and run folders (current ``lr_scale`` values)."""
        frozen_norms = self.train_mode.names if isinstance(self.train_mode, EvalNorms) else []
        return {
            "strategy": self.strategy,
            "options": dict(self.options),
            "trainable_blocks": list(self.trainable_blocks),
            "trainable_fraction": float(self.trainable_fraction),
            "trainable_params": int(self.trainable_params),
            "total_params": int(self.total_params),
            "frozen_norm_layers": len(frozen_norms),
            "groups": [_describe_group(g) for g in self.param_groups],
            **self.notes,
        }


@dataclass
class PlanContext:
    """What a strategy may need beyond its options: the weight decay of decayed tensors and,
    for ``autorgn``, calibration batches and their loss."""

    weight_decay: float | None = None
    data: CalibrationData | None = None
    loss: LossFn | None = None


def plan(
    name: str,
    model: nn.Module,
    blocks: Sequence[Block] | None = None,
    /,
    *,
    weight_decay: float | None = None,
    data: CalibrationData | None = None,
    loss: LossFn | None = None,
    **options: Any,
) -> Plan:
    """Apply the strategy registered as ``name`` to ``model`` and return its :class:`Plan`.

    Args:
        model: a :class:`~medtl.models.Classifier` or a timm model; its ``requires_grad`` flags
            are set here (and ``lora`` adds adapter modules to it).
        blocks: from :func:`blocks_of` (computed when omitted); the last block is the head.
        weight_decay: for weights of two or more dimensions; ``None`` leaves it to the
            optimizer's default (``fit`` uses ``schedule.weight_decay``).
        data / loss: ``autorgn`` calibration batches (a DataLoader, any re-iterable, or a
            function returning an iterable) and ``loss(model, batch) -> scalar``
            (default :func:`cross_entropy`); other strategies ignore them.
        options: the strategy's options, plain JSON values (``blocks=["stage4"]``, ``genes=...``).
    """
    build = STRATEGIES.get(name)
    _check_options(name, build, options)
    parts = list(blocks) if blocks is not None else blocks_of(model)
    _check_blocks(model, parts)
    result = build(model, parts, PlanContext(weight_decay, data, loss), **options)
    return replace(result, strategy=name, options=dict(options))


def strategy_options_of(name: str) -> set[str]:
    """The options strategy ``name`` takes (none for a name that is not a strategy, such as a
    search)."""
    if name not in STRATEGIES:
        return set()
    params = inspect.signature(STRATEGIES.get(name)).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


# -- strategies ----------------------------------------------------------------------------------
@STRATEGIES.register("full")
def full(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    backbone_lr_scale: float = 1.0,
    layer_decay: float | None = None,
) -> Plan:
    """Every block trains at the base learning rate; ``backbone_lr_scale`` (0-1) lowers the
    rate of every block but the head, and ``layer_decay`` (0-1) lowers it further the nearer a
    block is to the input (:func:`body_scales`), for a pretrained start."""
    scales = body_scales("full", parts, backbone_lr_scale, layer_decay)
    return _block_plan(model, parts, scales | {parts[-1].name: 1.0}, ctx)


def body_scales(
    strategy: str, parts: list[Block], backbone_lr_scale: Any, layer_decay: Any
) -> dict[str, float]:
    """The ``lr_scale`` of each block before the head: ``backbone_lr_scale * layer_decay ** d``
    with ``d`` the block's distance from the head (1 for the last stage, ``len(parts) - 1`` for
    the stem), timm's layer-wise decay rule (``param_groups_layer_decay``) over medtl's blocks;
    without ``layer_decay``, ``backbone_lr_scale`` for every block."""
    scale = _number(strategy, "backbone_lr_scale", backbone_lr_scale, 0.0, 1.0)
    decay = 1.0 if layer_decay is None else _number(strategy, "layer_decay", layer_decay, 0.0, 1.0)
    body = parts[:-1]
    return {b.name: scale * decay ** (len(body) - i) for i, b in enumerate(body)}


@STRATEGIES.register("linear")
def linear(model: nn.Module, parts: list[Block], ctx: PlanContext, /) -> Plan:
    """Only the head trains (a linear probe on frozen features)."""
    return _block_plan(model, parts, {parts[-1].name: 1.0}, ctx)


@STRATEGIES.register("lpft")
def lpft(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    probe_epochs: int,
    backbone_lr_scale: float = 1.0,
    layer_decay: float | None = None,
) -> Plan:
    """Linear probe, then every block: the head alone for ``probe_epochs`` epochs.

    After the probe the blocks before the head train at ``backbone_lr_scale`` (0-1) times the
    base rate, lowered per block by ``layer_decay`` as in ``full``; see :class:`LPFT`."""
    probe = _integer("lpft", "probe_epochs", probe_epochs, 1)
    scales = body_scales("lpft", parts, backbone_lr_scale, layer_decay)
    result = _block_plan(model, parts, {b.name: 1.0 for b in parts}, ctx)
    head = parts[-1].name
    body = [g for g in result.param_groups if _block_group(g["name"]) != head]
    norms = [n for b in parts[:-1] for n, m in block_modules(model, b) if isinstance(m, _NormBase)]
    hook = LPFT(body, probe, [scales[_block_group(g["name"])] for g in body], EvalNorms(norms))
    hook.set_phase(0)
    result.on_epoch_start, result.train_mode = hook, hook.train_mode
    result.notes.update(probe_epochs=probe, probe_frozen_norm_layers=len(norms))
    return result


@STRATEGIES.register("surgical")
def surgical(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    blocks: list[str] | None = None,
    first: int | None = None,
    last: int | None = None,
) -> Plan:
    """The chosen blocks and the head train at the base rate; give exactly one of ``blocks``
    (names from :func:`blocks_of`), ``first`` or ``last`` (counted before the head)."""
    given = [k for k, v in (("blocks", blocks), ("first", first), ("last", last)) if v is not None]
    if len(given) != 1:
        raise ConfigError(
            f"strategy 'surgical' needs exactly one of the options blocks, first, last "
            f"(got {', '.join(given) or 'none'})"
        )
    body = [b.name for b in parts[:-1]]
    if blocks is not None:
        chosen = _block_names(blocks, [b.name for b in parts])
    elif first is not None:
        chosen = body[: _integer("surgical", "first", first, 0, len(body))]
    else:
        count = _integer("surgical", "last", last, 0, len(body))
        chosen = body[len(body) - count :]
    return _block_plan(model, parts, {n: 1.0 for n in [*chosen, parts[-1].name]}, ctx)


@STRATEGIES.register("genome")
def genome(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    genes: list[float],
    threshold: float,
) -> Plan:
    """BioTune's phenotype: block ``b`` trains iff ``genes[b] > threshold``, with learning-rate
    multiplier ``10 ** (2 * (genes[b] - 0.5))``; the head alone at 1x when no block trains."""
    if not isinstance(genes, (list, tuple)) or len(genes) != len(parts):
        count = len(genes) if isinstance(genes, (list, tuple)) else type(genes).__name__
        raise ConfigError(
            f"strategy 'genome': option genes needs one value per block, {len(parts)} "
            f"({', '.join(b.name for b in parts)}); got {count}"
        )
    values = [_number("genome", f"genes[{i}]", g, 0.0, 1.0) for i, g in enumerate(genes)]
    cut = _number("genome", "threshold", threshold, 0.0, 1.0)
    scales = {b.name: 10 ** (2 * (g - 0.5)) for b, g in zip(parts, values, strict=True) if g > cut}
    result = _block_plan(model, parts, scales or {parts[-1].name: 1.0}, ctx)
    result.notes["head_only_guard"] = not scales
    return result


@STRATEGIES.register("autorgn")
def autorgn(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    n_batches: int = 3,
    seed: int = 0,
    rank_head: bool = False,
) -> Plan:
    """Every tensor trains in its own group, weighted each epoch by :class:`AutoRGN`; the head
    at 1x outside the ranking unless ``rank_head``."""
    if ctx.data is None:
        raise ValueError(
            "strategy 'autorgn' needs calibration batches: plan('autorgn', model, data=loader)"
        )
    count = _integer("autorgn", "n_batches", n_batches, 1)
    if not isinstance(rank_head, bool):
        raise ConfigError(f"strategy 'autorgn': rank_head={rank_head!r} must be true or false")
    named = [pair for b in parts for pair in _named(model, b)]
    fixed = set() if rank_head else {n for n, _ in _named(model, parts[-1])}
    no_wd = _no_weight_decay(model)
    groups = [
        {
            "name": n,
            "params": [p],
            "lr_scale": 1.0,
            **_decay(0.0 if _no_decay(n, p, no_wd) else ctx.weight_decay),
        }
        for n, p in named
    ]
    hook = AutoRGN(
        groups,
        ctx.data,
        ctx.loss or cross_entropy,
        count,
        _integer("autorgn", "seed", seed, 0),
        fixed=fixed,
    )
    return _finish(model, groups, [b.name for b in parts], EvalNorms([]), hook)


@STRATEGIES.register("lora")
def lora(
    model: nn.Module,
    parts: list[Block],
    ctx: PlanContext,
    /,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: str = "all",
) -> Plan:
    """LoRA adapters (``alpha / rank`` scaling) on the backbone, in place; they and the head
    train, every other tensor is frozen and every normalisation layer outside the head is kept
    in eval mode."""
    r = _integer("lora", "rank", rank, 1)
    a = float(r) if alpha is None else _number("lora", "alpha", alpha, 1e-12, float("inf"))
    if targets not in LORA_TARGETS:
        raise ConfigError(
            f"strategy 'lora': option targets={targets!r}; allowed: {', '.join(LORA_TARGETS)}"
        )
    backbone, prefix = backbone_of(model)
    head = parts[-1]
    heads = {n.removeprefix(prefix).rpartition(".")[0] for n in head.param_names}
    added = add_lora(backbone, r, a, targets, exclude=heads)
    adapters = [
        (prefix + n, p)
        for n, p in backbone.named_parameters()
        if ".lora_a." in n or ".lora_b." in n
    ]
    head_named = _named(model, head)
    no_wd = _no_weight_decay(model)
    groups = _groups("lora", adapters, 1.0, ctx.weight_decay, no_wd)
    groups += _groups(head.name, head_named, 1.0, ctx.weight_decay, no_wd)
    norms = [
        prefix + n
        for n, m in backbone.named_modules()
        if isinstance(m, _NormBase) and not inside(n, heads)
    ]
    if not adapters:
        log.warning("lora: no %s layer to adapt in the backbone; only the head trains", targets)
    result = _finish(model, groups, [head.name], EvalNorms(norms))
    result.notes.update(adapted_modules=len(added), adapter_params=_numel(p for _, p in adapters))
    return result


# -- LP-FT ----------------------------------------------------------------------------------------
class LPFT:
    """LP-FT's hooks: ``on_epoch_start`` sets the backbone groups' ``lr_scale`` from the epoch
    alone (0 before ``probe_epochs``, ``scale`` from then on), so a resumed run takes the same
    phase; ``train_mode`` puts the backbone's normalisation layers in eval mode while probing.

    Every tensor is in the optimizer from the start (the parameter set never changes, as
    DistributedDataParallel needs): in the probe phase the backbone's gradients are computed,
    AdamW's moments of the backbone accumulate, and its weights stay exactly as loaded because
    its learning rate, hence its decoupled weight decay, is 0.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        probe_epochs: int,
        scales: list[float],
        norms: EvalNorms,
    ) -> None:
        if len(scales) != len(groups):
            raise ValueError(f"LPFT: {len(groups)} groups but {len(scales)} scales")
        self.groups, self.probe_epochs, self.scales, self.norms = (
            groups,
            probe_epochs,
            scales,
            norms,
        )
        self.probing = True

    def set_phase(self, epoch: int) -> None:
        self.probing = epoch < self.probe_epochs
        for group, scale in zip(self.groups, self.scales, strict=True):
            group["lr_scale"] = 0.0 if self.probing else scale

    def __call__(self, model: nn.Module, epoch: int) -> None:
        self.set_phase(epoch)

    def train_mode(self, model: nn.Module) -> None:
        if self.probing:
            self.norms(model)


# -- Auto-RGN --------------------------------------------------------------------------------------
class AutoRGN:
    """Auto-RGN's ``on_epoch_start`` hook: learning-rate weights from relative gradient norms.

    At the start of epoch ``e`` it takes the first ``n_batches`` batches of ``data`` (iterated
    afresh each epoch; a callable is called for a fresh iterable) under a torch RNG seeded from
    ``(seed, e)`` and forked from the global one, so a shuffled DataLoader gives the same batches
    on every rank and resume. :meth:`calibrate` then sets each group's ``lr_scale`` in place.
    Under DistributedDataParallel the norms are averaged over ranks. Groups named in ``fixed``
    (the new head) keep weight 1 and take no part in the ranking.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        data: CalibrationData,
        loss: LossFn,
        n_batches: int = 3,
        seed: int = 0,
        fixed: Iterable[str] = (),
    ) -> None:
        if n_batches < 1:
            raise ValueError(f"n_batches must be at least 1, got {n_batches}")
        self.groups, self.data, self.loss = groups, data, loss
        self.n_batches, self.seed = n_batches, seed
        self.fixed = frozenset(fixed)
        self.weights: dict[str, float] = {}

    def __call__(self, model: nn.Module, epoch: int) -> None:
        with torch.random.fork_rng(devices=_cuda_indices(model)):
            torch.manual_seed(mix_seed(self.seed, epoch))
            source = self.data() if callable(self.data) else self.data
            self.weights = self.calibrate(model, itertools.islice(source, self.n_batches))
        for group in self.groups:
            group["lr_scale"] = self.weights[group["name"]]

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """``||g|| / ||w||`` per group tensor, averaged over ``batches`` and divided by the
        largest among the ranked (not ``fixed``) ones, so the weights lie in [0, 1] with maximum
        1; ``fixed`` groups get 1.

        Gradients come from ``torch.autograd.grad`` in train mode: ``.grad`` fields (hence the
        optimizer), buffers (BatchNorm statistics) and every module's train/eval mode are left as
        they were. A tensor with zero norm has an infinite ratio and gets weight 1; one without
        gradient gets 0; when no tensor has a gradient every weight is 1.
        """
        named = dict(model.named_parameters())
        names = [g["name"] for g in self.groups]
        params = [named[n] for n in names]
        total = torch.zeros(len(params), dtype=torch.float64)
        count = 0
        with _untouched(model):
            model.train()
            for batch in batches:
                value = self.loss(model, _to_device(batch, params[0].device))
                grads = torch.autograd.grad(value, params, allow_unused=True)
                total += _relative_norms(params, grads)
                count += 1
        if count == 0:
            raise ValueError("autorgn: the calibration data gave no batch")
        ranked = [i for i, n in enumerate(names) if n not in self.fixed]
        weights = dict.fromkeys(names, 1.0)
        if ranked:
            values = _rank_mean(total / count, params[0].device)[ranked]
            weights.update(zip([names[i] for i in ranked], _normalised(values), strict=True))
        return weights


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of ``model(image)`` against ``label``: the default Auto-RGN loss.
    A batch is a dict with ``image`` / ``label`` (medtl's datasets) or an ``(image, label)`` pair."""
    if isinstance(batch, Mapping):
        images, labels = batch["image"], batch["label"]
    else:
        images, labels = batch[0], batch[1]
    return nn.functional.cross_entropy(model(images), labels)


def _relative_norms(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``||g|| / ||w||`` per tensor (0 without gradient, inf for a zero tensor), float64 on CPU."""
    zero = torch.zeros((), device=params[0].device)
    g = torch.stack([zero if d is None else d.detach().float().norm() for d in grads])
    w = torch.stack([p.detach().float().norm() for p in params])
    ratio = torch.where(g == 0, torch.zeros_like(g), g / w)
    return ratio.double().cpu()


def _normalised(values: torch.Tensor) -> list[float]:
    finite = values[torch.isfinite(values)]
    top = float(finite.max()) if finite.numel() else 0.0
    if top <= 0.0:
        return [1.0] * len(values)
    return (values / top).clamp(max=1.0).tolist()  # inf / top -> inf -> 1


def _rank_mean(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    moved = values.to(device)
    dist.all_reduce(moved)
    return (moved / dist.get_world_size()).cpu()


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval mode and every buffer's value on exit."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for module, mode in modes:
            module.training = mode


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _cuda_indices(model: nn.Module) -> list[int]:
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return sorted(d.index or 0 for d in devices)


# -- shared helpers ------------------------------------------------------------------------------------
def _block_plan(
    model: nn.Module, parts: list[Block], scales: dict[str, float], ctx: PlanContext
) -> Plan:
    """Blocks named in ``scales`` train at that ``lr_scale``; the others are frozen, their
    normalisation layers kept in eval mode."""
    no_wd = _no_weight_decay(model)
    groups: list[dict[str, Any]] = []
    for b in parts:
        if b.name in scales:
            named = _named(model, b)
            groups += _groups(b.name, named, scales[b.name], ctx.weight_decay, no_wd)
    frozen = [b for b in parts if b.name not in scales]
    norms = [n for b in frozen for n, m in block_modules(model, b) if isinstance(m, _NormBase)]
    return _finish(model, groups, [b.name for b in parts if b.name in scales], EvalNorms(norms))


def _finish(
    model: nn.Module,
    groups: list[dict[str, Any]],
    trainable: list[str],
    train_mode: Callable[[nn.Module], None],
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
) -> Plan:
    """Freeze every parameter outside ``groups`` and count what trains."""
    keep = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    total = _numel(model.parameters())
    count = _numel(p for p in model.parameters() if p.requires_grad)
    return Plan(groups, trainable, train_mode, count / max(total, 1), count, total, on_epoch_start)


def _groups(
    name: str,
    named: list[tuple[str, nn.Parameter]],
    scale: float,
    weight_decay: float | None,
    no_wd: set[int],
) -> list[dict[str, Any]]:
    """Up to two groups: ``name`` (decayed) and ``name.no_decay`` (weight decay 0)."""
    decay = [p for n, p in named if not _no_decay(n, p, no_wd)]
    rest = [p for n, p in named if _no_decay(n, p, no_wd)]
    out = []
    if decay:
        out.append({"name": name, "params": decay, "lr_scale": scale, **_decay(weight_decay)})
    if rest:
        out.append(
            {"name": f"{name}.no_decay", "params": rest, "lr_scale": scale, "weight_decay": 0.0}
        )
    return out


def _block_group(group_name: str) -> str:
    """The block a group of :func:`_groups` belongs to."""
    return group_name.removesuffix(".no_decay")


def _named(model: nn.Module, block: Block) -> list[tuple[str, nn.Parameter]]:
    return list(zip(block.param_names, block_parameters(model, block), strict=True))


def _decay(weight_decay: float | None) -> dict[str, float]:
    """A group's ``weight_decay`` entry; none means the optimizer's default."""
    return {} if weight_decay is None else {"weight_decay": float(weight_decay)}


def _no_decay(name: str, param: torch.Tensor, no_wd: set[int]) -> bool:
    """Whether ``param`` is one of the tensors :func:`_no_weight_decay` found."""
    return id(param) in no_wd


def _no_weight_decay(model: nn.Module) -> set[int]:
    """Ids of the tensors that take no weight decay, as ``timm.optim.param_groups_weight_decay``
    decides: biases, norm weights, other 1-D tensors and the backbone's ``no_weight_decay()``
    names (wildcards included). Decided on every tensor, whatever is frozen at the time."""
    from timm.optim import param_groups_weight_decay

    backbone, prefix = backbone_of(model)
    listed = getattr(backbone, "no_weight_decay", None)
    names = {prefix + n for n in (listed() if callable(listed) else ())}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)  # timm skips frozen tensors; the rule must see them all
        groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=names)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}


def _numel(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _describe_group(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": str(group["name"]),
        "tensors": len(group["params"]),
        "params": _numel(group["params"]),
        "lr_scale": float(group["lr_scale"]),
        "weight_decay": group.get("weight_decay"),  # None: the optimizer's default
    }


def _check_options(name: str, build: Callable[..., Plan], options: dict[str, Any]) -> None:
    """Unknown or missing options of strategy ``name`` as a ConfigError naming them."""
    params = inspect.signature(build).parameters.values()
    allowed = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(allowed) or "none"
            raise ConfigError(f"strategy {name!r} has no option {key!r}{hint} (options: {listed})")
    required = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    missing = [k for k in required if k not in options]
    if missing:
        raise ConfigError(f"strategy {name!r} needs option(s) {', '.join(missing)}")


def _check_blocks(model: nn.Module, parts: list[Block]) -> None:
    """Blocks must name parameters of ``model``, each at most once."""
    if not parts:
        raise ValueError("a fine-tuning plan needs at least one block (the head)")
    seen: set[str] = set()
    for b in parts:
        block_parameters(model, b)  # raises when a name is not the model's
        twice = seen & set(b.param_names)
        if twice:
            raise ValueError(f"parameter {min(twice)!r} is in two blocks")
        seen |= set(b.param_names)


def _block_names(names: Any, valid: list[str]) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"strategy 'surgical': option blocks must be a list of block names, got {names!r}"
        )
    for n in names:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"strategy 'surgical': unknown block {n!r}{hint} (blocks: {', '.join(valid)})"
            )
    return [n for n in valid if n in names]


def _integer(strategy: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(
            f"strategy {strategy!r}: option {key}={value!r}; expected an integer {span}"
        )
    return int(value)


def _number(strategy: str, key: str, value: Any, low: float, high: float) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or not low <= value <= high:
        raise ConfigError(
            f"strategy {strategy!r}: option {key}={value!r}; expected a number in [{low}, {high}]"
        )
    return float(value)
