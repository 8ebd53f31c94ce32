"""Transfer benchmark: scratch, in-domain MAE and ImageNet starts, and their ensemble, per seed.

Each arm is a dataset's recipe (``recipes/<dataset>.yaml``) with the arm's overrides, run
whole with ``medtl run --set seed=S`` (a finished stage is skipped, an interrupted one resumed):

- ``scratch``: no pretraining, random initialisation;
- ``mae_entropy`` / ``mae_random``: the recipe's in-domain MAE pretraining (``convnext_atto``)
  with entropy-guided or random masking, then full fine-tuning;
- ``imagenet_lite0`` / ``imagenet_lite2``: ``efficientnet_lite0`` / ``_lite2`` from ImageNet
  weights (``recipes/busi_imagenet.yaml``'s fine-tuning: 20 epochs, 3 warm-up epochs, label
  smoothing 0.1, the backbone at the head's learning rate: pinned, so that the figures do not
  move when the pretrained start's defaults change), no pretraining;
- ``ensemble``: the ``imagenet_lite0`` and ``mae_entropy`` models of the same seed, their
  calibrated probabilities weighted on VALIDATION only (greedy selection, ``medtl.ensemble``),
  then evaluated on test like any model.

Every figure is on the test split with 95% group-bootstrap CIs; validation balanced accuracy
and validation macro AUROC (calibrated) are reported beside them. Tables go into
``docs/results.md`` and the compute (epochs, wall time) into ``docs/performance.md``.

    python benchmarks/transfer.py [--datasets busi breastmnist] [--arms scratch ...]
        [--seeds 0 1 2] [--report-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from medtl.artifacts import ModelCard, file_sha256
from medtl.cli import main as medtl
from medtl.io import atomic_write_text, write_marked_section
from medtl.report.tables import fmt_entry, mean_sd
from medtl.results import EvaluationResults
from medtl.runs import run_manifest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("<!-- transfer:start -->", "<!-- transfer:end -->")
COMPUTE = ("<!-- transfer_compute:start -->", "<!-- transfer_compute:end -->")
METRICS = ("macro_auroc", "balanced_accuracy", "accuracy")
IMAGENET = [
    "pretrain=",
    "finetune.strategy=full",
    "finetune.epochs=20",
    "finetune.lr=0.001",
    "finetune.warmup_epochs=3",
    "finetune.label_smoothing=0.1",
    "finetune.backbone_lr_scale=1.0",  # pinned: the figures do not move with the start's defaults
]
ARMS: dict[str, list[str]] = {
    "scratch": ["pretrain=", "finetune.weights="],
    "mae_entropy": ["pretrain.masking=entropy"],
    "mae_random": ["pretrain.masking=random"],
    "imagenet_lite0": [
        *IMAGENET,
        "finetune.backbone=efficientnet_lite0",
        "finetune.weights=imagenet:efficientnet_lite0",
    ],
    "imagenet_lite2": [
        *IMAGENET,
        "finetune.backbone=efficientnet_lite2",
        "finetune.weights=imagenet:efficientnet_lite2",
    ],
}
ENSEMBLE = ("imagenet_lite0", "mae_entropy")  # the paper's ImageNet + in-domain MAE pair
DATA_ROOTS = {"busi": "busi", "breastmnist": "medmnist"}
TARGETS = {  # dataset -> (metric, threshold) the issue sets for the mean over seeds
    "busi": (("macro_auroc", 0.95), ("balanced_accuracy", 0.85)),
    "breastmnist": (("macro_auroc", 0.94),),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=list(DATA_ROOTS), choices=list(DATA_ROOTS))
    add("--arms", nargs="+", default=[*ARMS, "ensemble"], choices=[*ARMS, "ensemble"])
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--data-root", action="append", default=[], help="DATASET=FOLDER (default ../shared/data)")
    add("--work", type=Path, default=ROOT / "benchmarks/out/transfer")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--out-compute", type=Path, default=ROOT / "docs/performance.md")
    add("--set", dest="overrides", action="append", default=[], help="override for every arm")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    add("--note", default="", help="a line on how the runs were launched, printed with the tables")
    return parser.parse_args(argv)


def data_root(args: argparse.Namespace, dataset: str) -> Path:
    given = dict(text.partition("=")[::2] for text in args.data_root)
    return Path(given.get(dataset) or ROOT.parent / "shared/data" / DATA_ROOTS[dataset])


def arm_overrides(arm: str, given: list[str]) -> list[str]:
    """The arm's overrides, then the user's, less those into a section the arm removes (a
    ``pretrain.epochs=1`` would bring back the pretraining a scratch arm dropped)."""
    removed = [o.removesuffix("=") for o in ARMS[arm] if o.endswith("=") and "." not in o]
    kept = [o for o in given if not any(o.startswith(f"{r}.") for r in removed)]
    return [*ARMS[arm], *kept]


def run_folder(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> Path:
    return args.work / dataset / arm / f"seed{seed}"


def val_auroc(folder: Path) -> float | None:
    """Macro AUROC (one-vs-rest) of a model's calibrated validation probabilities."""
    from medtl.predictions import Predictions

    card = ModelCard.load(folder / "meta.json")
    val = Predictions.load(folder / "predictions_val.csv")
    probs, labels = val.probs(card.calibrator), val.labels
    try:
        if probs.shape[1] == 2:
            return float(roc_auc_score(labels, probs[:, 1]))
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    except ValueError:  # a class absent from validation
        return None


