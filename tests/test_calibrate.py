from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss
from torchmetrics.classification import MulticlassCalibrationError

from medtl import calibrate as cal
from medtl.errors import ConfigError, DataError

# Two samples with top confidence 0.85 (one right), three with 0.65 (two right).
HAND_PROBS = np.array([[0.15, 0.85], [0.85, 0.15], [0.65, 0.35], [0.35, 0.65], [0.65, 0.35]])
HAND_LABELS = np.array([1, 1, 0, 1, 1])


def sampled(n: int, k: int, seed: int, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a calibrated model and labels drawn from its own softmax."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, size=(n, k))
    cum = cal.softmax(z).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cum).sum(axis=1)
    return z, np.minimum(labels, k - 1)


# -- measures: hand cases -------------------------------------------------------------------------
def test_ece_and_mce_of_a_hand_made_set() -> None:
    # bin (0.8, 0.9]: conf 0.85, acc 1/2, gap 0.35, weight 2/5; bin (0.6, 0.7]: 0.65 vs 2/3.
    expected = 2 / 5 * 0.35 + 3 / 5 * abs(2 / 3 - 0.65)
    assert cal.ece(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(expected)
    assert cal.mce(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(0.35)


def test_one_bin_measures_are_mean_gaps() -> None:
    conf, correct = HAND_PROBS.max(axis=1), HAND_PROBS.argmax(axis=1) == HAND_LABELS
    gap = abs(correct.mean() - conf.mean())
    assert cal.ece(HAND_PROBS, HAND_LABELS, n_bins=1) == pytest.approx(gap)
    assert cal.adaptive_ece(HAND_PROBS, HAND_LABELS, n_bins=1) == pytest.approx(gap)
    positive_gap = abs((HAND_LABELS == 1).mean() - HAND_PROBS[:, 1].mean())
    assert cal.classwise_ece(HAND_PROBS, HAND_LABELS, n_bins=1) == pytest.approx(positive_gap)


def test_adaptive_ece_uses_equal_count_bins() -> None:
    # sorted confidences 0.65 x3, 0.85 x2 -> bins of 3 and 2 samples hold the same split here
    assert cal.adaptive_ece(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(
        cal.ece(HAND_PROBS, HAND_LABELS, n_bins=10)
    )
    bins = cal.equal_mass_bins(np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.2]), n_bins=3)
    assert bins.tolist() == [2, 0, 1, 2, 1, 0]


def test_brier_and_nll_by_hand() -> None:
    probs, labels = np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1])
    assert cal.brier_score(probs, labels) == pytest.approx(0.25)
    assert cal.nll(probs, labels) == pytest.approx(np.log(2) / 2)


def test_unlabelled_rows_are_ignored_by_measures() -> None:
    probs = np.vstack([HAND_PROBS, [[0.5, 0.5]]])
    labels = np.r_[HAND_LABELS, -1]
    assert cal.ece(probs, labels, 10) == pytest.approx(cal.ece(HAND_PROBS, HAND_LABELS, 10))


# -- measures: oracles ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bins", [5, 15])
def test_top_label_ece_and_mce_match_torchmetrics(n_bins: int) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.7, size=400)
    labels = rng.integers(0, 4, size=400)
    p, y = torch.tensor(probs), torch.tensor(labels)
    for norm, fn in (("l1", cal.ece), ("max", cal.mce)):
        oracle = MulticlassCalibrationError(num_classes=4, n_bins=n_bins, norm=norm)(p, y)
        assert fn(probs, labels, n_bins) == pytest.approx(float(oracle), abs=1e-6)


def test_multiclass_brier_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    probs, labels = rng.dirichlet(np.ones(3), size=50), rng.integers(0, 3, size=50)
    oracle = brier_score_loss(labels, probs, labels=[0, 1, 2], scale_by_half=False)
    assert cal.brier_score(probs, labels) == pytest.approx(oracle)


def test_calibration_slope_matches_unpenalised_logistic_regression() -> None:
    z, y = sampled(3000, 2, seed=2)
    probs = cal.softmax(3 * z)
    x = np.log(probs[:, 1] / probs[:, 0])
    oracle = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
    out = cal.calibration_slope_intercept(probs, y)
    assert out["slope"] == pytest.approx(oracle.coef_[0, 0], rel=1e-4)
    assert out["slope_ci_low"] < out["slope"] < out["slope_ci_high"]


