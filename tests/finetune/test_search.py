"""The BioTune search: config, schedules, budgets, the trial store, resume, workers, test split."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest, ManifestMeta, Row
from medtl.errors import ConfigError
from medtl.finetune import blocks_of, plan
from medtl.finetune import search as bt
from medtl.finetune.loop import FinetuneConfig
from medtl.finetune.search import candidate
from medtl.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["left", "right"]
SPLITS = {"train": 12, "val": 8, "test": 4}


def _image(path: Path, label: int, seed: int) -> None:
    """32x32 grey noise with a bright bar on the left (class 0) or the right (class 1)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, size=(32, 32), dtype=np.uint8)
    pixels[:, 4:12] += 35 if label == 0 else 0
    pixels[:, 20:28] += 35 if label == 1 else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    """A two-class folder of 32 px images and its manifest (12 train, 8 val, 4 test)."""
    root = tmp_path_factory.mktemp("images")
    rows, seed = [], 0
    for split, count in SPLITS.items():
        for i in range(count):
            label, rel = i % 2, f"{split}/{i}.png"
            _image(root / rel, label, seed)
            seed += 1
            rows.append(Row(f"{split}{i}", rel, CLASSES[label], split, f"{split}{i}", "", 32, 32))
    return Manifest(rows, ManifestMeta("folder", CLASSES, 0, {}, "official")), root


FT = FinetuneConfig(
    backbone="medtl_tiny_convnext",
    epochs=2,
    batch_size=4,
    lr=3e-3,
    warmup_epochs=0,
    patience=None,
    augment="none",
)
DATA = DataConfig(image_size=32, channels=1)


def _cfg(**overrides: Any) -> bt.BioTuneConfig:
    """4 members, halving rungs (1 epoch x 4, 2 x 2, 3 x 1), two generations."""
    base: dict[str, Any] = dict(
        preset="cpu",
        population=4,
        elite=1,
        exploit=1,
        generations=2,
        max_epochs=3,
        min_epochs=1,
        eta=2,
        poll_seconds=0.01,
    )
    return bt.BioTuneConfig(**{**base, **overrides})


def _rows(out: Path) -> list[dict[str, Any]]:
    store = bt.TrialStore(out / "trials.db")
    try:
        return [dict(r) for r in store.rows()]
    finally:
        store.close()


