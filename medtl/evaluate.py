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
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medtl import __version__
from medtl.artifacts import ModelCard, check_entry
from medtl.calibrate import (
    CALIBRATORS,
    Calibrator,
    NoCalibration,
    calibration_summary,
    fit_calibrator,
)
from medtl.conformal import CONFORMAL_FILE, ConformalConfig, fit_conformal
from medtl.data.leaks import SplitLeaks, find_test_leaks, read_audit_clusters
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError, DataError, MedtlError, one_line
from medtl.io import check_writable
from medtl.predictions import Predictions
from medtl.results import (
    CALIBRATION_FILE,
    EVALUATION_FILE,
    CalibrationRecord,
    EvaluationResults,
    save_checked,
)

if TYPE_CHECKING:
    from medtl.ensemble import EnsembleCard

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
    conformal: ConformalConfig = Field(
        default_factory=ConformalConfig,
        description="split-conformal prediction sets fitted on validation (conformal.json)",
    )

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
    site_split: str | None = Field(
        None,
        description="a labelled split of each evaluated dataset (e.g. an external site's 'val') "
        "on which the operating thresholds are chosen again, reported beside the model's own "
        "validation thresholds; never the split being evaluated",
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
    rank_by: Literal["clean", "official"] = Field(
        "clean",
        description="test set the leaderboard ranks by where an official split leaks: clean "
        "(official test images without a duplicate or group in train / val) or official",
    )


def calibrate_model(folder: Path, cfg: CalibrateConfig) -> CalibrationRecord:
    """Fit ``cfg.method`` on ``predictions_val.csv``; store it, with the operating thresholds it
    gives on validation, in the model card (``meta.json``); fit the conformal prediction sets
    (``calibrate.conformal``) on the same calibrated validation probabilities
    (``conformal.json``); write ``calibration.json`` with every compared calibrator measured
    on the test split."""
    meta_path = folder / "meta.json"
    card = ModelCard.load(meta_path)  # a broken card stops here, before anything is fitted
    check_writable(folder)
    val = Predictions.load(folder / "predictions_val.csv")
    test_path = folder / "predictions_test.csv"
    test = Predictions.load(test_path) if test_path.is_file() else None
    table: dict[str, dict[str, Any]] = {}
    fitted: dict[str, Calibrator] = {}
    for name in dict.fromkeys([cfg.method, *cfg.compare]):
        if name == "platt" and len(val.classes) != 2:
            continue
        fitted[name] = calibrator = fit_calibrator(name, val.logits, val.labels)
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
    card.calibrator = fitted[cfg.method]
    card.thresholds = validation_thresholds(val, card.calibrator)
    card.save(meta_path)
    conformal = fit_conformal(val, card.calibrator, cfg.conformal)
    conformal.save(folder / CONFORMAL_FILE)
    result["conformal"] = conformal.model_dump(mode="json")
    return save_checked(CalibrationRecord, result, folder / CALIBRATION_FILE)


def validation_thresholds(
    val: Predictions, calibrator: Calibrator
) -> dict[str, dict[str, float | None]]:
    """Operating thresholds chosen on the calibrated VALIDATION probabilities for every class
    taken as the positive one (one-vs-rest; which class is positive is the evaluation's choice);
    a class validation cannot choose for (absent or alone) is left out."""
    from medtl.metrics import choose_thresholds

    probs, out = val.probs(calibrator), {}
    for c in range(len(val.classes)):
        try:
            out[val.classes[c]] = choose_thresholds(probs, val.labels, c)
        except DataError as exc:
            log.info("no thresholds for %s: %s", val.classes[c], exc)
    return out


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
    leaks: str = "keep"  # data.leaks: keep | drop (resplit is a manifest made before)

    def __post_init__(self) -> None:
        if self.leaks not in ("keep", "drop", "resplit"):
            raise ConfigError(f"leaks policy {self.leaks!r} is not keep, drop or resplit")

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
        card = ModelCard.load(meta)
        run = folder.parent.name if folder.name == "finetune" else folder.name
        return f"{run}/{card.strategy}/seed{card.seed}"
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
    chosen: EnsembleCard | None = None,
) -> Path:
    """Every model on every dataset and split; writes ``evaluation.json`` and ``predictions/``.

    ``chosen``: an ensemble chosen on validation (:mod:`medtl.ensemble`) whose members are
    among ``models`` (by name); it is evaluated as one more entry per dataset and split."""
    if cfg.site_split is not None and cfg.site_split in cfg.splits:
        raise ConfigError(
            f"site split '{cfg.site_split}' is also evaluated: thresholds chosen on a split are "
            "never tested on it; evaluate the site's test split and choose on its calibration split"
        )
    check_writable(out)
    entries: list[dict[str, Any]] = []
    kept: dict[tuple[str, str], list[tuple[str, Predictions, Calibrator]]] = {}
    specs = {data.name: data for data in datasets}
    job = _Job(out, cfg, seed, device, progress)
    for spec, data in itertools.product(models, datasets):
        for split in cfg.splits:
            entry, pred, calibrator = _evaluate_one(spec, data, split, job)
            entries.append(entry)
            if pred is not None:
                kept.setdefault((data.name, split), []).append((spec.name, pred, calibrator))
    if cfg.ensemble:
        entries += [
            _ensemble_entry(key, members, job, specs[key[0]])
            for key, members in kept.items()
            if len(members) > 1
        ]
    if chosen is not None:
        entries += [
            _chosen_entry(chosen, key, members, job, specs[key[0]]) for key, members in kept.items()
        ]
    path = out / EVALUATION_FILE
    _save_evaluation(path, entries, _comparisons(kept), cfg, seed)
    return path


