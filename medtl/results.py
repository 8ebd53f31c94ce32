"""Typed results of the last three stages: calibration, evaluation and the report.

Like the cards in :mod:`medtl.artifacts`, each is a pydantic model with a ``schema_version``,
checked before it is written (atomically, :func:`medtl.io.write_json`) and validated when read,
so an older or hand-edited file stops with one line naming the file, the key and the fix:

- :class:`CalibrationRecord` (``calibration.json`` in the model folder and in
  ``<run>/calibrate/``): the chosen calibrator and every compared one measured on test.
- :class:`EvaluationResults` (``evaluation.json``): the header, one
  :class:`~medtl.artifacts.EvaluationEntry` per model x dataset x split, and the DeLong
  comparisons.
- :class:`ReportSummary` (``report.json``): the numbers of ``report.html``.

Files written before these had a ``schema_version`` hold the same keys and read as version 1.
The report reads ``evaluation.json`` entry by entry (:mod:`medtl.report.load`), showing an
invalid entry as failed instead of refusing the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from medtl.artifacts import CalibratorField, EvaluationEntry, UnversionedIsCurrent
from medtl.conformal import ConformalCard
from medtl.io import finite, write_json

CALIBRATION_VERSION = 1
EVALUATION_VERSION = 1
REPORT_VERSION = 1

CALIBRATION_FILE = "calibration.json"
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- calibrate ---------------------------------------------------------------------------------
class CalibrationMeasures(_Strict):
    """Every calibration measure of one set of probabilities
    (:func:`medtl.calibrate.calibration_summary`); an undefined value is ``null``."""

    n: int
    n_bins: int
    ece: float | None
    adaptive_ece: float | None
    classwise_ece: float | None
    mce: float | None
    brier: float | None
    nll: float | None
    slope: float | None
    slope_ci_low: float | None
    slope_ci_high: float | None
    intercept: float | None
    intercept_ci_low: float | None
    intercept_ci_high: float | None
    slope_outcome: str
    reliability: dict[str, list[float | None]]


class ComparedCalibrator(_Strict):
    """One calibrator fitted on validation and measured on test (``null`` without a test split)."""

    fitted_on: Literal["val"]
    params: CalibratorField
    test: CalibrationMeasures | None


class CalibrationRecord(UnversionedIsCurrent):
    """``calibration.json``: which calibrator the model card now holds (``method``), every
    compared calibrator, the uncalibrated test measures and the conformal predictor fitted."""

    VERSION: ClassVar[int] = CALIBRATION_VERSION
    RERUN: ClassVar[str] = "re-run 'medtl calibrate' on the model folder"
    schema_version: int = CALIBRATION_VERSION
    method: str
    calibrators: dict[str, ComparedCalibrator]
    uncalibrated_test: CalibrationMeasures | None
    conformal: ConformalCard

    @property
    def chosen(self) -> ComparedCalibrator:
        return self.calibrators[self.method]


# -- evaluate ----------------------------------------------------------------------------------
class Comparison(_Strict):
    """DeLong per class between two models on the same dataset and split."""

    dataset: str
    split: str
    model_a: str
    model_b: str
    delong: dict[str, Any]


class EvaluationResults(UnversionedIsCurrent):
    """``evaluation.json``: every model on every dataset and split (``medtl evaluate``)."""

    VERSION: ClassVar[int] = EVALUATION_VERSION
    RERUN: ClassVar[str] = "re-run 'medtl evaluate'"
    schema_version: int = EVALUATION_VERSION
    medtl_version: str
    created: str
    n_boot: int
    seed: int
    entries: list[EvaluationEntry]
    comparisons: list[Comparison] = Field(default_factory=list)

    def failures(self) -> list[str]:
        """``model on dataset/split: error`` for each failed entry."""
        return [
            f"{e.model} on {e.dataset}/{e.split}: {e.error}"
            for e in self.entries
            if e.status != "ok"
        ]


# -- report ------------------------------------------------------------------------------------
class ReportInfo(_Strict):
    medtl_version: str
    created: str
    ranked_by: Literal["clean", "official"]


class ReportFailure(_Strict):
    model: str
    dataset: str
    split: str
    error: str


class ReportEntry(_Strict):
    """One ok entry as the report shows it (the evaluation's record, leak ids removed)."""

    model: str
    dataset: str
    split: str
    anchor: str
    run: dict[str, Any]
    model_dir: str | None
    manifest: str | None
    predictions: str | None
    val_predictions: str | None
    temperature: float | None
    calibrator: dict[str, Any] | None
    model_meta: dict[str, Any] | None
    data: dict[str, Any] | None
    leaks: dict[str, Any] | None
    conformal: dict[str, Any] | None
    site_thresholds: dict[str, Any] | None
    metrics: dict[str, Any]
    notes: list[str]
    gallery: dict[str, Any]
    explanations: dict[str, Any] | None = None


class ReportSummary(UnversionedIsCurrent):
    """``report.json``: the same numbers as ``report.html`` and ``tables.csv``."""

    VERSION: ClassVar[int] = REPORT_VERSION
    RERUN: ClassVar[str] = "re-run 'medtl report'"
    schema_version: int = REPORT_VERSION
    report: ReportInfo
    evaluation: dict[str, Any] = Field(description="the evaluation.json header")
    leaderboard: list[dict[str, Any]]
    failures: list[ReportFailure]
    entries: list[ReportEntry]
    comparisons: list[dict[str, Any]]
    tables: list[dict[str, Any]]


R = TypeVar("R", bound=UnversionedIsCurrent)


def save_checked(cls: type[R], data: dict[str, Any], path: Path) -> R:
    """Validate ``data`` as ``cls`` (a bug stops here, not in the next stage), then write the
    dict itself with its ``schema_version``, so every key and number stays as it was computed
    (a model dump would add absent optional keys as ``null``)."""
    data = finite({"schema_version": cls.VERSION, **data})
    checked = cls.model_validate(data)
    write_json(path, data)
    return checked