def test_calibration_slope_and_intercept_of_calibrated_and_overconfident_models() -> None:
    z, y = sampled(20000, 2, seed=3)
    fair = cal.calibration_slope_intercept(cal.softmax(z), y)
    assert fair["slope"] == pytest.approx(1.0, abs=0.08)
    assert fair["intercept"] == pytest.approx(0.0, abs=0.08)
    assert cal.calibration_slope_intercept(cal.softmax(3 * z), y)["slope"] == pytest.approx(
        1 / 3, abs=0.03
    )


def test_intercept_is_calibration_in_the_large() -> None:
    # With the slope fixed at 1 the fitted shift makes mean predicted risk equal the event rate.
    z, y = sampled(500, 2, seed=4)
    probs = cal.softmax(z + np.array([0.0, 1.0]))  # systematically too high for class 1
    a = cal.calibration_slope_intercept(probs, y)["intercept"]
    shifted = 1 / (1 + np.exp(-(np.log(probs[:, 1] / probs[:, 0]) + a)))
    assert a < 0
    assert shifted.mean() == pytest.approx(y.mean(), abs=1e-6)


def test_slope_is_nan_when_undefined() -> None:
    out = cal.calibration_slope_intercept(np.array([[0.2, 0.8], [0.3, 0.7]]), np.array([1, 1]))
    assert np.isnan(out["slope"]) and np.isnan(out["intercept"])
    separable = cal.calibration_slope_intercept(HAND_PROBS[:2], np.array([1, 0]))
    assert np.isnan(separable["slope"]) and np.isfinite(separable["intercept"])


def test_bootstrap_calibration_rows_match_point_values_and_expanded_data() -> None:
    rng = np.random.default_rng(5)
    probs, labels = rng.dirichlet(np.ones(3), size=40), rng.integers(0, 3, size=40)
    counts = rng.integers(0, 3, size=40)
    rows = cal.bootstrap_calibration(probs, labels, np.vstack([np.ones(40), counts]), n_bins=10)
    idx = np.repeat(np.arange(40), counts)
    for name, fn in (
        ("ece", cal.ece),
        ("mce", cal.mce),
        ("classwise_ece", cal.classwise_ece),
        ("adaptive_ece", cal.adaptive_ece),
    ):
        assert rows[name][0] == pytest.approx(fn(probs, labels, 10))
        assert rows[name][1] == pytest.approx(fn(probs[idx], labels[idx], 10))
    assert rows["brier"][1] == pytest.approx(cal.brier_score(probs[idx], labels[idx]))
    assert rows["nll"][0] == pytest.approx(cal.nll(probs, labels))


# -- reliability ---------------------------------------------------------------------------------
def test_reliability_table_counts_confidence_and_accuracy() -> None:
    table = cal.reliability_table(HAND_PROBS, HAND_LABELS, n_bins=10)
    assert table.count.sum() == 5 and table.count[8] == 2 and table.count[6] == 3
    assert table.confidence[8] == pytest.approx(0.85) and table.accuracy[6] == pytest.approx(2 / 3)
    assert np.isnan(table.accuracy[0])
    assert json.loads(json.dumps(table.to_dict()))["count"][8] == 2


def test_reliability_diagram_draws_into_new_or_given_axes() -> None:
    fig = cal.reliability_diagram(HAND_PROBS, HAND_LABELS, n_bins=10)
    assert len(fig.axes) == 2 and fig.axes[1].get_xlabel().startswith("confidence")
    host = Figure()
    ax = host.subplots()
    assert cal.reliability_diagram(HAND_PROBS, HAND_LABELS, ax=ax, title="t") is host
    assert len(host.axes) == 2 and ax.get_title() == "t"
    buffer = io.BytesIO()
    host.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_calibration_summary_is_json_serialisable() -> None:
    summary = cal.calibration_summary(HAND_PROBS, HAND_LABELS, n_bins=10)
    assert summary["ece"] == pytest.approx(cal.ece(HAND_PROBS, HAND_LABELS, 10))
    assert summary["slope_outcome"] == "class index 1 vs rest"
    json.dumps(summary)