def _save_evaluation(
    path: Path,
    entries: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    cfg: EvaluateConfig,
    seed: int,
) -> None:
    """Write ``evaluation.json`` (checked as :class:`~medtl.results.EvaluationResults`) and warn
    of each failed entry."""
    entries = [check_entry(e) for e in entries]  # typed: EvaluationEntry
    result = {
        "medtl_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "n_boot": cfg.n_boot,
        "seed": seed,
        "entries": entries,
        "comparisons": comparisons,
    }
    save_checked(EvaluationResults, result, path)
    for e in entries:
        if e["status"] != "ok":
            log.warning(
                "evaluation of %s on %s/%s failed: %s",
                e["model"], e["dataset"], e["split"], e["error"],
            )  # fmt: skip


def failed_entries(path: Path) -> list[str]:
    """``model on dataset/split: error`` for each failed entry of an ``evaluation.json``."""
    return EvaluationResults.load(path).failures()


@dataclass(frozen=True)
class _Job:
    """What every entry of one :func:`evaluate` call shares."""

    out: Path
    cfg: EvaluateConfig
    seed: int
    device: str
    progress: bool


def _failed_entry(
    model: str, model_dir: str | None, dataset: str, split: str, manifest: str | None
) -> dict[str, Any]:
    """An entry's identity, marked failed until its figures are in."""
    return {
        "model": model,
        "model_dir": model_dir,
        "dataset": dataset,
        "split": split,
        "manifest": manifest,
        "status": "failed",
        "error": None,
    }


def _evaluate_one(
    spec: ModelSpec, data: DataSpec, split: str, job: _Job
) -> tuple[dict[str, Any], Predictions | None, Calibrator]:
    entry = _failed_entry(spec.name, str(spec.folder), data.name, split, str(data.manifest))
    try:
        fields, test, calibrator = _ok_fields(spec, data, split, job)
    except MedtlError as exc:
        entry["error"] = one_line(exc)
        return entry, None, NoCalibration()
    entry.update(status="ok", **fields)
    return entry, test, calibrator


