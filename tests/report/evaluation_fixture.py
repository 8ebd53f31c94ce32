"""Build an evaluation folder in the exact layout ``medtl evaluate`` writes.

Two models on a 3-class task, one on a 2-class task, one failed entry and a DeLong
comparison; predictions are synthetic logits from a seeded RNG, saved as real
:class:`Predictions` files; the manifests point at tiny PNG images under a data root, so the
report can draw thumbnails; metrics come from the real :func:`evaluate_predictions`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medtl import __version__, calibrate
from medtl.data.manifest import Manifest, ManifestMeta, Row, row_id
from medtl.io import write_json
from medtl.metrics import delong_per_class, evaluate_predictions
from medtl.predictions import Predictions

CLASSES3 = ["benign", "malignant", "normal"]
CLASSES2 = ["negative", "positive"]
SIZES = {"train": 12, "val": 30, "test": 36}
N_BOOT = 200


@dataclass
class EvaluationFolder:
    """Paths of a built fixture and the objects behind them."""

    evaluation_dir: Path
    data_root: Path
    manifests: dict[str, Manifest]
    manifest_paths: dict[str, Path]
    predictions: dict[tuple[str, str], Predictions] = field(default_factory=dict)
    temperatures: dict[tuple[str, str], float] = field(default_factory=dict)

    def evaluation(self) -> dict[str, Any]:
        return json.loads((self.evaluation_dir / "evaluation.json").read_text())


def write_image(path: Path, label: int, seed: int) -> Path:
    """A 32 x 24 grey PNG whose brightness pattern depends on the label."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 120, size=(24, 32)).astype(np.uint8)
    arr[:, 8 * label : 8 * label + 8] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def make_manifest(root: Path, out: Path, name: str, classes: list[str]) -> Manifest:
    """A seeded-split manifest of tiny PNGs under ``root/name``; saved to ``out/name.csv``."""
    rows = []
    for split, n in SIZES.items():
        for i in range(n):
            rel = f"{name}/{split}/{i:03d}.png"
            file = write_image(root / rel, i % len(classes), seed=zlib.crc32(rel.encode()))
            sha = hashlib.sha256(file.read_bytes()).hexdigest()
            label, group = classes[i % len(classes)], f"{split}-p{i // 2}"
            rows.append(Row(row_id(rel), rel, label, split, group, sha, 32, 24))
    meta = ManifestMeta("folder", classes, 0, {"train": 0.6, "val": 0.2, "test": 0.2}, "seeded")
    manifest = Manifest(rows, meta)
    manifest.save(out / f"{name}.csv")
    return manifest


def make_predictions(
    manifest: Manifest, split: str, model: str, skill: float, seed: int
) -> Predictions:
    """Synthetic logits: noise plus ``skill`` on the true class (seeded)."""
    rows = manifest.split(split)
    labels = np.array([manifest.label_index(r.label) for r in rows])
    rng = np.random.default_rng(seed)
    k = len(manifest.classes)
    logits = rng.normal(0.0, 1.0, size=(len(rows), k)) + skill * np.eye(k)[labels]
    return Predictions(
        [r.id for r in rows],
        [r.group for r in rows],
        labels,
        2.0 * logits,  # over-confident on purpose, so temperature scaling has work to do
        list(manifest.classes),
        split,
        model,
        manifest.sha256,
    )


def model_entry(
    folder: EvaluationFolder, dataset: str, model: str, skill: float, seed: int
) -> dict[str, Any]:
    """One ok entry: prediction files saved, temperature fitted on val, metrics computed."""
    manifest = folder.manifests[dataset]
    slug = model.replace("/", "-")
    files = {}
    preds = {}
    for offset, split in enumerate(("val", "test")):
        pred = make_predictions(manifest, split, model, skill, seed + offset)
        rel = f"predictions/{slug}__{dataset}__{split}.csv"
        pred.save(folder.evaluation_dir / rel)
        files[split], preds[split] = rel, pred
    folder.predictions[(model, dataset)] = preds["test"]
    t = calibrate.fit_calibrator("temperature", preds["val"].logits, preds["val"].labels)
    temperature = float(t.temperature)  # type: ignore[attr-defined]
    folder.temperatures[(model, dataset)] = temperature
    metrics = evaluate_predictions(preds["test"], preds["val"], None, N_BOOT, 0, temperature)
    return {
        **entry_head(folder, dataset, model),
        "status": "ok",
        "error": None,
        "predictions": files["test"],
        "val_predictions": files["val"],
        "temperature": temperature,
        "calibrator": {"name": "temperature", "temperature": temperature},
        "metrics": metrics,
        "model_meta": model_meta(manifest, model, seed),
        "data": data_block(manifest),
    }


