"""Ensembles chosen on validation: which members, with which weights, from their val predictions.

An ensemble averages its members' CALIBRATED probabilities (each member's ``card.calibrator``
applied, as :func:`medtl.metrics.ensemble` does), with weights chosen on the VALIDATION split
only: greedy forward selection with replacement on the validation log-loss (Caruana et al.,
ICML 2004), equal weights, or weights the recipe fixes. Choosing reads each member's
``meta.json`` and ``predictions_val.csv`` and nothing else; the choice is written as a typed
:class:`EnsembleCard`, and evaluation then measures the ensemble on test like any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtl import __version__
from medtl.artifacts import Artifact, ModelCard, read_artifact
from medtl.errors import ConfigError, DataError
from medtl.evaluate import ModelSpec
from medtl.predictions import Predictions

ENSEMBLE_CARD_VERSION = 1
THIS = "this"  # the member name of the run's own model in a recipe


class EnsembleConfig(BaseModel):
    """The ``ensemble`` recipe section: members and how their weights are chosen (on val)."""

    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(
        default_factory=lambda: [THIS],
        description="model or run folders as FOLDER[@NAME] ('this' = the run's own model); "
        "every member must be fine-tuned on the run's manifest",
        min_length=1,
    )
    select: Literal["greedy", "equal", "fixed"] = Field(
        "greedy",
        description="greedy: forward selection with replacement on the validation log-loss; "
        "equal: every member alike; fixed: the given weights",
    )
    weights: list[float] | None = Field(
        None, description="one weight per member (select: fixed only); normalised to sum 1"
    )
    rounds: int = Field(
        20,
        ge=1,
        le=1000,
        description="greedy rounds: each adds one member; the round with the lowest "
        "validation log-loss gives the weights (member counts / round)",
    )

    @model_validator(mode="after")
    def _weights_fit(self) -> EnsembleConfig:
        if (self.select == "fixed") != (self.weights is not None):
            raise ValueError("weights are given exactly when select is 'fixed'")
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(
                    f"{len(self.weights)} weights for {len(self.members)} members; give one each"
                )
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return self


class EnsembleMember(BaseModel):
    """One member: its model folder, the calibrator applied and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    folder: str
    calibrator: dict[str, object]
    weight: float = Field(ge=0)
    val_log_loss: float = Field(description="the member alone, calibrated, on validation")


class EnsembleCard(Artifact):
    """How an ensemble was chosen (``ensemble.json`` beside the evaluation)."""

    VERSION: ClassVar[int] = ENSEMBLE_CARD_VERSION
    schema_version: int = ENSEMBLE_CARD_VERSION
    medtl_version: str
    select: str
    rounds: int
    chosen_on: Literal["val"] = "val"
    manifest_sha256: str
    n_val: int
    members: list[EnsembleMember] = Field(min_length=1)
    val_log_loss: float = Field(description="the weighted ensemble on validation")
    val_log_loss_equal: float = Field(description="equal weights on validation, for reference")
    trace: list[float] = Field(
        default_factory=list, description="greedy: validation log-loss after each round"
    )

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    @property
    def label(self) -> str:
        """``ensemble(0.65 a + 0.35 b)``: the members with a weight, as the report names it."""
        kept = [m for m in self.members if m.weight > 0]
        return "ensemble(" + " + ".join(f"{m.weight:.2f} {m.name}" for m in kept) + ")"

    @classmethod
    def load(cls, path: Path) -> EnsembleCard:
        return read_artifact(cls, path, "re-run the evaluate stage to rewrite it")


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class; ``probs``: ``[N, K]``, ``labels``: ``[N]``."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(picked, 1e-15))))


def greedy_weights(
    probs: list[np.ndarray], labels: np.ndarray, rounds: int
) -> tuple[list[float], list[float]]:
    """Caruana's forward selection with replacement: each round adds the member whose addition
    gives the lowest log-loss of the running average (ties: the first member); the weights are
    the counts of the round with the lowest log-loss (so never worse than the best member
    alone), normalised. Returns the weights and the log-loss after each round."""
    counts = np.zeros(len(probs))
    total = np.zeros_like(probs[0])
    trace: list[float] = []
    best_counts = counts
    for r in range(1, rounds + 1):
        losses = [log_loss((total + p) / r, labels) for p in probs]
        pick = int(np.argmin(losses))
        counts = counts.copy()
        counts[pick] += 1
        total = total + probs[pick]
        if not trace or losses[pick] < min(trace):
            best_counts = counts
        trace.append(losses[pick])
    return (best_counts / best_counts.sum()).tolist(), trace


