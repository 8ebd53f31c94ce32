"""Masked autoencoders on timm backbones: dense FCMAE-style ConvNeXt and MAE-style ViT.

Both wrappers take raw images ``x: [B, C, H, W]`` in [0, 1] and a patch mask ``[B, h, w]``
(True = masked, from :mod:`medtl.pretrain.masking`), normalise with the backbone's mean/std
inside, and score only masked patches against per-patch normalised pixels (MAE's
``norm_pix_loss``). The backbone stays a plain timm model, so its ``state_dict`` keeps
timm's key names and loads into ``timm.create_model(name, num_classes=K)``.

ConvNeXt follows ConvNeXt-V2's FCMAE and SparK, but dense: instead of sparse convolutions,
masked positions are held at zero at every resolution (after the stem, at every block's input
and output, and before every Global Response Norm), so no visible feature depends on what
sits at a masked position. Written here because timm has no masked ConvNeXt and the sparse
versions need MinkowskiEngine or SparK's own ops.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medtl.errors import ConfigError
from medtl.models import norm_stats
from medtl.pretrain.masking import grid_size

__all__ = [
    "ConvNeXtMAE",
    "MaskedAutoencoder",
    "ViTMAE",
    "build_mae",
    "masked_patch_loss",
    "norm_stats",
    "patchify",
    "pixel_targets",
    "unpatchify",
    "visible_indices",
]

Tensor = torch.Tensor


def patchify(x: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W] -> [B, L, patch * patch * C]``, patches row-major, pixels as ``(p, p, C)``."""
    h, w = grid_size(x, patch)
    b, c = x.shape[:2]
    x = x.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p * p * C] -> [B, C, h * p, w * p]``."""
    (h, w), b = grid, patches.shape[0]
    x = patches.reshape(b, h, w, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, h * patch, w * patch)


def _patch_moments(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` of ``patches: [B, L, D]``, each ``[B, L, 1]``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, correction=0)
    return mean, (var + eps).sqrt()


def pixel_targets(x: Tensor, patch: int, normalize: bool = True) -> Tensor:
    """Reconstruction targets ``[B, L, p * p * C]`` from raw ``x: [B, C, H, W]``.

    With ``normalize`` each patch is standardised by its own mean and variance (MAE's
    ``norm_pix_loss``), so flat patches have all-zero targets.
    """
    patches = patchify(x.float(), patch)
    if not normalize:
        return patches
    mean, std = _patch_moments(patches)
    return (patches - mean) / std


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over masked patches only.

    ``pred, target: [B, L, D]``, ``mask: [B, h, w]`` or ``[B, L]`` (True = masked). Each
    patch's error is averaged over its pixels, then over the masked patches; visible patches
    do not count. A mask with nothing masked gives 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    weight = mask.reshape(mask.shape[0], -1).to(pred.dtype)
    if weight.shape != pred.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match {pred.shape[1]} patches")
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def _resize_keep(keep: Tensor, like: Tensor) -> Tensor:
    """The keep map ``[B, 1, h, w]`` (1 = visible) at the spatial size of ``like: [B, C, H', W']``."""
    if keep.shape[-2:] == like.shape[-2:]:
        return keep
    return F.interpolate(keep, size=like.shape[-2:], mode="nearest")


class MaskedAutoencoder(nn.Module):
    """Shared part of the MAEs: input checks, normalisation, loss, reconstruction, weights.

    Subclasses set ``patch_size``, ``in_chans``, ``default_mask_ratio`` and implement
    :meth:`predict`.
    """

    default_mask_ratio = 0.75
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        patch_size: int,
        in_chans: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        mean, std = norm_stats(encoder, in_chans, mean, std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def check(self, x: Tensor, mask: Tensor) -> tuple[int, int]:
        """The patch grid ``(h, w)``; raises ValueError naming the shapes when x and mask disagree."""
        grid = grid_size(x, self.patch_size)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"images have {x.shape[1]} channels, the model {self.in_chans}")
        if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *grid):
            raise ValueError(
                f"mask must be bool [{x.shape[0]}, {grid[0]}, {grid[1]}] for images "
                f"{tuple(x.shape)} and patch {self.patch_size}, got {mask.dtype} {tuple(mask.shape)}"
            )
        return grid

    def normalize(self, x: Tensor) -> Tensor:
        """Raw ``[0, 1]`` images to the backbone's input scale."""
        return (x - self.mean) / self.std

    def predict(self, x: Tensor, mask: Tensor) -> Tensor:
        """Predicted patches ``[B, L, p * p * C]`` from normalised ``x`` and ``mask: [B, h, w]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``x: [B, C, H, W]`` in [0, 1], ``mask: [B, h, w]`` -> ``{"loss", "pred", "mask"}``.

        ``pred: [B, L, p * p * C]`` is in target units (per-patch normalised with
        ``norm_pix_loss``); ``loss`` is the masked-only MSE.
        """
        self.check(x, mask)
        pred = self.predict(self.normalize(x), mask)
        target = pixel_targets(x, self.patch_size, self.norm_pix_loss)
        return {"loss": masked_patch_loss(pred, target, mask), "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [0, 1]: visible patches from ``x``, masked ones predicted.

        Predictions are de-normalised with the true patch statistics, as MAE's figures do; it
        is for pictures, not a measure of quality. Runs in the module's current mode.
        """
        grid = self.check(x, mask)
        patches = patchify(x, self.patch_size)
        pred = self.predict(self.normalize(x), mask).to(patches.dtype)
        if self.norm_pix_loss:
            mean, std = _patch_moments(patches)
            pred = pred * std + mean
        masked = mask.reshape(mask.shape[0], -1, 1)
        return unpatchify(torch.where(masked, pred.clamp(0, 1), patches), self.patch_size, grid)

    def no_weight_decay(self) -> set[str]:
        """Names of the tensors AdamW must not decay (timm's convention, read by
        ``timm.optim.param_groups_weight_decay``): the encoder's own ``no_weight_decay()``
        (a ViT's ``pos_embed``, ``cls_token``) and every token or position embedding here, such
        as the decoders' ``mask_token``. Biases, norms and other 1-D tensors are excluded by
        timm's rule without being listed."""
        listed = getattr(self.encoder, "no_weight_decay", None)
        names = {f"encoder.{n}" for n in (listed() if callable(listed) else ())}
        tokens = ("mask_token", "cls_token", "reg_token", "dist_token", "pos_embed")
        return names | {n for n, _ in self.named_parameters() if n.endswith(tokens)}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The backbone's weights in timm's key names, without head or decoder keys."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}


class ConvDecoder(nn.Module):
    """FCMAE's light decoder: 1x1 projection, mask tokens, ConvNeXt-V2 blocks, 1x1 pixel head."""

    def __init__(self, in_dim: int, dim: int, depth: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        blocks = [ConvNeXtBlock(dim, use_grn=True, ls_init_value=None) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.pred = nn.Conv2d(dim, out_dim, kernel_size=1)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """``feats: [B, C, h, w]``, ``mask: [B, h, w]`` -> ``[B, L, out_dim]``."""
        x = self.embed(feats)
        masked = mask.unsqueeze(1).to(x.dtype)
        x = x * (1 - masked) + self.mask_token.to(x.dtype) * masked
        return self.pred(self.blocks(x)).flatten(2).transpose(1, 2)


class ConvNeXtMAE(MaskedAutoencoder):
    """Dense masked ConvNeXt (FCMAE / SparK without sparse convolutions) with a light decoder.

    Patch = the network's total stride (32). Every block runs as ``block(x * keep) * keep``
    (the inner product is done once per stage, since each block's output is already masked),
    which equals zeroing the residual branch at masked positions before the add and keeping
    the sum zero there (the outer ``* keep`` also keeps intermediate maps clean, e.g. for
    hooks); GRN layers see zeros at masked positions. Depthwise convolutions thus see zeros
    where a sparse convolution would see nothing. Grad checkpointing of the stages is not
    applied on this path.
    """

    default_mask_ratio = 0.6
    encoder: ConvNeXt

    def __init__(
        self,
        encoder: ConvNeXt,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        decoder_dim: int = 256,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
    ) -> None:
        in_chans = next(encoder.stem.parameters()).shape[1]  # stem conv weight [out, in, k, k]
        patch = int(encoder.feature_info[-1]["reduction"])  # type: ignore[call-overload]
        super().__init__(encoder, patch, in_chans, mean, std, norm_pix_loss)
        if decoder_dim < 1 or decoder_depth < 0:
            raise ValueError(f"decoder_dim {decoder_dim} / decoder_depth {decoder_depth} invalid")
        out_dim = patch * patch * in_chans
        self.decoder = ConvDecoder(encoder.num_features, decoder_dim, decoder_depth, out_dim)
        self._keep: Tensor | None = None  # set only while encoding, read by the GRN hooks
        for module in encoder.modules():
            if isinstance(module, GlobalResponseNorm):
                module.register_forward_pre_hook(self._mask_grn_input)

    def _mask_grn_input(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor] | None:
        """Zero masked positions before GRN's spatial norm (``[B, H, W, C]`` or ``[B, C, H, W]``)."""
        if self._keep is None:
            return None
        (x,) = args
        channels_last = isinstance(module, GlobalResponseNorm) and module.spatial_dim == (1, 2)
        like = x.permute(0, 3, 1, 2) if channels_last else x
        keep = _resize_keep(self._keep, like).to(x.dtype)
        return (x * (keep.permute(0, 2, 3, 1) if channels_last else keep),)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Raw ``x: [B, C, H, W]`` and ``mask: [B, h, w]`` -> features ``[B, C_enc, h, w]``, zero where masked."""
        self.check(x, mask)
        return self._encode(self.normalize(x), mask)

    def _encode(self, x: Tensor, mask: Tensor) -> Tensor:
        encoder = self.encoder
        keep = (~mask).unsqueeze(1).to(x.dtype)
        self._keep = keep
        try:
            x = x * _resize_keep(keep, x)  # masked pixels become the mean
            x = cast(nn.Module, encoder.stem)(x)
            x = x * _resize_keep(keep, x)
            for stage in cast(list[ConvNeXtStage], list(encoder.stages)):
                x = stage.downsample(x)
                k = _resize_keep(keep, x)  # one resize per stage: blocks keep the resolution
                x = x * k  # the downsample's norm and bias fill masked positions: clear them
                for block in stage.blocks:
                    x = block(x) * k  # x enters already zero where masked
            x = encoder.norm_pre(x)
            return x * _resize_keep(keep, x)
        finally:
            self._keep = None

    def predict(self, x: Tensor, mask: Tensor) -> Tensor:
        """Normalised ``x: [B, C, H, W]`` -> predicted patches ``[B, L, p * p * C]``."""
        return self.decoder(self._encode(x, mask), mask)


def visible_indices(mask: Tensor) -> Tensor:
    """Indices ``[B, N_vis]`` of the visible patches of ``mask: [B, h, w]``, in grid order.

    Every image must have the same number of masked patches (the masking strategies ensure it).
    """
    flat = mask.flatten(1)
    counts = flat.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"ViT masks need the same number of masked patches per image, got {counts.tolist()}"
        )
    n_visible = flat.shape[1] - int(counts[0])
    return torch.argsort(flat.to(torch.uint8), dim=1, stable=True)[:, :n_visible]


class TokenDecoder(nn.Module):
    """MAE's light decoder: mask tokens, fixed 2-D sin-cos positions, transformer blocks."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, out_dim: int, num_prefix: int
    ) -> None:
        super().__init__()
        if dim % 4 or dim % heads:
            raise ValueError(
                f"decoder_dim {dim} must be divisible by 4 and by decoder_heads {heads}"
            )
        self.num_prefix = num_prefix
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, keep_ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """``tokens: [B, P + N_vis, D_enc]``, ``keep_ids: [B, N_vis]`` -> ``[B, L, out_dim]``."""
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, dim = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).repeat(b, grid[0] * grid[1], 1)
        full = full.scatter(1, keep_ids.unsqueeze(-1).expand(-1, -1, dim), visible)
        pos = build_sincos2d_pos_embed(list(grid), dim, device=x.device, dtype=x.dtype)
        x = self.blocks(torch.cat([prefix, full + pos], dim=1))
        return self.pred(self.norm(x[:, self.num_prefix :]))


class ViTMAE(MaskedAutoencoder):
    """MAE on a timm ViT: encode only the visible tokens, decode with mask tokens.

    Patch = the ViT's patch size. Class/register tokens pass through encoder and decoder.
    """

    default_mask_ratio = 0.75
    encoder: VisionTransformer

    def __init__(
        self,
        encoder: VisionTransformer,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        norm_pix_loss: bool = True,
    ) -> None:
        height, width = encoder.patch_embed.patch_size
        if height != width:
            raise ValueError(f"square ViT patches are needed, got {height}x{width}")
        in_chans = encoder.patch_embed.proj.in_channels
        super().__init__(encoder, height, in_chans, mean, std, norm_pix_loss)
        self.decoder = TokenDecoder(
            encoder.embed_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            height * height * in_chans,
            encoder.num_prefix_tokens,
        )

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Raw ``x`` and ``mask: [B, h, w]`` -> tokens ``[B, P + N_vis, D]`` (prefix tokens first)."""
        self.check(x, mask)
        return self._encode(self.normalize(x), visible_indices(mask))

    def _encode(self, x: Tensor, keep_ids: Tensor) -> Tensor:
        vit = self.encoder
        tokens = vit._pos_embed(vit.patch_embed(x))  # [B, P + L, D]
        prefix, patches = tokens[:, : vit.num_prefix_tokens], tokens[:, vit.num_prefix_tokens :]
        index = keep_ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        tokens = torch.cat([prefix, patches.gather(1, index)], dim=1)
        return vit.norm(vit.blocks(vit.norm_pre(tokens)))

    def predict(self, x: Tensor, mask: Tensor) -> Tensor:
        """Normalised ``x: [B, C, H, W]`` -> predicted patches ``[B, L, p * p * C]``."""
        keep_ids = visible_indices(mask)
        grid = (mask.shape[1], mask.shape[2])
        return self.decoder(self._encode(x, keep_ids), keep_ids, grid)


def _create_backbone(
    name: str, in_chans: int, img_size: int, pretrained: bool, weights: str | None = None
) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``; ViTs are built for ``img_size``.

    ``weights`` (a pretrained source such as ``imagenet:efficientnet_lite0`` or a local file)
    is loaded through :func:`medtl.sources.load_source` into the model with a one-class head,
    which is then removed (``reset_classifier(0)``): a source's classifier has nowhere to go
    in an encoder, and the registry's layout converters expect the full network.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown timm backbone {name!r}{hint}")
    options: dict[str, Any] = {"pretrained": pretrained, "in_chans": in_chans}
    options["num_classes"] = 1 if weights else 0
    model = timm.create_model(name, **options)
    if isinstance(model, VisionTransformer) and model.patch_embed.img_size != (img_size, img_size):
        model = timm.create_model(name, img_size=img_size, **options)
    if weights:
        from medtl.sources import load_source

        model.source_info = load_source(model, weights)  # type: ignore[assignment]
        model.reset_classifier(0)  # type: ignore[operator]
    return model


def build_mae(
    backbone: str,
    in_chans: int = 3,
    img_size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    norm_pix_loss: bool = True,
    **decoder_kwargs: int | None,
) -> MaskedAutoencoder:
    """A masked autoencoder around the timm ``backbone``: a ConvNeXt, a ViT, or a BatchNorm
    CNN (EfficientNet, ResNet; :class:`medtl.pretrain.cnn.CNNMAE`).

    ``mean``/``std`` default to the backbone's ``pretrained_cfg`` (averaged for one channel).
    ``decoder_kwargs``: ``decoder_dim``, ``decoder_depth`` and, for ViTs, ``decoder_heads``.
    ``img_size`` fixes a ViT's position grid; ConvNeXts take any multiple of 32.
    ``weights``: starting weights (a pretrained source or a local file, see
    :mod:`medtl.sources`); ``mean``/``std`` then default to the source's.
    """
    if in_chans < 1 or img_size < 1:
        raise ValueError(f"in_chans {in_chans} and img_size {img_size} must be positive")
    from medtl.pretrain.cnn import CNNMAE, SUPPORTED

    encoder = _create_backbone(backbone, in_chans, img_size, pretrained, weights)
    options = {k: v for k, v in decoder_kwargs.items() if v is not None}
    if isinstance(encoder, SUPPORTED):
        _check_options(CNNMAE, options)
        return CNNMAE(encoder, mean, std, norm_pix_loss=norm_pix_loss, **options)
    if isinstance(encoder, ConvNeXt):
        _check_options(ConvNeXtMAE, options)
        return ConvNeXtMAE(encoder, mean, std, norm_pix_loss=norm_pix_loss, **options)
    if isinstance(encoder, VisionTransformer):
        _check_options(ViTMAE, options)
        return ViTMAE(encoder, mean, std, norm_pix_loss=norm_pix_loss, **options)
    raise ConfigError(
        f"backbone {backbone!r} is a {type(encoder).__name__}; MAE pretraining supports timm "
        f"ConvNeXt (convnext_*, convnextv2_*), ViT (vit_*), EfficientNet (efficientnet_*) and "
        f"ResNet (resnet*) backbones"
    )


def _check_options(family: type[MaskedAutoencoder], options: dict[str, int]) -> None:
    """Refuse decoder options that ``family`` does not take, naming the allowed ones."""
    params = inspect.signature(family).parameters
    allowed = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "norm_pix_loss"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{family.__name__} has no decoder option {', '.join(unknown)} "
            f"(allowed: {', '.join(allowed)})"
        )
