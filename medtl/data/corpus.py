"""A pretraining corpus of its own: unlabelled images from several sources, pooled.

``pretrain.data`` lists sources: a manifest CSV (with its data root), a folder of images, a
DICOM or NIfTI tree, an ``.npz`` collection (MedMNIST-style ``<split>_images`` arrays). Each is
listed by medtl's own adapters and read by the loader's readers, channel and resize rules, so
grey and RGB images of any size mix. Each source has a per-image sampling ``weight``: a
source's share of an epoch's draws is ``weight x images`` over the sum, so weights of 1 pool
the images plainly. Draws are fixed by ``(seed, epoch)``, so a killed run resumes bit-equal.

Leakage guard: an image whose file sha256, decoded-pixel sha256, difference hash or DCT hash
(the audit's hashes and thresholds) matches a validation or test image of the recipe's labelled
manifest is left out, whatever its name. Hashes are cached by file, size and mtime, so a
resumed run does not compute them again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.data import Dataset
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtl.artifacts import CorpusRecord, CorpusSourceRecord
from medtl.data.audit import (
    DEFAULT_NEAR_BITS,
    DEFAULT_PHASH_BITS,
    _hamming,
    _packed,
    perceptual_hashes,
)
from medtl.data.dataset import (
    DataConfig,
    DiskCacheDataset,
    MemoryCacheDataset,
    PlainDataset,
    build_transforms,
)
from medtl.data.manifest import Manifest, check_root, resolve, row_id
from medtl.data.readers import npz_locator, read_array
from medtl.errors import DataError, MedtlError
from medtl.io import sha256_bytes, sha256_file, write_json
from medtl.train import mix_seed

log = logging.getLogger(__name__)

KINDS = ("manifest", "folder", "dicom", "nifti", "npz")
CACHE_FORMAT = 1


class CorpusSource(BaseModel):
    """One entry of ``pretrain.data``: exactly one of ``manifest``, ``folder``, ``dicom``,
    ``nifti``, ``npz`` (a path), and how it is sampled."""

    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(None, description="a manifest CSV ('medtl prepare'); needs root")
    folder: str | None = Field(None, description="a folder of image files, at any depth")
    dicom: str | None = Field(None, description="a DICOM tree (labels ignored)")
    nifti: str | None = Field(
        None, description="a NIfTI tree: every non-empty slice along voxel axis 2"
    )
    npz: str | None = Field(None, description="an .npz of <split>_images arrays (MedMNIST)")
    root: str | None = Field(None, description="manifest: the folder its paths are relative to")
    splits: list[Literal["train", "val", "test"]] | None = Field(
        None, description="manifest / npz: the splits read (default: all)"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns on paths relative to the source, left out (e.g. '*_mask*')",
    )
    weight: float = Field(1.0, gt=0, description="per-image sampling weight")

    @model_validator(mode="after")
    def _one_kind(self) -> CorpusSource:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a pretrain.data source names exactly one of {', '.join(KINDS)} "
                f"(got {', '.join(given) or 'none'})"
            )
        if (self.root is None) == (self.kind == "manifest"):
            raise ValueError("'root' (the data root of its paths) goes with a manifest source only")
        if self.splits is not None and self.kind not in ("manifest", "npz"):
            raise ValueError("'splits' goes with a manifest or npz source only")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def path(self) -> str:
        return str(getattr(self, self.kind))

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class CorpusItem:
    """One image of a source: ``path`` relative to ``root``, ``locator`` inside a container."""

    source: int
    root: Path
    path: str
    locator: str = ""


@dataclass(frozen=True)
class Fingerprint:
    """What the guard compares; ``error`` set means the image could not be read."""

    file_sha256: str = ""
    pixel_sha256: str = ""
    dhash: str = ""  # hex of 256 bits
    phash: str = ""
    error: str = ""


@dataclass
class Corpus:
    """The images pretraining draws from, per source, and the guard's account."""

    items: list[CorpusItem]  # source by source, in each source's order
    record: CorpusRecord
    excluded: list[dict[str, str]]


# -- listing sources ----------------------------------------------------------------------
def list_source(index: int, source: CorpusSource) -> list[CorpusItem]:
    """Every image the source holds, in a fixed order; a source that holds none is an error."""
    where = f"pretrain.data[{index}] ({source.name})"
    try:
        items = _list(index, source)
    except MedtlError as exc:
        raise DataError(f"{where}: {exc}") from None
    items = [i for i in items if not any(fnmatch.fnmatch(i.path, p) for p in source.exclude)]
    if not items:
        raise DataError(
            f"{where} holds no images{' left after exclude' if source.exclude else ''}; point it "
            "at a folder, tree or file with images, or remove it from pretrain.data"
        )
    return items


