"""The data audit: broken files, duplicates, label conflicts and suspicious images.

Every image is read once through the same reader the training pipeline uses. Exact
duplicates share a sha256. Near-duplicates are seen two ways, and a pair close in either joins
one cluster (union-find): within ``near_bits`` on a 16x16 difference hash (256 bits,
``imagehash.dhash``), or within ``phash_bits`` on a 16x16 DCT perceptual hash (256 bits,
``imagehash.phash``). The difference hash alone misses copies that differ by a pixel's shift
and resampling (its signs flip in flat regions); the DCT hash keeps only low frequencies and
joins them. Duplicate clusters become groups so that a split cannot leak them; clusters whose
members carry different labels are label conflicts. The report is JSON plus a short terminal
summary.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import DisjointSet

from medtl.data.manifest import resolve
from medtl.data.readers import DISPLAY_MODES, check_image_header, kind_of, read_array
from medtl.errors import DataError
from medtl.io import sha256_bytes, sha256_file, write_json

log = logging.getLogger(__name__)

HASH_SIZE = 16  # 16x16 difference hash = 256 bits
PHASH_SIZE = 16  # 16x16 DCT perceptual hash = 256 bits
DEFAULT_NEAR_BITS = 10
# Measured by looking at the pairs (docs/data.md): on BUSI every pair within 64 DCT bits shows
# one lesion; different images come closest on PneumoniaMNIST (48 bits), Brain Tumor MRI (62)
# and COVID-19 Radiography (68). 40 keeps a margin below all of them.
DEFAULT_PHASH_BITS = 40
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 16, 8192, 4.0
SIZE_OUTLIER = 4.0  # a side 4x smaller or larger than the dataset's median is reported
BORDER_SHARE = 0.05  # a constant strip of at least 5% of a side is reported
_FORMATS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
}


@dataclass
class Item:
    """One thing to inspect: where it is and what the manifest / adapter says about it."""

    key: str
    path: str
    locator: str = ""
    label: str = ""
    mask: str = ""
    split: str = ""
    sha256: str = ""  # expected hash (audit of an existing manifest); "" when unknown


@dataclass
class Inspection:
    """What reading one item found. ``error`` set means the item is unusable."""

    key: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    channels: int = 0
    dhash: np.ndarray | None = None  # [HASH_SIZE**2] bool
    phash: np.ndarray | None = None  # [PHASH_SIZE**2] bool
    error: str = ""
    error_kind: str = ""
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    mode: str = ""  # Pillow's mode of an image file ("" for DICOM, NIfTI, .npz)


@dataclass
class Problem:
    kind: str
    file: str
    detail: str


@dataclass
class AuditReport:
    """Everything the audit found; ``problems`` is what ``--strict`` fails on."""

    n_items: int
    n_usable: int
    near_duplicate_bits: int
    near_duplicate_phash_bits: int = DEFAULT_PHASH_BITS
    problems: list[Problem] = field(default_factory=list)
    exact_duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    image_modes: dict[str, str] = field(default_factory=dict)  # "RGB: 3 images" per mode met
    left_out: list[dict[str, Any]] = field(default_factory=list)  # what an adapter skipped

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problem_counts"] = dict(Counter(p.kind for p in self.problems))
        return out

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def summary(self, examples: int = 3) -> str:
        """A few readable lines for the terminal."""
        lines = [
            f"audit: {self.n_items} images, {self.n_usable} usable; "
            f"{len(self.exact_duplicates)} exact-duplicate and {len(self.near_duplicates)} "
            f"near-duplicate clusters (difference hash <= {self.near_duplicate_bits} bits or "
            f"DCT hash <= {self.near_duplicate_phash_bits} bits), "
            f"{len(self.label_conflicts)} with conflicting labels"
        ]
        for conflict in self.label_conflicts[:examples]:
            members = ", ".join(
                f"{m} [{lab}]"
                for m, lab in zip(conflict["members"], conflict["labels"], strict=True)
            )
            lines.append(f"  label conflict: {members}")
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            by_kind[p.kind].append(p)
        for kind, items in sorted(by_kind.items()):
            if kind == "label-conflict":
                continue
            lines.append(f"  {kind}: {len(items)}")
            lines += [f"    {p.file}: {p.detail}" for p in items[:examples]]
            if len(items) > examples:
                lines.append(f"    ... {len(items) - examples} more in the audit JSON")
        if self.image_modes:
            lines.append("  image modes: " + "; ".join(self.image_modes.values()))
        for entry in self.left_out[:examples]:
            lines.append(f"  left out: {entry['count']} from {entry['what']}: {entry['reason']}")
        if len(self.left_out) > examples:
            lines.append(f"    ... {len(self.left_out) - examples} more in the audit JSON")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------
def inspect_item(root: Path, item: Item) -> Inspection:
    """Read one image and measure what the audit needs; never raises for a bad file."""
    out = Inspection(item.key)
    try:
        file = resolve(root, item.path)
        if not file.is_file():
            out.error_kind, out.error = (
                "missing",
                "file does not exist; restore it or prepare the manifest again",
            )
            return out
        if file.stat().st_size == 0:
            out.error_kind, out.error = "zero-byte", "file is empty (0 bytes)"
            return out
        if kind_of(file) == "image":
            _check_format(file, out)
        arr = read_array(file, item.locator)
    except DataError as exc:
        out.error_kind = _classify(str(exc))
        out.error = str(exc).replace(f"{root}/", "")  # the report names files relative to the root
        return out
    out.channels, out.height, out.width = arr.shape
    out.sha256 = sha256_file(file) if not item.locator else sha256_bytes(arr.tobytes())
    gray = arr[:3].mean(axis=0)
    out.dhash, out.phash = perceptual_hashes(gray)
    out.warnings += _image_warnings(gray)
    if item.mask:
        out.warnings += _mask_warnings(root, item.mask, out.width, out.height)
    return out


def perceptual_hashes(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 16x16 difference hash and DCT hash of ``gray`` [H, W] in [0, 1], as flat bools
    (256 each): what the audit and the pretraining corpus's leakage guard compare."""
    image = Image.fromarray((gray * 255).astype(np.uint8))
    return (
        imagehash.dhash(image, HASH_SIZE).hash.ravel(),
        imagehash.phash(image, PHASH_SIZE).hash.ravel(),
    )