def _outcome(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("generation", "rung", "idx", "seed", "genome", "status", "reused", "val_bacc")
    keys += ("fitness", "trainable_fraction", "cached", "epochs_trained", "epoch_cost")
    return [tuple(r[k] for k in keys) for r in rows]


# -- configuration and schedules --------------------------------------------------------------
def test_presets_fill_the_fields_a_recipe_leaves_out() -> None:
    cpu = bt.BioTuneConfig(preset="cpu", generations=2)
    assert (cpu.population, cpu.elite, cpu.seeds, cpu.max_epochs, cpu.patience) == (6, 2, 1, 15, 3)
    assert cpu.generations == 2
    paper = bt.BioTuneConfig()
    assert (paper.population, paper.elite, paper.generations, paper.seeds) == (10, 3, 10, 3)
    assert paper.max_epochs == 30
    with pytest.raises(ValidationError, match="extra"):
        bt.BioTuneConfig(generation=3)
    with pytest.raises(ValidationError, match="elite=6 must be below population=6"):
        bt.BioTuneConfig(preset="cpu", elite=6)
    with pytest.raises(ValidationError, match="preset"):
        bt.BioTuneConfig(preset="gpu")


def test_rungs_of_both_schedules() -> None:
    paper = bt.BioTuneConfig()
    assert bt.rungs(paper) == [bt.Rung(3, 10, 1), bt.Rung(9, 3, 1), bt.Rung(30, 1, 3)]
    assert bt.generation_epochs(paper) == 30 + 27 + 90
    assert bt.rungs(bt.BioTuneConfig(preset="cpu")) == [
        bt.Rung(2, 6, 1),
        bt.Rung(6, 2, 1),
        bt.Rung(15, 1, 1),
    ]
    reference = bt.BioTuneConfig(schedule="reference")
    assert bt.rungs(reference) == [bt.Rung(30, 10, 3)]
    assert bt.rungs(_cfg()) == [bt.Rung(1, 4, 1), bt.Rung(2, 2, 1), bt.Rung(3, 1, 1)]


def test_first_trainable_follows_the_genome_strategy() -> None:
    model = build_classifier("medtl_tiny_convnext", 2, 1)
    blocks = blocks_of(model)
    names = [b.name for b in blocks]
    for genome in ([0.1, 0.2, 0.9, 0.3, 0.8, 0.6, 0.5], [0.9] * 6 + [0.1], [0.1] * 6 + [0.5]):
        p = plan("genome", model, blocks, genes=genome[:-1], threshold=genome[-1])
        assert bt.first_trainable(genome) == min(names.index(b) for b in p.trainable_blocks)


def test_storage_urls() -> None:
    out = Path("/runs/a")
    assert bt.store_path("sqlite:///{out}/trials.db", out) == Path("/runs/a/trials.db")
    assert bt.store_path("sqlite:///rel/t.db", out) == Path("rel/t.db")
    with pytest.raises(ConfigError, match="only 'sqlite:///PATH'"):
        bt.store_path("postgresql://host/db", out)


# -- the trial store ------------------------------------------------------------------------------
def _fill(store: bt.TrialStore, count: int) -> None:
    with store.transaction():
        for i in range(count):
            store.insert(
                generation=0, idx=i, rung=0, seed=0, genome="[0.5]", genome_key=f"k{i}",
                budget_epochs=1, first_trainable=0, order_key=(count - i) % 5 * 100 + i,
                status="pending",
            )  # fmt: skip


def test_concurrent_claims_never_hand_out_a_trial_twice(tmp_path: Path) -> None:
    bt.TrialStore(tmp_path / "t.db").close()
    first = bt.TrialStore(tmp_path / "t.db")
    _fill(first, 40)
    claimed: dict[str, list[int]] = {}

    def claim_all(name: str) -> None:
        store = bt.TrialStore(tmp_path / "t.db")  # one connection per worker
        got = claimed.setdefault(name, [])
        while (trial := store.claim(name)) is not None:
            got.append(int(trial["id"]))
        store.close()

    workers = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ids = [i for got in claimed.values() for i in got]
    assert sorted(ids) == list(range(1, 41))  # every trial exactly once
    rows = first.rows()
    assert all(r["status"] == "running" and r["worker"] in claimed for r in rows)
    assert all(int(r["id"]) in claimed[r["worker"]] for r in rows)
    first.close()


def test_claims_follow_the_prefix_order_and_two_connections_see_each_other(tmp_path: Path) -> None:
    a, b = bt.TrialStore(tmp_path / "t.db"), bt.TrialStore(tmp_path / "t.db")
    _fill(a, 5)  # order keys: idx 0 -> 0, 1 -> 401, 2 -> 302, 3 -> 203, 4 -> 104
    order = [int(a.claim("a")["idx"]), int(b.claim("b")["idx"]), int(a.claim("a")["idx"])]
    assert order == [0, 4, 3]
    assert b.claim("b")["idx"] == 2 and a.claim("a")["idx"] == 1
    assert a.claim("a") is None and b.claim("b") is None
    a.close()
    b.close()


def test_trials_of_a_dead_worker_are_reclaimed(tmp_path: Path) -> None:
    store = bt.TrialStore(tmp_path / "t.db")
    _fill(store, 3)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}"
    store.claim(dead)
    store.claim(bt.worker_id())  # this process: alive
    store.claim("elsewhere:1")  # another host: alive until its heartbeat is stale
    assert store.reclaim(stale_seconds=3600) == 1
    states = {r["worker"]: r["status"] for r in store.rows()}
    assert states == {None: "pending", bt.worker_id(): "running", "elsewhere:1": "running"}
    assert store.reclaim(stale_seconds=0) == 2
    store.close()


