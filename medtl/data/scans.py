"""Private scans: DICOM and NIfTI readers and their adapters.

Both readers return ``float32 [C, H, W]`` in ``[0, 1]`` like the rest of
:mod:`medtl.data.readers`. A DICOM sample is a file, or one frame of a multi-frame file
(locator ``frame=<k>``); a NIfTI sample is one 2D slice of a 3D volume
(locator ``axis=<a>/slice=<k>``).

Privacy: the ``dicom`` adapter groups images by patient but writes only pseudonyms
(``patient-0001``, ...). No patient name, ID, birth date, accession number or UID is put into
a sample, a log line or an error message, and a folder whose file paths spell a patient's ID
or name is refused. Identifying header values are read raw, because pydicom's value
validation quotes invalid values in its warnings and log lines.

pydicom and nibabel are imported inside the functions that use them, so importing
:mod:`medtl.data` stays light.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medtl.data.adapters import ADAPTERS, AdapterResult, LeftOut, age_band, rel, require_root
from medtl.data.manifest import Sample, check_relative_path, format_subgroups
from medtl.data.readers import DICOM_SUFFIXES, MAX_PIXELS, NIFTI_SUFFIXES, is_dicom
from medtl.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_GROUP = (b"\xe0\x7f", b"\x7f\xe0")  # tag group 7FE0, little / big endian
_FRAME = re.compile(r"frame=(\d+)")
_SLICE = re.compile(r"axis=([0-2])/slice=(\d+)")
_TEXT_DELIMITERS = {0x5C, 0x5E, 0x3D}  # \ ^ =: where ISO 2022 escapes reset
_LABEL_FROM = ("none", "folder")
# Values anonymisers leave in PatientName / PatientID: not identifying, and common in paths
_PLACEHOLDERS = {"anon", "anonymous", "anonymized", "anonymised", "patient", "unknown", "removed"}


# -- DICOM reader -------------------------------------------------------------------------------
# Not MONAI's PydicomReader: it rescales (slope/intercept) but skips window, VOI LUT, MONOCHROME1.
def read_dicom(file: Path, locator: str = "") -> np.ndarray:
    """One image of a DICOM file (``locator="frame=<k>"`` for a frame): ``[C, H, W]`` in [0, 1].

    Grey images: modality LUT (rescale slope / intercept), then the first window (or the VOI
    LUT sequence, then min-max; else min-max), then MONOCHROME1 is inverted so that bright
    means dense in every file. Colour images (RGB, YBR, palette) give ``C = 3``.
    """
    ds = _require_pixels(file, *_read_dicom_header(file))
    index = _frame_index(file, locator, _frame_count(ds))
    _check_size(file, ds)
    arr = _decode(file, index, _deflated(ds))
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if photometric.startswith("MONOCHROME"):
        return _grey(arr, ds, file, invert=photometric == "MONOCHROME1")[None]
    return _colour(arr, ds, file, photometric)


def _read_dicom_header(file: Path) -> tuple[Dataset, bool]:
    """The header (pixels not read) and whether the file holds pixel data."""
    from pydicom import dcmread

    try:
        with open(file, "rb") as handle:
            ds = dcmread(handle, stop_before_pixels=True)
            # dcmread stops at the pixel-data tag, so what is left starts with group 7FE0
            rest = handle.read(2)
        if _deflated(ds):  # the handle was inflated into memory: read the whole file
            return ds, any(k in dcmread(file) for k in _PIXEL_KEYWORDS)
    except Exception as exc:  # the message may quote header bytes: name the type only
        raise DataError(
            f"{file} is not a readable DICOM file ({type(exc).__name__}); re-export it as a "
            "DICOM Part 10 file or remove it from the folder"
        ) from None
    return ds, rest in _PIXEL_GROUP


def _deflated(ds: Dataset) -> bool:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return bool(ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def _frame_count(ds: Dataset) -> int:
    """Number of frames (1 for a single-frame file)."""
    return max(int(ds.get("NumberOfFrames") or 1), 1)


def _require_pixels(file: Path, ds: Dataset, has_pixels: bool) -> Dataset:
    if not has_pixels:
        raise DataError(
            f"{file} has no pixel data (PixelData, FloatPixelData or DoubleFloatPixelData); "
            "remove it from the folder (it may be a DICOMDIR, report or presentation state)"
        )
    return ds


def _frame_index(file: Path, locator: str, frames: int) -> int | None:
    """The frame ``locator`` addresses (None for a single-frame file)."""
    if frames == 1 and locator in ("", "frame=0"):
        return None
    match = _FRAME.fullmatch(locator)
    if frames > 1 and match and int(match[1]) < frames:
        return int(match[1])
    want = f"'frame=0' to 'frame={frames - 1}'" if frames > 1 else "''"
    raise DataError(
        f"{file}: locator {locator!r} does not address an image of this {frames}-frame file "
        f"(use {want}); prepare the manifest again"
    )


def _check_size(file: Path, ds: Dataset) -> None:
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols > MAX_PIXELS:
        raise DataError(
            f"{file} is {cols}x{rows} pixels, above medtl's limit of {MAX_PIXELS:,}; "
            "downsample it or remove it"
        )


def _decode(file: Path, index: int | None, deflated: bool) -> np.ndarray:
    """Decoded pixels of one frame (or of the only one), as pydicom returns them; read from the
    path so that only that frame is loaded, unless the file is deflated (read whole)."""
    from pydicom import dcmread
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(dcmread(file) if deflated else str(file), index=index)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{file}: its pixel data cannot be decoded ({reason}); install the decoder this "
            "names, or re-export the file uncompressed, or remove it"
        ) from None


def _grey(arr: np.ndarray, ds: Dataset, file: Path, invert: bool) -> np.ndarray:
    """``[H, W]`` grey frame -> modality values -> VOI -> [0, 1] (inverted for MONOCHROME1)."""
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{file} contains NaN or infinite values; fix or remove the image")
    out = _voi(values, ds, file)
    return (1.0 - out if invert else out).astype(np.float32)


def _voi(values: np.ndarray, ds: Dataset, file: Path) -> np.ndarray:
    """The first window if there is one, else the VOI LUT sequence, else min-max; in [0, 1]."""
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    except (TypeError, ValueError):
        raise DataError(
            f"{file} has a window centre / width that is not a number; fix the header or "
            "remove the file"
        ) from None
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        return _window(values, center, width, function, file)
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi_lut

        return _min_max(apply_voi_lut(np.rint(values).astype(np.int64), ds))
    return _min_max(values)


def _first(value: Any) -> float | None:
    """First value of a (possibly multi-valued) DS element; None when absent or empty."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)


