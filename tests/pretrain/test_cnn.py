"""Masked BatchNorm CNNs (SparK-style, dense): invariance, BatchNorm and SE statistics, weights."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from medtl.errors import ConfigError
from medtl.pretrain.cnn import CNNMAE, KeepMaps, masked_batch_norm
from medtl.pretrain.mae import build_mae
from medtl.pretrain.masking import EntropyMasking, RandomMasking
from tests.pretrain.test_mae import adam_losses, gen, images


def cnn(backbone: str, in_chans: int = 1, **options: int) -> CNNMAE:
    torch.manual_seed(0)
    mae = build_mae(backbone, in_chans=in_chans, img_size=64, decoder_dim=32, **options)
    assert isinstance(mae, CNNMAE)
    return mae


def spatial_layers(encoder: nn.Module) -> list[nn.Module]:
    """Every convolution and pooling layer outside squeeze-excitation (whose maps are 1 x 1)."""
    inside_se = {
        id(m) for se in encoder.modules() if isinstance(se, SqueezeExcite) for m in se.modules()
    }
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    return [m for m in encoder.modules() if isinstance(m, kinds) and id(m) not in inside_se]


def add_noise_at_masked(encoder: nn.Module, mask: torch.Tensor, before: bool) -> list:
    """Large noise at masked positions of every convolution and pooling output, added before
    the MAE's re-masking (``before``) or after it (then BatchNorm must ignore it)."""
    noise = gen(7)
    maps = KeepMaps(mask)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + 10 * torch.randn(out.shape, generator=noise) * (1 - maps.at(out))

    layers = spatial_layers(encoder)
    if not before:  # noise after a pooling layer would reach the next convolution's neighbours
        layers = [m for m in layers if isinstance(m, nn.Conv2d)]
    return [m.register_forward_hook(hook, prepend=before) for m in layers]


