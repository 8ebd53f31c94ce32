"""The ``search`` recipe section, its presets, and the schedule of one generation (its rungs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtl.finetune import evolution as ea

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        population=10, elite=3, exploit=2, generations=10, seeds=3, max_epochs=30, patience=5,
        min_epochs=3, eta=3,
    ),
    "cpu": dict(
        population=6, elite=2, exploit=1, generations=5, seeds=1, max_epochs=15, patience=3,
        min_epochs=2, eta=3,
    ),
}  # fmt: skip
# finetune keys that only the final retrain reads (the ``weights`` argument is hashed instead)
RETRAIN_ONLY = {"strategy", "strategy_options", "epochs", "patience", "weights"}


class BioTuneConfig(BaseModel):
    """The ``search`` recipe section: BioTune's population, evaluation schedule and store.

    ``preset`` fills every population field the recipe leaves out; fields given explicitly win.
    """

    model_config = ConfigDict(extra="forbid")

    preset: Literal["paper", "cpu"] = Field(
        "paper", description="'paper': 10 members, 10 generations, 3 seeds; 'cpu': 6, 5, 1"
    )
    population: int = Field(10, ge=2, description="members per generation")
    elite: int = Field(3, ge=1, description="best distinct members carried unchanged")
    exploit: int = Field(2, ge=0, description="Gaussian perturbations of the elites")
    generations: int = Field(10, ge=1, description="generations, the first one random")
    seeds: int = Field(3, ge=1, description="training seeds averaged in the fitness")
    max_epochs: int = Field(30, ge=1, description="epochs of a full evaluation")
    patience: int | None = Field(5, ge=1, description="early stopping ('reference' only)")
    schedule: Literal["reference", "halving"] = Field(
        "halving", description="'reference': everyone full length; 'halving': successive halving"
    )
    min_epochs: int = Field(3, ge=1, description="'halving': epochs of the first rung")
    eta: int = Field(3, ge=2, description="'halving': keep 1/eta, train eta times longer")
    objectives: Literal["fitness", "fitness+params"] = Field(
        "fitness", description="'fitness+params': Pareto ranking with the trainable fraction"
    )
    promote_by: Literal["val_loss", "val_bacc"] = Field(
        "val_loss",
        description="'halving': what a rung ranks candidates by (lowest validation loss so far, "
        "or best validation balanced accuracy so far); the fitness is balanced accuracy either way",
    )
    storage: str = Field(
        "sqlite:///{out}/trials.db",
        description="Optuna storage URL: sqlite:///FILE ({out} is the search folder) or "
        "postgresql://user:password@host/db for workers on many machines",
    )
    study: str = Field("biotune", min_length=1, description="the study's name in the storage")
    cache_prefix: bool = Field(
        True, description="train on cached frozen-prefix features; candidates get no augmentation"
    )
    cache_max_gb: float = Field(4.0, gt=0, description="largest feature cache held in memory")
    seed: int = Field(0, ge=0, description="seeds the evolution and the first training seed")
    selection_pressure: float = Field(
        1.8, ge=1, le=2, description="linear ranking: the best member's expected offspring"
    )
    blx_alpha: float = Field(0.5, ge=0, description="blend crossover: reach beyond the parents")
    mutation_rate: float = Field(0.25, ge=0, le=1, description="probability a gene mutates")
    sigma_min: float = Field(0.02, ge=0, description="mutation std, extinction probability 0")
    sigma_max: float = Field(0.25, ge=0, description="mutation std, extinction probability 1")
    exploit_sigma: float = Field(0.05, ge=0, description="std of the elites' perturbations")
    diversity_min: float = Field(
        0.02, ge=0, description="mean per-gene std below which immigrants are let in"
    )
    poll_seconds: float = Field(2.0, gt=0, description="a waiting worker polls this often")
    stale_seconds: float = Field(
        300.0, gt=0, description="a running candidate without heartbeat this long is taken over"
    )
    heartbeat_seconds: float = Field(
        20.0, gt=0, description="a running candidate's worker records it is alive this often"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset", "paper") in PRESETS:
            return {**PRESETS[data.get("preset", "paper")], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> BioTuneConfig:
        if self.elite >= self.population:
            raise ValueError(f"elite={self.elite} must be below population={self.population}")
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs={self.min_epochs} exceeds max_epochs={self.max_epochs}")
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} exceeds sigma_max={self.sigma_max}")
        return self

    def operators(self) -> ea.Operators:
        """The evolutionary operators' settings (see :mod:`medtl.finetune.evolution`)."""
        keys = {f.name for f in dataclasses.fields(ea.Operators)} - {"exploit", "retries"}
        exploit = min(self.exploit, self.population - self.elite)
        return ea.Operators(exploit=exploit, **self.model_dump(include=keys))