def _check_format(file: Path, out: Inspection) -> None:
    header = check_image_header(file)
    fmt, out.mode = header.format, header.mode
    expected = _FORMATS.get(fmt)
    if expected and file.suffix.lower() not in expected:
        out.warnings.append(
            ("wrong-format", f"content is {fmt} but the name ends in {file.suffix}")
        )


def _classify(message: str) -> str:
    if "decompression bomb" in message:
        return "too-large"
    if "NaN" in message:
        return "nan"
    if "image mode" in message:
        return "unsupported-mode"
    if "outside the data root" in message:
        return "outside-root"
    return "unreadable"


def _image_warnings(gray: np.ndarray) -> list[tuple[str, str]]:
    """Extreme sizes and burned-in constant borders. ``gray``: [H, W] in [0, 1]."""
    h, w = gray.shape
    out = []
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE or max(h, w) / max(min(h, w), 1) > MAX_ASPECT:
        out.append(("extreme-size", f"{w}x{h} pixels"))
    sides = constant_border(gray)
    wide = {
        s: n for s, n in sides.items() if n >= BORDER_SHARE * (h if s in ("top", "bottom") else w)
    }
    if wide:
        desc = ", ".join(f"{s} {n}px" for s, n in wide.items())
        out.append(
            ("constant-border", f"constant border ({desc}); letterboxing or burned-in frame")
        )
    return out


def constant_border(gray: np.ndarray, tol: float = 2 / 255) -> dict[str, int]:
    """Width in pixels of the constant strip on each side of ``gray`` [H, W]."""

    def run(lines: Iterable[np.ndarray], ref: float) -> int:
        n = 0
        for line in lines:
            if np.abs(line - ref).max() > tol:
                break
            n += 1
        return n

    return {
        "top": run(gray, gray[0, 0]),
        "bottom": run(gray[::-1], gray[-1, -1]),
        "left": run(gray.T, gray[0, 0]),
        "right": run(gray.T[::-1], gray[-1, -1]),
    }


