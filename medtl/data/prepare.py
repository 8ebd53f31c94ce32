"""``prepare``: adapter -> audit -> groups -> leakage-safe split -> manifest + audit JSON."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from scipy.cluster.hierarchy import DisjointSet

from medtl.data.adapters import ADAPTERS, AdapterResult
from medtl.data.audit import (
    DEFAULT_NEAR_BITS,
    DEFAULT_PHASH_BITS,
    AuditReport,
    Inspection,
    Item,
    Problem,
    build_report,
    inspect_all,
)
from medtl.data.manifest import Manifest, ManifestMeta, Row, Sample, check_root, row_id
from medtl.data.split import DEFAULT_RATIOS, carve_validation, check_ratios, group_split
from medtl.errors import ConfigError, DataError
from medtl.io import check_writable

log = logging.getLogger(__name__)

Progress = Callable[[Iterable[Inspection], int], Iterable[Inspection]]


@dataclass
class PrepareResult:
    manifest: Manifest
    audit: AuditReport
    manifest_path: Path
    audit_path: Path


def audit_path_for(manifest_path: str | Path) -> Path:
    path = Path(manifest_path)
    return path.with_name(path.stem + ".audit.json")


def run_adapter(name: str, root: Path, options: dict[str, Any]) -> AdapterResult:
    """Call the adapter ``name`` with ``options``, refusing options it does not take."""
    adapter = ADAPTERS.get(name)
    accepted = [p for p in inspect.signature(adapter).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise ConfigError(
            f"adapter {name!r} has no option(s) {', '.join(unknown)} (allowed: {allowed})"
        )
    result = adapter(root, **options)
    if not result.samples:
        raise DataError(f"adapter {name!r} found no images under {root}; check --data-root")
    for entry in result.left_out:
        log.warning("left out %d image(s) of %s: %s", entry.count, entry.what, entry.reason)
    return result


def prepare(
    adapter: str,
    root: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    ratios: dict[str, float] | None = None,
    seed: int = 0,
    near_bits: int = DEFAULT_NEAR_BITS,
    workers: int = 4,
    progress: Progress | None = None,
    phash_bits: int = DEFAULT_PHASH_BITS,
) -> PrepareResult:
    """Build, audit, split and save a manifest for the dataset at ``root``.

    Unusable images are left out of the manifest and listed in the audit. Exact and
    near-duplicate clusters are merged with the adapter's groups (patients, lesions, volumes)
    before splitting, so none of them straddles two splits. Official splits are kept; when a
    dataset has train/test only, validation is carved from train by group.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist; pass the folder that holds the dataset")
    ratios = check_ratios(ratios or DEFAULT_RATIOS)
    check_writable(Path(out).parent)  # before the audit reads every image
    root, options = data_folder(adapter, root, dict(options or {}))
    found = run_adapter(adapter, root, options)
    samples, classes = found.samples, found.classes
    items = [
        Item(s.key, s.path, s.locator, s.label or "", s.mask or "", s.split or "") for s in samples
    ]
    inspections = inspect_all(root, items, workers, progress)
    report, clusters = build_report(items, inspections, classes, near_bits, phash_bits)
    keep = [i for i, ins in enumerate(inspections) if not ins.error]
    if not keep:
        raise DataError(
            f"none of the {len(items)} images under {root} could be read; see the audit"
        )
    groups = merge_groups(samples, clusters)
    splits, source = assign_splits(samples, groups, keep, ratios, seed)
    rows = [manifest_row(samples[i], inspections[i], splits[i], groups[i]) for i in keep]
    meta = ManifestMeta(
        adapter=adapter,
        classes=list(classes),
        split_seed=seed,
        split_ratios=ratios,
        split_source=source,
        adapter_options=options,
        near_duplicate_bits=near_bits,
        near_duplicate_phash_bits=phash_bits,
    )
    manifest = Manifest(rows, meta)
    for item, split in zip(items, splits, strict=True):
        item.split = split
    report, _ = build_report(items, inspections, classes, near_bits, phash_bits)  # final splits
    add_left_out(report, found)
    out = Path(out)
    manifest.save(out)
    audit_file = audit_path_for(out)
    report.save(audit_file)
    return PrepareResult(manifest, report, out, audit_file)


