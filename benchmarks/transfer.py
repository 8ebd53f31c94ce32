"""Transfer benchmark: scratch, in-domain MAE and ImageNet starts, and their ensemble, per seed.

Each arm is a dataset's recipe (``recipes/<dataset>.yaml``) with the arm's overrides, run
whole with ``medtl run --set seed=S`` (a finished stage is skipped, an interrupted one resumed):

- ``scratch``: no pretraining, random initialisation;
- ``mae_entropy`` / ``mae_random``: the recipe's in-domain MAE pretraining (``convnext_atto``)
  with entropy-guided or random masking, then full fine-tuning. Each masking pretrains ONE
  encoder per dataset (``medtl pretrain`` at seed 0, into ``<work>/<dataset>/<arm>/encoder``),
  and every seed fine-tunes that encoder (``finetune.weights=<its file>``), as every ImageNet
  seed fine-tunes the one ImageNet checkpoint: the seeds vary the fine-tuning alike in every
  arm, and the pretraining is paid once;
- ``imagenet_lite0`` / ``imagenet_lite2``: ``efficientnet_lite0`` / ``_lite2`` from ImageNet
  weights (``recipes/busi_imagenet.yaml``'s fine-tuning: 20 epochs, 3 warm-up epochs, label
  smoothing 0.1, the backbone at the head's learning rate, light augmentation: pinned, so that
  the figures do not move when the pretrained start's defaults change), no pretraining;
- ``imagenet_lite0_hires``: ``imagenet_lite0`` at a raised input size (``HIRES``: BUSI at 224
  px, the network's ImageNet size; BreastMNIST's 28 px images upsampled to 128 px, the size of
  MedMNIST+'s best result), to measure what resolution a recipe should choose;
- ``recipe``: the dataset recipe's ``cpu`` preset as shipped, nothing pinned (today
  ``imagenet_lite0`` with the pretrained start's defaults): what ``medtl run
  recipes/<dataset>.yaml`` gives; its figures move when the recipe or the defaults do;
- ``ensemble``: the ``imagenet_lite0`` and ``mae_entropy`` models of the same seed, their
  calibrated probabilities weighted on VALIDATION only (greedy selection, ``medtl.ensemble``),
  then evaluated on test like any model. ``--arms ensemble`` alone (or with one member) combines
  the members' finished runs without running them again.

Every figure is on the test split with 95% group-bootstrap CIs; validation balanced accuracy
and validation macro AUROC (calibrated) are reported beside them. Tables go into
``docs/results.md`` and the compute (epochs, wall time) into ``docs/performance.md``.

    python benchmarks/transfer.py [--datasets busi breastmnist] [--arms scratch ...]
        [--seeds 0 1 2] [--report-only]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe_runs import (  # benchmarks/, this script's folder
    IMAGENET,
    ROOT,
    command_line,
    ensemble,
    evaluated,
    kept_overrides,
    machine,
    publish,
    recipe_argv,
    run_recipe,
    stage_seconds,
    val_auroc,
)
from recipe_runs import data_root as given_root

from medtl.io import write_marked_section
from medtl.pretrain.loop import ENCODER_FILE
from medtl.report.tables import fmt_entry, mean_sd

RESULTS = ("<!-- transfer:start -->", "<!-- transfer:end -->")
COMPUTE = ("<!-- transfer_compute:start -->", "<!-- transfer_compute:end -->")
METRICS = ("macro_auroc", "balanced_accuracy", "accuracy")
ARMS: dict[str, list[str]] = {
    "scratch": ["pretrain=", "finetune.weights="],
    # the fine-tuning of an MAE encoder pinned to the pretrained defaults it was measured with
    "mae_entropy": ["pretrain.masking=entropy", "finetune.augment=light"],
    "mae_random": ["pretrain.masking=random", "finetune.augment=light"],
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
ARMS["imagenet_lite0_hires"] = ARMS["imagenet_lite0"]  # plus data.loader.image_size=HIRES[dataset]
ARMS["recipe"] = ["preset=cpu"]  # the cpu preset as shipped, nothing pinned (no pretraining)
HIRES = {"busi": 224, "breastmnist": 128}
MAE_ARMS = ("mae_entropy", "mae_random")  # pretrain once per dataset, then fine-tune per seed
PRETRAIN_SEED = 0
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
    return given_root(args.data_root, dataset, DATA_ROOTS[dataset])


def arm_overrides(arm: str, dataset: str, given: list[str]) -> list[str]:
    """The arm's overrides, then the user's, less those into a section the arm removes (a
    ``pretrain.epochs=1`` would bring back the pretraining a scratch arm dropped)."""
    own = ARMS[arm]
    if arm == "imagenet_lite0_hires":
        own = [*own, f"data.loader.image_size={HIRES[dataset]}"]
    removes = ["pretrain="] if arm == "recipe" else own  # the cpu preset has no pretraining
    return [*own, *kept_overrides(removes, given)]


def run_folder(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> Path:
    return args.work / dataset / arm / f"seed{seed}"


def encoder_run(args: argparse.Namespace, dataset: str, arm: str) -> Path:
    """The ``medtl pretrain`` run whose encoder every seed of an MAE arm fine-tunes."""
    return args.work / dataset / arm / "encoder"


def pretrained_encoder(args: argparse.Namespace, dataset: str, arm: str) -> Path | None:
    """Pretrain (or resume, or find finished) an MAE arm's one encoder; its file, or ``None``
    when the pretraining failed (its error is on stderr and in the run's log)."""
    out = encoder_run(args, dataset, arm)
    encoder = out / "pretrain" / ENCODER_FILE
    if not args.report_only:
        sets = [f"seed={PRETRAIN_SEED}", *arm_overrides(arm, dataset, args.overrides)]
        argv = recipe_argv("pretrain", dataset, out, data_root(args, dataset), sets)
        run_recipe(f"{dataset} {arm} pretraining", argv)
    return encoder if (out / "pretrain" / "DONE").is_file() else None


def run_overrides(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> list[str] | None:
    """The ``--set`` list of one arm and seed: an MAE arm drops its pretraining section and
    fine-tunes the arm's one encoder (``None`` while that encoder is missing)."""
    sets = [f"seed={seed}", *arm_overrides(arm, dataset, args.overrides)]
    if arm not in MAE_ARMS:
        return sets
    if (encoder := pretrained_encoder(args, dataset, arm)) is None:
        return None
    drop = ["pretrain="]
    return [*drop, *kept_overrides(drop, sets), f"finetune.weights={encoder}"]


def one_run(
    args: argparse.Namespace, dataset: str, arm: str, seed: int, build: bool = True
) -> dict[str, Any] | None:
    """Run (or resume) one arm and seed; its test metrics, validation figures and compute.
    ``build=False`` (or ``--report-only``): only read a finished run back."""
    out = run_folder(args, dataset, arm, seed)
    if (
        build
        and not args.report_only
        and (sets := run_overrides(args, dataset, arm, seed)) is not None
    ):
        argv = recipe_argv("run", dataset, out, data_root(args, dataset), sets)
        run_recipe(f"{dataset} {arm} seed {seed}", argv)
    if (done := evaluated(out)) is None:
        return None
    folder, metrics, card = done
    seconds = stage_seconds(out)
    if arm in MAE_ARMS:  # the one shared pretraining, counted in every seed's row
        seconds["pretrain"] = stage_seconds(encoder_run(args, dataset, arm))["pretrain"]
    return {
        "arm": arm, "seed": seed, "metrics": metrics,
        "val_bacc": card.val_bacc, "val_auroc": val_auroc(folder), "model_dir": folder,
        "best_epoch": card.best_epoch, "epochs_run": card.epochs_run,
        "pretrain_s": seconds["pretrain"], "finetune_s": seconds["finetune"],
    }  # fmt: skip


def ensemble_run(
    args: argparse.Namespace, dataset: str, seed: int, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The ImageNet and MAE models of one seed, weighted on validation, evaluated on test."""
    if any(arm not in runs for arm in ENSEMBLE):
        return None
    run = runs[ENSEMBLE[0]]["model_dir"].parent
    run = run.parent if run.name == "finetune" else run
    members = {arm: runs[arm]["model_dir"] for arm in ENSEMBLE}
    out = run_folder(args, dataset, "ensemble", seed)
    done = ensemble(
        members, run, data_root(args, dataset), dataset, out, seed, not args.report_only
    )
    if done is None:
        return None
    return {
        **done,
        "pretrain_s": sum(runs[a]["pretrain_s"] for a in ENSEMBLE),
        "finetune_s": sum(runs[a]["finetune_s"] for a in ENSEMBLE),
    }  # fmt: skip


def results_section(results: dict[str, list[dict[str, Any]]], command: str, note: str = "") -> str:
    lines = [
        RESULTS[0],
        "## Transfer: scratch, in-domain MAE, ImageNet and their ensemble (`benchmarks/transfer.py`)",
        "",
        "Each arm run whole with `medtl run` per seed (temperature fitted on validation; **test "
        "split**, 95% CIs from group-bootstrap resamples; accuracy with a Wilson interval). "
        "Each MAE arm pretrains one encoder per dataset (seed 0) and every seed fine-tunes it, "
        "as every ImageNet seed fine-tunes the one ImageNet checkpoint. "
        "`imagenet_lite0_hires` is `imagenet_lite0` at a raised input size (BUSI 224 px, "
        "BreastMNIST's 28 px images upsampled to 128 px). `recipe` is the recipe's `cpu` preset "
        "as shipped, nothing pinned. "
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
        "its members'; choosing its weights and evaluating take seconds); an MAE arm's one "
        "pretraining is repeated in each of its seeds' rows. The machine was "
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
            if "ensemble" not in args.arms:
                continue
            for arm in (a for a in ENSEMBLE if a not in args.arms):  # its finished run, as it is
                if (run := one_run(args, dataset, arm, seed, build=False)) is not None:
                    runs[arm] = run
            if ens := ensemble_run(args, dataset, seed, runs):
                results[dataset].append(ens)
    command = command_line("transfer", argv)
    text = results_section(results, command, args.note)
    publish(args.out_results, text, RESULTS)
    write_marked_section(
        args.out_compute, compute_section(results, command, args.note), *COMPUTE, "Performance"
    )
    return results


if __name__ == "__main__":
    main()
