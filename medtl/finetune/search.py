"""BioTune (Davila et al., IEEE Access 2025): an evolutionary search over which blocks of a
backbone to fine-tune and at which learning rate, scored on the validation split only.

A genome holds one gene in [0, 1] per block of :func:`~medtl.finetune.blocks.blocks_of` (stem ..
head) and a threshold gene last; the ``genome`` strategy decodes it (a block trains iff its gene
exceeds the threshold, at ``10 ** (2 * (gene - 0.5))`` times the base rate). The search minimises
``fitness = 1 - mean over seeds of the best validation balanced accuracy``; the operators live
in :mod:`medtl.finetune.evolution`, the frozen-prefix feature cache in
:mod:`medtl.finetune.prefix`.

Two evaluation schedules share the search space and the population settings:

- ``reference``: every member of every generation (carried elites included) trains for up to
  ``max_epochs`` with early stopping (``patience``) for every seed: a plain :func:`fit`.
- ``halving``: successive halving within each generation (:func:`rungs`). All members train
  ``min_epochs``; the best ``1/eta`` train ``eta`` times longer, ... up to ``max_epochs``, where
  the survivors train for every seed. Each rung is a fresh run with a cosine schedule over its
  own epochs and no early stopping, so it spends exactly its epochs. A genome already evaluated
  at a rung and seed is looked up in the trial store, not retrained (the validation split is
  fixed, so the result would be the same), and pending trials run ordered by their frozen
  prefix so that cached prefix features are reused.

Compute is counted in epoch-equivalents: FLOPs actually run over those of one forward and
backward pass of the whole model over the training split, with backward = 2 x forward (so a
forward pass is 1/3). With first trainable block ``k``, ``s_k`` the share of the forward FLOPs
from block ``k`` on (torch's ``FlopCounterMode`` per segment; parameter shares for families
without segments) and ``v = n_val / n_train``, one epoch and its validation pass cost
``(1 + 2 s_k) / 3 + v / 3`` uncached (the frozen prefix runs forward only) and
``s_k (1 + v / 3)`` cached; filling the cache costs ``(1 - s_k) / 3 * (1 + v)``, once per
process and prefix (see :class:`~medtl.finetune.prefix.Cuts`).

Trials live in SQLite (``storage = "sqlite:///PATH"``; WAL, busy timeout). Workers claim
pending trials atomically; the process that finds a stage complete creates the next one in the
same kind of transaction. A stopped or killed search resumes where it was and reaches the same
result, as every random choice is seeded from ``(seed, generation)`` and training is
deterministic. The test split is never read here; :func:`biotune_search` retrains the best
genome with :func:`~medtl.finetune.loop.finetune`, which writes test predictions once, after
the choice.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from medtl import tracking
from medtl.data.dataset import DataConfig, build_dataset, input_stats
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError
from medtl.finetune import evolution as ea
from medtl.finetune import prefix as px
from medtl.finetune.blocks import blocks_of
from medtl.finetune.loop import (
    FinetuneConfig,
    FinetuneResult,
    balanced_accuracy,
    class_weight_tensor,
    finetune,
    make_step,
    predict,
)
from medtl.finetune.strategies import plan
from medtl.io import atomic_write_bytes, atomic_write_text, write_json
from medtl.models import Classifier, build_classifier
from medtl.sources import resolve as resolve_weights
from medtl.train import Schedule, TrainingError, duration, fit, mix_seed

log = logging.getLogger(__name__)

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
SQLITE = "sqlite:///"
# finetune keys that only the final retrain reads (the ``weights`` argument is hashed instead)
RETRAIN_ONLY = {"strategy", "strategy_options", "epochs", "patience", "weights"}
SCHEDULE_KEYS = (
    "lr",
    "weight_decay",
    "warmup_epochs",
    "grad_clip",
    "batch_size",
    "num_workers",
    "amp",
)


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
    storage: str = Field(
        "sqlite:///{out}/trials.db", description="trial store; {out} is the search folder"
    )
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
        1800.0, gt=0, description="a running trial without heartbeat this long is taken over"
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
    """The stages of one generation. ``reference``: everyone, ``max_epochs``, every seed.
    ``halving``: ``min_epochs * eta**r`` epochs for ``population // eta**r`` members (at least
    one) while that is below ``max_epochs`` and more than one member is left, then a last rung
    of ``max_epochs`` for every seed."""
    if cfg.schedule == "reference":
        return [Rung(cfg.max_epochs, cfg.population, cfg.seeds)]
    out, epochs, size = [], cfg.min_epochs, cfg.population
    while epochs < cfg.max_epochs and size > 1:
        out.append(Rung(epochs, size, 1))
        epochs, size = epochs * cfg.eta, max(1, size // cfg.eta)
    return [*out, Rung(cfg.max_epochs, size, cfg.seeds)]


def generation_epochs(cfg: BioTuneConfig) -> int:
    """Training epochs one generation schedules when nothing is looked up: exact for
    ``halving``, an upper bound for ``reference`` (early stopping ends runs sooner)."""
    return sum(r.epochs * r.size * r.seeds for r in rungs(cfg))


def first_trainable(genome: Sequence[float]) -> int:
    """Index of the first block the genome trains (the ``genome`` strategy's rule; the head,
    the last block, when no gene exceeds the threshold ``genome[-1]``)."""
    genes, threshold = list(genome[:-1]), genome[-1]
    return next((i for i, g in enumerate(genes) if g > threshold), len(genes) - 1)


def genome_key(genome: Sequence[float]) -> str:
    return hashlib.sha1(json.dumps([float(g) for g in genome]).encode()).hexdigest()[:16]


# -- the trial store ------------------------------------------------------------------------
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

    def insert(self, **fields: Any) -> None:
        names = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        self.db.execute(f"INSERT INTO trials ({names}) VALUES ({marks})", tuple(fields.values()))

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

    def progress(self) -> tuple[int, float]:
        """Finished trials (trained or looked up) and the mean seconds of a trained one."""
        finished, mean = self.db.execute(
            "SELECT COUNT(*), AVG(CASE WHEN reused = 0 THEN seconds END) FROM trials "
            "WHERE status IN ('done', 'failed')"
        ).fetchone()
        return int(finished), float(mean or 0.0)

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

    def lookup(self, key: str, epochs: int, seed: int, before: int) -> sqlite3.Row | None:
        """A finished trial of genome ``key`` for ``epochs`` and ``seed`` before generation
        ``before``."""
        return self.db.execute(
            "SELECT * FROM trials WHERE genome_key = ? AND budget_epochs = ? AND seed = ? "
            "AND generation < ? AND status IN ('done', 'failed') ORDER BY id LIMIT 1",
            (key, epochs, seed, before),
        ).fetchone()

    def rows(self, where: str = "1", params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self.db.execute(
            f"SELECT * FROM trials WHERE {where} ORDER BY generation, rung, idx, seed", params
        ).fetchall()


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


# -- one search, as seen by one process --------------------------------------------------------
class Search:
    """What every worker of a search shares: configuration, data, blocks, where the model can be
    cut (:class:`~medtl.finetune.prefix.Cuts`) and this process's prefix-feature cache.
    Datasets are built on first use."""

    def __init__(
        self,
        cfg: BioTuneConfig,
        ft: FinetuneConfig,
        manifest: Manifest,
        root: Path,
        data_cfg: DataConfig,
        out: Path,
        weights: str | Path | None = None,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        if not manifest.classes:
            raise ConfigError("the BioTune search needs a labelled manifest; it has no classes")
        self.cfg, self.ft, self.manifest, self.root = cfg, ft, manifest, Path(root)
        self.data_cfg, self.out, self.weights = data_cfg, Path(out), weights
        self.device, self.progress = device, progress
        self.seeds = [cfg.seed + i for i in range(cfg.seeds)]
        self.rungs = rungs(cfg)
        self.n_train, self.n_val = len(manifest.split("train")), len(manifest.split("val"))
        self.mean, self.std = input_stats(manifest, self.root, data_cfg)
        self.augment = "none" if cfg.cache_prefix else ft.augment
        self.cache = px.FeatureCache(2)
        self._data: dict[str, Any] = {}
        model = self.build(self.seeds[0])
        self.blocks = [b.name for b in blocks_of(model)]
        side = data_cfg.image_size
        sample = torch.rand(
            2, data_cfg.channels, side, side, generator=torch.Generator().manual_seed(0)
        )
        self.cuts = px.Cuts.of(model, blocks_of(model), sample, self.n_train + self.n_val)

    def build(self, seed: int) -> Classifier:
        """The candidate's initial model, built under ``seed`` as ``finetune`` builds it."""
        torch.manual_seed(seed)
        classes, channels = len(self.manifest.classes), self.data_cfg.channels
        return build_classifier(
            self.ft.backbone, classes, channels, self.weights, mean=self.mean, std=self.std
        )

    def identity(self) -> dict[str, Any]:
        """What must match for workers and resumed runs to share a store."""
        skip = {"storage", "poll_seconds", "stale_seconds"}
        return {
            "biotune": self.cfg.model_dump(mode="json", exclude=skip),
            "finetune": self.ft.model_dump(mode="json", exclude=RETRAIN_ONLY),
            # stores made before data.loader.normalize existed stay valid at its default
            "data": self.data_cfg.model_dump(
                mode="json",
                exclude={"normalize"} if self.data_cfg.normalize == "backbone" else None,
            ),
            "manifest": self.manifest.sha256,
            "weights": resolve_weights(self.weights).sha256 if self.weights else None,
            "blocks": self.blocks,
        }

    def cached(self, k: int) -> bool:
        """Whether a candidate whose first trainable block is ``k`` trains on cached features
        (never in ``reference``, which recomputes the prefix every epoch as plain ``fit`` does)."""
        if self.cfg.schedule == "reference" or not self.cfg.cache_prefix:
            return False
        return self.cuts.cacheable(k, self.cfg.cache_max_gb * 1e9)

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, split: Literal["train", "val"]) -> Any:
        """The train (``self.augment``) or val (no augmentation) dataset; never the test split."""
        if split not in self._data:
            aug = self.augment if split == "train" else "none"
            cfg = self.data_cfg.model_copy(update={"augment": aug})
            self._data[split] = build_dataset(
                self.manifest, split, self.root, cfg, train=split == "train", seed=self.cfg.seed
            )
        return self._data[split]

    def features(self, model: Classifier, k: int) -> tuple[dict[str, Any], bool]:
        """Prefix outputs of train and val for cut ``k`` of ``model``, and whether they came
        from the cache (keyed by ``k`` and the frozen prefix's weights). Train features are
        computed under ``fit``'s autocast, val features without, as ``predict`` runs."""
        segments, batch, device = self.cuts.segments or [], self.ft.batch_size, self.device
        train, val = self.dataset("train"), self.dataset("val")

        def compute() -> dict[str, Any]:
            cast = px.autocast(device, self.ft.amp)
            return {
                "train": px.prefix_features(model, segments, k, train, batch, device, cast),
                "val": px.prefix_features(model, segments, k, val, batch, device),
            }

        return self.cache.get((k, px.prefix_digest(model, segments, k)), compute)

    # -- one trial ------------------------------------------------------------------------------------
    def schedule(self, epochs: int) -> Schedule:
        """The recipe's optimisation for ``epochs``; early stopping only in ``reference``;
        checkpoints at epoch ends only (enough to resume a killed trial)."""
        patience = self.cfg.patience if self.cfg.schedule == "reference" else None
        recipe = self.ft.model_dump(include=set(SCHEDULE_KEYS))
        return Schedule(epochs, patience=patience, checkpoint_every=10**9, **recipe)

    def folder(self, trial: sqlite3.Row) -> Path:
        """The trial's checkpoint folder (kept only while it trains, to resume a killed run)."""
        name = f"g{trial['generation']}-r{trial['rung']}-i{trial['idx']}-s{trial['seed']}"
        return self.out / "trials" / name

    def evaluate(self, trial: sqlite3.Row, beat: Callable[[], None]) -> dict[str, Any]:
        """Train one trial (resuming its checkpoint, deleted after) and return its results."""
        start = time.perf_counter()
        genome, seed = json.loads(trial["genome"]), int(trial["seed"])
        model = self.build(seed)
        the_plan = plan("genome", model, blocks_of(model), genes=genome[:-1], threshold=genome[-1])
        k = min(self.blocks.index(b) for b in the_plan.trainable_blocks)
        cached = self.cached(k)
        net, data, evaluate, train_mode, fill = self._runner(model, the_plan, k, cached)
        folder = self.folder(trial)
        balanced = self.ft.class_weights == "balanced"
        step = make_step(
            class_weight_tensor(self.manifest) if balanced else None, self.ft.label_smoothing
        )
        with tracking.child(f"search/{folder.name}"):
            result = fit(
                net, step, the_plan.param_groups, data, self.schedule(int(trial["budget_epochs"])),
                folder, seed=seed, device=self.device, evaluate=evaluate, monitor="val_bacc",
                on_epoch_end=lambda *_: beat(), train_mode=train_mode, progress=self.progress,
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        epochs = result.samples_seen / self.n_train  # the whole run, resumed or not
        cost = self.cuts.epoch_cost(k, cached, self.n_val / self.n_train)
        bacc = float(result.best_score or 0.0)
        return {
            "val_bacc": bacc, "fitness": 1.0 - bacc,
            "trainable_fraction": the_plan.trainable_fraction, "cached": int(cached),
            "epochs_trained": epochs, "epoch_cost": cost,
            "epoch_equivalents": epochs * cost + fill, "seconds": time.perf_counter() - start,
        }  # fmt: skip

    def _runner(
        self, model: Classifier, the_plan: Any, k: int, cached: bool
    ) -> tuple[nn.Module, Any, Any, Any, float]:
        """``(net, train data, evaluate, train_mode, cache-filling cost)`` for ``fit``."""
        batch, device = self.ft.batch_size, self.device
        if not cached:
            val = self.dataset("val")

            def evaluate(m: nn.Module) -> dict[str, float]:
                _, y, z = predict(m, val, batch, device)
                return {"val_bacc": balanced_accuracy(y, z)}

            return model, self.dataset("train"), evaluate, the_plan.train_mode, 0.0
        feats, hit = self.features(model, k)
        xv, yv = feats["val"]

        def evaluate_cached(m: nn.Module) -> dict[str, float]:
            parts = [
                m(xv[i : i + batch].to(device)).float().cpu() for i in range(0, len(xv), batch)
            ]
            return {"val_bacc": balanced_accuracy(yv.numpy(), torch.cat(parts).numpy())}

        def train_mode(m: nn.Module) -> None:
            the_plan.train_mode(model)  # the plan names modules of the whole model

        net = px.SuffixModel(model, self.cuts.segments or [], k)
        fill = 0.0 if hit else self.cuts.caching_cost(k, self.n_val / self.n_train)
        return net, px.FeatureSet(*feats["train"]), evaluate_cached, train_mode, fill


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
            n, length = search.cfg.population, len(search.blocks) + 1
            population = ea.random_genomes(n, length, _rng(search.cfg.seed, 0))
            store.add_population(0, population, [ea.RANDOM] * n)
            _add_trials(search, store, 0, 0, list(range(n)))
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
            prior = (
                store.lookup(key, rung.epochs, seed, g)
                if search.cfg.schedule == "halving"
                else None
            )
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
    rows = store.rows("generation = ? AND rung = ?", (g, r))
    objectives = _objectives(
        search, [x["fitness"] for x in rows], [x["trainable_fraction"] for x in rows]
    )
    order = ea.order_candidates(np.zeros(len(rows)), objectives)
    return sorted(int(rows[i]["idx"]) for i in order[: search.rungs[r + 1].size])


def _next_generation(search: Search, store: TrialStore, g: int) -> None:
    """Rank generation ``g`` by everything known of its genomes and breed generation g+1."""
    population = store.population(g)
    known = _knowledge(search, store.rows())
    standing = [known[genome_key(p.tolist())] for p in population]
    objectives = _objectives(search, [s[1] for s in standing], [s[2] for s in standing])
    order = ea.order_candidates(np.array([s[0] for s in standing]), objectives)
    children, origins = ea.next_generation(
        population, order, search.cfg.operators(), _rng(search.cfg.seed, g + 1)
    )
    store.add_population(g + 1, children, origins)
    _add_trials(search, store, g + 1, 0, list(range(len(children))))


def _knowledge(search: Search, rows: Sequence[sqlite3.Row]) -> dict[str, tuple[int, float, float]]:
    """Per genome key: ``(rung, fitness, trainable fraction)`` at the highest rung with a
    result for every seed that rung needs, over all generations."""
    groups: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        if row["status"] in ("done", "failed"):
            groups.setdefault(row["genome_key"], []).append(row)
    known = {}
    for key, group in groups.items():
        for r in reversed(range(len(search.rungs))):
            rung = search.rungs[r]
            got = {x["seed"]: x for x in group if x["budget_epochs"] == rung.epochs}
            need = search.seeds[: rung.seeds]
            if all(s in got for s in need):
                bacc = float(np.mean([got[s]["val_bacc"] for s in need]))
                known[key] = (r, 1.0 - bacc, float(got[need[0]]["trainable_fraction"]))
                break
    return known


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


def _run_trial(search: Search, store: TrialStore, trial: sqlite3.Row, worker: str) -> None:
    """Evaluate one claimed trial; a diverging run (TrainingError) scores fitness 1, any other
    error puts the trial back to pending and propagates."""
    try:
        result = search.evaluate(trial, lambda: store.heartbeat(int(trial["id"])))
    except TrainingError as exc:
        log.warning("trial %s failed: %s", dict(trial)["id"], exc)
        failed = {"val_bacc": 0.0, "fitness": 1.0, "trainable_fraction": 1.0, "error": str(exc)}
        store.finish(int(trial["id"]), worker, "failed", failed)
        shutil.rmtree(search.folder(trial), ignore_errors=True)  # a rerun would diverge again
        return
    except BaseException:
        store.release(int(trial["id"]), worker)
        raise
    store.finish(int(trial["id"]), worker, "done", result)
    finished, mean_s = store.progress()
    planned = search.cfg.generations * sum(r.size * r.seeds for r in rungs(search.cfg))
    left_s = max(0, planned - finished) * mean_s  # an upper bound: look-ups cost nothing
    log.info(
        "generation %d rung %d member %d seed %d: val bacc %.4f, %.2f epoch-equivalents; "
        "%d of at most %d trials finished, at most %s left",
        trial["generation"], trial["rung"], trial["idx"], trial["seed"], result["val_bacc"],
        result["epoch_equivalents"], finished, planned, duration(left_s),
        extra={"event": "trial", "trial": {**dict(trial), **result}, "eta_s": left_s},
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
    search = Search(cfg, finetune_cfg, manifest, root, data_cfg, out, weights, device, progress)
    store = open_store(search)
    try:
        return work(search, store, worker or worker_id(), max_trials)
    finally:
        store.close()


# -- results -----------------------------------------------------------------------------------
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
    trials_db: Path
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


def summarise(search: Search, store: TrialStore, seconds: float) -> SearchResult:
    """The best genome (lowest fitness at the last rung; earliest on ties), the Pareto front of
    (fitness, trainable fraction) and the compute spent, from a finished store."""
    rows = store.rows()
    known = _knowledge(search, rows)
    first: dict[str, sqlite3.Row] = {}
    for row in rows:
        first.setdefault(row["genome_key"], row)
    top = len(search.rungs) - 1
    finals = [(v[1], first[k]["id"], k) for k, v in known.items() if v[0] == top]
    if not finals:
        raise ConfigError(f"{store.path} holds no finished candidate; run the search to the end")
    _, _, best = min(finals)
    genome = json.loads(first[best]["genome"])
    points = np.array([[known[k][1], known[k][2]] for _, _, k in finals])
    pareto = [
        _candidate(search, json.loads(first[finals[i][2]]["genome"]), known[finals[i][2]])
        for i in ea.pareto_front(points)
    ]
    return SearchResult(
        search.blocks, genome[:-1], genome[-1], known[best][1], 1.0 - known[best][1],
        known[best][2], sorted(pareto, key=lambda c: c["fitness"]), _per_generation(rows),
        _total(rows, "epoch_equivalents"), _total(rows, "epochs_trained"), _total(rows, "seconds"),
        seconds, store.path, search.out / "trials.csv", search.out / "search.png",
    )  # fmt: skip


def _candidate(
    search: Search, genome: list[float], known: tuple[int, float, float]
) -> dict[str, Any]:
    return {
        "genes": genome[:-1], "threshold": genome[-1], "fitness": known[1],
        "val_bacc": 1.0 - known[1], "trainable_fraction": known[2],
        "trainable_blocks": [b for b, g in zip(search.blocks, genome, strict=False) if g > genome[-1]],
    }  # fmt: skip


def _total(rows: Sequence[sqlite3.Row], column: str) -> float:
    return float(sum(r[column] or 0.0 for r in rows))


def _per_generation(rows: Sequence[sqlite3.Row]) -> list[dict[str, float]]:
    """Best and median fitness per generation, each member at the highest rung it reached."""
    out = []
    for g in sorted({r["generation"] for r in rows}):
        members: dict[int, list[sqlite3.Row]] = {}
        for r in rows:
            if r["generation"] == g:
                members.setdefault(r["idx"], []).append(r)
        scores = []
        for group in members.values():
            high = max(x["rung"] for x in group)
            scores.append(float(np.mean([x["fitness"] for x in group if x["rung"] == high])))
        out.append({"generation": g, "best": min(scores), "median": float(np.median(scores))})
    return out


def write_trials_csv(search: Search, store: TrialStore, path: Path) -> None:
    """Every trial with its genome, per-block genes and the strategy options replaying it."""
    columns = [
        "generation", "idx", "rung", "seed", "budget_epochs", "status", "reused", "val_bacc",
        "fitness", "trainable_fraction", "cached", "epochs_trained", "epoch_cost",
        "epoch_equivalents", "seconds", "worker", "genome_key",
    ]  # fmt: skip
    genes = [f"gene_{b}" for b in search.blocks]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*columns, "first_trainable", *genes, "threshold", "strategy_options"])
    for row in store.rows():
        genome = json.loads(row["genome"])
        options = json.dumps({"genes": genome[:-1], "threshold": genome[-1]})
        block = search.blocks[row["first_trainable"]]
        writer.writerow([row[c] for c in columns] + [block, *genome, options])
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
    start = time.perf_counter()
    out = Path(out)
    search = Search(cfg, finetune_cfg, manifest, root, data_cfg, out, weights, device, progress)
    store = open_store(search)
    try:
        work(search, store, worker_id())
        result = summarise(search, store, time.perf_counter() - start)
        write_trials_csv(search, store, result.trials_csv)
    finally:
        store.close()
    plot_search(result, result.plot)
    write_json(out / "search.json", result.summary())
    if retrain:
        options = {"strategy": "genome", "strategy_options": result.strategy_options}
        result.finetune = finetune(
            finetune_cfg.model_copy(update=options), manifest, root, data_cfg, out / "final",
            seed=cfg.seed, weights=weights, device=device, progress=progress,
        )  # fmt: skip
    return result
