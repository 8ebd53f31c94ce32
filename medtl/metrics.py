"""Clinical metrics with 95% confidence intervals, operating points, DeLong tests, ensembles.

Every figure carries an interval: Wilson for proportions (sensitivity, specificity, PPV, NPV,
accuracy, prevalence), a group bootstrap (whole patients / lesions / duplicate clusters are
resampled, stratified by the group's majority class) for everything else. Point values come
from scikit-learn; the bootstrap uses a vectorised weighted form of the same definitions
(``sklearn`` costs about a millisecond a call, too slow for 1000 resamples x K classes), in
:mod:`medtl.bootstrap`, whose public names this module re-exports.

The test split never chooses anything: thresholds are chosen on validation
(:func:`choose_thresholds`) and applied unchanged to test (:func:`apply_threshold`); the
temperature is fitted on validation (:mod:`medtl.calibrate`) and passed in. Definitions are in
``docs/metrics.md``.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import special, stats
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from medtl import calibrate
from medtl.bootstrap import AVERAGED as AVERAGED
from medtl.bootstrap import RATES as RATES
from medtl.bootstrap import class_averages, group_bootstrap, resample_metrics
from medtl.bootstrap import group_bootstrap_weights as group_bootstrap_weights
from medtl.bootstrap import group_strata as group_strata
from medtl.bootstrap import kappa_from_confusion as kappa_from_confusion
from medtl.bootstrap import rates_from_confusion as rates_from_confusion
from medtl.bootstrap import weighted_auroc_auprc as weighted_auroc_auprc
from medtl.bootstrap import weighted_confusion as weighted_confusion
from medtl.errors import ConfigError, DataError
from medtl.predictions import Predictions

ALPHA = 0.05
BOOTSTRAP = "group_bootstrap_percentile"
Entry = dict[str, Any]


# -- intervals ------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for ``k`` successes in ``n`` trials.

    ``n = 0`` gives ``(nan, nan)``. Computed by SciPy's ``binomtest(...).proportion_ci``.
    """
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def proportion_entry(k: int, n: int, alpha: float = ALPHA) -> Entry:
    """``{"value": k / n, "ci_low", "ci_high", "method": "wilson", "k", "n"}`` (NaN when n = 0)."""
    low, high = wilson_interval(k, n, alpha)
    value = k / n if n else math.nan
    return {"value": value, "ci_low": low, "ci_high": high, "method": "wilson", "k": k, "n": n}


def rate_entries(tp: int, fp: int, tn: int, fn: int, alpha: float = ALPHA) -> dict[str, Entry]:
    """Sensitivity, specificity, PPV and NPV of one-vs-rest counts, each with a Wilson interval."""
    pairs = ((tp, tp + fn), (tn, tn + fp), (tp, tp + fp), (tn, tn + fn))
    return {key: proportion_entry(k, m, alpha) for key, (k, m) in zip(RATES, pairs, strict=True)}


def bootstrap_entry(value: float, samples: np.ndarray, alpha: float = ALPHA) -> Entry:
    """Percentile interval of the defined (finite) bootstrap ``samples: [B]`` around ``value``."""
    ok = np.isfinite(samples)
    low = high = math.nan
    if ok.any() and np.isfinite(value):
        low, high = (float(v) for v in np.percentile(samples[ok], [50 * alpha, 100 - 50 * alpha]))
    return {
        "value": float(value),
        "ci_low": low,
        "ci_high": high,
        "method": BOOTSTRAP,
        "n_boot": len(samples),
        "n_undefined": int((~ok).sum()),
    }


