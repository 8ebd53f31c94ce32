"""Split-conformal sets: hand-checked construction, coverage on exchangeable synthetic data,
Mondrian per-class coverage, and the rule that only validation predictions fit them."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.calibrate import NoCalibration, TemperatureScaling
from medtl.conformal import (
    APS,
    LAC,
    SCORES,
    ConformalCard,
    ConformalConfig,
    conformal_quantile,
    conformal_summary,
    fit_conformal,
    risk_coverage,
    set_labels,
)
from medtl.errors import ConfigError, DataError
from medtl.predictions import Predictions


def _predictions(probs: np.ndarray, labels: np.ndarray, split: str) -> Predictions:
    n, k = probs.shape
    return Predictions(
        [f"r{i}" for i in range(n)],
        [f"g{i}" for i in range(n)],
        labels,
        np.log(np.clip(probs, 1e-12, 1)),  # logits whose softmax is probs
        [f"c{j}" for j in range(k)],
        split,
    )


def _exchangeable(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (labels drawn from them) of varying sharpness."""
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels


def test_scores_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(LAC.all_classes(probs), [[0.5, 0.7, 0.8], [0.9, 0.4, 0.7]])
    # APS: mass of the classes ranked strictly above each class
    np.testing.assert_allclose(APS.all_classes(probs), [[0.0, 0.5, 0.8], [0.9, 0.0, 0.6]])
    np.testing.assert_allclose(LAC.of_labels(probs, np.array([2, 1])), [0.8, 0.4])


def test_quantile_by_hand() -> None:
    scores = np.array([0.4, 0.1, 0.3, 0.2])
    assert conformal_quantile(scores, 0.5) == 0.3  # rank ceil(5 * 0.5) = 3
    assert conformal_quantile(scores, 0.6) == 0.3  # rank ceil(3.0) = 3
    assert conformal_quantile(scores, 0.7) == 0.4  # rank ceil(3.5) = 4
    assert conformal_quantile(scores, 0.9) is None  # rank 5 > n: every class


def test_sets_by_hand() -> None:
    val = _predictions(
        np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]),
        np.array([0, 1, 2, 0]),
        "val",
    )
    card = fit_conformal(val, NoCalibration(), ConformalConfig(coverage=0.6, score="lac"))
    # LAC scores of the true classes: 0.3, 0.5, 0.2, 0.7; rank ceil(5 * 0.6) = 3 -> 0.5
    assert card.thresholds == [pytest.approx(0.5)]
    members = card.sets(np.array([[0.6, 0.3, 0.1], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]]))
    assert set_labels(members, card.classes) == ["c0", "c0|c1", ""]


def test_fitted_on_validation_only() -> None:
    rng = np.random.default_rng(0)
    test = _predictions(*_exchangeable(50, 3, rng), "test")
    with pytest.raises(DataError, match="validation predictions only"):
        fit_conformal(test, NoCalibration(), ConformalConfig())
    with pytest.raises(ValueError, match="fitted on 'val' only"):
        ConformalCard(
            score="lac",
            coverage=0.9,
            mondrian=False,
            classes=["a", "b"],
            thresholds=[0.5],
            fitted_on="test",
            n_fit=[10],
            calibrator={"name": "none"},
        )


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("k", [2, 4])
def test_coverage_on_exchangeable_data(score: str, k: int) -> None:
    """Marginal coverage lies within 2.5 points of the 90% target on 6000 test images
    (binomial SD 0.4 points, plus the finite-validation wobble of about 0.6)."""
    rng = np.random.default_rng(k)
    val = _predictions(*_exchangeable(2000, k, rng), "val")
    test = _predictions(*_exchangeable(6000, k, rng), "test")
    card = fit_conformal(val, NoCalibration(), ConformalConfig(score=score))
    summary = conformal_summary(test, NoCalibration(), card)
    assert abs(summary["coverage"]["value"] - 0.9) < 0.025
    assert (
        summary["coverage"]["ci_low"]
        < summary["coverage"]["value"]
        < summary["coverage"]["ci_high"]
    )
    assert 1 <= summary["mean_set_size"] <= k


def test_mondrian_covers_every_class() -> None:
    """A rare class the model is unsure about is under-covered by marginal sets and covered
    to the target by class-conditional ones."""
    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(3, size=n, p=[0.45, 0.45, 0.1])
        concentration = np.ones((n, 3))
        concentration[np.arange(n), labels] = 6.0
        concentration[labels == 2] = [4.0, 4.0, 1.0]  # class 2 looks like 0 or 1 to the model
        return np.array([rng.dirichlet(a) for a in concentration]), labels

    val, test = _predictions(*draw(6000), "val"), _predictions(*draw(12000), "test")
    marginal = conformal_summary(
        test, NoCalibration(), fit_conformal(val, NoCalibration(), ConformalConfig())
    )
    mondrian_card = fit_conformal(val, NoCalibration(), ConformalConfig(mondrian=True))
    mondrian = conformal_summary(test, NoCalibration(), mondrian_card)
    assert marginal["per_class"]["c2"]["value"] < 0.8
    assert len(mondrian_card.thresholds) == 3
    for entry in mondrian["per_class"].values():
        assert abs(entry["value"] - 0.9) < 0.04


def test_card_round_trip_and_calibrator_check(tmp_path) -> None:
    rng = np.random.default_rng(1)
    val = _predictions(*_exchangeable(200, 3, rng), "val")
    cal = TemperatureScaling(temperature=1.5)
    card = fit_conformal(val, cal, ConformalConfig(score="aps", mondrian=True))
    loaded = ConformalCard.load(card.save(tmp_path / "conformal.json"))
    assert loaded == card
    loaded.check_calibrator(cal, "x")
    with pytest.raises(DataError, match="re-run 'medtl calibrate'"):
        loaded.check_calibrator(NoCalibration(), "x")


def test_unknown_score_names_the_choices() -> None:
    with pytest.raises(ValueError, match="did you mean 'aps'"):
        ConformalConfig(score="apss")
    with pytest.raises(ConfigError):
        SCORES.get("raps")


def test_risk_coverage_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    curve = risk_coverage(probs, np.array([0, 1, 0, 1]), points=5)
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
