"""What the recipe benchmarks share: one arm run through ``medtl``, its finished figures read
back, the ensemble of two finished runs, and the opening and footer of their Markdown sections.

``benchmarks/transfer.py``, ``pretrain_benefit.py``, ``finetune_compare.py`` and
``pretrained_defaults.py`` import it from their own folder (``python benchmarks/<name>.py``
puts that folder on the path), so that each runs its arms and writes its sections the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from medtl.artifacts import ModelCard, file_sha256
from medtl.cli import main as medtl
from medtl.io import atomic_write_text, write_marked_section
from medtl.results import EvaluationResults
from medtl.runs import run_manifest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/transfer.py's ImageNet fine-tuning; pretrain_benefit.py fine-tunes every arm so,
# that both benchmarks' ImageNet figures come from the same fine-tuning
IMAGENET = [
    "pretrain=",
    "finetune.strategy=full",
    "finetune.epochs=20",
    "finetune.lr=0.001",
    "finetune.warmup_epochs=3",
    "finetune.label_smoothing=0.1",
    "finetune.backbone_lr_scale=1.0",  # pinned: the figures do not move with the start's defaults
    "finetune.augment=light",  # pinned as measured (the pretrained default became medium later)
]


# the recipes' sections as written (MAE from random weights), which every arm overrides
BASE_PRESET = "preset=mae_scratch"


def given(pairs: Sequence[str], dataset: str) -> str | None:
    """The value of ``DATASET=VALUE`` for ``dataset`` among ``pairs`` (``--data-root`` ...)."""
    return dict(text.partition("=")[::2] for text in pairs).get(dataset) or None


def data_root(pairs: Sequence[str], dataset: str, folder: str) -> Path:
    """``--data-root DATASET=FOLDER`` for ``dataset``, else ``../shared/data/<folder>``."""
    return Path(given(pairs, dataset) or ROOT.parent / "shared/data" / folder)


def recipe_argv(
    command: str,
    dataset: str,
    out: Path,
    root: Path,
    sets: Sequence[str],
    device: str | None = None,
) -> list[str]:
    """``medtl -q <command> recipes/<dataset>.yaml --out OUT --data-root ROOT [--device D]
    --set preset=mae_scratch --set ...``: one arm of a recipe benchmark.

    Arms are written as overrides of the recipe's sections as written (its ``mae_scratch``
    preset: MAE from random weights), not of its default preset, so an arm's settings are the
    sections and its overrides whatever start the recipe's CPU preset takes."""
    argv = ["-q", command, str(ROOT / "recipes" / f"{dataset}.yaml"), "--out", str(out)]
    argv += ["--data-root", str(root), *(["--device", device] if device else [])]
    return [*argv, *[x for o in [BASE_PRESET, *sets] for x in ("--set", o)]]


def failed(label: str, command: str, code: int) -> None:
    print(f"{label}: medtl {command} exited with {code}", file=sys.stderr)


def run_recipe(label: str, argv: list[str]) -> int:
    """``medtl`` on ``argv`` (:func:`recipe_argv`); its exit code, reported on stderr when not 0."""
    code = medtl(argv)
    if code != 0:
        failed(label, argv[1], code)
    return code


def evaluated(out: Path) -> tuple[Path, dict[str, Any], ModelCard] | None:
    """A finished run's model folder, the overall test metrics its ``evaluate`` stage measured
    for that model, and its model card; ``None`` until the evaluation exists."""
    from medtl.pipeline import model_dir

    evaluation = out / "evaluate" / "evaluation.json"
    if not evaluation.is_file():
        return None
    folder = model_dir(out)
    entry = next(
        (e for e in EvaluationResults.load(evaluation).entries
         if e.status == "ok" and Path(e.model_dir or "").resolve() == folder.resolve()),
        None,
    )  # fmt: skip
    if entry is None:  # the evaluation failed (its error is in the run's log): not finished
        return None
    return folder, (entry.metrics or {})["overall"], ModelCard.load(folder / "meta.json")


