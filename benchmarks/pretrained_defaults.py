"""Fine-tuning defaults for a pretrained start, chosen on VALIDATION only.

A one-factor-at-a-time grid around a base (the values medtl uses from scratch): each
configuration changes one knob of the ``finetune`` section, ``efficientnet_lite0`` from
``imagenet:efficientnet_lite0``, fully fine-tuned with each dataset's recipe (``recipes/busi.yaml``,
``recipes/breastmnist.yaml``; their pretraining removed). Every knob is set explicitly, so the
defaults being chosen never enter a run.

The test split is never read: each run gets a copy of the dataset's manifest with its test rows
removed (``train`` and ``val`` only), so fine-tuning neither loads a test image nor writes test
predictions, and no calibration or evaluation runs. Configurations are ranked by the validation
figures of ``predictions_val.csv`` alone: macro AUROC (one-vs-rest, of the softmax) and balanced
accuracy, each averaged over seeds within a dataset and then over datasets (each dataset weighs
the same); the score is their mean. For each knob the base level stays unless another beats
its score by more than ``MARGIN`` (0.01; then the best of those), and the chosen set is
compared with the pretrained column of ``medtl.finetune.defaults``. Wins found one factor at a
time need not add up, so once every knob is compared, the chosen levels run together (the
``combined_...`` configuration, the same datasets and seeds) and are adopted together only if
they beat the base by more than the margin; otherwise only the best single change that does.
The ranking goes into ``docs/finetune.md`` between markers.

Each finished run leaves ``result.json`` in its folder (``<work>/<dataset>/<config>/seed<S>``); a
rerun skips it, an interrupted one resumes its checkpoint. ``--report-only`` runs nothing and
tabulates what finished ("not run" for the rest).

    python benchmarks/pretrained_defaults.py [--datasets busi breastmnist] [--configs base ...]
        [--seeds 0 1] [--data-root DATASET=FOLDER] [--manifest DATASET=CSV] [--set key=value]
        [--device cuda] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from recipe_runs import (  # benchmarks/
    ROOT,
    command_line,
    failed,
    given,
    machine,
    publish,
    recipe_argv,
    section_head,
    table_head,
)
from recipe_runs import data_root as given_root
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medtl.cli import main as medtl
from medtl.finetune.defaults import defaults_for
from medtl.io import atomic_write_text

MARKERS = ("<!-- pretrained_defaults:start -->", "<!-- pretrained_defaults:end -->")
RESULT = "result.json"
VAL_FILE = "predictions_val.csv"
DATASETS = {  # dataset -> (recipe, default data folder under ../shared/data)
    "busi": ("busi", "busi"),
    "breastmnist": ("breastmnist", "medmnist"),
}
START = [
    "pretrain=",  # no MAE pretraining: the start is the ImageNet source
    "finetune.backbone=efficientnet_lite0",
    "finetune.weights=imagenet:efficientnet_lite0",
    "finetune.strategy=full",
    "finetune.epochs=20",
    "finetune.lr=0.001",
]
# a level replaces the base's only if it beats the base's score by more than this: below it,
# one validation image more or less (BreastMNIST's val has 21 malignant and 57 other images)
MARGIN = 0.01
COMBINED = "combined"  # the chosen levels of every knob run together, to confirm the choice
BASE: dict[str, Any] = defaults_for("scratch")  # the values medtl uses from scratch
# one factor at a time: the configuration's knob and its level (the base keeps every knob)
CONFIGS: dict[str, tuple[str, Any] | None] = {
    "base": None,
    "backbone_lr_0.3": ("backbone_lr_scale", 0.3),
    "backbone_lr_0.1": ("backbone_lr_scale", 0.1),
    "layer_decay_0.75": ("layer_decay", 0.75),
    "warmup_0": ("warmup_epochs", 0.0),
    "warmup_3": ("warmup_epochs", 3.0),
    "smoothing_0.1": ("label_smoothing", 0.1),
    "augment_none": ("augment", "none"),
    "augment_medium": ("augment", "medium"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    add("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--data-root", action="append", default=[], help="DATASET=FOLDER (default ../shared/data)")
    add("--manifest", action="append", default=[], help="DATASET=CSV (default: the recipe's)")
    add("--work", type=Path, default=ROOT / "benchmarks/out/pretrained_defaults")
    add("--out", type=Path, default=ROOT / "docs/finetune.md")
    add("--set", dest="overrides", action="append", default=[], help="override for every run")
    add("--device", default=None, help="passed to medtl (default: CUDA when present)")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    return parser.parse_args(argv)


def data_root(args: argparse.Namespace, dataset: str) -> Path:
    return given_root(args.data_root, dataset, DATASETS[dataset][1])


def recipe_path(dataset: str) -> Path:
    return ROOT / "recipes" / f"{DATASETS[dataset][0]}.yaml"


def source_manifest(args: argparse.Namespace, dataset: str) -> Path:
    """The manifest to select on: ``--manifest DATASET=CSV``, else the recipe's."""
    from medtl.recipe import load_recipe

    manifest = given(args.manifest, dataset)
    if manifest:
        return Path(manifest)
    path = Path(load_recipe(recipe_path(dataset)).section("data").manifest)
    return path if path.is_absolute() else ROOT / path


