"""Data manifests: one CSV row per sample plus a JSON sidecar.

A manifest is the contract between the data stage and everything after it. Paths are
relative to a data root given at run time (never written into the manifest), so one manifest
serves every machine that holds a copy of the dataset.

``<name>.csv`` columns (see docs/manifest.md):
    id, path, locator, label, split, group, sha256, width, height, mask

``<name>.json`` sidecar: format version, adapter and its options, class names in label-index
order, split seed / ratios / source, medtl version, counts, and the CSV's sha256.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from medtl import __version__
from medtl.errors import DataError
from medtl.io import atomic_write_text, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
COLUMNS = ("id", "path", "locator", "label", "split", "group", "sha256", "width", "height", "mask")


@dataclass(frozen=True)
class Sample:
    """One sample found by an adapter, before hashing and splitting.

    ``path`` is POSIX and relative to the data root. ``locator`` addresses an image inside a
    container file (``train_images/12`` in an ``.npz``, ``axis=2/slice=40`` in a NIfTI volume,
    ``frame=3`` in a multi-frame DICOM); it is empty for an ordinary image file. ``label`` is
    ``None`` for unlabelled images. ``split`` is the dataset's official split, if any; ``group``
    is a patient / lesion / volume id that must not straddle splits. ``mask`` holds the
    image's segmentation mask path(s), ``;``-separated (BUSI has one mask per lesion).
    """

    path: str
    label: str | None = None
    split: str | None = None
    group: str | None = None
    mask: str | None = None
    subgroups: str | None = None
    locator: str = ""

    @property
    def key(self) -> str:
        return f"{self.path}#{self.locator}" if self.locator else self.path


@dataclass(frozen=True)
class Row:
    """One manifest row: a :class:`Sample` with its id, final split and group, and content hash."""

    id: str
    path: str
    label: str
    split: str
    group: str
    sha256: str
    width: int
    height: int
    locator: str = ""
    mask: str = ""
    subgroups: str = ""

    @property
    def key(self) -> str:
        return f"{self.path}#{self.locator}" if self.locator else self.path


SUBGROUPS = "subgroups"  # optional column: "age=50-59;sex=female;localization=back"


def format_subgroups(values: dict[str, str]) -> str:
    """``{"sex": "female", "age": "50-59"}`` -> ``"age=50-59;sex=female"`` (keys sorted)."""
    for key, value in values.items():
        if not key or any(c in f"{key}{value}" for c in ";=\n"):
            raise DataError(
                f"subgroup {key!r}={value!r}: names and values may not hold ; = or newlines"
            )
    return ";".join(f"{k}={v}" for k, v in sorted(values.items()))


def parse_subgroups(text: str) -> dict[str, str]:
    """The inverse of :func:`format_subgroups`; a DataError for a malformed cell."""
    out = {}
    for part in filter(None, text.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise DataError(f"subgroups cell {text!r}: expected name=value pairs separated by ;")
        out[key] = value
    return out


def row_id(path: str, locator: str = "") -> str:
    """A stable id from the sample's location: unchanged when other files are added."""
    key = f"{path}#{locator}" if locator else path
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


@dataclass
class ManifestMeta:
    """The sidecar: what produced the manifest and how it was split."""

    adapter: str
    classes: list[str]
    split_seed: int
    split_ratios: dict[str, float]
    split_source: str  # "official", "official+carved-val", "seeded" or "resplit" (data.leaks)
    adapter_options: dict[str, Any] = field(default_factory=dict)
    medtl_version: str = __version__
    format_version: int = FORMAT_VERSION
    near_duplicate_bits: int | None = None
    near_duplicate_phash_bits: int | None = None
    csv_sha256: str = ""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def check_relative_path(path: str, what: str = "path") -> str:
    """Reject absolute paths and paths that climb out of the data root (``../../etc/passwd``)."""
    posix = PurePosixPath(path.replace("\\", "/"))
    if not path or posix.is_absolute() or (len(path) > 1 and path[1] == ":"):
        raise DataError(
            f"{what} {path!r} is not relative to the data root; manifests hold paths "
            "relative to --data-root only"
        )
    if ".." in posix.parts:
        raise DataError(
            f"{what} {path!r} escapes the data root; remove '..' from the manifest path"
        )
    return posix.as_posix()


def resolve(root: Path, path: str, what: str = "path") -> Path:
    """``root / path``, refusing anything that would leave ``root``: ``..``, absolute paths,
    and symbolic links (of the file or of a folder on its way) that point outside it."""
    rel = check_relative_path(path, what)
    full = Path(os.path.normpath(root / rel))
    if not full.is_relative_to(Path(os.path.normpath(root))):
        raise DataError(f"{what} {path!r} escapes the data root {root}")
    real = Path(os.path.realpath(full))
    if not real.is_relative_to(Path(os.path.realpath(root))):
        raise DataError(
            f"{root / rel} is a link to {real}, outside the data root {root}; medtl reads only "
            "files inside the data root: copy the file in or point --data-root at the folder "
            "that holds it"
        )
    return full


