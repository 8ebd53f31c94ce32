"""The BioTune search: config, schedules, budgets, the trial store, resume, workers, test split."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from PIL import Image
from pydantic import ValidationError

from medtl.cli import main
from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest, ManifestMeta, Row
from medtl.demo import DEMO_RECIPE, make_phantom
from medtl.errors import ConfigError
from medtl.finetune import blocks_of, plan
from medtl.finetune import evolution as ea
from medtl.finetune import search as bt
from medtl.finetune.loop import FinetuneConfig
from medtl.finetune.search import candidate
from medtl.models import build_classifier
from medtl.train import mix_seed

pytestmark = pytest.mark.usefixtures("one_thread")
GENE = FloatDistribution(0.0, 1.0)

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
    members = dict(population=4, elite=1, exploit=1, generations=2)
    rungs = dict(max_epochs=3, min_epochs=1, eta=2)
    base: dict[str, Any] = dict(preset="cpu", **members, **rungs, poll_seconds=0.01)
    return bt.BioTuneConfig(**{**base, **overrides})


def _rows(out: Path) -> list[dict[str, Any]]:
    return [dataclasses.asdict(t) for t in bt.read_trials(out / "trials.db")]


def _outcome(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("generation", "rung", "idx", "seed", "genome", "status", "reused", "val_bacc")
    keys += ("fitness", "trainable_fraction", "cached", "epochs_trained", "epoch_cost", "state")
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


def test_storage_urls_and_masked_passwords(tmp_path: Path) -> None:
    url = bt.storage_url("sqlite:///{out}/sub/trials.db", tmp_path)
    assert url == f"sqlite:///{tmp_path}/sub/trials.db" and (tmp_path / "sub").is_dir()
    assert bt.masked("postgresql://me:s3cret@db.example:5432/medtl") == (
        "postgresql://me:***@db.example:5432/medtl"
    )
    assert bt.masked("postgresql://me@db/medtl") == "postgresql://me@db/medtl"


def test_a_database_that_cannot_be_reached_is_one_line_naming_the_url() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError) as err:
        bt.connect(f"postgresql://medtl:s3cret@127.0.0.1:{port}/medtl")
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message
    assert f"postgresql://medtl:***@127.0.0.1:{port}/medtl" in message
    assert "start the server or fix search.storage" in message


def test_a_worker_of_an_unreachable_database_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_phantom(tmp_path / "phantom", n=12, size=32)
    url = "postgresql://medtl:s3cret@127.0.0.1:9/medtl"  # the discard port: nothing answers
    sets = ["finetune.strategy=biotune", "finetune.weights=null", "data.loader.image_size=32",
            "finetune.backbone=medtl_tiny_convnext"]  # fmt: skip
    argv = ["search", str(DEMO_RECIPE), "--data-root", str(data), "--out", str(tmp_path / "r")]
    argv += ["--storage", url, "--worker", "--device", "cpu"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medtl: error: cannot open"), err
    assert "postgresql://medtl:***@127.0.0.1:9/medtl" in err and "s3cret" not in err


# -- the study: slots, claims, dead workers, the read API -----------------------------------------
def _study(tmp_path: Path, slots: int = 6, population: int = 3) -> bt.SearchStudy:
    study = bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune")
    study.bind({"seed": 0}, slots, population)
    return study


def _waiting(study: bt.SearchStudy) -> list[Any]:
    return [t for t in study.frozen() if t.state == TrialState.WAITING]


def test_a_study_holds_every_slot_once_and_refuses_another_search(tmp_path: Path) -> None:
    study = _study(tmp_path)
    again = bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune")
    again.bind({"seed": 0}, 6, 3)  # a resumed or joining worker adds nothing
    assert [t.number for t in _waiting(study)] == list(range(6))
    with pytest.raises(ConfigError, match="belongs to another search"):
        bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune").bind({"seed": 1}, 6, 3)


def test_concurrent_claims_never_hand_out_a_candidate_twice(tmp_path: Path) -> None:
    _study(tmp_path, slots=24, population=24)
    claimed: dict[str, list[int]] = {}

    def claim_all(name: str) -> None:
        study = bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune")  # one per worker
        got = claimed.setdefault(name, [])
        while waiting := _waiting(study):
            for t in waiting:
                if study.claim(t, name) is not None:
                    got.append(t.number)

    workers = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    numbers = [n for got in claimed.values() for n in got]
    assert sorted(numbers) == list(range(24))  # every candidate exactly once
    trials = bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune").frozen()
    assert all(t.number in claimed[t.system_attrs["worker"]] for t in trials)


def test_candidates_of_a_dead_worker_are_reclaimed(tmp_path: Path) -> None:
    study = _study(tmp_path, slots=3)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    first, second, third = _waiting(study)
    study.claim(first, f"{socket.gethostname()}:{gone.pid}")
    study.claim(second, bt.worker_id())  # this process: alive
    study.claim(third, "elsewhere:1")  # another host: alive until its heartbeat is stale
    assert study.reclaim(stale_seconds=3600) == 1
    assert [t.number for t in _waiting(study)] == [0]
    assert study.reclaim(stale_seconds=0) == 2
    assert [t.number for t in _waiting(study)] == [0, 1, 2]


def test_the_read_api_gives_back_typed_rows_as_written(tmp_path: Path) -> None:
    study = _study(tmp_path, slots=4, population=2)
    genomes = [[0.1, 0.9, 0.5], [0.7, 0.2, 0.4], [0.1, 0.9, 0.5]]
    row = {
        "rung": 0, "seed": 3, "budget_epochs": 2, "status": "done", "reused": False,
        "val_bacc": 0.75, "fitness": 0.25, "trainable_fraction": 0.5, "cached": True,
        "epochs_trained": 2.0, "epoch_cost": 0.5, "epoch_equivalents": 1.0, "seconds": 0.1,
        "error": None,
    }  # fmt: skip
    for number, (t, genome) in enumerate(zip(_waiting(study), genomes, strict=False)):
        trial = study.claim(t, "w")
        assert trial is not None
        for name, gene in zip(["g00_stem", "g01_head", "threshold"], genome, strict=True):
            study.storage.set_trial_param(trial._trial_id, name, gene, GENE)
        rows = [row] if number < 2 else [{**row, "reused": True, "epochs_trained": 0.0}]
        trial.set_user_attr("rows", rows)
        if number < 2:
            study.study.tell(trial, 0.25)
    trials = bt.read_trials(tmp_path / "t.db")
    assert [(t.generation, t.idx) for t in trials] == [(0, 0), (0, 1), (1, 0)]
    first, second, reused = trials
    assert first.genome == (0.1, 0.9, 0.5) and second.genome == (0.7, 0.2, 0.4)
    assert first.first_trainable == 1 and reused.genome_key == first.genome_key
    assert first.status == "done" and first.finished and first.state == "COMPLETE"
    assert (first.val_bacc, first.fitness, first.trainable_fraction) == (0.75, 0.25, 0.5)
    assert first.cached is True and first.reused is False and first.epochs_trained == 2.0
    assert first.worker == "w" and first.budget_epochs == 2 and first.seed == 3
    assert reused.reused is True and reused.state == "RUNNING" and reused.epochs_trained == 0
    assert second.genome_key == bt.genome_key(second.genome)
    with pytest.raises(ConfigError, match="does not exist"):
        bt.read_trials(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()


def _trial(g: int, r: int, idx: int, fitness: float, ee: float, seed: int = 0) -> bt.Trial:
    return bt.Trial(
        id=0, generation=g, idx=idx, rung=r, seed=seed, genome=(0.5, 0.5), genome_key="k",
        budget_epochs=1, first_trainable=0, status="done", reused=ee == 0,
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


def test_read_search_gives_the_schedule_the_candidates_and_the_best_so_far_curve(
    tmp_path: Path,
) -> None:
    """Two generations of two members: a completed candidate, a pruned one, one looked up,
    one still waiting; costs and fitnesses chosen so the curve can be worked out by hand."""
    study = bt.SearchStudy(f"sqlite:///{tmp_path}/trials.db", "biotune")
    cfg = {"schedule": "halving", "population": 2, "generations": 2, "seed": 5, "max_epochs": 3}
    study.bind({"biotune": cfg}, 4, 2)
    base = {
        "seed": 0, "status": "done", "reused": False, "trainable_fraction": 0.5, "cached": False,
        "epochs_trained": 1.0, "epoch_cost": 1.0, "seconds": 2.0, "error": None,
    }  # fmt: skip

    def row(rung: int, fitness: float, ee: float) -> dict[str, Any]:
        budget = {"rung": rung, "budget_epochs": 1 + 2 * rung, "epoch_equivalents": ee}
        return {**base, **budget, "fitness": fitness, "val_bacc": 1 - fitness}

    def run(number: int, rows: list[dict[str, Any]], state: TrialState) -> None:
        trial = study.claim(_waiting(study)[0], "w")
        assert trial is not None and trial.number == number
        for name, gene in zip(["g00_stem", "g01_head", "threshold"], [0.2, 0.8, 0.5], strict=True):
            study.storage.set_trial_param(trial._trial_id, name, gene + number / 100, GENE)
        trial.set_user_attr("rows", rows)
        if state == TrialState.COMPLETE:
            study.study.tell(trial, rows[-1]["fitness"])
        else:
            study.study.tell(trial, state=state)

    done = [row(0, 0.4, 1.0), row(1, 0.3, 2.0)]
    run(0, done, TrialState.COMPLETE)
    run(1, [row(0, 0.5, 1.0)], TrialState.PRUNED)
    looked_up = [{**r, "reused": True, "epoch_equivalents": 0.0, "seconds": 0.0} for r in done]
    run(2, looked_up, TrialState.COMPLETE)

    record = bt.read_search(tmp_path)  # the search folder, at the default storage
    assert (record.schedule, record.population, record.generations) == ("halving", 2, 2)
    assert (record.seed, record.max_epochs) == (5, 3) and not record.finished
    assert record.states == {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "WAITING"}
    assert list(record.trials) == bt.read_trials(tmp_path / "trials.db")
    assert (record.pruned, record.looked_up) == (1, 1)
    assert record.epoch_equivalents == 4.0 and record.seconds == 6.0
    # stages (0, 0): 2 spent, nothing at the top rung; (0, 1): 4, 0.3; (1, 0): 4; (1, 1): 4
    assert record.curve == [(2.0, math.inf), (4.0, 0.3), (4.0, 0.3), (4.0, 0.3)]

    run(3, [row(0, 0.2, 1.0), row(1, 0.1, 2.0)], TrialState.COMPLETE)
    record = bt.read_search(f"sqlite:///{tmp_path}/trials.db")  # or the database's URL
    assert record.finished and record.best_fitness == pytest.approx(0.1)
    assert record.curve[-2:] == [(5.0, 0.3), (7.0, pytest.approx(0.1))]
    assert record.cost_to_reach(0.3) == 4.0 and record.cost_to_reach(0.1) == 7.0
    assert record.cost_to_reach(0.05) is None
    assert [record.best_at(x) for x in (1.0, 4.0, 6.9, 7.0)] == pytest.approx(
        [math.inf, 0.3, 0.3, 0.1]
    )
    assert bt.read_search(tmp_path / "trials.db") == record  # or its file

    with pytest.raises(ConfigError, match="does not exist; run the search first"):
        bt.read_search(tmp_path / "elsewhere")
    bt.SearchStudy(f"sqlite:///{tmp_path}/other.db", "biotune")  # created, never bound
    with pytest.raises(ConfigError, match="no search bound to it"):
        bt.read_search(tmp_path / "other.db")
    with pytest.raises(ConfigError, match="holds no study 'other'"):
        bt.read_search(tmp_path, study="other")


def test_a_candidate_on_cached_prefix_features_trains_as_it_does_uncached(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    genome = [0.1, 0.9, 0.8, 0.7, 0.6, 0.9, 0.5]  # stem frozen: the cut is at block 1
    curves = {}
    for cache in (True, False):
        search = candidate.Search(
            bt.SearchTask(
                _cfg(cache_prefix=cache), FT, manifest, root, DATA, tmp_path, progress=False
            )
        )
        prepared = search.prepare(genome, 0)
        assert prepared.cached is cache
        curves[cache] = []
        search.train(
            prepared, 0, 3, tmp_path / f"c{cache}",
            lambda _, r, c=curves[cache]: c.append(r["val_loss"]),
        )  # fmt: skip
    assert len(set(curves[True])) == 3  # it learns (the suffix of its own model trains)
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


def test_the_sampler_breeds_each_generation_with_the_evolution_operators(tmp_path: Path) -> None:
    cfg = _cfg(population=4, elite=1, exploit=1, generations=2, seed=7)
    blocks, rungs = ["stem", "head"], bt.rungs(cfg)
    sampler = bt.BioTuneSampler(cfg, blocks, rungs, [7])
    study = bt.SearchStudy(f"sqlite:///{tmp_path}/t.db", "biotune", sampler)
    study.bind({"seed": 7}, 8, 4)
    names = bt.gene_names(blocks)
    fitness = [0.3, 0.1, 0.4, 0.2]
    for i, waiting in enumerate(list(study.frozen())[:4]):  # generation 0, scored by hand
        trial = study.claim(waiting, "w")
        assert trial is not None
        [trial.suggest_float(name, 0.0, 1.0) for name in names]
        row = {
            "rung": 0,
            "seed": 7,
            "budget_epochs": rungs[0].epochs,
            "status": "done",
            "val_bacc": 1 - fitness[i],
            "fitness": fitness[i],
            "trainable_fraction": 1.0,
        }
        trial.set_user_attr("rows", [row])
        study.study.tell(trial, state=TrialState.PRUNED)
    rng0 = np.random.default_rng(mix_seed(7, 0))
    first = ea.random_genomes(4, len(names), rng0)
    got = [[t.params[n] for n in names] for t in study.frozen()[:4]]
    assert np.array_equal(got, first)
    order = np.argsort(fitness)  # one rung reached by all: by fitness
    children, origins = ea.next_generation(
        first, order, cfg.operators(), np.random.default_rng(mix_seed(7, 1))
    )
    trial = study.claim(study.frozen()[4], "w")
    assert trial is not None
    assert [trial.suggest_float(n, 0.0, 1.0) for n in names] == children[0].tolist()
    assert origins[0] == "elite" and children[0].tolist() == first[1].tolist()
    assert sampler.origin(study.study, 5) == origins[1] == "exploit"


# -- searches -----------------------------------------------------------------------------------------
def test_asynchronous_halving_prunes_at_rungs_and_charges_what_ran(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    cfg = _cfg(population=6, generations=1, cache_prefix=False)
    result = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path, progress=False, retrain=False
    )
    rows = _rows(tmp_path)
    epochs = [r.epochs for r in bt.rungs(cfg)]  # 1, 2, 3
    reached: dict[int, list[int]] = {}
    for r in rows:
        reached.setdefault(r["idx"], []).append(r["rung"])
        # a promoted candidate continues its run: each rung costs its extra epochs only
        assert r["epochs_trained"] == epochs[r["rung"]] - (
            epochs[r["rung"] - 1] if r["rung"] else 0
        )
    assert sorted(reached) == list(range(6))
    assert all(got == list(range(len(got))) for got in reached.values())
    for r in rows:
        top = max(reached[r["idx"]]) == len(epochs) - 1
        assert r["state"] == ("COMPLETE" if top else "PRUNED")
    # The pruner's rule, candidate by candidate in the order one worker ran them: go on iff
    # among the best 1/eta (at least the best one) of the rung's values reported so far. The
    # value reported is the lowest validation loss so far (promote_by: val_loss).
    study = bt.SearchStudy(f"sqlite:///{tmp_path}/trials.db", "biotune")
    trials = sorted(study.frozen(), key=lambda t: t.datetime_start)
    for t in trials:
        curve = t.user_attrs["curve"]
        assert t.intermediate_values == {
            e + 1: min(c[1] for c in curve[: e + 1]) for e in range(len(curve))
        }
    for rung in range(len(epochs) - 1):
        seen: list[float] = []
        for t in (t for t in trials if rung in reached[t.number]):
            seen.append(t.intermediate_values[epochs[rung]])
            k = max(len(seen) // cfg.eta - 1, 0)
            assert (rung + 1 in reached[t.number]) == (seen[-1] <= sorted(seen)[k])
    assert result.epochs_trained == sum(r["epochs_trained"] for r in rows)
    assert result.epochs_trained < 6 * cfg.max_epochs  # less than everyone at full length
    assert result.epoch_equivalents == pytest.approx(
        sum(r["epochs_trained"] * r["epoch_cost"] for r in rows)
    )
    v = SPLITS["val"] / SPLITS["train"]  # uncached: (1 + 2 s_k) / 3 + v / 3, s_k in (0, 1]
    assert all((1 + v) / 3 < r["epoch_cost"] <= 1 + v / 3 + 1e-12 for r in rows)
    assert all(not r["cached"] for r in rows)
    record = bt.read_search(tmp_path)
    assert record.schedule == "halving" and record.finished and record.looked_up == 0
    assert record.pruned == len({r["idx"] for r in rows if r["state"] == "PRUNED"}) > 0
    assert record.best_fitness == pytest.approx(result.best_fitness)


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

    # The same search again: test images gone, every dataset the search builds recorded;
    # stopped after 3 candidates, then killed inside the second epoch of a candidate (after
    # its first epoch's checkpoint), then resumed.
    for row in manifest.split("test"):
        (root / row.path).rename(root / f"{row.path}.hidden")
    built: list[str] = []
    real_build, real_fit = candidate.build_dataset, candidate.fit

    def build(m: Manifest, split: str, *args: Any, **kwargs: Any) -> Any:
        built.append(split)
        return real_build(m, split, *args, **kwargs)

    def killed(*args: Any, evaluate: Any, **kwargs: Any) -> Any:
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
        task = bt.SearchTask(cfg, FT, manifest, root, DATA, parts, progress=False)
        assert bt.run_worker(task, max_trials=3) == 3
        assert {r["idx"] for r in _rows(parts)} == {0, 1, 2}
        monkeypatch.setattr(candidate, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            bt.biotune_search(cfg, FT, manifest, root, DATA, parts, progress=False, retrain=False)
        study = bt.SearchStudy(f"sqlite:///{parts}/trials.db", "biotune")
        started = [t for t in study.frozen() if t.params]
        assert [t.state for t in started[:3]] != [TrialState.WAITING] * 3
        killed_one = [t for t in started if t.state == TrialState.WAITING]
        assert len(killed_one) == 1 and len(killed_one[0].user_attrs["curve"]) == 1  # released
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
from medtl.cli import main
from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune import search as bt
from medtl.finetune.loop import FinetuneConfig
a = json.loads(sys.argv[1])
cfg, ft, data = bt.BioTuneConfig(**a["cfg"]), FinetuneConfig(**a["ft"]), DataConfig(**a["data"])
manifest = Manifest.load(a["manifest"])
task = bt.SearchTask(cfg, ft, manifest, Path(a["root"]), data, Path(a["out"]), progress=False)
search = bt.Search(task)  # run_worker's set-up (data, blocks, FLOPs), done before the start:
study = bt.open_study(search)  # a worker still setting up could find every candidate taken
Path(a["ready"]).touch()
while not all(Path(p).exists() for p in a["everyone"]):  # start claiming together
    time.sleep(0.01)
print(bt.work(search, study, bt.worker_id()))
"""