def without_test(source: Path, out: Path) -> Path:
    """``source`` with its test rows removed, saved as ``out`` (CSV and sidecar, atomically):
    what every run of this benchmark trains and validates on, so that no run can read the test
    split."""
    from medtl.data.manifest import Manifest

    manifest = Manifest.load(source)
    rows = [r for r in manifest.rows if r.split != "test"]
    if {r.split for r in rows} != {"train", "val"}:
        raise SystemExit(
            f"{source}: needs train and val rows; it has {sorted({r.split for r in rows})}"
        )
    return manifest.with_rows(rows).save(out)


def config_knobs(config: str) -> dict[str, Any]:
    """The base's knobs with this configuration's one change."""
    knobs = dict(BASE)
    change = CONFIGS[config]
    if change is not None:
        knobs[change[0]] = change[1]
    return knobs


def config_overrides(config: str, knobs: dict[str, Any] | None = None) -> list[str]:
    """Every start-dependent knob set explicitly: the base's with this configuration's one, or
    ``knobs`` (the combined configuration's)."""
    knobs = config_knobs(config) if knobs is None else knobs
    return [f"finetune.{k}={v}" for k, v in knobs.items()]


def combined_name(knobs: dict[str, Any]) -> str:
    """The folder and row name of the chosen levels run together: ``combined_`` and the knobs
    that differ from the base (another choice is another folder, never a stale result)."""
    changed = [f"{k}={v}" for k, v in knobs.items() if v != BASE[k]]
    return f"{COMBINED}_{','.join(changed)}"


def run_folder(args: argparse.Namespace, dataset: str, config: str, seed: int) -> Path:
    return args.work / dataset / config / f"seed{seed}"


def val_scores(folder: Path) -> dict[str, float | None]:
    """Validation macro AUROC and balanced accuracy of a finished run, from its validation
    predictions alone; a folder holding test predictions is refused (this benchmark's runs
    never make any)."""
    from medtl.predictions import Predictions

    if any(folder.glob("predictions_test*")):
        raise RuntimeError(f"{folder} holds test predictions; this selection must not read them")
    val = Predictions.load(folder / VAL_FILE)
    if val.split != "val":
        raise RuntimeError(f"{folder / VAL_FILE} is the {val.split!r} split, not 'val'")
    logits = torch.from_numpy(val.logits).float()
    probs = torch.softmax(logits, 1).numpy()
    labels = val.labels
    try:
        if probs.shape[1] == 2:
            auroc: float | None = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auroc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    except ValueError:  # a class absent from validation
        auroc = None
    bacc = float(balanced_accuracy_score(labels, probs.argmax(1)))
    return {"val_auroc": auroc, "val_bacc": bacc}


