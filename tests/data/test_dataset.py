"""MONAI loading pipeline: shapes, channels, letterbox, caches, augmentation and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from medtl.data.dataset import (
    DataConfig,
    LoadSampled,
    build_dataset,
    build_loader,
    build_transforms,
    cache_key,
)
from medtl.data.manifest import Manifest, ManifestMeta, Row, row_id
from medtl.errors import ConfigError, DataError
from tests.conftest import shared, write_png

CLASSES = ["benign", "malignant"]


def make_manifest(specs: list[tuple[str, str, str]], classes: list[str] = CLASSES) -> Manifest:
    """Rows from ``(path, label, split)``; sha256 / size are placeholders the loader ignores."""
    rows = [
        Row(row_id(path), path, label, split, row_id(path), f"sha-{path}", 40, 32)
        for path, label, split in specs
    ]
    return Manifest(rows, ManifestMeta("test", classes, 0, {}, "official"))


def write_solid(
    path: Path, size: tuple[int, int], colour: int | tuple[int, ...], mode: str
) -> Path:
    """A one-colour image (width, height) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def items(dataset: torch.utils.data.Dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, Manifest]:
    """Six random 40x32 images of mixed modes, labelled, one unlabelled, one in val."""
    root = tmp_path / "data"
    specs = []
    for i, (mode, label) in enumerate(
        [("L", "benign"), ("RGB", "malignant"), ("RGBA", "benign"), ("L", "malignant"), ("RGB", "")]
    ):
        write_png(root / f"img/{i}.png", seed=i, mode=mode)
        specs.append((f"img/{i}.png", label, "train"))
    write_png(root / "img/val.png", seed=9)
    specs.append(("img/val.png", "benign", "val"))
    return root, make_manifest(specs)


# -- config -------------------------------------------------------------------------------
def test_disk_cache_needs_cache_dir() -> None:
    with pytest.raises(pydantic.ValidationError, match="cache 'disk' needs cache_dir"):
        DataConfig(cache="disk")
    assert DataConfig(cache="disk", cache_dir="x").cache_dir == "x"


def test_unvalidated_disk_config_is_refused(folder: tuple[Path, Manifest]) -> None:
    root, manifest = folder
    cfg = DataConfig().model_copy(update={"cache": "disk"})  # model_copy skips validation
    with pytest.raises(ConfigError, match="needs cache_dir"):
        build_dataset(manifest, "train", root, cfg)


