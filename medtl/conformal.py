"""Split-conformal prediction sets, fitted on VALIDATION predictions and applied unchanged.

A conformal predictor turns calibrated probabilities ``probs: [N, K]`` into a set of classes
per image that holds the true class with probability at least ``coverage`` (marginally, or
per class with the class-conditional "Mondrian" option), provided new images are exchangeable
with the validation images (Vovk et al. 2005; Angelopoulos & Bates 2021, arXiv:2107.07511).

Scores are registered by name in :data:`SCORES`:

- ``lac``: least ambiguous classifier (Sadinle et al. 2019), score ``1 - p_y``: the smallest
  sets on average, possibly empty for an image no class is likely for.
- ``aps``: adaptive prediction sets (Romano et al. 2020), deterministic form: score = the
  probability mass of the classes ranked strictly above ``y``. Sets grow down the ranking
  until they hold the fitted mass, so uncertain images get larger sets; the top class is
  always in the set (never empty). The randomised form is not used, so that an image's set
  does not depend on a random draw; including ``y``'s own mass instead would put every
  binary runner-up at score 1 and make the sets of a two-class task all-or-top.

The threshold is the ``ceil((n + 1) * coverage)``-th smallest validation score (all classes
when that exceeds ``n``). The fitted predictor is a typed artifact (:class:`ConformalCard`,
``conformal.json`` beside the model card) that ``medtl predict`` and ``medtl evaluate`` apply.
Hand-written rather than taken from MAPIE / crepes: neither is a dependency, and the
construction is a quantile and a comparison.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medtl.artifacts import Artifact, read_artifact
from medtl.calibrate import Calibrator
from medtl.errors import DataError
from medtl.metrics import proportion_entry
from medtl.predictions import Predictions
from medtl.registry import Registry

CONFORMAL_FILE = "conformal.json"
CONFORMAL_VERSION = 1


# -- scores -----------------------------------------------------------------------------------
class Score(ABC):
    """A nonconformity score: large when class ``k`` fits image ``i`` badly."""

    name: ClassVar[str] = ""

    @staticmethod
    @abstractmethod
    def all_classes(probs: np.ndarray) -> np.ndarray:
        """Score ``[N, K]`` of every class for every image; a class is in the set when its
        score is at most the fitted threshold."""

    @classmethod
    def of_labels(cls, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Score ``[N]`` of each image's true class."""
        return cls.all_classes(probs)[np.arange(len(labels)), labels]


SCORES: Registry[type[Score]] = Registry("conformal score")


@SCORES.register("lac")
class LAC(Score):
    """``1 - p_k``."""

    name = "lac"

    @staticmethod
    def all_classes(probs: np.ndarray) -> np.ndarray:
        return 1.0 - probs