def one_run(
    args: argparse.Namespace,
    dataset: str,
    config: str,
    seed: int,
    knobs: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Fine-tune one configuration and seed (``medtl finetune``, no test rows); its record.
    ``knobs``: every knob's level (the combined configuration), else the configuration's."""
    out = run_folder(args, dataset, config, seed)
    done = out / RESULT
    if done.is_file():
        return dict(json.loads(done.read_text(encoding="utf-8")))
    if args.report_only:
        return None
    manifest = without_test(source_manifest(args, dataset), args.work / dataset / "trainval.csv")
    sets = [f"seed={seed}", f"data.manifest={manifest}", *START, *config_overrides(config, knobs)]
    sets += args.overrides
    root = data_root(args, dataset)
    code = medtl(recipe_argv("finetune", DATASETS[dataset][0], out, root, sets, args.device))
    folder = out / "finetune"
    if code != 0 or not (folder / VAL_FILE).is_file():
        failed(f"{dataset} {config} seed {seed}", "finetune", code)
        return None
    card = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    record = {
        "dataset": dataset, "config": config, "seed": seed, **val_scores(folder),
        "best_epoch": card["best_epoch"], "epochs_run": card["epochs_run"],
        "seconds": card["seconds"], "knobs": {k: card["config"][k] for k in BASE},
        "overrides": list(args.overrides),
    }  # fmt: skip
    atomic_write_text(done, json.dumps(record, indent=2) + "\n")
    return record


def score(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Validation AUROC and balanced accuracy, each the mean over datasets of the dataset's mean
    over seeds (every dataset weighs the same, whatever its number of finished seeds), and their
    mean (the score)."""

    def mean_of(key: str) -> float | None:
        per_dataset = []
        for dataset in dict.fromkeys(r["dataset"] for r in records):
            values = [r[key] for r in records if r["dataset"] == dataset and r[key] is not None]
            if values:
                per_dataset.append(statistics.fmean(values))
        return statistics.fmean(per_dataset) if per_dataset else None

    auroc, bacc = mean_of("val_auroc"), mean_of("val_bacc")
    both = None if auroc is None or bacc is None else (auroc + bacc) / 2
    return {"val_auroc": auroc, "val_bacc": bacc, "score": both}


def ranking(results: list[dict[str, Any]], configs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Configurations by score, best first; those with no finished run last."""
    rows = [(c, score([r for r in results if r["config"] == c])) for c in configs]
    return sorted(rows, key=lambda row: -(row[1]["score"] if row[1]["score"] is not None else -1))


def chosen(results: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    """Per knob, the base level unless a configuration changing that knob beats the base's
    score by more than ``MARGIN`` (then the best such level); ``None`` for a knob with no
    measured alternative (or no measured base)."""
    scored = dict(ranking(results, configs))
    base = scored.get("base", {}).get("score")
    pick: dict[str, Any] = {}
    for knob in BASE:
        best, level, compared = None, BASE[knob], False
        for config, change in CONFIGS.items():
            value = scored.get(config, {}).get("score")
            if change is None or change[0] != knob or value is None:
                continue
            compared = True
            if base is not None and value > base + MARGIN and (best is None or value > best):
                best, level = value, change[1]
        pick[knob] = level if compared and base is not None else None
    return pick


def adopted(
    results: list[dict[str, Any]], together: list[dict[str, Any]], configs: list[str]
) -> dict[str, Any] | None:
    """What the pretrained column should hold. One-factor wins need not add up, so the chosen
    levels are adopted together only if, run together (``together``), they beat the base's score
    by more than ``MARGIN``; otherwise only the best single change that does, otherwise the base.
    ``None`` while a knob is not compared or the combination (when it differs from the base) has
    not run on every dataset and seed the base ran on."""
    pick = chosen(results, configs)
    if any(v is None for v in pick.values()):
        return None
    if pick == BASE:
        return dict(BASE)
    scored = dict(ranking(results, configs))
    base = scored["base"]["score"]
    runs = {(r["dataset"], r["seed"]) for r in results if r["config"] == "base"}
    combined = score(together)["score"]
    if combined is None or {(r["dataset"], r["seed"]) for r in together} != runs:
        return None
    if combined > base + MARGIN:
        return pick
    singles = [
        (value, c)
        for c, row in scored.items()
        if (value := row["score"]) is not None and CONFIGS.get(c) and value > base + MARGIN
    ]
    return config_knobs(max(singles)[1]) if singles else dict(BASE)


def _fmt(value: float | None) -> str:
    return "not run" if value is None else f"{value:.3f}"


def run_cells(args: argparse.Namespace, results: list[dict[str, Any]], config: str) -> list[str]:
    """One cell per dataset and seed: validation macro AUROC / balanced accuracy, or not run."""
    cells = []
    for d in args.datasets:
        for seed in args.seeds:
            hit = [
                r for r in results if (r["dataset"], r["config"], r["seed"]) == (d, config, seed)
            ]
            cells.append(
                "not run" if not hit else f"{_fmt(hit[0]['val_auroc'])} / {hit[0]['val_bacc']:.3f}"
            )
    return cells


def report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    command: str,
    together: list[dict[str, Any]] | None = None,
) -> str:
    lines = section_head(
        MARKERS[0],
        "#### Ranking on validation (`benchmarks/pretrained_defaults.py`)",
        "`efficientnet_lite0` from `imagenet:efficientnet_lite0`, fully fine-tuned with each "
        "dataset's recipe (its MAE pretraining removed), up to 20 epochs unless the runs' overrides "
        "below say otherwise, lr 0.001. One knob "
        f"changed at a time from the base ({', '.join(f'{k} {v}' for k, v in BASE.items())}). "
        "**Validation only**: the runs' manifests hold no test rows; the score is the mean of "
        "validation macro AUROC and balanced accuracy, each averaged over seeds within a dataset, "
        "then over datasets (each dataset weighs the same).",
        "| rank | configuration | val macro AUROC | val bal. acc. | score | "
        + " | ".join(f"{d} s{s}" for d in args.datasets for s in args.seeds)
        + " |",
        "|---:|---|---:|---:|---:|" + "---:|" * (len(args.datasets) * len(args.seeds)),
    )
    for rank, (config, s) in enumerate(ranking(results, args.configs), 1):
        lines.append(
            f"| {rank} | {config} | {_fmt(s['val_auroc'])} | {_fmt(s['val_bacc'])} | "
            f"{_fmt(s['score'])} | {' | '.join(run_cells(args, results, config))} |"
        )
    pick = chosen(results, args.configs)
    together = together or []
    if together:  # the chosen levels run together: a row of its own, below the ranking
        s = score(together)
        name = together[0]["config"]
        lines.append(
            f"| together | {name} | {_fmt(s['val_auroc'])} | {_fmt(s['val_bacc'])} | "
            f"{_fmt(s['score'])} | {' | '.join(run_cells(args, together, name))} |"
        )
    current = defaults_for("pretrained")
    lines += [
        "",
        "Per-run cells: validation macro AUROC / balanced accuracy.",
        "",
        *table_head(
            f"Chosen per key: the base level unless another beats the base's score by more than "
            f"{MARGIN} (then the best such level). Adopted: the chosen levels together if, run "
            "together, they beat the base by more than the margin; else the best single change "
            "that does.",
            "| key | chosen alone | adopted | medtl's pretrained default now |",
            "|---|---|---|---|",
        ),
    ]
    adopt = adopted(results, together, args.configs)
    for knob in BASE:
        alone = pick[knob] if pick[knob] is not None else "not compared"
        final = adopt[knob] if adopt is not None else "not decided"
        lines.append(f"| `finetune.{knob}` | {alone} | {final} | {current[knob]} |")
    if not results:
        verdict = "- nothing measured yet"
    elif adopt is None:
        verdict = (
            "- not decided: every knob needs a measured alternative, and chosen levels that "
            "differ from the base need their run together (`together`), which runs after the grid"
        )
    else:
        base = dict(ranking(results, args.configs))["base"]["score"]
        how = (
            "the base: no level beat it by more than the margin"
            if pick == BASE
            else f"the chosen levels together scored {_fmt(score(together)['score'])} against "
            f"the base's {_fmt(base)}: "
            + ("adopted together" if adopt == pick else "not adopted together")
        )
        change = ", ".join(f"{k} {adopt[k]}" for k in BASE if adopt[k] != BASE[k]) or "none"
        differs = [k for k in BASE if adopt[k] != current[k]]
        verdict = f"- to adopt ({how}): changes from the base: {change}; " + (
            f"differs from medtl's pretrained defaults for {', '.join(differs)}: update the "
            "pretrained column of `medtl/finetune/defaults.py` (and its table) if these runs "
            "are the full grid"
            if differs
            else "medtl's pretrained defaults hold it"
        )
    given = sorted({" ".join(f"--set {o}" for o in r.get("overrides", [])) for r in results})
    runs = [f"- the runs' own overrides: {', '.join(f'`{g}`' if g else 'none' for g in given)}"]
    lines += ["", verdict, *(runs if results else []), f"- command: `{command}`"]
    lines += [*machine(device_first=True), MARKERS[1]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results = [
        record
        for dataset in args.datasets
        for seed in args.seeds
        for config in args.configs
        if (record := one_run(args, dataset, config, seed)) is not None
    ]
    pick = chosen(results, args.configs)
    together: list[dict[str, Any]] = []
    if all(v is not None for v in pick.values()) and pick != BASE:
        name = combined_name(pick)
        together = [
            record
            for dataset in args.datasets
            for seed in args.seeds
            if (record := one_run(args, dataset, name, seed, knobs=pick)) is not None
        ]
    text = report(args, results, command_line("pretrained_defaults", argv), together)
    publish(args.out, text, MARKERS, "Fine-tuning")
    return results


if __name__ == "__main__":
    main()