def _workers(
    tmp_path: Path, dataset: tuple[Manifest, Path], cfg: bt.BioTuneConfig, out: Path
) -> list[subprocess.Popen[str]]:
    """Two worker processes of the search in ``out``, started together."""
    manifest, root = dataset
    csv_path = manifest.save(tmp_path / "manifest.csv")
    ready = [str(tmp_path / f"ready{i}") for i in range(2)]
    jobs = []
    for i in range(2):
        args = {
            "cfg": cfg.model_dump(), "ft": FT.model_dump(), "data": DATA.model_dump(),
            "manifest": str(csv_path), "root": str(root), "out": str(out),
            "ready": ready[i], "everyone": ready,
        }  # fmt: skip
        command = [sys.executable, "-c", WORKER, json.dumps(args)]
        jobs.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return jobs


@pytest.mark.slow  # two fresh interpreters import torch: ~20 s on a busy 2-core machine
def test_two_worker_processes_share_one_search(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    cfg = _cfg(generations=1)
    jobs = _workers(tmp_path, dataset, cfg, tmp_path / "shared")
    outputs = [job.communicate(timeout=240) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    counts = [int(out.strip().splitlines()[-1]) for out, _ in outputs]
    study = bt.SearchStudy(f"sqlite:///{tmp_path}/shared/trials.db", "biotune")
    trials = study.frozen()
    assert sum(counts) == len(trials) == cfg.population and min(counts) >= 1  # both worked
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.system_attrs["worker"] for t in trials}) == 2
    rows = _rows(tmp_path / "shared")
    shared = bt.biotune_search(  # a third process finds it finished: nothing more to train
        cfg, FT, manifest, root, DATA, tmp_path / "shared", progress=False, retrain=False
    )
    assert _rows(tmp_path / "shared") == rows
    assert shared.epochs_trained == sum(r["epochs_trained"] for r in rows)