def stage_outputs(encoder: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Record the output of every stage named in ``feature_info``."""
    seen: dict[str, torch.Tensor] = {}
    names = [f["module"] for f in encoder.feature_info]
    modules = dict(encoder.named_modules())

    def record(name: str):
        return lambda module, args, out: seen.__setitem__(name, out.detach().clone())

    return seen, [modules[n].register_forward_hook(record(n)) for n in names]


CASES = [
    ("test_efficientnet", {}),  # with squeeze-excitation
    ("test_resnet", {}),  # with max-pooling
    ("test_efficientnet", {"mask_unit": 16}),
    ("test_resnet", {"mask_unit": 8}),
]


@pytest.mark.parametrize(
    ("backbone", "options"), CASES, ids=["effnet-se", "resnet", "effnet-16", "resnet-8"]
)
@pytest.mark.parametrize("before", [True, False], ids=["noise-before-remask", "noise-after-remask"])
def test_noise_at_masked_positions_moves_no_visible_output_at_any_stage(
    backbone: str, options: dict[str, int], before: bool
) -> None:
    mae = cnn(backbone, **options).train()  # batch statistics: BatchNorm must use visible ones
    x = images(2, 1)
    mask = RandomMasking(0.5)(x, mae.patch_size, gen())
    maps = KeepMaps(mask)
    pixels_masked = maps.at(x) == 0
    other = torch.where(pixels_masked, torch.rand(x.shape, generator=gen(1)), x)
    start = {k: v.clone() for k, v in mae.state_dict().items()}

    seen, handles = stage_outputs(mae.encoder)
    clean_out = mae.encode_all(x, mask)
    clean, clean_stats = dict(seen), {k: v.clone() for k, v in mae.state_dict().items()}
    mae.load_state_dict(start)
    noisy_handles = add_noise_at_masked(mae.encoder, mask, before)
    noisy_out = mae.encode_all(other, mask)
    noisy = dict(seen)
    for handle in handles + noisy_handles:
        handle.remove()

    assert set(clean) == {f["module"] for f in mae.encoder.feature_info}
    for name in clean:
        keep = maps.at(clean[name]).bool().expand_as(clean[name])
        assert torch.allclose(clean[name][keep], noisy[name][keep], atol=1e-5), name
        assert (noisy[name][~keep] == 0).all(), name
    for a, b in zip(clean_out, noisy_out, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for key, value in clean_stats.items():  # running statistics learnt from visible positions only
        assert torch.allclose(value.float(), mae.state_dict()[key].float(), atol=1e-6), key


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_without_the_masking_the_same_noise_leaks(backbone: str) -> None:
    """The control: the plain timm forward lets that noise reach visible positions."""
    mae = cnn(backbone).eval()
    x = images(2, 1)
    mask = RandomMasking(0.5)(x, mae.patch_size, gen())
    plain = mae.normalize(x) * KeepMaps(mask).at(x)
    reference = mae.encoder.forward_features(plain)
    handles = add_noise_at_masked(mae.encoder, mask, before=True)
    leaked = mae.encoder.forward_features(plain)
    for handle in handles:
        handle.remove()
    keep = KeepMaps(mask).at(reference).bool().expand_as(reference)
    assert (leaked - reference)[keep].abs().max() > 1e-2


def test_masked_batch_norm_equals_batch_norm_of_the_visible_positions() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8) * 2 + 1
    keep = (torch.rand(3, 1, 8, 8, generator=gen()) > 0.4).float()
    ours, reference = nn.BatchNorm2d(4), nn.BatchNorm1d(4)
    nn.init.normal_(ours.weight)
    nn.init.normal_(ours.bias)
    reference.load_state_dict(ours.state_dict())
    y = masked_batch_norm(ours, x, keep)
    visible = x.permute(0, 2, 3, 1)[keep[:, 0].bool()]  # [N, C] of the visible positions
    expected = reference(visible)
    assert torch.allclose(y.permute(0, 2, 3, 1)[keep[:, 0].bool()], expected, atol=1e-5)
    assert (y * (1 - keep)).abs().max() == 0
    assert torch.allclose(ours.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, reference.running_var, atol=1e-5)
    ours.eval()
    reference.eval()
    y = masked_batch_norm(ours, x, keep)
    assert torch.allclose(y.permute(0, 2, 3, 1)[keep[:, 0].bool()], reference(visible), atol=1e-5)


@pytest.mark.parametrize("remask", [True, False])
def test_masked_batch_norm_gradients_equal_those_of_the_visible_positions(remask: bool) -> None:
    """The hand-written backward against autograd through BatchNorm1d on the visible positions."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 6, 6, dtype=torch.double) * 3 + 2).requires_grad_()
    keep = (torch.rand(2, 1, 6, 6, generator=gen(), dtype=torch.double) > 0.5).double()
    grad = torch.randn(2, 3, 6, 6, generator=gen(1), dtype=torch.double)
    ours = nn.BatchNorm2d(3).double()
    nn.init.normal_(ours.weight)
    nn.init.normal_(ours.bias)
    reference = nn.BatchNorm1d(3).double()
    reference.load_state_dict(ours.state_dict())
    y = masked_batch_norm(ours, x, keep, remask=remask)
    (y * keep * grad).sum().backward()
    ours_grads = [x.grad.clone(), ours.weight.grad.clone(), ours.bias.grad.clone()]
    x.grad = None
    visible = keep[:, 0].bool()
    out = reference(x.permute(0, 2, 3, 1)[visible])
    (out * grad.permute(0, 2, 3, 1)[visible]).sum().backward()
    assert torch.allclose(ours_grads[0], x.grad, atol=1e-10)  # zero at masked positions
    assert torch.allclose(ours_grads[1], reference.weight.grad, atol=1e-10)
    assert torch.allclose(ours_grads[2], reference.bias.grad, atol=1e-10)


def test_squeeze_excitation_pools_over_visible_positions_only() -> None:
    """With the right half masked, SE's output on the left half is that of the left half alone."""
    mae = cnn("test_efficientnet").train()
    se = next(m for m in mae.encoder.modules() if isinstance(m, SqueezeExcite))
    x = torch.randn(2, se.conv_reduce.in_channels, 4, 4)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, :, 1] = True  # the right half
    maps = KeepMaps(mask)
    mae._maps = maps
    try:
        masked = se(x * maps.at(x))
    finally:
        mae._maps = None
    alone = se(x[..., :2].contiguous())
    assert torch.allclose(masked[..., :2], alone, atol=1e-6)
    plain = se(x * maps.at(x))  # timm's SE averages the zeros in: the test can fail
    assert not torch.allclose(plain[..., :2], alone, atol=1e-3)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_a_few_adam_steps_reduce_the_loss(backbone: str) -> None:
    mae = cnn(backbone)
    x = images(4, 1)
    mask = EntropyMasking(0.6)(x, mae.patch_size, gen())
    losses = adam_losses(mae, x, mask)
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_encoder_keeps_timm_names_and_its_plain_forward(backbone: str) -> None:
    mae = cnn(backbone, in_chans=3)
    weights = mae.encoder_state_dict()
    classifier = timm.create_model(backbone, num_classes=3).eval()
    result = classifier.load_state_dict(weights, strict=False)
    head = classifier.pretrained_cfg["classifier"]
    assert sorted(result.missing_keys) == [f"{head}.bias", f"{head}.weight"]
    assert result.unexpected_keys == []
    x = images(2, 3)
    mae.eval()
    assert torch.equal(mae.encoder.forward_features(x), classifier.forward_features(x))


def test_mask_unit_sets_the_grid_and_is_checked() -> None:
    mae = cnn("test_efficientnet", mask_unit=16)
    x = images(2, 1)
    mask = RandomMasking(0.6)(x, mae.patch_size, gen())
    assert mask.shape == (2, 4, 4)
    assert mae(x, mask)["pred"].shape == (2, 16, 16 * 16)
    with pytest.raises(ConfigError, match="mask_unit 12 must be the network stride 32"):
        cnn("test_efficientnet", mask_unit=12)


def test_keep_maps_upsample_and_pool() -> None:
    mask = torch.tensor([[[True, False], [True, True]]])
    maps = KeepMaps(mask)
    assert maps.at(torch.zeros(1, 1, 4, 4))[0, 0].tolist() == [[0, 0, 1, 1]] * 2 + [[0] * 4] * 2
    assert maps.at(torch.zeros(1, 1, 1, 1)).item() == 1  # a coarse cell with any visible pixel


@pytest.mark.parametrize("backbone", ["test_efficientnet_gn", "test_efficientnet_ln"])
def test_networks_with_spatial_norms_are_refused(backbone: str) -> None:
    with pytest.raises(ConfigError, match="supports BatchNorm networks"):
        build_mae(backbone, img_size=64)


def test_one_visible_cell_is_encoded_and_the_rest_is_zero() -> None:
    mae = cnn("test_resnet").eval()
    x = images(1, 1)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = False
    features = mae.encode(x, mask)
    assert features.shape[-2:] == (2, 2)
    assert features[0, :, 0, 0].abs().sum() > 0
    assert (features[0, :, 1, 1] == 0).all() and (features[0, :, 0, 1] == 0).all()
    assert F.interpolate(mask[:, None].float(), size=(64, 64)).sum() == 3 * 32 * 32