@pytest.mark.parametrize(
    "bad", [{"image_size": 4}, {"channels": 2}, {"resize": "crop"}, {"augmnet": "light"}]
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        DataConfig(**bad)


def test_config_fields_are_documented() -> None:
    assert all(f.description for f in DataConfig.model_fields.values())


# -- pixels -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_item_shape_dtype_and_range(tmp_path: Path, mode: str, channels: int) -> None:
    write_png(tmp_path / "a.png", size=(40, 32), mode=mode)
    cfg = DataConfig(image_size=16, channels=channels)
    item = build_dataset(make_manifest([("a.png", "benign", "train")]), "train", tmp_path, cfg)[0]
    image = item["image"]
    assert type(image) is torch.Tensor
    assert image.shape == (channels, 16, 16)
    assert image.dtype == torch.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def test_rgb_becomes_itu601_luminance(tmp_path: Path) -> None:
    write_solid(tmp_path / "a.png", (40, 32), (200, 100, 50), "RGB")
    cfg = DataConfig(image_size=16, channels=1)
    image = build_dataset(make_manifest([("a.png", "", "train")]), "train", tmp_path, cfg)[0][
        "image"
    ]
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    assert torch.allclose(image, torch.full((1, 16, 16), expected), atol=1e-5)


def test_rgba_drops_alpha_and_grey_is_repeated(tmp_path: Path) -> None:
    write_solid(tmp_path / "rgba.png", (40, 32), (200, 100, 50, 0), "RGBA")
    write_solid(tmp_path / "grey.png", (40, 32), 120, "L")
    cfg = DataConfig(image_size=16, channels=3)
    manifest = make_manifest([("rgba.png", "", "train"), ("grey.png", "", "train")])
    rgba, grey = (it["image"] for it in items(build_dataset(manifest, "train", tmp_path, cfg)))
    assert torch.allclose(rgba[:, 8, 8], torch.tensor([200, 100, 50]) / 255, atol=1e-6)
    assert torch.allclose(grey, torch.full((3, 16, 16), 120 / 255), atol=1e-6)


def test_sixteen_bit_images_keep_their_scale(tmp_path: Path) -> None:
    """Integers are scaled by bit depth (1000 / 65535), not stretched to each image's range."""
    Image.fromarray(np.full((32, 40), 1000, np.uint16)).save(tmp_path / "deep.png")
    cfg = DataConfig(image_size=16, channels=1)
    image = build_dataset(make_manifest([("deep.png", "", "train")]), "train", tmp_path, cfg)
    assert torch.allclose(image[0]["image"], torch.full((1, 16, 16), 1000 / 65535), atol=1e-7)


def test_letterbox_keeps_aspect_with_zero_padding(tmp_path: Path) -> None:
    write_solid(tmp_path / "wide.png", (40, 20), 200, "L")  # 2:1 -> 32x16 inside 32x32
    manifest = make_manifest([("wide.png", "", "train")])
    cfg = DataConfig(image_size=32, channels=1, resize="letterbox")
    image = build_dataset(manifest, "train", tmp_path, cfg)[0]["image"][0]
    assert torch.all(image[:8] == 0) and torch.all(image[24:] == 0)
    assert torch.allclose(image[8:24], torch.full((16, 32), 200 / 255), atol=1e-6)
    squashed = build_dataset(
        manifest, "train", tmp_path, cfg.model_copy(update={"resize": "squash"})
    )
    assert torch.all(squashed[0]["image"] > 0)


def test_small_images_are_enlarged(tmp_path: Path) -> None:
    write_png(tmp_path / "tiny.png", size=(12, 10))
    cfg = DataConfig(image_size=32, channels=1)
    image = build_dataset(make_manifest([("tiny.png", "", "train")]), "train", tmp_path, cfg)[0]
    assert image["image"].shape == (1, 32, 32)


def test_locator_addresses_an_npz_row(tmp_path: Path) -> None:
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 255, 0)])
    images[:, 0, 0] = 255 - images[:, 0, 0]  # keep each image's range full
    np.savez(tmp_path / "mnist.npz", train_images=images)
    rows = [
        Row(
            row_id("mnist.npz", f"train_images/{i}"),
            "mnist.npz",
            "",
            "train",
            str(i),
            "",
            28,
            28,
            locator=f"train_images/{i}",
        )
        for i in range(3)
    ]
    manifest = Manifest(rows, ManifestMeta("test", CLASSES, 0, {}, "official"))
    got = items(build_dataset(manifest, "train", tmp_path, DataConfig(image_size=32)))
    assert [it["locator"] for it in got] == [f"train_images/{i}" for i in range(3)]
    assert [float(it["image"][0, 16, 16]) for it in got] == [0.0, 1.0, 0.0]


def test_too_many_channels_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "five.npz", train_images=np.zeros((1, 8, 8, 5), np.uint8))
    row = Row("r", "five.npz", "", "train", "g", "", 8, 8, locator="train_images/0")
    manifest = Manifest([row], ManifestMeta("test", CLASSES, 0, {}, "official"))
    dataset = build_dataset(manifest, "train", tmp_path, DataConfig(image_size=16))
    with pytest.raises(DataError, match=r"five\.npz has 5 channels"):
        dataset[0]


# -- labels, rows, loader -----------------------------------------------------------------
def test_labels_and_row_ids_come_through(folder: tuple[Path, Manifest]) -> None:
    root, manifest = folder
    got = items(build_dataset(manifest, "train", root, DataConfig(image_size=16)))
    train = manifest.split("train")
    assert [it["row"] for it in got] == [r.id for r in train]
    assert [it["label"] for it in got] == [0, 1, 0, 1, -1]
    assert build_dataset(manifest, "val", root, DataConfig(image_size=16))[0]["row"] == row_id(
        "img/val.png"
    )


