"""Image files are read as a viewer displays them: every Pillow mode, EXIF orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from medtl.data.audit import Item, build_report, inspect_all
from medtl.data.readers import DISPLAY_MODES, read_image
from medtl.errors import DataError


def gradient() -> Image.Image:
    """A 40x32 RGB image whose three channels differ (red across, green down, blue fixed)."""
    x = np.zeros((32, 40, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, 40).astype(np.uint8)[None]
    x[..., 1] = np.linspace(0, 255, 32).astype(np.uint8)[:, None]
    x[..., 2] = 80
    return Image.fromarray(x)


def shown(img: Image.Image) -> np.ndarray:
    """What a viewer shows, as ``[C, H, W]`` in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def test_cmyk_jpeg_is_read_as_its_colours_not_a_negative(tmp_path: Path) -> None:
    rgb = gradient()
    rgb.convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    got = read_image(tmp_path / "c.jpg")
    assert got.shape == (3, 32, 40)
    assert np.corrcoef(got.ravel(), shown(rgb).ravel())[0, 1] > 0.99
    assert np.abs(got - shown(rgb)).mean() < 0.02


def test_palette_png_is_looked_up(tmp_path: Path) -> None:
    img = gradient().convert("P")
    img.save(tmp_path / "p.png")
    got = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(got, shown(img.convert("RGB")), atol=1e-6)


def test_palette_with_transparency_keeps_its_alpha(tmp_path: Path) -> None:
    img = gradient().convert("P")
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    got = read_image(tmp_path / "pt.png")
    np.testing.assert_allclose(
        got, shown(Image.open(tmp_path / "pt.png").convert("RGBA")), atol=1e-6
    )


@pytest.mark.parametrize(
    ("mode", "suffix", "expected"),
    [
        ("1", ".png", "L"),
        ("LA", ".png", "LA"),
        ("PA", ".tif", "RGBA"),
        ("YCbCr", ".tif", "RGB"),
        ("RGBA", ".png", "RGBA"),
        ("L", ".bmp", "L"),
    ],
)
def test_eight_bit_modes_become_what_pillow_displays(
    tmp_path: Path, mode: str, suffix: str, expected: str
) -> None:
    source = gradient().convert(mode)
    path = tmp_path / f"img{suffix}"
    source.save(path)
    assert Image.open(path).mode == mode
    got = read_image(path)
    np.testing.assert_allclose(got, shown(Image.open(path).convert(expected)), atol=1e-6)
    assert DISPLAY_MODES[mode] == expected


def test_sixteen_and_thirty_two_bit_grey_keep_their_depth(tmp_path: Path) -> None:
    deep = np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 40
    Image.fromarray(deep).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    np.testing.assert_allclose(read_image(tmp_path / "i16.png")[0], deep / 65535.0, atol=1e-7)
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_allclose(read_image(tmp_path / "i32.tif")[0], deep / 65535.0, atol=1e-7)
    signed = deep.astype(np.int32) - 1000  # e.g. CT numbers: stretched between min and max
    Image.fromarray(signed).save(tmp_path / "hu.tif")
    got = read_image(tmp_path / "hu.tif")[0]
    assert got.min() == 0.0 and got.max() == 1.0


def test_float_images_are_stretched_and_nan_refused(tmp_path: Path) -> None:
    values = np.linspace(-3, 5, 32 * 40, dtype=np.float32).reshape(32, 40)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_allclose(read_image(tmp_path / "f.tif")[0], (values + 3) / 8, atol=1e-6)
    values[0, 0] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif contains NaN"):
        read_image(tmp_path / "nan.tif")


def test_an_unreadable_mode_is_refused_by_name(tmp_path: Path) -> None:
    gradient().convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(DataError, match=r"lab\.tif has image mode 'LAB'"):
        read_image(tmp_path / "lab.tif")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = gradient()
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif)
    got = read_image(tmp_path / "rot.jpg")
    assert got.shape == (3, 40, 32)
    expected = shown(ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_audit_reports_the_modes_it_met(tmp_path: Path) -> None:
    gradient().convert("CMYK").save(tmp_path / "c.jpg")
    gradient().convert("P").save(tmp_path / "p.png")
    gradient().save(tmp_path / "a.png")
    gradient().save(tmp_path / "b.png")
    gradient().convert("LAB").save(tmp_path / "lab.tif")
    items = [Item(n, n) for n in ["c.jpg", "p.png", "a.png", "b.png", "lab.tif"]]
    inspections = inspect_all(tmp_path, items, workers=1)
    assert inspections[-1].error_kind == "unsupported-mode"
    report, _ = build_report(items, inspections, [], near_bits=0)
    assert report.image_modes == {
        "CMYK": "CMYK 1 (read as RGB)",
        "LAB": "LAB 1 (refused)",
        "P": "P 1 (read as RGB)",
        "RGB": "RGB 2 (kept)",
    }
    assert "image modes: CMYK 1 (read as RGB); LAB 1 (refused)" in report.summary()