@SCORES.register("aps")
class APS(Score):
    """Mass of the classes ranked strictly above ``k`` (descending probability; ties by index)."""

    name = "aps"

    @staticmethod
    def all_classes(probs: np.ndarray) -> np.ndarray:
        order = np.argsort(-probs, axis=1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        out = np.empty_like(probs)
        np.put_along_axis(out, order, cumulative, axis=1)
        return out - probs


# -- the recipe's settings --------------------------------------------------------------------
class ConformalConfig(BaseModel):
    """``calibrate.conformal``: how the prediction sets are fitted on validation."""

    model_config = ConfigDict(extra="forbid")

    coverage: float = Field(
        0.9, gt=0, lt=1, description="target share of images whose set holds the true class"
    )
    score: str = Field("lac", description="nonconformity score: lac (smallest sets) or aps")
    mondrian: bool = Field(
        False,
        description="class-conditional (Mondrian) thresholds: the coverage holds for each class, "
        "not only on average; needs enough validation images of every class",
    )

    @field_validator("score")
    @classmethod
    def _known(cls, name: str) -> str:
        return SCORES.validate(name)


# -- the fitted predictor ---------------------------------------------------------------------
class ConformalCard(Artifact):
    """A fitted split-conformal predictor (``conformal.json`` beside ``meta.json``).

    ``thresholds`` has one entry (marginal) or one per class (Mondrian); ``null`` means the
    validation split had too few images for the coverage, so the set holds every class.
    ``calibrator`` is the record of the calibrator whose probabilities were scored; applying
    the predictor with another calibrator is refused.
    """

    VERSION: ClassVar[int] = CONFORMAL_VERSION
    schema_version: int = CONFORMAL_VERSION
    score: str
    coverage: float = Field(gt=0, lt=1)
    mondrian: bool
    classes: list[str] = Field(min_length=2)
    thresholds: list[float | None]
    fitted_on: str = Field(description="the split the thresholds were fitted on: always 'val'")
    n_fit: list[int] = Field(description="validation images behind each threshold")
    calibrator: dict[str, Any]

    @field_validator("score")
    @classmethod
    def _known(cls, name: str) -> str:
        return SCORES.validate(name)

    @model_validator(mode="after")
    def _consistent(self) -> ConformalCard:
        if self.fitted_on != "val":
            raise ValueError(
                f"fitted_on is {self.fitted_on!r}: conformal sets are fitted on 'val' only"
            )
        want = len(self.classes) if self.mondrian else 1
        if len(self.thresholds) != want or len(self.n_fit) != want:
            raise ValueError(
                f"{len(self.thresholds)} thresholds for {'Mondrian' if self.mondrian else 'marginal'}"
                f" sets over {len(self.classes)} classes; expected {want}"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> ConformalCard:
        return read_artifact(cls, path, "re-run 'medtl calibrate' on the model folder")

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """Membership ``[N, K]`` (bool) of each class in each image's prediction set."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.classes):
            raise DataError(
                f"probabilities of shape {probs.shape} do not fit the conformal predictor's "
                f"{len(self.classes)} classes {self.classes}"
            )
        scores = SCORES.get(self.score).all_classes(probs)
        q = np.array([math.inf if t is None else t for t in self.thresholds])
        return scores <= q[None, :] + 1e-12  # q: [1] (marginal) or [K] (Mondrian)

    def check_calibrator(self, calibrator: Calibrator, where: Path | str) -> None:
        """Refuse a calibrator other than the one the sets were fitted with."""
        if calibrator.to_dict() != self.calibrator:
            raise DataError(
                f"{where}: the conformal sets were fitted with calibrator {self.calibrator} but "
                f"the model card now holds {calibrator.to_dict()}; re-run 'medtl calibrate'"
            )


def conformal_quantile(scores: np.ndarray, coverage: float) -> float | None:
    """The ``ceil((n + 1) * coverage)``-th smallest of ``scores``; None (every class) when
    that rank exceeds ``n``."""
    n = len(scores)
    rank = math.ceil((n + 1) * coverage - 1e-9)
    if rank > n:
        return None
    return float(np.sort(scores)[rank - 1])


def fit_conformal(val: Predictions, calibrator: Calibrator, cfg: ConformalConfig) -> ConformalCard:
    """Fit on the labelled rows of VALIDATION predictions, scored on ``calibrator``'s
    probabilities. Predictions of any other split are refused: the test split never chooses."""
    if val.split != "val":
        raise DataError(
            f"conformal sets are fitted on validation predictions only; these are of split "
            f"{val.split!r} (model {val.model or '(unnamed)'})"
        )
    keep = val.labels >= 0
    if not keep.any():
        raise DataError("the validation predictions have no labelled rows to fit conformal sets on")
    probs, labels = calibrator.probs(val.logits[keep]), val.labels[keep]
    scores = SCORES.get(cfg.score).of_labels(probs, labels)
    every = [np.ones(len(labels), dtype=bool)]
    groups = [labels == k for k in range(len(val.classes))] if cfg.mondrian else every
    return ConformalCard(
        score=cfg.score,
        coverage=cfg.coverage,
        mondrian=cfg.mondrian,
        classes=list(val.classes),
        thresholds=[conformal_quantile(scores[g], cfg.coverage) for g in groups],
        fitted_on="val",
        n_fit=[int(g.sum()) for g in groups],
        calibrator=calibrator.to_dict(),
    )


# -- measuring the sets on a labelled split ---------------------------------------------------
def set_labels(members: np.ndarray, classes: list[str]) -> list[str]:
    """Each row's set as text, classes joined by ``|`` in class order (``""`` for empty)."""
    return ["|".join(c for c, m in zip(classes, row, strict=True) if m) for row in members]


def risk_coverage(
    probs: np.ndarray, labels: np.ndarray, points: int = 21
) -> dict[str, list[float]]:
    """Selective risk of the argmax decision when abstaining on the least confident images:
    for each share kept (``coverage``, the most confident by max probability first), the error
    rate among the kept images."""
    order = np.argsort(-probs.max(axis=1), kind="stable")
    wrong = (probs.argmax(axis=1) != labels)[order]
    n = len(labels)
    shares = np.linspace(0, 1, points)[1:]
    kept = np.maximum(1, np.round(shares * n).astype(int))
    risk = np.cumsum(wrong)[kept - 1] / kept
    return {"coverage": (kept / n).tolist(), "risk": risk.tolist()}


def conformal_summary(
    test: Predictions, calibrator: Calibrator, card: ConformalCard
) -> dict[str, Any]:
    """Coverage (overall and per class, Wilson intervals), set sizes, abstentions and the
    risk-coverage curve of the fitted sets on a labelled split (normally test)."""
    keep = test.labels >= 0
    if not keep.any():
        raise DataError(f"split {test.split!r} has no labelled rows to measure conformal coverage")
    probs, labels = calibrator.probs(test.logits[keep]), test.labels[keep]
    members = card.sets(probs)
    covered = members[np.arange(len(labels)), labels]
    sizes = members.sum(axis=1)
    per_class = {
        c: proportion_entry(int(covered[labels == k].sum()), int((labels == k).sum()))
        for k, c in enumerate(card.classes)
    }
    singles = sizes == 1
    return {
        "score": card.score,
        "mondrian": card.mondrian,
        "target": card.coverage,
        "fitted_on": card.fitted_on,
        "measured_on": test.split,
        "n": len(labels),
        "coverage": proportion_entry(int(covered.sum()), len(labels)),
        "per_class": per_class,
        "mean_set_size": float(sizes.mean()),
        "set_sizes": {str(s): int((sizes == s).sum()) for s in range(len(card.classes) + 1)},
        "abstain": proportion_entry(int((~singles).sum()), len(labels)),
        "singleton_accuracy": proportion_entry(int((singles & covered).sum()), int(singles.sum())),
        "risk_coverage": risk_coverage(probs, labels),
    }