# -- calibrators ------------------------------------------------------------------------------
def test_temperature_scaling_recovers_a_known_temperature() -> None:
    z, y = sampled(12000, 3, seed=6)
    fitted = cal.fit_calibrator("temperature", 3 * z[:8000], y[:8000])
    assert isinstance(fitted, cal.TemperatureScaling)
    assert fitted.temperature == pytest.approx(3.0, abs=0.2)
    held_z, held_y = 3 * z[8000:], y[8000:]
    raw, scaled = cal.softmax(held_z), fitted.probs(held_z)
    assert cal.nll(scaled, held_y) < cal.nll(raw, held_y) - 0.1
    assert cal.ece(scaled, held_y) < cal.ece(raw, held_y) / 2
    assert (scaled.argmax(axis=1) == raw.argmax(axis=1)).all()


@pytest.mark.parametrize("name", ["vector", "platt"])
def test_vector_and_platt_reduce_held_out_nll(name: str) -> None:
    z, y = sampled(6000, 2, seed=7)
    z = 3 * z + np.array([0.0, 1.0])  # over-confident and biased towards class 1
    fitted = cal.fit_calibrator(name, z[:3000], y[:3000])
    assert (
        cal.nll(fitted.probs(z[3000:]), y[3000:]) < cal.nll(cal.softmax(z[3000:]), y[3000:]) - 0.1
    )


def test_platt_refuses_more_than_two_classes() -> None:
    z, y = sampled(50, 3, seed=8)
    with pytest.raises(ConfigError, match="'platt' is for binary tasks"):
        cal.fit_calibrator("platt", z, y)


def test_none_is_the_identity_and_names_are_registered() -> None:
    z, y = sampled(20, 3, seed=9)
    assert np.array_equal(cal.fit_calibrator("none", z, y).apply(z), z)
    assert cal.CALIBRATORS.names() == ["none", "platt", "temperature", "vector"]
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        cal.fit_calibrator("temperatur", z, y)


def test_nan_logits_are_refused() -> None:
    z, y = sampled(20, 3, seed=10)
    z[4, 1] = np.nan
    with pytest.raises(DataError, match="contain NaN"):
        cal.fit_calibrator("temperature", z, y)


def test_unlabelled_rows_are_ignored_with_a_count() -> None:
    z, y = sampled(200, 3, seed=11)
    y[:30] = -1
    fitted = cal.fit_calibrator("temperature", z, y)
    assert (fitted.n_fit, fitted.n_ignored) == (170, 30)
    only_labelled = cal.fit_calibrator("temperature", z[30:], y[30:])
    assert fitted.temperature == pytest.approx(only_labelled.temperature)
    with pytest.raises(DataError, match="all 200 rows are unlabelled"):
        cal.fit_calibrator("temperature", z, np.full(200, -1))


def test_labels_out_of_range_are_refused() -> None:
    z, _ = sampled(5, 3, seed=12)
    with pytest.raises(DataError, match=r"class index in \[0, 3\)"):
        cal.fit_calibrator("temperature", z, np.array([0, 1, 2, 3, 0]))


@pytest.mark.parametrize("name", ["temperature", "vector", "platt", "none"])
def test_calibrators_round_trip_through_json(name: str) -> None:
    z, y = sampled(300, 2, seed=13)
    fitted = cal.fit_calibrator(name, 2 * z, y)
    record = json.loads(json.dumps(fitted.to_dict()))
    assert record["name"] == name
    restored = cal.Calibrator.from_dict(record)
    assert restored == fitted
    assert np.allclose(restored.apply(z), fitted.apply(z))


def test_bad_records_and_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown calibrator"):
        cal.Calibrator.from_dict({"name": "isotonic"})
    with pytest.raises(ConfigError, match="invalid"):
        cal.Calibrator.from_dict({"name": "temperature", "temperature": -1.0})
    vector = cal.VectorScaling(scale=[1.0, 1.0], bias=[0.0, 0.0])
    with pytest.raises(DataError, match=r"expects logits \[N, 2\]"):
        vector.apply(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="positive"):
        cal.TemperatureScaling(temperature=0.0)
