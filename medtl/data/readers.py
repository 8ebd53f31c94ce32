"""Read one sample's pixels as ``float32 [C, H, W]`` in ``[0, 1]``.

Ordinary image files go through MONAI's ``PILReader(reverse_indexing=False)`` (rows stay rows),
converted to what an image viewer displays (EXIF orientation, palettes, CMYK, ...; see
:data:`DISPLAY_MODES`). Containers that MONAI's readers cannot address by index (a row of a MedMNIST
``.npz``, a slice of a NIfTI volume, a frame of a multi-frame DICOM) have small readers here
and in :mod:`medtl.data.scans`. Every failure becomes a :class:`DataError` naming the file.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from medtl.errors import DataError, reason

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Largest image medtl decodes: far above any scan in the target datasets, far below a
# decompression bomb (PIL's own limit warns at 89M and fails at 179M pixels).
MAX_PIXELS = 40_000_000


def kind_of(path: str | Path) -> str:
    """``image``, ``dicom``, ``nifti`` or ``npz``, by suffix (DICOM also by its magic bytes)."""
    name = str(path).lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(DICOM_SUFFIXES) or is_dicom(Path(path)):
        return "dicom"
    raise DataError(
        f"{path}: unknown image format; medtl reads {', '.join(IMAGE_SUFFIXES)}, "
        "DICOM, NIfTI and MedMNIST .npz"
    )


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file has 'DICM' at byte 128."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_array(file: Path, locator: str = "") -> np.ndarray:
    """Pixels of one sample as ``float32 [C, H, W]`` in ``[0, 1]`` (C is 1, 3 or 4)."""
    kind = kind_of(file)
    if not file.is_file():
        raise DataError(f"{file} does not exist; restore it or prepare the manifest again")
    if file.stat().st_size == 0:
        raise DataError(f"{file} is empty (0 bytes); re-download it or remove it from the dataset")
    if kind == "image":
        return read_image(file)
    if kind == "npz":
        return read_npz(file, locator)
    from medtl.data import scans  # pydicom / nibabel are imported only when needed

    if kind == "dicom":
        return scans.read_dicom(file, locator)
    return scans.read_nifti(file, locator)


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str  # PIL's name: PNG, JPEG, ...
    mode: str  # PIL's mode: L, RGB, RGBA, I;16, ...


def check_image_header(file: Path) -> ImageHeader:
    """Open (without decoding) and return size, format and mode; refuse decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                header = ImageHeader(img.width, img.height, img.format or "?", img.mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{file} is too large to decode safely (a possible decompression bomb); "
            "remove it or downsample it below 40 megapixels"
        ) from None
    except Exception as exc:
        raise DataError(f"{file} is not a readable image ({exc}); re-export or remove it") from None
    if header.width * header.height > MAX_PIXELS:
        raise DataError(
            f"{file} is {header.width}x{header.height} pixels, above medtl's limit of "
            f"{MAX_PIXELS:,} (a possible decompression bomb); remove it or downsample it"
        )
    return header


ORIENTATION_TAG = 0x0112  # EXIF Orientation
# What each Pillow mode becomes before its pixels are read: what an image viewer displays.
# Palettes are looked up, CMYK / YCbCr / HSV become RGB, 1-bit becomes 0 / 255 grey; alpha
# is kept here and dropped by the loader. Grey modes of more than 8 bits keep their depth.
DISPLAY_MODES = {
    "1": "L",
    "L": "L",
    "LA": "LA",
    "La": "LA",
    "P": "RGB",  # "RGBA" when the palette has a transparent entry
    "PA": "RGBA",
    "RGB": "RGB",
    "RGBX": "RGB",
    "RGBA": "RGBA",
    "RGBa": "RGBA",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "HSV": "RGB",
    "I;16": "I;16",
    "I;16B": "I;16B",
    "I;16L": "I;16L",
    "I;16N": "I;16N",
    "I": "I",
    "F": "F",
}


