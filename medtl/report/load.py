"""Read an evaluation folder written by ``medtl evaluate`` into what the report draws.

The folder holds ``evaluation.json`` (one entry per model x dataset x split, plus DeLong
comparisons) and the prediction files it names. Reading never fails on one bad entry: a failed
or incomplete entry is kept with its error message, a missing prediction file becomes a note.
Absolute data-root paths are replaced in every string, so no report shows where images live.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from medtl.artifacts import entry_problem, first_problem
from medtl.calibrate import Calibrator, TemperatureScaling, as_calibrator
from medtl.errors import DataError, MedtlError
from medtl.predictions import Predictions
from medtl.results import EVALUATION_FILE, EvaluationResults


@dataclass
class EntryView:
    """One model on one dataset split, as the report shows it.

    ``record`` is the entry of ``evaluation.json`` (data roots redacted); ``test`` holds the
    test predictions when their file could be read; ``notes`` are the report's own notes
    (missing files, skipped figures), shown beside the evaluation's notes.
    """

    index: int
    record: dict[str, Any]
    test: Predictions | None = None
    notes: list[str] = field(default_factory=list)
    invalid: str | None = None  # why the record is not a valid EvaluationEntry

    @property
    def anchor(self) -> str:
        return f"entry-{self.index + 1}"

    @property
    def model(self) -> str:
        return str(self.record.get("model") or f"entry {self.index + 1}")

    @property
    def dataset(self) -> str:
        return str(self.record.get("dataset") or "?")

    @property
    def split(self) -> str:
        return str(self.record.get("split") or "?")

    @property
    def ok(self) -> bool:
        return (
            self.invalid is None
            and self.record.get("status") == "ok"
            and isinstance(self.record.get("metrics"), dict)
        )

    @property
    def error(self) -> str:
        if self.invalid is not None:
            return f"not a valid evaluation entry ({self.invalid}); run 'medtl evaluate' again"
        if self.record.get("status") == "ok":
            return "the entry is marked ok but holds no metrics"
        return str(self.record.get("error") or "failed (no message given)")

    @property
    def metrics(self) -> dict[str, Any]:
        out = self.record.get("metrics")
        return out if isinstance(out, dict) else {}

    @property
    def temperature(self) -> float:
        t = as_float(self.record.get("temperature", 1.0))
        return t if math.isfinite(t) and t > 0 else 1.0

    @property
    def calibrator(self) -> Calibrator:
        """The calibrator the evaluation applied (its record), else the entry's temperature."""
        record = self.record.get("calibrator")
        if isinstance(record, dict):
            try:
                return Calibrator.from_dict(record)
            except (MedtlError, TypeError, ValueError):
                pass
        t = self.temperature
        return TemperatureScaling(temperature=t) if t != 1.0 else as_calibrator(1.0)


@dataclass
class Evaluation:
    """The whole evaluation folder: header fields, entries and comparisons."""

    folder: Path
    header: dict[str, Any]
    entries: list[EntryView]
    comparisons: list[dict[str, Any]]

    @property
    def ok_entries(self) -> list[EntryView]:
        return [e for e in self.entries if e.ok]

    @property
    def failed_entries(self) -> list[EntryView]:
        return [e for e in self.entries if not e.ok]


def as_float(value: Any) -> float:
    """``value`` as a float; None, strings and other non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def load_evaluation(folder: Path, data_roots: dict[str, Path] | None = None) -> Evaluation:
    """Read ``folder/evaluation.json`` and the test predictions of every ok entry."""
    raw = _read_json(folder / EVALUATION_FILE)
    _check_header(raw, folder / EVALUATION_FILE)
    raw = redact(raw, root_replacements(data_roots or {}))
    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, list):
        raise DataError(f"{folder / EVALUATION_FILE}: 'entries' must be a list of entries")
    entries = [
        EntryView(i, e if isinstance(e, dict) else {}, invalid=entry_problem(e))
        for i, e in enumerate(entries_raw)
    ]
    for entry in entries:
        if entry.ok:
            _attach_predictions(entry, folder)
    comparisons = [c for c in raw.get("comparisons") or [] if isinstance(c, dict)]
    header = {k: v for k, v in raw.items() if k not in ("entries", "comparisons")}
    return Evaluation(folder, header, entries, comparisons)


def _check_header(raw: dict[str, Any], path: Path) -> None:
    """Everything but the entries validated as :class:`~medtl.results.EvaluationResults` (the
    entries are validated one by one: an invalid one is shown as failed)."""
    try:
        EvaluationResults.model_validate({**raw, "entries": []})
    except ValidationError as exc:
        key, message = first_problem(exc)
        raise DataError(f"{path}: key '{key}': {message}; run 'medtl evaluate' again") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; point 'medtl report' at a folder written by 'medtl evaluate'"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); run 'medtl evaluate' again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object with 'entries'")
    return data


def _attach_predictions(entry: EntryView, folder: Path) -> None:
    """Load the entry's test predictions, or note why curves and the gallery are missing."""
    rel = entry.record.get("predictions")
    if not rel:
        entry.notes.append("no test prediction file: ROC / PR curves and the gallery are omitted")
        return
    try:
        pred = Predictions.load(folder / str(rel))
    except (MedtlError, OSError, ValueError) as exc:
        reason = str(exc).replace(str(folder), "<evaluation folder>")
        entry.notes.append(f"test predictions unreadable ({reason}): curves and gallery omitted")
        return
    classes = entry.metrics.get("classes")
    if classes is not None and list(classes) != pred.classes:
        entry.notes.append(
            f"prediction file classes {pred.classes} differ from the metrics' classes "
            f"{classes}: curves and gallery omitted"
        )
        return
    if not np.isfinite(pred.logits).all():
        entry.notes.append("test predictions hold NaN logits: curves and gallery omitted")
        return
    entry.test = pred


# -- redaction -------------------------------------------------------------------------------
def root_replacements(data_roots: dict[str, Path]) -> list[tuple[str, str]]:
    """``(absolute path text, placeholder)`` pairs for every data root, longest first."""
    pairs: dict[str, str] = {}
    for name, root in data_roots.items():
        label = f"<data root of {name}>"
        for text in {str(root), os.path.abspath(root), str(Path(root).resolve())}:
            if len(text) > 1:
                pairs.setdefault(text.rstrip("/"), label)
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def redact(obj: Any, replacements: list[tuple[str, str]]) -> Any:
    """A copy of ``obj`` (JSON-like) with every data-root path replaced in every string."""
    if not replacements:
        return obj
    if isinstance(obj, str):
        for text, label in replacements:
            obj = obj.replace(text, label)
        return obj
    if isinstance(obj, dict):
        return {redact(k, replacements): redact(v, replacements) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, replacements) for v in obj]
    return obj


def resolve_manifest(record: dict[str, Any], folder: Path) -> Path | None:
    """The entry's manifest CSV: absolute as given, else beside the evaluation folder or cwd."""
    rel = record.get("manifest")
    if not rel:
        return None
    path = Path(str(rel))
    if path.is_absolute():
        return path
    for base in (folder, Path.cwd()):
        if (base / path).is_file():
            return base / path
    return folder / path


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats replaced by None, so that ``report.json`` is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj
