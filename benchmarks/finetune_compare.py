"""Fine-tuning strategies from ImageNet weights compared, and BioTune's two search schedules.

Each arm is a dataset's recipe (``recipes/busi.yaml``, ``recipes/breastmnist.yaml``) with
``efficientnet_lite0`` from ImageNet weights and ``benchmarks/transfer.py``'s ImageNet
fine-tuning (no pretraining stage, 20 epochs, lr 1e-3, 3 warm-up epochs, label smoothing 0.1),
run whole with ``medtl run`` (a finished stage is skipped, an interrupted one resumed):

- ``full``, ``linear``, ``surgical_first`` / ``surgical_last`` (the first / last 2 blocks
  before the head, and the head), ``autorgn``, ``lora`` (rank 4), ``lpft`` (5 epochs of linear
  probe, then every block): one run per training seed (``--seeds``);
- ``biotune_reference`` / ``biotune_halving``: ``finetune.strategy: biotune`` with the ``cpu``
  preset and the reference-faithful schedule (every candidate full length, frozen prefix
  recomputed every epoch) or medtl's (asynchronous successive halving on cached prefix
  features), one search per search seed (``--search-seeds``); the chosen genome is retrained
  with the recipe's fine-tuning and tested like any model. Size the search with ``--set
  search.population=...`` / ``search.generations`` / ``search.max_epochs`` (``search.*``
  overrides reach the BioTune arms only).

Test macro AUROC and balanced accuracy with 95% group-bootstrap CIs, from each run's
``evaluate`` stage; epoch-equivalents are FLOP-weighted (the search's unit,
``docs/finetune.md``); the searches are read through :func:`medtl.finetune.search.read_search`.
Tables go into ``docs/results.md``, compute into ``docs/performance.md``, the schedules'
best-so-far validation fitness against epoch-equivalents into ``docs/img/``.

    python benchmarks/finetune_compare.py [--datasets busi breastmnist] [--arms full ...]
        [--seeds 0 1 2] [--search-seeds 0 1] [--set search.generations=3] [--report-only]

Processes given different ``--datasets`` / ``--arms`` can run at once (each run has its own
folder under ``--work``); each writes the tables of its own slice, so finish with one
``--report-only`` over everything.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import statistics
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from recipe_runs import IMAGENET as RECIPE_IMAGENET  # benchmarks/
from recipe_runs import (  # benchmarks/
    ROOT,
    command_line,
    evaluated,
    failed,
    machine,
    recipe_argv,
    section_head,
    table_head,
)

from medtl.artifacts import ModelCard
from medtl.cli import main as medtl
from medtl.data.manifest import Manifest
from medtl.finetune.search import SearchRecord, read_search
from medtl.io import atomic_write_bytes, write_marked_section
from medtl.report.tables import fmt_entry, mean_sd

RESULTS = ("<!-- finetune_compare:start -->", "<!-- finetune_compare:end -->")
COMPUTE = ("<!-- finetune_compare_perf:start -->", "<!-- finetune_compare_perf:end -->")
FIGURE = "finetune_compare_schedules.png"
METRICS = ("macro_auroc", "balanced_accuracy")
PER_ARM = ("finetune.strategy=", "finetune.backbone_lr_scale=")  # only full / lpft take the scale
IMAGENET = [  # transfer.py's imagenet_lite0 settings (recipe_runs.IMAGENET) but what each arm sets
    *[o for o in RECIPE_IMAGENET if not o.startswith(PER_ARM)],
    "finetune.backbone=efficientnet_lite0",
    "finetune.weights=imagenet:efficientnet_lite0",
]
PINNED_SCALE = next(o for o in RECIPE_IMAGENET if o.startswith(PER_ARM[1]))
SEARCH = ["finetune.strategy=biotune", "search.preset=cpu"]
ARMS: dict[str, list[str]] = {
    "full": ["finetune.strategy=full", PINNED_SCALE],  # transfer.py's imagenet_lite0 arm
    "linear": ["finetune.strategy=linear"],
    "surgical_first": ["finetune.strategy=surgical", "finetune.strategy_options.first=2"],
    "surgical_last": ["finetune.strategy=surgical", "finetune.strategy_options.last=2"],
    "autorgn": ["finetune.strategy=autorgn"],
    "lora": ["finetune.strategy=lora", "finetune.strategy_options.rank=4"],
    "lpft": ["finetune.strategy=lpft", "finetune.strategy_options.probe_epochs=5", PINNED_SCALE],
    "biotune_reference": [*SEARCH, "search.schedule=reference"],
    "biotune_halving": [*SEARCH, "search.schedule=halving"],
}
SCHEDULES = {"biotune_reference": "reference", "biotune_halving": "halving"}
DATA_ROOTS = {"busi": "busi", "breastmnist": "medmnist"}
TARGET_RATIO = 0.25


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=list(DATA_ROOTS), choices=list(DATA_ROOTS))
    add("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    add("--search-seeds", type=int, nargs="+", default=[0, 1], help="BioTune search seeds")
    add("--data-root", action="append", default=[], help="DATASET=FOLDER (default ../shared/data)")
    add("--manifest", action="append", default=[], help="DATASET=CSV (default: the recipe's)")
    add("--work", type=Path, default=ROOT / "benchmarks/out/finetune_compare")
    add("--out-results", type=Path, default=ROOT / "docs/results.md")
    add("--out-compute", type=Path, default=ROOT / "docs/performance.md")
    add("--device", default="auto", help="passed to medtl run: auto (CUDA if present), cpu, ...")
    add("--set", dest="overrides", action="append", default=[], help="override for every arm")
    add("--report-only", action="store_true", help="run nothing: tabulate the finished runs")
    args = parser.parse_args(argv)
    for option in ("data_root", "manifest"):
        pairs = [text.partition("=") for text in getattr(args, option)]
        if bad := [a for a, eq, b in pairs if a not in DATA_ROOTS or not eq or not b]:
            flag = "--" + option.replace("_", "-")
            parser.error(f"{flag} {bad[0]!r}: use DATASET=PATH with DATASET in busi, breastmnist")
        setattr(args, option, {a: Path(b) for a, _, b in pairs})
    return args


def seeds_of(args: argparse.Namespace, arm: str) -> list[int]:
    return args.search_seeds if arm in SCHEDULES else args.seeds


def run_folder(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> Path:
    return args.work / dataset / arm / f"seed{seed}"


def overrides(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> list[str]:
    """The ImageNet start, the arm, the seed (a search's seed too), then the user's overrides
    (``search.*`` ones for the BioTune arms only; none into ``pretrain``, which the ImageNet
    start removes and a ``pretrain.epochs=1`` would bring back)."""
    searched = arm in SCHEDULES
    sets = [f"seed={seed}", *IMAGENET, *ARMS[arm], *([f"search.seed={seed}"] * searched)]
    if dataset in args.manifest:
        sets.append(f"data.manifest={args.manifest[dataset].resolve()}")
    given = [o for o in args.overrides if not o.startswith("pretrain.")]
    return [*sets, *(o for o in given if searched or not o.startswith("search."))]


def one_run(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> dict[str, Any] | None:
    """Run (or resume) one arm and seed; its test metrics, validation score, search and compute
    (``None`` until its evaluation exists)."""
    out = run_folder(args, dataset, arm, seed)
    if not args.report_only:
        root = args.data_root.get(dataset) or ROOT.parent / "shared/data" / DATA_ROOTS[dataset]
        sets = overrides(args, dataset, arm, seed)
        argv = recipe_argv("run", dataset, out, root, sets, args.device)
        try:
            code = medtl(argv)
        except Exception:  # one arm's failure (say, out of memory) must not stop the others
            traceback.print_exc()
            code = 1
        if code == 130:  # interrupted: stop the benchmark, not only this run
            raise KeyboardInterrupt
        if code != 0:
            failed(f"{dataset} {arm} seed {seed}", "run", code)
    if (done := evaluated(out)) is None:
        return None
    _, metrics, card = done
    recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    search: SearchRecord | None = None
    if arm in SCHEDULES:
        section = recipe.get("search") or {}
        search = read_search(out / "finetune", section.get("study", "biotune"),
                             section.get("storage", "sqlite:///{out}/trials.db"))  # fmt: skip
    train_ee = flop_epochs(card, manifest_of(out, recipe))
    return {
        "dataset": dataset, "arm": arm, "seed": seed, "metrics": metrics,
        "val_bacc": card.val_bacc, "search": search, "train_ee": train_ee,
        "train_s": card.seconds, "search_ee": search.epoch_equivalents if search else 0.0,
        "search_s": search.seconds if search else 0.0,
    }  # fmt: skip


def manifest_of(run: Path, recipe: dict[str, Any]) -> Manifest:
    """The manifest a run used: the one it prepared, else its resolved recipe's."""
    prepared = run / "data" / "manifest.csv"
    path = prepared if prepared.is_file() else Path(recipe["data"]["manifest"])
    return Manifest.load(path if path.is_absolute() else ROOT / path)


def flop_epochs(card: ModelCard, manifest: Manifest) -> float:
    """A fine-tuning run's FLOP-weighted epoch-equivalents, the search's unit: its passes over
    the training split at the cost of training from its first trainable block, validation
    included (no cache: a plain run recomputes every block). LoRA's backward reaches every
    block; Auto-RGN adds its gradient-norm batches at each epoch start."""
    n_train, n_val = len(manifest.split("train")), len(manifest.split("val"))
    blocks, cuts = cuts_of(card.backbone, len(card.classes), card.in_chans, card.image_size, n_train + n_val)  # fmt: skip
    plan = card.plan
    first = 0 if plan["strategy"] == "lora" else min(map(blocks.index, plan["trainable_blocks"]))
    cost = card.epoch_equivalents * cuts.epoch_cost(first, False, n_val / n_train)
    if plan["strategy"] == "autorgn":
        seen = plan["options"].get("n_batches", 3) * card.config.get("batch_size", 32)
        cost += card.epochs_run * min(n_train, seen) / n_train
    return cost


@functools.cache
def cuts_of(backbone: str, classes: int, chans: int, size: int, rows: int) -> tuple[list[str], Any]:
    """The blocks of ``backbone`` and what training from each costs (:class:`Cuts`)."""
    from medtl.finetune.blocks import blocks_of
    from medtl.finetune.prefix import Cuts
    from medtl.models import build_classifier

    model = build_classifier(backbone, classes, chans)
    blocks = blocks_of(model)
    sample = torch.rand(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    return [b.name for b in blocks], Cuts.of(model, blocks, sample, rows)


# -- the targets -------------------------------------------------------------------------------
def schedule_pairs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per search seed run by both schedules: the reference's best validation fitness ``F``, the
    epoch-equivalents each schedule had spent when it first reached ``F`` (``None``: never),
    and their ratio (target 1)."""
    found = {(r["arm"], r["seed"]): r["search"] for r in runs if r["search"] is not None}
    out = []
    for seed in sorted({s for _, s in found}):
        ref, halv = found.get(("biotune_reference", seed)), found.get(("biotune_halving", seed))
        if ref is None or halv is None:
            continue
        target = ref.best_fitness
        spent_ref, spent_halv = ref.cost_to_reach(target), halv.cost_to_reach(target)
        ratio = None if spent_halv is None or not spent_ref else spent_halv / spent_ref
        out.append({"seed": seed, "target": target, "ref": spent_ref, "halving": spent_halv,
                    "ratio": ratio, "records": (ref, halv)})  # fmt: skip
    return out


def target1(dataset: str, pairs: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    if not pairs:
        return f"- {dataset}: not measured (no search seed has both schedules finished)", False
    ratios = ["never" if p["ratio"] is None else f"{p['ratio']:.3f}" for p in pairs]
    met = all(p["ratio"] is not None and p["ratio"] <= TARGET_RATIO for p in pairs)
    seeds = ", ".join(f"search seed {p['seed']}: {x}" for p, x in zip(pairs, ratios, strict=True))
    return f"- {dataset}: {seeds}: **{'met' if met else 'not met'}**", met


def target2(dataset: str, runs: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Each schedule's retrained genome against ``full`` on mean test AUROC: ``better``,
    ``within`` (worse by at most the seed spread, the SD of ``full``'s test AUROC over its
    training seeds) or ``worse``, per schedule measured."""
    full = auroc(runs, "full")
    if len(full) < 2:
        return [f"- {dataset}: not measured (fewer than 2 finished `full` seeds)"], {}
    spread, lines, verdicts = statistics.stdev(full), [], {}
    for arm in SCHEDULES:
        if not (mine := auroc(runs, arm)):
            lines.append(f"- {dataset} {arm}: not run")
            continue
        diff = statistics.fmean(mine) - statistics.fmean(full)
        verdicts[arm] = "better" if diff > 0 else "within" if diff >= -spread else "worse"
        lines.append(
            f"- {dataset} {arm}: mean test AUROC {statistics.fmean(mine):.3f} over {len(mine)} "
            f"search seed(s) vs full {statistics.fmean(full):.3f} ± {spread:.3f} (SD, "
            f"{len(full)} seeds): {diff:+.3f}, "
            + {"better": "better", "within": "within the spread", "worse": "worse than the spread"}[verdicts[arm]]
        )  # fmt: skip
    return lines, verdicts


def target2_verdict(arm: str, verdicts: Sequence[dict[str, str]]) -> str:
    """Met: better than ``full`` on one dataset at least, worse by more than the spread on
    none, measured on every dataset."""
    got = [v[arm] for v in verdicts if arm in v]
    if len(got) < len(verdicts) or not got:
        return f"{arm}: not measured on every dataset"
    met = "better" in got and "worse" not in got
    return f"{arm}: **{'met' if met else 'not met'}**"


def auroc(runs: Sequence[dict[str, Any]], arm: str) -> list[float]:
    values = [r["metrics"]["macro_auroc"]["value"] for r in runs if r["arm"] == arm]
    return [v for v in values if v is not None]


# -- tables ------------------------------------------------------------------------------------
def results_section(args: argparse.Namespace, runs: list[dict[str, Any]], command: str) -> str:
    lines = section_head(
        RESULTS[0],
        "## Fine-tuning strategies from ImageNet, and BioTune's schedules (`benchmarks/finetune_compare.py`)",
        "Every arm is the dataset's recipe run whole with `medtl run`: `efficientnet_lite0` from "
        "ImageNet weights, fine-tuned as `benchmarks/transfer.py`'s `imagenet_lite0` arm (20 "
        "epochs, lr 1e-3, 3 warm-up epochs, label smoothing 0.1, early stopping on validation "
        "balanced accuracy); temperature fitted on validation; **test split** figures with 95% "
        "group-bootstrap CIs. Surgical: the first / last 2 blocks and the head; LoRA rank 4; "
        "LP-FT: 5 epochs of linear probe. BioTune: the `cpu` preset (budget as the command "
        "below sets it), the reference-faithful schedule or medtl's successive halving, one "
        "search per search seed, chosen on validation only; its row is the retrained genome. "
        "Epoch-equivalents: FLOP-weighted passes over the training split (for BioTune the "
        "search plus the retrain).",
        "| dataset | arm | seed | test macro AUROC [95% CI] | test balanced accuracy [95% CI] | val bal. acc. | epoch-eq. | wall s |",
        "|---|---|---|---|---|---:|---:|---:|",
    )
    done = {(r["dataset"], r["arm"], r["seed"]): r for r in runs}
    for dataset in args.datasets:
        for arm in args.arms:
            for seed in seeds_of(args, arm):
                r = done.get((dataset, arm, seed))
                if r is None:
                    lines.append(f"| {dataset} | {arm} | {seed} | not run | not run | | | |")
                    continue
                cells = [fmt_entry(r["metrics"][k]) for k in METRICS]
                lines.append(
                    f"| {dataset} | {arm} | {seed} | {' | '.join(cells)} | {r['val_bacc']:.3f} | "
                    f"{r['search_ee'] + r['train_ee']:.1f} | {r['search_s'] + r['train_s']:.0f} |"
                )
    lines += [
        "",
        *table_head(
            "Over seeds (mean ± SD of the point estimates: the seed spread, not a CI):",
            "| dataset | arm | seeds | test macro AUROC | test balanced accuracy | val bal. acc. | epoch-eq. |",
            "|---|---|---:|---|---|---|---|",
        ),
    ]
    for dataset in args.datasets:
        for arm in args.arms:
            mine = [r for r in runs if (r["dataset"], r["arm"]) == (dataset, arm)]
            cols = [
                mean_sd([r["metrics"][k]["value"] for r in mine], missing="not run")
                for k in METRICS
            ]
            cols += [mean_sd([r["val_bacc"] for r in mine], missing="")]
            cols += [mean_sd([r["search_ee"] + r["train_ee"] for r in mine], 1, missing="")]
            lines.append(f"| {dataset} | {arm} | {len(mine)} | {' | '.join(cols)} |")
    lines += schedule_lines(args, runs)
    return "\n".join([*lines, "", f"- command: `{command}`", *machine(), RESULTS[1]])


def schedule_lines(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[str]:
    """The searches side by side, the figure and the verdicts on both targets."""
    lines = [
        "",
        "BioTune searches: best validation fitness (1 − val balanced accuracy; lower is better), "
        "the epoch-equivalents each had spent when its best-so-far fitness first reached the "
        "reference schedule's best of the same search seed (stage by stage: a generation's or "
        "rung's whole cost is charged before its results count), its best-so-far fitness once it "
        "had spent 1/4, 1/2 and all of the reference's epoch-equivalents (– : nothing finished "
        "at the top rung by then), and its whole cost.",
        "",
        "| dataset | search seed | schedule | best val fitness | epoch-eq. to reach the reference's best | best so far at 1/4, 1/2, 1 x the reference's epoch-eq. | search epoch-eq. | candidates (pruned / looked up) | search s |",
        "|---|---:|---|---:|---:|---|---:|---|---:|",
    ]
    verdict1, verdict2, met1, judged = [], [], [], []
    for dataset in args.datasets:
        mine = [r for r in runs if r["dataset"] == dataset]
        pairs = schedule_pairs(mine)
        for p in pairs:
            for name, record, spent in zip(SCHEDULES.values(), p["records"], (p["ref"], p["halving"]), strict=True):  # fmt: skip
                reach = "never" if spent is None else f"{spent:.1f}"
                total = p["records"][0].epoch_equivalents
                at = [record.best_at(total * q) for q in (0.25, 0.5, 1.0)]
                anytime = ", ".join(f"{b:.4f}" if math.isfinite(b) else "–" for b in at)
                lines.append(
                    f"| {dataset} | {p['seed']} | {name} | {record.best_fitness:.4f} | {reach} | {anytime} | "
                    f"{record.epoch_equivalents:.1f} | {len(record.states)} ({record.pruned} / "
                    f"{record.looked_up}) | {record.seconds:.0f} |"
                )
        line, met = target1(dataset, pairs)
        verdict1.append(line)
        met1.append(met)
        more, verdicts = target2(dataset, mine)
        verdict2 += more
        judged.append(verdicts)
    both = len(met1) == 2 and all(met1)
    lines += [
        "",
        f"![Best-so-far validation fitness against search epoch-equivalents](img/{FIGURE})",
        "",
        f"**Target 1** (medtl's schedule reaches the reference's best validation fitness with "
        f"≤ 1/4 of the epoch-equivalents the reference spent to reach it, every search seed, "
        f"both datasets): **{'met' if both else 'not met'}**. Ratios (halving / reference):",
        *verdict1,
        "",
        "**Target 2** (the search, chosen on validation, beats `full` on mean test AUROC on "
        "at least one dataset and is never worse by more than the seed spread): "
        + "; ".join(target2_verdict(arm, judged) for arm in SCHEDULES)
        + ".",
        *verdict2,
    ]
    return lines


def plot_schedules(args: argparse.Namespace, runs: list[dict[str, Any]], path: Path) -> None:
    """Best-so-far validation fitness against epoch-equivalents, both schedules, one panel per
    dataset, one line style per search seed (a marker per stage, the last best carried to the
    panel's end); the reference's final best dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(args.datasets), 3.8), layout="constrained")
    panels = fig.subplots(1, len(args.datasets), squeeze=False)[0]
    for ax, dataset in zip(panels, args.datasets, strict=True):
        pairs = schedule_pairs([r for r in runs if r["dataset"] == dataset])
        end = max((c[0] for p in pairs for rec in p["records"] for c in rec.curve), default=1.0)
        for i, p in enumerate(pairs):
            for name, colour, record in zip(("reference", "halving"), ("#D55E00", "#0072B2"), p["records"], strict=True):  # fmt: skip
                points = [(x, y) for x, y in record.curve if math.isfinite(y)]
                if not points:  # nothing evaluated at the top rung
                    continue
                xs, ys = [x for x, _ in points], [y for _, y in points]
                style = ("-", "--", ":", "-.")[i % 4]
                ax.step([*xs, end], [*ys, ys[-1]], where="post", color=colour,
                        ls=style, label=f"{name}, search seed {p['seed']}")  # fmt: skip
                ax.plot(xs, ys, "o", color=colour, ms=3)
            ax.axhline(p["target"], color="#999999", ls=":", lw=1)
        ax.set(xlabel="search epoch-equivalents", ylabel="best val fitness so far", title=dataset)
        ax.set_xlim(left=0)
        if pairs:
            ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def compute_section(args: argparse.Namespace, runs: list[dict[str, Any]], command: str) -> str:
    lines = [
        COMPUTE[0],
        "## Fine-tuning strategies from ImageNet: compute (`benchmarks/finetune_compare.py`)",
        "",
        "FLOP-weighted epoch-equivalents (one forward and backward pass of the whole model over "
        "the training split; a frozen prefix costs its forward only, validation passes count) "
        "and seconds, mean ± SD over seeds; for BioTune the search (its trials' seconds summed) "
        "and the retrain of its genome. Test figures: [results.md](results.md).",
        "",
        "| dataset | arm | runs | search epoch-eq. | (re)train epoch-eq. | total epoch-eq. | search s | (re)train s |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for dataset in args.datasets:
        for arm in args.arms:
            mine = [r for r in runs if (r["dataset"], r["arm"]) == (dataset, arm)]
            cols = [
                mean_sd([r["search_ee"] for r in mine], 1, "not run"),
                mean_sd([r["train_ee"] for r in mine], 1, "not run"),
                mean_sd([r["search_ee"] + r["train_ee"] for r in mine], 1, "not run"),
                mean_sd([r["search_s"] for r in mine], 0, "not run"),
                mean_sd([r["train_s"] for r in mine], 0, "not run"),
            ]
            lines.append(f"| {dataset} | {arm} | {len(mine)} | {' | '.join(cols)} |")
    return "\n".join([*lines, "", f"- command: `{command}`", *machine(), COMPUTE[1]])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    runs = [  # seed by seed, so that an interrupted benchmark has every arm of the first seeds
        run
        for dataset in args.datasets
        for i in range(max(len(args.seeds), len(args.search_seeds)))
        for arm in args.arms
        if i < len(seeds_of(args, arm))
        and (run := one_run(args, dataset, arm, seeds_of(args, arm)[i])) is not None
    ]
    command = command_line("finetune_compare", argv)
    text = results_section(args, runs, command)
    print(text)
    plot_schedules(args, runs, args.out_results.parent / "img" / FIGURE)
    write_marked_section(args.out_results, text, *RESULTS, "Results")
    write_marked_section(args.out_compute, compute_section(args, runs, command), *COMPUTE, "Performance")  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
