"""``calibrate`` and ``evaluate``: from fine-tuned models to per-sample predictions and metrics.

``calibrate`` fits the chosen calibrator on a model's VALIDATION predictions only and stores
it in the model's ``meta.json``, where inference picks it up; it also measures every
calibrator on the test split (measuring chooses nothing). ``evaluate`` runs each model on each
manifest / split once, writes predictions per sample (manifest row id, group, label, logits)
so any figure can be recomputed, and computes the metrics with confidence intervals. A model
or dataset that fails is recorded with its message; the rest of the batch completes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medtl import __version__
from medtl.calibrate import CALIBRATORS, Calibrator, calibration_summary, fit_calibrator
from medtl.data.manifest import Manifest
from medtl.errors import DataError, MedtlError, one_line
from medtl.io import check_writable, write_json
from medtl.predictions import Predictions

log = logging.getLogger(__name__)


class CalibrateConfig(BaseModel):
    """The ``calibrate`` recipe section."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(
        "temperature",
        description="calibrator stored with the model: temperature, vector, platt, none",
    )
    compare: list[str] = Field(
        default_factory=lambda: ["temperature", "vector", "platt"],
        description="calibrators also fitted (on val) and measured (on test) for the table",
    )
    n_bins: int = Field(15, ge=2, description="bins of the equal-width ECE")

    @field_validator("method")
    @classmethod
    def _known(cls, name: str) -> str:
        return CALIBRATORS.validate(name)


class EvaluateConfig(BaseModel):
    """The ``evaluate`` recipe section."""

    model_config = ConfigDict(extra="forbid")

    splits: list[str] = Field(default_factory=lambda: ["test"], description="splits to evaluate")
    positive: str | None = Field(
        None, description="positive class for operating points (e.g. malignant)"
    )
    n_boot: int = Field(1000, ge=100, description="group-bootstrap resamples for the CIs")
    batch_size: int = Field(64, ge=1)
    ensemble: bool = Field(
        False, description="also evaluate the mean of the models' calibrated probabilities"
    )
    external: list[str] = Field(
        default_factory=list,
        description="further test sets for `medtl run`, as MANIFEST:ROOT[@NAME] (e.g. an external hospital)",
    )


class ReportConfig(BaseModel):
    """The ``report`` recipe section."""

    model_config = ConfigDict(extra="forbid")

    thumbnails: bool = Field(
        True,
        description="show thumbnails of the most confident errors (false: no images in the report)",
    )


def calibrate_model(folder: Path, cfg: CalibrateConfig) -> dict[str, Any]:
    """Fit ``cfg.method`` on ``predictions_val.csv``; store it in ``meta.json``; write
    ``calibration.json`` with every compared calibrator measured on the test split."""
    check_writable(folder)
    val = Predictions.load(folder / "predictions_val.csv")
    test_path = folder / "predictions_test.csv"
    test = Predictions.load(test_path) if test_path.is_file() else None
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([cfg.method, *cfg.compare]):
        if name == "platt" and len(val.classes) != 2:
            continue
        calibrator = fit_calibrator(name, val.logits, val.labels)
        table[name] = {
            "fitted_on": "val",
            "params": calibrator.to_dict(),
            "test": _measure(calibrator, test, cfg.n_bins) if test is not None else None,
        }
    none = fit_calibrator("none", val.logits, val.labels)
    result = {
        "method": cfg.method,
        "calibrators": table,
        "uncalibrated_test": _measure(none, test, cfg.n_bins) if test is not None else None,
    }
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    chosen = table[cfg.method]["params"]
    meta["calibrator"] = chosen
    meta["temperature"] = (
        float(chosen.get("temperature", 1.0)) if cfg.method == "temperature" else 1.0
    )
    write_json(meta_path, meta)
    write_json(folder / "calibration.json", result)
    return result


def _measure(
    calibrator: Calibrator, test: Predictions | None, n_bins: int
) -> dict[str, Any] | None:
    if test is None:
        return None
    keep = test.labels >= 0
    return calibration_summary(calibrator.probs(test.logits[keep]), test.labels[keep], n_bins)


