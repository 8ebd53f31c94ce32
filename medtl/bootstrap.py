"""The stratified group bootstrap of :mod:`medtl.metrics`, and the vectorised weighted metrics
it evaluates on every resample.

Groups (patients, lesions, duplicate clusters) are resampled whole, stratified by each group's
majority class; a resample is a row of sample counts ``[N]``. The metrics take a block of such
rows ``[B, N]`` at once, with the same definitions as scikit-learn (which costs about a
millisecond a call, too slow for 1000 resamples x K classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RATES = ("sensitivity", "specificity", "ppv", "npv")
AVERAGED = ("specificity", "ppv", "npv", "f1", "auroc", "auprc")
_CHUNK = 250  # resamples per vectorised block: bounds memory at 250 x N floats per array


# -- group bootstrap ----------------------------------------------------------------------------
def group_strata(groups: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(group of each sample [N], majority class of each group [G])``; ties go to the lower class."""
    _, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    votes = np.zeros((group_of.max() + 1, int(labels.max()) + 1))
    np.add.at(votes, (group_of, labels), 1)
    return group_of, votes.argmax(axis=1)


def _group_counts(group_class: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, G]``: how often each group is drawn; each stratum keeps its number of groups."""
    counts = np.zeros((n_boot, len(group_class)), dtype=np.int64)
    rows = np.arange(n_boot)[:, None]
    for c in np.unique(group_class):
        members = np.flatnonzero(group_class == c)
        draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        np.add.at(counts, (rows, draws), 1)
    return counts


def group_bootstrap_weights(
    groups: Sequence[str], labels: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """``[B, N]`` sample counts of a stratified group bootstrap.

    Groups (patients, lesions, duplicate clusters) are drawn with replacement within strata
    given by each group's majority label; every sample of a drawn group comes with it, so all
    samples of one group always share one count.
    """
    group_of, group_class = group_strata(groups, np.asarray(labels))
    return _group_counts(group_class, n_boot, np.random.default_rng(seed))[:, group_of]


def group_bootstrap(
    fn: Callable[[np.ndarray], dict[str, np.ndarray]],
    groups: Sequence[str],
    labels: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Apply ``fn(weights [b, N]) -> {name: [b, ...]}`` over all resamples in blocks."""
    group_of, group_class = group_strata(groups, labels)
    counts = _group_counts(group_class, n_boot, np.random.default_rng(seed))
    parts = [fn(counts[i : i + _CHUNK][:, group_of]) for i in range(0, n_boot, _CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- vectorised weighted metrics --------------------------------------------------------------------
def _cumsum0(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((len(x), 1)), np.cumsum(x, axis=1)], axis=1)


def weighted_auroc_auprc(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of ``weights: [B, N]`` (sample counts).

    ``scores: [N]``, ``positive: [N]`` bool. Same definitions as scikit-learn's
    ``roc_auc_score`` (ties count 1/2) and ``average_precision_score`` (step-wise sum of
    precision x recall increments over distinct thresholds). NaN where undefined.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    end = np.r_[start[1:], len(s)]
    w = np.asarray(weights, dtype=np.float64)[:, order]
    cum_pos, cum_neg = _cumsum0(w * pos), _cumsum0(w * ~pos)
    n_pos, n_neg = cum_pos[:, -1], cum_neg[:, -1]
    pos_block = cum_pos[:, end] - cum_pos[:, start]
    neg_block = cum_neg[:, end] - cum_neg[:, start]
    tp = n_pos[:, None] - cum_pos[:, start]
    called = tp + n_neg[:, None] - cum_neg[:, start]
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos_block * (cum_neg[:, start] + neg_block / 2)).sum(axis=1) / (n_pos * n_neg)
        auprc = (pos_block * precision).sum(axis=1) / n_pos
    return np.where(n_neg > 0, auroc, np.nan), np.where(n_pos > 0, auprc, np.nan)


def weighted_confusion(
    labels: np.ndarray, pred: np.ndarray, n_classes: int, weights: np.ndarray
) -> np.ndarray:
    """``[B, K, K]`` confusion matrices (rows = true class) for ``weights: [B, N]``."""
    onehot = np.eye(n_classes * n_classes)[labels * n_classes + pred]
    return (np.asarray(weights, np.float64) @ onehot).reshape(-1, n_classes, n_classes)


def rates_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest counts and rates ``[..., K]`` of confusion matrices ``cm: [..., K, K]``.

    sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), PPV = TP/(TP+FP), NPV = TN/(TN+FN),
    F1 = 2TP/(2TP+FP+FN); 0/0 is NaN (undefined), not 0.
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, called = cm.sum(axis=-1), cm.sum(axis=-2)
    fp, fn = called - tp, support - tp
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "support": support,
            "sensitivity": tp / support,
            "specificity": tn / (tn + fp),
            "ppv": tp / called,
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def kappa_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Cohen's kappa ``(p_o - p_e) / (1 - p_e)`` of ``cm: [..., K, K]``; NaN when p_e = 1."""
    total = cm.sum(axis=(-2, -1))
    observed = np.trace(cm, axis1=-2, axis2=-1) / total
    expected = (cm.sum(axis=-1) * cm.sum(axis=-2)).sum(axis=-1) / total**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)


def class_averages(
    per_class: dict[str, np.ndarray], support: np.ndarray, defined: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Macro and support-weighted means ``[B]`` over the classes where the point value is defined.

    A resample in which one of those classes is undefined is itself undefined (NaN).
    """
    out = {}
    for name in (*AVERAGED, "sensitivity"):
        mask = defined[name]
        x, s = per_class[name][:, mask], support[:, mask]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"macro_{name}"] = x.mean(axis=1) if mask.any() else np.full(len(x), np.nan)
            out[f"weighted_{name}"] = (x * s).sum(axis=1) / s.sum(axis=1)
    out["balanced_accuracy"] = out.pop("macro_sensitivity")
    del out["weighted_sensitivity"]  # equals accuracy, reported with its Wilson interval
    return out


def resample_metrics(
    probs: np.ndarray, labels: np.ndarray, defined: dict[str, np.ndarray], w: np.ndarray
) -> dict[str, np.ndarray]:
    """Every bootstrapped discrimination figure for ``w: [b, N]``; per-class ones are ``[b, K]``."""
    k = probs.shape[1]
    cm = weighted_confusion(labels, probs.argmax(axis=1), k, w)
    rates = rates_from_confusion(cm)
    curves = [weighted_auroc_auprc(probs[:, c], labels == c, w) for c in range(k)]
    per_class = {
        **{name: rates[name] for name in (*RATES, "f1")},
        "auroc": np.stack([a for a, _ in curves], axis=1),
        "auprc": np.stack([p for _, p in curves], axis=1),
    }
    return {
        **per_class,
        **class_averages(per_class, rates["support"], defined),
        "cohen_kappa": kappa_from_confusion(cm),
    }
