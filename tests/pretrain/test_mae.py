from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt
from torch import nn

from medtl.errors import ConfigError
from medtl.pretrain.mae import (
    ConvNeXtMAE,
    MaskedAutoencoder,
    ViTMAE,
    build_mae,
    masked_patch_loss,
    patchify,
    pixel_targets,
    unpatchify,
)
from medtl.pretrain.masking import EntropyMasking, RandomMasking


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, chans: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus noise in [0, 1]: structure a small model can learn quickly."""
    ramp = torch.linspace(0, 1, size)
    base = 0.5 * (ramp[None, :] + ramp[:, None]) / 2 + 0.25
    noise = 0.2 * torch.rand(batch, chans, size, size, generator=gen(seed))
    return (base + noise).clamp(0, 1)


def adam_losses(
    mae: nn.Module, x: torch.Tensor, mask: torch.Tensor, steps: int = 20
) -> list[float]:
    """The loss before each of ``steps`` Adam steps (lr 1e-3) on one batch and mask."""
    optimizer = torch.optim.Adam(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = mae(x, mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tiny_convnext(in_chans: int = 1, grn: bool = False, conv_mlp: bool = False) -> ConvNeXtMAE:
    """A ConvNeXt of a few thousand parameters whose blocks are far from identity.

    Layer scale 1 (not timm's 1e-6) and random GRN weights, so that any leak from masked
    positions would show far above the 1e-5 tolerance.
    """
    torch.manual_seed(0)
    encoder = ConvNeXt(
        in_chans=in_chans,
        num_classes=0,
        depths=(1, 1, 2, 1),
        dims=(8, 16, 32, 64),
        ls_init_value=1.0,
        use_grn=grn,
        conv_mlp=conv_mlp,
    )
    for module in encoder.modules():
        if isinstance(module, GlobalResponseNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return ConvNeXtMAE(encoder, mean=(0.5,) * in_chans, std=(0.25,) * in_chans, decoder_dim=16)


def pixel_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Patch mask ``[B, h, w]`` -> pixel mask ``[B, 1, size, size]``."""
    return F.interpolate(mask.unsqueeze(1).float(), size=(size, size)).bool()


def fixed_mask(batch: int, grid: int, ratio: float = 0.5, seed: int = 0) -> torch.Tensor:
    return RandomMasking(ratio)(torch.zeros(batch, 1, grid, grid), 1, gen(seed))


# masked-pixel invariance


def add_noise_at_masked(encoder: ConvNeXt, mask: torch.Tensor) -> list:
    """Hooks adding large noise at masked positions to the stem, downsample and every dw-conv output."""
    noise = gen(7)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        keep = F.interpolate((~mask).unsqueeze(1).float(), size=out.shape[-2:])
        return out + 10 * torch.randn(out.shape, generator=noise) * (1 - keep)

    targets = [encoder.stem, *(s.downsample for s in encoder.stages)]
    targets += [b.conv_dw for s in encoder.stages for b in s.blocks]
    return [t.register_forward_hook(hook) for t in targets]


@pytest.mark.parametrize(
    ("grn", "conv_mlp"),
    [(False, False), (True, False), (True, True)],
    ids=["convnext", "convnext-v2-grn", "grn-channels-first"],
)
def test_visible_features_ignore_anything_at_masked_positions(grn: bool, conv_mlp: bool) -> None:
    mae = tiny_convnext(grn=grn, conv_mlp=conv_mlp)
    x, mask = images(2, 1, 128), fixed_mask(2, 4)
    clean = mae.encode(x, mask)
    handles = add_noise_at_masked(mae.encoder, mask)
    noisy = mae.encode(x, mask)
    visible = (~mask).unsqueeze(1).expand_as(clean)
    assert torch.allclose(clean[visible], noisy[visible], atol=1e-5)
    assert (noisy[~visible] == 0).all()
    # the same noise leaks into visible features of the plain timm forward (the test can fail)
    plain_input = mae.normalize(x) * ~pixel_mask(mask, 128)
    leaked = mae.encoder.forward_features(plain_input)
    for handle in handles:
        handle.remove()
    reference = mae.encoder.forward_features(plain_input)
    assert (leaked - reference)[visible].abs().max() > 1e-2


@pytest.mark.parametrize("backbone", ["test_convnext", "test_vit"])
def test_encoding_does_not_depend_on_masked_pixels(backbone: str) -> None:
    mae = build_mae(backbone, in_chans=3, img_size=64)
    x = images(2, 3)
    mask = RandomMasking(mae.default_mask_ratio)(x, mae.patch_size, gen())
    at_masked = pixel_mask(mask, 64)
    other = torch.where(at_masked, torch.rand(x.shape, generator=gen(1)), x)
    changed_visible = torch.where(at_masked, x, torch.rand(x.shape, generator=gen(2)))
    mae.eval()
    base = mae.encode(x, mask)
    assert torch.allclose(base, mae.encode(other, mask), atol=1e-5)
    assert not torch.allclose(base, mae.encode(changed_visible, mask), atol=1e-3)


def test_vit_encodes_only_the_visible_tokens() -> None:
    mae = build_mae("test_vit", in_chans=1, img_size=64)
    mask = fixed_mask(3, 4, ratio=0.75)
    tokens = mae.encode(images(3, 1), mask)
    assert tokens.shape == (3, 1 + 4, 64)  # class token + 4 of 16 patches


# the loss


def test_loss_counts_only_masked_patches() -> None:
    target = torch.randn(2, 4, 6, generator=gen())
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    pred = target.clone()
    pred[mask] += 1.0  # error 1 on every pixel of every masked patch
    assert masked_patch_loss(pred, target, mask) == pytest.approx(1.0)
    pred[~mask] += torch.randn(pred[~mask].shape, generator=gen(1))
    assert masked_patch_loss(pred, target, mask) == pytest.approx(1.0)
    pred[0, 0] += 1.0  # a masked patch now has error 4
    assert masked_patch_loss(pred, target, mask) == pytest.approx((4 + 1 + 1) / 3)


def test_loss_of_an_empty_mask_is_zero() -> None:
    pred = torch.ones(1, 4, 3)
    assert (
        masked_patch_loss(pred, torch.zeros_like(pred), torch.zeros(1, 2, 2, dtype=torch.bool)) == 0
    )


def test_targets_are_normalised_per_patch() -> None:
    x = images(2, 3, 32)
    x[0, :, :16, :16] = 0.3  # a flat patch has all-zero targets
    target = pixel_targets(x, 16)
    assert target.shape == (2, 4, 16 * 16 * 3)
    assert torch.allclose(target[0, 0], torch.zeros(768))
    assert torch.allclose(target[1].mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(target[1].std(-1, correction=0), torch.ones(4), atol=1e-3)


def test_patchify_round_trip_and_order() -> None:
    x = torch.arange(2 * 3 * 4 * 8, dtype=torch.float).reshape(2, 3, 4, 8)
    patches = patchify(x, 4)
    assert patches.shape == (2, 2, 4 * 4 * 3)
    assert torch.equal(patches[0, 1, :3], x[0, :, 0, 4])  # second patch, first pixel, (p, p, C)
    assert torch.equal(unpatchify(patches, 4, (1, 2)), x)


# training, weights, reconstruction


@pytest.mark.parametrize("backbone", ["test_convnext", "test_vit"])
def test_a_few_adam_steps_reduce_the_loss(backbone: str) -> None:
    torch.manual_seed(0)
    mae = build_mae(backbone, in_chans=1, img_size=64, decoder_dim=32, decoder_depth=1)
    x = images(4, 1)
    mask = EntropyMasking(mae.default_mask_ratio)(x, mae.patch_size, gen())
    losses = adam_losses(mae, x, mask)
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize(
    ("backbone", "in_chans", "size", "head"),
    [
        ("test_convnext", 1, 64, "head.fc"),
        ("convnext_atto", 3, 64, "head.fc"),
        ("test_vit", 1, 32, "head"),
        ("test_vit", 3, 64, "head"),
    ],
)
def test_encoder_weights_load_into_a_classifier(
    backbone: str, in_chans: int, size: int, head: str
) -> None:
    mae = build_mae(backbone, in_chans=in_chans, img_size=size, decoder_dim=16)
    weights = mae.encoder_state_dict()
    assert not any("decoder" in key or "mask_token" in key for key in weights)
    kwargs = {"img_size": size} if isinstance(mae, ViTMAE) else {}
    classifier = timm.create_model(backbone, num_classes=3, in_chans=in_chans, **kwargs)
    result = classifier.load_state_dict(weights, strict=False)
    assert sorted(result.missing_keys) == [f"{head}.bias", f"{head}.weight"]
    assert result.unexpected_keys == []
    key = next(iter(weights))
    assert torch.equal(classifier.state_dict()[key], weights[key])


@pytest.mark.parametrize("backbone", ["test_convnext", "test_vit"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_and_reconstruct(backbone: str, in_chans: int) -> None:
    mae = build_mae(backbone, in_chans=in_chans, img_size=64, decoder_dim=16, decoder_depth=1)
    x = images(2, in_chans)
    mask = EntropyMasking(mae.default_mask_ratio)(x, mae.patch_size, gen())
    out = mae(x, mask)
    p, grid = mae.patch_size, 64 // mae.patch_size
    assert out["pred"].shape == (2, grid * grid, p * p * in_chans)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["mask"] is mask
    image = mae.reconstruct(x, mask)
    assert image.shape == x.shape and image.min() >= 0 and image.max() <= 1
    visible = ~pixel_mask(mask, 64).expand_as(x)
    assert torch.equal(image[visible], x[visible])
    assert not torch.allclose(image[~visible], x[~visible])


def test_norm_stats_come_from_the_backbone() -> None:
    rgb = build_mae("convnext_atto", in_chans=3, img_size=64)
    gray = build_mae("convnext_atto", in_chans=1, img_size=64)
    assert rgb.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert gray.mean.flatten().tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert gray.std.flatten().tolist() == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert (rgb.patch_size, rgb.default_mask_ratio) == (32, 0.6)
    vit = build_mae("test_vit", in_chans=1, img_size=32, mean=(0.2,), std=(0.1,))
    assert (vit.patch_size, vit.default_mask_ratio, vit.mean.item()) == (
        16,
        0.75,
        pytest.approx(0.2),
    )


# errors


@pytest.fixture(scope="module")
def small() -> MaskedAutoencoder:
    return build_mae("test_vit", in_chans=1, img_size=32, decoder_dim=16)


def test_mask_of_the_wrong_shape_is_refused(small: MaskedAutoencoder) -> None:
    with pytest.raises(ValueError, match=r"mask must be bool \[2, 2, 2\]"):
        small(torch.rand(2, 1, 32, 32), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="images have 3 channels, the model 1"):
        small(torch.rand(2, 3, 32, 32), torch.zeros(2, 2, 2, dtype=torch.bool))


def test_vit_mask_counts_must_agree(small: MaskedAutoencoder) -> None:
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])
    with pytest.raises(ValueError, match=r"same number of masked patches per image, got \[1, 2\]"):
        small(torch.rand(2, 1, 32, 32), mask)


def test_unknown_or_unsupported_backbones_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'convnext_atto'\?"):
        build_mae("convnext_ato")
    with pytest.raises(ConfigError, match=r"is a ByobNet; MAE pretraining supports"):
        build_mae("test_byobnet")
    with pytest.raises(
        ConfigError, match=r"no decoder option decoder_heads \(allowed: decoder_dim"
    ):
        build_mae("test_convnext", img_size=64, decoder_heads=4)