def _mask_warnings(root: Path, masks: str, width: int, height: int) -> list[tuple[str, str]]:
    out = []
    for mask in masks.split(";"):
        try:
            header = check_image_header(resolve(root, mask, "mask path"))
            mw, mh = header.width, header.height
        except DataError as exc:
            out.append(("mask-unreadable", f"mask {mask}: {exc}"))
            continue
        if (mw, mh) != (width, height):
            out.append(("mask-size", f"mask {mask} is {mw}x{mh} but the image is {width}x{height}"))
    return out


def inspect_all(
    root: Path,
    items: Sequence[Item],
    workers: int = 4,
    progress: Callable[[Iterable[Inspection], int], Iterable[Inspection]] | None = None,
) -> list[Inspection]:
    """Inspect items in a thread pool (decoding releases the GIL); order is kept."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: Iterable[Inspection] = pool.map(lambda it: inspect_item(root, it), items)
        if progress is not None:
            results = progress(results, len(items))
        return list(results)


def _size_outliers(items: Sequence[Item], inspections: Sequence[Inspection]) -> list[Problem]:
    """Images whose size is far from the dataset's median (a stray thumbnail or a huge scan)."""
    sides = np.array([(ins.width, ins.height) for ins in inspections if not ins.error], dtype=float)
    if len(sides) < 3:
        return []
    median = np.median(sides, axis=0)
    out = []
    for item, ins in zip(items, inspections, strict=True):
        if ins.error:
            continue
        ratio = np.array([ins.width, ins.height]) / median
        if (ratio > SIZE_OUTLIER).any() or (ratio < 1 / SIZE_OUTLIER).any():
            out.append(
                Problem(
                    "extreme-size",
                    item.key,
                    f"{ins.width}x{ins.height} pixels; the dataset's median is "
                    f"{median[0]:.0f}x{median[1]:.0f}",
                )
            )
    return out


# -- duplicates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NearPair:
    """How far apart two images are on each hash (bits); close on either links them."""

    dhash: int
    phash: int


def _packed(bits: list[np.ndarray]) -> np.ndarray:
    """Stack bool hashes [N, B] and pack them into uint64 words [N, B // 64]."""
    return np.packbits(np.stack(bits), axis=1).view(np.uint64)


