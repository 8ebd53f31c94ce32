"""Does masked pretraining that continues from ImageNet weights help? BUSI and BreastMNIST.

Each arm is a dataset's recipe (``recipes/<dataset>.yaml``) with the arm's overrides, run whole
with ``medtl run --set seed=S`` into its own run folder (a finished stage is skipped, an
interrupted one resumed; a finished run is read back, not rerun). Every arm fine-tunes
``efficientnet_lite0`` with ``benchmarks/transfer.py``'s ImageNet settings (full, 20 epochs,
lr 0.001, 3 warm-up epochs, label smoothing 0.1), so the figures compare with that benchmark's:

- ``imagenet``: from ``imagenet:efficientnet_lite0``, no pretraining;
- ``imagenet_mae_entropy`` / ``imagenet_mae_random``: masked pretraining of ``efficientnet_lite0``
  continued from ``imagenet:efficientnet_lite0`` on the train split (entropy / random masking),
  then the same fine-tuning from that encoder;
- ``imagenet_mae_corpus``: the same entropy pretraining on a mixed corpus (``pretrain.data``):
  every image file under ``--corpus-root`` (default ``../shared/data``: all datasets and
  modalities; masks and other datasets' test folders left out) and the train arrays of every
  ``.npz`` there; the evaluated dataset's validation and test images are left out by the
  leakage guard (its encoder card counts them), and the other copy of the evaluated dataset
  (BUSI for BreastMNIST and the reverse) by provenance, as the guard's hashes do not find
  28 px re-crops;
- ``imagenet_mae_unit16``: entropy masking with a 16 px mask unit (``pretrain.mask_unit=16``);
- ``ensemble``: the same seed's ``imagenet`` model and the MAE model with the best VALIDATION
  macro AUROC, weighted on validation only (``medtl.ensemble``), evaluated on test.

``--ablation T:R ...`` adds entropy arms at temperature ``T`` and random share ``R``.
Pretraining length is the recipe's (``pretrain.epochs``, 100 in both recipes); ``--set
pretrain.epochs=N`` changes it for every pretraining arm. Reported: test macro AUROC and
balanced accuracy with 95% CIs, validation figures, the paired entropy - random difference per
seed (DeLong on the same test images), pretraining wall time and images/s, the mask-unit
comparison on validation, and the issue's targets with a verdict. Tables go into
``docs/results.md``; runs not finished are listed as "not run".

    python benchmarks/pretrain_benefit.py [--datasets busi breastmnist] [--arms imagenet ...]
        [--seeds 0 1 2] [--set pretrain.epochs=100] [--report-only]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from recipe_runs import (  # benchmarks/, this script's folder
    IMAGENET,
    ROOT,
    command_line,
    ensemble,
    evaluated,
    given,
    kept_overrides,
    machine,
    publish,
    recipe_argv,
    run_recipe,
    section_head,
    table_head,
    val_auroc,
)
from recipe_runs import data_root as given_root
from sklearn.metrics import roc_auc_score

from medtl.artifacts import EncoderCard, ModelCard
from medtl.errors import DataError
from medtl.io import write_json
from medtl.report.tables import fmt_entry, fmt_p, mean_sd

RESULTS = ("<!-- pretrain_imagenet:start -->", "<!-- pretrain_imagenet:end -->")
METRICS = ("macro_auroc", "balanced_accuracy")
BACKBONE = "efficientnet_lite0"
SOURCE = "imagenet:efficientnet_lite0"
DATA_ROOTS = {"busi": "busi", "breastmnist": "medmnist"}
POSITIVE = {"busi": "malignant", "breastmnist": "malignant"}
# Left out of the mixed corpus: segmentation masks (never images) and the test folders of the
# other datasets ("every training image").
CORPUS_EXCLUDE = ["*_mask*", "*Testing/*", "*_Test_*"]
# Left out of the evaluated dataset's corpus by provenance: the other copy of the same images.
# BreastMNIST is BUSI at 28 px with another crop, and the leakage guard's hashes find few of
# those copies (of BreastMNIST's 546 train images, 8 matched the 254 validation / test images of
# data_manifests/busi.csv, where about 178 are the same scans; docs/pretrain.md).
SAME_ORIGIN = {"busi": ["*breastmnist*"], "breastmnist": ["busi*"]}


FINETUNE = [
    *[o for o in IMAGENET if o != "pretrain="],
    f"finetune.backbone={BACKBONE}",
]
CONTINUED = [f"pretrain.backbone={BACKBONE}", f"pretrain.weights={SOURCE}", *FINETUNE]
CONTINUED.append("finetune.weights=pretrain")


def arms(ablation: Sequence[str]) -> dict[str, list[str]]:
    """Arm name -> its overrides (``pretrain=`` removes the section); the corpus arm's
    ``pretrain.data`` is added per dataset (:func:`corpus_overrides`)."""
    out = {
        "imagenet": ["pretrain=", *FINETUNE, f"finetune.weights={SOURCE}"],
        "imagenet_mae_entropy": [*CONTINUED, "pretrain.masking=entropy"],
        "imagenet_mae_random": [*CONTINUED, "pretrain.masking=random"],
        "imagenet_mae_corpus": [*CONTINUED, "pretrain.masking=entropy"],
        "imagenet_mae_unit16": [*CONTINUED, "pretrain.masking=entropy", "pretrain.mask_unit=16"],
    }
    for setting in ablation:
        t, _, r = setting.partition(":")
        out[f"imagenet_mae_entropy_T{t}_R{r}"] = [
            *CONTINUED, "pretrain.masking=entropy", f"pretrain.temperature={t}",
            f"pretrain.random_share={r}",
        ]  # fmt: skip
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=list(DATA_ROOTS), choices=list(DATA_ROOTS))
    add("--arms", nargs="+", default=None, help="default: every arm and the ensemble")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--ablation", nargs="*", default=[], metavar="T:R", help="extra entropy arms")
    add("--data-root", action="append", default=[], help="DATASET=FOLDER (default ../shared/data)")
    add("--manifest", action="append", default=[], help="DATASET=CSV (default: the recipe's)")
    add("--corpus-root", type=Path, default=ROOT.parent / "shared/data")
    add("--device", default="auto", help="passed to medtl run (auto: CUDA when present)")
    add("--work", type=Path, default=ROOT / "benchmarks/out/pretrain_benefit")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--set", dest="overrides", action="append", default=[], help="override for every arm")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    args = parser.parse_args(argv)
    known = [*arms(args.ablation), "ensemble"]
    args.arms = args.arms or known
    unknown = [a for a in args.arms if a not in known]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return args


def data_root(args: argparse.Namespace, dataset: str) -> Path:
    return given_root(args.data_root, dataset, DATA_ROOTS[dataset])


def corpus_overrides(args: argparse.Namespace, dataset: str) -> list[str]:
    """``pretrain.data``: every image file under the corpus root and every ``.npz``'s train
    arrays there, with weight 1 (each image as likely as any other), less the other copies of
    the evaluated dataset's images (:data:`SAME_ORIGIN`)."""
    root = args.corpus_root.resolve()
    origin = SAME_ORIGIN.get(dataset, [])
    sources: list[dict[str, Any]] = [{"folder": str(root), "exclude": CORPUS_EXCLUDE + origin}]
    sources += [
        {"npz": str(p), "splits": ["train"]}
        for p in sorted(root.rglob("*.npz"))
        if not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), o) for o in origin)
    ]
    return [f"pretrain.data={json.dumps(sources)}"]