def check_root(root: str | Path) -> Path:
    """A data root must be an existing folder; a file given as the root is named as such."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data root {root} does not exist; pass --data-root with the dataset folder"
        )
    if not root.is_dir():
        raise DataError(
            f"data root {root} is a file, not a folder; pass the folder that holds the dataset "
            f"(e.g. {root.parent})"
        )
    return root


class Manifest:
    """Rows plus sidecar metadata, with loading, validation and atomic saving."""

    def __init__(self, rows: list[Row], meta: ManifestMeta) -> None:
        self.rows = rows
        self.meta = meta
        self._validate()

    # -- queries --------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def split(self, name: str) -> list[Row]:
        """Rows of one split, in manifest order; an empty split is an error."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        rows = [r for r in self.rows if r.split == name]
        if not rows:
            raise DataError(
                f"split {name!r} of this manifest is empty; prepare it again with a non-zero "
                f"ratio for {name!r} (--split-ratios) or pick another split"
            )
        return rows

    def label_index(self, label: str) -> int:
        """Index of ``label`` in the class list; -1 for an unlabelled sample."""
        return self.classes.index(label) if label else -1

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n}}``, unlabelled samples counted under ``""``."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            c = Counter(r.label for r in self.rows if r.split == split)
            if c:
                out[split] = dict(sorted(c.items()))
        return out

    def csv_text(self) -> str:
        """The CSV; the optional ``subgroups`` column only when a row has subgroups, so a
        manifest without them keeps its format and hash."""
        columns = COLUMNS + ((SUBGROUPS,) if any(r.subgroups for r in self.rows) else ())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: getattr(row, k) for k in columns})
        return buffer.getvalue()

    @property
    def sha256(self) -> str:
        """Hash of the CSV content: what a run records to say which data it used."""
        return hashlib.sha256(self.csv_text().encode("utf-8")).hexdigest()

    # -- persistence ----------------------------------------------------------------------
    def save(self, csv_path: str | Path) -> Path:
        """Write ``<name>.csv`` and ``<name>.json`` atomically; return the CSV path."""
        csv_path = Path(csv_path)
        if csv_path.suffix != ".csv":
            raise DataError(f"manifest output {csv_path} must end in .csv")
        text = self.csv_text()
        self.meta.csv_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.meta.counts = self.counts()
        atomic_write_text(csv_path, text)
        write_json(sidecar_path(csv_path), asdict(self.meta))
        return csv_path

    @classmethod
    def load(cls, csv_path: str | Path) -> Manifest:
        """Read and validate a manifest; every problem names the file, the row and the fix."""
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"manifest {csv_path} does not exist; create it with 'medtl prepare'")
        side = sidecar_path(csv_path)
        if not side.is_file():
            raise DataError(
                f"manifest sidecar {side} is missing; 'medtl prepare' writes it beside the CSV"
            )
        try:
            meta_dict = json.loads(side.read_text(encoding="utf-8"))
            meta = ManifestMeta(**meta_dict)
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"manifest sidecar {side} is not valid: {exc}") from None
        text = csv_path.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"manifest {csv_path} lacks column(s) {', '.join(missing)}")
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(
                    Row(
                        id=rec["id"],
                        path=check_relative_path(rec["path"]),
                        locator=rec["locator"] or "",
                        label=rec["label"] or "",
                        split=rec["split"],
                        group=rec["group"],
                        sha256=rec["sha256"],
                        width=int(rec["width"]),
                        height=int(rec["height"]),
                        mask=";".join(
                            check_relative_path(m, "mask path") for m in rec["mask"].split(";")
                        )
                        if rec["mask"]
                        else "",
                        subgroups=format_subgroups(parse_subgroups(rec.get(SUBGROUPS) or "")),
                    )
                )
            except (DataError, ValueError) as exc:
                raise DataError(f"manifest {csv_path} line {line}: {exc}") from None
        try:
            return cls(rows, meta)
        except DataError as exc:
            raise DataError(f"manifest {csv_path}: {exc}") from None

    # -- checks ---------------------------------------------------------------------------
    def _validate(self) -> None:
        classes = set(self.meta.classes)
        if len(classes) != len(self.meta.classes):
            raise DataError(f"class list {self.meta.classes} has duplicates")
        seen: set[str] = set()
        for r in self.rows:
            if r.id in seen:
                raise DataError(f"row id {r.id} appears twice")
            seen.add(r.id)
            if r.label and r.label not in classes:
                raise DataError(
                    f"row {r.id} ({r.path}) has label {r.label!r}, which is not in the class "
                    f"list {self.meta.classes}; fix the label or the class list"
                )
            if r.split not in SPLITS:
                raise DataError(
                    f"row {r.id} ({r.path}) has split {r.split!r}; use train, val or test"
                )
        for group, splits in _group_splits(self.rows).items():
            if len(splits) > 1 and self.meta.split_source in ("seeded", "resplit"):
                raise DataError(
                    f"group {group!r} straddles splits {sorted(splits)}; prepare the manifest "
                    "again so that a patient / lesion / duplicate cluster stays in one split"
                )

    def with_rows(self, rows: list[Row]) -> Manifest:
        return Manifest(rows, replace(self.meta))


def _group_splits(rows: list[Row]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r.group, set()).add(r.split)
    return out


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")
