"""Leakage-safe splits: group-aware, canonical per group and deterministic from a seed.

A group (duplicate cluster, lesion, patient, volume) is placed by a stable hash of the seed and
its key alone, never by the other groups present, so a sample of a dataset and the whole public
release put every group they share in the same split. The price is that ratios and class balance
hold in expectation rather than exactly (a split's share varies by about
sqrt(r(1-r)/groups): +-2 points on BUSI's 600 groups). A group never straddles two splits.
scikit-learn's group splitters (``GroupShuffleSplit``, ``StratifiedGroupKFold``) shuffle the
groups present together, so their assignment changes when groups are added; hence this code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from medtl.errors import ConfigError, DataError

DEFAULT_RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


RATIO_TOLERANCE = 1e-3  # shares written with three decimals (0.333, 0.333, 0.334) sum to 1


def check_ratios(ratios: dict[str, float]) -> dict[str, float]:
    """Validate ``{"train": .7, "val": .15, "test": .15}``-style ratios: known splits,
    non-negative, summing to 1 (a missing split is 0). Shares that do not sum to 1 are refused,
    never rescaled: a typo (0.7, 0.15, 0.51) must not quietly become another split."""
    unknown = set(ratios) - {"train", "val", "test"}
    if unknown:
        raise ConfigError(
            f"split ratios name unknown split(s) {sorted(unknown)}; use train, val, test"
        )
    if any(v < 0 for v in ratios.values()) or sum(ratios.values()) <= 0:
        raise ConfigError(f"split ratios {ratios} must be non-negative and sum to more than 0")
    total = sum(ratios.values())
    if abs(total - 1.0) > RATIO_TOLERANCE:
        shares = ", ".join(f"{k} {v:g}" for k, v in ratios.items())
        raise ConfigError(
            f"split ratios ({shares}) sum to {total:g}, not 1; give shares that sum to 1, "
            "e.g. train 0.7, val 0.15, test 0.15"
        )
    return {k: ratios.get(k, 0.0) / total for k in ("train", "val", "test")}


def group_split(
    labels: Sequence[str],
    groups: Sequence[str],
    ratios: dict[str, float],
    seed: int,
) -> list[str]:
    """Assign each sample a split so that every group lands in exactly one split, canonically.

    A group's split depends only on the seed and its key (``group_position``): the unit
    interval is cut into the splits' shares and the group goes where its position falls.
    Should chance leave a split with a positive ratio empty (a handful of groups), the group
    whose position lies nearest that split's interval moves there.

    Args:
        labels: one label per sample ("" for unlabelled); checked for length only, since a
            placement that looked at the other groups' classes would not be canonical.
        groups: one group key per sample, the same in every copy of the dataset (file name,
            lesion id, patient pseudonym).
        ratios: target share of samples per split (normalised).
        seed: the only source of randomness: the same inputs give the same split.
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    ratios = check_ratios(ratios)
    names = [s for s in ("train", "val", "test") if ratios[s] > 0]
    keys = sorted(set(groups))
    if len(keys) < len(names):
        raise DataError(
            f"{len(keys)} group(s) cannot fill {len(names)} splits; add data or set a split "
            "ratio to 0"
        )
    bounds = _intervals(names, ratios)
    position = {g: group_position(g, seed) for g in keys}
    assigned = {g: next(s for s in names if position[g] < bounds[s][1]) for g in keys}
    _fill_empty(assigned, position, bounds)
    return [assigned[g] for g in groups]


def group_position(key: str, seed: int) -> float:
    """A stable point in [0, 1) for a group key: the first 8 bytes of sha256(seed, key)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _intervals(names: list[str], ratios: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Consecutive sub-intervals of [0, 1) with the splits' shares; the last one ends past 1."""
    out, start = {}, 0.0
    for name in names:
        out[name] = (start, start + ratios[name])
        start += ratios[name]
    last = names[-1]
    out[last] = (out[last][0], 2.0)  # floating-point sums must not leave a gap below 1
    return out


def _fill_empty(
    assigned: dict[str, str],
    position: dict[str, float],
    bounds: dict[str, tuple[float, float]],
) -> None:
    """Move into each empty split the group nearest its interval, from a split that keeps one."""
    for name, (lo, hi) in bounds.items():
        sizes = Counter(assigned.values())
        if sizes[name]:
            continue
        movable = [g for g, s in assigned.items() if sizes[s] > 1]
        nearest = min(movable, key=lambda g: (max(lo - position[g], position[g] - hi, 0.0), g))
        assigned[nearest] = name


def carve_validation(
    labels: Sequence[str],
    groups: Sequence[str],
    official: Sequence[str],
    val_ratio: float,
    seed: int,
) -> list[str]:
    """Keep an official train/test split and carve a group-aware validation set from train.

    A group with a member in the official test split (a duplicate cluster or a patient /
    lesion that straddles the official split) stays whole in train: validation never takes a
    member of a cluster that touches test, so nothing chosen on validation has seen a copy of
    a test image.

    ``val_ratio`` is the share of the official training groups that become validation. It is a
    constant of the recipe, not of the data (no rescaling by the test share or by how many groups
    touch test), so that, with :func:`group_split`'s hash rule, a sample and the full release carve
    every group they share the same way.
    """
    out = list(official)
    train_idx = [i for i, s in enumerate(official) if s == "train"]
    if not train_idx:
        raise DataError("the official split has no training images to carve validation from")
    touching = {groups[i] for i, s in enumerate(official) if s == "test"}
    free = [i for i in train_idx if groups[i] not in touching]
    if not free:
        raise DataError(
            "every training image shares a duplicate cluster or group with a test image, so no "
            "validation split can be carved; set data.leaks=resplit or a val ratio of 0"
        )
    share = min(max(val_ratio, 0.0), 0.9)
    sub = group_split(
        [labels[i] for i in free],
        [groups[i] for i in free],
        {"train": 1 - share, "val": share, "test": 0.0},
        seed,
    )
    for i, s in zip(free, sub, strict=True):
        out[i] = s
    return out
