"""``calibrate`` then ``evaluate``: the stored calibrator is the one evaluation, ensembles and
the report apply, whatever its kind (temperature, vector or Platt scaling)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtl.artifacts import EvaluationEntry, ModelCard
from medtl.calibrate import Calibrator, ece
from medtl.errors import ConfigError
from medtl.evaluate import (
    CalibrateConfig,
    DataSpec,
    EvaluateConfig,
    ModelSpec,
    calibrate_model,
    evaluate,
)
from medtl.predictions import Predictions
from medtl.report import build_report
from medtl.report.load import load_evaluation
from tests.conftest import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataSpec]:
    """A tiny classifier fine-tuned for two epochs on a phantom (its logits are miscalibrated)."""
    base = tmp_path_factory.mktemp("evaluate")
    root = train_tiny(base, base / "model", lr=3e-3)
    return base / "model", DataSpec(base / "m.csv", root, "phantom")


def _calibrated(trained: tuple[Path, DataSpec], method: str, tmp_path: Path) -> Path:
    folder = tmp_path / method
    shutil.copytree(trained[0], folder)
    calibrate_model(folder, CalibrateConfig(method=method, compare=[]))
    return folder


@pytest.mark.parametrize("method", ["temperature", "vector", "platt"])
def test_evaluation_reports_the_stored_calibrators_ece(
    trained: tuple[Path, DataSpec], method: str, tmp_path: Path
) -> None:
    folder = _calibrated(trained, method, tmp_path)
    own = json.loads((folder / "calibration.json").read_text())
    expected = own["calibrators"][method]["test"]["ece"]
    uncalibrated = own["uncalibrated_test"]["ece"]
    assert expected != pytest.approx(uncalibrated, abs=1e-6)  # so the check below can fail
    path = evaluate(
        [ModelSpec(folder, method)],
        [trained[1]],
        tmp_path / "eval",
        EvaluateConfig(n_boot=100),
        progress=False,
    )
    entry = json.loads(path.read_text())["entries"][0]
    assert entry["status"] == "ok", entry["error"]
    after = entry["metrics"]["calibration"]["after"]
    assert after["ece"]["value"] == pytest.approx(expected, abs=1e-12)
    assert after["calibrator"]["name"] == entry["calibrator"]["name"] == method
    # the report draws its curves and gallery from the same calibrated probabilities
    view = load_evaluation(tmp_path / "eval").entries[0]
    assert view.test is not None
    assert ece(view.test.probs(view.calibrator), view.test.labels) == pytest.approx(expected)
    html = (build_report(tmp_path / "eval", tmp_path / "report").html).read_text()
    label = "T = " if method == "temperature" else f"{method} scaling"
    assert f"After ({label}" in html


def test_ensemble_averages_each_members_calibrated_probabilities(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    folders = [_calibrated(trained, m, tmp_path) for m in ("vector", "platt")]
    path = evaluate(
        [ModelSpec(f, f.name) for f in folders],
        [trained[1]],
        tmp_path / "eval",
        EvaluateConfig(n_boot=100, ensemble=True),
        progress=False,
    )
    entries = json.loads(path.read_text())["entries"]
    # every entry, the ensemble's too, is a typed EvaluationEntry with its schema version
    assert [EvaluationEntry.model_validate(e).schema_version for e in entries] == [1, 1, 1]
    members = [Predictions.load(tmp_path / "eval" / e["predictions"]) for e in entries[:2]]
    cals = [Calibrator.from_dict(e["calibrator"]) for e in entries[:2]]
    combined = Predictions.load(tmp_path / "eval" / entries[2]["predictions"])
    mean = (members[0].probs(cals[0]) + members[1].probs(cals[1])) / 2
    assert np.allclose(combined.probs(), mean, atol=1e-9)
    assert not np.allclose(combined.probs(), (members[0].probs() + members[1].probs()) / 2)


def test_calibration_stores_the_calibrator_and_validation_thresholds_in_the_card(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    folder = _calibrated(trained, "vector", tmp_path)
    card = ModelCard.load(folder / "meta.json")
    val = Predictions.load(folder / "predictions_val.csv")
    assert card.calibrator.name == "vector" and card.temperature is None
    assert set(card.thresholds) == set(val.classes)
    youden = card.thresholds[val.classes[1]]["youden"]
    assert youden is not None and youden in set(val.probs(card.calibrator)[:, 1].tolist())


def test_a_card_from_before_the_schema_version_is_calibrated_and_rewritten(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(trained[0], folder)
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("schema_version", "weights", "source", "genome"):
        meta.pop(key)
    (folder / "meta.json").write_text(json.dumps({**meta, "temperature": 1.0}))
    calibrate_model(folder, CalibrateConfig(method="vector", compare=[]))
    rewritten = json.loads((folder / "meta.json").read_text())
    assert rewritten["schema_version"] == 1 and rewritten["calibrator"]["name"] == "vector"
    assert rewritten["temperature"] is None


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"backbone": 3}'])
def test_a_broken_card_stops_calibrate_and_evaluate_with_one_line(
    trained: tuple[Path, DataSpec], tmp_path: Path, text: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(trained[0], folder)
    (folder / "meta.json").write_text(text)
    with pytest.raises(ConfigError, match=r"meta\.json") as info:
        calibrate_model(folder, CalibrateConfig())
    assert "\n" not in str(info.value) and "re-run 'medtl finetune'" in str(info.value)
    path = evaluate(
        [ModelSpec(folder, "broken")], [trained[1]], tmp_path / "eval", EvaluateConfig(n_boot=100)
    )
    entry = json.loads(path.read_text())["entries"][0]
    assert entry["status"] == "failed" and "meta.json" in entry["error"]


def test_conformal_sets_are_fitted_on_validation_and_measured_on_test(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    from medtl.conformal import ConformalCard, ConformalConfig, conformal_summary, fit_conformal

    folder = tmp_path / "m"
    shutil.copytree(trained[0], folder)
    cfg = CalibrateConfig(compare=[], conformal=ConformalConfig(coverage=0.8, score="aps"))
    calibrate_model(folder, cfg)
    card, model_card = (
        ConformalCard.load(folder / "conformal.json"),
        ModelCard.load(folder / "meta.json"),
    )
    val = Predictions.load(folder / "predictions_val.csv")
    assert card == fit_conformal(val, model_card.calibrator, cfg.conformal)
    path = evaluate(
        [ModelSpec(folder, "m")],
        [trained[1]],
        tmp_path / "eval",
        EvaluateConfig(n_boot=100),
        progress=False,
    )
    entry = json.loads(path.read_text())["entries"][0]
    test = Predictions.load(tmp_path / "eval" / entry["predictions"])
    expected = conformal_summary(test, model_card.calibrator, card)
    assert entry["conformal"]["coverage"] == pytest.approx(expected["coverage"])
    assert entry["conformal"]["fitted_on"] == "val" and entry["conformal"]["measured_on"] == "test"
    html = build_report(tmp_path / "eval", tmp_path / "report").html.read_text()
    assert "Conformal prediction sets (test split)" in html
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["entries"][0]["conformal"]["coverage"] == entry["conformal"]["coverage"]


def test_site_thresholds_are_chosen_on_the_sites_calibration_split(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    from medtl.metrics import choose_thresholds

    folder = _calibrated(trained, "temperature", tmp_path)
    cfg = EvaluateConfig(n_boot=100, splits=["val", "test"])
    both = evaluate([ModelSpec(folder, "m")], [trained[1]], tmp_path / "plain", cfg, progress=False)
    val_entry = json.loads(both.read_text())["entries"][0]
    site_val = Predictions.load(tmp_path / "plain" / val_entry["predictions"])
    card = ModelCard.load(folder / "meta.json")

    cfg = EvaluateConfig(n_boot=100, site_split="val")
    path = evaluate([ModelSpec(folder, "m")], [trained[1]], tmp_path / "eval", cfg, progress=False)
    entry = json.loads(path.read_text())["entries"][0]
    assert entry["status"] == "ok", entry["error"]
    site = entry["site_thresholds"]["malignant"]
    assert site["chosen_on"] == "phantom/val"
    assert site["thresholds"] == choose_thresholds(
        site_val.probs(card.calibrator), site_val.labels, 1
    )
    html = build_report(tmp_path / "eval", tmp_path / "report").html.read_text()
    assert "Thresholds re-chosen on the site" in html and "model&#x27;s validation" in html


def test_site_split_that_is_evaluated_is_refused(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    cfg = EvaluateConfig(splits=["test"], site_split="test")
    with pytest.raises(ConfigError, match="never tested on it"):
        evaluate([ModelSpec(trained[0], "m")], [trained[1]], tmp_path / "e", cfg, progress=False)
    assert not (tmp_path / "e").exists()
