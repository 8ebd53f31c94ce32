"""Leakage-safe splits: stratified, group-aware and deterministic from a seed.

scikit-learn has group-aware splitters (``GroupShuffleSplit``, ``StratifiedGroupKFold``) but
none that splits into train/val/test by ratio while stratifying, so this greedy assignment is
written here: groups are shuffled by the seed, taken largest first, and each goes to the split
whose per-class quota it fills best. A group never straddles two splits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

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
    """Assign each sample a split name so that every group lands in exactly one split.

    Args:
        labels: one label per sample ("" for unlabelled); stratification is on these.
        groups: one group id per sample.
        ratios: target share of samples per split (normalised).
        seed: the only source of randomness: the same inputs give the same split.
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    ratios = check_ratios(ratios)
    names = [s for s in ("train", "val", "test") if ratios[s] > 0]
    classes = sorted(set(labels))
    cls_index = {c: i for i, c in enumerate(classes)}
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    if len(members) < len(names):
        raise DataError(
            f"{len(members)} group(s) cannot fill {len(names)} splits; add data or set a split "
            "ratio to 0"
        )
    counts = {
        g: np.bincount([cls_index[labels[i]] for i in idx], minlength=len(classes))
        for g, idx in members.items()
    }
    rng = np.random.default_rng(seed)
    order = sorted(members)  # deterministic base order, then a seeded shuffle
    order = [order[i] for i in rng.permutation(len(order))]
    order.sort(key=lambda g: -int(counts[g].sum()))  # stable: ties keep the shuffled order
    total = np.bincount([cls_index[lab] for lab in labels], minlength=len(classes)).astype(float)
    target = {s: ratios[s] * total for s in names}
    filled = {s: np.zeros(len(classes)) for s in names}
    assigned: dict[str, str] = {}
    for g in order:
        c = counts[g]
        # Fill empty splits first so that none ends up empty, then follow the quotas.
        empty = [s for s in names if filled[s].sum() == 0]
        if empty and len(order) - len(assigned) <= len(empty):
            best = empty[0]
        else:
            best = max(names, key=lambda s: _gain(c, filled[s], target[s]))
        filled[best] += c
        assigned[g] = best
    return [assigned[g] for g in groups]


def _gain(counts: np.ndarray, filled: np.ndarray, target: np.ndarray) -> float:
    """How much of a split's unfilled per-class quota a group would fill (relative)."""
    need = (target - filled) / np.maximum(target, 1.0)
    overall = (target.sum() - filled.sum()) / max(target.sum(), 1.0)
    return float((need * counts).sum() / max(counts.sum(), 1) + overall)


def carve_validation(
    labels: Sequence[str],
    groups: Sequence[str],
    official: Sequence[str],
    val_ratio: float,
    seed: int,
) -> list[str]:
    """Keep an official train/test split and carve a group-aware validation set from train."""
    out = list(official)
    train_idx = [i for i, s in enumerate(official) if s == "train"]
    if not train_idx:
        raise DataError("the official split has no training images to carve validation from")
    share = val_ratio / max(1e-9, 1 - (official.count("test") / len(official)))
    share = min(max(share, 0.0), 0.9)
    sub = group_split(
        [labels[i] for i in train_idx],
        [groups[i] for i in train_idx],
        {"train": 1 - share, "val": share, "test": 0.0},
        seed,
    )
    for i, s in zip(train_idx, sub, strict=True):
        out[i] = s
    return out