def arm_overrides(args: argparse.Namespace, dataset: str, arm: str) -> list[str]:
    """The arm's overrides, then the user's (less those into a section the arm removes),
    then the dataset's manifest when one is given."""
    own = arms(args.ablation)[arm]
    kept = kept_overrides(own, args.overrides)
    manifest = given(args.manifest, dataset)
    extra = [f"data.manifest={Path(manifest).resolve()}"] if manifest else []
    corpus = corpus_overrides(args, dataset) if arm == "imagenet_mae_corpus" else []
    return [*own, *corpus, *kept, *extra]


def run_folder(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> Path:
    return args.work / dataset / arm / f"seed{seed}"


def one_run(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> dict[str, Any] | None:
    """Run (or resume) one arm and seed; its figures, or None when it has not finished."""
    out = run_folder(args, dataset, arm, seed)
    result = out / "result.json"
    if not result.is_file() and not args.report_only:
        sets = [f"seed={seed}", *arm_overrides(args, dataset, arm)]
        argv = recipe_argv("run", dataset, out, data_root(args, dataset), sets, args.device)
        code = run_recipe(f"{dataset} {arm} seed {seed}", argv)
        if code == 0 and (summary := summarise(out, arm, seed)) is not None:
            write_json(result, summary)
    return json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None


def summarise(out: Path, arm: str, seed: int) -> dict[str, Any] | None:
    """A finished run's figures, read from its evaluation, model card and encoder card."""
    if (done := evaluated(out)) is None:
        return None
    folder, metrics, card = done
    summary: dict[str, Any] = {
        "arm": arm, "seed": seed, "metrics": metrics,
        "val_bacc": card.val_bacc, "val_auroc": val_auroc(folder),
        "model_dir": str(folder), "best_epoch": card.best_epoch, "epochs_run": card.epochs_run,
    }  # fmt: skip
    meta = out / "pretrain" / "meta.json"
    if meta.is_file():
        enc = EncoderCard.load(meta)
        summary["pretrain"] = {
            "seconds": enc.seconds, "epochs": enc.epochs_run, "images": enc.train_images,
            "images_per_s": enc.epochs_run * enc.train_images / max(enc.seconds, 1e-9),
            "final_loss": enc.final_loss,
            "corpus": enc.corpus.model_dump() if enc.corpus else None,
        }  # fmt: skip
    return summary


def best_mae(runs: dict[str, dict[str, Any]]) -> str | None:
    """The MAE arm with the best validation macro AUROC (then balanced accuracy); the
    ``--ablation`` arms are not candidates, so every seed chooses among the same arms."""
    candidates = [
        a
        for a in runs
        if a.startswith("imagenet_mae") and not a.startswith("imagenet_mae_entropy_T")
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (runs[a]["val_auroc"] or 0.0, runs[a]["val_bacc"]))


def ensemble_run(
    args: argparse.Namespace, dataset: str, seed: int, runs: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """``imagenet`` and the best MAE model of one seed, weighted on validation, on test."""
    mae = best_mae(runs)
    if "imagenet" not in runs or mae is None:
        return None
    members = {arm: Path(runs[arm]["model_dir"]) for arm in ("imagenet", mae)}
    run = run_folder(args, dataset, "imagenet", seed)
    out = run_folder(args, dataset, "ensemble", seed)
    return ensemble(
        members, run, data_root(args, dataset), dataset, out, seed, not args.report_only
    )


# -- the paired comparison ------------------------------------------------------------------
def scores_of(run: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Row ids, labels and calibrated probabilities ``[N, K]`` of a run's test split."""
    from medtl.predictions import Predictions

    folder = Path(run["model_dir"])
    card = ModelCard.load(folder / "meta.json")
    test = Predictions.load(folder / "predictions_test.csv")
    return test.ids, test.labels, test.probs(card.calibrator), test.classes


def paired(dataset: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Test macro AUROC of ``a`` - ``b`` on the same images, and DeLong's paired test of the
    positive class against the rest (for BreastMNIST, two classes, that is the AUROC)."""
    from medtl.metrics import delong_test

    ids_a, y, pa, classes = scores_of(a)
    ids_b, y_b, pb, _ = scores_of(b)
    if ids_a != ids_b or not np.array_equal(y, y_b):
        raise ValueError(f"{dataset}: the two runs were tested on different images")

    def macro(p: np.ndarray) -> float:
        if p.shape[1] == 2:
            return float(roc_auc_score(y, p[:, 1]))
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))

    k = classes.index(POSITIVE[dataset])
    try:
        test = delong_test((y == k).astype(int), pa[:, k], pb[:, k])
    except DataError:  # under 2 positive or negative test images: no DeLong
        nan = float("nan")
        test = {"difference": nan, "ci_low": nan, "ci_high": nan, "p_value": nan}
    return {"macro_difference": macro(pa) - macro(pb), "delong": test}


# -- tables -----------------------------------------------------------------------------------
def results_section(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]], command: str
) -> str:
    names = [a for a in args.arms if a != "ensemble"] + (
        ["ensemble"] if "ensemble" in args.arms else []
    )
    lines = section_head(
        RESULTS[0],
        "## Masked pretraining continued from ImageNet (`benchmarks/pretrain_benefit.py`)",
        f"`{BACKBONE}` fine-tuned with `benchmarks/transfer.py`'s ImageNet settings from "
        f"`{SOURCE}` (arm `imagenet`) or from an encoder whose masked pretraining continued "
        "from it (the `imagenet_mae_*` arms; BUSI 128 px RGB, BreastMNIST 64 px grey, the "
        "recipes' loaders). Temperature fitted on validation; **test split** figures with 95% "
        "group-bootstrap CIs; validation macro AUROC (calibrated) and balanced accuracy beside "
        "them. The ensemble weighs the same seed's `imagenet` model and its best-on-validation "
        "MAE model on validation log-loss.",
        "| dataset | arm | seed | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | val macro AUROC | val bal. acc. | pretrain s | pretrain img/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    )
    missing = []
    for dataset in args.datasets:
        for arm in names:
            for seed in args.seeds:
                r = results.get(dataset, {}).get(seed, {}).get(arm)
                if r is None:
                    missing.append(f"{dataset} {arm} seed {seed}")
                    lines.append(f"| {dataset} | {arm} | {seed} | not run | not run | | | | |")
                    continue
                cells = [fmt_entry(r["metrics"][k]) for k in METRICS]
                if arm == "ensemble":
                    weights = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
                    cells += [f"weights: {weights}", "", "", ""]
                else:
                    pre = r.get("pretrain")
                    cells += [
                        "–" if r["val_auroc"] is None else f"{r['val_auroc']:.3f}",
                        f"{r['val_bacc']:.3f}",
                        f"{pre['seconds']:.0f}" if pre else "–",
                        f"{pre['images_per_s']:.0f}" if pre else "–",
                    ]
                lines.append(f"| {dataset} | {arm} | {seed} | {' | '.join(cells)} |")
    lines += ["", *mean_table(args, results, names), "", *paired_table(args, results)]
    lines += ["", *unit_table(args, results), "", *ablation_table(args, results)]
    lines += ["", *corpus_table(args, results)]
    lines += ["", *verdicts(args, results)]
    if missing:
        lines += ["", f"**Partial: {len(missing)} run(s) not run yet:** {'; '.join(missing)}."]
    lines += ["", f"- command: `{command}`", *machine(), RESULTS[1]]
    return "\n".join(lines)


def per_arm(
    results: dict[str, dict[int, dict[str, Any]]], dataset: str, arm: str
) -> list[dict[str, Any]]:
    return [runs[arm] for runs in results.get(dataset, {}).values() if arm in runs]


def mean_table(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]], names: list[str]
) -> list[str]:
    lines = table_head(
        "Over seeds (mean ± SD of the point estimates: the seed spread, not a CI):",
        "| dataset | arm | seeds | test macro AUROC | test balanced accuracy | val macro AUROC |",
        "|---|---|---:|---|---|---|",
    )
    for dataset in args.datasets:
        for arm in names:
            mine = per_arm(results, dataset, arm)
            cols = [
                mean_sd([r["metrics"][k]["value"] for r in mine], missing="not run")
                for k in METRICS
            ]
            cols.append(mean_sd([r.get("val_auroc") for r in mine], missing="–"))
            lines.append(f"| {dataset} | {arm} | {len(mine)} | {' | '.join(cols)} |")
    return lines


def paired_table(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]]
) -> list[str]:
    lines = table_head(
        "Entropy - random masking, paired on the same test images per seed (macro AUROC "
        "difference; DeLong's test of the malignant-vs-rest AUROC, the difference with its 95% CI "
        "and p-value):",
        "| dataset | seed | macro AUROC entropy - random | malignant AUROC difference [95% CI] | p |",
        "|---|---|---:|---|---:|",
    )
    for dataset in args.datasets:
        diffs = []
        for seed in args.seeds:
            runs = results.get(dataset, {}).get(seed, {})
            if "imagenet_mae_entropy" not in runs or "imagenet_mae_random" not in runs:
                lines.append(f"| {dataset} | {seed} | not run | not run | |")
                continue
            p = paired(dataset, runs["imagenet_mae_entropy"], runs["imagenet_mae_random"])
            d = p["delong"]
            diffs.append(p["macro_difference"])
            lines.append(
                f"| {dataset} | {seed} | {p['macro_difference']:+.3f} | {d['difference']:+.3f} "
                f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {fmt_p(d['p_value'])} |"
            )
        lines.append(f"| {dataset} | mean ± SD | {mean_sd(diffs, missing='not run')} | | |")
    return lines


def ablation_table(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]]
) -> list[str]:
    """``--ablation``: entropy masking at other temperatures and random shares beside the
    default (T 1, R 0) and random masking, each paired against random masking per seed."""
    extra = [a for a in arms(args.ablation) if a.startswith("imagenet_mae_entropy_T")]
    if not extra:
        return []
    lines = table_head(
        "Ablation of the entropy masking's temperature T and random share R (continued from "
        "ImageNet; mean ± SD over seeds; the paired difference is against random masking on "
        "the same seed's test images):",
        "| dataset | arm | T | R | seeds | test macro AUROC | val macro AUROC | paired vs random (mean ± SD) | DeLong p < 0.05 (in favour / against) |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    )
    settings = {"imagenet_mae_random": ("–", "1 (random)"), "imagenet_mae_entropy": ("1", "0")}
    for arm in extra:
        t, _, r = arm.removeprefix("imagenet_mae_entropy_T").partition("_R")
        settings[arm] = (t, r)
    for dataset in args.datasets:
        for arm, (t, r) in settings.items():
            mine = per_arm(results, dataset, arm)
            auc = mean_sd([x["metrics"]["macro_auroc"]["value"] for x in mine], missing="not run")
            val = mean_sd([x.get("val_auroc") for x in mine], missing="–")
            pairs = [
                paired(dataset, runs[arm], runs["imagenet_mae_random"])
                for runs in results.get(dataset, {}).values()
                if arm in runs and "imagenet_mae_random" in runs and arm != "imagenet_mae_random"
            ]
            diff = mean_sd([p["macro_difference"] for p in pairs], missing="–")
            sig = [p["delong"] for p in pairs if p["delong"]["p_value"] < 0.05]
            counts = (
                f"{sum(d['difference'] > 0 for d in sig)} / {sum(d['difference'] < 0 for d in sig)}"
            )
            lines.append(
                f"| {dataset} | {arm} | {t} | {r} | {len(mine)} | {auc} | {val} | {diff} | "
                f"{counts if pairs else '–'} |"
            )
    return lines


def unit_table(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]]
) -> list[str]:
    """Item 4: entropy masking at the default mask unit (the network stride, 32 px) against
    16 px, on VALIDATION only: the default is chosen from this table."""
    lines = table_head(
        "Mask unit, chosen on **validation** (mean over seeds): entropy masking at the network "
        "stride (32 px, the default) against a 16 px unit:",
        "| dataset | unit | seeds | val macro AUROC | val balanced accuracy |",
        "|---|---|---:|---|---|",
    )
    for dataset in args.datasets:
        means = {}
        for unit, arm in (("32 (default)", "imagenet_mae_entropy"), ("16", "imagenet_mae_unit16")):
            mine = per_arm(results, dataset, arm)
            aucs = [r.get("val_auroc") for r in mine]
            measured = [a for a in aucs if a is not None]  # 0.0 is a measurement
            means[unit] = statistics.fmean(measured) if measured else None
            lines.append(
                f"| {dataset} | {unit} | {len(mine)} | {mean_sd(aucs, missing='not run')} | "
                f"{mean_sd([r['val_bacc'] for r in mine], missing='not run')} |"
            )
        if all(v is not None for v in means.values()):
            better = max(means, key=lambda u: means[u] or 0.0)
            lines.append(f"| {dataset} | validation prefers | | **{better}** | |")
    return lines


def corpus_table(
    args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]]
) -> list[str]:
    """The mixed corpus of each dataset (seed 0's card): what the leakage guard left out."""
    lines = table_head(
        "Mixed corpus (`imagenet_mae_corpus`, from its encoder card): images per source and "
        "what the leakage guard left out as copies of the evaluated dataset's validation / test "
        "images:",
        "| dataset | source | found | used | exact copies | near duplicates | unreadable |",
        "|---|---|---:|---:|---:|---:|---:|",
    )
    for dataset in args.datasets:
        runs = per_arm(results, dataset, "imagenet_mae_corpus")
        corpus = (runs[0].get("pretrain") or {}).get("corpus") if runs else None
        if not corpus:
            lines.append(f"| {dataset} | not run | | | | | |")
            continue
        root = str(args.corpus_root.resolve())
        for s in corpus["sources"]:
            name = s["name"].replace(root, "<corpus root>")
            lines.append(
                f"| {dataset} | `{name}` | {s['found']} | {s['used']} | {s['excluded_exact']} | "
                f"{s['excluded_near']} | {s['unreadable']} |"
            )
    return lines


def verdicts(args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The issue's targets, judged on what finished."""
    lines = ["Targets (the issue's), judged on the runs above:", ""]
    for dataset in args.datasets:
        base = [r["metrics"]["macro_auroc"]["value"] for r in per_arm(results, dataset, "imagenet")]
        for arm in ("imagenet_mae_entropy", "imagenet_mae_corpus"):
            mine = [r["metrics"]["macro_auroc"]["value"] for r in per_arm(results, dataset, arm)]
            if not base or not mine:
                lines.append(
                    f"- {dataset} {arm} >= imagenet + 0.01 mean test macro AUROC: **not run**"
                )
                continue
            gain = statistics.fmean(mine) - statistics.fmean(base)
            verdict = "met" if gain >= 0.01 else "not met"
            lines.append(
                f"- {dataset} {arm} >= imagenet + 0.01 mean test macro AUROC: {gain:+.3f} "
                f"({len(mine)} vs {len(base)} seeds): **{verdict}**"
            )
        pairs = [
            paired(dataset, runs["imagenet_mae_entropy"], runs["imagenet_mae_random"])
            for runs in results.get(dataset, {}).values()
            if "imagenet_mae_entropy" in runs and "imagenet_mae_random" in runs
        ]
        if not pairs:
            lines.append(f"- {dataset} entropy beats random masking (paired): **not run**")
            continue
        lines.append(f"- {dataset} entropy beats random masking (paired): {beats(pairs)}")
    lines.append(
        "- the masked BN-CNN step's cost (<= 1.3x a supervised step) is measured by "
        "`benchmarks/pretrain_throughput.py` ([performance.md](performance.md)), not here"
    )
    return lines


def beats(pairs: list[dict[str, Any]]) -> str:
    """The paired verdict. Met: ahead on the mean and on most seeds, DeLong-significant in
    favour on at least one seed and against on none. Ahead on the mean without a significant
    seed is "not shown": no difference was detected, which is not a win."""
    wins = sum(p["macro_difference"] > 0 for p in pairs)
    sig = [p["delong"] for p in pairs if p["delong"]["p_value"] < 0.05]
    favour, against = sum(d["difference"] > 0 for d in sig), sum(d["difference"] < 0 for d in sig)
    mean = statistics.fmean(p["macro_difference"] for p in pairs)
    ahead = mean > 0 and wins > len(pairs) / 2
    verdict = (
        "met"
        if ahead and favour and not against
        else "not shown (ahead, but no seed significant)"
        if ahead and not against
        else "not met"
    )
    return (
        f"mean macro AUROC difference {mean:+.3f}, ahead on {wins} of {len(pairs)} seeds, DeLong "
        f"p < 0.05 in favour on {favour} and against on {against}: **{verdict}**"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """Run this process's slice (``--datasets`` x ``--seeds`` x ``--arms``), then tabulate
    every finished run of every dataset, arm and seed, so that slices run in parallel and a
    last ``--report-only`` all write the same complete tables."""
    args = parse_args(argv)
    for dataset in args.datasets:
        for seed in args.seeds:
            for arm in (a for a in args.arms if a != "ensemble"):
                one_run(args, dataset, arm, seed)
            if "ensemble" in args.arms:
                ensemble_run(args, dataset, seed, finished(args, dataset, seed))
    report = argparse.Namespace(**vars(args))
    report.datasets, report.arms = list(DATA_ROOTS), [*arms(args.ablation), "ensemble"]
    report.seeds = sorted({*args.seeds, *seeds_on_disk(args)})
    report.report_only = True
    results = {
        dataset: {seed: finished(report, dataset, seed, ensemble=True) for seed in report.seeds}
        for dataset in report.datasets
    }
    text = results_section(report, results, command_line("pretrain_benefit", argv))
    publish(args.out_results, text, RESULTS)
    return results


def finished(
    args: argparse.Namespace, dataset: str, seed: int, ensemble: bool = False
) -> dict[str, dict[str, Any]]:
    """The finished runs of one dataset and seed (read back, nothing run)."""
    quiet = argparse.Namespace(**{**vars(args), "report_only": True})
    runs = {
        arm: run
        for arm in arms(args.ablation)
        if (run := one_run(quiet, dataset, arm, seed)) is not None
    }
    if ensemble and (ens := ensemble_run(quiet, dataset, seed, runs)) is not None:
        runs["ensemble"] = ens
    return runs


def seeds_on_disk(args: argparse.Namespace) -> set[int]:
    return {
        int(p.name.removeprefix("seed"))
        for p in args.work.glob("*/*/seed*")
        if p.name.removeprefix("seed").isdigit()
    }


if __name__ == "__main__":
    main()