def test_the_read_api_gives_back_typed_trials_as_written(tmp_path: Path) -> None:
    store = bt.TrialStore(tmp_path / "t.db")
    genomes = {(0, 0): [0.1, 0.9, 0.5], (0, 1): [0.7, 0.2, 0.4], (1, 0): [0.1, 0.9, 0.5]}
    with store.transaction():
        for (g, idx), genome in genomes.items():
            store.insert(
                generation=g, idx=idx, rung=0, seed=3, genome=json.dumps(genome),
                genome_key=bt.genome_key(genome), budget_epochs=2,
                first_trainable=bt.first_trainable(genome), order_key=idx, status="pending",
                reused=int(g == 1),
            )  # fmt: skip
    first = store.claim("w")
    assert first is not None
    result = {"val_bacc": 0.75, "fitness": 0.25, "trainable_fraction": 0.5, "cached": 1}
    store.finish(int(first["id"]), "w", "done", {**result, "epochs_trained": 2.0})
    store.close()

    trials = bt.read_trials(tmp_path / "t.db")
    assert [(t.generation, t.idx) for t in trials] == list(genomes)
    done, pending, reused = trials
    assert done.genome == (0.1, 0.9, 0.5) and done.first_trainable == 1
    assert done.status == "done" and done.finished and not pending.finished
    assert (done.val_bacc, done.fitness, done.trainable_fraction) == (0.75, 0.25, 0.5)
    assert done.cached is True and done.reused is False and done.epochs_trained == 2.0
    assert done.worker == "w" and done.budget_epochs == 2 and done.seed == 3
    assert pending.cached is None and pending.fitness is None and pending.worker is None
    assert reused.reused is True and reused.genome_key == done.genome_key
    store = bt.TrialStore(tmp_path / "t.db")
    assert store.trials(generation=0, rung=0) == [done, pending]
    assert store.trials(generation=1) == [reused] and store.trials(rung=1) == []
    store.close()
    with pytest.raises(ConfigError, match="does not exist"):
        bt.read_trials(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()


def _trial(g: int, r: int, idx: int, fitness: float, ee: float, seed: int = 0) -> bt.Trial:
    return bt.Trial(
        id=0, generation=g, idx=idx, rung=r, seed=seed, genome=(0.5, 0.5), genome_key="k",
        budget_epochs=1, first_trainable=0, order_key=0, status="done", reused=ee == 0,
        val_bacc=1 - fitness, fitness=fitness, trainable_fraction=1.0, cached=False,
        epochs_trained=ee, epoch_cost=1.0, epoch_equivalents=ee, seconds=0.0, worker=None,
        heartbeat=None, error=None,
    )  # fmt: skip


def test_the_stage_curve_charges_each_stage_before_its_results_count() -> None:
    trials = [
        _trial(0, 0, 0, 0.4, 1.0), _trial(0, 0, 1, 0.3, 1.0),  # rung 0: not choosable
        _trial(0, 1, 1, 0.2, 2.0), _trial(0, 1, 1, 0.4, 2.0, seed=1),  # top rung: mean 0.3
        _trial(1, 0, 0, 0.1, 1.0), _trial(1, 0, 1, 0.3, 0.0),  # member 1 looked up: free
        _trial(1, 1, 0, 0.1, 2.0), _trial(1, 1, 0, 0.2, 2.0, seed=1),  # mean 0.15
    ]  # fmt: skip
    pending = dataclasses.replace(trials[0], generation=2, status="pending", fitness=None)
    curve = bt.stage_curve([*reversed(trials), pending])  # any order in, stage order out
    assert [spent for spent, _ in curve] == [2.0, 6.0, 7.0, 11.0]
    assert [best for _, best in curve] == pytest.approx([math.inf, 0.3, 0.3, 0.15])
    assert bt.cost_to_reach(curve, 0.3) == 6.0 and bt.cost_to_reach(curve, 0.15) == 11.0
    assert bt.cost_to_reach(curve, 0.1) is None and bt.stage_curve([pending]) == []


def test_a_store_refuses_another_search(tmp_path: Path) -> None:
    store = bt.TrialStore(tmp_path / "t.db")
    store.bind({"seed": 0})
    store.bind({"seed": 0})
    with pytest.raises(ConfigError, match="belongs to another search"):
        store.bind({"seed": 1})
    store.close()


# -- searches -----------------------------------------------------------------------------------------
def test_successive_halving_spends_exactly_the_budget_it_says(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    cfg = _cfg(generations=1, cache_prefix=False)
    result = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path, progress=False, retrain=False
    )
    rows = _rows(tmp_path)
    assert [(r["rung"], r["budget_epochs"]) for r in rows] == [(0, 1)] * 4 + [(1, 2)] * 2 + [(2, 3)]
    assert all(r["epochs_trained"] == r["budget_epochs"] for r in rows)
    assert result.epochs_trained == bt.generation_epochs(cfg) == 4 * 1 + 2 * 2 + 1 * 3
    assert result.epoch_equivalents == pytest.approx(
        sum(r["epochs_trained"] * r["epoch_cost"] for r in rows)
    )
    v = SPLITS["val"] / SPLITS["train"]  # uncached: (1 + 2 s_k) / 3 + v / 3, s_k in (0, 1]
    assert all((1 + v) / 3 < r["epoch_cost"] <= 1 + v / 3 + 1e-12 for r in rows)
    assert all(not r["cached"] for r in rows)
    promoted = {r["idx"] for r in rows if r["rung"] == 1}
    rung0 = sorted((r["fitness"], r["idx"]) for r in rows if r["rung"] == 0)
    assert promoted == {idx for _, idx in rung0[:2]}  # the best half goes on


def test_a_stopped_search_resumes_to_the_same_result_without_reading_test(
    dataset: tuple[Manifest, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, root = dataset
    cfg = _cfg()
    whole = bt.biotune_search(cfg, FT, manifest, root, DATA, tmp_path / "whole", progress=False)
    # The retrain (and only it) writes test predictions:
    assert whole.finetune is not None and whole.finetune.test is not None
    assert whole.finetune.meta["plan"]["options"] == whole.strategy_options
    lines = (tmp_path / "whole" / "trials.csv").read_text().splitlines()
    rows = _rows(tmp_path / "whole")
    assert len(lines) == 1 + len(rows) and "strategy_options" in lines[0]
    assert (tmp_path / "whole" / "search.png").stat().st_size > 0
    summary = json.loads((tmp_path / "whole" / "search.json").read_text())
    assert summary["best_genes"] == whole.best_genes
    # Generation 1 carries the elite: looked up, not retrained, at every rung it reached.
    reused = [r for r in rows if r["reused"]]
    assert reused and all(r["generation"] == 1 and r["epochs_trained"] == 0 for r in reused)
    trained = [r for r in rows if not r["reused"]]
    assert sum(r["epochs_trained"] for r in trained) == sum(r["budget_epochs"] for r in trained)

    # The same search again: test images gone, every dataset the search builds recorded;
    # stopped after 3 trials, then killed inside a 2-epoch trial after its first epoch's
    # checkpoint, then resumed.
    for row in manifest.split("test"):
        (root / row.path).rename(root / f"{row.path}.hidden")
    built: list[str] = []
    real_build, real_fit = candidate.build_dataset, candidate.fit

    def build(m: Manifest, split: str, *args: Any, **kwargs: Any) -> Any:
        built.append(split)
        return real_build(m, split, *args, **kwargs)

    def killed(*args: Any, evaluate: Any, **kwargs: Any) -> Any:
        if args[4].epochs < 2:
            return real_fit(*args, evaluate=evaluate, **kwargs)
        epochs: list[int] = []

        def die_in_epoch_two(model: Any) -> dict[str, float]:
            epochs.append(1)
            if len(epochs) == 2:
                raise KeyboardInterrupt
            return evaluate(model)

        return real_fit(*args, evaluate=die_in_epoch_two, **kwargs)

    monkeypatch.setattr(candidate, "build_dataset", build)
    parts = tmp_path / "parts"
    try:
        assert (
            bt.run_worker(cfg, FT, manifest, root, DATA, parts, progress=False, max_trials=3) == 3
        )
        assert sum(r["status"] == "done" for r in _rows(parts)) == 3
        monkeypatch.setattr(candidate, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            bt.biotune_search(cfg, FT, manifest, root, DATA, parts, progress=False, retrain=False)
        pending = [r for r in _rows(parts) if r["budget_epochs"] == 2 and r["status"] == "pending"]
        assert len(pending) == 2 and pending[0]["worker"] is None  # released, not lost
        assert len(list((parts / "trials").glob("*/checkpoint.pt"))) == 1  # epoch 1 kept
        monkeypatch.setattr(candidate, "fit", real_fit)
        resumed = bt.biotune_search(
            cfg, FT, manifest, root, DATA, parts, progress=False, retrain=False
        )
    finally:
        for row in manifest.split("test"):
            (root / f"{row.path}.hidden").rename(root / row.path)
    assert set(built) == {"train", "val"}
    assert not list((parts / "trials").glob("*"))  # checkpoints go once their trial is done

    assert _outcome(_rows(parts)) == _outcome(_rows(tmp_path / "whole"))
    assert resumed.best_genes == whole.best_genes
    assert resumed.best_threshold == whole.best_threshold
    assert resumed.best_fitness == whole.best_fitness
    assert resumed.pareto == whole.pareto


WORKER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune import search as bt
from medtl.finetune.loop import FinetuneConfig
a = json.loads(sys.argv[1])
cfg, ft, data = bt.BioTuneConfig(**a["cfg"]), FinetuneConfig(**a["ft"]), DataConfig(**a["data"])
manifest = Manifest.load(a["manifest"])
Path(a["ready"]).touch()
while not all(Path(p).exists() for p in a["everyone"]):  # start together
    time.sleep(0.01)
print(bt.run_worker(cfg, ft, manifest, Path(a["root"]), data, Path(a["out"]), progress=False))
"""


@pytest.mark.slow  # two fresh interpreters import torch: ~20 s on a busy 2-core machine
def test_two_worker_processes_share_one_search(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    cfg = _cfg(generations=1)
    alone = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path / "alone", progress=False, retrain=False
    )
    csv_path = manifest.save(tmp_path / "manifest.csv")
    ready = [str(tmp_path / f"ready{i}") for i in range(2)]
    jobs = []
    for i in range(2):
        args = {
            "cfg": cfg.model_dump(), "ft": FT.model_dump(), "data": DATA.model_dump(),
            "manifest": str(csv_path), "root": str(root), "out": str(tmp_path / "shared"),
            "ready": ready[i], "everyone": ready,
        }  # fmt: skip
        command = [sys.executable, "-c", WORKER, json.dumps(args)]
        jobs.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [job.communicate(timeout=240) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    counts = [int(out.strip().splitlines()[-1]) for out, _ in outputs]
    rows = _rows(tmp_path / "shared")
    assert sum(counts) == len(rows) and min(counts) >= 1  # every trial ran once, both worked
    assert len({r["worker"] for r in rows}) == 2
    assert _outcome(rows) == _outcome(_rows(tmp_path / "alone"))
    shared = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path / "shared", progress=False, retrain=False
    )
    assert shared.best_genes == alone.best_genes and shared.best_fitness == alone.best_fitness


def test_reference_schedule_retrains_everyone_and_reports_a_pareto_front(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    cfg = _cfg(schedule="reference", objectives="fitness+params", population=3, seeds=2)
    cfg = cfg.model_copy(update={"max_epochs": 2, "patience": 1})
    result = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path, progress=False, retrain=False
    )
    rows = _rows(tmp_path)
    assert len(rows) == 2 * 3 * 2  # generations x population x seeds, nothing looked up
    assert not any(r["reused"] or r["cached"] for r in rows)
    assert all(r["budget_epochs"] == 2 and 1 <= r["epochs_trained"] <= 2 for r in rows)
    # The carried elite is trained again on the same validation split: the same score.
    elite = {(r["genome"], r["seed"]): r["val_bacc"] for r in rows if r["generation"] == 0}
    again = [r for r in rows if r["generation"] == 1 and (r["genome"], r["seed"]) in elite]
    assert again and all(r["val_bacc"] == elite[(r["genome"], r["seed"])] for r in again)
    # The front holds exactly the genomes no other genome dominates in (fitness, fraction).
    points = {
        r["genome"]: (
            1 - float(np.mean([x["val_bacc"] for x in rows if x["genome"] == r["genome"]])),
            r["trainable_fraction"],
        )
        for r in rows
    }

    def dominated(f: float, p: float) -> bool:
        return any(a <= f and b <= p and (a < f or b < p) for a, b in points.values())

    front = [(c["fitness"], c["trainable_fraction"]) for c in result.pareto]
    assert front == sorted(front)
    expected = sorted(x for x in points.values() if not dominated(*x))
    assert len(front) == len(expected) and np.allclose(front, expected)
    assert (result.best_fitness, result.best_trainable_fraction) in front
