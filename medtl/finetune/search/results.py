"""What a search found, from its study's rows: the ranking of a generation, the best genome,
the Pareto front, the compute spent, ``trials.csv`` and ``search.png``; and the read API for
comparing finished searches (:func:`read_search`, :class:`SearchRecord`), so that nothing
outside this package reads the study's storage."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medtl.errors import ConfigError
from medtl.finetune import evolution as ea
from medtl.finetune.loop import FinetuneResult
from medtl.finetune.search.candidate import Search
from medtl.finetune.search.config import BioTuneConfig, Rung, genome_key
from medtl.finetune.search.study import (
    SQLITE,
    Trial,
    identity,
    load_study,
    storage_url,
    trial_rows,
)
from medtl.io import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = (
    "generation", "idx", "rung", "seed", "budget_epochs", "status", "reused", "val_bacc",
    "fitness", "trainable_fraction", "cached", "epochs_trained", "epoch_cost",
    "epoch_equivalents", "seconds", "worker", "genome_key", "state",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Standing:
    """What is known of one genome: the highest rung with a result for every seed that rung
    needs, its fitness there (1 - mean val balanced accuracy) and its trainable fraction."""

    rung: int
    fitness: float
    trainable_fraction: float


@dataclasses.dataclass
class SearchResult:
    """The chosen genome, the Pareto front and what the search spent."""

    blocks: list[str]
    best_genes: list[float]
    best_threshold: float
    best_fitness: float
    best_val_bacc: float
    best_trainable_fraction: float
    pareto: list[dict[str, Any]]
    generations: list[dict[str, float]]
    epoch_equivalents: float
    epochs_trained: float
    trial_seconds: float  # summed over trials (all workers)
    seconds: float  # wall time of this call's search phase
    trials_db: str  # the SQLite file, or the database URL with its password masked
    trials_csv: Path
    plot: Path
    finetune: FinetuneResult | None = None

    @property
    def strategy_options(self) -> dict[str, Any]:
        """The ``genome`` strategy options that replay the best genome."""
        return {"genes": list(self.best_genes), "threshold": self.best_threshold}

    def summary(self) -> dict[str, Any]:
        skip = {"finetune"}
        return {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in self.__dict__.items()
            if k not in skip
        }


def knowledge(
    trials: Sequence[Trial], search_rungs: Sequence[Rung], seeds: Sequence[int]
) -> dict[str, Standing]:
    """Per genome key, its :class:`Standing` over all generations' finished trials."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        if t.finished:
            groups.setdefault(t.genome_key, []).append(t)
    known = {}
    for key, group in groups.items():
        for r in reversed(range(len(search_rungs))):
            rung = search_rungs[r]
            got = {t.seed: t for t in group if t.budget_epochs == rung.epochs}
            need = seeds[: rung.seeds]
            if all(s in got for s in need):
                bacc = float(np.mean([got[s].val_bacc for s in need]))
                fraction = float(got[need[0]].trainable_fraction)  # type: ignore[arg-type]
                known[key] = Standing(r, 1.0 - bacc, fraction)
                break
    return known


def objectives(cfg: BioTuneConfig, standing: Sequence[Standing]) -> np.ndarray:
    """``[N, 1]`` fitness, or ``[N, 2]`` (fitness, trainable fraction) in the Pareto mode."""
    columns = [[s.fitness for s in standing]]
    if cfg.objectives == "fitness+params":
        columns.append([s.trainable_fraction for s in standing])
    return np.array(columns, dtype=np.float64).T


def ranking(cfg: BioTuneConfig, population: np.ndarray, known: dict[str, Standing]) -> np.ndarray:
    """A generation's members best first: by the rung each reached, then by fitness (or by
    Pareto front and crowding distance in the Pareto mode)."""
    standing = [known[genome_key(p.tolist())] for p in population]
    fidelity = np.array([s.rung for s in standing])
    return ea.order_candidates(fidelity, objectives(cfg, standing))


