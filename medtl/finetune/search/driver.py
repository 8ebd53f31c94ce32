"""Workers of a search: each takes the next waiting candidate of the study whose previous
generation is finished, trains it with Optuna's pruner deciding at every rung, and records its
rows; any number of workers, on one machine or many, can share a study."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune.loop import FinetuneConfig, FinetuneResult, finetune
from medtl.finetune.search.candidate import Prepared, Search, SearchTask
from medtl.finetune.search.config import BioTuneConfig, first_trainable, genome_key
from medtl.finetune.search.results import SearchResult, plot_search, summarise, write_trials_csv
from medtl.finetune.search.study import SearchStudy, connect, storage_url, worker_id
from medtl.io import write_json
from medtl.train import TrainingError, duration

log = logging.getLogger(__name__)


class Pruned(Exception):
    """Raised from a candidate's epoch hook when the pruner stops it at a rung."""


# -- the study -------------------------------------------------------------------------------------
def pruner(cfg: BioTuneConfig) -> optuna.pruners.BasePruner:
    """``halving``: asynchronous successive halving, rungs at ``min_epochs * eta**r`` epochs;
    ``reference``: none."""
    if cfg.schedule == "reference":
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=cfg.min_epochs, reduction_factor=cfg.eta, min_early_stopping_rate=0
    )


def open_study(search: Search) -> SearchStudy:
    """The search's study (created with every candidate waiting, or joined), checked to belong
    to this search."""
    cfg = search.cfg
    study = SearchStudy(
        storage_url(cfg.storage, search.out), cfg.study, search.sampler, pruner(cfg)
    )
    study.bind(search.identity(), cfg.generations * cfg.population, cfg.population)
    return study


def finished(study: SearchStudy, slots: int) -> bool:
    """Every candidate is complete, pruned or failed."""
    trials = study.frozen()
    return len(trials) >= slots and all(t.state.is_finished() for t in trials)