# -- evaluate ----------------------------------------------------------------------------------
@dataclass
class DataSpec:
    """One dataset to evaluate on: a manifest, where its images are, and its name."""

    manifest: Path
    root: Path | None
    name: str

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """``MANIFEST[:ROOT][@NAME]``, e.g. ``data_manifests/busi.csv:/data/busi``."""
        text, _, name = text.partition("@")
        manifest, _, root = text.partition(":")
        return cls(Path(manifest), Path(root) if root else None, name or Path(manifest).stem)


@dataclass
class ModelSpec:
    """A fine-tuned model folder (model.safetensors + meta.json + predictions_val.csv)."""

    folder: Path
    name: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``FOLDER[@NAME]``; the name defaults to the run folder's name and strategy."""
        folder, _, name = text.partition("@")
        path = Path(folder)
        return cls(path, name or _default_name(path))


def _default_name(folder: Path) -> str:
    meta = folder / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text(encoding="utf-8"))
        run = folder.parent.name if folder.name == "finetune" else folder.name
        return f"{run}/{m.get('strategy', '?')}/seed{m.get('seed', '?')}"
    return folder.name


def safe_name(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p) for p in parts)


def evaluate(
    models: list[ModelSpec],
    datasets: list[DataSpec],
    out: Path,
    cfg: EvaluateConfig,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Every model on every dataset and split; writes ``evaluation.json`` and ``predictions/``."""
    check_writable(out)
    entries: list[dict[str, Any]] = []
    kept: dict[tuple[str, str], list[tuple[str, Predictions, float]]] = {}
    for spec, data in itertools.product(models, datasets):
        for split in cfg.splits:
            entry, pred, temperature = _evaluate_one(
                spec, data, split, out, cfg, seed, device, progress
            )
            entries.append(entry)
            if pred is not None:
                kept.setdefault((data.name, split), []).append((spec.name, pred, temperature))
    if cfg.ensemble:
        entries += [
            _ensemble_entry(key, members, out, cfg, seed)
            for key, members in kept.items()
            if len(members) > 1
        ]
    comparisons = _comparisons(kept)
    result = {
        "medtl_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "n_boot": cfg.n_boot,
        "seed": seed,
        "entries": entries,
        "comparisons": comparisons,
    }
    path = out / "evaluation.json"
    write_json(path, result)
    failed = [e for e in entries if e["status"] != "ok"]
    for e in failed:
        log.warning(
            "evaluation of %s on %s/%s failed: %s", e["model"], e["dataset"], e["split"], e["error"]
        )
    return path


def failed_entries(path: Path) -> list[str]:
    """``model on dataset/split: error`` for each failed entry of an ``evaluation.json``."""
    entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    return [
        f"{e['model']} on {e['dataset']}/{e['split']}: {e['error']}"
        for e in entries
        if e["status"] != "ok"
    ]


def _evaluate_one(
    spec: ModelSpec,
    data: DataSpec,
    split: str,
    out: Path,
    cfg: EvaluateConfig,
    seed: int,
    device: str,
    progress: bool,
) -> tuple[dict[str, Any], Predictions | None, float]:
    from medtl.metrics import evaluate_predictions

    entry: dict[str, Any] = {
        "model": spec.name,
        "model_dir": str(spec.folder),
        "dataset": data.name,
        "split": split,
        "manifest": str(data.manifest),
        "status": "failed",
        "error": None,
    }
    try:
        meta, test, val = _predict(spec, data, split, cfg, device, progress)
        temperature = float(meta.get("temperature", 1.0))
        test_file = out / "predictions" / f"{safe_name(spec.name, data.name, split)}.csv"
        test.save(test_file)
        entry.update(
            status="ok",
            predictions=str(test_file.relative_to(out)),
            val_predictions=str(spec.folder / "predictions_val.csv") if val is not None else None,
            temperature=temperature,
            calibrator=meta.get("calibrator", {"name": "none"}),
            metrics=evaluate_predictions(test, val, cfg.positive, cfg.n_boot, seed, temperature),
            model_meta=meta,
            data=_data_summary(Manifest.load(data.manifest)),
        )
        return entry, test, temperature
    except MedtlError as exc:
        entry["error"] = one_line(exc)
        return entry, None, 1.0


def _predict(
    spec: ModelSpec, data: DataSpec, split: str, cfg: EvaluateConfig, device: str, progress: bool
) -> tuple[dict[str, Any], Predictions, Predictions | None]:
    """Inference of one model on one split; the model's own validation predictions choose
    temperature and thresholds."""
    from medtl.data.dataset import DataConfig, build_dataset
    from medtl.data.manifest import check_root
    from medtl.data.verify import verify_data
    from medtl.finetune.loop import as_predictions, load_classifier, predict

    model, meta = load_classifier(spec.folder)
    manifest = Manifest.load(data.manifest)
    if list(meta["classes"]) != list(manifest.classes):
        raise DataError(
            f"model {spec.name} was trained on classes {meta['classes']}, manifest {data.manifest} "
            f"has {manifest.classes}; evaluate it on a dataset with the same classes"
        )
    if data.root is None:
        raise DataError(f"no data root for {data.manifest}: give it as MANIFEST:ROOT")
    verify_data(manifest, check_root(data.root), [split])
    loader_cfg = DataConfig(
        image_size=meta["image_size"],
        channels=meta["in_chans"],
        resize=meta.get("resize", "squash"),
    )
    dataset = build_dataset(manifest, split, data.root, loader_cfg)
    log.info("evaluating %s on %s/%s (%d images)", spec.name, data.name, split, len(dataset))  # type: ignore[arg-type]
    desc = f"{spec.name} on {data.name}/{split}" if progress else None
    test = as_predictions(
        manifest, split, *predict(model, dataset, cfg.batch_size, device, desc), spec.name
    )
    if not np.isfinite(test.logits).all():
        raise DataError(
            f"model {spec.name} produced NaN or infinite outputs on {data.name}/{split}"
        )
    val_file = spec.folder / "predictions_val.csv"
    val = Predictions.load(val_file) if val_file.is_file() else None
    return meta, test, val


def _data_summary(manifest: Manifest) -> dict[str, Any]:
    counts = manifest.counts()
    return {
        "manifest_sha256": manifest.sha256,
        "split_sizes": {s: sum(c.values()) for s, c in counts.items()},
        "class_counts": counts,
    }


def _ensemble_entry(
    key: tuple[str, str],
    members: list[tuple[str, Predictions, float]],
    out: Path,
    cfg: EvaluateConfig,
    seed: int,
) -> dict[str, Any]:
    from medtl.metrics import ensemble, evaluate_predictions

    dataset, split = key
    name = "ensemble(" + " + ".join(m[0] for m in members) + ")"
    entry: dict[str, Any] = {
        "model": name,
        "model_dir": None,
        "dataset": dataset,
        "split": split,
        "manifest": None,
        "status": "failed",
        "error": None,
    }
    try:
        pred = ensemble([m[1] for m in members], temperatures=[m[2] for m in members])
        pred.model = name
        path = out / "predictions" / f"{safe_name('ensemble', dataset, split)}.csv"
        pred.save(path)
        entry.update(
            status="ok",
            predictions=str(path.relative_to(out)),
            val_predictions=None,
            temperature=1.0,
            calibrator={"name": "members calibrated"},
            metrics=evaluate_predictions(pred, None, cfg.positive, cfg.n_boot, seed, 1.0),
            model_meta={"strategy": "ensemble", "members": [m[0] for m in members]},
        )
    except MedtlError as exc:
        entry["error"] = one_line(exc)
    return entry


def _comparisons(
    kept: dict[tuple[str, str], list[tuple[str, Predictions, float]]],
) -> list[dict[str, Any]]:
    """DeLong per class for every pair of models on the same dataset and split."""
    from medtl.metrics import delong_per_class

    out = []
    for (dataset, split), members in kept.items():
        for (name_a, a, ta), (name_b, b, tb) in itertools.combinations(members, 2):
            if a.ids != b.ids:
                continue
            keep = a.labels >= 0
            result = delong_per_class(
                a.labels[keep], a.probs(ta)[keep], b.probs(tb)[keep], a.classes
            )
            out.append(
                {
                    "dataset": dataset,
                    "split": split,
                    "model_a": name_a,
                    "model_b": name_b,
                    "delong": result,
                }
            )
    return out
