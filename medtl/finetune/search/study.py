"""The search's trials in an Optuna study: where it lives (a SQLite file by default, a
PostgreSQL server for workers on many machines), the typed rows readers get (:class:`Trial`,
:func:`read_trials`), and the bookkeeping of workers (claims, heartbeats, reclaiming the
candidates of dead workers).

One Optuna trial is one candidate genome; its number ``n`` is its slot (generation
``n // population``, member ``n % population``). Every slot is created up front as a waiting
trial, so workers only ever take existing slots and the study never holds more candidates than
the search plans. A candidate keeps what it learnt as user attributes: ``rows`` (one per rung it
reached and per seed trained at the top rung, each with its compute) and ``curve`` (validation
balanced accuracy and loss per epoch of its first seed). :class:`Trial` is one such row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medtl.errors import ConfigError

SQLITE = "sqlite:///"
ROW_FIELDS = (
    "rung", "seed", "budget_epochs", "status", "reused", "val_bacc", "fitness",
    "trainable_fraction", "cached", "epochs_trained", "epoch_cost", "epoch_equivalents",
    "seconds", "error",
)  # fmt: skip
RESULT_FIELDS = ROW_FIELDS[4:13]
FINISHED = ("done", "failed")
WORKER, HEARTBEAT, IDENTITY, SLOTS = "worker", "heartbeat", "search", "slots"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One row of a search: member ``idx`` of ``generation`` (Optuna trial ``id``) evaluated at
    one rung and seed. ``reused``: its result was looked up from an earlier generation, not
    trained. ``cached``: it trained on cached frozen-prefix features. ``epochs_trained`` and
    ``epoch_equivalents`` count what this row added (a promoted candidate continues its run, so
    a later rung costs only its extra epochs)."""

    id: int
    generation: int
    idx: int
    rung: int
    seed: int
    genome: tuple[float, ...]  # one gene per block, the threshold last
    genome_key: str
    budget_epochs: int
    first_trainable: int
    status: str  # done or failed (a diverged run, fitness 1)
    reused: bool
    val_bacc: float | None
    fitness: float | None
    trainable_fraction: float | None
    cached: bool | None
    epochs_trained: float | None
    epoch_cost: float | None
    epoch_equivalents: float | None
    seconds: float | None
    worker: str | None
    heartbeat: float | None
    error: str | None
    state: str = "COMPLETE"  # the candidate's Optuna state: RUNNING, PRUNED or COMPLETE

    @property
    def finished(self) -> bool:
        """Done or failed (a failed trial scores fitness 1)."""
        return self.status in FINISHED


def rows_of(trial: FrozenTrial, population: int) -> list[Trial]:
    """The typed rows of one candidate, in (rung, seed) order."""
    from medtl.finetune.search.config import first_trainable, genome_key

    genome = tuple(float(trial.params[k]) for k in sorted(trial.params))  # g00_.. threshold
    g, idx = divmod(trial.number, population)
    rows = sorted(trial.user_attrs.get("rows", []), key=lambda r: (r["rung"], r["seed"]))
    return [
        Trial(
            id=trial.number,
            generation=g,
            idx=idx,
            genome=genome,
            genome_key=genome_key(genome),
            first_trainable=first_trainable(genome),
            worker=trial.system_attrs.get(WORKER),
            heartbeat=trial.system_attrs.get(HEARTBEAT),
            state=trial.state.name,
            **{k: r.get(k) for k in ROW_FIELDS},
        )
        for r in rows
    ]