def check_source(index: int, source: CorpusSource) -> str:
    """That the source's path (and a manifest's root) exists, without listing its images:
    ``medtl check`` and the start of a run fail on a wrong path at once."""
    path = Path(source.path).expanduser()
    try:
        if source.kind == "manifest":
            rows = len(Manifest.load(path).rows)
            check_root(str(source.root))
            return f"pretrain.data[{index}] {source.name}: {rows} rows"
        if source.kind == "npz" and not path.is_file():
            raise DataError(f"{path} does not exist; name an existing .npz")
        if source.kind != "npz":
            check_root(path)
    except MedtlError as exc:
        raise DataError(f"pretrain.data[{index}] ({source.name}): {exc}") from None
    return f"pretrain.data[{index}] {source.name}: exists"


def listing_key(sources: Sequence[CorpusSource]) -> str:
    """A hash of what the sources hold, by file name, size and modification time (a
    manifest: its CSV file), without reading any image: the pretraining stage's key, so that
    a file added to, changed in or removed from a source runs the stage again."""
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source.path).expanduser()
        digest.update(f"{source.name}\n".encode())
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            digest.update(
                f"{f.relative_to(path.parent)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def _list(index: int, source: CorpusSource) -> list[CorpusItem]:
    from medtl.data.prepare import run_adapter

    path = Path(source.path).expanduser()
    if source.kind == "manifest":
        manifest = Manifest.load(path)
        root = check_root(str(source.root))
        splits = source.splits or ("train", "val", "test")
        return [
            CorpusItem(index, root, r.path, r.locator) for r in manifest.rows if r.split in splits
        ]
    if source.kind == "npz":
        return _list_npz(index, path, source.splits)
    adapter = {"folder": "images", "dicom": "dicom", "nifti": "nifti"}[source.kind]
    root = check_root(path)
    samples = run_adapter(adapter, root, {}).samples
    return [CorpusItem(index, root, s.path, s.locator) for s in samples]


def _list_npz(index: int, file: Path, splits: Sequence[str] | None) -> list[CorpusItem]:
    if not file.is_file():
        raise DataError(f"{file} does not exist; name an existing .npz")
    try:
        with np.load(file, allow_pickle=False) as data:
            keys = {k: data[k].shape[0] for k in data.files if k.endswith("_images")}
    except Exception as exc:
        raise DataError(f"{file} is not a readable .npz ({exc})") from None
    wanted = [f"{s}_images" for s in splits] if splits else sorted(keys)
    return [
        CorpusItem(index, file.parent, file.name, npz_locator(k, i))
        for k in wanted
        if k in keys
        for i in range(keys[k])
    ]


# -- fingerprints ---------------------------------------------------------------------------
class HashCache:
    """Fingerprints keyed by file, size, mtime and locator, kept in one JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, str]] = {}
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                if raw.get("format") == CACHE_FORMAT:
                    self.entries = raw["entries"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                log.warning("ignoring an unreadable hash cache %s", path)

    @staticmethod
    def key(file: Path, locator: str) -> str:
        st = file.stat()
        return f"{file.resolve()}#{locator}|{st.st_size}|{st.st_mtime_ns}"

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"format": CACHE_FORMAT, "entries": self.entries})

    def fingerprints(self, items: Sequence[CorpusItem], workers: int) -> list[Fingerprint]:
        """One per item, computed where the cache has none (threads: decoding frees the GIL)."""

        def one(item: CorpusItem) -> Fingerprint:
            try:
                file = resolve(item.root, item.path)
                key = self.key(file, item.locator)
            except (MedtlError, OSError) as exc:
                return Fingerprint(error=str(exc))
            if key not in self.entries:
                self.entries[key] = fingerprint(file, item.locator).__dict__
            return Fingerprint(**self.entries[key])

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, items))


def fingerprint(file: Path, locator: str = "") -> Fingerprint:
    """Hashes of one image: its file (whole files only), its decoded pixels, and the audit's
    difference and DCT hashes of its grey version."""
    try:
        arr = read_array(file, locator)
    except MedtlError as exc:
        return Fingerprint(error=str(exc))
    dhash, phash = perceptual_hashes(arr[:3].mean(axis=0))
    return Fingerprint(
        file_sha256="" if locator else sha256_file(file),
        pixel_sha256=sha256_bytes(np.ascontiguousarray(arr, dtype=np.float32).tobytes()),
        dhash=np.packbits(dhash).tobytes().hex(),
        phash=np.packbits(phash).tobytes().hex(),
    )


def _bits(hexes: Sequence[str]) -> np.ndarray:
    """Hex hashes -> packed uint64 words ``[N, 4]`` for :func:`medtl.data.audit._hamming`."""
    return _packed([np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in hexes])


# -- the guard ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Guard:
    """The labelled dataset's validation and test images, as hashes."""

    exact: dict[str, str]  # file or pixel sha256 -> the row id it belongs to
    dhash: np.ndarray  # [M, 4] uint64
    phash: np.ndarray
    rows: list[str]
    near_bits: int
    phash_bits: int

    def match(self, fp: Fingerprint) -> tuple[str, str] | None:
        """``("exact" | "near", row id)`` when ``fp`` is a copy of a guarded image."""
        for h in (fp.file_sha256, fp.pixel_sha256):
            if h and h in self.exact:
                return "exact", self.exact[h]
        if not self.rows:
            return None
        d = _hamming(_bits([fp.dhash]), self.dhash)[0]
        p = _hamming(_bits([fp.phash]), self.phash)[0]
        close = np.nonzero((d <= self.near_bits) | (p <= self.phash_bits))[0]
        return ("near", self.rows[int(close[0])]) if len(close) else None


def build_guard(manifest: Manifest, root: Path, cache: HashCache, workers: int) -> Guard:
    """Hashes of every validation and test row of ``manifest`` (with the sha256 it records)."""
    rows = [r for r in manifest.rows if r.split in ("val", "test")]
    items = [CorpusItem(-1, root, r.path, r.locator) for r in rows]
    prints = cache.fingerprints(items, workers)
    exact: dict[str, str] = {}
    kept = []
    for row, fp in zip(rows, prints, strict=True):
        if fp.error:
            raise DataError(
                f"the leakage guard cannot read {row.split} image {row.path} of the recipe's "
                f"manifest ({fp.error}); restore it or prepare the manifest again"
            )
        for h in (row.sha256, fp.file_sha256, fp.pixel_sha256):
            if h:
                exact.setdefault(h, row.id)
        kept.append((row.id, fp))
    meta = manifest.meta
    near = meta.near_duplicate_bits if meta.near_duplicate_bits is not None else DEFAULT_NEAR_BITS
    phash = meta.near_duplicate_phash_bits
    return Guard(
        exact,
        _bits([fp.dhash for _, fp in kept]) if kept else np.zeros((0, 4), np.uint64),
        _bits([fp.phash for _, fp in kept]) if kept else np.zeros((0, 4), np.uint64),
        [r for r, _ in kept],
        near,
        DEFAULT_PHASH_BITS if phash is None else phash,
    )


def build_corpus(
    sources: Sequence[CorpusSource],
    manifest: Manifest,
    root: Path,
    cache_file: Path | None = None,
    workers: int = 4,
) -> Corpus:
    """List every source, leave out unreadable images and copies of the recipe's validation
    and test images; a source left with no image is an error naming it."""
    cache = HashCache(cache_file)
    guard = build_guard(manifest, root, cache, workers)
    items: list[CorpusItem] = []
    records: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    for index, source in enumerate(sources):
        used, counts = _screen_source(index, source, cache, guard, workers, excluded)
        items += used
        records.append(
            {"name": source.name, "kind": source.kind, "weight": source.weight,
             "found": counts["found"], "unreadable": counts["unreadable"],
             "excluded_exact": counts["exact"], "excluded_near": counts["near"], "used": len(used)}
        )  # fmt: skip
    record = _corpus_record(records, items, guard)
    for r in record.sources:
        log.info(
            "corpus %s: %d found, %d used, %d exact and %d near copies of validation / test "
            "images left out, %d unreadable",
            r.name, r.found, r.used, r.excluded_exact, r.excluded_near, r.unreadable,
        )  # fmt: skip
    return Corpus(items, record, excluded)


def _screen_source(
    index: int,
    source: CorpusSource,
    cache: HashCache,
    guard: Guard,
    workers: int,
    excluded: list[dict[str, str]],
) -> tuple[list[CorpusItem], dict[str, int]]:
    """The images of one source that are readable and no copy of a validation or test image,
    how many it holds (``found``) and how many of each kind were left out; copies are appended
    to ``excluded``."""
    listed = list_source(index, source)
    prints = cache.fingerprints(listed, workers)
    counts = {"unreadable": 0, "exact": 0, "near": 0}
    used = []
    for item, fp in zip(listed, prints, strict=True):
        hit = ("unreadable", "") if fp.error else guard.match(fp)
        if hit is None:
            used.append(item)
            continue
        counts[hit[0]] += 1
        if hit[0] != "unreadable":
            excluded.append(
                {"source": source.name, "path": item.path, "locator": item.locator,
                 "reason": hit[0], "matches_row": hit[1]}
            )  # fmt: skip
    cache.save()
    if not used:
        raise DataError(_empty_message(index, source, len(listed), counts))
    if counts["unreadable"]:
        log.warning(
            "pretrain.data[%d] (%s): %d of %d images cannot be read and are left out",
            index, source.name, counts["unreadable"], len(listed),
        )  # fmt: skip
    return used, {**counts, "found": len(listed)}


def _corpus_record(
    records: list[dict[str, Any]], items: list[CorpusItem], guard: Guard
) -> CorpusRecord:
    """What the encoder card records of the corpus: each source's counts and share of the
    draws, the guard's size and settings, and a hash of the image list."""
    total = sum(r["weight"] * r["used"] for r in records)
    return CorpusRecord(
        sources=[CorpusSourceRecord(**r, share=r["weight"] * r["used"] / total) for r in records],
        guard_images=len(guard.rows),
        near_duplicate_bits=guard.near_bits,
        near_duplicate_phash_bits=guard.phash_bits,
        sha256=hashlib.sha256(
            "\n".join(f"{i.source}\t{i.path}\t{i.locator}" for i in items).encode()
        ).hexdigest(),
    )


def _empty_message(index: int, source: CorpusSource, found: int, counts: dict[str, int]) -> str:
    where = f"pretrain.data[{index}] ({source.name})"
    if counts["unreadable"] == found:
        return (
            f"{where}: none of its {found} images can be read; check the files (medtl audit) "
            "or remove the source from pretrain.data"
        )
    return (
        f"{where}: every one of its {found} images is left out ({counts['exact']} exact and "
        f"{counts['near']} near copies of the recipe's validation / test images, "
        f"{counts['unreadable']} unreadable); pretraining on it would leak the evaluation "
        "images: remove the source or point it at other images"
    )


# -- the dataset ----------------------------------------------------------------------------
def epoch_draws(
    sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int
) -> np.ndarray:
    """Epoch ``epoch``'s ``sum(sizes)`` draws as indices into the pooled items.

    Source ``s`` gets ``weight_s x size_s / sum`` of them (largest remainder); within a source
    images are drawn without replacement (a fresh seeded permutation, repeated when a source
    is drawn more often than it has images)."""
    sizes_a, w = np.asarray(sizes), np.asarray(weights, dtype=float)
    n = int(sizes_a.sum())
    exact = n * w * sizes_a / float((w * sizes_a).sum())
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    offsets = np.concatenate([[0], np.cumsum(sizes_a)[:-1]])
    out = []
    for s, (size, count) in enumerate(zip(sizes_a, counts, strict=True)):
        if count == 0:
            continue
        perm = np.random.default_rng(mix_seed(seed, epoch, s, 2)).permutation(size)
        out.append(offsets[s] + np.resize(perm, count))
    return np.concatenate(out)


class PooledCorpus(Dataset):  # type: ignore[misc]
    """The corpus's images behind the loader's transforms; ``pick(epoch, i)`` is the image
    epoch ``epoch``'s draw ``i`` names (read by :class:`medtl.train.EpochSeeded`)."""

    def __init__(self, base: Dataset, sizes: list[int], weights: list[float], seed: int) -> None:
        self.base, self.sizes, self.weights, self.seed = base, sizes, weights, seed
        self.transform = base.transform
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: Any) -> Any:
        return self.base[index]

    def pick(self, epoch: int, i: int) -> int:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_draws(self.sizes, self.weights, self.seed, epoch))
        return int(self._epoch[1][i])