def kept_overrides(own: Sequence[str], given: Sequence[str]) -> list[str]:
    """``given`` less the overrides into a section that ``own`` removes (``pretrain=``): a
    user's ``pretrain.epochs=1`` would bring back the pretraining an arm dropped."""
    removed = [o.removesuffix("=") for o in own if o.endswith("=") and "." not in o]
    return [o for o in given if not any(o.startswith(f"{r}.") for r in removed)]


def stage_seconds(out: Path) -> dict[str, float]:
    """Wall seconds of the run's ``pretrain`` and ``finetune`` stages as their ``DONE`` files
    recorded them (0 for a stage the run did not have)."""
    seconds = {}
    for stage in ("pretrain", "finetune"):
        done = out / stage / "DONE"
        record = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {}
        seconds[stage] = float(record.get("seconds") or 0)
    return seconds


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


def evaluate_section(run: Path) -> dict[str, Any]:
    """The run's resolved ``evaluate`` section without external sets (the ensemble is
    measured on the run's own test split)."""
    import yaml

    resolved = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    return {**(resolved.get("evaluate") or {}), "external": [], "ensemble": False}


def ensemble(
    members: dict[str, Path],
    run: Path,
    root: Path,
    dataset: str,
    out: Path,
    seed: int,
    build: bool,
) -> dict[str, Any] | None:
    """The ensemble of finished models (name -> model folder), weighted on VALIDATION only
    (``medtl.ensemble``) and evaluated on the test split of ``run`` (its manifest and
    ``evaluate`` section) into ``out``: its overall test metrics, the members' weights and
    its validation log-loss. ``build``: choose and evaluate it unless ``out`` holds the
    evaluation of these very members (their cards' hashes in ``MEMBERS``); else only read it
    back. ``None`` when there is none of these members."""
    from medtl.ensemble import EnsembleConfig, choose_ensemble
    from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec
    from medtl.pipeline import EvaluateStage

    specs = [ModelSpec(folder, name) for name, folder in members.items()]
    stamp = out / "MEMBERS"  # the member cards the saved evaluation combined
    key = " ".join(file_sha256(m.folder / "meta.json") for m in specs)
    evaluation = out / "evaluation.json"

    def current() -> bool:
        return evaluation.is_file() and stamp.is_file() and stamp.read_text().strip() == key

    if build and not current():
        card = choose_ensemble(EnsembleConfig(members=list(members)), specs)
        out.mkdir(parents=True, exist_ok=True)
        card.save(out / "ensemble.json")
        data = DataSpec(run_manifest(run, ROOT), root, dataset)
        cfg = EvaluateConfig.model_validate(evaluate_section(run))
        EvaluateStage(cfg).evaluate(specs, [data], out, seed=seed, progress=False, chosen=card)
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
    }  # fmt: skip


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<script>.py ARGS``: how the tables were made (``argv``: the
    arguments ``main`` was given, ``None`` for the command line's)."""
    return " ".join([f"python benchmarks/{script}.py", *(sys.argv[1:] if argv is None else argv)])


def publish(path: Path, text: str, markers: Sequence[str], title: str = "Results") -> None:
    """Print a benchmark's Markdown section and put it between its ``markers`` in ``path``."""
    print(text)
    write_marked_section(path, text, markers[0], markers[1], title)


def table_head(caption: str, header: str, align: str) -> list[str]:
    """The opening of a Markdown table: ``caption``, a blank line, the header row and the
    alignment row."""
    return [caption, "", header, align]


def section_head(marker: str, heading: str, intro: str, header: str, align: str) -> list[str]:
    """The opening of a benchmark's Markdown section: its start ``marker``, ``heading``, a blank
    line, then its first table's head with the ``intro`` paragraph as caption."""
    return [marker, heading, "", *table_head(intro, header, align)]


def machine(note: str = "", device_first: bool = False) -> list[str]:
    """The footer's date and machine line (the CUDA device first with ``device_first``), then
    ``note`` as a line of its own when given."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    date = f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
    cpus = f"{os.cpu_count()} CPUs ({platform.machine()})"
    if device_first:
        line = f"{date}{gpu or 'CPU'}, {cpus}, torch {torch.__version__}"
    else:
        line = f"{date}{cpus}, {gpu or 'no GPU'}, torch {torch.__version__}"
    return [line, *([f"- {note}"] if note else [])]
