"""Which start each dataset recipe's CPU preset should use: ImageNet or MAE from scratch.

Each dataset recipe is run whole with ``medtl run`` twice per seed: with its ``cpu`` preset
(``efficientnet_lite0`` from ``imagenet:efficientnet_lite0``, no pretraining) and with its
``mae_scratch`` preset (the recipe's sections as written: entropy-guided MAE of
``convnext_atto`` from random weights, then full fine-tuning), each at the recipe's own
settings. The start is chosen on **validation** macro AUROC (calibrated; validation balanced
accuracy breaks a tie), never on test; test figures with 95% group-bootstrap CIs are printed
beside it for the record. A finished run is read back, not rerun.

    python benchmarks/recipe_starts.py [--datasets isic2018 ...] [--seeds 0]
        [--data-root DATASET=FOLDER] [--report-only]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe_runs import (  # benchmarks/, this script's folder
    ROOT,
    command_line,
    evaluated,
    machine,
    publish,
    recipe_argv,
    run_recipe,
    section_head,
    stage_seconds,
    val_auroc,
)
from recipe_runs import data_root as given_root

from medtl.report.tables import fmt_entry, mean_sd

MARKERS = ("<!-- recipe_starts:start -->", "<!-- recipe_starts:end -->")
# recipe -> its data folder under ../shared/data (the development copies)
DATASETS = {
    "busi": "busi",
    "breastmnist": "medmnist",
    "isic2018": "isic2018_sample",
    "covid19_radiography": "covid19_radiography_sample",
    "brain_tumor_mri": "brain_tumor_mri_sample",
}
PRESETS = ("cpu", "mae_scratch")
METRICS = ("macro_auroc", "balanced_accuracy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    add("--seeds", type=int, nargs="+", default=[0])
    add("--data-root", action="append", default=[], help="DATASET=FOLDER (default ../shared/data)")
    add("--device", default=None, help="passed to medtl run (default: CUDA when present)")
    add("--work", type=Path, default=ROOT / "benchmarks/out/recipe_starts")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--set", dest="overrides", action="append", default=[], help="override for every run")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    return parser.parse_args(argv)


def one_run(
    args: argparse.Namespace, dataset: str, preset: str, seed: int
) -> dict[str, Any] | None:
    """Run (or resume) one recipe, preset and seed; its figures once it has finished."""
    out = args.work / dataset / preset / f"seed{seed}"
    if evaluated(out) is None and not args.report_only:
        root = given_root(args.data_root, dataset, DATASETS[dataset])
        sets = [f"preset={preset}", f"seed={seed}", *own_overrides(args, dataset, preset)]
        run_recipe(
            f"{dataset} {preset} seed {seed}",
            recipe_argv("run", dataset, out, root, sets, args.device),
        )
    if (done := evaluated(out)) is None:
        return None
    folder, metrics, card = done
    return {
        "metrics": metrics, "val_auroc": val_auroc(folder), "val_bacc": card.val_bacc,
        "backbone": card.backbone, "minutes": sum(stage_seconds(out).values()) / 60,
    }  # fmt: skip


def own_overrides(args: argparse.Namespace, dataset: str, preset: str) -> list[str]:
    """``--set`` overrides less those into a pretraining section the preset does not have
    (``pretrain.epochs=...`` would otherwise add a pretraining stage to the ImageNet start)."""
    from medtl.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / f"{dataset}.yaml", [f"preset={preset}"])
    keep = recipe.has("pretrain")
    return [o for o in args.overrides if keep or not o.startswith("pretrain.")]


def chosen(runs: dict[str, list[dict[str, Any]]]) -> str | None:
    """The preset with the higher mean validation macro AUROC (then balanced accuracy)."""
    scored = {
        p: (
            statistics.fmean(r["val_auroc"] or 0.0 for r in rs),
            statistics.fmean(r["val_bacc"] for r in rs),
        )
        for p, rs in runs.items()
        if rs
    }
    return max(scored, key=lambda p: scored[p]) if len(scored) == len(PRESETS) else None


def section(
    args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]], command: str
) -> str:
    lines = section_head(
        MARKERS[0],
        "## Which start each recipe's CPU preset uses (`benchmarks/recipe_starts.py`)",
        "Each dataset recipe run whole with its `cpu` preset (ImageNet `efficientnet_lite0`, no "
        "pretraining) and its `mae_scratch` preset (entropy-guided MAE of `convnext_atto` from "
        "random weights, then full fine-tuning), each at the recipe's own settings, on the data "
        "in `../shared/data`. The start is chosen on **validation** macro AUROC (calibrated); "
        "test figures (95% group-bootstrap CIs) are for the record only. Mean ± SD over seeds "
        "where more than one ran.",
        "| recipe (data) | preset | backbone | seeds | val macro AUROC | val bal. acc. | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | train min | validation prefers |",
        "|---|---|---|---:|---|---|---|---|---:|---|",
    )
    for dataset in args.datasets:
        runs = results.get(dataset, {})
        best = chosen(runs)
        for preset in PRESETS:
            rs = runs.get(preset, [])
            if not rs:
                lines.append(
                    f"| `{dataset}` ({DATASETS[dataset]}) | `{preset}` | | 0 | not run | | | | | |"
                )
                continue
            tests = [
                fmt_entry(rs[0]["metrics"][k]) if len(rs) == 1
                else mean_sd([r["metrics"][k]["value"] for r in rs])
                for k in METRICS
            ]  # fmt: skip
            lines.append(
                f"| `{dataset}` ({DATASETS[dataset]}) | `{preset}` | `{rs[0]['backbone']}` | {len(rs)} | "
                f"{mean_sd([r['val_auroc'] for r in rs], missing='–')} | "
                f"{mean_sd([r['val_bacc'] for r in rs])} | {' | '.join(tests)} | "
                f"{statistics.fmean(r['minutes'] for r in rs):.1f} | "
                f"{'**yes**' if best == preset else ''} |"
            )
    lines += ["", f"- command: `{command}`", *machine(), MARKERS[1]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    args = parse_args(argv)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dataset in args.datasets:
        for preset in PRESETS:
            runs = [r for s in args.seeds if (r := one_run(args, dataset, preset, s)) is not None]
            results.setdefault(dataset, {})[preset] = runs
    text = section(args, results, command_line("recipe_starts", argv))
    publish(args.out_results, text, MARKERS)
    return results


if __name__ == "__main__":
    main()