def _ok_fields(
    spec: ModelSpec, data: DataSpec, split: str, job: _Job
) -> tuple[dict[str, Any], Predictions, Calibrator]:
    """The fields of an ok entry, its (calibrated) test predictions and the calibrator."""
    from medtl.clean_test import evaluate_with_leaks

    out, cfg, device = job.out, job.cfg, job.device
    manifest = Manifest.load(data.manifest)  # once: inference, leaks, subgroups, summary
    card, test, val = _predict(spec, data, split, cfg, device, job.progress, manifest)
    calibrator = card.calibrator
    leaking = _test_leaks(data, manifest, split)
    test, metrics, leaks = evaluate_with_leaks(
        test, val, leaking, data.leaks, cfg.positive, cfg.n_boot, job.seed, calibrator
    )
    metrics.update(_subgroups(manifest, test, calibrator, job))
    test_file = out / "predictions" / f"{safe_name(spec.name, data.name, split)}.csv"
    test.save(test_file)
    fields: dict[str, Any] = {
        "predictions": str(test_file.relative_to(out)),
        "val_predictions": str(spec.folder / "predictions_val.csv") if val is not None else None,
        "temperature": card.temperature,
        "calibrator": calibrator.to_dict(),
        "metrics": metrics,
        "model_meta": card.model_dump(mode="json"),
        "data": _data_summary(manifest),
    }
    if leaks is not None:
        fields["leaks"] = leaks
    if cfg.site_split is not None:
        fields["site_thresholds"] = _site_thresholds(spec, data, split, test, card, cfg, device)
    conformal = _conformal(spec.folder, test, calibrator)
    if conformal is not None:
        fields["conformal"] = conformal
    return fields, test, calibrator


def _subgroups(
    manifest: Manifest, test: Predictions, calibrator: Calibrator, job: _Job
) -> dict[str, Any]:
    """``{"subgroups": ...}`` when the manifest has subgroup columns, else ``{}``."""
    from medtl.subgroups import entry_subgroups

    probs = test.probs(calibrator)
    groups = entry_subgroups(manifest, test, probs, job.cfg.n_boot, job.seed)
    return {"subgroups": groups} if groups is not None else {}


