"""Official splits that leak: the clean test subset, the leak policy, and a duplicate-aware resplit.

A dataset that ships an official split (Brain Tumor MRI Training/Testing, MedMNIST, ISIC 2018)
can hold the same image, a near copy of it, or another image of the same lesion / patient in
both train and test. The audit finds these as duplicate clusters; ``prepare`` merges them with
the adapter's lesion / patient groups into the manifest's ``group`` column. An official test
image whose group (or audit cluster) also has a member in train or val *leaks*; the others form
the **clean test subset**. Only the manifest's groups and splits (and the audit's clusters)
decide this: no test label, image or prediction chooses anything.

``data.leaks`` in a recipe says what happens to the leaking test images:

- ``keep`` (default): evaluate on the official test split and on the clean subset, side by
  side, with the difference;
- ``drop``: evaluate on the clean subset only;
- ``resplit``: ignore the official split and make a seeded group-aware one, so that no
  duplicate cluster or lesion / patient group straddles two splits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from scipy.cluster.hierarchy import DisjointSet

from medtl.data.manifest import Manifest, Row
from medtl.data.split import check_ratios, group_split
from medtl.errors import DataError

LeakPolicy = Literal["keep", "drop", "resplit"]
LEAK_POLICIES: tuple[str, ...] = ("keep", "drop", "resplit")
OFFICIAL_SOURCES = ("official", "official+carved-val")
RESPLIT_SOURCE = "resplit"


@dataclass(frozen=True)
class SplitLeaks:
    """Which official test rows share a duplicate cluster or a lesion / patient group with
    train or val. ``leaking`` holds manifest row ids; ``n_groups`` counts the shared groups."""

    split_source: str
    n_test: int
    leaking: frozenset[str]
    n_groups: int

    @property
    def official(self) -> bool:
        """Whether the manifest keeps a dataset's official test split."""
        return self.split_source in OFFICIAL_SOURCES

    @property
    def n_clean(self) -> int:
        return self.n_test - len(self.leaking)

    def is_clean(self, ids: Sequence[str]) -> list[bool]:
        """For each row id: ``True`` when it is not a leaking test image."""
        return [i not in self.leaking for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "split_source": self.split_source,
            "n_official": self.n_test,
            "n_leaking": len(self.leaking),
            "n_clean": self.n_clean,
            "n_shared_groups": self.n_groups,
            "leaking_ids": sorted(self.leaking),
        }


def audit_clusters(audit: dict[str, Any]) -> list[list[str]]:
    """The exact- and near-duplicate clusters of an audit JSON, as lists of sample keys."""
    exact = [list(c) for c in audit.get("exact_duplicates") or []]
    near = [list(c.get("members") or []) for c in audit.get("near_duplicates") or []]
    return [c for c in (*exact, *near) if len(c) > 1]


def read_audit_clusters(manifest_path: str | Path) -> list[list[str]]:
    """The clusters of the audit JSON that ``prepare`` wrote beside the manifest; ``[]`` when
    there is none (the manifest's groups already hold the clusters found when it was made)."""
    from medtl.data.prepare import audit_path_for

    path = audit_path_for(manifest_path)
    if not path.is_file():
        return []
    try:
        return audit_clusters(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise DataError(f"audit {path} is not valid ({exc}); run 'medtl audit' again") from None


def merged_groups(rows: Sequence[Row], clusters: Iterable[Sequence[str]] = ()) -> list[str]:
    """One group name per row: the manifest's groups united with duplicate ``clusters`` (sample
    keys; members not in the manifest are ignored). A group is named by its smallest member."""
    components = DisjointSet(range(len(rows)))
    first: dict[str, int] = {}
    index = {r.key: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        components.merge(i, first.setdefault(r.group, i))
    for cluster in clusters:
        members = [index[k] for k in cluster if k in index]
        for i in members[1:]:
            components.merge(i, members[0])
    names: dict[int, str] = {}
    for i, r in enumerate(rows):
        root = components[i]
        names[root] = min(names.get(root, r.group), r.group)
    return [names[components[i]] for i in range(len(rows))]


def find_test_leaks(manifest: Manifest, clusters: Iterable[Sequence[str]] = ()) -> SplitLeaks:
    """Test rows whose group (with ``clusters`` merged in) has a member in train or val."""
    groups = merged_groups(manifest.rows, clusters)
    outside = {g for g, r in zip(groups, manifest.rows, strict=True) if r.split != "test"}
    leaking = {
        r.id
        for g, r in zip(groups, manifest.rows, strict=True)
        if r.split == "test" and g in outside
    }
    shared = {
        g for g, r in zip(groups, manifest.rows, strict=True) if r.split == "test" and g in outside
    }
    n_test = sum(r.split == "test" for r in manifest.rows)
    return SplitLeaks(manifest.meta.split_source, n_test, frozenset(leaking), len(shared))


def resplit(
    manifest: Manifest,
    ratios: dict[str, float],
    seed: int,
    clusters: Iterable[Sequence[str]] = (),
) -> Manifest:
    """The manifest with its official split replaced by a seeded, stratified, group-aware one
    (``split_source`` ``resplit``): no duplicate cluster or lesion / patient group straddles
    two splits. Rows, groups (with ``clusters`` merged in) and hashes are kept."""
    groups = merged_groups(manifest.rows, clusters)
    splits = group_split([r.label for r in manifest.rows], groups, check_ratios(ratios), seed)
    rows = [
        replace(r, split=s, group=g) for r, s, g in zip(manifest.rows, splits, groups, strict=True)
    ]
    meta = replace(
        manifest.meta, split_source=RESPLIT_SOURCE, split_seed=seed, split_ratios=dict(ratios)
    )
    return Manifest(rows, meta)


# -- what the audit finds in an official split ----------------------------------------------------
def split_leak_counts(manifest: Manifest, audit: dict[str, Any]) -> dict[str, int]:
    """Counts for ``docs/datasets.md``: duplicate clusters (exact, near) in all and straddling
    two splits, groups shared by test and train / val, and the leaking test images."""
    split_of = {r.key: r.split for r in manifest.rows}

    def straddles(members: Sequence[str]) -> bool:
        return len({split_of[m] for m in members if m in split_of}) > 1

    exact = [list(c) for c in audit.get("exact_duplicates") or []]
    near = [list(c.get("members") or []) for c in audit.get("near_duplicates") or []]
    leaks = find_test_leaks(manifest, audit_clusters(audit))
    return {
        "images": len(manifest.rows),
        "test_images": leaks.n_test,
        "exact_clusters": len(exact),
        "exact_clusters_across_splits": sum(straddles(c) for c in exact),
        "near_clusters": len(near),
        "near_clusters_across_splits": sum(straddles(c) for c in near),
        "groups_shared_with_test": leaks.n_groups,
        "leaking_test_images": len(leaks.leaking),
        "clean_test_images": leaks.n_clean,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medtl.data.leaks MANIFEST.csv...``: the counts of each manifest's audit."""
    from medtl.data.prepare import audit_path_for

    for path in argv if argv is not None else sys.argv[1:]:
        audit_file = audit_path_for(path)
        if not audit_file.is_file():
            raise DataError(f"{audit_file} does not exist; run 'medtl audit {path}' first")
        counts = split_leak_counts(
            Manifest.load(path), json.loads(audit_file.read_text(encoding="utf-8"))
        )
        print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