def storage_url(storage: str, out: Path) -> str:
    """``storage`` with ``{out}`` replaced by the search folder; a SQLite file's folder made."""
    url = storage.replace("{out}", str(out))
    if url.startswith(SQLITE):
        Path(url[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    return url


def masked(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    return parsed.render_as_string(hide_password=True)


def connect(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``; a database that cannot be reached is a :class:`ConfigError`
    naming the URL (password masked) and the fix."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(SQLITE):
        kwargs["connect_args"] = {"timeout": 120}
    else:
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with _file_lock(url):  # two workers creating one SQLite file's tables would collide
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # sqlalchemy's OperationalError, a missing driver, a bad URL
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot open the search database {masked(url)}: {reason}; start the server or fix "
            "search.storage (or --storage), e.g. postgresql://user:password@host:5432/db or "
            "sqlite:///path/trials.db"
        ) from None


class SearchStudy:
    """One search's Optuna study: created with every slot waiting, bound to what the search is
    (config, data, weights), and shared by the workers that open it."""

    def __init__(
        self,
        url: str,
        name: str,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        self.url, self.name = url, name
        self.storage = connect(url)
        self.created = False
        try:
            self.study = optuna.create_study(
                study_name=name, storage=self.storage, sampler=sampler, pruner=pruner
            )
            self.created = True
        except optuna.exceptions.DuplicatedStudyError:  # resumed, or another worker made it
            self.study = optuna.load_study(
                study_name=name, storage=self.storage, sampler=sampler, pruner=pruner
            )

    @property
    def label(self) -> str:
        """The SQLite file, or the server's URL with the password masked."""
        return self.url[len(SQLITE) :] if self.url.startswith(SQLITE) else masked(self.url)

    def bind(self, identity: dict[str, Any], slots: int, population: int) -> None:
        """Record what the search is and create its ``slots`` waiting candidates (the first
        worker); refuse a study of another search."""
        text = json.dumps({**identity, "population": population}, sort_keys=True, default=str)
        attrs = self.study.user_attrs
        if IDENTITY not in attrs:
            self.study.set_user_attr(IDENTITY, text)
            self.study.set_user_attr("population", population)
            attrs = self.study.user_attrs
        if attrs[IDENTITY] != text:
            raise ConfigError(
                f"study {self.name!r} in {self.label} belongs to another search (config, data or "
                "weights differ); use another output folder, search.study name or database"
            )
        if not self.created:
            self._wait_for_slots()
        have = len(self.frozen())
        for _ in range(slots - have):  # the creator; or a worker after a creator died early
            self.study.enqueue_trial({})
        self.study.set_user_attr(SLOTS, slots)

    def _wait_for_slots(self) -> None:
        """While another worker is still creating the slots (their count grows), wait."""
        seen, still = -1, 0
        while SLOTS not in self.study.user_attrs and still < 5:
            count = len(self.frozen())
            still = still + 1 if count == seen else 0
            seen = count
            time.sleep(1.0)

    def frozen(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def trials(self) -> list[Trial]:
        """Every row of every candidate, in (generation, rung, idx, seed) order."""
        return trial_rows(self.study)

    # -- workers ------------------------------------------------------------------------------
    def claim(self, waiting: FrozenTrial, worker: str) -> optuna.Trial | None:
        """The ``waiting`` candidate, now running for ``worker``; ``None`` if another worker
        took it first (the storage's row lock decides)."""
        trial_id = waiting._trial_id
        with self._claims():
            try:
                if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    return None
            except optuna.exceptions.UpdateFinishedTrialError:
                return None
        self.storage.set_trial_system_attr(trial_id, WORKER, worker)
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        return optuna.Trial(self.study, trial_id)

    def release(self, trial: optuna.Trial) -> None:
        """Back to waiting (its worker stopped before finishing it); a finished one stays."""
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)

    def reclaim(self, stale_seconds: float) -> int:
        """Running candidates of dead workers (a process of this host that is gone, or no
        heartbeat for ``stale_seconds``) back to waiting; returns how many."""
        now, count = time.time(), 0
        for t in self.frozen():
            if t.state != TrialState.RUNNING:
                continue
            beat = t.system_attrs.get(HEARTBEAT)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if _alive(t.system_attrs.get(WORKER)) and now - (beat or now) <= stale_seconds:
                continue
            with self._claims():  # still the same run of the same worker: back to waiting
                now_ = self.storage.get_trial(t._trial_id)
                if (
                    now_.state != TrialState.RUNNING
                    or now_.system_attrs.get(WORKER) != t.system_attrs.get(WORKER)
                    or now_.system_attrs.get(HEARTBEAT) != t.system_attrs.get(HEARTBEAT)
                ):
                    continue
                log.warning("candidate %d of dead worker %s goes back to the queue", t.number,
                            t.system_attrs.get(WORKER))  # fmt: skip
                self.storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
            count += 1
        return count

    @contextlib.contextmanager
    def _claims(self) -> Iterator[None]:
        """Serialises claims and reclaims. A server's row lock (``SELECT ... FOR UPDATE``)
        already makes a claim atomic; SQLite ignores ``FOR UPDATE`` and reads outside the
        write transaction, so its workers take a file lock beside the database."""
        with _file_lock(self.url):
            yield

    @staticmethod
    def beating(trial: optuna.Trial, every: float) -> _Heartbeat:
        """A context in which a thread records ``trial``'s heartbeat every ``every`` seconds."""
        return _Heartbeat(trial, every)


class _Heartbeat:
    def __init__(self, trial: optuna.Trial, every: float) -> None:
        self.trial, self.every, self.stop = trial, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.trial.storage.set_trial_system_attr(
                    self.trial._trial_id, HEARTBEAT, time.time()
                )
            except Exception:  # a finished trial, a dropped connection: the next beat retries
                continue

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """An exclusive lock on ``FILE.lock`` beside a SQLite database; nothing for a server."""
    if not url.startswith(SQLITE):
        yield
        return
    with open(url[len(SQLITE) :] + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _exists(storage: optuna.storages.RDBStorage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def load_study(source: str | Path, study: str = "biotune") -> optuna.Study:
    """The study ``study`` in ``source`` (a SQLite file, or a database URL), for reading: a
    file that does not exist is never created."""
    url = str(source)
    if "://" not in url:
        if not Path(url).is_file():
            raise ConfigError(f"search database {url} does not exist; run the search first")
        url = SQLITE + url
    storage = connect(url)
    if not _exists(storage, study):
        raise ConfigError(f"{masked(url)} holds no study {study!r}; run the search first")
    return optuna.load_study(study_name=study, storage=storage)


def read_trials(source: str | Path, study: str = "biotune") -> list[Trial]:
    """Every row of the search in ``source`` (a SQLite file, or a database URL), read-only."""
    return trial_rows(load_study(source, study))


def identity(study: optuna.Study) -> dict[str, Any]:
    """What the search is, as its first worker recorded it (:meth:`SearchStudy.bind`): the
    ``biotune`` config, the fine-tuning and data settings, the manifest's hash, the blocks;
    empty for a study no worker has bound yet."""
    text = study.user_attrs.get(IDENTITY)
    return json.loads(text) if text else {}


def trial_rows(study: optuna.Study) -> list[Trial]:
    """Every row of every candidate of ``study``, in (generation, rung, idx, seed) order."""
    if "population" not in study.user_attrs:
        return []
    n = int(study.user_attrs["population"])
    rows = [row for t in study.get_trials(deepcopy=False) for row in rows_of(t, n)]
    return sorted(rows, key=lambda r: (r.generation, r.rung, r.idx, r.seed))


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str | None) -> bool:
    """False only for a worker of this host whose process is gone."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