def _window(
    values: np.ndarray, center: float, width: float, function: str, file: Path
) -> np.ndarray:
    """DICOM windowing (PS3.3 C.11.2.1.2-3: LINEAR, LINEAR_EXACT, SIGMOID) onto [0, 1].

    Written here because pydicom's ``apply_windowing`` maps onto the stored-bits range instead.
    """
    from scipy.special import expit

    if function == "SIGMOID" and width > 0:
        return np.asarray(expit(4.0 * (values - center) / width))
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "LINEAR" and width > 1:
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if function == "LINEAR" and width == 1:
        return (values > center - 0.5).astype(np.float64)
    raise DataError(
        f"{file} has window width {width} with VOI LUT function {function!r}, which DICOM does "
        "not allow (LINEAR needs width >= 1, LINEAR_EXACT and SIGMOID width > 0); fix the "
        "header or remove the file"
    )


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    values = np.asarray(values, dtype=np.float64)
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _colour(arr: np.ndarray, ds: Dataset, file: Path, photometric: str) -> np.ndarray:
    """RGB / YBR (pydicom decodes YBR to RGB) or palette colour -> ``[3, H, W]`` in [0, 1]."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = 8 * arr.dtype.itemsize
    elif photometric == "RGB" or photometric.startswith("YBR"):
        bits = int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)
    else:
        raise DataError(
            f"{file} has photometric interpretation {photometric!r}, which medtl does not read; "
            "convert it to MONOCHROME2 or RGB"
        )
    out = np.moveaxis(arr.astype(np.float32) / float(2**bits - 1), -1, 0)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


# -- NIfTI reader -------------------------------------------------------------------------------
def read_nifti(file: Path, locator: str) -> np.ndarray:
    """One 2D slice (``locator="axis=<a>/slice=<k>"``) of a 3D NIfTI volume: ``[1, H, W]``.

    Only that slice is read (nibabel's array proxy). It is scaled by its own 0.5 / 99.5
    percentiles and clipped to [0, 1] (min / max when those coincide; a constant slice is 0).
    ``H`` and ``W`` are the two remaining voxel axes in stored order, not reoriented.
    """
    match = _SLICE.fullmatch(locator)
    if not match:
        raise DataError(f"{file}: locator {locator!r} must be 'axis=<0|1|2>/slice=<k>'")
    axis, k = int(match[1]), int(match[2])
    img = _open_nifti(file)
    if k >= img.shape[axis]:
        raise DataError(
            f"{file} has {img.shape[axis]} slices along axis {axis}, not {k + 1}; "
            "prepare the manifest again"
        )
    index = tuple(k if a == axis else slice(None) for a in range(3))
    plane = _as_float(file, lambda: img.dataobj[index])
    if not np.isfinite(plane).all():
        raise DataError(
            f"{file} has NaN or infinite values in slice {locator}; fix or mask the NaNs "
            "(e.g. set them to the background value) or remove the volume"
        )
    return _robust_unit(plane)[None]


def _robust_unit(plane: np.ndarray) -> np.ndarray:
    """Scale by the 0.5 / 99.5 percentiles and clip to [0, 1]; a constant plane gives zeros."""
    lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(plane.min()), float(plane.max())
    if hi <= lo:
        return np.zeros(plane.shape, dtype=np.float32)
    return np.clip((plane - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _open_nifti(file: Path) -> Any:
    """A nibabel image (header read, data left on disk); only 3D volumes are accepted."""
    import nibabel as nib

    try:
        img: Any = nib.load(str(file))
    except Exception as exc:
        raise DataError(
            f"{file} is not a readable NIfTI file ({type(exc).__name__}: {exc}); re-export or "
            "remove it"
        ) from None
    if len(img.shape) != 3:
        raise DataError(
            f"{file} has shape {tuple(img.shape)}; medtl reads 3D volumes only: split it into "
            "3D volumes (one per time point or channel) or remove it"
        )
    return img


def _as_float(file: Path, read: Callable[[], Any]) -> np.ndarray:
    """``read()`` (a proxy read: may decompress) as float32; I/O errors become DataError."""
    try:
        return np.asarray(read(), dtype=np.float32)
    except Exception as exc:
        raise DataError(
            f"{file} cannot be read ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt: re-export or remove it"
        ) from None


# -- labels and groups shared by both adapters ----------------------------------------------
@dataclass(frozen=True)
class _Labels:
    """Where labels come from: ``none``, the first ``folder`` level, or a ``csv`` table whose
    rows name a file or a folder prefix (``{prefix: (label, group)}``)."""

    how: str
    table: Path | None = None
    rows: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def lookup(self, path: str) -> tuple[str | None, str | None]:
        """``(label, group)`` for the file at ``path`` (relative to the root)."""
        if self.how == "none":
            return None, None
        if self.how == "folder":
            return _folder_label(path), None
        parts = path.split("/")
        for n in range(len(parts), 0, -1):  # longest prefix wins
            hit = self.rows.get("/".join(parts[:n]))
            if hit is not None:
                return hit
        raise DataError(
            f"{path} matches no row of {self.table}; add a row for the file or one of its "
            "folders (an empty label marks it unlabelled)"
        )


def _label_source(root: Path, labels: str | None, label_from: str) -> _Labels:
    if label_from not in _LABEL_FROM:
        raise DataError(
            f"label_from={label_from!r} is not one of {', '.join(_LABEL_FROM)}; for a label "
            "table use -O labels=<file>.csv"
        )
    if labels is None:
        return _Labels(label_from)
    if label_from != "none":
        raise DataError("give -O labels=<file>.csv or -O label_from=folder, not both")
    table = root / check_relative_path(labels, "labels")
    return _Labels("csv", table, _read_label_table(table))


def _read_label_table(table: Path) -> dict[str, tuple[str | None, str | None]]:
    """``path,label[,group]`` rows keyed by their normalised relative path."""
    if not table.is_file():
        raise DataError(f"label table {table} does not exist; name it with -O labels=<file>.csv")
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{table} needs the columns path,label (optional: group)")
        rows: dict[str, tuple[str | None, str | None]] = {}
        for line, rec in enumerate(reader, start=2):
            key = check_relative_path((rec["path"] or "").strip(), f"{table} line {line}: path")
            if key in rows:
                raise DataError(f"{table} line {line}: {key!r} is listed twice; keep one row")
            label, group = (rec["label"] or "").strip(), (rec.get("group") or "").strip()
            rows[key] = (label or None, group or None)
    return rows


def _folder_label(path: str) -> str:
    folder, sep, _ = path.partition("/")
    if not sep:
        raise DataError(
            f"{path} lies directly in the data root; with label_from=folder every file must "
            "sit in a class folder (<root>/<class>/...)"
        )
    return folder


def _classes(samples: list[Sample]) -> list[str]:
    return sorted({s.label for s in samples if s.label})


def _pseudonym(names: dict[str, str], key: str) -> str:
    """``patient-0001``, ``patient-0002``, ... in order of first appearance of ``key``."""
    return names.setdefault(key, f"patient-{len(names) + 1:04d}")


def _find(root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Files under ``root`` that ``keep`` accepts, hidden ones skipped, by relative path."""
    found = [p for p in root.rglob("*") if p.is_file() and not _hidden(p, root) and keep(p)]
    return sorted(found, key=lambda p: rel(p, root))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# -- DICOM adapter ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DicomFile:
    path: str  # relative to the root
    frames: int
    patient: str  # identifying grouping key: kept in memory, never written
    subgroups: str = ""  # coarse only: sex and a ten-year age band


@ADAPTERS.register("dicom")
def dicom(root: Path, labels: str | None = None, label_from: str = "none") -> AdapterResult:
    """DICOM files under ``root`` (``*.dcm``, ``*.dicom`` or the DICM marker), recursively.

    One sample per file, or per frame of a multi-frame file (``frame=<k>``). Labels: ``labels``
    names a CSV (``path,label``; a path is a file or folder prefix, the longest wins),
    ``label_from="folder"`` takes the first folder level, ``"none"`` leaves them unlabelled
    (for pretraining). Group: one pseudonym per patient (PatientID, else StudyInstanceUID, else
    the file's folder), numbered over sorted paths. Paths spelling a patient's ID or name are
    refused.
    """
    require_root(root)
    source = _label_source(root, labels, label_from)
    files = [_scan_dicom(f, root, n) for n, f in enumerate(_find(root, _is_dicom_file), start=1)]
    if not files:
        raise DataError(
            f"{root} holds no DICOM files (*.dcm, *.dicom or files with the DICM marker); point "
            "--data-root at the folder of the scans"
        )
    names: dict[str, str] = {}
    samples = []
    for f in files:
        label, _ = source.lookup(f.path)
        group = _pseudonym(names, f.patient)
        locators = [f"frame={k}" for k in range(f.frames)] if f.frames > 1 else [""]
        samples += [
            Sample(f.path, label, group=group, locator=loc, subgroups=f.subgroups or None)
            for loc in locators
        ]
    return AdapterResult(samples, _classes(samples))


def _is_dicom_file(path: Path) -> bool:
    return path.name.lower().endswith(DICOM_SUFFIXES) or is_dicom(path)


def _scan_dicom(file: Path, root: Path, number: int) -> _DicomFile:
    """Header of one file: identifiers checked against its path, pixel data required."""
    ds, has_pixels = _read_dicom_header(file)
    path = rel(file, root)
    if any(_spells(path, word) for word in _identifiers(ds)):
        raise DataError(
            f"DICOM file no. {number} (counting in sorted path order) has the patient's ID or "
            "name in its path; rename its folders and files to pseudonyms (e.g. patient-0001) "
            "and prepare again"
        )
    _require_pixels(file, ds, has_pixels)
    return _DicomFile(path, _frame_count(ds), _patient_key(ds, path), _subgroups(ds))


_SEXES = {"M": "male", "F": "female", "O": "other"}
_AGE = re.compile(r"^(\d{3})([DWMY])$")


def _subgroups(ds: Dataset) -> str:
    """``"age=40-49;sex=female"`` from PatientSex and PatientAge (``045Y``; days, weeks and
    months count as 0 years): coarse bands only, never the age, birth date or any identifier;
    empty when the header has neither."""
    sex, age = _raw_text(ds, "PatientSex").upper(), _raw_text(ds, "PatientAge").upper()
    values = {}
    if sex:
        values["sex"] = _SEXES.get(sex, "unknown")
    if age:
        match = _AGE.match(age)
        years = int(match.group(1)) if match and match.group(2) == "Y" else 0
        values["age"] = age_band(str(years)) if match else "unknown"
    return format_subgroups(values) if values else ""


def _raw_text(ds: Dataset, keyword: str) -> str:
    """A header value as text, decoded without pydicom's validation, whose warnings and log
    lines would quote the (identifying) value."""
    from pydicom.charset import convert_encodings, decode_bytes

    if keyword not in ds:
        return ""
    value = ds.get_item(keyword).value
    if isinstance(value, bytes):
        encodings = convert_encodings(ds.get("SpecificCharacterSet"))
        value = decode_bytes(value, encodings, _TEXT_DELIMITERS)
    return str(value or "").strip(" \x00")


def _identifiers(ds: Dataset) -> list[str]:
    """PatientID and the words of PatientName's family, given and middle names: those of
    3 or more characters, with a letter or digit, that are not anonymisers' placeholders."""
    name = _raw_text(ds, "PatientName")
    parts = [c for group in name.split("=") for c in group.split("^")[:3]]
    words = [_raw_text(ds, "PatientID"), *(w for c in parts for w in c.split())]
    return [
        w
        for w in words
        if len(w) >= 3 and any(ch.isalnum() for ch in w) and w.lower() not in _PLACEHOLDERS
    ]


def _spells(path: str, word: str) -> bool:
    """``word`` is in ``path`` (any case), not inside a longer run of digits or of letters:
    ID ``001`` is not found in ``IMG0001.dcm``, nor name ``Lee`` in ``sleep``."""

    def edge(ch: str) -> str:
        return r"\d" if ch.isdigit() else r"[^\W\d_]" if ch.isalpha() else ""

    head, tail = edge(word[0]), edge(word[-1])
    pattern = (f"(?<!{head})" if head else "") + re.escape(word) + (f"(?!{tail})" if tail else "")
    return re.search(pattern, path, re.IGNORECASE) is not None


def _patient_key(ds: Dataset, path: str) -> str:
    """PatientID, else StudyInstanceUID, else the file's folder: identifying, never written."""
    for kind, keyword in (("id", "PatientID"), ("study", "StudyInstanceUID")):
        value = _raw_text(ds, keyword)
        if value:
            return f"{kind}:{value}"
    return f"folder:{path.rpartition('/')[0]}"


# -- NIfTI adapter ------------------------------------------------------------------------------
@ADAPTERS.register("nifti")
def nifti(
    root: Path,
    labels: str | None = None,
    label_from: str = "none",
    axis: int = 2,
    min_foreground: float = 0.05,
) -> AdapterResult:
    """One sample per non-empty 2D slice along ``axis`` of each 3D ``.nii`` / ``.nii.gz``.

    Empty-slice rule: with ``t`` the volume's 1st percentile, a slice is kept when the fraction
    of its voxels greater than ``t`` exceeds ``min_foreground``; so the background is whatever
    the volume's lowest values are (0 in MRI, -1024 in CT). Labels as in :func:`dicom`, per
    volume (a CSV row names a volume or a folder) and given to all its slices. Group: the
    volume's path, so its slices stay together, or, when the CSV has a ``group`` column (the
    patient), a pseudonym ``patient-0001``, ... per distinct value.
    """
    require_root(root)
    axis, min_foreground = _slice_options(axis, min_foreground)
    source = _label_source(root, labels, label_from)
    volumes = _find(root, lambda p: p.name.lower().endswith(NIFTI_SUFFIXES))
    if not volumes:
        raise DataError(f"{root} holds no NIfTI volumes (*.nii, *.nii.gz); check --data-root")
    names: dict[str, str] = {}
    samples = []
    left_out, empty_slices = [], 0
    rule = f"more than {min_foreground:.0%} of its voxels above the volume's 1st percentile"
    for file in volumes:
        path = rel(file, root)
        label, patient = source.lookup(path)
        group = _pseudonym(names, patient) if patient else path
        kept, total = _kept_slices(file, axis, min_foreground)
        if not kept:
            left_out.append(
                LeftOut(path, total, f"no slice has {rule} (an empty or constant volume)")
            )
        else:
            empty_slices += total - len(kept)
        samples += [
            Sample(path, label, group=group, locator=f"axis={axis}/slice={k}") for k in kept
        ]
    if empty_slices:
        left_out.append(
            LeftOut(
                f"the other {len(volumes) - len(left_out)} volume(s)",
                empty_slices,
                f"empty slices: none has {rule} (lower -O min_foreground to keep them)",
            )
        )
    if not samples:
        raise DataError(
            f"no slice of the {len(volumes)} volume(s) under {root} has more than "
            f"{min_foreground:.0%} of its voxels above the volume's 1st percentile; lower "
            "-O min_foreground"
        )
    return AdapterResult(samples, _classes(samples), left_out)


def _kept_slices(file: Path, axis: int, min_foreground: float) -> tuple[list[int], int]:
    """Indices of the slices along ``axis`` that pass the empty-slice rule (see :func:`nifti`),
    and the number of slices along ``axis``."""
    img = _open_nifti(file)
    volume = _as_float(file, lambda: img.dataobj)
    if not np.isfinite(volume).all():
        raise DataError(
            f"{file} contains NaN or infinite values; fix or mask the NaNs (e.g. set them to "
            "the background value) or remove the volume"
        )
    threshold = np.percentile(volume, 1)
    others = tuple(a for a in range(3) if a != axis)
    fraction = (volume > threshold).mean(axis=others)
    return [int(k) for k in np.flatnonzero(fraction > min_foreground)], volume.shape[axis]


def _slice_options(axis: Any, min_foreground: Any) -> tuple[int, float]:
    """Options as numbers (they may arrive as strings from ``-O``), checked."""
    try:
        a, f = int(axis), float(min_foreground)
    except (TypeError, ValueError):
        raise DataError(
            f"axis={axis!r} and min_foreground={min_foreground!r} must be numbers"
        ) from None
    if a not in (0, 1, 2):
        raise DataError(f"axis={axis!r} is not 0, 1 or 2 (the volume axis slices are cut along)")
    if not 0.0 <= f < 1.0:
        raise DataError(
            f"min_foreground={min_foreground!r} must be in [0, 1): the fraction of a slice's "
            "voxels above the volume's 1st percentile needed to keep it"
        )
    return a, f
