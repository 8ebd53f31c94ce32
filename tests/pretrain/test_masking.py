from __future__ import annotations

import math

import pytest
import torch

from medtl.errors import ConfigError
from medtl.pretrain.masking import (
    MASKING,
    EntropyMasking,
    RandomMasking,
    build_masking,
    patch_entropy,
)

PATCH = 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def half_noise(copies: int) -> torch.Tensor:
    """``copies`` of one 64x64 image: left half uniform noise, right half flat grey."""
    x = torch.full((1, 1, 64, 64), 0.5)
    x[..., :32] = torch.rand(1, 1, 64, 32, generator=gen(1))
    return x.expand(copies, -1, -1, -1)


def letterboxed(copies: int) -> torch.Tensor:
    """``copies`` of a 64x64 image: noisy 32x32 content in the centre, zero borders around it."""
    x = torch.zeros(1, 1, 64, 64)
    x[..., 16:48, 16:48] = torch.rand(1, 1, 32, 32, generator=gen(2))
    return x.expand(copies, -1, -1, -1)


# patch_entropy


def test_entropy_by_hand() -> None:
    x = torch.zeros(1, 1, 2, 6)
    x[0, 0, :, 0:2] = 0.3  # constant: 0 bits
    x[0, 0, 0, 2:4], x[0, 0, 1, 2:4] = 0.0, 1.0  # two values, equal counts: 1 bit
    x[0, 0, :, 4:6] = torch.tensor([[0.0, 0.3], [0.6, 0.9]])  # four bins of 4: 2 bits
    assert torch.allclose(patch_entropy(x, 2, bins=4), torch.tensor([[[0.0, 1.0, 2.0]]]))


def test_entropy_of_constant_and_noise_patches() -> None:
    x = torch.full((1, 1, 32, 64), 0.7)
    x[..., 32:] = torch.rand(1, 1, 32, 32, generator=gen())
    bits = patch_entropy(x, 32, bins=32)
    assert bits.shape == (1, 1, 2)
    assert bits[0, 0, 0] == 0
    assert math.log2(32) - 0.1 < bits[0, 0, 1] <= math.log2(32)


def test_entropy_uses_the_channel_mean_for_rgb() -> None:
    noise = torch.rand(1, 1, 16, 16, generator=gen())
    flat_mean = torch.cat([noise, 1 - noise, torch.full_like(noise, 0.5)], dim=1)
    assert patch_entropy(flat_mean, 8).abs().max() < 1e-6
    assert (patch_entropy(noise, 8) > 3).all()  # one channel is used as it is


def test_entropy_refuses_sizes_off_the_patch_grid() -> None:
    with pytest.raises(ValueError, match=r"60x64 is not a multiple of the patch size 8"):
        patch_entropy(torch.rand(1, 1, 60, 64), 8)


# exact counts, reproducibility, device


@pytest.mark.parametrize("ratio", [0.1, 0.6, 0.75])
@pytest.mark.parametrize(
    "strategy",
    [RandomMasking, EntropyMasking, lambda ratio: EntropyMasking(ratio, random_share=0.5)],
)
def test_masked_count_is_exact(strategy, ratio: float) -> None:
    x = torch.rand(5, 3, 64, 48, generator=gen())
    x[0] = 0.0  # a constant image has no entropy signal at all
    mask = strategy(ratio=ratio)(x, PATCH, gen())
    assert mask.dtype == torch.bool and mask.shape == (5, 8, 6)
    assert mask.sum(dim=(1, 2)).tolist() == [round(ratio * 48)] * 5


@pytest.mark.parametrize("name", ["random", "entropy"])
def test_same_seed_same_mask_other_seed_other_mask(name: str) -> None:
    x = torch.rand(4, 1, 64, 64, generator=gen())
    strategy = build_masking(name, ratio=0.5)
    assert torch.equal(strategy(x, PATCH, gen(3)), strategy(x, PATCH, gen(3)))
    assert not torch.equal(strategy(x, PATCH, gen(3)), strategy(x, PATCH, gen(4)))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["random", "entropy"])