def summarise(search: Search, trials: Sequence[Trial], where: str, seconds: float) -> SearchResult:
    """The best genome (lowest fitness at the last rung; earliest on ties), the Pareto front of
    (fitness, trainable fraction) and the compute spent, from a finished study's rows."""
    known = knowledge(trials, search.rungs, search.seeds)
    first: dict[str, Trial] = {}
    for t in trials:
        first.setdefault(t.genome_key, t)
    top = len(search.rungs) - 1
    finals = [(v.fitness, first[k].id, k) for k, v in known.items() if v.rung == top]
    if not finals:
        raise ConfigError(f"{where} holds no finished candidate; run the search to the end")
    _, _, best = min(finals)
    genome, standing = list(first[best].genome), known[best]
    points = np.array([[known[k].fitness, known[k].trainable_fraction] for _, _, k in finals])
    pareto = [
        _candidate(search.blocks, first[finals[i][2]], known[finals[i][2]])
        for i in ea.pareto_front(points)
    ]
    return SearchResult(
        search.blocks, genome[:-1], genome[-1], standing.fitness, 1.0 - standing.fitness,
        standing.trainable_fraction, sorted(pareto, key=lambda c: c["fitness"]),
        per_generation(trials), _total(trials, "epoch_equivalents"),
        _total(trials, "epochs_trained"), _total(trials, "seconds"), seconds, where,
        search.out / "trials.csv", search.out / "search.png",
    )  # fmt: skip


def _candidate(blocks: Sequence[str], first: Trial, standing: Standing) -> dict[str, Any]:
    genome = list(first.genome)
    return {
        "genes": genome[:-1], "threshold": genome[-1], "fitness": standing.fitness,
        "val_bacc": 1.0 - standing.fitness, "trainable_fraction": standing.trainable_fraction,
        "trainable_blocks": [b for b, g in zip(blocks, genome, strict=False) if g > genome[-1]],
    }  # fmt: skip


def _total(trials: Sequence[Trial], field: str) -> float:
    return float(sum(getattr(t, field) or 0.0 for t in trials))


def per_generation(trials: Sequence[Trial]) -> list[dict[str, float]]:
    """Best and median fitness per generation, each member at the highest rung it reached."""
    out = []
    for g in sorted({t.generation for t in trials}):
        members: dict[int, list[Trial]] = {}
        for t in trials:
            if t.generation == g:
                members.setdefault(t.idx, []).append(t)
        scores = []
        for group in members.values():
            high = max(t.rung for t in group)
            scores.append(float(np.mean([t.fitness for t in group if t.rung == high])))
        out.append({"generation": g, "best": min(scores), "median": float(np.median(scores))})
    return out


def stage_curve(trials: Sequence[Trial]) -> list[tuple[float, float]]:
    """A search's best-so-far fitness against the epoch-equivalents it had spent, one point per
    stage (generation, rung) with a done trial, in the order the stages ran. Only members
    evaluated at the top rung count (the ones the search can choose; all of them in
    ``reference``), each with its mean fitness over the seeds that rung trains. Stage
    granularity charges a stage's whole cost before its results count, whatever order its
    trials ran in, so the curve never flatters a schedule."""
    done = [t for t in trials if t.status == "done"]
    if not done:
        return []
    top = max(t.rung for t in done)
    stages: dict[tuple[int, int], list[Trial]] = {}
    for t in sorted(done, key=lambda t: (t.generation, t.rung, t.idx)):
        stages.setdefault((t.generation, t.rung), []).append(t)
    curve, spent, best = [], 0.0, math.inf
    for (_, rung), group in sorted(stages.items()):
        spent += sum(float(t.epoch_equivalents or 0) for t in group)
        if rung == top:
            members: dict[int, list[float]] = {}
            for t in group:
                members.setdefault(t.idx, []).append(float(t.fitness))  # type: ignore[arg-type]
            best = min(best, *(statistics.fmean(f) for f in members.values()))
        curve.append((spent, best))
    return curve


def cost_to_reach(curve: Sequence[tuple[float, float]], fitness: float) -> float | None:
    """Epoch-equivalents spent when the best-so-far fitness first reached ``fitness``
    (``None``: never)."""
    return next((spent for spent, best in curve if best <= fitness + 1e-9), None)


def write_trials_csv(blocks: Sequence[str], trials: Sequence[Trial], path: Path) -> None:
    """Every trial with its genome, per-block genes and the strategy options replaying it
    (flags written as 0/1, as stored)."""
    genes = [f"gene_{b}" for b in blocks]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, "first_trainable", *genes, "threshold", "strategy_options"])
    for t in trials:
        genome = list(t.genome)
        options = json.dumps({"genes": genome[:-1], "threshold": genome[-1]})
        cells = [getattr(t, c) for c in CSV_COLUMNS]
        cells = [int(c) if isinstance(c, bool) else c for c in cells]
        writer.writerow([*cells, blocks[t.first_trainable], *genome, options])
    atomic_write_text(path, buffer.getvalue())


