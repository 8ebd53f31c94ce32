"""Fine-tuning strategies compared: full, linear, Auto-RGN, LoRA and BioTune (two schedules).

On BUSI (``data_manifests/busi.csv``, 128 px, convnext_atto from the MAE encoder of
``benchmarks/pretrain_benefit.py`` when it exists, else from scratch) and on BreastMNIST (the
official split of ``breastmnist.npz``, upsampled from 28 to 64 px: a timm stem shrinks a 28 px
image to 7x7, which caps a scratch ResNet-18 near 0.79 test AUC), every (dataset, strategy,
seed) run is fine-tuned with early stopping on validation balanced accuracy, its temperature is
fitted on validation, and its test macro AUROC and balanced accuracy get 95% group-bootstrap CIs.

BioTune runs the ``cpu`` preset (population 6, elite 2, 5 generations, 1 training seed, at
most 15 epochs, patience 3) once with the reference-faithful schedule and once with medtl's
successive halving; the seed is the search seed. The search's best validation fitness,
epoch-equivalents and time are recorded, then the retrained best genome is tested.

Epoch-equivalents are FLOP-weighted for every run (the search's unit, docs/finetune.md): one
forward and backward pass of the whole model over the training split; a frozen prefix costs its
forward only and each epoch's validation pass is counted.

Every run is resumable: a finished one (its ``summary.json``) is skipped, a BioTune search
resumes from its ``trials.db``. ``--dry-run-tiny`` runs everything at toy scale (test backbone,
32 px, 1 epoch, a 2-member 1-generation search) to check the script end to end.

    python benchmarks/finetune_compare.py [--datasets busi breastmnist] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medtl.calibrate import fit_calibrator
from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.finetune.blocks import blocks_of
from medtl.finetune.loop import FinetuneConfig, FinetuneResult, finetune
from medtl.finetune.prefix import Cuts
from medtl.finetune.search import (
    BioTuneConfig,
    SearchResult,
    SearchTask,
    biotune_search,
    cost_to_reach,
    read_trials,
    retrain_genome,
    stage_curve,
)
from medtl.io import atomic_write_bytes, atomic_write_text, write_json, write_marked_section
from medtl.metrics import evaluate_predictions
from medtl.models import build_classifier
from medtl.report.tables import fmt_entry, mean_sd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MAE_ENCODER = ROOT / "benchmarks/out/pretrain_benefit/pretrain_entropy/encoder.safetensors"
RESULTS_MARKERS = ("<!-- finetune_compare:start -->", "<!-- finetune_compare:end -->")
PERF_MARKERS = ("<!-- finetune_compare_perf:start -->", "<!-- finetune_compare_perf:end -->")
PLAIN = ("full", "linear", "autorgn", "lora")
SCHEDULES = {"biotune-reference": "reference", "biotune-halving": "halving"}
STRATEGIES = (*PLAIN, *SCHEDULES)
TARGET_RATIO = 0.25
# MedMNIST v2 (Yang et al., Scientific Data 2023), BreastMNIST test set, as published.
MEDMNIST_V2 = (("ResNet-18 (28)", 0.901, 0.863), ("Google AutoML Vision", 0.919, 0.861))
RESNET18_28_AUC = MEDMNIST_V2[0][1]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A benchmark dataset: where it lives, its default input size and its positive class."""

    title: str
    root: Path
    manifest: Path
    image_size: int
    positive: str
    source: str