def test_mask_stays_on_the_device_of_the_images(name: str, device: str) -> None:
    x = torch.rand(2, 3, 32, 32, device=device)
    mask = build_masking(name)(x, PATCH, torch.Generator(device=device).manual_seed(0))
    assert mask.device == x.device


def test_generator_on_another_device_is_refused() -> None:
    x = torch.rand(1, 1, 16, 16, device="meta")
    with pytest.raises(ValueError, match="generator is on cpu"):
        RandomMasking()(x, PATCH, gen())


# entropy guidance, statistically (fixed seeds, so deterministic)


def test_noisy_patches_are_masked_more_often() -> None:
    draws, ratio = 500, 0.25
    mask = EntropyMasking(ratio)(half_noise(draws), PATCH, gen()).float()
    noisy, flat = mask[..., :4].mean(), mask[..., 4:].mean()
    sd = math.sqrt(ratio * (1 - ratio) / (draws * 32))  # binomial sd of a half's frequency
    assert noisy > ratio + 10 * sd
    assert flat < ratio - 10 * sd


def test_infinite_temperature_is_uniform() -> None:
    draws, ratio = 2000, 0.25
    mask = EntropyMasking(ratio, temperature=1e6)(half_noise(draws), PATCH, gen()).float()
    freq = mask.mean(dim=0)  # [8, 8], each ~ Binomial(draws, ratio) / draws
    sd = math.sqrt(ratio * (1 - ratio) / draws)
    assert (freq - ratio).abs().max() < 4.5 * sd
    assert (mask[..., :4].mean() - mask[..., 4:].mean()).abs() < 4 * sd


def test_random_share_one_is_the_random_strategy() -> None:
    x = half_noise(64)
    entropy = EntropyMasking(0.4, temperature=0.1, random_share=1.0)(x, PATCH, gen(5))
    assert torch.equal(entropy, RandomMasking(0.4)(x, PATCH, gen(5)))


def test_random_share_draws_part_of_the_mask_uniformly() -> None:
    """With temperature 1e-3 the entropy part never picks the flat half; the random part does."""
    draws, ratio = 400, 0.25
    mask = EntropyMasking(ratio, temperature=1e-3, random_share=0.5)(half_noise(draws), 8, gen())
    flat_count = mask[..., 4:].sum(dim=(1, 2)).float()
    # 8 of 16 masked patches are uniform over 64, so about 4 land in the flat half
    assert 3.5 < flat_count.mean() < 4.5
    assert EntropyMasking(ratio, temperature=1e-3)(half_noise(draws), 8, gen())[..., 4:].sum() == 0


def test_letterbox_borders_do_not_dominate() -> None:
    """Borders are 3/4 of the image; at the default temperature they get under 1/3 of the mask."""
    draws, ratio = 500, 0.15  # 10 of 64 patches; the content has 16
    content = torch.zeros(8, 8, dtype=torch.bool)
    content[2:6, 2:6] = True
    mask = EntropyMasking(ratio)(letterboxed(draws), PATCH, gen())
    assert mask[:, ~content].sum() < mask.sum() / 3
    freq = mask.float().mean(dim=0)
    assert freq[~content].mean() < 0.2 * freq[content].mean()
    cold = EntropyMasking(ratio, temperature=0.1)(letterboxed(draws), PATCH, gen())
    assert not cold[:, ~content].any()


# validation and the registry


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.0}, r"mask ratio must be in \(0, 1\), got 0.0"),
        ({"ratio": 1.0}, r"got 1.0"),
        ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        ({"temperature": float("nan")}, r"got nan"),
        ({"random_share": -0.1}, r"random_share must be in \[0, 1\], got -0.1"),
        ({"random_share": 1.5}, r"got 1.5"),
    ],
)
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EntropyMasking(**options)


def test_registry_names_and_did_you_mean() -> None:
    assert MASKING.names() == ["entropy", "random"]
    assert isinstance(build_masking("entropy", temperature=2.0), EntropyMasking)
    with pytest.raises(ConfigError, match=r"did you mean 'entropy'\?"):
        build_masking("entropi")
    with pytest.raises(ConfigError, match=r"no option temprature \(allowed: ratio, temperature"):
        build_masking("entropy", temprature=2.0)