def _hamming(block: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Bit distances of every row of ``block`` [M, W] to every row of ``packed`` [N, W]."""
    return np.bitwise_count(block[:, None, :] ^ packed[None, :, :]).sum(axis=2)


def duplicate_clusters(
    inspections: Sequence[Inspection], near_bits: int, phash_bits: int = DEFAULT_PHASH_BITS
) -> tuple[list[list[int]], list[list[int]], dict[tuple[int, int], NearPair]]:
    """Exact clusters (same sha256), near clusters (a pair within ``near_bits`` on the
    difference hash or within ``phash_bits`` on the DCT hash, merged transitively; a negative
    threshold switches that view off) and both distances of every linked pair. Indices refer to
    ``inspections``; only usable ones."""
    usable = [
        i
        for i, ins in enumerate(inspections)
        if not ins.error and ins.dhash is not None and ins.phash is not None
    ]
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in usable:
        by_hash[inspections[i].sha256].append(i)
    exact = [v for v in by_hash.values() if len(v) > 1]
    components = DisjointSet(range(len(inspections)))
    pairs: dict[tuple[int, int], NearPair] = {}
    if usable:
        dhashes = _packed([inspections[i].dhash for i in usable])  # type: ignore[misc]
        phashes = _packed([inspections[i].phash for i in usable])  # type: ignore[misc]
        for start in range(0, len(usable), 256):
            d = _hamming(dhashes[start : start + 256], dhashes)
            p = _hamming(phashes[start : start + 256], phashes)
            for a, b in zip(*np.nonzero((d <= near_bits) | (p <= phash_bits)), strict=True):
                ia, ib = usable[start + a], usable[b]
                if ia < ib:
                    pairs[(ia, ib)] = NearPair(int(d[a, b]), int(p[a, b]))
                    components.merge(ia, ib)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in usable:
        clusters[components[i]].append(i)
    near = [sorted(v) for v in clusters.values() if len(v) > 1]
    return exact, sorted(near), pairs


# -- the report -----------------------------------------------------------------------------
def build_report(
    items: Sequence[Item],
    inspections: Sequence[Inspection],
    classes: Sequence[str],
    near_bits: int,
    phash_bits: int = DEFAULT_PHASH_BITS,
) -> tuple[AuditReport, list[list[int]]]:
    """Collect problems and duplicate clusters; also return the clusters (as item indices)
    that must share a group: exact and near duplicates together."""
    report = AuditReport(len(items), sum(not i.error for i in inspections), near_bits, phash_bits)
    for item, ins in zip(items, inspections, strict=True):
        report.problems += _item_problems(item, ins, classes)
    report.problems += _size_outliers(items, inspections)
    report.image_modes = mode_summary(inspections)
    counts = Counter(
        it.label for it, ins in zip(items, inspections, strict=True) if not ins.error and it.label
    )
    report.class_counts = {c: counts.get(c, 0) for c in classes}
    report.problems += [
        Problem("empty-class", c, f"class {c!r} has no usable images")
        for c in classes
        if not counts.get(c)
    ]
    exact, near, pairs = duplicate_clusters(inspections, near_bits, phash_bits)
    report.exact_duplicates = [[items[i].key for i in c] for c in exact]
    for cluster in near:
        _add_near_cluster(report, [items[i] for i in cluster], cluster, pairs)
    return report, [*exact, *near]


def _item_problems(item: Item, ins: Inspection, classes: Sequence[str]) -> list[Problem]:
    """One image's problems: unreadable, its warnings, changed content, an unknown label."""
    problems = [Problem(ins.error_kind, item.key, ins.error)] if ins.error else []
    problems += [Problem(k, item.key, d) for k, d in ins.warnings]
    if item.sha256 and ins.sha256 and item.sha256 != ins.sha256 and not ins.error:
        problems.append(
            Problem(
                "changed",
                item.key,
                "content differs from the manifest's sha256; prepare the manifest again",
            )
        )
    if item.label and item.label not in classes:
        problems.append(
            Problem("unknown-label", item.key, f"label {item.label!r} is not in {list(classes)}")
        )
    return problems


def _add_near_cluster(
    report: AuditReport,
    members: list[Item],
    cluster: list[int],
    pairs: dict[tuple[int, int], NearPair],
) -> None:
    """Record one near-duplicate cluster, and its label conflict or split crossing."""
    keys = [m.key for m in members]
    labels = [m.label for m in members]
    splits = [m.split for m in members]
    linked = [p for (a, b), p in pairs.items() if a in cluster and b in cluster]
    entry = {
        "members": keys,
        "labels": labels,
        "splits": splits,
        "max_bits": max((p.dhash for p in linked), default=0),
        "max_phash_bits": max((p.phash for p in linked), default=0),
    }
    report.near_duplicates.append(entry)
    if len(set(labels)) > 1:
        report.label_conflicts.append(entry)
        report.problems.append(
            Problem(
                "label-conflict",
                keys[0],
                "near-duplicates with different labels: " + _tagged(keys, labels),
            )
        )
    if len({s for s in splits if s}) > 1:
        report.problems.append(
            Problem(
                "cross-split-duplicate",
                keys[0],
                "near-duplicates in different splits: " + _tagged(keys, splits),
            )
        )


def mode_summary(inspections: Sequence[Inspection]) -> dict[str, str]:
    """Each Pillow mode met, how many image files have it and what medtl reads it as."""
    counts = Counter(ins.mode for ins in inspections if ins.mode)
    out = {}
    for mode, n in sorted(counts.items()):
        target = DISPLAY_MODES.get(mode)
        read_as = "refused" if target is None else "kept" if target == mode else f"read as {target}"
        out[mode] = f"{mode} {n} ({read_as})"
    return out


def _tagged(members: Sequence[str], tags: Sequence[str]) -> str:
    return ", ".join(f"{m} [{t}]" for m, t in zip(members, tags, strict=True))
