"""Official test split vs clean test subset: one model's figures on both, and the difference.

The clean subset (:mod:`medtl.data.leaks`) leaves out the official test images that share a
duplicate cluster or a lesion / patient group with train or val. Both sets are measured with
the same calibrator and the same validation-chosen thresholds; the difference (official -
clean) of the headline figures gets a paired interval from one stratified group bootstrap of
the official test set, in which the clean figures are those of the resample's clean members.
A positive difference is what the leak adds to the official figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medtl.calibrate import Calibrator
from medtl.data.leaks import SplitLeaks
from medtl.errors import DataError
from medtl.metrics import (
    bootstrap_entry,
    evaluate_predictions,
    group_bootstrap_weights,
    rates_from_confusion,
    weighted_auroc_auprc,
    weighted_confusion,
)
from medtl.predictions import Predictions

HEADLINE = ("accuracy", "balanced_accuracy", "macro_auroc")
_CHUNK = 250  # resamples per block: bounds memory at 250 x N floats per array


def subset(pred: Predictions, keep: Sequence[bool]) -> Predictions:
    """The rows of ``pred`` where ``keep`` is true, in order."""
    mask = np.asarray(keep, dtype=bool)
    return Predictions(
        [i for i, k in zip(pred.ids, mask, strict=True) if k],
        [g for g, k in zip(pred.groups, mask, strict=True) if k],
        pred.labels[mask],
        pred.logits[mask],
        list(pred.classes),
        pred.split,
        pred.model,
        pred.manifest_sha256,
        dict(pred.extra),
    )


def headline_resamples(
    probs: np.ndarray, labels: np.ndarray, defined: np.ndarray, w: np.ndarray
) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro AUROC ``[b]`` for sample counts ``w: [b, N]``.

    Balanced accuracy averages the sensitivity of the classes present in the resample; macro
    AUROC averages the classes in ``defined`` ``[K]`` and is undefined (NaN) when one of them
    is. Same definitions as :func:`medtl.metrics.evaluate_predictions`.
    """
    k = probs.shape[1]
    cm = weighted_confusion(labels, probs.argmax(axis=1), k, w)
    sens = rates_from_confusion(cm)["sensitivity"]
    auroc = np.stack([weighted_auroc_auprc(probs[:, c], labels == c, w)[0] for c in range(k)], 1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty resample: NaN, counted
        return {
            "accuracy": np.trace(cm, axis1=1, axis2=2) / cm.sum(axis=(1, 2)),
            "balanced_accuracy": np.nanmean(sens, axis=1),
            "macro_auroc": auroc[:, defined].mean(axis=1) if defined.any() else np.nan * w[:, 0],
        }


def _defined_classes(labels: np.ndarray, k: int) -> np.ndarray:
    present = np.bincount(labels, minlength=k)
    return (present > 0) & (present < len(labels))


def difference_entries(
    official: dict[str, Any],
    clean: dict[str, Any],
    test: Predictions,
    clean_mask: Sequence[bool],
    calibrator: Calibrator | float,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """``{figure: {value, ci_low, ci_high, ...}}``: official - clean for :data:`HEADLINE`.

    ``official`` and ``clean`` are the two ``evaluate_predictions`` results; the interval
    comes from a paired stratified group bootstrap of ``test`` (the official split).
    """
    keep = test.labels >= 0
    labels = test.labels[keep]
    probs = test.probs(calibrator)[keep]
    mask = np.asarray(clean_mask, dtype=bool)[keep]
    groups = [g for g, k in zip(test.groups, keep, strict=True) if k]
    k = probs.shape[1]
    d_all, d_clean = _defined_classes(labels, k), _defined_classes(labels[mask], k)
    weights = group_bootstrap_weights(groups, labels, n_boot, seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in HEADLINE}
    for start in range(0, n_boot, _CHUNK):
        w = weights[start : start + _CHUNK]
        a = headline_resamples(probs, labels, d_all, w)
        b = headline_resamples(probs, labels, d_clean, w * mask)
        for name in HEADLINE:
            parts[name].append(a[name] - b[name])
    out = {}
    for name in HEADLINE:
        value = _value(official, name) - _value(clean, name)
        out[name] = {**bootstrap_entry(value, np.concatenate(parts[name])), "paired": True}
    return out


def _value(metrics: dict[str, Any], name: str) -> float:
    entry = (metrics.get("overall") or {}).get(name) or {}
    value = entry.get("value")
    return float(value) if isinstance(value, int | float) else float("nan")


def evaluate_with_leaks(
    test: Predictions,
    val: Predictions | None,
    leaks: SplitLeaks | None,
    policy: str,
    positive: str | None,
    n_boot: int,
    seed: int,
    calibrator: Calibrator | float,
) -> tuple[Predictions, dict[str, Any], dict[str, Any] | None]:
    """``(predictions reported, metrics, leaks record)`` of one model on a test split.

    Without an official split (``leaks`` None or a seeded split) this is plain
    ``evaluate_predictions`` and no record. ``keep``: official figures, plus the clean
    subset's figures and the difference in the record. ``drop``: the clean subset only.
    A ``resplit`` manifest has no official split left: its record says so.
    """

    def metrics_of(pred: Predictions) -> dict[str, Any]:
        return evaluate_predictions(pred, val, positive, n_boot, seed, calibrator)

    if leaks is None or not (leaks.official or leaks.split_source == "resplit"):
        return test, metrics_of(test), None
    record: dict[str, Any] = {"policy": policy, **leaks.to_dict()}
    mask = leaks.is_clean(test.ids)
    if leaks.split_source == "resplit":
        record.update(evaluated_on="resplit", note=RESPLIT_NOTE)
        return test, metrics_of(test), record
    if policy == "drop":
        if not any(mask):
            raise DataError(
                f"every official test image of {test.model or 'this model'}'s data shares a "
                "duplicate cluster or group with train / val: nothing is left to evaluate; "
                "set data.leaks=resplit"
            )
        record.update(evaluated_on="clean", note=_drop_note(leaks))
        return subset(test, mask), metrics_of(subset(test, mask)), record
    official = metrics_of(test)
    record.update(evaluated_on="official and clean", note=_keep_note(leaks))
    if any(mask):
        clean = metrics_of(subset(test, mask))
        record["clean_metrics"] = clean
        record["difference"] = difference_entries(
            official, clean, test, mask, calibrator, n_boot, seed
        )
    else:
        record["clean_metrics"] = None
        record["note"] += " No official test image is clean: no clean figures."
    return test, official, record


RESPLIT_NOTE = (
    "data.leaks=resplit: the dataset's official split was ignored; this test split comes from "
    "a seeded group-aware split in which no duplicate cluster or lesion / patient group "
    "straddles two splits."
)


def _keep_note(leaks: SplitLeaks) -> str:
    if not leaks.leaking:
        return (
            f"None of the {leaks.n_test} official test images shares an exact or near-duplicate "
            "cluster or a lesion / patient group with train or val: the clean subset is the "
            "whole official test split."
        )
    return (
        f"{len(leaks.leaking)} of {leaks.n_test} official test images share an exact or "
        f"near-duplicate cluster or a lesion / patient group ({leaks.n_groups} in all) with "
        f"train or val; the clean subset ({leaks.n_clean} images) leaves them out."
    )


def _drop_note(leaks: SplitLeaks) -> str:
    return (
        f"data.leaks=drop: figures on the clean subset only ({leaks.n_clean} of {leaks.n_test} "
        f"official test images); {len(leaks.leaking)} images sharing a duplicate cluster or "
        "group with train or val were left out."
    )
