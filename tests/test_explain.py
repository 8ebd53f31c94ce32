"""Explanations: Grad-CAM and occlusion maps of a tiny model trained to find a bright square,
the randomised-weights sanity check (Adebayo et al. 2018), the layer choice from timm's
feature_info, and the outcome-blind choice of images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from medtl.artifacts import ModelCard
from medtl.errors import ConfigError
from medtl.explain import TokenGrid, cam_layer, choose_examples, explain, seeded_sample
from medtl.models import build_classifier
from medtl.predictions import Predictions

pytestmark = pytest.mark.usefixtures("one_thread")


def _card(backbone: str = "medtl_tiny_convnext", size: int = 32) -> ModelCard:
    return ModelCard(
        medtl_version="test",
        backbone=backbone,
        classes=["empty", "square"],
        in_chans=1,
        image_size=size,
        strategy="full",
        manifest_sha256="0" * 64,
        best_epoch=0,
        val_bacc=0.5,
        epochs_run=1,
    )


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images ``[n, 1, 32, 32]``; odd ones hold a bright 10 px square at a random place.
    Returns images, labels and the square's mask ``[n, 32, 32]``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 32, 32, generator=g) * 0.3
    labels = torch.arange(n) % 2
    corner = torch.randint(0, 22, (n, 2), generator=g)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i, (r, c) in enumerate(corner.tolist()):
        masks[i, r : r + 10, c : c + 10] = True
        images[i, 0, r : r + 10, c : c + 10] += 0.6 * labels[i]
    return images, labels, masks


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("medtl_tiny_convnext", num_classes=2, in_chans=1)


def train_square_finder() -> torch.nn.Module:
    """The tiny ConvNeXt after 150 AdamW steps on :func:`squares` (seeded)."""
    model = _model(0)
    images, labels, _ = squares(256, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, 256, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(images[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return train_square_finder()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, masks = squares(16, seed=1)
    return images[labels == 1], masks[labels == 1]


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        np.nanmean([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b, strict=True)])
    )


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_maps_of_randomised_weights_differ_from_the_trained_models(
    trained: torch.nn.Module, held_out: tuple[torch.Tensor, torch.Tensor], method: str
) -> None:
    images, _ = held_out
    target = torch.ones(len(images), dtype=torch.long)
    card = _card()
    maps = explain(trained, card, images, (method,), target).maps[method]
    again = explain(trained, card, images, (method,), target).maps[method]
    random = explain(_model(1).eval(), card, images, (method,), target).maps[method]
    assert _rank_correlation(maps, again) > 0.99  # the measure sees identical maps as identical
    assert _rank_correlation(maps, random) < 0.5


def test_occlusion_points_at_the_square(
    trained: torch.nn.Module, held_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, masks = held_out
    result = explain(trained, _card(), images, ("occlusion",))
    assert (result.target == 1).all() and result.probs.shape == (len(images), 2)
    pairs = zip(result.maps["occlusion"], masks.numpy(), strict=True)
    ratio = [m[k].mean() / m[~k].mean() for m, k in pairs]
    assert np.median(ratio) > 2.0


def test_maps_are_unit_range_at_image_size(trained: torch.nn.Module) -> None:
    images, _, _ = squares(3, seed=2)
    result = explain(trained, _card(), images, ("gradcam", "gradcampp", "occlusion"))
    for maps in result.maps.values():
        assert maps.shape == (3, 32, 32)
        assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6


def test_cam_layer_comes_from_feature_info() -> None:
    model = _model(0)
    reductions = {f["module"]: f["reduction"] for f in model.backbone.feature_info}
    assert reductions["stages.3"] == 32
    assert cam_layer(model, 224)[1] == "backbone.stages.3"  # 7 x 7
    assert cam_layer(model, 128)[1] == "backbone.stages.2"  # 4 x 4 is too coarse: 8 x 8
    assert cam_layer(model, 16)[1] == "backbone.stages.0"  # none is 7 px: the shallowest


def test_vit_grad_cam_reads_the_patch_grid() -> None:
    torch.manual_seed(0)
    vit = build_classifier("medtl_tiny_vit", num_classes=2, in_chans=1, img_size=64).eval()
    hooked, layer = cam_layer(vit, 64)
    assert isinstance(hooked, TokenGrid) and layer == "grid"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), vit(x))
    maps = explain(vit, _card("medtl_tiny_vit", 64), x, ("gradcam",)).maps["gradcam"]
    assert maps.shape == (2, 64, 64) and maps.max() > 0


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown explanation method"):
        explain(_model(0), _card(), torch.rand(1, 1, 32, 32), ("saliency",))


def test_sample_depends_on_ids_alone() -> None:
    ids = [f"row{i:03d}" for i in range(50)]
    chosen = {ids[i] for i in seeded_sample(ids, 5, seed=3)}
    shuffled = ids[::-1]
    assert {shuffled[i] for i in seeded_sample(shuffled, 5, seed=3)} == chosen
    assert {ids[i] for i in seeded_sample(ids, 5, seed=4)} != chosen
    rng = np.random.default_rng(0)
    for labels in (np.zeros(50, int), rng.integers(0, 2, 50)):
        pred = Predictions(ids, ids, labels, rng.normal(size=(50, 2)), ["a", "b"], "test")
        sample, _ = choose_examples(pred, pred.probs(), k=5, seed=3)
        assert {ids[i] for i in sample} == chosen


def test_errors_are_the_most_confident_wrong_calls() -> None:
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 4.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([1, 1, 0, 0, 0])  # rows 0, 2 and 4 are wrong
    pred = Predictions([str(i) for i in range(5)], ["g"] * 5, labels, logits, ["a", "b"], "test")
    _, errors = choose_examples(pred, pred.probs(), k=1, n_errors=2)
    assert errors == [2, 0]


if __name__ == "__main__":  # the figures docs/report.md quotes: python -m tests.test_explain
    model, random = train_square_finder(), _model(1).eval()
    images, labels, masks = squares(16, seed=1)
    images, masks = images[labels == 1], masks[labels == 1].numpy()
    target = torch.ones(len(images), dtype=torch.long)
    for method in ("gradcam", "occlusion"):
        a = explain(model, _card(), images, (method,), target).maps[method]
        b = explain(random, _card(), images, (method,), target).maps[method]
        ratios = [
            [m[k].mean() / max(m[~k].mean(), 1e-9) for m, k in zip(maps, masks, strict=True)]
            for maps in (a, b)
        ]
        print(
            f"{method}: rank correlation trained vs random {_rank_correlation(a, b):.3f}; "
            f"inside / outside the square: trained {np.median(ratios[0]):.2f}, "
            f"random {np.median(ratios[1]):.2f}"
        )