# -- point estimates (scikit-learn) -------------------------------------------------------------
def _curve_points(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class one-vs-rest AUROC and AUPRC ``[K]`` from scikit-learn; NaN where undefined."""
    auroc, auprc = np.full(probs.shape[1], np.nan), np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        y = labels == c
        if y.any():
            auprc[c] = average_precision_score(y, probs[:, c])
            if not y.all():
                auroc[c] = roc_auc_score(y, probs[:, c])
    return auroc, auprc


def _point_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=np.arange(k))
    rates = rates_from_confusion(cm.astype(np.float64))
    auroc, auprc = _curve_points(probs, labels)
    per_class = {**{n: rates[n] for n in (*RATES, "f1")}, "auroc": auroc, "auprc": auprc}
    defined = {n: np.isfinite(v) for n, v in per_class.items()}
    one = {n: v[None] for n, v in per_class.items()}
    overall = {
        n: float(v[0]) for n, v in class_averages(one, rates["support"][None], defined).items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class inputs: sklearn warns, we report NaN + note
        overall["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
        overall["cohen_kappa"] = float(cohen_kappa_score(labels, pred, labels=np.arange(k)))
    return {
        "cm": cm,
        "rates": rates,
        "per_class": per_class,
        "overall": overall,
        "defined": defined,
    }


# -- the discrimination report -----------------------------------------------------------------------
def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Discrimination figures of ``probs: [N, K]`` (argmax decisions) with 95% intervals.

    Returns ``{"overall", "per_class", "confusion_matrix", "notes"}``. Unlabelled rows
    (label -1) are dropped; ``groups`` defaults to one group per sample.
    """
    probs, labels, _ = calibrate.labelled(probs, labels, "probabilities")
    names = list(classes) if classes is not None else [str(c) for c in range(probs.shape[1])]
    groups = [str(i) for i in range(len(labels))] if groups is None else list(groups)
    if len(names) != probs.shape[1] or len(groups) != len(labels):
        raise DataError(
            f"{probs.shape[1]} probability columns, {len(names)} classes {names}, "
            f"{len(groups)} groups for {len(labels)} labelled rows do not match"
        )
    point = _point_metrics(probs, labels)
    boot = group_bootstrap(
        lambda w: resample_metrics(probs, labels, point["defined"], w),
        groups,
        labels,
        n_boot,
        seed,
    )
    return {
        "overall": _overall_entries(point, boot, labels, alpha),
        "per_class": _per_class_entries(point, boot, names, alpha),
        "confusion_matrix": _confusion_entry(point["cm"], names),
        "notes": _class_notes(point, names)
        + _bootstrap_notes(boot, n_boot, len(set(groups)), len(labels)),
    }


def _overall_entries(
    point: dict[str, Any], boot: dict[str, np.ndarray], labels: np.ndarray, alpha: float
) -> dict[str, Entry]:
    correct = int(np.trace(point["cm"]))
    out = {"accuracy": proportion_entry(correct, len(labels), alpha)}
    for name, value in point["overall"].items():
        out[name] = bootstrap_entry(value, boot[name], alpha)
    return out


def _per_class_entries(
    point: dict[str, Any], boot: dict[str, np.ndarray], names: list[str], alpha: float
) -> dict[str, dict[str, Any]]:
    r, n = point["rates"], int(point["cm"].sum())
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        tp, fp, tn, fn = (int(r[key][c]) for key in ("tp", "fp", "tn", "fn"))
        row: dict[str, Any] = {"support": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        row["prevalence"] = proportion_entry(tp + fn, n, alpha)
        row.update(rate_entries(tp, fp, tn, fn, alpha))
        for key in ("f1", "auroc", "auprc"):
            row[key] = bootstrap_entry(point["per_class"][key][c], boot[key][:, c], alpha)
        out[name] = row
    return out


def _confusion_entry(cm: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Counts and row-normalised matrix (rows = true class; a class without samples is NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = cm / cm.sum(axis=1, keepdims=True)
    return {"classes": names, "counts": cm.tolist(), "row_normalised": rows.tolist()}


def _class_notes(point: dict[str, Any], names: list[str]) -> list[str]:
    support, called = point["rates"]["support"], point["cm"].sum(axis=0)
    present = [n for n, s in zip(names, support, strict=True) if s > 0]
    notes = []
    if len(present) == 1:
        notes.append(
            f"the test split holds only class {present[0]!r}: every AUROC is undefined (NaN), "
            "and so is every figure that needs a second class (e.g. its specificity)"
        )
    for name, s, c in zip(names, support, called, strict=True):
        if s == 0:
            notes.append(
                f"class {name!r} has no test samples: its sensitivity, F1, AUROC and "
                "AUPRC are undefined (NaN); averages exclude it"
            )
        elif c == 0:
            notes.append(f"class {name!r} is never predicted: its PPV is undefined (NaN)")
    return notes


def _partly_undefined(samples: np.ndarray) -> bool:
    """True when some, but not all, resamples of some figure in ``samples: [B, ...]`` are NaN."""
    bad = (~np.isfinite(samples.reshape(len(samples), -1))).sum(axis=0)
    return bool(((bad > 0) & (bad < len(samples))).any())


def _bootstrap_notes(boot: dict[str, np.ndarray], n_boot: int, n_groups: int, n: int) -> list[str]:
    notes = [
        f"bootstrap: {n_boot} resamples of {n_groups} groups ({n} samples), stratified by "
        "each group's majority class; percentile intervals"
    ]
    partial = sorted(k for k, v in boot.items() if _partly_undefined(v))
    if partial:
        notes.append(
            f"some resamples left {', '.join(partial)} undefined (e.g. a class absent "
            "from the resample); they are skipped, see n_undefined"
        )
    if n_groups < n:
        notes.append(
            f"Wilson intervals treat the {n} samples as independent although they form "
            f"{n_groups} groups, so they may be too narrow"
        )
    return notes


# -- DeLong test ----------------------------------------------------------------------------------
def delong_test(
    y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, alpha: float = ALPHA
) -> dict[str, float]:
    """Paired DeLong test of two correlated AUROCs on the same samples (DeLong et al. 1988).

    ``y_true: [N]`` 0/1, ``scores_a, scores_b: [N]``. Uses the fast midrank algorithm of
    Sun & Xu (2014); hand-written because neither SciPy nor scikit-learn provides it. Returns
    auroc_a, auroc_b, difference (a - b), its standard error, ``1 - alpha`` interval, z and the
    two-sided p-value.
    """
    y, s = _delong_inputs(y_true, scores_a, scores_b)
    m, n = int(y.sum()), int((~y).sum())
    pos, neg = s[:, y], s[:, ~y]
    tx, ty = stats.rankdata(pos, axis=1), stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.hstack([pos, neg]), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10, v01 = (tz[:, :m] - tx) / n, 1 - (tz[:, m:] - ty) / m
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[0] - auc[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se < 1e-12:
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = float(special.ndtri(1 - alpha / 2)) * se
    return {
        "auroc_a": float(auc[0]),
        "auroc_b": float(auc[1]),
        "difference": diff,
        "se": se,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "z": z,
        "p_value": p,
        "n_positive": m,
        "n_negative": n,
    }


def _delong_inputs(
    y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.vstack([np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)])
    if s.shape[1] != len(y) or not np.isin(y, (0, 1)).all():
        raise DataError(
            f"DeLong needs 0/1 labels and two score vectors of the same length; "
            f"got {len(y)} labels and scores of shape {s.shape}"
        )
    if not np.isfinite(s).all():
        raise DataError("DeLong scores contain NaN or infinite values")
    y = y.astype(bool)
    if y.sum() < 2 or (~y).sum() < 2:
        raise DataError(
            f"DeLong needs at least 2 positive and 2 negative samples; "
            f"got {int(y.sum())} and {int((~y).sum())}"
        )
    return y, s


def delong_per_class(
    labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """One-vs-rest DeLong comparison of two models for each class (``probs_*: [N, K]``).

    Rows with label -1 are dropped. A class with fewer than 2 positive or negative samples
    gets NaN figures and a ``note``. The p-values are not corrected for multiplicity.
    """
    keep = np.asarray(labels) >= 0
    y, a, b = np.asarray(labels)[keep], np.asarray(probs_a)[keep], np.asarray(probs_b)[keep]
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        try:
            out[name] = delong_test(y == c, a[:, c], b[:, c])
        except DataError as exc:
            out[name] = {"difference": math.nan, "p_value": math.nan, "note": str(exc)}
    return out


# -- operating points --------------------------------------------------------------------------------
def choose_thresholds(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    positive: int,
    targets: Iterable[float] = (0.9, 0.95),
) -> dict[str, float | None]:
    """Operating points for class index ``positive`` chosen on VALIDATION ``val_probs: [N, K]``.

    The score is ``p_positive``; a sample is called positive when ``score >= threshold``.
    ``argmax`` (None) is the plain argmax decision; ``youden`` maximises
    sensitivity + specificity - 1; ``target_sensitivity_0.90`` is the highest threshold whose
    validation sensitivity is >= 0.90. Never call this with test predictions.
    """
    p, y, _ = calibrate.labelled(val_probs, val_labels, "validation probabilities")
    is_pos = y == positive
    if is_pos.all() or not is_pos.any():
        raise DataError(
            f"validation labels hold {'only' if is_pos.all() else 'no'} samples of "
            f"class index {positive}: thresholds cannot be chosen"
        )
    fpr, tpr, thresholds = roc_curve(is_pos, p[:, positive], drop_intermediate=False)
    j = tpr[1:] - fpr[1:]  # index 0 is the "nobody positive" threshold (+inf)
    out: dict[str, float | None] = {"argmax": None, "youden": float(thresholds[1 + np.argmax(j)])}
    for target in targets:
        if not 0 < target <= 1:
            raise ConfigError(f"target sensitivity {target} must be in (0, 1]")
        first = int(np.argmax(tpr >= target - 1e-12))
        out[f"target_sensitivity_{target:.2f}"] = float(thresholds[first])
    return out


def apply_threshold(
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    positive: int,
    threshold: float | None,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV (Wilson intervals) of one fixed operating point.

    ``threshold=None`` applies the argmax decision; otherwise ``p_positive >= threshold``.
    """
    p, y, _ = calibrate.labelled(test_probs, test_labels, "test probabilities")
    called = p.argmax(axis=1) == positive if threshold is None else p[:, positive] >= threshold
    is_pos = y == positive
    tp, fp = int((called & is_pos).sum()), int((called & ~is_pos).sum())
    fn, tn = int((~called & is_pos).sum()), int((~called & ~is_pos).sum())
    out: dict[str, Any] = {"threshold": threshold, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    out["rule"] = "argmax" if threshold is None else "p >= threshold"
    out.update(rate_entries(tp, fp, tn, fn, alpha))
    return out


# -- ensembles -----------------------------------------------------------------------------------
def check_predictions(pred: Predictions) -> None:
    """Raise :class:`DataError` naming the model when its logits hold NaN or infinite values."""
    bad = ~np.isfinite(pred.logits).all(axis=1)
    if bad.any():
        raise DataError(
            f"predictions of model {pred.model or '(unnamed)'!r} on split "
            f"{pred.split!r} contain NaN or infinite logits in {int(bad.sum())} of "
            f"{len(bad)} rows; re-run prediction for this model"
        )


def _aligned(reference: Predictions, other: Predictions) -> np.ndarray:
    """Row order putting ``other`` in ``reference``'s id order; checks classes, split, ids."""
    who = f"model {other.model or '(unnamed)'!r}"
    if other.classes != reference.classes or other.split != reference.split:
        raise DataError(
            f"{who} has classes {other.classes} on split {other.split!r}; expected "
            f"{reference.classes} on {reference.split!r}"
        )
    index = {row_id: i for i, row_id in enumerate(other.ids)}
    if len(index) != len(other.ids) or set(index) != set(reference.ids):
        raise DataError(f"{who} does not predict the same (unique) ids as {reference.model!r}")
    order = np.array([index[row_id] for row_id in reference.ids], dtype=np.int64)
    if not np.array_equal(other.labels[order], reference.labels):
        raise DataError(f"{who} disagrees with {reference.model!r} on the labels of shared ids")
    return order


def ensemble(
    predictions: Sequence[Predictions],
    calibrators: Sequence[calibrate.Calibrator | float] | None = None,
    weights: Sequence[float] | None = None,
) -> Predictions:
    """Average the calibrated probabilities of several models on one split.

    Each member's probabilities come from its own calibrator (a number is a temperature);
    ``weights`` (>= 0, normalised to sum 1; default equal) weigh the members' probabilities.
    Members must share classes, split and ids (any order; the first member's order is kept).
    The result's logits are ``log(mean probability)``, so it behaves like any model.
    """
    if not predictions:
        raise ConfigError("ensemble needs at least one model's predictions")
    given = [1.0] * len(predictions) if calibrators is None else list(calibrators)
    if len(given) != len(predictions):
        raise ConfigError(f"ensemble has {len(predictions)} members but {len(given)} calibrators")
    cals = [calibrate.as_calibrator(c) for c in given]
    w = np.ones(len(predictions)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(predictions),) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"ensemble weights {list(w)} must be one per member, >= 0, with a positive sum"
        )
    w = w / w.sum()
    first = predictions[0]
    for pred in predictions:
        check_predictions(pred)
    mean = sum(
        wi * p.probs(c)[_aligned(first, p)] for p, c, wi in zip(predictions, cals, w, strict=True)
    )
    names = [p.model or f"model{i}" for i, p in enumerate(predictions)]
    hashes = {p.manifest_sha256 for p in predictions}
    return Predictions(
        list(first.ids),
        list(first.groups),
        first.labels.copy(),
        np.log(np.maximum(mean, np.finfo(np.float64).tiny)),
        list(first.classes),
        first.split,
        f"ensemble({'+'.join(names)})",
        hashes.pop() if len(hashes) == 1 else "",
        {
            "members": ",".join(names),
            "calibrators": ",".join(c.label() for c in cals),
            **({"weights": ",".join(f"{x:.6g}" for x in w)} if weights is not None else {}),
        },
    )


# -- one model on one split ------------------------------------------------------------------------
def calibration_report(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    positive: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = ALPHA,
    n_bins: int = calibrate.DEFAULT_BINS,
) -> dict[str, Any]:
    """Calibration measures of ``probs: [N, K]`` as entries: group-bootstrap intervals for
    ECE / adaptive ECE / class-wise ECE / MCE / Brier / NLL, Wald intervals for slope and
    intercept, plus the reliability table."""
    summary = calibrate.calibration_summary(probs, labels, n_bins, positive)
    boot = group_bootstrap(
        lambda w: calibrate.bootstrap_calibration(probs, labels, w, n_bins),
        groups,
        labels,
        n_boot,
        seed,
    )
    out: dict[str, Any] = {k: summary[k] for k in ("n", "n_bins", "slope_outcome", "reliability")}
    for name, samples in boot.items():
        out[name] = bootstrap_entry(summary[name], samples, alpha)
    for name in ("slope", "intercept"):
        out[name] = {
            "value": summary[name],
            "ci_low": summary[f"{name}_ci_low"],
            "ci_high": summary[f"{name}_ci_high"],
            "method": "wald",
        }
    return out


def positive_indices(positive: str | None, classes: Sequence[str]) -> list[int]:
    """Class indices to report operating points for: the named class, class 1 of a binary task,
    or every class (one-vs-rest) of a multi-class task."""
    if positive is None:
        return [1] if len(classes) == 2 else list(range(len(classes)))
    if positive not in classes:
        close = difflib.get_close_matches(positive, list(classes), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"positive class {positive!r} is not one of {list(classes)}{hint}")
    return [list(classes).index(positive)]


def operating_points(
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    positive: int,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Thresholds chosen on ``val = (probs, labels)`` and applied unchanged to the test arrays.

    Without validation predictions (or when validation cannot choose), only ``argmax``.
    """
    notes: list[str] = []
    thresholds: dict[str, float | None] = {"argmax": None}
    if val is None:
        notes.append("no validation predictions: only the argmax operating point is reported")
    else:
        try:
            thresholds = choose_thresholds(val[0], val[1], positive)
        except DataError as exc:
            notes.append(f"{exc}; only the argmax operating point is reported")
    test = {
        name: apply_threshold(test_probs, test_labels, positive, t, alpha)
        for name, t in thresholds.items()
    }
    return {"chosen_on": "validation", "thresholds": thresholds, "test": test, "notes": notes}


def _labelled_rows(pred: Predictions, role: str) -> np.ndarray:
    check_predictions(pred)
    keep = pred.labels >= 0
    if not keep.any():
        raise DataError(
            f"{role} predictions of model {pred.model or '(unnamed)'!r} on split "
            f"{pred.split!r} have no labelled rows (all labels are -1)"
        )
    return keep


def evaluate_predictions(
    test: Predictions,
    val: Predictions | None = None,
    positive: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    calibrator: calibrate.Calibrator | float = 1.0,
    *,
    alpha: float = ALPHA,
    n_bins: int = calibrate.DEFAULT_BINS,
) -> dict[str, Any]:
    """Everything for one model on one split, as a JSON-serialisable dict.

    Discrimination figures and operating points use ``test.probs(calibrator)`` (the
    calibrator fitted on validation; a number is a temperature); thresholds are chosen on
    ``val`` with the same calibrator and applied unchanged to ``test``. Calibration is reported
    before (uncalibrated) and after. Undefined figures are NaN (``json`` writes ``NaN``) and
    explained in ``notes``.
    """
    cal = calibrate.as_calibrator(calibrator)
    keep = _labelled_rows(test, "test")
    if val is not None:
        _aligned_classes(test, val)
    labels, groups = test.labels[keep], [g for g, k in zip(test.groups, keep, strict=True) if k]
    probs, raw = test.probs(cal)[keep], test.probs(1.0)[keep]
    pos = positive_indices(positive, test.classes)
    result = classification_metrics(probs, labels, groups, test.classes, n_boot, seed, alpha)
    notes = [*_run_notes(test, positive, keep, cal), *result.pop("notes")]
    val_arrays = None if val is None else (val.probs(cal), val.labels)
    points = {test.classes[c]: operating_points(probs, labels, val_arrays, c, alpha) for c in pos}
    slope_class = pos[0] if positive is not None or len(test.classes) == 2 else None
    stages = (("before", calibrate.NoCalibration(), raw), ("after", cal, probs))
    calib = {
        name: {
            "temperature": _temperature(c),
            "calibrator": c.to_dict(),
            **calibration_report(p, labels, groups, slope_class, n_boot, seed, alpha, n_bins),
        }
        for name, c, p in stages
    }
    return {
        "model": test.model,
        "split": test.split,
        "classes": list(test.classes),
        "n": int(keep.sum()),
        "n_unlabelled": int((~keep).sum()),
        "n_groups": len(set(groups)),
        "bootstrap": {
            "n_boot": n_boot,
            "seed": seed,
            "alpha": alpha,
            "unit": "group",
            "strata": "majority class of the group",
            "interval": "percentile",
        },
        **result,
        "operating_points": points,
        "calibration": calib,
        "notes": notes,
    }


def _aligned_classes(test: Predictions, val: Predictions) -> None:
    _labelled_rows(val, "validation")
    if val.classes != test.classes:
        raise DataError(
            f"validation predictions of {val.model or '(unnamed)'!r} have classes "
            f"{val.classes} but the test predictions have {test.classes}"
        )


def _temperature(calibrator: calibrate.Calibrator) -> float | None:
    """The temperature of a temperature (or no) calibrator; None for vector / Platt scaling."""
    if isinstance(calibrator, calibrate.TemperatureScaling):
        return calibrator.temperature
    return 1.0 if isinstance(calibrator, calibrate.NoCalibration) else None


def _run_notes(
    test: Predictions, positive: str | None, keep: np.ndarray, calibrator: calibrate.Calibrator
) -> list[str]:
    notes = [
        f"discrimination figures and operating points use probabilities calibrated by "
        f"{calibrator.label()}; calibration is reported before (uncalibrated) and after"
    ]
    if not keep.all():
        notes.append(f"{int((~keep).sum())} unlabelled test rows (label -1) were ignored")
    if positive is None and len(test.classes) == 2:
        notes.append(f"no positive class named: {test.classes[1]!r} is used")
    return notes


def bootstrap_samples(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    name: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Point value and ``[n_boot]`` stratified group-bootstrap samples of one overall figure
    (``balanced_accuracy``, ``macro_auroc``, ...) of labelled ``probs: [N, K]``: for intervals
    of differences between disjoint sets of cases (subgroups), resampled independently."""
    point = _point_metrics(probs, labels)
    if name not in point["overall"]:
        raise ValueError(f"unknown overall figure {name!r}; one of {sorted(point['overall'])}")
    boot = group_bootstrap(
        lambda w: {name: resample_metrics(probs, labels, point["defined"], w)[name]},
        groups,
        labels,
        n_boot,
        seed,
    )
    return float(point["overall"][name]), boot[name]
