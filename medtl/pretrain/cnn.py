"""Masked pretraining of BatchNorm CNNs (timm EfficientNet and ResNet), in the manner of SparK.

SparK (Tian et al. 2023) runs a CNN on the visible positions only, as sparse tensors. This is
the dense equivalent, written here because timm has no masked CNN and SparK's sparse operators
are its own: every feature map is held at zero where the mask covers it, so that what a
convolution sees at a masked position is a constant, never the image.

- the input pixels are zeroed (set to the normalisation mean) at masked positions;
- the output of every convolution and every pooling layer is multiplied by the keep map at its
  own resolution (one map per stage: nearest upsampling of the mask grid, or max-pooling of
  the keep map where the stage is coarser than the mask unit, so a coarse cell is visible when
  any of its pixels is);
- BatchNorm normalises with the mean and variance of the visible positions only, updates its
  running statistics from them, and returns zeros at masked positions;
- squeeze-excitation pools over the visible positions only (timm's EfficientNet
  ``SqueezeExcite`` and its ``SEModule``; EfficientNet-Lite and ResNet-18/34/50 have none).

Decoding is SparK's light hierarchical decoder, written anew: the deepest features and those of
the next finer stages each get their own learned mask token at masked positions, are fused from
coarse to fine (transposed convolution up, 3x3 convolution, BatchNorm, ReLU6), and a 1x1 head
predicts the pixels of each finest cell. The loss is today's: per-patch normalised pixels of the
masked mask cells only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn

from medtl.errors import ConfigError
from medtl.pretrain.mae import MaskedAutoencoder, patchify

__all__ = ["CNNMAE", "HierarchicalDecoder", "KeepMaps", "masked_batch_norm"]

Tensor = torch.Tensor
SUPPORTED = (EfficientNet, ResNet)
_SE = (SqueezeExcite, SEModule)
_SPATIAL_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


class KeepMaps:
    """The keep map (1 = visible) of one forward pass at every resolution it is asked for.

    ``mask: [B, h, w]`` (True = masked). ``at(like)`` returns ``[B, 1, H', W']`` for a map
    ``like: [B, C, H', W']``: nearest upsampling where ``H' >= h``, max-pooling of the keep map
    where the map is coarser than the mask (a cell is visible when any of its pixels is).
    Maps are cached per size and dtype, so a stage's many layers share one.
    """

    def __init__(self, mask: Tensor) -> None:
        self.keep = (~mask).unsqueeze(1).float()
        self._cache: dict[tuple[int, int, torch.dtype], Tensor] = {}

    def at(self, like: Tensor) -> Tensor:
        size = (int(like.shape[-2]), int(like.shape[-1]))
        key = (*size, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._resize(size).to(like.dtype)
        return self._cache[key]

    def _resize(self, size: tuple[int, int]) -> Tensor:
        h, w = self.keep.shape[-2:]
        if size == (h, w):
            return self.keep
        if size[0] >= h and size[1] >= w:
            return F.interpolate(self.keep, size=size, mode="nearest")
        if h % size[0] or w % size[1]:
            raise ValueError(f"a {size[0]}x{size[1]} map does not tile the {h}x{w} mask grid")
        return F.max_pool2d(self.keep, kernel_size=(h // size[0], w // size[1]))


def masked_batch_norm(
    bn: nn.BatchNorm2d, x: Tensor, keep: Tensor, *, remask: bool = True
) -> Tensor:
    """BatchNorm of ``x: [B, C, H, W]`` over the visible positions of ``keep: [B, 1, H, W]``.

    In training the batch mean and (biased) variance come from visible positions only, and the
    running statistics are updated from them as ``nn.BatchNorm2d`` would (unbiased variance);
    in evaluation the running statistics are used. Whatever ``x`` holds at masked positions is
    ignored. Masked positions of the result are zero, unless ``remask`` is False (the caller
    masks later, e.g. after an activation).
    """
    channels = x.shape[1]
    weight = bn.weight if bn.weight is not None else x.new_ones(channels)
    bias = bn.bias if bn.bias is not None else x.new_zeros(channels)
    if bn.training or not bn.track_running_stats:
        y, mean, var, count = _MaskedBatchNorm.apply(x, keep, weight, bias, bn.eps)
        if bn.training and bn.track_running_stats:
            _update_running(bn, mean, var * count / (count - 1))
        return y * keep if remask else y
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps) * weight
    shift = bias - bn.running_mean * scale
    y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
    return y * keep if remask else y


class _MaskedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm with statistics of the visible positions, and a hand-written
    backward: autograd through the same formula makes about twice the passes over the map.
    Returns ``(y, mean, var, count)``; only ``y`` carries gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, keep: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xk = x * keep  # zero-filled: sums over it are sums over the visible positions
        count = keep.sum().clamp_min(2.0)  # visible positions, every channel alike
        mean = xk.sum(dim=(0, 2, 3)) / count
        var = (xk.square().sum(dim=(0, 2, 3)) / count - mean.square()).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight
        y = torch.addcmul((bias - mean * scale).view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(x, keep, mean, rstd, weight, count)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx: Any, gy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, keep, mean, rstd, weight, count = ctx.saved_tensors
        view = (1, -1, 1, 1)
        # xhat = (x - mean) * rstd at every position; sums over all positions of gy terms
        sum_g = gy.sum(dim=(0, 2, 3))
        sum_gx = (gy * x).sum(dim=(0, 2, 3))
        sum_gxhat = (sum_gx - mean * sum_g) * rstd
        grad_weight = sum_gxhat
        grad_bias = sum_g
        # through the statistics, which only visible positions feed
        d_var = -0.5 * weight * sum_gxhat * rstd.square()
        d_mean = -weight * rstd * sum_g - 2 * mean * d_var
        a = d_mean / count
        b = 2 * d_var / count
        stats = torch.addcmul(a.view(view), x, b.view(view)) * keep
        grad_x = torch.addcmul(stats, gy, (weight * rstd).view(view))
        return grad_x, None, grad_weight, grad_bias, None


def _update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_(var.to(bn.running_var.dtype), momentum)


def _masked_se(se: Any, x: Tensor, keep: Tensor) -> Tensor:
    """Squeeze-excitation with the squeeze (global mean) taken over visible positions only."""
    pooled = (x * keep).sum(dim=(2, 3), keepdim=True) / keep.sum(dim=(2, 3), keepdim=True).clamp(1)
    if isinstance(se, SqueezeExcite):
        scale = se.conv_expand(se.act1(se.conv_reduce(pooled)))
    else:  # SEModule
        scale = se.fc2(se.act(se.bn(se.fc1(pooled))))
    return x * se.gate(scale)


class HierarchicalDecoder(nn.Module):
    """A light U-Net-like decoder: coarse-to-fine fusion with one mask token per scale.

    ``in_dims``/``strides``: the encoder features used, deepest first, each stride half the
    previous (e.g. 1280 @ 32, 112 @ 16, 40 @ 8). Widths halve per scale from ``dim`` (at least
    16). Output: images ``[B, out_chans, H, W]`` (``pixel_shuffle`` of the finest scale).
    """

    def __init__(
        self, in_dims: Sequence[int], strides: Sequence[int], dim: int, out_chans: int
    ) -> None:
        super().__init__()
        if any(a != 2 * b for a, b in itertools.pairwise(strides)):
            raise ValueError(f"decoder strides {list(strides)} must halve from scale to scale")
        widths = [max(dim >> i, 16) for i in range(len(in_dims))]
        self.out_stride = int(strides[-1])
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, w, 1) for c, w in zip(in_dims, widths, strict=True)
        )
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, w, 1, 1)) for w in widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
            for w in widths
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(a, b, kernel_size=2, stride=2) for a, b in itertools.pairwise(widths)
        )
        self.pred = nn.Conv2d(widths[-1], self.out_stride**2 * out_chans, 1)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)

    def forward(self, feats: Sequence[Tensor], keeps: Sequence[Tensor]) -> Tensor:
        """``feats[i]: [B, C_i, H / s_i, W / s_i]``, ``keeps[i]`` their keep maps -> images."""
        x: Tensor | None = None
        for i, (feat, keep) in enumerate(zip(feats, keeps, strict=True)):
            f = self.lateral[i](feat)
            f = f * keep + self.mask_tokens[i].to(f.dtype) * (1 - keep)
            x = self.blocks[i](f if x is None else x + f)
            if i < len(self.up):
                x = self.up[i](x)
        assert x is not None
        return F.pixel_shuffle(self.pred(x), self.out_stride)


class CNNMAE(MaskedAutoencoder):
    """Dense SparK-style masked autoencoder on a timm EfficientNet or ResNet.

    The mask unit (``mask_unit``, pixels per mask cell) is the network's total stride (32) by
    default; 16 or 8 give a finer grid (at 128 px: 8 x 8 or 16 x 16 instead of 4 x 4), the
    coarser stages then seeing a cell as visible when any of its pixels is. The masking
    behaviour is installed as forward hooks and per-module forwards that act only while
    :meth:`encode` runs: outside it the encoder is the plain timm model, and its
    ``state_dict`` keeps timm's key names.
    """

    default_mask_ratio = 0.6

    def __init__(
        self,
        encoder: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        decoder_dim: int = 128,
        mask_unit: int | None = None,
        decoder_scales: int = 3,
        norm_pix_loss: bool = True,
    ) -> None:
        if not isinstance(encoder, SUPPORTED):
            raise ConfigError(
                f"{type(encoder).__name__} is not a BatchNorm CNN medtl can mask "
                "(timm EfficientNet or ResNet)"
            )
        _refuse_spatial_norms(encoder)
        in_chans = _in_chans(encoder)
        info: Any = encoder.feature_info
        stride = int(info[-1]["reduction"])
        unit = stride if mask_unit is None else mask_unit
        if unit not in {stride >> k for k in range(4)}:
            raise ConfigError(
                f"mask_unit {unit} must be the network stride {stride} or a finer power of two "
                f"({stride // 2}, {stride // 4}, {stride // 8})"
            )
        if decoder_dim < 16 or decoder_scales < 1:
            raise ValueError(f"decoder_dim {decoder_dim} / decoder_scales {decoder_scales} invalid")
        super().__init__(encoder, unit, in_chans, mean, std, norm_pix_loss)
        self.stride = stride
        taps = _decoder_taps(encoder, decoder_scales, finest=min(unit, stride))
        self._taps = [name for name, _, _ in taps]
        self.decoder = HierarchicalDecoder(
            [int(encoder.num_features)] + [c for _, c, _ in taps],
            [stride] + [s for _, _, s in taps],
            decoder_dim,
            in_chans,
        )
        self._maps: KeepMaps | None = None  # set only while encoding
        self._features: dict[str, Tensor] = {}
        self._install(encoder)

    # -- the masking, installed once ------------------------------------------------------
    def _install(self, encoder: nn.Module) -> None:
        inside_se = {id(m) for se in encoder.modules() if isinstance(se, _SE) for m in se.modules()}
        into_bn = _convs_into_batch_norm(encoder)
        for name, module in encoder.named_modules():
            if id(module) in inside_se and not isinstance(module, _SE):
                continue  # SE acts on [B, C, 1, 1]: its layers are not spatial
            if isinstance(module, _SE):
                module.forward = self._wrap(module, _masked_se)  # type: ignore[method-assign,assignment]
            elif isinstance(module, nn.BatchNorm2d):
                module.forward = self._wrap(module, _bn_forward)  # type: ignore[method-assign,assignment]
            elif isinstance(module, (nn.Conv2d, *_POOLS)) and id(module) not in into_bn:
                module.register_forward_hook(self._remask)
            if name in self._taps:
                module.register_forward_hook(self._tap(name))

    def _wrap(
        self, module: nn.Module, masked: Callable[[Any, Tensor, Tensor], Tensor]
    ) -> Callable[[Tensor], Tensor]:
        plain = type(module).forward

        def forward(x: Tensor) -> Tensor:
            if self._maps is None:
                return plain(module, x)  # type: ignore[no-any-return]
            return masked(module, x, self._maps.at(x))

        return forward

    def _remask(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        return None if self._maps is None else out * self._maps.at(out)

    def _tap(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if self._maps is not None:
                self._features[name] = out

        return hook

    # -- encoding and prediction ----------------------------------------------------------
    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Raw ``x: [B, C, H, W]``, ``mask: [B, h, w]`` -> features ``[B, C_enc, H/32, W/32]``."""
        self.check(x, mask)
        return self._encode(self.normalize(x), mask)[0]

    def encode_all(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        """The deepest features and the decoder's finer taps, deepest first (for tests)."""
        self.check(x, mask)
        return self._encode(self.normalize(x), mask)

    def _encode(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        self._maps, self._features = KeepMaps(mask), {}
        try:
            x = x * self._maps.at(x)  # masked pixels become the mean
            deepest = self.encoder.forward_features(x)  # type: ignore[operator]
            deepest = deepest * self._maps.at(deepest)
            return [deepest, *(self._features[name] for name in self._taps)]
        finally:
            self._maps, self._features = None, {}

    def predict(self, x: Tensor, mask: Tensor) -> Tensor:
        """Normalised ``x`` -> predicted mask cells ``[B, L, unit * unit * C]``."""
        feats = self._encode(x, mask)
        maps = KeepMaps(mask)
        image = self.decoder(feats, [maps.at(f) for f in feats])
        return patchify(image, self.patch_size)

    def no_weight_decay(self) -> set[str]:
        """The base class's list plus the decoder's per-scale mask tokens."""
        tokens = {n for n, _ in self.named_parameters() if ".mask_tokens." in n}
        return super().no_weight_decay() | tokens


def _bn_forward(bn: nn.BatchNorm2d, x: Tensor, keep: Tensor) -> Tensor:
    """Masked BatchNorm, then timm's ``BatchNormAct2d`` dropout and activation; the result is
    re-masked once, after the activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if drop is None and act is None:
        return masked_batch_norm(bn, x, keep)
    y = masked_batch_norm(bn, x, keep, remask=False)
    if drop is not None:
        y = drop(y)
    return (act(y) if act is not None else y) * keep


def _convs_into_batch_norm(encoder: nn.Module) -> set[int]:
    """Ids of the convolutions registered just before a BatchNorm in the same parent (timm's
    ``conv_pw``/``bn1``, ``conv1``/``bn1``, a downsample's ``0``/``1``), which is the order
    they run in: that BatchNorm ignores masked positions and writes zeros there, which is the
    re-masking, so these convolutions need no hook of their own."""
    found = set()
    for parent in encoder.modules():
        children = list(parent.children())
        for conv, norm in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                found.add(id(conv))
    return found


def _in_chans(encoder: nn.Module) -> int:
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


def _refuse_spatial_norms(encoder: nn.Module) -> None:
    """GroupNorm, LayerNorm and the like mix masked and visible positions: refuse them."""
    for name, module in encoder.named_modules():
        if isinstance(module, _SPATIAL_NORMS):
            raise ConfigError(
                f"{type(encoder).__name__} layer {name} is a {type(module).__name__}; masked "
                "CNN pretraining supports BatchNorm networks (e.g. efficientnet_lite0, resnet18)"
            )


def _decoder_taps(encoder: nn.Module, scales: int, finest: int) -> list[tuple[str, int, int]]:
    """``(module name, channels, stride)`` of the last feature of each stride below the
    deepest, halving from the network stride, ``scales - 1`` of them; a mask unit finer than
    the network stride needs a decoder scale at its own stride."""
    info: list[dict[str, Any]] = list(encoder.feature_info)  # type: ignore[arg-type]
    stride = int(info[-1]["reduction"])
    last = {int(f["reduction"]): f for f in info}  # later entries win: the last of each stride
    taps = []
    for k in range(1, scales):
        s = stride >> k
        if s not in last:
            break
        taps.append((str(last[s]["module"]), int(last[s]["num_chs"]), s))
    if finest < stride and all(s > finest for _, _, s in taps):
        raise ConfigError(
            f"mask_unit {finest} is finer than the decoder's scales; raise decoder_scales"
        )
    return taps
