"""BreastMNIST recipes end to end over seeds, against the MedMNIST v2 baselines.

Runs ``medtl run recipes/<recipe>.yaml --set seed=S`` for every recipe and seed (a finished
stage is skipped, an interrupted one resumed), then, with ``medtl evaluate --ensemble``, the
average of each recipe's seeds. Every figure is on BreastMNIST's official **test** split
(n = 156) with 95% group-bootstrap CIs, after the temperature each run fitted on validation;
which recipe is "best" is decided on mean validation balanced accuracy, never on test.

    python benchmarks/breastmnist_recipes.py [--recipes breastmnist_resnet18 breastmnist:mae_scratch]
        [--seeds 0 1 2] [--data-root ../shared/data/medmnist] [--report-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from recipe_runs import stage_seconds  # benchmarks/, this script's folder

from medtl.artifacts import ModelCard
from medtl.cli import main as medtl
from medtl.io import atomic_write_text, write_marked_section
from medtl.report.tables import fmt_entry, mean_sd
from medtl.results import EvaluationResults
from medtl.runs import run_manifest

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- breastmnist_recipes:start -->", "<!-- breastmnist_recipes:end -->")
# MedMNIST v2 (Yang et al., Scientific Data 2023), BreastMNIST test set, as published.
MEDMNIST_V2 = (("ResNet-18 (28)", 0.901, 0.863), ("Google AutoML Vision", 0.919, 0.861))
METRICS = ("macro_auroc", "balanced_accuracy", "accuracy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--recipes", nargs="+", default=["breastmnist_resnet18"],
        help="names in recipes/, each NAME or NAME:PRESET (e.g. breastmnist:mae_scratch)",
    )  # fmt: skip
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--data-root", type=Path, default=ROOT.parent / "shared/data/medmnist")
    add("--work", type=Path, default=ROOT / "benchmarks/out/breastmnist_recipes")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    return parser.parse_args(argv)


def run_folder(work: Path, recipe: str, seed: int) -> Path:
    return work / recipe.replace(":", "@") / f"seed{seed}"


def recipe_sets(recipe: str, seed: int, overrides: Sequence[str]) -> tuple[Path, list[str]]:
    """``NAME`` or ``NAME:PRESET`` -> the recipe file and its ``--set`` arguments."""
    name, _, preset = recipe.partition(":")
    sets = [f"seed={seed}", *([f"preset={preset}"] if preset else []), *overrides]
    return ROOT / "recipes" / f"{name}.yaml", [x for o in sets for x in ("--set", o)]


def entry_metrics(evaluation: Path) -> dict[str, Any]:
    """``{model name: its overall test metrics}`` from an ``evaluation.json``."""
    entries = EvaluationResults.load(evaluation).entries
    return {e.model: (e.metrics or {})["overall"] for e in entries if e.status == "ok"}


def one_run(args: argparse.Namespace, recipe: str, seed: int) -> dict[str, Any] | None:
    """Run (or resume) one recipe and seed; its test metrics, validation score and time."""
    out = run_folder(args.work, recipe, seed)
    if not args.report_only:
        path, sets = recipe_sets(recipe, seed, args.overrides)
        argv = ["-q", "run", str(path), "--out", str(out)]
        code = medtl([*argv, "--data-root", str(args.data_root), *sets])
        if code != 0:
            print(f"{recipe} seed {seed}: medtl run exited with {code}", file=sys.stderr)
    evaluation = out / "evaluate" / "evaluation.json"
    if not evaluation.is_file():
        return None
    (metrics,) = entry_metrics(evaluation).values()
    seconds = sum(stage_seconds(out).values())
    card = ModelCard.load(out / "finetune" / "meta.json")
    return {
        "recipe": recipe, "seed": seed, "metrics": metrics, "val_bacc": card.val_bacc,
        "best_epoch": card.best_epoch, "epochs_run": card.epochs_run, "seconds": seconds,
        "model_dir": out / "finetune",
    }  # fmt: skip


def ensemble(args: argparse.Namespace, recipe: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' averaged probabilities (each with its own temperature), on test."""
    out = args.work / recipe.replace(":", "@") / "ensemble"
    evaluation = out / "evaluation.json"
    seeds = [r["seed"] for r in runs]
    stamp = out / "SEEDS"  # the seeds the saved evaluation averaged

    def current() -> bool:
        return (
            evaluation.is_file()
            and stamp.is_file()
            and stamp.read_text(encoding="utf-8").split() == list(map(str, seeds))
        )

    if not args.report_only and not current():
        models = [x for r in runs for x in ("--model", f"{r['model_dir']}@seed{r['seed']}")]
        data = f"{run_manifest(runs[0]['model_dir'].parent, ROOT)}:{args.data_root}@breastmnist"
        code = medtl(
            ["-q", "evaluate", *models, "--data", data, "--out", str(out),
             "--positive", "malignant", "--ensemble"]
        )  # fmt: skip
        if code == 0:
            atomic_write_text(stamp, " ".join(map(str, seeds)) + "\n")
    if not current():  # never an ensemble of other seeds
        return {}
    found = {k: v for k, v in entry_metrics(evaluation).items() if "ensemble" in k}
    return (
        {"name": next(iter(found)), "metrics": next(iter(found.values())), "seeds": seeds}
        if found
        else {}
    )