def next_candidate(search: Search, study: SearchStudy, worker: str) -> optuna.Trial | None:
    """A waiting candidate of the first generation with any, once the generation before it is
    finished, claimed for ``worker``; ``None`` when there is none now. Within a generation,
    candidates go by first trainable block, so those sharing a frozen prefix run one after the
    other and reuse its cached features."""
    trials, n = study.frozen(), search.cfg.population
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if not waiting:
        return None
    g = waiting[0].number // n
    if g and not all(p.state.is_finished() for p in trials[(g - 1) * n : g * n]):
        return None  # its parents are still running
    genomes, _ = search.sampler.generation(study.study, g)
    mine = [t for t in waiting if t.number // n == g]
    for t in sorted(mine, key=lambda t: (first_trainable(genomes[t.number % n]), t.number)):
        claimed = study.claim(t, worker)
        if claimed is not None:
            return claimed
    return None


def work(search: Search, study: SearchStudy, worker: str, max_trials: int | None = None) -> int:
    """Claim and run candidates until the study is finished (or ``max_trials`` ran); returns how
    many this worker ran."""
    done, slots = 0, search.cfg.generations * search.cfg.population
    while max_trials is None or done < max_trials:
        study.reclaim(search.cfg.stale_seconds)
        trial = next_candidate(search, study, worker)
        if trial is None:
            if finished(study, slots):
                break
            time.sleep(search.cfg.poll_seconds)  # others run the generation's last candidates
            continue
        try:
            with study.beating(trial, search.cfg.heartbeat_seconds):
                Candidate.start(search, trial).run()
        except BaseException:
            study.release(trial)  # back in the queue, resumed from its checkpoint later
            raise
        done += 1
    return done


# -- one candidate ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidate:
    """One claimed candidate: its genome and the rows it has (kept from a killed run)."""

    search: Search
    trial: optuna.Trial
    genome: list[float]
    rows: list[dict[str, Any]]
    curve: list[list[float]]
    clock: float
    fill: float = 0.0  # epoch-equivalents spent filling the prefix cache, not yet charged

    @classmethod
    def start(cls, search: Search, trial: optuna.Trial) -> Candidate:
        genome = [trial.suggest_float(name, 0.0, 1.0) for name in search.genes]
        trial.set_user_attr("origin", search.sampler.origin(trial.study, trial.number))
        attrs = trial.user_attrs
        return cls(search, trial, genome, list(attrs.get("rows", [])),
                   list(attrs.get("curve", [])), time.perf_counter())  # fmt: skip

    @property
    def study(self) -> optuna.Study:
        return self.trial.study

    def run(self) -> None:
        """Look the genome up, or train it; tell the study how it ended."""
        prior = self.lookup() if self.search.cfg.schedule == "halving" else None
        if prior is not None:
            self.copy(prior)
            return
        top = len(self.search.rungs) - 1
        try:
            for seed in self.search.seeds[: self.search.rungs[top].seeds]:
                if not self.has(top, seed):
                    self.train(seed)
        except Pruned:
            self.study.tell(self.trial, state=TrialState.PRUNED)
            self.log("pruned")
            return
        except TrainingError as exc:
            log.warning("candidate %d failed: %s", self.trial.number, exc)
            self.trial.set_user_attr("error", str(exc))
            self.study.tell(self.trial, state=TrialState.FAIL)
            self.log("failed")
            return
        fitness = [r["fitness"] for r in self.rows if r["rung"] == top]
        self.study.tell(self.trial, sum(fitness) / len(fitness))
        self.log("complete")

    def lookup(self) -> FrozenTrial | None:
        """The earliest finished candidate of an earlier generation with the same genome."""
        key = genome_key(self.genome)
        start = self.trial.number - self.trial.number % self.search.cfg.population
        for t in self.study.get_trials(deepcopy=False)[:start]:
            if t.state.is_finished() and genome_key([t.params[k] for k in sorted(t.params)]) == key:
                return t
        return None

    def copy(self, prior: FrozenTrial) -> None:
        """Prior's rows, looked up (no compute), and its ending."""
        free = {"reused": True, "epochs_trained": 0.0, "epoch_equivalents": 0.0, "seconds": 0.0}
        self.rows = [{**r, **free} for r in prior.user_attrs.get("rows", [])]
        self.trial.set_user_attr("rows", self.rows)
        self.trial.set_user_attr("reused_from", prior.number)
        if prior.state == TrialState.COMPLETE:
            self.study.tell(self.trial, prior.value)
        else:
            self.study.tell(self.trial, state=prior.state)
        self.log(f"{prior.state.name.lower()} (looked up)")

    def has(self, rung: int, seed: int) -> bool:
        return any(r["rung"] == rung and r["seed"] == seed for r in self.rows)

    def train(self, seed: int) -> None:
        """One seed's run: the first seed continues through the rungs (reporting every epoch,
        pruned at a rung), the others train the top rung's epochs."""
        search, first = self.search, seed == self.search.seeds[0]
        prepared = search.prepare(self.genome, seed)
        self.fill += prepared.runner.fill
        folder = search.folder(self.trial.number, seed)
        top = len(search.rungs) - 1

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            if first:
                self.report(epoch, record, prepared, seed)

        try:
            result = search.train(prepared, seed, search.rungs[top].epochs, folder, on_epoch)
        except TrainingError as exc:
            shutil.rmtree(folder, ignore_errors=True)  # a rerun would diverge again
            rung = next(r for r in range(top + 1) if not self.has(r, seed))
            self.add(rung, seed, 0.0, prepared, 0.0, error=str(exc))
            raise
        except Pruned:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        trained = result.samples_seen / search.n_train  # the whole run, resumed or not
        before = search.rungs[top - 1].epochs if first and top else 0  # continued from there
        self.add(top, seed, float(result.best_score or 0.0), prepared, trained - before)

    def report(self, epoch: int, record: dict[str, float], prepared: Prepared, seed: int) -> None:
        """The first seed's epoch: the pruner's value, a row at an intermediate rung, and the
        pruner's decision there."""
        search, e = self.search, epoch + 1
        self.curve[epoch:] = [[record["val_bacc"], record["val_loss"]]]
        self.trial.set_user_attr("curve", self.curve)
        best = max(c[0] for c in self.curve)
        by_loss = search.cfg.promote_by == "val_loss"
        self.trial.report(min(c[1] for c in self.curve) if by_loss else 1.0 - best, e)
        epochs = [r.epochs for r in search.rungs[:-1]]
        if search.cfg.schedule == "halving" and e in epochs:
            r = epochs.index(e)
            self.add(r, seed, best, prepared, float(e - (epochs[r - 1] if r else 0)))
            if self.trial.should_prune():
                raise Pruned

    def add(
        self,
        rung: int,
        seed: int,
        bacc: float,
        prepared: Prepared,
        epochs: float,
        error: str | None = None,
    ) -> None:
        """Record the row of ``rung`` and ``seed`` (replacing one from a killed run)."""
        now = time.perf_counter()
        row = {
            "rung": rung, "seed": seed, "budget_epochs": self.search.rungs[rung].epochs,
            "status": "failed" if error else "done", "reused": False, "val_bacc": bacc,
            "fitness": 1.0 - bacc, "trainable_fraction": 1.0 if error else
            prepared.plan.trainable_fraction, "cached": prepared.cached,
            "epochs_trained": epochs, "epoch_cost": prepared.cost,
            "epoch_equivalents": epochs * prepared.cost + self.fill,
            "seconds": now - self.clock, "error": error,
        }  # fmt: skip
        self.fill, self.clock = 0.0, now
        self.rows = [r for r in self.rows if (r["rung"], r["seed"]) != (rung, seed)] + [row]
        self.trial.set_user_attr("rows", self.rows)

    def log(self, state: str) -> None:
        """One line per finished candidate, with an upper bound of the time the search has
        left (every unfinished candidate at the mean time a trained one took so far)."""
        search, number = self.search, self.trial.number
        last = max(self.rows, key=lambda r: (r["rung"], -r["seed"]), default=None)
        top = [r["fitness"] for r in self.rows if last and r["rung"] == last["rung"]]
        trials = self.study.get_trials(deepcopy=False)
        spent = [sum(r["seconds"] for r in t.user_attrs.get("rows", [])) for t in trials]
        ran = [s for s, t in zip(spent, trials, strict=True) if t.state.is_finished() and s > 0]
        left = sum(not t.state.is_finished() for t in trials)
        left_s = left * (sum(ran) / len(ran) if ran else 0.0)
        g, idx = divmod(number, search.cfg.population)
        record = {
            "number": number, "generation": g, "idx": idx, "state": state,
            "genome": self.genome, "budget_epochs": last["budget_epochs"] if last else 0,
            "fitness": sum(top) / len(top) if top else 1.0,
            "epoch_equivalents": sum(r["epoch_equivalents"] for r in self.rows),
        }  # fmt: skip
        log.info(
            "generation %d member %d: %s at %d epochs, fitness %.4f, %.2f epoch-equivalents; "
            "%d of %d candidates left, at most %s",
            g, idx, state, record["budget_epochs"], record["fitness"],
            record["epoch_equivalents"], left, len(trials), duration(left_s),
            extra={"event": "trial", "trial": record, "eta_s": left_s},
        )  # fmt: skip


def run_worker(
    task: SearchTask, *, max_trials: int | None = None, worker: str | None = None
) -> int:
    """Join the search in ``task.out`` (starting it if new) as one more worker process; returns
    how many trials it trained. ``max_trials`` stops it early (the search resumes later)."""
    connect(storage_url(task.cfg.storage, task.out))  # an unreachable database fails before work
    search = Search(task)
    return work(search, open_study(search), worker or worker_id(), max_trials)


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
    :func:`finetune` into ``out/final`` (unless ``retrain`` is false): :func:`run_search` of
    the :class:`SearchTask` these arguments make.

    Candidates see the train and val splits only; the retrain uses ``finetune_cfg`` as given
    (its epochs, patience and augmentation) with strategy ``genome``.
    """
    task = SearchTask(
        cfg, finetune_cfg, manifest, root, data_cfg, Path(out), weights, device, progress
    )
    return run_search(task, retrain)


def run_search(task: SearchTask, retrain: bool = True) -> SearchResult:
    """The search of ``task`` to the end, then (``retrain``) its best genome into ``final/``."""
    result = search_to_the_end(task)
    if retrain:
        result.finetune = retrain_best(task, result)
    return result


def search_to_the_end(task: SearchTask) -> SearchResult:
    """Run the search as one more worker until it is finished; write its results."""
    start = time.perf_counter()
    connect(storage_url(task.cfg.storage, task.out))  # unreachable: fail before any work
    search = Search(task)
    study = open_study(search)
    work(search, study, worker_id())
    trials = study.trials()
    result = summarise(search, trials, study.label, time.perf_counter() - start)
    write_trials_csv(search.blocks, trials, result.trials_csv)
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