def resolve_members(cfg: EnsembleConfig, this: ModelSpec | None) -> list[ModelSpec]:
    """The members' model folders: ``this`` is the run's own model; a run folder stands for its
    fine-tuned model (``finetune/`` or ``finetune/final/``)."""
    from medtl.pipeline import model_dir

    out = []
    for text in cfg.members:
        if text == THIS:
            if this is None:
                raise ConfigError("ensemble.members: 'this' names a run's own model; give folders")
            out.append(this)
            continue
        spec = ModelSpec.parse(text)
        if (spec.folder / "finetune").is_dir():
            folder = model_dir(spec.folder)
            spec = ModelSpec(folder, text.partition("@")[2] or spec.name)
        if not (spec.folder / "meta.json").is_file():
            raise ConfigError(
                f"ensemble.members: {spec.folder} holds no fine-tuned model (meta.json); "
                "give a model folder or a run folder that finished fine-tuning"
            )
        out.append(spec)
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"ensemble.members: names {names} repeat; name them as FOLDER@NAME")
    return out


def member_validation(spec: ModelSpec) -> tuple[ModelCard, Predictions]:
    """A member's card and its VALIDATION predictions; anything but the val split is refused,
    so a test split can never choose an ensemble."""
    card = ModelCard.load(spec.folder / "meta.json")
    val = Predictions.load(spec.folder / "predictions_val.csv")
    if val.split != "val":
        raise DataError(
            f"{spec.folder / 'predictions_val.csv'} holds split {val.split!r}, not 'val': an "
            "ensemble is chosen on validation only; re-run the member's fine-tuning"
        )
    return card, val


def choose_ensemble(
    cfg: EnsembleConfig, members: list[ModelSpec], manifest_sha256: str | None = None
) -> EnsembleCard:
    """Members' weights from their calibrated validation probabilities (see the module text).

    Every member must have been fine-tuned on one manifest (``manifest_sha256`` when given): a
    member from another split may have trained on this run's test images."""
    from medtl.metrics import _aligned

    loaded = [member_validation(m) for m in members]
    want = manifest_sha256 or loaded[0][0].manifest_sha256
    for spec, (card, _) in zip(members, loaded, strict=True):
        if card.manifest_sha256 != want:
            raise DataError(
                f"ensemble member {spec.name} was fine-tuned on manifest "
                f"{card.manifest_sha256[:12]}, not {want[:12]}: members must share the run's "
                "split (another split may have trained on this test set)"
            )
    reference = loaded[0][1]
    probs = [val.probs(card.calibrator)[_aligned(reference, val)] for card, val in loaded]
    labels = reference.labels
    keep = labels >= 0
    probs, labels = [p[keep] for p in probs], labels[keep]
    if not len(labels):
        raise DataError("the members' validation predictions have no labelled rows")
    trace: list[float] = []
    if cfg.select == "greedy":
        weights, trace = greedy_weights(probs, labels, cfg.rounds)
    elif cfg.select == "fixed":
        given = np.asarray(cfg.weights, dtype=float)
        weights = (given / given.sum()).tolist()
    else:
        weights = [1.0 / len(members)] * len(members)
    return EnsembleCard(
        medtl_version=__version__,
        select=cfg.select,
        rounds=cfg.rounds if cfg.select == "greedy" else 0,
        manifest_sha256=want,
        n_val=len(labels),
        members=[
            EnsembleMember(
                name=spec.name,
                folder=str(spec.folder),
                calibrator=card.calibrator.to_dict(),
                weight=w,
                val_log_loss=log_loss(p, labels),
            )
            for spec, (card, _), w, p in zip(members, loaded, weights, probs, strict=True)
        ],
        val_log_loss=log_loss(sum(w * p for w, p in zip(weights, probs, strict=True)), labels),  # type: ignore[arg-type]
        val_log_loss_equal=log_loss(sum(probs) / len(probs), labels),  # type: ignore[arg-type]
        trace=trace,
    )