@dataclasses.dataclass(frozen=True)
class Rung:
    """One stage of a generation: ``size`` members train ``epochs`` epochs for ``seeds`` seeds."""

    epochs: int
    size: int
    seeds: int


def rungs(cfg: BioTuneConfig) -> list[Rung]:
    """The rungs of one generation. ``reference``: everyone, ``max_epochs``, every seed.
    ``halving``: ``min_epochs * eta**r`` epochs (planned for ``population // eta**r`` members,
    at least one) while that is below ``max_epochs`` and more than one member is left, then a
    last rung of ``max_epochs`` for every seed; the pruner decides at the rungs below the last."""
    if cfg.schedule == "reference":
        return [Rung(cfg.max_epochs, cfg.population, cfg.seeds)]
    out, epochs, size = [], cfg.min_epochs, cfg.population
    while epochs < cfg.max_epochs and size > 1:
        out.append(Rung(epochs, size, 1))
        epochs, size = epochs * cfg.eta, max(1, size // cfg.eta)
    return [*out, Rung(cfg.max_epochs, size, cfg.seeds)]


def warmup_note(cfg: BioTuneConfig, warmup_epochs: float) -> str | None:
    """A warning when ``halving``'s first rung judges candidates inside their learning-rate
    warm-up (``None`` otherwise). Scores taken before the rate peaks rank candidates by how fast
    they warm up: on BUSI a 2-epoch first rung inside a 3-epoch warm-up pruned the genome that
    the ``reference`` schedule found best (docs/results.md)."""
    first = rungs(cfg)[0]
    if cfg.schedule != "halving" or first.epochs == cfg.max_epochs:
        return None
    if first.epochs >= warmup_epochs:
        return None
    need = math.ceil(warmup_epochs)
    return (
        f"search.min_epochs={cfg.min_epochs}: the first rung judges candidates after "
        f"{first.epochs} epoch(s), inside their {warmup_epochs:g}-epoch warm-up; set "
        f"search.min_epochs={need} or more (or a shorter finetune.warmup_epochs)"
    )


def generation_epochs(cfg: BioTuneConfig) -> int:
    """Training epochs of one generation as :func:`rungs` plans it, nothing looked up: every
    rung a fresh run of ``size`` members. An upper bound for ``reference`` (early stopping ends
    runs sooner); for ``halving`` a guide only, as the asynchronous pruner promotes by the order
    scores arrive in and promoted candidates continue their run."""
    return sum(r.epochs * r.size * r.seeds for r in rungs(cfg))


def first_trainable(genome: Sequence[float]) -> int:
    """Index of the first block the genome trains (the ``genome`` strategy's rule; the head,
    the last block, when no gene exceeds the threshold ``genome[-1]``)."""
    genes, threshold = list(genome[:-1]), genome[-1]
    return next((i for i, g in enumerate(genes) if g > threshold), len(genes) - 1)


def genome_key(genome: Sequence[float]) -> str:
    """A short stable key of a genome (its genes as JSON, hashed)."""
    return hashlib.sha1(json.dumps([float(g) for g in genome]).encode()).hexdigest()[:16]