DATASETS = {
    "busi": DatasetSpec(
        "BUSI",
        SHARED / "busi",
        ROOT / "data_manifests/busi.csv",
        128,
        "malignant",
        "BUSI (Al-Dhabyani et al. 2020), duplicate-aware seeded split `data_manifests/busi.csv`",
    ),
    "breastmnist": DatasetSpec(
        "BreastMNIST",
        SHARED / "medmnist",
        ROOT / "data_manifests/breastmnist.csv",
        64,
        "malignant",
        "BreastMNIST (MedMNIST v2, Yang et al. 2023), official split "
        "`data_manifests/breastmnist.csv`, 28 px images upsampled",
    ),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything every run shares (from the command line, or the toy ``--dry-run-tiny``)."""

    backbone: str
    epochs: int
    patience: int
    lr: float
    batch_size: int
    n_boot: int
    search: dict[str, Any]  # BioTuneConfig fields besides schedule and seed
    tiny: bool
    search_seeds: tuple[int, ...] | None = None  # None: every seed runs its own search


@dataclasses.dataclass
class Data:
    """One dataset as the runs see it."""

    name: str
    spec: DatasetSpec
    root: Path
    manifest: Manifest
    config: DataConfig
    backbone: str
    weights: Path | None
    init: str  # "scratch" or "encoder-<sha8>": runs from different inits never share a folder
    cuts: Cuts
    blocks: list[str]
    min_epochs: int | None = None  # the halving schedule's first rung, when not the preset's

    @property
    def val_ratio(self) -> float:
        return len(self.manifest.split("val")) / max(1, len(self.manifest.split("train")))


# -- setup ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    add("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add(
        "--search-seeds",
        type=int,
        nargs="+",
        default=None,
        help="BioTune searches only for these seeds (default: every seed); any other seed "
        "retrains the genome found by the first search seed with its own training seed",
    )
    add_dataset_options(parser)
    add("--work", type=Path, default=ROOT / "benchmarks/out/finetune_compare")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--out-performance", type=Path, default=ROOT / "docs/performance.md")
    add("--dry-run-tiny", action="store_true", help="toy scale: test backbone, 32 px, 1 epoch")
    add(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables from the finished runs and list the missing ones",
    )
    return parser.parse_args(argv)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """Backbone, training, input size, init and data location per dataset."""
    add = parser.add_argument
    add("--backbone", default="convnext_atto", help="timm backbone of every dataset")
    add(
        "--breastmnist-backbone",
        default=None,
        help="BreastMNIST's backbone when it differs (e.g. resnet18: no MAE encoder is used there)",
    )
    add("--epochs", type=int, default=15, help="most epochs of a run (and of a search candidate)")
    add("--patience", type=int, default=3, help="early stopping on val balanced accuracy")
    add("--lr", type=float, default=1e-3, help="base learning rate (AdamW, cosine)")
    add("--batch-size", type=int, default=32)
    add(
        "--image-size",
        nargs="+",
        default=[],
        metavar="NAME=PX",
        help="input side per dataset (default busi=128 breastmnist=64)",
    )
    add(
        "--halving-min-epochs",
        nargs="+",
        default=[],
        metavar="NAME=N",
        help="epochs of the halving schedule's first rung per dataset (default: the preset's); "
        "runs with another value live in their own folders (biotune-halving-minN)",
    )
    add(
        "--weights",
        default=None,
        help=f"BUSI init: an encoder file or 'none' (default: {MAE_ENCODER.relative_to(ROOT)} if present, else scratch)",
    )
    add(
        "--breastmnist-weights",
        default=None,
        help="BreastMNIST init (default scratch: BreastMNIST is BUSI downsampled, so a BUSI-pretrained encoder has seen its test images)",
    )
    for name, spec in DATASETS.items():
        add(f"--{name}-root", type=Path, default=spec.root, help=f"{spec.title} data root")
        add(f"--{name}-manifest", type=Path, default=spec.manifest, help=f"{spec.title} manifest")


def make_setup(args: argparse.Namespace) -> Setup:
    """The shared settings; ``--dry-run-tiny`` swaps in the toy scale."""
    search = {"preset": "cpu", "max_epochs": args.epochs, "patience": args.patience}
    seeds = None if args.search_seeds is None else tuple(args.search_seeds)
    if not args.dry_run_tiny:
        return Setup(
            args.backbone, args.epochs, args.patience, args.lr, args.batch_size, 1000, search,
            False, seeds,
        )  # fmt: skip
    search = dict(
        preset="cpu", population=2, elite=1, exploit=1, generations=1, max_epochs=1,
        min_epochs=1, patience=1, poll_seconds=0.1,
    )  # fmt: skip
    return Setup("medtl_tiny_convnext", 1, 1, args.lr, 8, 50, search, True, seeds)


def named_ints(items: Sequence[str], option: str) -> dict[str, int]:
    """``["busi=5"]`` -> ``{"busi": 5}``; anything else exits naming the option."""
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if name not in DATASETS or not n.isdigit():
            sys.exit(f"{option} {item!r}: use NAME=N with NAME in {', '.join(DATASETS)}")
        out[name] = int(n)
    return out


def image_sizes(items: Sequence[str], tiny: bool) -> dict[str, int]:
    sizes = {name: (32 if tiny else spec.image_size) for name, spec in DATASETS.items()}
    return {**sizes, **named_ints(items, "--image-size")}


def resolve_weights(name: str, given: str | None, tiny: bool) -> Path | None:
    """The encoder a dataset starts from: the given file, or for BUSI the MAE encoder when
    ``benchmarks/pretrain_benefit.py`` has written it (never by default in a dry run)."""
    if given is not None:
        return None if given.lower() == "none" else Path(given)
    if name == "busi" and not tiny and MAE_ENCODER.is_file():
        return MAE_ENCODER
    return None


def init_label(weights: Path | None) -> str:
    if weights is None:
        return "scratch"
    if not weights.is_file():
        sys.exit(f"weights file {weights} does not exist; pass an encoder file or 'none'")
    return "encoder-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:8]


def load_data(name: str, args: argparse.Namespace, setup: Setup, size: int) -> Data:
    """Manifest, data config, init and FLOP shares (for epoch-equivalents) of one dataset."""
    spec = DATASETS[name]
    root, path = getattr(args, f"{name}_root"), getattr(args, f"{name}_manifest")
    if not path.is_file():
        sys.exit(f"{spec.title}: manifest {path} does not exist; pass --{name}-manifest")
    manifest = Manifest.load(path)
    config = DataConfig(image_size=size, channels=3, cache="memory", batch_size=setup.batch_size)
    weights = resolve_weights(
        name, getattr(args, "weights" if name == "busi" else f"{name}_weights"), setup.tiny
    )
    init = init_label(weights)
    backbone = (name == "breastmnist" and args.breastmnist_backbone) or setup.backbone
    print(
        f"{spec.title}: {backbone} at {size} px, init {init}"
        + (f" ({weights})" if weights else ""),
        flush=True,
    )
    model = build_classifier(backbone, len(manifest.classes), config.channels)
    blocks = blocks_of(model)
    sample = torch.rand(2, config.channels, size, size, generator=torch.Generator().manual_seed(0))
    rows = len(manifest.split("train")) + len(manifest.split("val"))
    cuts = Cuts.of(model, blocks, sample, rows)
    blocks_named = [b.name for b in blocks]
    min_epochs = named_ints(args.halving_min_epochs, "--halving-min-epochs").get(name)
    return Data(
        name, spec, root, manifest, config, backbone, weights, init, cuts, blocks_named, min_epochs
    )  # fmt: skip


def finetune_config(setup: Setup, data: Data, strategy: str) -> FinetuneConfig:
    return FinetuneConfig(
        backbone=data.backbone,
        strategy=strategy,
        epochs=setup.epochs,
        batch_size=setup.batch_size,
        lr=setup.lr,
        patience=setup.patience,
        warmup_epochs=1,
    )


# -- one run --------------------------------------------------------------------------------
def epoch_equivalents(meta: dict[str, Any], data: Data) -> float:
    """FLOP-weighted cost of a ``finetune`` run (the search's unit): its epochs at the cost of
    training from its first trainable block, validation passes included. LoRA adapts every
    block, so its backward runs through the whole model (adapter FLOPs left out); Auto-RGN adds
    its gradient-norm batches at each epoch start."""
    plan = meta["plan"]
    k = (
        0
        if plan["strategy"] == "lora"
        else min(data.blocks.index(b) for b in plan["trainable_blocks"])
    )
    epochs = float(meta["epoch_equivalents"])  # samples seen / training-split size
    cost = epochs * data.cuts.epoch_cost(k, False, data.val_ratio)
    if plan["strategy"] == "autorgn":
        n_train = len(data.manifest.split("train"))
        seen = min(n_train, plan["options"].get("n_batches", 3) * meta["config"]["batch_size"])
        cost += meta["epochs_run"] * seen / n_train
    return cost


def search_counts(db: str | Path) -> dict[str, int]:
    trials = read_trials(db)
    reused = sum(t.reused for t in trials)
    return {"trials": len(trials), "trained": len(trials) - reused, "looked_up": reused}


def uncached_epoch_equivalents(db: Path, data: Data) -> float:
    """What the trials the search trained would cost with the frozen prefix recomputed every
    epoch, as the reference BioTune code does (no cache fills): caching is exact, so this is the
    same search at the reference code's price."""
    trained = [
        t for t in read_trials(db) if not t.reused and t.finished and t.epochs_trained is not None
    ]
    return math.fsum(  # exact, so independent of the order the trials are read in
        t.epochs_trained * data.cuts.epoch_cost(t.first_trainable, False, data.val_ratio)
        for t in trained
    )


def search_summary(result: SearchResult) -> dict[str, Any]:
    return {
        "best_fitness": result.best_fitness,
        "best_val_bacc": result.best_val_bacc,
        "best_trainable_fraction": result.best_trainable_fraction,
        "epoch_equivalents": result.epoch_equivalents,
        "epochs_trained": result.epochs_trained,
        "seconds": result.trial_seconds,  # summed over trials: right for a resumed search too
        "strategy_options": result.strategy_options,
        **search_counts(result.trials_db),
    }


def train(
    setup: Setup, data: Data, strategy: str, seed: int, folder: Path, work: Path
) -> tuple[FinetuneResult, dict[str, Any] | None]:
    """Fine-tune one way; for BioTune, search (or resume the search) and retrain its best, or,
    for a seed outside ``setup.search_seeds``, retrain the first search seed's best genome."""
    ft = finetune_config(setup, data, "full" if strategy in SCHEDULES else strategy)
    args = (data.manifest, data.root, data.config)
    if strategy not in SCHEDULES:
        return finetune(ft, *args, folder, seed=seed, weights=data.weights, progress=False), None
    extra = {"min_epochs": data.min_epochs} if data.min_epochs is not None else {}
    cfg = BioTuneConfig(**setup.search, schedule=SCHEDULES[strategy], seed=seed, **extra)
    if setup.search_seeds is not None and seed not in setup.search_seeds:
        source = run(setup, data, strategy, setup.search_seeds[0], work)
        if "error" in source or source.get("missing"):
            raise MedtlError(f"search seed {setup.search_seeds[0]} has no result to retrain")
        search = {**source["search"], "shared_from_seed": source["seed"]}
        task = SearchTask(cfg, ft, *args, folder, data.weights, progress=False)
        return retrain_genome(task, search["strategy_options"]), search
    result = biotune_search(cfg, ft, *args, folder / "search", data.weights, progress=False)
    assert result.finetune is not None
    return result.finetune, search_summary(result)


def score_test(result: FinetuneResult, positive: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Test figures with the temperature fitted on validation."""
    if result.test is None:
        raise MedtlError("the manifest has no test split")
    temperature = fit_calibrator("temperature", result.val.logits, result.val.labels)
    t = float(temperature.to_dict()["temperature"])
    metrics = evaluate_predictions(
        result.test, result.val, positive, n_boot=n_boot, seed=seed, calibrator=temperature
    )
    overall = metrics["overall"]
    return {
        "temperature": t,
        "n_test": metrics["n"],
        "macro_auroc": overall["macro_auroc"],
        "balanced_accuracy": overall["balanced_accuracy"],
        "accuracy": overall["accuracy"],
        "ece_after": metrics["calibration"]["after"]["ece"],
    }


def run_folder(work: Path, data: Data, strategy: str, seed: int) -> Path:
    name = strategy
    if strategy == "biotune-halving" and data.min_epochs is not None:
        name += f"-min{data.min_epochs}"
    return work / data.name / data.backbone / data.init / name / f"seed{seed}"


def run(
    setup: Setup, data: Data, strategy: str, seed: int, work: Path, train_missing: bool = True
) -> dict[str, Any]:
    """One (dataset, strategy, seed) run, or its saved ``summary.json``. A failure is reported
    (and its traceback kept in ``error.txt``), not saved, so that a rerun tries again. With
    ``train_missing`` false, a run not finished yet is returned as ``{"missing": True}``."""
    folder = run_folder(work, data, strategy, seed)
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        return with_uncached(json.loads(summary_file.read_text(encoding="utf-8")), folder, data)
    base = {"dataset": data.name, "strategy": strategy, "seed": seed, "init": data.init}
    if not train_missing:
        return {**base, "missing": True}
    try:
        result, search = train(setup, data, strategy, seed, folder, work)
    except (MedtlError, ValueError, RuntimeError) as exc:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "error.txt", traceback.format_exc())
        print(f"{data.name} {strategy} seed {seed}: FAILED: {exc}", flush=True)
        why = f"{type(exc).__name__}: {exc}".splitlines()[0].replace("|", "/")
        return {**base, "error": why}
    summary = with_uncached(run_summary(base, data, result, search, setup.n_boot), folder, data)
    write_json(summary_file, summary)
    print(
        f"{data.name} {strategy} seed {seed}: test macro AUROC {fmt_entry(summary['macro_auroc'])}, "
        f"balanced accuracy {fmt_entry(summary['balanced_accuracy'])}; "
        f"{summary['epoch_equivalents']:.1f} epoch-eq., {summary['seconds']:.0f} s",
        flush=True,
    )
    return summary


def run_summary(
    base: dict[str, Any],
    data: Data,
    result: FinetuneResult,
    search: dict[str, Any] | None,
    n_boot: int,
) -> dict[str, Any]:
    """What a finished run records: its training, its search (BioTune), the compute of both
    and the test figures."""
    meta = result.meta
    train_ee = epoch_equivalents(meta, data)
    search_ee = search["epoch_equivalents"] if search else 0.0
    search_s = search["seconds"] if search else 0.0
    return {
        **base,
        "weights": str(data.weights) if data.weights else None,
        "backbone": data.backbone,
        "image_size": data.config.image_size,
        "epochs_run": meta["epochs_run"],
        "best_epoch": meta["best_epoch"],
        "val_bacc": meta["val_bacc"],
        "train_epoch_equivalents": train_ee,
        "train_seconds": meta["seconds"],
        "search": search,
        "epoch_equivalents": search_ee + train_ee,
        "seconds": search_s + meta["seconds"],
        **score_test(result, data.spec.positive, n_boot, base["seed"]),
    }


def with_uncached(summary: dict[str, Any], folder: Path, data: Data) -> dict[str, Any]:
    """A search's summary with ``epoch_equivalents_uncached`` (from its trial store)."""
    db = folder / "search" / "trials.db"
    if summary.get("search") and db.is_file():
        summary["search"]["epoch_equivalents_uncached"] = uncached_epoch_equivalents(db, data)
        summary["search"]["trials_db"] = str(db)
    return summary


def own_searches(runs: Sequence[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
    """Finished runs of a BioTune schedule that ran their own search (not a shared genome)."""
    return [r for r in ok(runs, strategy) if "shared_from_seed" not in r["search"]]


def equal_fitness(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per search seed run by both schedules: the reference's best fitness ``F``, the
    epoch-equivalents each schedule had spent when it first reached ``F`` (``None``: never), and
    their ratio, the issue's figure. Searches whose trial store is gone are skipped."""
    ref = {r["seed"]: r for r in own_searches(runs, "biotune-reference")}
    out = []
    for h in own_searches(runs, "biotune-halving"):
        r = ref.get(h["seed"])
        if r is None or not Path(r["search"].get("trials_db", "")).is_file():
            continue
        if not Path(h["search"].get("trials_db", "")).is_file():
            continue
        ref_curve = stage_curve(read_trials(Path(r["search"]["trials_db"])))
        halv_curve = stage_curve(read_trials(Path(h["search"]["trials_db"])))
        target = ref_curve[-1][1]
        ee_ref, ee_halv = cost_to_reach(ref_curve, target), cost_to_reach(halv_curve, target)
        out.append({
            "seed": h["seed"], "target": target, "ref": ee_ref, "halving": ee_halv,
            "ref_total": ref_curve[-1][0], "halving_total": halv_curve[-1][0],
            "ratio": None if ee_halv is None or not ee_ref else ee_halv / ee_ref,
            "curves": (ref_curve, halv_curve),
        })  # fmt: skip
    return out


def plot_schedules(data: Data, pairs: Sequence[dict[str, Any]], path: Path) -> None:
    """Best-so-far validation fitness against epoch-equivalents spent, both schedules, per
    search seed, with the reference's final best as a dotted line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for pair in pairs:
        for (name, colour), curve in zip(
            (("reference", "#D55E00"), ("halving", "#0072B2")), pair["curves"], strict=True
        ):
            xs = [0.0, *(c[0] for c in curve)]
            ys = [math.nan, *(c[1] if math.isfinite(c[1]) else math.nan for c in curve)]
            ax.step(xs, ys, where="post", color=colour, label=f"{name}, search seed {pair['seed']}")
        ax.axhline(pair["target"], color="#999999", ls=":", lw=1)
        for key, colour in (("ref", "#D55E00"), ("halving", "#0072B2")):
            if pair[key] is not None:  # where each first reached the reference's best
                ax.plot(pair[key], pair["target"], "o", color=colour, ms=5)
    ax.set(
        xlabel="search epoch-equivalents spent",
        ylabel="best val fitness so far (1 - bal. acc.)",
        title=f"BioTune schedules, {data.spec.title}",
    )
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


# -- figures --------------------------------------------------------------------------------
def value(entry: dict[str, Any] | None) -> float:
    v = None if not entry else entry.get("value")
    return math.nan if v is None else float(v)


def mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def ok(runs: Sequence[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
    """The finished runs of ``strategy`` (failures left out)."""
    return [r for r in runs if r["strategy"] == strategy and "error" not in r]


def run_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['strategy']} | {r['seed']} | failed: {r['error']} | | | | | |"
    seed = str(r["seed"])
    if r.get("search") and "shared_from_seed" in r["search"]:
        seed += f" (genome of search {r['search']['shared_from_seed']})"
    return (
        f"| {r['strategy']} | {seed} | {fmt_entry(r['macro_auroc'])} | {fmt_entry(r['balanced_accuracy'])} | "
        f"{value(r['accuracy']):.3f} | {r['val_bacc']:.3f} | {r['epoch_equivalents']:.1f} | {r['seconds']:.0f} |"
    )


def seed_row(strategy: str, mine: list[dict[str, Any]]) -> str:
    return (
        f"| {strategy} | {len(mine)} | {mean_sd([value(r['macro_auroc']) for r in mine])} | "
        f"{mean_sd([value(r['balanced_accuracy']) for r in mine])} | "
        f"{mean_sd([r['val_bacc'] for r in mine])} | "
        f"{mean_sd([r['epoch_equivalents'] for r in mine], 1)} | {mean_sd([r['seconds'] for r in mine], 0)} |"
    )


def search_row(r: dict[str, Any]) -> str:
    s = r["search"]
    return (
        f"| {SCHEDULES[r['strategy']]} | {r['seed']} | {s['best_fitness']:.4f} | {s['best_val_bacc']:.3f} | "
        f"{s['epoch_equivalents']:.1f} | {s.get('epoch_equivalents_uncached', math.nan):.1f} | "
        f"{s['seconds']:.0f} | {s['trained']} / {s['looked_up']} | "
        f"{r['train_epoch_equivalents']:.1f} | {r['train_seconds']:.0f} | {r['val_bacc']:.3f} |"
    )


def schedule_verdict(runs: Sequence[dict[str, Any]]) -> str:
    """Target 1: halving reaches the reference's best val fitness with at most a quarter of
    the epoch-equivalents the reference spent to reach it (the issue's figure: the ratio at
    equal validation fitness, from the searches' stage curves), beside the whole searches'
    ratio."""
    ref, halv = own_searches(runs, "biotune-reference"), own_searches(runs, "biotune-halving")
    if not ref or not halv:
        return "- Target (halving ≤ 1/4 of reference's epoch-equivalents at equal validation fitness): not measured (a schedule is missing or failed)."
    pairs = equal_fitness(runs)
    lines = [*whole_search_lines(ref, halv), *(pair_line(p) for p in pairs), target_line(pairs)]
    return "\n".join(lines)


def whole_search_lines(ref: Sequence[dict[str, Any]], halv: Sequence[dict[str, Any]]) -> list[str]:
    """The whole searches compared: epoch-equivalents and best validation fitness."""
    # the reference schedule recomputes the frozen prefix every epoch, as the reference code does
    ee_ref = mean([r["search"]["epoch_equivalents"] for r in ref])
    ee_halv = mean([r["search"]["epoch_equivalents"] for r in halv])
    ee_halv_plain = mean([r["search"].get("epoch_equivalents_uncached", math.nan) for r in halv])
    fit_ref = [r["search"]["best_fitness"] for r in ref]
    fit_halv = mean([r["search"]["best_fitness"] for r in halv])
    low, high = min(fit_ref), max(fit_ref)
    where = (
        "within"
        if low <= fit_halv <= high
        else ("below (better than)" if fit_halv < low else "above (worse than)")
    )
    return [
        f"- Whole searches, halving / reference: {ee_halv / ee_ref:.3f} of the epoch-equivalents "
        f"({ee_halv:.1f} for medtl's schedule with frozen-prefix caching vs {ee_ref:.1f} for the "
        f"reference schedule, which recomputes the frozen prefix every epoch as the reference code "
        f"does; means over {len(halv)} and {len(ref)} search seeds). Without caching, medtl's "
        f"schedule would have spent {ee_halv_plain:.1f} ({ee_halv_plain / ee_ref:.3f} of the reference).",
        f"- Best validation fitness (1 − val bal. acc., lower is better): halving {fit_halv:.4f} (mean), "
        f"reference {low:.4f}..{high:.4f} (min..max over search seeds): halving is {where} the "
        "reference's range.",
    ]


def pair_line(p: dict[str, Any]) -> str:
    """One search seed at equal validation fitness (an entry of :func:`equal_fitness`)."""
    reached = (
        f"halving first reached it after {p['halving']:.1f} (of {p['halving_total']:.1f}): "
        f"**ratio {p['ratio']:.3f}**"
        if p["ratio"] is not None
        else f"halving never reached it in {p['halving_total']:.1f}"
    )
    return (
        f"- At equal validation fitness, search seed {p['seed']}: the reference's best fitness "
        f"{p['target']:.4f} took it {p['ref']:.1f} epoch-equivalents (of {p['ref_total']:.1f}); "
        f"{reached}. Costs counted stage by stage (a generation's or rung's whole cost is spent "
        "before its results count), members at the top rung only."
    )


def target_line(pairs: Sequence[dict[str, Any]]) -> str:
    """The verdict on target 1 over the search seeds of :func:`equal_fitness`."""
    ratios = [p["ratio"] for p in pairs]
    if not pairs:
        verdict = "not measured (the trial stores are missing)"
    else:
        worst = math.inf if None in ratios else max(ratios)
        verdict = (
            f"{'met' if worst <= TARGET_RATIO else 'not met'} (ratio at equal fitness "
            + ", ".join("never" if x is None else f"{x:.3f}" for x in ratios)
            + f" over {len(pairs)} search seed(s); one search seed is a single draw, not a spread)"
        )
    return (
        "- **Target (halving reaches the reference's fitness with ≤ 1/4 of its "
        f"epoch-equivalents): {verdict}.**"
    )


def auc_verdict(runs: Sequence[dict[str, Any]]) -> str:
    """Target 2 (BreastMNIST): the best recipe, chosen on validation, beats ResNet-18 (28)."""
    means = {
        s: (
            mean([r["val_bacc"] for r in ok(runs, s)]),
            mean([value(r["macro_auroc"]) for r in ok(runs, s)]),
        )
        for s in STRATEGIES
        if ok(runs, s)
    }
    if not means:
        return (
            "- Target (best recipe beats MedMNIST v2 ResNet-18 (28) test AUC 0.901): not measured."
        )
    chosen = max(means, key=lambda s: (means[s][0], -STRATEGIES.index(s)))
    by_test = max(means, key=lambda s: means[s][1])
    auc = means[chosen][1]
    beats = auc > RESNET18_28_AUC
    return (
        f"- Best recipe chosen on validation (mean val bal. acc. {means[chosen][0]:.3f}): **{chosen}**, "
        f"mean test AUROC {auc:.3f} vs MedMNIST v2 ResNet-18 (28) {RESNET18_28_AUC:.3f}.\n"
        f"- Highest mean test AUROC of any recipe (chosen on test, so optimistic): {by_test}, {means[by_test][1]:.3f}.\n"
        f"- **Target (best recipe beats ResNet-18 (28) on test AUC): {'met' if beats else 'not met'}.**"
    )


# -- sections -----------------------------------------------------------------------------------
def dataset_block(data: Data, runs: list[dict[str, Any]], setup: Setup) -> list[str]:
    """A dataset's section: its runs, their seed spread, the MedMNIST rows (BreastMNIST) and
    the BioTune searches."""
    lines = run_tables(data, runs)
    if data.name == "breastmnist":
        lines += medmnist_block(runs)
    if any(own_searches(runs, s) for s in SCHEDULES):
        lines += search_block(data, runs, setup)
    return lines


def run_tables(data: Data, runs: list[dict[str, Any]]) -> list[str]:
    """The dataset's description, a row per run and a row per strategy over seeds."""
    counts = data.manifest.counts()
    n = {s: sum(counts.get(s, {}).values()) for s in ("train", "val", "test")}
    init = "from scratch" if data.weights is None else f"from `{data.weights.name}` ({data.init})"
    return [
        f"### {data.spec.title}",
        "",
        f"{data.spec.source} (train {n['train']}, val {n['val']}, test {n['test']}; classes "
        f"{', '.join(f'`{c}`' for c in data.manifest.classes)}; positive class for operating points: {data.spec.positive}). "
        f"`{data.backbone}` at {data.config.image_size} px, RGB, {init}.",
        "",
        "| strategy | seed | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | test accuracy | val bal. acc. | epoch-equivalents | wall s |",
        "|---|---:|---|---|---:|---:|---:|---:|",
        *[run_row(r) for r in runs],
        "",
        "Over seeds (mean ± SD of the point estimates: the seed spread, not a CI):",
        "",
        "| strategy | seeds | test macro AUROC | test balanced accuracy | val bal. acc. | epoch-equivalents | wall s |",
        "|---|---:|---|---|---|---|---|",
        *[seed_row(s, ok(runs, s)) for s in STRATEGIES if ok(runs, s)],
        "",
    ]


def medmnist_block(runs: list[dict[str, Any]]) -> list[str]:
    """The published MedMNIST v2 rows and the verdict on target 2."""
    return [
        "MedMNIST v2 reference rows, BreastMNIST test set, as published (Yang et al., "
        "*MedMNIST v2*, Scientific Data 10:41, 2023); their ACC is plain accuracy (the "
        "'test accuracy' column above), not balanced accuracy:",
        "",
        "| model | test AUC | test ACC |",
        "|---|---:|---:|",
        *[f"| {m} | {auc:.3f} | {acc:.3f} |" for m, auc, acc in MEDMNIST_V2],
        "",
        auc_verdict(runs),
        "",
    ]


def search_block(data: Data, runs: list[dict[str, Any]], setup: Setup) -> list[str]:
    """The BioTune searches: a row per search, the schedules' verdict and their figure."""
    searched = [r for s in SCHEDULES for r in own_searches(runs, s)]
    lines = [
        f"BioTune searches on {data.spec.title} (fitness and search cost from the candidates, "
        "trained without augmentation; retrain = the best genome fine-tuned as the other rows)"
        + (
            f"; here the halving schedule's first rung trains {data.min_epochs} epochs "
            f"(`--halving-min-epochs {data.name}={data.min_epochs}`), not the preset's "
            f"{BioTuneConfig(**setup.search).min_epochs}:"
            if data.min_epochs is not None
            else ":"
        ),
        "",
        "| schedule | search seed | best val fitness | best val bal. acc. | search epoch-eq. | same trials, prefix recomputed every epoch | search s | trials trained / looked up | retrain epoch-eq. | retrain s | retrain val bal. acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        *[search_row(r) for r in searched],
        "",
        schedule_verdict(runs),
        "",
    ]
    if equal_fitness(runs):
        lines += [
            f"![Best validation fitness so far against search epoch-equivalents, {data.spec.title}]"
            f"(img/{schedule_figure(data)})",
            "",
        ]
    return lines


def schedule_figure(data: Data) -> str:
    return f"finetune_compare_{data.name}_schedules.png"


def footer(command: str) -> list[str]:
    return [
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
        f"({platform.machine()}), torch {torch.__version__}",
    ]


def results_section(
    setup: Setup,
    datasets: list[Data],
    runs: list[dict[str, Any]],
    command: str,
    missing: Sequence[dict[str, Any]] = (),
) -> str:
    lines = [
        RESULTS_MARKERS[0],
        "## Fine-tuning strategies compared (`benchmarks/finetune_compare.py`)",
        "",
        method_paragraph(setup),
        "",
    ]
    if missing:
        names = ", ".join(f"{r['dataset']} {r['strategy']} seed {r['seed']}" for r in missing)
        lines += [
            f"**Partial: {len(missing)} of {len(missing) + len(runs)} runs have not been run yet** "
            f"({names}); the tables below hold the finished ones, and a verdict needs both BioTune "
            "schedules.",
            "",
        ]
    for data in datasets:
        lines += dataset_block(data, [r for r in runs if r["dataset"] == data.name], setup)
    lines += [*footer(command), RESULTS_MARKERS[1]]
    return "\n".join(lines)


def method_paragraph(setup: Setup) -> str:
    """How every run trains and is scored."""
    s = setup.search
    return (
        f"Every run: up to {setup.epochs} epochs, batch {setup.batch_size}, AdamW lr {setup.lr} with "
        f"cosine decay and 1 warm-up epoch, light augmentation, early stopping on validation balanced "
        f"accuracy (patience {setup.patience}). Strategies: `full`, `linear` (head only), `autorgn` "
        "(Auto-RGN), `lora` (rank 4, adapters merged after training) and BioTune with the "
        "reference-faithful schedule (`biotune-reference`) or medtl's successive halving "
        f"(`biotune-halving`), both with the `{s['preset']}` preset ({describe_search(s)}); for BioTune "
        "the seed is the search seed and the row is the retrained best genome; a row marked "
        "'genome of search s' retrains search seed s's genome with its own training seed (the "
        "search is run once and its cost is counted in each such row). Test figures: macro "
        f"AUROC (one-vs-rest) and balanced accuracy on the **test split** with 95% CIs from {setup.n_boot} "
        "group-bootstrap resamples, after temperature scaling fitted on validation. Epoch-equivalents "
        "are FLOP-weighted (one forward + backward pass of the whole model over the training split; "
        "frozen prefixes count their forward only, validation passes are included; for BioTune the "
        "search plus the retrain); wall s likewise."
    )


def describe_search(search: dict[str, Any]) -> str:
    cfg = BioTuneConfig(**search)
    return (
        f"population {cfg.population}, elite {cfg.elite}, {cfg.generations} generations, "
        f"{cfg.seeds} training seed(s), at most {cfg.max_epochs} epochs, patience {cfg.patience} "
        f"(reference), halving from {cfg.min_epochs} epochs with eta {cfg.eta}"
    )


def performance_section(datasets: list[Data], runs: list[dict[str, Any]], command: str) -> str:
    lines = [
        PERF_MARKERS[0],
        "## Fine-tuning strategies: compute (`benchmarks/finetune_compare.py`)",
        "",
        "FLOP-weighted epoch-equivalents (one forward + backward pass of the whole model over the "
        "training split) and wall seconds per run, mean ± SD over seeds; for BioTune the search and "
        "the retrain of its best genome. Test figures are in [results.md](results.md).",
        "",
        "| dataset | strategy | seeds | epochs run | search epoch-eq. | search s | train epoch-eq. | train s | total epoch-eq. | total s |",
        "|---|---|---:|---|---|---|---|---|---|---|",
    ]
    for data in datasets:
        for s in STRATEGIES:
            mine = ok([r for r in runs if r["dataset"] == data.name], s)
            if mine:
                lines.append(perf_row(data.spec.title, s, mine))
    lines.append("")
    for data in datasets:
        mine = [r for r in runs if r["dataset"] == data.name]
        if ok(mine, "biotune-reference") or ok(mine, "biotune-halving"):
            lines += [f"BioTune schedules on {data.spec.title}:", "", schedule_verdict(mine), ""]
    lines += [*footer(command), PERF_MARKERS[1]]
    return "\n".join(lines)


def perf_row(title: str, strategy: str, mine: list[dict[str, Any]]) -> str:
    searched = strategy in SCHEDULES

    def col(get: Any, digits: int) -> str:
        return mean_sd([float(get(r)) for r in mine], digits)

    own = own_searches(mine, strategy) if searched else []

    def col_own(get: Any, digits: int) -> str:
        return mean_sd([float(get(r)) for r in own], digits) if own else "–"

    search_ee = col_own(lambda r: r["search"]["epoch_equivalents"], 1)
    search_s = col_own(lambda r: r["search"]["seconds"], 0)
    return (
        f"| {title} | {strategy} | {len(mine)} | {col(lambda r: r['epochs_run'], 1)} | {search_ee} | "
        f"{search_s} | {col(lambda r: r['train_epoch_equivalents'], 1)} | {col(lambda r: r['train_seconds'], 0)} | "
        f"{col(lambda r: r['epoch_equivalents'], 1)} | {col(lambda r: r['seconds'], 0)} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup = make_setup(args)
    level = logging.WARNING if setup.tiny else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    sizes = image_sizes(args.image_size, setup.tiny)
    datasets = [load_data(name, args, setup, sizes[name]) for name in args.datasets]
    runs = [  # seed by seed, so that an interrupted run has every strategy once
        run(setup, data, strategy, seed, args.work, not args.report_only)
        for data in datasets
        for seed in args.seeds
        for strategy in args.strategies
    ]
    missing = [r for r in runs if r.get("missing")]
    runs = [r for r in runs if not r.get("missing")]
    runs.sort(key=lambda r: (args.datasets.index(r["dataset"]), STRATEGIES.index(r["strategy"])))
    command = "python benchmarks/finetune_compare.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    for data in datasets:
        pairs = equal_fitness([r for r in runs if r["dataset"] == data.name])
        if pairs:
            plot_schedules(data, pairs, args.out_results.parent / "img" / schedule_figure(data))
    results = results_section(setup, datasets, runs, command.strip(), missing)
    print(results)
    write_marked_section(args.out_results, results, *RESULTS_MARKERS, "Results")
    write_marked_section(
        args.out_performance,
        performance_section(datasets, runs, command.strip()),
        *PERF_MARKERS,
        "Performance",
    )


if __name__ == "__main__":
    main()