def corpus_dataset(
    corpus: Corpus, cfg: DataConfig, train: bool = False, seed: int = 0
) -> PooledCorpus:
    """The loader's dataset (and cache) over the corpus's images, weighted by source."""
    data = [
        {"image": i.path, "locator": i.locator, "root": str(i.root), "label": -1,
         "row": row_id(f"{i.source}/{i.path}", i.locator)}
        for i in corpus.items
    ]  # fmt: skip
    transform = build_transforms(cfg, Path("."), train=train, seed=seed)
    base: Dataset
    if cfg.cache == "memory":
        base = MemoryCacheDataset(
            data, transform, num_workers=max(cfg.num_workers, 1), progress=False
        )
    elif cfg.cache == "disk" and cfg.cache_dir:
        key = hashlib.sha256(
            f"{corpus.record.sha256}{cfg.image_size}{cfg.channels}{cfg.resize}".encode()
        ).hexdigest()
        base = DiskCacheDataset(
            data, transform, cache_dir=Path(cfg.cache_dir) / f"corpus-{key[:16]}"
        )
    else:
        base = PlainDataset(data, transform)
    sizes = [r.used for r in corpus.record.sources]
    weights = [r.weight for r in corpus.record.sources]
    return PooledCorpus(base, sizes, weights, seed)