def section(
    results: dict[str, list[dict[str, Any]]],
    ensembles: dict[str, dict[str, Any]],
    command: str,
) -> str:
    lines = [
        MARKERS[0],
        "## BreastMNIST recipes end to end (`benchmarks/breastmnist_recipes.py`)",
        "",
        "Each recipe run whole with `medtl run` per seed (the official split; temperature fitted on "
        "validation; **test split**, n = 156, 95% CIs from 1000 group-bootstrap resamples; "
        "accuracy with a Wilson interval). The ensemble averages the seeds' calibrated "
        "probabilities. Wall s: pretraining plus fine-tuning as the run recorded it.",
        "",
        "| recipe | seed | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | test accuracy [95% CI] | val bal. acc. | best / run epochs | wall s |",
        "|---|---|---|---|---|---:|---|---:|",
    ]
    summary = []
    for recipe, runs in results.items():
        for r in runs:
            m = r["metrics"]
            lines.append(
                f"| `{recipe}` | {r['seed']} | {fmt_entry(m['macro_auroc'])} | {fmt_entry(m['balanced_accuracy'])} | "
                f"{fmt_entry(m['accuracy'])} | {r['val_bacc']:.3f} | {r['best_epoch']} / {r['epochs_run']} | {r['seconds']:.0f} |"
            )
        ens = ensembles.get(recipe)
        if ens:
            m = ens["metrics"]
            lines.append(
                f"| `{recipe}` | ensemble of {len(ens['seeds'])} | {fmt_entry(m['macro_auroc'])} | "
                f"{fmt_entry(m['balanced_accuracy'])} | {fmt_entry(m['accuracy'])} | | | |"
            )
        if runs:
            summary.append((recipe, runs))
    lines += [
        "",
        "Over seeds (mean ± SD of the point estimates: the seed spread, not a CI):",
        "",
        "| recipe | seeds | test macro AUROC | test balanced accuracy | test accuracy | val bal. acc. |",
        "|---|---:|---|---|---|---|",
    ]
    for recipe, runs in summary:
        cols = [mean_sd([r["metrics"][k]["value"] for r in runs], missing="–") for k in METRICS]
        lines.append(
            f"| `{recipe}` | {len(runs)} | {' | '.join(cols)} | {mean_sd([r['val_bacc'] for r in runs], missing='–')} |"
        )
    lines += [
        "",
        "| MedMNIST v2, as published | test AUC | test ACC |",
        "|---|---:|---:|",
        *[f"| {m} | {auc:.3f} | {acc:.3f} |" for m, auc, acc in MEDMNIST_V2],
        "",
    ]
    if summary:
        best, runs = max(summary, key=lambda s: statistics.fmean(r["val_bacc"] for r in s[1]))
        auc = statistics.fmean(r["metrics"]["macro_auroc"]["value"] for r in runs)
        acc = statistics.fmean(r["metrics"]["accuracy"]["value"] for r in runs)
        ref_auc, ref_acc = MEDMNIST_V2[0][1:]
        lines += [
            f"- Best recipe by mean validation balanced accuracy: `{best}`: mean test AUROC {auc:.3f} "
            f"(ResNet-18 (28): {ref_auc:.3f}), mean test accuracy {acc:.3f} ({ref_acc:.3f}).",
            f"- **Target (best recipe beats MedMNIST v2 ResNet-18 (28) on test AUC): "
            f"{'met' if auc > ref_auc else 'not met'}** on the mean over seeds.",
            "",
        ]
    lines += [
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
        f"({platform.machine()}), torch {torch.__version__}",
        MARKERS[1],
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    ensembles: dict[str, dict[str, Any]] = {}
    for recipe in args.recipes:
        runs = [r for s in args.seeds if (r := one_run(args, recipe, s)) is not None]
        results[recipe] = runs
        if len(runs) >= 2:
            ensembles[recipe] = ensemble(args, recipe, runs)
    command = "python benchmarks/breastmnist_recipes.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = section(results, ensembles, command.strip())
    print(text)
    write_marked_section(args.out_results, text, *MARKERS, "Results")


if __name__ == "__main__":
    main()
