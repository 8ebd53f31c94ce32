"""LoRA (Hu et al., ICLR 2022): low-rank adapters around a backbone's ``Linear`` and dense
``Conv2d`` layers, added in place and folded back into the base weights for export.

The ``lora`` fine-tuning strategy (:mod:`medtl.finetune.strategies`) adds them with
:func:`add_lora` and trains only them and the head; :func:`merge_lora` restores the plain
architecture before the weights are written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from timm.layers import Linear as TimmLinear
from torch import nn

__all__ = ["LORA_TARGETS", "LoRA", "add_lora", "inside", "merge_lora"]

LORA_TARGETS = ("linear", "conv", "all")


class LoRA(nn.Module):
    """``base(x) + scale * B(A(x))`` around a frozen ``nn.Linear`` or dense ``nn.Conv2d``.

    For a Linear, ``A: in -> rank`` and ``B: rank -> out`` are Linear layers; for a Conv2d, ``A``
    is a convolution with ``base``'s kernel, stride, padding and dilation into ``rank`` channels
    and ``B`` a 1x1 convolution, so that ``B(A(x))`` is a convolution with a rank-``rank`` kernel
    and folds into ``base`` exactly (:meth:`merged`). ``B`` starts at zero: at first the wrapped
    layer computes exactly what ``base`` does. ``scale = alpha / rank``.
    """

    lora_a: nn.Linear | nn.Conv2d
    lora_b: nn.Linear | nn.Conv2d

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1 or alpha <= 0:
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        self.base = base
        self.scale = alpha / rank
        self.lora_a, self.lora_b = _factors(base, rank)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    def delta(self) -> torch.Tensor:
        """The adapter as an update of ``base.weight`` (same shape)."""
        a, b = self.lora_a.weight, self.lora_b.weight.flatten(1)  # b: [out, rank]
        if isinstance(self.base, nn.Linear):
            return self.scale * b @ a
        return self.scale * torch.einsum("or,rikl->oikl", b, a)

    def merged(self) -> nn.Linear | nn.Conv2d:
        """``base`` with the adapter folded into its weight (for export)."""
        with torch.no_grad():
            self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def _factors(
    base: nn.Linear | nn.Conv2d, rank: int
) -> tuple[nn.Linear, nn.Linear] | tuple[nn.Conv2d, nn.Conv2d]:
    kw: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype, "bias": False}
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, rank, **kw), nn.Linear(rank, base.out_features, **kw)
    a = nn.Conv2d(
        base.in_channels,
        rank,
        base.kernel_size,  # type: ignore[arg-type]
        base.stride,  # type: ignore[arg-type]
        base.padding,  # type: ignore[arg-type]
        base.dilation,  # type: ignore[arg-type]
        padding_mode=base.padding_mode,
        **kw,
    )
    return a, nn.Conv2d(rank, base.out_channels, 1, **kw)


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: str = "all",
    exclude: Iterable[str] = (),
) -> list[str]:
    """Wrap ``model``'s layers in :class:`LoRA` adapters, in place; returns the wrapped names.

    ``targets``: ``"linear"`` (``nn.Linear`` and timm's ``Linear``), ``"conv"`` (``nn.Conv2d``
    with ``groups == 1``) or ``"all"``. Exact types only: grouped and depthwise convolutions
    (no dense kernel to factorise), ``Conv2dSame`` (dynamic padding) and Linear subclasses whose
    weight others read directly (``nn.MultiheadAttention.out_proj``) are left alone, as are
    modules named in or under ``exclude`` and layers already inside an adapter.
    """
    skip = list(exclude) + [n for n, m in model.named_modules() if isinstance(m, LoRA)]
    chosen = [n for n, m in model.named_modules() if _adaptable(m, targets) and not inside(n, skip)]
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, attr, LoRA(getattr(holder, attr), rank, rank if alpha is None else alpha))
    return chosen


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer, in place (the function is unchanged); returns
    how many were merged. The model then has its original module tree and parameter names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRA)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, attr, getattr(holder, attr).merged())
    return len(names)


def _adaptable(module: nn.Module, targets: str) -> bool:
    if type(module) in (nn.Linear, TimmLinear):
        return targets in ("linear", "all")
    if type(module) is nn.Conv2d and module.groups == 1:
        return targets in ("conv", "all")
    return False


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies under one."""
    return any(name == p or name.startswith(f"{p}.") for p in prefixes if p)
