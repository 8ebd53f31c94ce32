"""The typed results of calibrate, evaluate and report: each round-trips through the file its
stage writes, a file from before the schema version reads as version 1, and a hand-edited file
with a wrong key stops with one line naming the file, the key and the command that rewrites it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medtl.errors import ConfigError
from medtl.evaluate import CalibrateConfig, DataSpec, EvaluateConfig, ModelSpec
from medtl.pipeline import CalibrateStage, EvaluateStage, ReportStage
from medtl.results import CalibrationRecord, EvaluationResults, ReportSummary
from tests.conftest import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model calibrated, evaluated and reported through the stage objects."""
    base = tmp_path_factory.mktemp("results")
    root = train_tiny(base, base / "model", lr=3e-3)
    CalibrateStage(CalibrateConfig(method="vector")).calibrate(base / "model")
    data = DataSpec(base / "m.csv", root, "phantom")
    EvaluateStage(EvaluateConfig(n_boot=100)).evaluate(
        [ModelSpec(base / "model", "tiny")], [data], base / "eval", progress=False
    )
    ReportStage().report(base / "eval", base / "report")
    return {
        "calibration": base / "model" / "calibration.json",
        "evaluation": base / "eval" / "evaluation.json",
        "report": base / "report" / "report.json",
    }


MODELS: dict[str, Any] = {
    "calibration": (CalibrationRecord, "re-run 'medtl calibrate'"),
    "evaluation": (EvaluationResults, "re-run 'medtl evaluate'"),
    "report": (ReportSummary, "re-run 'medtl report'"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_result_round_trips_through_its_file(
    stages: dict[str, Path], name: str, tmp_path: Path
) -> None:
    cls, _ = MODELS[name]
    written = json.loads(stages[name].read_text())
    assert written["schema_version"] == 1
    result = cls.load(stages[name])
    again = cls.load(result.save(tmp_path / stages[name].name))
    assert again == result
    # the file keeps the keys its stage wrote: dumping without unset keys gives them back
    assert result.model_dump(mode="json", exclude_unset=True) == written


def edited(source: Path, edit: Callable[[dict[str, Any]], Any], folder: Path) -> Path:
    """A copy of the JSON file ``source`` in ``folder``, changed by ``edit``."""
    data = json.loads(source.read_text())
    edit(data)
    path = folder / source.name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_a_file_from_before_the_schema_version_reads_as_version_1(
    stages: dict[str, Path], name: str, tmp_path: Path
) -> None:
    cls, _ = MODELS[name]
    path = edited(stages[name], lambda d: d.pop("schema_version"), tmp_path)
    assert cls.load(path) == cls.load(stages[name])


EDITS = {  # a hand edit per file, and the key the message must name
    "calibration": (
        lambda d: d.update(metod=d.pop("method")),
        "key 'metod': not a key of this file; did you mean 'method'?",
    ),
    "evaluation": (lambda d: d["entries"][0].update(status="done"), "key 'entries.0.status'"),
    "report": (lambda d: d["report"].update(ranked_by="best"), "key 'report.ranked_by'"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_hand_edited_file_is_one_line_naming_the_file_the_key_and_the_fix(
    stages: dict[str, Path], name: str, tmp_path: Path
) -> None:
    cls, fix = MODELS[name]
    edit, key = EDITS[name]
    path = edited(stages[name], edit, tmp_path)
    with pytest.raises(ConfigError) as info:
        cls.load(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and key in text and fix in text, text


def test_the_calibration_record_names_the_calibrator_the_card_holds(
    stages: dict[str, Path],
) -> None:
    from medtl.artifacts import ModelCard

    record = CalibrationRecord.load(stages["calibration"])
    card = ModelCard.load(stages["calibration"].parent / "meta.json")
    assert record.method == "vector" and record.chosen.params == card.calibrator
    assert record.chosen.test is not None and record.uncalibrated_test is not None
    assert record.chosen.test.ece != pytest.approx(record.uncalibrated_test.ece, abs=1e-9)


def test_a_newer_schema_version_is_refused_with_one_line(
    stages: dict[str, Path], tmp_path: Path
) -> None:
    path = edited(stages["evaluation"], lambda d: d.update(schema_version=99), tmp_path)
    with pytest.raises(ConfigError, match=r"key 'schema_version'.*upgrade medtl"):
        EvaluationResults.load(path)


def test_the_report_names_a_hand_edited_evaluation_header_in_one_line(
    stages: dict[str, Path], tmp_path: Path
) -> None:
    """The report reads ``evaluation.json`` entry by entry, but its header is validated whole."""
    from medtl.errors import DataError
    from medtl.report import build_report

    folder = tmp_path / "eval"
    folder.mkdir()
    path = edited(stages["evaluation"], lambda d: d.update(nboot=d.pop("n_boot")), folder)
    with pytest.raises(DataError) as info:
        build_report(folder, tmp_path / "report")
    text = str(info.value)
    assert "\n" not in text and str(path) in text, text
    assert "key 'nboot': not a key of this file; did you mean 'n_boot'?" in text
