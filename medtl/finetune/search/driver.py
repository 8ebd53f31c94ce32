"""The generation driver: workers claim and run trials; whichever finds a stage complete
creates the next one (the next rung's survivors, or the next generation), in one transaction."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune import evolution as ea
from medtl.finetune.loop import FinetuneConfig, FinetuneResult, finetune
from medtl.finetune.search.candidate import Search, SearchTask
from medtl.finetune.search.config import BioTuneConfig, first_trainable, genome_key, rungs
from medtl.finetune.search.results import (
    SearchResult,
    knowledge,
    plot_search,
    summarise,
    write_trials_csv,
)
from medtl.finetune.search.store import (
    RESULT_FIELDS,
    Trial,
    TrialStore,
    store_path,
    worker_id,
)
from medtl.io import write_json
from medtl.train import TrainingError, duration, mix_seed

log = logging.getLogger(__name__)


# -- the coordinator ----------------------------------------------------------------------------
def advance(search: Search, store: TrialStore) -> bool:
    """Create the next stage's trials once the current stage is complete (the next rung, or
    the next generation), or mark the search finished after the last; whether anything changed.
    Any worker may call it: the transaction lets one of them act."""
    with store.transaction():
        if store.meta("finished"):
            return False
        stage = store.stage()
        if stage is None:
            _first_generation(search, store)
            return True
        g, r = stage
        if store.open_trials(g, r):
            return False
        if r + 1 < len(search.rungs):
            _add_trials(search, store, g, r + 1, _promoted(search, store, g, r))
        elif g + 1 < search.cfg.generations:
            _next_generation(search, store, g)
        else:
            store.set_meta("finished", "1")
        return True


def _rng(seed: int, generation: int) -> np.random.Generator:
    return np.random.default_rng(mix_seed(seed, generation))


def _first_generation(search: Search, store: TrialStore) -> None:
    """Generation 0: random genomes, all at the first rung."""
    n, length = search.cfg.population, len(search.blocks) + 1
    population = ea.random_genomes(n, length, _rng(search.cfg.seed, 0))
    store.add_population(0, population, [ea.RANDOM] * n)
    _add_trials(search, store, 0, 0, list(range(n)))


def _add_trials(search: Search, store: TrialStore, g: int, r: int, members: list[int]) -> None:
    """Trials of rung ``r`` for ``members`` of generation ``g``, ordered by frozen prefix; in
    ``halving`` a genome already evaluated for the same epochs and seed is copied, not rerun."""
    population, rung = store.population(g), search.rungs[r]
    for idx in members:
        genome = population[idx].tolist()
        key, k = genome_key(genome), first_trainable(genome)
        for s, seed in enumerate(search.seeds[: rung.seeds]):
            fields: dict[str, Any] = dict(
                generation=g, idx=idx, rung=r, seed=seed, genome=json.dumps(genome),
                genome_key=key, budget_epochs=rung.epochs, first_trainable=k,
                order_key=(k * 1000 + s) * 100_000 + idx, status="pending",
            )  # fmt: skip
            halving = search.cfg.schedule == "halving"
            prior = store.lookup(key, rung.epochs, seed, g) if halving else None
            if prior is not None:
                fields.update(
                    {f: prior[f] for f in RESULT_FIELDS}, status=prior["status"], reused=1
                )
                fields.update(epochs_trained=0.0, epoch_equivalents=0.0, seconds=0.0)
            store.insert(**fields)


def _objectives(search: Search, fitness: Sequence[float], fraction: Sequence[float]) -> np.ndarray:
    columns = [fitness, fraction] if search.cfg.objectives == "fitness+params" else [fitness]
    return np.array(columns, dtype=np.float64).T


def _promoted(search: Search, store: TrialStore, g: int, r: int) -> list[int]:
    """Members of generation ``g`` that go on from rung ``r``: the best ``rungs[r+1].size``."""
    trials = store.trials(generation=g, rung=r)
    fitness = [t.fitness for t in trials]
    fraction = [t.trainable_fraction for t in trials]
    objectives = _objectives(search, fitness, fraction)  # type: ignore[arg-type]
    order = ea.order_candidates(np.zeros(len(trials)), objectives)
    return sorted(trials[i].idx for i in order[: search.rungs[r + 1].size])


def _next_generation(search: Search, store: TrialStore, g: int) -> None:
    """Rank generation ``g`` by everything known of its genomes and breed generation g+1."""
    population = store.population(g)
    known = knowledge(store.trials(), search.rungs, search.seeds)
    standing = [known[genome_key(p.tolist())] for p in population]
    objectives = _objectives(
        search, [s.fitness for s in standing], [s.trainable_fraction for s in standing]
    )
    order = ea.order_candidates(np.array([s.rung for s in standing]), objectives)
    children, origins = ea.next_generation(
        population, order, search.cfg.operators(), _rng(search.cfg.seed, g + 1)
    )
    store.add_population(g + 1, children, origins)
    _add_trials(search, store, g + 1, 0, list(range(len(children))))


# -- workers ---------------------------------------------------------------------------------
def open_store(search: Search) -> TrialStore:
    """The search's trial store, checked to belong to this search."""
    store = TrialStore(store_path(search.cfg.storage, search.out))
    store.bind(search.identity())
    return store