def one_run(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> dict[str, Any] | None:
    """Run (or resume) one arm and seed; its test metrics, validation figures and compute."""
    from medtl.pipeline import model_dir

    out = run_folder(args, dataset, arm, seed)
    if not args.report_only:
        sets = [f"seed={seed}", *arm_overrides(arm, args.overrides)]
        argv = ["-q", "run", str(ROOT / "recipes" / f"{dataset}.yaml"), "--out", str(out)]
        argv += [
            "--data-root",
            str(data_root(args, dataset)),
            *[x for o in sets for x in ("--set", o)],
        ]
        code = medtl(argv)
        if code != 0:
            print(f"{dataset} {arm} seed {seed}: medtl run exited with {code}", file=sys.stderr)
    evaluation = out / "evaluate" / "evaluation.json"
    if not evaluation.is_file():
        return None
    folder = model_dir(out)
    entry = next(
        e for e in EvaluationResults.load(evaluation).entries
        if e.status == "ok" and Path(e.model_dir or "") == folder
    )  # fmt: skip
    stages = {
        stage: json.loads((out / stage / "DONE").read_text(encoding="utf-8"))
        for stage in ("pretrain", "finetune")
        if (out / stage / "DONE").is_file()
    }
    card = ModelCard.load(folder / "meta.json")
    return {
        "arm": arm, "seed": seed, "metrics": (entry.metrics or {})["overall"],
        "val_bacc": card.val_bacc, "val_auroc": val_auroc(folder), "model_dir": folder,
        "best_epoch": card.best_epoch, "epochs_run": card.epochs_run,
        "pretrain_s": float(stages.get("pretrain", {}).get("seconds") or 0),
        "finetune_s": float(stages.get("finetune", {}).get("seconds") or 0),
    }  # fmt: skip


def ensemble_run(
    args: argparse.Namespace, dataset: str, seed: int, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The ImageNet and MAE models of one seed, weighted on validation, evaluated on test."""
    from medtl.ensemble import EnsembleConfig, choose_ensemble
    from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec
    from medtl.pipeline import EvaluateStage

    if any(arm not in runs for arm in ENSEMBLE):
        return None
    out = run_folder(args, dataset, "ensemble", seed)
    members = [ModelSpec(runs[arm]["model_dir"], arm) for arm in ENSEMBLE]
    stamp = out / "MEMBERS"  # the member cards the saved evaluation combined
    key = " ".join(file_sha256(m.folder / "meta.json") for m in members)
    evaluation = out / "evaluation.json"

    def current() -> bool:
        return evaluation.is_file() and stamp.is_file() and stamp.read_text().strip() == key

    if not args.report_only and not current():
        card = choose_ensemble(EnsembleConfig(members=list(ENSEMBLE)), members)
        out.mkdir(parents=True, exist_ok=True)
        card.save(out / "ensemble.json")
        run = runs[ENSEMBLE[0]]["model_dir"].parent
        run = run.parent if run.name == "finetune" else run
        data = DataSpec(run_manifest(run, ROOT), data_root(args, dataset), dataset)
        cfg = EvaluateConfig.model_validate(evaluate_section(run))
        EvaluateStage(cfg).evaluate(members, [data], out, seed=seed, progress=False, chosen=card)
        atomic_write_text(stamp, key + "\n")
    if not current():  # never an ensemble of other members
        return None
    entries = EvaluationResults.load(evaluation).entries
    chosen = next(e for e in entries if e.model.startswith("ensemble(") and e.status == "ok")
    meta = chosen.model_meta or {}
    return {
        "arm": "ensemble", "seed": seed, "metrics": (chosen.metrics or {})["overall"],
        "weights": dict(zip(meta["members"], meta["weights"], strict=True)),
        "val_log_loss": meta["val_log_loss"],
        "pretrain_s": sum(runs[a]["pretrain_s"] for a in ENSEMBLE),
        "finetune_s": sum(runs[a]["finetune_s"] for a in ENSEMBLE),
    }  # fmt: skip


def evaluate_section(run: Path) -> dict[str, Any]:
    """The run's resolved ``evaluate`` section without external sets (the ensemble is
    measured on the run's own test split)."""
    import yaml

    resolved = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    return {**(resolved.get("evaluate") or {}), "external": [], "ensemble": False}


def results_section(results: dict[str, list[dict[str, Any]]], command: str, note: str = "") -> str:
    lines = [
        RESULTS[0],
        "## Transfer: scratch, in-domain MAE, ImageNet and their ensemble (`benchmarks/transfer.py`)",
        "",
        "Each arm run whole with `medtl run` per seed (temperature fitted on validation; **test "
        "split**, 95% CIs from group-bootstrap resamples; accuracy with a Wilson interval). "
        "The ensemble weighs the same seed's ImageNet `efficientnet_lite0` and entropy-MAE "
        "models on validation log-loss (greedy selection); its weights are listed.",
        "",
        "| dataset | arm | seed | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | test accuracy [95% CI] | val bal. acc. | val macro AUROC | best / run epochs |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for dataset, runs in results.items():
        for r in runs:
            m = r["metrics"]
            cells = [fmt_entry(m[k]) for k in METRICS]
            if r["arm"] == "ensemble":
                weights = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
                extra = [f"weights: {weights}", "", ""]
            else:
                auc = "–" if r["val_auroc"] is None else f"{r['val_auroc']:.3f}"
                extra = [f"{r['val_bacc']:.3f}", auc, f"{r['best_epoch']} / {r['epochs_run']}"]
            lines.append(f"| {dataset} | {r['arm']} | {r['seed']} | {' | '.join(cells + extra)} |")
    lines += [
        "",
        "Over seeds (mean ± SD of the point estimates: the seed spread, not a CI):",
        "",
        "| dataset | arm | seeds | test macro AUROC | test balanced accuracy | test accuracy |",
        "|---|---|---:|---|---|---|",
    ]
    verdicts = []
    for dataset, runs in results.items():
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["arm"] == arm]
            cols = [mean_sd([r["metrics"][k]["value"] for r in mine], missing="–") for k in METRICS]
            lines.append(f"| {dataset} | {arm} | {len(mine)} | {' | '.join(cols)} |")
            for metric, threshold in TARGETS[dataset]:
                mean = statistics.fmean(r["metrics"][metric]["value"] for r in mine)
                verdicts.append(
                    f"- {dataset} {arm}: mean test {metric} {mean:.3f} over {len(mine)} seed(s) "
                    f"(target >= {threshold}): **{'met' if mean >= threshold else 'not met'}**"
                )
    lines += ["", *verdicts, "", f"- command: `{command}`", *machine(note), RESULTS[1]]
    return "\n".join(lines)


def compute_section(results: dict[str, list[dict[str, Any]]], command: str, note: str = "") -> str:
    lines = [
        COMPUTE[0],
        "## Transfer benchmark compute (`benchmarks/transfer.py`)",
        "",
        "Wall seconds of each run's stages as the run recorded them (the ensemble: the sum of "
        "its members'; choosing its weights and evaluating take seconds). The machine was "
        "shared with other processes.",
        "",
        "| dataset | arm | seed | pretrain s | fine-tune s | best / run epochs |",
        "|---|---|---|---:|---:|---|",
    ]
    for dataset, runs in results.items():
        for r in runs:
            epochs = f"{r['best_epoch']} / {r['epochs_run']}" if "epochs_run" in r else ""
            lines.append(
                f"| {dataset} | {r['arm']} | {r['seed']} | {r['pretrain_s']:.0f} | "
                f"{r['finetune_s']:.0f} | {epochs} |"
            )
    return "\n".join([*lines, "", f"- command: `{command}`", *machine(note), COMPUTE[1]])


def machine(note: str = "") -> list[str]:
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
        f"({platform.machine()}){gpu}, torch {torch.__version__}",
        *([f"- {note}"] if note else []),
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        results[dataset] = []
        for seed in args.seeds:
            runs = {}
            for arm in (a for a in args.arms if a != "ensemble"):
                if (run := one_run(args, dataset, arm, seed)) is not None:
                    runs[arm] = run
                    results[dataset].append(run)
            if "ensemble" in args.arms and (ens := ensemble_run(args, dataset, seed, runs)):
                results[dataset].append(ens)
    command = "python benchmarks/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = results_section(results, command.strip(), args.note)
    print(text)
    write_marked_section(args.out_results, text, *RESULTS, "Results")
    write_marked_section(
        args.out_compute, compute_section(results, command, args.note), *COMPUTE, "Performance"
    )
    return results


if __name__ == "__main__":
    main()
