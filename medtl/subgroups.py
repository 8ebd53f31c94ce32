"""Per-subgroup figures: does the model work equally for each sex, age band, body site, ...?

A manifest's optional ``subgroups`` column (``age=50-59;sex=female``) names coarse subgroups of
each image (HAM10000's metadata; never identifiers). For every subgroup column this gives each
subgroup's accuracy, balanced accuracy and macro AUROC with their intervals
(:func:`medtl.metrics.classification_metrics`: stratified group bootstrap within the subgroup),
and flags the largest gap in balanced accuracy between two subgroups of at least
:data:`MIN_N` cases, with a percentile interval of the difference from independent group
bootstraps of the two subgroups (they share no case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medtl.data.manifest import Manifest, parse_subgroups
from medtl.metrics import ALPHA, bootstrap_entry, bootstrap_samples, classification_metrics
from medtl.predictions import Predictions

GAP_METRIC = "balanced_accuracy"
SHOWN = ("accuracy", "balanced_accuracy", "macro_auroc")
MIN_N = 10
UNKNOWN = "unknown"


def manifest_subgroups(manifest: Manifest, ids: Sequence[str]) -> dict[str, list[str]]:
    """``{column: [value of each id]}`` for the subgroup columns of ``manifest`` (``unknown``
    where a row lacks one); empty when the manifest has none."""
    by_id = {r.id: parse_subgroups(r.subgroups) for r in manifest.rows}
    columns = sorted({c for i in ids for c in by_id.get(i, {})})
    return {c: [by_id.get(i, {}).get(c, UNKNOWN) for i in ids] for c in columns}


def subgroup_report(
    pred: Predictions,
    probs: np.ndarray,
    subgroups: dict[str, list[str]],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """``{column: {"metric", "groups": {value: {"n", accuracy, ...}}, "largest_gap"}}`` for the
    labelled rows of ``pred`` with calibrated ``probs: [N, K]``."""
    keep = pred.labels >= 0
    labels, probs = pred.labels[keep], probs[keep]
    groups = [g for g, k in zip(pred.groups, keep, strict=True) if k]
    out = {}
    for column, values in subgroups.items():
        kept = np.asarray(values, dtype=object)[keep]
        table = {}
        for value in sorted(set(kept)):
            m = kept == value
            sub_groups = [g for g, k in zip(groups, m, strict=True) if k]
            figures = classification_metrics(
                probs[m], labels[m], sub_groups, pred.classes, n_boot, seed, alpha
            )["overall"]
            table[str(value)] = {"n": int(m.sum()), **{k: figures[k] for k in SHOWN}}
        gap = largest_gap(probs, labels, groups, kept, table, n_boot, seed, alpha)
        out[column] = {"metric": GAP_METRIC, "min_n": MIN_N, "groups": table, "largest_gap": gap}
    return out


def largest_gap(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    values: np.ndarray,
    table: dict[str, dict[str, Any]],
    n_boot: int,
    seed: int,
    alpha: float,
) -> dict[str, Any] | None:
    """The highest minus the lowest subgroup's :data:`GAP_METRIC` among known subgroups of at
    least :data:`MIN_N` cases, with its bootstrap interval; None when fewer than two qualify."""
    usable = {
        v: r[GAP_METRIC]["value"]
        for v, r in table.items()
        if v != UNKNOWN and r["n"] >= MIN_N and math.isfinite(r[GAP_METRIC]["value"])
    }
    if len(usable) < 2:
        return None
    high, low = max(usable, key=usable.__getitem__), min(usable, key=usable.__getitem__)
    samples = []
    for offset, value in enumerate((high, low)):
        m = values == value
        sub_groups = [g for g, k in zip(groups, m, strict=True) if k]
        _, boot = bootstrap_samples(
            probs[m], labels[m], sub_groups, GAP_METRIC, n_boot, seed + offset
        )
        samples.append(boot)
    entry = bootstrap_entry(usable[high] - usable[low], samples[0] - samples[1], alpha)
    return {"high": high, "low": low, **entry}


def entry_subgroups(
    manifest: Manifest, pred: Predictions, probs: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any] | None:
    """The ``subgroups`` record of an evaluation entry; None when the manifest has none for
    these rows."""
    columns = manifest_subgroups(manifest, pred.ids)
    return subgroup_report(pred, probs, columns, n_boot, seed) if columns else None