def plot_search(result: SearchResult, path: Path) -> None:
    """Left: best and median fitness per generation. Right: the chosen learning-rate
    multiplier of each block (log scale); frozen blocks as grey bands labelled "frozen"."""
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    gens = [g["generation"] for g in result.generations]
    for key, style in (("best", "o-"), ("median", "s--")):
        left.plot(gens, [g[key] for g in result.generations], style, label=key)
    left.set(xlabel="generation", ylabel="fitness (1 - val balanced accuracy)", xticks=gens)
    left.legend()
    x = np.arange(len(result.blocks))
    for i, gene in enumerate(result.best_genes):
        if gene > result.best_threshold:
            right.bar(i, 10 ** (2 * (gene - 0.5)), color="#0072B2")
        else:
            right.axvspan(i - 0.4, i + 0.4, color="#DDDDDD", lw=0)
            right.text(i, 0.13, "frozen", ha="center", rotation=90, fontsize=8)
    right.axhline(1.0, color="black", lw=0.6)
    right.set(yscale="log", ylim=(0.1, 10), ylabel="learning-rate multiplier", xticks=x)
    right.set_xticklabels(result.blocks, rotation=45)
    right.set_title(f"best genome, threshold {result.best_threshold:.2f}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class SearchRecord:
    """A search as its study holds it, read-only: the schedule and budget it ran with and every
    trial row, with the figures that compare one search with another."""

    schedule: str  # "reference" or "halving"
    population: int
    generations: int
    seed: int
    max_epochs: int
    trials: tuple[Trial, ...]  # every row, in (generation, rung, idx, seed) order
    states: dict[int, str]  # each candidate's Optuna state, by trial number

    @property
    def finished(self) -> bool:
        """Every planned candidate is complete, pruned or failed."""
        done = ("COMPLETE", "PRUNED", "FAIL")
        planned = self.population * self.generations
        return len(self.states) >= planned and all(s in done for s in self.states.values())

    @property
    def curve(self) -> list[tuple[float, float]]:
        """Best-so-far validation fitness against epoch-equivalents spent (:func:`stage_curve`)."""
        return stage_curve(self.trials)

    @property
    def best_fitness(self) -> float:
        """The lowest fitness of a member evaluated at the top rung (``inf``: none yet)."""
        curve = self.curve
        return curve[-1][1] if curve else math.inf

    @property
    def epoch_equivalents(self) -> float:
        """The search's compute: every row's epoch-equivalents, cache fills included."""
        return _total(self.trials, "epoch_equivalents")

    @property
    def seconds(self) -> float:
        """Seconds its trials took, summed over workers (right for a resumed search too)."""
        return _total(self.trials, "seconds")

    @property
    def looked_up(self) -> int:
        """Candidates whose every row was looked up from an earlier generation, not trained."""
        rows: dict[int, list[bool]] = {}
        for t in self.trials:
            rows.setdefault(t.id, []).append(t.reused)
        return sum(all(r) for r in rows.values())

    @property
    def pruned(self) -> int:
        return sum(s == "PRUNED" for s in self.states.values())

    def cost_to_reach(self, fitness: float) -> float | None:
        """Epoch-equivalents spent when the best-so-far fitness first reached ``fitness``."""
        return cost_to_reach(self.curve, fitness)

    def best_at(self, spent: float) -> float:
        """The best-so-far fitness once ``spent`` epoch-equivalents had been spent (``inf``:
        nothing at the top rung by then)."""
        return min((best for x, best in self.curve if x <= spent + 1e-9), default=math.inf)


def read_search(
    source: str | Path, study: str = "biotune", storage: str = "sqlite:///{out}/trials.db"
) -> SearchRecord:
    """The search in ``source``: its folder (where ``storage``, the recipe's ``search.storage``,
    puts the study; ``{out}`` is the folder), a SQLite file, or a database URL. Read-only; a
    missing database or study is a :class:`~medtl.errors.ConfigError` saying to run the search."""
    text = str(source)
    if "://" not in text and Path(text).is_dir():
        text = storage_url(storage, Path(text))
    where = text[len(SQLITE) :] if text.startswith(SQLITE) else text
    loaded = load_study(where, study)
    cfg = identity(loaded).get("biotune")
    if cfg is None:
        raise ConfigError(
            f"{where} study {study!r} has no search bound to it; run the search first"
        )
    rows = trial_rows(loaded)
    states = {t.number: t.state.name for t in loaded.get_trials(deepcopy=False)}
    return SearchRecord(
        cfg["schedule"], int(cfg["population"]), int(cfg["generations"]), int(cfg["seed"]),
        int(cfg["max_epochs"]), tuple(rows), states,
    )  # fmt: skip