def data_folder(adapter: str, root: Path, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The folder the adapter reads and its options: a single-file dataset (.npz, .csv) is read
    from its folder, the file named by the adapter's ``file`` option."""
    if not root.is_file():
        return root, options
    if "file" not in inspect.signature(ADAPTERS.get(adapter)).parameters:
        check_root(root)  # this adapter reads a folder: the file is named as the mistake
    return root.parent, {"file": root.name, **options}


def manifest_row(sample: Sample, inspection: Inspection, split: str, group: str) -> Row:
    """The manifest row of a readable sample, in its split and group."""
    return Row(
        id=row_id(sample.path, sample.locator),
        path=sample.path,
        locator=sample.locator,
        label=sample.label or "",
        split=split,
        group=group,
        sha256=inspection.sha256,
        width=inspection.width,
        height=inspection.height,
        mask=sample.mask or "",
        subgroups=sample.subgroups or "",
    )


def add_left_out(report: AuditReport, found: AdapterResult) -> None:
    """List in the audit what the adapter left out before any image was read."""
    report.left_out = [asdict(e) for e in found.left_out]
    report.problems += [
        Problem("left-out", e.what, f"{e.count}: {e.reason}") for e in found.left_out
    ]


def sample_key(path: str, locator: str = "") -> str:
    """What names a sample in every copy of its dataset: the file name (plus where inside a
    container file), not the folders above it, which differ between releases and layouts."""
    name = PurePosixPath(path).name
    return f"{name}#{locator}" if locator else name


def merge_groups(samples: list[Sample], clusters: list[list[int]]) -> list[str]:
    """Union the adapter's groups with duplicate clusters; name each group by its smallest
    member name (an adapter group, else a sample's ``sample_key``). The name is the key that
    places the group (``group_split``), so a group keeps its split in any copy that holds it."""
    components = DisjointSet(range(len(samples)))
    first: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.group:
            components.merge(i, first.setdefault(s.group, i))
    for cluster in clusters:
        for i in cluster[1:]:
            components.merge(i, cluster[0])
    names: dict[int, str] = {}
    for i, s in enumerate(samples):
        name = s.group or sample_key(s.path, s.locator)
        r = components[i]
        names[r] = min(names.get(r, name), name)
    return [names[components[i]] for i in range(len(samples))]


def assign_splits(
    samples: list[Sample], groups: list[str], keep: list[int], ratios: dict[str, float], seed: int
) -> tuple[list[str], str]:
    """Official splits where the dataset has them, else a seeded, group-aware split that is
    canonical per group (``group_split``)."""
    official = [samples[i].split for i in keep]
    labels = [samples[i].label or "" for i in keep]
    kept_groups = [groups[i] for i in keep]
    out = [""] * len(samples)
    if all(official):
        chosen = [s or "" for s in official]
        source = "official"
        if "val" not in chosen and ratios["val"] > 0:
            chosen = carve_validation(labels, kept_groups, chosen, _val_share(ratios), seed)
            source = "official+carved-val"
    elif any(official):
        raise DataError(
            "some images have an official split and others none; give every image a split or none"
        )
    else:
        chosen, source = group_split(labels, kept_groups, ratios, seed), "seeded"
    for i, s in zip(keep, chosen, strict=True):
        out[i] = s
    return out, source


def audit_manifest(
    manifest_path: str | Path,
    root: str | Path,
    near_bits: int | None = None,
    workers: int = 4,
    progress: Progress | None = None,
    phash_bits: int | None = None,
) -> AuditReport:
    """Audit an existing manifest against the files under ``root``: broken or changed files,
    duplicates (also across splits), label conflicts, masks, borders, sizes, empty classes."""
    manifest = Manifest.load(manifest_path)
    root = check_root(root)
    bits = (
        near_bits
        if near_bits is not None
        else (manifest.meta.near_duplicate_bits or DEFAULT_NEAR_BITS)
    )
    if phash_bits is None:
        phash_bits = manifest.meta.near_duplicate_phash_bits
    items = [
        Item(r.key, r.path, r.locator, r.label, r.mask, r.split, r.sha256) for r in manifest.rows
    ]
    inspections = inspect_all(root, items, workers, progress)
    report, _ = build_report(
        items,
        inspections,
        manifest.classes,
        bits,
        DEFAULT_PHASH_BITS if phash_bits is None else phash_bits,
    )
    return report


def _val_share(ratios: dict[str, float]) -> float:
    """The share of an official training split carved into validation: val / (train + val) of
    the recipe's ratios (0.15 / 0.85 by default), whatever the official test share is."""
    return ratios["val"] / max(ratios["train"] + ratios["val"], 1e-9)