def test_loader_batches_and_seeded_shuffle(folder: tuple[Path, Manifest]) -> None:
    root, manifest = folder
    cfg = DataConfig(image_size=16, batch_size=2)
    dataset = build_dataset(manifest, "train", root, cfg)
    batches = list(build_loader(dataset, cfg))
    assert [b["image"].shape for b in batches] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.tensor([0, 1, 0, 1, -1]))

    def order(seed: int) -> list[str]:
        return [r for b in build_loader(dataset, cfg, train=True, seed=seed) for r in b["row"]]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(r.id for r in manifest.split("train"))
    assert any(order(1) != order(s) for s in (2, 3, 4))


# -- caches -------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cache_gives_the_same_tensors(
    folder: tuple[Path, Manifest], tmp_path: Path, cache: str
) -> None:
    root, manifest = folder
    plain = items(build_dataset(manifest, "train", root, DataConfig(image_size=16)))
    cfg = DataConfig(image_size=16, cache=cache, cache_dir=str(tmp_path / "cache"))
    cached = items(build_dataset(manifest, "train", root, cfg))
    assert [c["row"] for c in cached] == [p["row"] for p in plain]
    assert [c["label"] for c in cached] == [p["label"] for p in plain]
    for c, p in zip(cached, plain, strict=True):
        assert type(c["image"]) is torch.Tensor
        assert torch.equal(c["image"], p["image"])


def test_disk_cache_is_reused_without_reading(
    folder: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root, manifest = folder
    cfg = DataConfig(image_size=16, cache="disk", cache_dir=str(tmp_path / "cache"))
    first = items(build_dataset(manifest, "train", root, cfg))
    subfolder = tmp_path / "cache" / cache_key(manifest, cfg)
    assert len(list(subfolder.glob("*.pt"))) == len(first)
    for row in manifest.split("train"):
        (root / row.path).unlink()
    again = items(build_dataset(manifest, "train", root, cfg))
    for a, b in zip(again, first, strict=True):
        assert torch.equal(a["image"], b["image"])
    # another image size must not see those entries: it reads, and the files are gone
    bigger = cfg.model_copy(update={"image_size": 24})
    with pytest.raises(DataError, match=r"0\.png does not exist"):
        build_dataset(manifest, "train", root, bigger)[0]


def test_cache_key_follows_manifest_and_deterministic_settings(
    folder: tuple[Path, Manifest],
) -> None:
    _, manifest = folder
    cfg = DataConfig(cache="disk", cache_dir="c")
    other = make_manifest([("img/0.png", "benign", "train")])
    assert cache_key(manifest, cfg) != cache_key(other, cfg)
    for change in ({"image_size": 64}, {"channels": 1}, {"resize": "letterbox"}):
        assert cache_key(manifest, cfg) != cache_key(manifest, cfg.model_copy(update=change))
    same = cfg.model_copy(update={"augment": "medium", "batch_size": 4})
    assert cache_key(manifest, cfg) == cache_key(manifest, same)


# -- augmentation -------------------------------------------------------------------------
@pytest.mark.parametrize("augment", ["light", "medium"])
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_augmentation_is_seeded(folder: tuple[Path, Manifest], augment: str, cache: str) -> None:
    root, manifest = folder
    cfg = DataConfig(image_size=16, augment=augment, cache=cache)

    def stack(train: bool, seed: int = 0) -> torch.Tensor:
        dataset = build_dataset(manifest, "train", root, cfg, train=train, seed=seed)
        return torch.stack([it["image"] for it in items(dataset)])

    plain, aug = stack(train=False), stack(train=True)
    assert torch.equal(aug, stack(train=True))
    assert not torch.equal(aug, plain)
    assert not torch.equal(aug, stack(train=True, seed=1))
    assert aug.dtype == torch.float32 and aug.min() >= 0.0 and aug.max() <= 1.0


def test_workers_are_reseeded(tmp_path: Path) -> None:
    """Two workers given the same image draw different augmentations, reproducibly."""
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, seed=0)  # identical pixels
    manifest = make_manifest([("a.png", "", "train"), ("b.png", "", "train")])
    cfg = DataConfig(image_size=16, augment="medium", batch_size=1, num_workers=2)
    dataset = build_dataset(manifest, "train", tmp_path, cfg, train=True)

    def run() -> list[torch.Tensor]:
        return [batch["image"] for batch in build_loader(dataset, cfg, seed=5)]

    first, second = run()
    assert not torch.equal(first, second)
    assert all(torch.equal(x, y) for x, y in zip(run(), (first, second), strict=True))


