from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
)

from medtl import metrics
from medtl.errors import ConfigError, DataError
from medtl.predictions import Predictions

CLASSES = ["benign", "malignant", "normal"]


def binary_probs(scores: list[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return np.column_stack([1 - s, s])


def predictions(
    n: int = 90, seed: int = 0, split: str = "test", model: str = "m", per_group: int = 1
) -> Predictions:
    """A fairly good 3-class model; ``per_group`` consecutive samples share a group."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    logits = rng.normal(0.0, 1.0, size=(n, 3))
    logits[np.arange(n), labels] += 1.5
    ids = [f"{split}{i}" for i in range(n)]
    groups = [f"p{i // per_group}" for i in range(n)]
    return Predictions(ids, groups, labels, logits, list(CLASSES), split, model)


def relabelled(pred: Predictions, labels: np.ndarray) -> Predictions:
    return Predictions(
        pred.ids, pred.groups, labels, pred.logits, pred.classes, pred.split, pred.model
    )


# -- Wilson -------------------------------------------------------------------------------------
def test_wilson_interval_textbook_value() -> None:
    low, high = metrics.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.490, 0.943), abs=6e-4)
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        metrics.wilson_interval(11, 10)


# -- hand cases ----------------------------------------------------------------------------------
def test_auroc_of_four_scores_is_three_quarters() -> None:
    y, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    auroc, _ = metrics.weighted_auroc_auprc(scores, y == 1, np.ones((1, 4)))
    assert auroc[0] == pytest.approx(0.75)
    out = metrics.classification_metrics(binary_probs(scores), y, n_boot=50)
    assert out["per_class"]["1"]["auroc"]["value"] == pytest.approx(0.75)


def test_two_by_two_confusion_matrix_rates() -> None:
    # TP 8, FN 2, FP 3, TN 7
    cm = np.array([[7.0, 3.0], [2.0, 8.0]])
    rates = metrics.rates_from_confusion(cm)
    assert rates["sensitivity"][1] == pytest.approx(0.8)
    assert rates["specificity"][1] == pytest.approx(0.7)
    assert rates["ppv"][1] == pytest.approx(8 / 11)
    assert rates["npv"][1] == pytest.approx(7 / 9)
    assert rates["f1"][1] == pytest.approx(16 / 21)
    y = np.array([0] * 10 + [1] * 10)
    pred = np.array([0] * 7 + [1] * 3 + [0] * 2 + [1] * 8)
    table = metrics.apply_threshold(binary_probs(pred * 0.8 + 0.1), y, positive=1, threshold=0.5)
    assert (table["tp"], table["fn"], table["fp"], table["tn"]) == (8, 2, 3, 7)
    assert table["ppv"]["value"] == pytest.approx(8 / 11)
    assert table["sensitivity"]["ci_low"] == pytest.approx(metrics.wilson_interval(8, 10)[0])


# -- oracles ------------------------------------------------------------------------------------
def test_point_figures_match_scikit_learn() -> None:
    pred = predictions(120, seed=1)
    probs, y = pred.probs(), pred.labels
    out = metrics.classification_metrics(probs, y, pred.groups, CLASSES, n_boot=50)
    hard = probs.argmax(axis=1)
    assert out["confusion_matrix"]["counts"] == confusion_matrix(y, hard).tolist()
    for c, name in enumerate(CLASSES):
        row = out["per_class"][name]
        assert row["auroc"]["value"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
        assert row["auprc"]["value"] == pytest.approx(average_precision_score(y == c, probs[:, c]))
    overall = out["overall"]
    assert overall["cohen_kappa"]["value"] == pytest.approx(cohen_kappa_score(y, hard))
    assert overall["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, hard))
    assert overall["macro_f1"]["value"] == pytest.approx(f1_score(y, hard, average="macro"))
    assert overall["weighted_f1"]["value"] == pytest.approx(f1_score(y, hard, average="weighted"))
    assert overall["macro_ppv"]["value"] == pytest.approx(precision_score(y, hard, average="macro"))
    assert overall["macro_auroc"]["value"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert overall["accuracy"]["value"] == pytest.approx((hard == y).mean())


def test_vectorised_resample_metrics_match_scikit_learn_on_expanded_data() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=60).astype(bool)
    scores = np.round(rng.random(60), 1)  # many ties
    counts = rng.integers(0, 3, size=60)
    auroc, auprc = metrics.weighted_auroc_auprc(scores, y, np.vstack([np.ones(60), counts]))
    idx = np.repeat(np.arange(60), counts)
    assert auroc[0] == pytest.approx(roc_auc_score(y, scores))
    assert auprc[0] == pytest.approx(average_precision_score(y, scores))
    assert auroc[1] == pytest.approx(roc_auc_score(y[idx], scores[idx]))
    assert auprc[1] == pytest.approx(average_precision_score(y[idx], scores[idx]))
    labels, pred = rng.integers(0, 3, size=60), rng.integers(0, 3, size=60)
    cm = metrics.weighted_confusion(labels, pred, 3, counts[None])
    assert cm[0].tolist() == confusion_matrix(labels[idx], pred[idx]).tolist()
    assert metrics.kappa_from_confusion(cm)[0] == pytest.approx(
        cohen_kappa_score(labels[idx], pred[idx])
    )


# -- group bootstrap -------------------------------------------------------------------------
def test_group_bootstrap_resamples_whole_groups_within_strata() -> None:
    groups = ["a", "a", "a", "b", "c", "c", "d", "e", "e", "f"]
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0])  # majorities: a0 b1 c0 d1 e1 f0
    w = metrics.group_bootstrap_weights(groups, labels, n_boot=300, seed=3)
    assert w.shape == (300, 10)
    for members in ([0, 1, 2], [4, 5], [7, 8]):
        assert (w[:, members] == w[:, members[:1]]).all()
    first = {"a": 0, "b": 3, "c": 4, "d": 6, "e": 7, "f": 9}
    drawn = {g: w[:, i] for g, i in first.items()}
    assert (drawn["a"] + drawn["c"] + drawn["f"] == 3).all()  # class-0 groups: three draws
    assert (drawn["b"] + drawn["d"] + drawn["e"] == 3).all()
    assert np.array_equal(w, metrics.group_bootstrap_weights(groups, labels, n_boot=300, seed=3))
    assert not np.array_equal(w, metrics.group_bootstrap_weights(groups, labels, 300, seed=4))


def _auroc_ci_width(probs: np.ndarray, y: np.ndarray, groups: list[str]) -> float:
    out = metrics.classification_metrics(probs, y, groups, n_boot=400, seed=0)
    entry = out["per_class"]["1"]["auroc"]
    return float(entry["ci_high"] - entry["ci_low"])


def test_duplicates_within_a_group_do_not_shrink_the_interval() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=60)
    probs = binary_probs(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, 60), 0, 1))
    twice_p, twice_y = np.repeat(probs, 2, axis=0), np.repeat(y, 2)
    base = _auroc_ci_width(probs, y, [f"g{i:03d}" for i in range(60)])
    same_group = _auroc_ci_width(twice_p, twice_y, [f"g{i // 2:03d}" for i in range(120)])
    independent = _auroc_ci_width(twice_p, twice_y, [f"g{i:03d}" for i in range(120)])
    assert same_group == pytest.approx(base, rel=0.1)
    assert independent < 0.85 * base


# -- DeLong ---------------------------------------------------------------------------------------
def test_delong_identical_scores() -> None:
    rng = np.random.default_rng(6)
    y, s = rng.integers(0, 2, size=50), rng.random(50)
    out = metrics.delong_test(y, s, s)
    assert out["difference"] == 0.0 and out["p_value"] == 1.0 and out["z"] == 0.0
    assert out["auroc_a"] == pytest.approx(roc_auc_score(y, s))


def test_delong_standard_error_agrees_with_a_bootstrap() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=200)
    shared = rng.normal(0, 1, 200)
    a = y + shared + rng.normal(0, 0.8, 200)
    b = 0.6 * y + shared + rng.normal(0, 0.8, 200)
    out = metrics.delong_test(y, a, b)
    assert out["auroc_a"] == pytest.approx(roc_auc_score(y, a))
    assert out["auroc_b"] == pytest.approx(roc_auc_score(y, b))
    w = metrics.group_bootstrap_weights([str(i) for i in range(200)], y, n_boot=2000, seed=8)
    diffs = (
        metrics.weighted_auroc_auprc(a, y == 1, w)[0]
        - metrics.weighted_auroc_auprc(b, y == 1, w)[0]
    )
    assert out["se"] == pytest.approx(diffs.std(), rel=0.15)
    assert out["ci_low"] < out["difference"] < out["ci_high"]
    assert out["p_value"] == pytest.approx(2 * (1 - _normal_cdf(abs(out["z"]))))
    swapped = metrics.delong_test(y, b, a)
    assert swapped["difference"] == pytest.approx(-out["difference"])
    assert swapped["p_value"] == pytest.approx(out["p_value"])


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_delong_per_class_notes_an_absent_class() -> None:
    pred = predictions(60, seed=9)
    labels = np.where(pred.labels == 2, 0, pred.labels)
    other = predictions(60, seed=10).probs()
    out = metrics.delong_per_class(labels, pred.probs(), other, CLASSES)
    assert math.isfinite(out["benign"]["p_value"])
    assert math.isnan(out["normal"]["p_value"]) and "at least 2 positive" in out["normal"]["note"]


# -- operating points ------------------------------------------------------------------------------
def test_youden_and_target_sensitivity_on_a_hand_case() -> None:
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3, 0.2, 0.1
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1]
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    out = metrics.choose_thresholds(binary_probs(scores), y, positive=1, targets=(0.6, 0.9))
    assert out["argmax"] is None
    assert out["youden"] == pytest.approx(0.4)  # J = 1 - 1/4 beats 2/3 - 0 at 0.8
    assert out["target_sensitivity_0.60"] == pytest.approx(0.8)
    assert out["target_sensitivity_0.90"] == pytest.approx(0.4)


def test_target_sensitivity_is_met_on_validation_by_the_highest_threshold() -> None:
    val = predictions(200, seed=11, split="val")
    probs = val.probs()
    out = metrics.choose_thresholds(probs, val.labels, positive=1, targets=(0.9, 0.95))
    score, pos = probs[:, 1], val.labels == 1
    for target in (0.9, 0.95):
        t = out[f"target_sensitivity_{target:.2f}"]
        assert t is not None
        assert (score[pos] >= t).mean() >= target
        higher = score[score > t].min()
        assert (score[pos] >= higher).mean() < target


def test_thresholds_are_chosen_on_validation_only() -> None:
    val = predictions(120, seed=12, split="val")
    test = predictions(90, seed=13)
    chosen = metrics.choose_thresholds(val.probs(), val.labels, positive=1)
    report = metrics.evaluate_predictions(test, val, "malignant", n_boot=50)
    point = report["operating_points"]["malignant"]
    assert point["thresholds"] == chosen and point["chosen_on"] == "validation"
    other = metrics.evaluate_predictions(predictions(90, seed=14), val, "malignant", n_boot=50)
    assert other["operating_points"]["malignant"]["thresholds"] == chosen
    applied = metrics.apply_threshold(test.probs(), test.labels, 1, chosen["youden"])
    assert point["test"]["youden"] == applied


# -- bad input -----------------------------------------------------------------------------------
def test_class_absent_from_test_gives_nan_auroc_and_a_note() -> None:
    pred = predictions(90, seed=15)
    test = relabelled(pred, np.where(pred.labels == 2, 0, pred.labels))
    report = metrics.evaluate_predictions(test, None, "malignant", n_boot=100)
    assert math.isnan(report["per_class"]["normal"]["auroc"]["value"])
    assert math.isfinite(report["per_class"]["benign"]["auroc"]["value"])
    assert math.isfinite(report["overall"]["macro_auroc"]["value"])
    assert any("'normal' has no test samples" in note for note in report["notes"])


def test_single_class_test_set() -> None:
    pred = predictions(40, seed=16)
    report = metrics.evaluate_predictions(relabelled(pred, np.zeros(40, dtype=int)), n_boot=100)
    assert all(math.isnan(row["auroc"]["value"]) for row in report["per_class"].values())
    assert math.isnan(report["overall"]["macro_auroc"]["value"])
    assert any("holds only class 'benign'" in note for note in report["notes"])
    assert math.isfinite(report["overall"]["accuracy"]["value"])


def test_nan_probabilities_name_the_model() -> None:
    pred = predictions(30, seed=17, model="vit_small")
    pred.logits[3, 0] = np.nan
    with pytest.raises(DataError, match=r"'vit_small'.*contain NaN"):
        metrics.evaluate_predictions(pred)


def test_mismatched_classes_and_unknown_positive_are_refused() -> None:
    test = predictions(30, seed=18)
    val = Predictions(test.ids, test.groups, test.labels, test.logits, ["a", "b", "c"], "val", "m")
    with pytest.raises(DataError, match="have classes"):
        metrics.evaluate_predictions(test, val)
    with pytest.raises(ConfigError, match="did you mean 'malignant'"):
        metrics.evaluate_predictions(test, None, "malignnt")


def test_validation_without_the_positive_class_keeps_argmax_with_a_note() -> None:
    val = predictions(40, seed=19, split="val")
    val = relabelled(val, np.where(val.labels == 1, 0, val.labels))
    report = metrics.evaluate_predictions(predictions(40, seed=20), val, "malignant", n_boot=50)
    point = report["operating_points"]["malignant"]
    assert list(point["thresholds"]) == ["argmax"]
    assert "no samples of class index 1" in point["notes"][0]


# -- the whole report ---------------------------------------------------------------------------
def test_evaluate_predictions_is_json_serialisable_and_complete() -> None:
    test = predictions(90, seed=21, per_group=3)
    test.labels[:2] = -1
    report = metrics.evaluate_predictions(
        test, predictions(90, seed=22, split="val"), None, n_boot=200, calibrator=1.5
    )
    restored = json.loads(json.dumps(report))
    assert restored["n"] == 88 and restored["n_unlabelled"] == 2 and restored["split"] == "test"
    assert set(restored["operating_points"]) == set(CLASSES)
    entry = restored["per_class"]["benign"]["auroc"]
    assert entry["method"] == "group_bootstrap_percentile" and entry["n_boot"] == 200
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert restored["per_class"]["benign"]["sensitivity"]["method"] == "wilson"
    before, after = restored["calibration"]["before"], restored["calibration"]["after"]
    assert (before["temperature"], after["temperature"]) == (1.0, 1.5)
    assert before["ece"]["value"] != after["ece"]["value"]
    assert after["slope"]["method"] == "wald"
    assert any("unlabelled" in note for note in restored["notes"])
    counts = np.array(restored["confusion_matrix"]["counts"][0], dtype=float)
    assert restored["confusion_matrix"]["row_normalised"][0] == pytest.approx(counts / counts.sum())


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    test = predictions(60, seed=23)
    first = json.dumps(metrics.evaluate_predictions(test, n_boot=100, seed=1))
    assert first == json.dumps(metrics.evaluate_predictions(test, n_boot=100, seed=1))
    assert first != json.dumps(metrics.evaluate_predictions(test, n_boot=100, seed=2))


# -- ensembles ---------------------------------------------------------------------------------
def test_ensemble_of_identical_models_equals_the_model() -> None:
    pred = predictions(30, seed=24)
    combined = metrics.ensemble([pred, pred])
    assert np.allclose(combined.probs(), pred.probs())
    assert combined.ids == pred.ids and combined.model == "ensemble(m+m)"


def test_ensemble_reorders_by_id_and_applies_temperatures() -> None:
    pred = predictions(30, seed=25)
    order = np.random.default_rng(0).permutation(30)
    shuffled = Predictions(
        [pred.ids[i] for i in order],
        [pred.groups[i] for i in order],
        pred.labels[order],
        pred.logits[order],
        pred.classes,
        pred.split,
        "shuffled",
    )
    assert np.allclose(metrics.ensemble([pred, shuffled]).probs(), pred.probs())
    single = metrics.ensemble([shuffled], calibrators=[2.0])
    assert np.allclose(single.probs(), pred.probs(2.0)[order])
    mean = (pred.probs() + pred.probs(2.0)) / 2
    assert np.allclose(metrics.ensemble([pred, pred], [1.0, 2.0]).probs(), mean)


def test_ensemble_refuses_mismatched_members() -> None:
    pred = predictions(30, seed=26)
    other = predictions(30, seed=26, split="val", model="other")
    with pytest.raises(DataError, match="'other' has classes"):
        metrics.ensemble([pred, other])
    renamed = Predictions(
        [f"x{i}" for i in range(30)],
        pred.groups,
        pred.labels,
        pred.logits,
        pred.classes,
        pred.split,
        "renamed",
    )
    with pytest.raises(DataError, match="same \\(unique\\) ids"):
        metrics.ensemble([pred, renamed])
    broken = predictions(30, seed=26, model="broken")
    broken.logits[0, 0] = np.inf
    with pytest.raises(DataError, match="'broken'"):
        metrics.ensemble([pred, broken])
    with pytest.raises(ConfigError, match="temperature"):
        metrics.ensemble([pred], calibrators=[0.0])