def entry_head(folder: EvaluationFolder, dataset: str, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "model_dir": f"runs/{model.replace('/', '-')}/finetune",
        "dataset": dataset,
        "split": "test",
        "manifest": str(folder.manifest_paths[dataset]),
    }


def model_meta(manifest: Manifest, model: str, seed: int) -> dict[str, Any]:
    backbone, strategy, _ = model.split("/")
    return {
        "backbone": "convnext_atto",
        "strategy": strategy,
        "classes": list(manifest.classes),
        "seed": seed,
        "recipe": {"name": backbone, "seed": seed},
        "manifest_sha256": manifest.sha256,
        "epochs_run": 12,
        "best_epoch": 9,
        "val_bacc": 0.8,
        "epoch_equivalents": 11.5,
        "seconds": 754.2,
        "medtl_version": __version__,
        "plan": {"strategy": strategy, "trainable_fraction": 1.0 if strategy == "full" else 0.02},
    }


def data_block(manifest: Manifest) -> dict[str, Any]:
    counts = manifest.counts()
    return {
        "manifest_sha256": manifest.sha256,
        "split_sizes": {s: sum(c.values()) for s, c in counts.items()},
        "class_counts": counts,
    }


def failed_entry(folder: EvaluationFolder, dataset: str, model: str) -> dict[str, Any]:
    """A failed entry whose message names a file under the data root (must be redacted)."""
    where = folder.data_root / dataset / "test" / "000.png"
    return {
        **entry_head(folder, dataset, model),
        "status": "failed",
        "error": f"predictions have 2 classes, the manifest 3 (first image {where})",
    }


def comparison(folder: EvaluationFolder, dataset: str, a: str, b: str) -> dict[str, Any]:
    """DeLong per class on the calibrated probabilities, as the per-class AUROCs use."""
    pa, pb = folder.predictions[(a, dataset)], folder.predictions[(b, dataset)]
    ta, tb = folder.temperatures[(a, dataset)], folder.temperatures[(b, dataset)]
    return {
        "dataset": dataset,
        "split": "test",
        "model_a": a,
        "model_b": b,
        "delong": delong_per_class(pa.labels, pa.probs(ta), pb.probs(tb), pa.classes),
    }


def write_evaluation(folder: EvaluationFolder, entries: list[Any], comparisons: list[Any]) -> Path:
    path = folder.evaluation_dir / "evaluation.json"
    write_json(
        path,
        {
            "medtl_version": __version__,
            "created": "2026-11-21T23:30:00Z",
            "n_boot": N_BOOT,
            "seed": 0,
            "entries": entries,
            "comparisons": comparisons,
        },
    )
    return path


def build_evaluation_folder(base: Path) -> EvaluationFolder:
    """The standard fixture: 2 models on ``toy3``, 1 on ``toy2``, 1 failed, 1 comparison."""
    data_root, manifest_dir = base / "images", base / "data_manifests"
    manifests = {
        "toy3": make_manifest(data_root, manifest_dir, "toy3", CLASSES3),
        "toy2": make_manifest(data_root, manifest_dir, "toy2", CLASSES2),
    }
    paths = {name: manifest_dir / f"{name}.csv" for name in manifests}
    folder = EvaluationFolder(base / "evaluation", data_root, manifests, paths)
    entries = [
        model_entry(folder, "toy3", "toy3/full/seed0", skill=1.6, seed=1),
        model_entry(folder, "toy3", "toy3/linear/seed0", skill=0.9, seed=2),
        model_entry(folder, "toy2", "toy2/full/seed0", skill=1.3, seed=3),
        failed_entry(folder, "toy3", "toy3/broken/seed0"),
    ]
    comparisons = [comparison(folder, "toy3", "toy3/full/seed0", "toy3/linear/seed0")]
    write_evaluation(folder, entries, comparisons)
    return folder