def display_mode(mode: str, file: Path | str) -> str:
    """The mode an image of Pillow mode ``mode`` is converted to; other modes are refused."""
    if mode not in DISPLAY_MODES:
        raise DataError(
            f"{file} has image mode {mode!r}, which medtl does not read (it reads 1, L, LA, P, "
            "PA, RGB, RGBA, CMYK, YCbCr, I;16, I and F); convert it to RGB or greyscale"
        )
    return DISPLAY_MODES[mode]


def to_display(img: Image.Image) -> Image.Image:
    """``img`` as a viewer shows it: EXIF orientation applied, then converted by
    :data:`DISPLAY_MODES` (a CMYK image with an ICC profile through that profile to sRGB)."""
    if img.getexif().get(ORIENTATION_TAG, 1) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    target = display_mode(mode, getattr(img, "filename", "") or "image")
    if mode == "P":
        target = "RGBA" if "transparency" in img.info else "RGB"
    if mode == target:
        return img
    if mode == "CMYK" and img.info.get("icc_profile"):
        return _cmyk_to_srgb(img)
    return img.convert(target)


def _cmyk_to_srgb(img: Image.Image) -> Image.Image:
    """Through the image's own ICC profile, as colour-managed viewers do; naive if it fails."""
    import io

    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        out = ImageCms.profileToProfile(
            img, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img.convert("RGB")
    return out if out is not None else img.convert("RGB")


@functools.lru_cache(maxsize=1)
def _pil_reader() -> Any:
    """MONAI's ``PILReader`` (rows stay rows) with :func:`to_display` as its converter. Used
    directly, not through ``LoadImage``: a decode error then names the file here instead of
    ``LoadImage`` trying every other reader and logging each failure."""
    from monai.data import PILReader

    # PIL hands MONAI a read-only array; torch warns once, although nothing writes to it.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return PILReader(converter=to_display, reverse_indexing=False)


def read_image(file: Path) -> np.ndarray:
    """PNG / JPEG / BMP / TIFF through MONAI's PILReader, converted as a viewer displays them
    (:func:`to_display`); 8- and 16-bit scaled by their depth to [0, 1]."""
    header = check_image_header(file)
    mode = display_mode(header.mode, file)
    reader = _pil_reader()
    try:
        arr, _ = reader.get_data(reader.read(str(file)))  # stored integers: [H, W] or [H, W, C]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{file} cannot be decoded ({reason(exc)}); the file is corrupt or truncated: "
            "re-download it or remove it"
        ) from None
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)  # [C, H, W]
    if mode.startswith("I;16"):
        return arr.astype(np.float32) / 65535.0
    if mode == "I":  # 32-bit integers: 16-bit data widened by PIL, else stretched as float
        if arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535:
            return arr.astype(np.float32) / 65535.0
        return to_unit_range(arr, file)
    if mode == "F":
        return to_unit_range(arr, file)
    return arr.astype(np.float32) / 255.0  # 8 bits per channel (L, LA, RGB, RGBA)


def to_unit_range(arr: np.ndarray, file: Path | str) -> np.ndarray:
    """Integer images by their dtype's range, float images by their min/max; NaN is refused."""
    if arr.dtype in (np.uint8, np.uint16):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{file} contains NaN or infinite values; fix or remove the image")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def npz_locator(images_key: str, index: int) -> str:
    return f"{images_key}/{index}"


def read_npz(file: Path, locator: str) -> np.ndarray:
    """One image of a MedMNIST-style ``.npz``; ``locator`` is ``<images key>/<index>``."""
    key, _, index = locator.rpartition("/")
    if not key or not index.isdigit():
        raise DataError(f"{file}: locator {locator!r} must be '<images key>/<index>'")
    arrays = _open_npz(file)
    if key not in arrays:
        raise DataError(f"{file} has no array {key!r}; it holds {sorted(arrays)}")
    images = arrays[key]
    i = int(index)
    if i >= len(images):
        raise DataError(f"{file}: {key} has {len(images)} images, not {i + 1}")
    img = images[i]
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)  # [H,W] or [H,W,C] -> [C,H,W]
    return to_unit_range(img, file)


def _open_npz(file: Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz, memoised per file version: one image must not re-read the file."""
    stat = file.stat()
    return _load_npz(file.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_npz(file: Path, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise DataError(f"{file} is not a readable .npz ({exc}); re-download it") from None