def _predict(
    spec: ModelSpec,
    data: DataSpec,
    split: str,
    cfg: EvaluateConfig,
    device: str,
    progress: bool,
    manifest: Manifest | None = None,
) -> tuple[ModelCard, Predictions, Predictions | None]:
    """Inference of one model on one split (``manifest``: ``data``'s, when already loaded); the
    model's own validation predictions choose the thresholds, with its card's calibrator."""
    from medtl.data.dataset import DataConfig, build_dataset
    from medtl.data.manifest import check_root
    from medtl.data.verify import verify_data
    from medtl.finetune.loop import as_predictions, load_classifier, predict

    model, card = load_classifier(spec.folder)
    manifest = manifest if manifest is not None else Manifest.load(data.manifest)
    if list(card.classes) != list(manifest.classes):
        raise DataError(
            f"model {spec.name} was trained on classes {card.classes}, manifest {data.manifest} "
            f"has {manifest.classes}; evaluate it on a dataset with the same classes"
        )
    if data.root is None:
        raise DataError(f"no data root for {data.manifest}: give it as MANIFEST:ROOT")
    verify_data(manifest, check_root(data.root), [split])
    loader_cfg = DataConfig(
        image_size=card.image_size,
        channels=card.in_chans,
        resize=card.resize,
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
    return card, test, val


def _site_thresholds(
    spec: ModelSpec,
    data: DataSpec,
    split: str,
    test: Predictions,
    card: ModelCard,
    cfg: EvaluateConfig,
    device: str,
) -> dict[str, Any]:
    """Operating thresholds chosen again on the labelled ``cfg.site_split`` of this dataset
    (a new site's calibration part, with the model's calibrator) and applied to ``split``."""
    from medtl.metrics import apply_threshold, choose_thresholds, positive_indices

    site = str(cfg.site_split)
    if site == split:
        raise ConfigError(
            f"site_split '{site}' is the split being evaluated: thresholds chosen on it would be "
            "tested on the same images; give the site's calibration split (e.g. val)"
        )
    _, calib, _ = _predict(spec, data, site, cfg, device, progress=False)
    keep = test.labels >= 0
    probs, labels = test.probs(card.calibrator)[keep], test.labels[keep]
    out: dict[str, Any] = {}
    for c in positive_indices(cfg.positive, test.classes):
        name = test.classes[c]
        try:
            chosen = choose_thresholds(calib.probs(card.calibrator), calib.labels, c)
        except DataError as exc:
            out[name] = {"chosen_on": f"{data.name}/{site}", "error": str(exc)}
            continue
        out[name] = {
            "chosen_on": f"{data.name}/{site}",
            "n_chosen_on": int((calib.labels >= 0).sum()),
            "thresholds": chosen,
            "test": {k: apply_threshold(probs, labels, c, t) for k, t in chosen.items()},
        }
    return out


def _conformal(folder: Path, test: Predictions, calibrator: Calibrator) -> dict[str, Any] | None:
    """The model's conformal sets (fitted on its validation split) measured on ``test``; None
    when the model has no ``conformal.json`` (calibrated before conformal sets existed) or the
    split is unlabelled."""
    from medtl.conformal import ConformalCard, conformal_summary

    path = folder / CONFORMAL_FILE
    if not path.is_file() or not (test.labels >= 0).any():
        return None
    card = ConformalCard.load(path)
    card.check_calibrator(calibrator, path)
    return conformal_summary(test, calibrator, card)


def _test_leaks(data: DataSpec, manifest: Manifest, split: str) -> SplitLeaks | None:
    """The official test images that leak (share a duplicate cluster or group with train /
    val), from ``manifest``'s groups (``data``'s) and the audit beside it; None for other
    splits."""
    if split != "test":
        return None
    return find_test_leaks(manifest, read_audit_clusters(data.manifest))


def _data_summary(manifest: Manifest) -> dict[str, Any]:
    counts = manifest.counts()
    return {
        "manifest_sha256": manifest.sha256,
        "split_sizes": {s: sum(c.values()) for s, c in counts.items()},
        "class_counts": counts,
    }


def _ensemble_entry(
    key: tuple[str, str],
    members: list[tuple[str, Predictions, Calibrator]],
    job: _Job,
    data: DataSpec,
    weights: list[float] | None = None,
    name: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from medtl.clean_test import evaluate_with_leaks
    from medtl.metrics import ensemble

    dataset, split = key
    out, cfg = job.out, job.cfg
    name = name or "ensemble(" + " + ".join(m[0] for m in members) + ")"
    entry = _failed_entry(name, None, dataset, split, None)
    try:
        pred = ensemble([m[1] for m in members], [m[2] for m in members], weights)
        pred.model = name
        pred, metrics, leaks = evaluate_with_leaks(
            pred,
            None,
            _test_leaks(data, Manifest.load(data.manifest), split),
            data.leaks,
            cfg.positive,
            cfg.n_boot,
            job.seed,
            NoCalibration(),
        )
        stem = "ensemble" if weights is None else "ensemble_chosen"
        path = out / "predictions" / f"{safe_name(stem, dataset, split)}.csv"
        pred.save(path)
        entry.update(
            status="ok",
            predictions=str(path.relative_to(out)),
            val_predictions=None,
            temperature=1.0,
            calibrator={"name": "members calibrated"},
            metrics=metrics,
            model_meta=meta or {"strategy": "ensemble", "members": [m[0] for m in members]},
        )
        if leaks is not None:
            entry["leaks"] = leaks
    except MedtlError as exc:
        entry["error"] = one_line(exc)
    return entry


def _chosen_entry(
    card: EnsembleCard,
    key: tuple[str, str],
    evaluated: list[tuple[str, Predictions, Calibrator]],
    job: _Job,
    data: DataSpec,
) -> dict[str, Any]:
    """The ensemble of ``card`` on one dataset / split: its members with a weight, their
    calibrators as evaluated (the cards' own), weighted as the card says."""
    by_name = {m[0]: m for m in evaluated}
    kept = [m for m in card.members if m.weight > 0]
    missing = [m.name for m in kept if m.name not in by_name]
    if missing:
        entry = _ensemble_entry(key, [], job, data, name=card.label)
        entry["error"] = f"ensemble members {missing} were not evaluated on {key[0]}/{key[1]}"
        return entry
    meta = {
        "strategy": "ensemble",
        "members": [m.name for m in kept],
        "weights": [m.weight for m in kept],
        "select": card.select,
        "chosen_on": card.chosen_on,
        "val_log_loss": card.val_log_loss,
    }
    members = [by_name[m.name] for m in kept]
    return _ensemble_entry(key, members, job, data, [m.weight for m in kept], card.label, meta)


def _comparisons(
    kept: dict[tuple[str, str], list[tuple[str, Predictions, Calibrator]]],
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