PG_URL = os.environ.get("MEDTL_TEST_PG_URL")


@pytest.mark.slow
@pytest.mark.skipif(
    not PG_URL, reason="no PostgreSQL server: .ci/run starts one and sets MEDTL_TEST_PG_URL"
)
def test_two_workers_on_postgresql_finish_a_study_when_one_is_killed(
    dataset: tuple[Manifest, Path], tmp_path: Path
) -> None:
    manifest, root = dataset
    name = f"kill-{os.getpid()}-{time.time_ns()}"
    cfg = _cfg(storage=PG_URL, study=name, max_epochs=4, stale_seconds=600)
    jobs = _workers(tmp_path, dataset, cfg, tmp_path / "out")
    victim, survivor = jobs
    study: bt.SearchStudy | None = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill the first worker inside one of its candidates
        if study is None and name in {s.study_name for s in optuna.get_all_study_summaries(PG_URL)}:
            study = bt.SearchStudy(PG_URL, name)
        mine = [
            t for t in (study.frozen() if study else [])
            if t.state == TrialState.RUNNING and t.user_attrs.get("curve")
            and t.system_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]  # fmt: skip
        if mine and study is not None:
            # stop the worker, then make sure it still holds the candidate: killed straight away it
            # could finish the candidate between the look and the kill, leaving nothing to take over
            victim.send_signal(signal.SIGSTOP)
            time.sleep(0.2)  # let a commit already sent settle on the server
            held = [t for t in study.frozen() if t.number == mine[0].number]
            if held and held[0].state == TrialState.RUNNING:
                victim.kill()
                break
            victim.send_signal(signal.SIGCONT)
            mine = []
        time.sleep(0.02)
    assert mine, "the first worker never held a candidate"
    victim.wait()
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    assert study is not None
    trials = study.frozen()
    assert len(trials) == cfg.generations * cfg.population
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    taken_over = trials[mine[0].number]
    assert taken_over.system_attrs["worker"].endswith(f":{survivor.pid}")
    rows = [(r.id, r.rung, r.seed) for r in bt.read_trials(PG_URL, name)]
    assert len(rows) == len(set(rows))  # one row per candidate, rung and seed
    assert {r[0] for r in rows} == set(range(len(trials)))
    result = bt.biotune_search(
        cfg, FT, manifest, root, DATA, tmp_path / "out", progress=False, retrain=False
    )
    assert result.trials_db == bt.masked(PG_URL)


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
    record = bt.read_search(tmp_path)  # the read API agrees with the search's own summary
    assert record.schedule == "reference" and record.finished and record.pruned == 0
    assert record.best_fitness == pytest.approx(result.best_fitness)
    assert record.epoch_equivalents == pytest.approx(result.epoch_equivalents)


def test_a_first_rung_inside_the_warm_up_is_warned_about(
    dataset: tuple[Manifest, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """halving's first rung judges candidates; inside the warm-up it judges how fast they warm
    up (on BUSI it pruned the reference schedule's best genome)."""
    cfg = _cfg()  # rungs of 1, 2 and 3 epochs
    note = bt.warmup_note(cfg, 3.0)
    assert note is not None and "search.min_epochs=3 or more" in note
    assert bt.warmup_note(cfg, 1.0) is None  # the rung ends with the warm-up
    assert bt.warmup_note(_cfg(schedule="reference"), 3.0) is None  # no rungs to judge at
    manifest, root = dataset
    warm = FT.model_copy(update={"warmup_epochs": 2.0})
    with caplog.at_level(logging.WARNING, logger="medtl.finetune.search.candidate"):
        bt.Search(bt.SearchTask(cfg, warm, manifest, root, DATA, tmp_path, progress=False))
    assert "inside their 2-epoch warm-up" in caplog.text
