"""Per-sample predictions: the hand-off from fine-tuning / evaluation to calibration and reports.

A prediction file is a CSV (``id, group, label, logit_<class>...``) with a JSON sidecar
(``classes``, ``split``, ``model``, ``manifest_sha256``). Logits, not probabilities, are stored
so that any calibration can be fitted and applied later; every row carries the manifest row id
and group, so every figure can be recomputed and bootstrapped by patient / lesion / cluster.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medtl.errors import DataError
from medtl.io import atomic_write_text, write_json

if TYPE_CHECKING:
    from medtl.calibrate import Calibrator


@dataclass
class Predictions:
    """``logits``: float ``[N, K]``; ``labels``: int ``[N]`` (-1 = unlabelled)."""

    ids: list[str]
    groups: list[str]
    labels: np.ndarray
    logits: np.ndarray
    classes: list[str]
    split: str
    model: str = ""
    manifest_sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.logits = np.asarray(self.logits, dtype=np.float64)
        n = len(self.ids)
        if (
            self.logits.ndim != 2
            or self.logits.shape[0] != n
            or len(self.groups) != n
            or len(self.labels) != n
        ):
            raise DataError(
                f"predictions of {self.model or 'a model'} are inconsistent: {n} ids, "
                f"{len(self.groups)} groups, {len(self.labels)} labels, logits {self.logits.shape}"
            )
        if self.logits.shape[1] != len(self.classes):
            raise DataError(
                f"predictions of {self.model or 'a model'} have {self.logits.shape[1]} logit columns "
                f"but {len(self.classes)} classes {self.classes}"
            )

    def probs(self, calibration: Calibrator | float = 1.0) -> np.ndarray:
        """Probabilities ``[N, K]``: the calibrator's, or the softmax of ``logits / temperature``
        when ``calibration`` is a number."""
        if not isinstance(calibration, numbers.Real):  # numpy scalars are Real too
            return calibration.probs(self.logits)  # type: ignore[union-attr]
        z = self.logits / float(calibration)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "group", "label", *[f"logit_{c}" for c in self.classes]])
        for i, row_id in enumerate(self.ids):
            writer.writerow(
                [
                    row_id,
                    self.groups[i],
                    int(self.labels[i]),
                    *(repr(float(v)) for v in self.logits[i]),
                ]
            )
        atomic_write_text(path, buffer.getvalue())
        meta = {
            "classes": self.classes,
            "split": self.split,
            "model": self.model,
            "manifest_sha256": self.manifest_sha256,
            **self.extra,
        }
        write_json(path.with_suffix(".json"), meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        path = Path(path)
        side = path.with_suffix(".json")
        if not path.is_file() or not side.is_file():
            raise DataError(f"prediction file {path} (with its {side.name}) does not exist")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(
                f"prediction sidecar {side} is not valid JSON ({exc}); the file is truncated or "
                "corrupt: run the stage that wrote it again"
            ) from None
        if not isinstance(meta, dict):
            raise DataError(f"prediction sidecar {side} does not hold a JSON object")
        classes = list(meta.get("classes", []))
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            expected = ["id", "group", "label", *[f"logit_{c}" for c in classes]]
            if header != expected:
                raise DataError(
                    f"{path}: columns {header} do not match the classes {classes} of {side.name}"
                )
            rows = list(reader)
        try:
            logits = np.array([[float(v) for v in r[3:]] for r in rows], dtype=np.float64).reshape(
                len(rows), len(classes)
            )
            labels = np.array([int(r[2]) for r in rows], dtype=np.int64)
        except ValueError as exc:
            raise DataError(f"{path}: a label or logit is not a number ({exc})") from None
        extra = {
            k: v
            for k, v in meta.items()
            if k not in {"classes", "split", "model", "manifest_sha256"}
        }
        return cls(
            [r[0] for r in rows],
            [r[1] for r in rows],
            labels,
            logits,
            classes,
            meta.get("split", ""),
            meta.get("model", ""),
            meta.get("manifest_sha256", ""),
            extra,
        )
