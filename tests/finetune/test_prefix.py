"""Frozen-prefix caching: segments reproduce the model, and cached training equals uncached."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from medtl.finetune import blocks_of, plan
from medtl.finetune import prefix as px
from medtl.models import Classifier, build_classifier
from medtl.train import Schedule, fit, supervised_step

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = ["medtl_tiny_convnext", "test_resnet", "medtl_tiny_vit", "test_efficientnet"]


class Blobs(Dataset):
    """Three classes of 32x32 one-channel images: noise plus a class-dependent square."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 0.3
        for k in range(3):
            self.images[self.labels == k, :, 4 + 8 * k : 12 + 8 * k, 8:24] += 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _model(backbone: str, seed: int = 0, **kwargs: Any) -> Classifier:
    torch.manual_seed(seed)
    extra = {"img_size": 32} if backbone == "medtl_tiny_vit" else {}
    return build_classifier(backbone, num_classes=3, in_chans=1, **extra, **kwargs)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_segments_cut_the_model_at_its_blocks_and_reproduce_its_forward(backbone: str) -> None:
    model = _model(backbone).eval()
    segments = px.segments_of(model)
    assert segments is not None
    assert px.check_segments(model, blocks_of(model), segments) == ""
    x = Blobs(4).images
    torch.testing.assert_close(px.run_segments(segments, x), model(x))
    for k in range(1, len(segments)):
        head = px.run_segments(segments[:k], x)
        torch.testing.assert_close(px.SuffixModel(model, segments, k)(head), model(x))


def test_unsupported_family_and_misaligned_segments_are_refused() -> None:
    model = build_classifier("test_byobnet", num_classes=3, in_chans=1)
    assert px.segments_of(model) is None
    tiny = _model("medtl_tiny_convnext")
    segments = px.segments_of(tiny)
    assert segments is not None
    swapped = [segments[1], segments[0], *segments[2:]]
    assert "later block" in px.check_segments(tiny, blocks_of(tiny), swapped)
    assert "segments for" in px.check_segments(tiny, blocks_of(tiny), segments[:-1])


def _train(backbone: str, genes: list[float], cached: bool, epochs: int = 2) -> tuple[Any, Any]:
    """``fit`` a genome plan for a few steps, on images or on cached prefix features."""
    model = _model(backbone)
    the_plan = plan("genome", model, blocks_of(model), genes=genes, threshold=0.5)
    k = next(i for i, g in enumerate(genes) if g > 0.5)
    data: Dataset = Blobs()
    net: torch.nn.Module = model
    train_mode = the_plan.train_mode
    if cached:
        segments = px.segments_of(model)
        assert segments is not None and k > 0
        data = px.FeatureSet(*px.prefix_features(model, segments, k, data, batch_size=5))
        net = px.SuffixModel(model, segments, k)

        def train_mode(m: torch.nn.Module) -> None:
            the_plan.train_mode(model)

    result = fit(
        net,
        supervised_step,
        the_plan.param_groups,
        data,
        # contiguous, as search candidates train (their cached features are computed so)
        Schedule(epochs=epochs, lr=3e-3, batch_size=4, weight_decay=0.01, channels_last=False),
        seed=3,
        train_mode=train_mode,
        progress=False,
    )
    return result, model.state_dict()


@pytest.mark.parametrize(
    ("backbone", "genes"),
    [
        ("medtl_tiny_convnext", [0.1, 0.2, 0.9, 0.3, 0.8, 0.6]),  # stem, stage1 frozen; stage3 too
        ("test_resnet", [0.4, 0.1, 0.3, 0.7, 0.9, 0.8]),  # BatchNorm in the frozen prefix
        ("medtl_tiny_vit", [0.2, 0.1, 0.9, 0.7]),
        ("test_efficientnet", [0.3, 0.2, 0.1, 0.8, 0.4, 0.9, 0.7]),  # BatchNorm, SE, head conv
    ],
)
def test_cached_prefix_training_equals_uncached(backbone: str, genes: list[float]) -> None:
    plain, plain_state = _train(backbone, genes, cached=False)
    fast, fast_state = _train(backbone, genes, cached=True)
    losses = [h["train_loss"] for h in plain.history]
    assert [h["train_loss"] for h in fast.history] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert plain.samples_seen == fast.samples_seen
    assert plain_state.keys() == fast_state.keys()
    changed = 0
    for name, value in plain_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-4, atol=1e-5)
        changed += int(not torch.equal(value, _model(backbone).state_dict()[name]))
    assert changed > 0  # the comparison covers weights that moved


def test_a_prefix_with_drop_path_is_not_cached() -> None:
    # timm spreads drop-path rates linearly over the blocks: stage1's is 0, stage2's is not.
    model = _model("medtl_tiny_convnext", drop_path_rate=0.1)
    segments = px.segments_of(model)
    assert segments is not None
    assert px.stochastic_modules(model, segments[:2]) == []
    assert px.stochastic_modules(model, segments[2:3]) == ["backbone.stages.1.blocks.0.drop_path"]
    cuts = px.Cuts.of(model, blocks_of(model), Blobs(2).images, rows=10)
    assert cuts.max_cut == 2
    assert cuts.cacheable(2, 1e9) and not cuts.cacheable(3, 1e9) and not cuts.cacheable(0, 1e9)


def test_cut_costs_are_flop_shares_in_epoch_equivalents() -> None:
    model = _model("medtl_tiny_convnext")
    cuts = px.Cuts.of(model, blocks_of(model), Blobs(2).images, rows=10)
    shares = cuts.suffix_share
    assert shares[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(shares)) and shares[-1] > 0
    s = shares[3]
    assert cuts.epoch_cost(0, cached=False) == pytest.approx(1.0)
    assert cuts.epoch_cost(3, cached=True) == pytest.approx(s)
    assert cuts.epoch_cost(3, cached=False) == pytest.approx((1 + 2 * s) / 3)
    # with a validation split half the size of train: its forward pass is 0.5 / 3 of the unit
    assert cuts.epoch_cost(0, cached=False, val_ratio=0.5) == pytest.approx(1 + 0.5 / 3)
    assert cuts.epoch_cost(3, cached=True, val_ratio=0.5) == pytest.approx(s * (1 + 0.5 / 3))
    assert cuts.caching_cost(3, val_ratio=0.5) == pytest.approx((1 - s) / 3 * 1.5)
    saving = cuts.epoch_cost(3, False, 0.5) - cuts.epoch_cost(3, True, 0.5)
    assert saving == pytest.approx(cuts.caching_cost(3, 0.5))  # pays from the second epoch
    assert cuts.feature_bytes[1] == 4 * 10 * 8 * 8 * 8  # stage1 input: [8, 8, 8] per image
    assert not cuts.cacheable(1, max_bytes=100)


def test_prefix_digest_follows_the_frozen_weights_only() -> None:
    model = _model("medtl_tiny_convnext")
    segments = px.segments_of(model)
    assert segments is not None
    before = px.prefix_digest(model, segments, 2)
    with torch.no_grad():
        model.backbone.stages[3].blocks[0].conv_dw.weight.add_(1.0)  # after the prefix
    assert px.prefix_digest(model, segments, 2) == before
    with torch.no_grad():
        model.backbone.stem[0].weight.add_(1.0)
    assert px.prefix_digest(model, segments, 2) != before
    assert px.prefix_digest(model, segments, 1) != px.prefix_digest(model, segments, 2)


def test_feature_cache_computes_once_per_key_and_forgets_the_oldest() -> None:
    cache = px.FeatureCache(max_entries=2)
    calls: list[str] = []

    def make(key: str) -> Any:
        return lambda: calls.append(key) or key

    assert cache.get("a", make("a")) == ("a", False)
    assert cache.get("a", make("a")) == ("a", True)
    cache.get("b", make("b"))
    cache.get("c", make("c"))  # evicts a
    assert cache.get("a", make("a")) == ("a", False)
    assert calls == ["a", "b", "c", "a"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_prefix_digest_of_every_cut_and_family(backbone: str) -> None:
    """Every cut hashes, BatchNorm's 0-d ``num_batches_tracked`` counter included (ResNet)."""
    model = _model(backbone)
    segments = px.segments_of(model)
    assert segments is not None
    digests = [px.prefix_digest(model, segments, k) for k in range(len(segments) + 1)]
    assert len(set(digests)) == len(digests)
    if backbone == "test_resnet":
        counters = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
        assert counters and counters[0].dim() == 0
        counters[0].add_(1)  # the first BatchNorm sits in the stem, inside every prefix
        assert px.prefix_digest(model, segments, 1) != digests[1]
