"""The trial store: one search's population and trials in an SQLite file, shared by the
workers of one machine, and the only place that speaks SQL to it.

Readers get typed rows (:class:`Trial`) from :meth:`TrialStore.trials` or :func:`read_trials`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import ConfigError

SQLITE = "sqlite:///"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS population (
    generation INTEGER NOT NULL, idx INTEGER NOT NULL, genome TEXT NOT NULL,
    origin TEXT NOT NULL, PRIMARY KEY (generation, idx));
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL, idx INTEGER NOT NULL, rung INTEGER NOT NULL,
    seed INTEGER NOT NULL, genome TEXT NOT NULL, genome_key TEXT NOT NULL,
    budget_epochs INTEGER NOT NULL, first_trainable INTEGER NOT NULL, order_key INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    reused INTEGER NOT NULL DEFAULT 0, val_bacc REAL, fitness REAL, trainable_fraction REAL,
    cached INTEGER, epochs_trained REAL, epoch_cost REAL, epoch_equivalents REAL, seconds REAL,
    worker TEXT, heartbeat REAL, error TEXT,
    UNIQUE (generation, rung, idx, seed));
CREATE INDEX IF NOT EXISTS trials_status ON trials (status, order_key);
CREATE INDEX IF NOT EXISTS trials_genome ON trials (genome_key, budget_epochs, seed);
"""
RESULT_FIELDS = (
    "val_bacc", "fitness", "trainable_fraction", "cached", "epochs_trained", "epoch_cost",
    "epoch_equivalents", "seconds",
)  # fmt: skip
FINISHED = ("done", "failed")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial as stored: a member (``idx``) of a generation trained at one rung and seed.

    ``reused``: its result was looked up from an earlier generation, not trained. ``cached``:
    it trained on cached frozen-prefix features. Result fields are ``None`` until it finishes.
    """

    id: int
    generation: int
    idx: int
    rung: int
    seed: int
    genome: tuple[float, ...]  # one gene per block, the threshold last
    genome_key: str
    budget_epochs: int
    first_trainable: int
    order_key: int
    status: str  # pending, running, done or failed
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

    @classmethod
    def of(cls, row: sqlite3.Row) -> Trial:
        """The typed form of a ``trials`` row."""
        values = dict(row)
        cached = values["cached"]
        return cls(**{
            **values,
            "genome": tuple(json.loads(values["genome"])),
            "reused": bool(values["reused"]),
            "cached": None if cached is None else bool(cached),
        })  # fmt: skip

    @property
    def finished(self) -> bool:
        """Done or failed (a failed trial scores fitness 1)."""
        return self.status in FINISHED


def store_path(storage: str, out: Path) -> Path:
    """The database file of ``storage`` (``sqlite:///PATH``, ``{out}`` replaced by ``out``)."""
    url = storage.replace("{out}", str(out))
    if not url.startswith(SQLITE):
        raise ConfigError(
            f"search storage {storage!r}: only 'sqlite:///PATH' is supported (one machine, or "
            "a local disk shared by its workers); see docs/finetune.md for a database server"
        )
    return Path(url[len(SQLITE) :])


class TrialStore:
    """The trials of one search in an SQLite file (WAL journal, busy timeout), shared by the
    workers of one machine. Writes that must not interleave run in ``BEGIN IMMEDIATE``
    transactions (:meth:`transaction`)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction that holds the database's write lock from its start."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- what the search is ---------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def bind(self, identity: dict[str, Any]) -> None:
        """Record what the search is (config, data, weights); refuse another search's file."""
        text = json.dumps(identity, sort_keys=True, default=str)
        with self.transaction():
            known = self.meta("search")
            if known is None:
                self.set_meta("search", text)
        if known is not None and known != text:
            raise ConfigError(
                f"{self.path} belongs to another search (config, data or weights differ); "
                "use another output folder or delete the file"
            )

    def add_population(self, generation: int, genomes: np.ndarray, origins: list[str]) -> None:
        self.db.executemany(
            "INSERT INTO population (generation, idx, genome, origin) VALUES (?, ?, ?, ?)",
            [
                (generation, i, json.dumps(g.tolist()), o)
                for i, (g, o) in enumerate(zip(genomes, origins, strict=True))
            ],
        )

    def population(self, generation: int) -> np.ndarray:
        rows = self.db.execute(
            "SELECT genome FROM population WHERE generation = ? ORDER BY idx", (generation,)
        ).fetchall()
        return np.array([json.loads(r[0]) for r in rows], dtype=np.float64)

    # -- reading trials ---------------------------------------------------------------------------
    def rows(self) -> list[sqlite3.Row]:
        """Every ``trials`` row as stored (columns by name), in (generation, rung, idx, seed)
        order; :meth:`trials` gives them typed."""
        return self._select("1", ())

    def _select(self, where: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        return self.db.execute(
            f"SELECT * FROM trials WHERE {where} ORDER BY generation, rung, idx, seed", params
        ).fetchall()

    def trials(self, generation: int | None = None, rung: int | None = None) -> list[Trial]:
        """Every trial (of ``generation`` and ``rung`` when given) in (generation, rung, idx,
        seed) order, which is also the order they were created in."""
        where = " AND ".join(
            f"{name} = ?"
            for name, v in (("generation", generation), ("rung", rung))
            if v is not None
        )
        params = [v for v in (generation, rung) if v is not None]
        return [Trial.of(r) for r in self._select(where or "1", params)]

    def stage(self) -> tuple[int, int] | None:
        """``(generation, rung)`` of the latest trials, or ``None`` before the first."""
        row = self.db.execute(
            "SELECT generation, rung FROM trials ORDER BY generation DESC, rung DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def open_trials(self, generation: int, rung: int) -> int:
        return int(
            self.db.execute(
                "SELECT COUNT(*) FROM trials WHERE generation = ? AND rung = ? "
                "AND status IN ('pending', 'running')",
                (generation, rung),
            ).fetchone()[0]
        )

    def progress(self) -> tuple[int, float]:
        """Finished trials (trained or looked up) and the mean seconds of a trained one."""
        finished, mean = self.db.execute(
            "SELECT COUNT(*), AVG(CASE WHEN reused = 0 THEN seconds END) FROM trials "
            "WHERE status IN ('done', 'failed')"
        ).fetchone()
        return int(finished), float(mean or 0.0)

    def lookup(self, key: str, epochs: int, seed: int, before: int) -> sqlite3.Row | None:
        """A finished trial of genome ``key`` for ``epochs`` and ``seed`` before generation
        ``before``."""
        return self.db.execute(
            "SELECT * FROM trials WHERE genome_key = ? AND budget_epochs = ? AND seed = ? "
            "AND generation < ? AND status IN ('done', 'failed') ORDER BY id LIMIT 1",
            (key, epochs, seed, before),
        ).fetchone()

    # -- writing trials ---------------------------------------------------------------------------
    def insert(self, **fields: Any) -> None:
        names = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        self.db.execute(f"INSERT INTO trials ({names}) VALUES ({marks})", tuple(fields.values()))

    def claim(self, worker: str) -> sqlite3.Row | None:
        """The next pending trial (lowest ``order_key``), now ``running`` for ``worker``; two
        workers never get the same trial."""
        with self.transaction():
            row = self.db.execute(
                "SELECT id FROM trials WHERE status = 'pending' ORDER BY order_key, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            taken = self.db.execute(
                "UPDATE trials SET status = 'running', worker = ?, heartbeat = ? "
                "WHERE id = ? AND status = 'pending'",
                (worker, time.time(), row[0]),
            ).rowcount
        if taken != 1:
            return None
        return self.db.execute("SELECT * FROM trials WHERE id = ?", (row[0],)).fetchone()

    def heartbeat(self, trial_id: int) -> None:
        self.db.execute("UPDATE trials SET heartbeat = ? WHERE id = ?", (time.time(), trial_id))

    def finish(self, trial_id: int, worker: str, status: str, result: dict[str, Any]) -> None:
        """Record a result, unless another worker (which took the trial over) already did."""
        sets = ", ".join(f"{k} = ?" for k in result)
        self.db.execute(
            f"UPDATE trials SET status = ?, worker = ?, {sets} "
            "WHERE id = ? AND status IN ('pending', 'running')",
            (status, worker, *result.values(), trial_id),
        )

    def release(self, trial_id: int, worker: str) -> None:
        """Back to ``pending`` (the worker stopped before finishing it)."""
        self.db.execute(
            "UPDATE trials SET status = 'pending', worker = NULL WHERE id = ? AND worker = ?",
            (trial_id, worker),
        )

    def reclaim(self, stale_seconds: float) -> int:
        """Running trials of dead workers (a process of this host that is gone, or no heartbeat
        for ``stale_seconds``) back to ``pending``; returns how many."""
        rows = self.db.execute(
            "SELECT id, worker, heartbeat FROM trials WHERE status = 'running'"
        ).fetchall()
        now = time.time()
        dead = [r[0] for r in rows if not _alive(r[1]) or now - (r[2] or 0) > stale_seconds]
        for trial_id in dead:
            self.db.execute(
                "UPDATE trials SET status = 'pending', worker = NULL "
                "WHERE id = ? AND status = 'running'",
                (trial_id,),
            )
        return len(dead)


def read_trials(path: Path) -> list[Trial]:
    """Every trial of the store file ``path`` (a finished or stopped search), read and closed."""
    if not Path(path).is_file():
        raise ConfigError(f"trial store {path} does not exist; run the search first")
    store = TrialStore(path)
    try:
        return store.trials()
    finally:
        store.close()


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str | None) -> bool:
    """False only for a worker of this host whose process is gone."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return worker is not None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