def test_deterministic_transforms_come_first() -> None:
    """The caches keep everything before the first random transform: all of eval's chain."""
    from monai.transforms import Randomizable

    cfg = DataConfig(augment="medium")
    train = build_transforms(cfg, "root", train=True).transforms
    evaluation = build_transforms(cfg, "root", train=False).transforms
    random = [isinstance(t, Randomizable) for t in train]
    assert random.index(True) == len(evaluation)
    assert not any(isinstance(t, Randomizable) for t in evaluation)


# -- errors -------------------------------------------------------------------------------
def test_missing_file_is_named_when_iterated(tmp_path: Path) -> None:
    write_png(tmp_path / "here.png")
    manifest = make_manifest([("here.png", "", "train"), ("gone.png", "", "train")])
    dataset = build_dataset(manifest, "train", tmp_path, DataConfig(image_size=16))
    assert dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        dataset[1]
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        list(build_loader(dataset, DataConfig(image_size=16)))


def test_missing_file_fails_memory_cache_fill(tmp_path: Path) -> None:
    manifest = make_manifest([("gone.png", "", "train")])
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        build_dataset(manifest, "train", tmp_path, DataConfig(image_size=16, cache="memory"))


def test_path_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_png(tmp_path / "x.png")
    manifest = make_manifest([("../x.png", "", "train")])
    with pytest.raises(DataError, match="escapes the data root"):
        build_dataset(manifest, "train", root, DataConfig(image_size=16))
    with pytest.raises(DataError, match="escapes the data root"):
        LoadSampled(root)({"image": "../x.png", "locator": ""})


def test_empty_split_is_refused(folder: tuple[Path, Manifest]) -> None:
    root, manifest = folder
    with pytest.raises(DataError, match="split 'test' of this manifest is empty"):
        build_dataset(manifest, "test", root, DataConfig())


def test_missing_data_root_is_refused(tmp_path: Path, folder: tuple[Path, Manifest]) -> None:
    _, manifest = folder
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist; pass --data-root"):
        build_dataset(manifest, "train", tmp_path / "nowhere", DataConfig())


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    dataset = build_dataset(
        make_manifest([("bad.png", "", "train")]), "train", tmp_path, DataConfig(image_size=16)
    )
    with pytest.raises(DataError, match=r"bad\.png"):
        dataset[0]


# -- real data ----------------------------------------------------------------------------
@pytest.mark.realdata
def test_busi_images_load(tmp_path: Path) -> None:
    """Real BUSI PNGs (256x256 RGB here) through the disk-cached pipeline, rows kept as rows."""
    root = shared("busi")
    paths = [
        "Dataset_BUSI_with_GT/benign/benign (1).png",
        "Dataset_BUSI_with_GT/malignant/malignant (1).png",
        "Dataset_BUSI_with_GT/normal/normal (1).png",
    ]
    classes = ["benign", "malignant", "normal"]
    manifest = make_manifest([(p, p.split("/")[1], "train") for p in paths], classes)
    cfg = DataConfig(image_size=128, cache="disk", cache_dir=str(tmp_path))
    got = items(build_dataset(manifest, "train", root, cfg))
    assert [it["label"] for it in got] == [0, 1, 2]
    for path, item in zip(paths, got, strict=True):
        image = item["image"]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.05
        # oracle: PIL's red channel averaged over 2x2 blocks (area resize 256 -> 128)
        red = np.asarray(Image.open(root / path).convert("RGB"), np.float64)[..., 0]
        blocks = red.reshape(128, 2, 128, 2).mean(axis=(1, 3))
        assert np.corrcoef(blocks.ravel(), image[0].numpy().ravel())[0, 1] > 0.999