def work(search: Search, store: TrialStore, worker: str, max_trials: int | None = None) -> int:
    """Claim and run trials until the search is finished (or ``max_trials`` ran); returns how
    many this worker trained."""
    done = 0
    store.reclaim(search.cfg.stale_seconds)
    while max_trials is None or done < max_trials:
        trial = store.claim(worker)
        if trial is not None:
            _run_trial(search, store, trial, worker)
            done += 1
        elif not advance(search, store):
            if store.meta("finished"):
                break
            time.sleep(search.cfg.poll_seconds)  # others are running the stage's last trials
            store.reclaim(search.cfg.stale_seconds)
    return done


def _run_trial(search: Search, store: TrialStore, row: sqlite3.Row, worker: str) -> None:
    """Evaluate one claimed trial; a diverging run (TrainingError) scores fitness 1, any other
    error puts the trial back to pending and propagates."""
    trial = Trial.of(row)
    try:
        result = search.evaluate(trial, lambda: store.heartbeat(trial.id))
    except TrainingError as exc:
        log.warning("trial %s failed: %s", trial.id, exc)
        failed = {"val_bacc": 0.0, "fitness": 1.0, "trainable_fraction": 1.0, "error": str(exc)}
        store.finish(trial.id, worker, "failed", failed)
        shutil.rmtree(search.folder(trial), ignore_errors=True)  # a rerun would diverge again
        return
    except BaseException:
        store.release(trial.id, worker)
        raise
    store.finish(trial.id, worker, "done", result)
    _log_trial(search, store, {**dict(row), **result})


def _log_trial(search: Search, store: TrialStore, trial: dict[str, Any]) -> None:
    """One line per finished trial, with an upper bound of the time the search has left."""
    finished, mean_s = store.progress()
    planned = search.cfg.generations * sum(r.size * r.seeds for r in rungs(search.cfg))
    left_s = max(0, planned - finished) * mean_s  # an upper bound: look-ups cost nothing
    log.info(
        "generation %d rung %d member %d seed %d: val bacc %.4f, %.2f epoch-equivalents; "
        "%d of at most %d trials finished, at most %s left",
        trial["generation"], trial["rung"], trial["idx"], trial["seed"], trial["val_bacc"],
        trial["epoch_equivalents"], finished, planned, duration(left_s),
        extra={"event": "trial", "trial": trial, "eta_s": left_s},
    )  # fmt: skip


def run_worker(
    cfg: BioTuneConfig,
    finetune_cfg: FinetuneConfig,
    manifest: Manifest,
    root: Path,
    data_cfg: DataConfig,
    out: Path,
    weights: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    *,
    max_trials: int | None = None,
    worker: str | None = None,
) -> int:
    """Join the search in ``out`` (starting it if new) as one more worker process; returns
    how many trials it trained. ``max_trials`` stops it early (the search resumes later)."""
    task = SearchTask(
        cfg, finetune_cfg, manifest, root, data_cfg, Path(out), weights, device, progress
    )
    search = Search(task)
    store = open_store(search)
    try:
        return work(search, store, worker or worker_id(), max_trials)
    finally:
        store.close()


def biotune_search(
    cfg: BioTuneConfig,
    finetune_cfg: FinetuneConfig,
    manifest: Manifest,
    root: Path,
    data_cfg: DataConfig,
    out: Path,
    weights: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    *,
    retrain: bool = True,
) -> SearchResult:
    """Run (or resume, or join) the BioTune search in ``out`` to the end, write
    ``trials.csv``, ``search.png`` and ``search.json``, then retrain the best genome with
    :func:`finetune` into ``out/final`` (unless ``retrain`` is false).

    Candidates see the train and val splits only; the retrain uses ``finetune_cfg`` as given
    (its epochs, patience and augmentation) with strategy ``genome``.
    """
    task = SearchTask(
        cfg, finetune_cfg, manifest, root, data_cfg, Path(out), weights, device, progress
    )
    result = search_to_the_end(task)
    if retrain:
        result.finetune = retrain_best(task, result)
    return result


def search_to_the_end(task: SearchTask) -> SearchResult:
    """Run the search as one more worker until it is finished; write its results."""
    start = time.perf_counter()
    search = Search(task)
    store = open_store(search)
    try:
        work(search, store, worker_id())
        result = summarise(search, store, time.perf_counter() - start)
        write_trials_csv(search.blocks, store.trials(), result.trials_csv)
    finally:
        store.close()
    plot_search(result, result.plot)
    write_json(task.out / "search.json", result.summary())
    return result


def retrain_best(task: SearchTask, result: SearchResult) -> FinetuneResult:
    """The best genome fine-tuned with ``task.ft`` (strategy ``genome``) into ``out/final``."""
    return retrain_genome(task, result.strategy_options)


def retrain_genome(task: SearchTask, genome_options: dict[str, Any]) -> FinetuneResult:
    """The genome of ``genome_options`` (``{"genes": [...], "threshold": t}``) fine-tuned with
    ``task.ft`` under seed ``task.cfg.seed`` into ``out/final``: a search's retrain."""
    options = {"strategy": "genome", "strategy_options": genome_options}
    return finetune(
        task.ft.model_copy(update=options), task.manifest, task.root, task.data_cfg,
        task.out / "final", seed=task.cfg.seed, weights=task.weights, device=task.device,
        progress=task.progress,
    )  # fmt: skip
