"""A model from prepare to what a clinic gets: report with explanations, model card, ONNX, bundle.

Prepares ROOT with ADAPTER, fine-tunes from random initialisation (no pretrained weights are
needed), calibrates on validation, evaluates on test, writes the report with Grad-CAM and
occlusion panels (``--explain``) and exports the model with its evaluation. docs/report.md and
docs/export.md show its BUSI output:

    OMP_NUM_THREADS=1 python benchmarks/clinic_outputs.py busi ../shared/data/busi --out runs/busi-clinic
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medtl.data.dataset import DataConfig
from medtl.evaluate import CalibrateConfig, DataSpec, EvaluateConfig, ModelSpec
from medtl.export import export_model
from medtl.finetune.loop import FinetuneConfig
from medtl.pipeline import (
    CalibrateStage,
    EvaluateStage,
    FinetuneStage,
    PrepareStage,
    ReportStage,
    TrainingData,
)
from medtl.results import ReportSummary


def run(adapter: str, root: Path, out: Path, backbone: str, epochs: int, size: int) -> list[str]:
    """Every step into ``out``; returns the lines to print (figures and timings)."""
    start, lines = time.perf_counter(), []
    manifest = PrepareStage(workers=1).prepare(adapter, root, out / "manifest.csv").manifest
    data = DataConfig(image_size=size, channels=3, batch_size=32, augment="light")
    ft = FinetuneConfig(backbone=backbone, epochs=epochs, batch_size=32, min_epochs=epochs, lr=2e-3)
    FinetuneStage(config=ft).finetune(
        TrainingData(manifest, root, data, progress=False), out / "finetune"
    )
    CalibrateStage(CalibrateConfig(method="temperature", compare=[])).calibrate(out / "finetune")
    spec = DataSpec(out / "manifest.csv", root, adapter)
    cfg = EvaluateConfig(n_boot=1000)
    model = ModelSpec(out / "finetune", backbone)
    EvaluateStage(cfg).evaluate([model], [spec], out / "eval", progress=False)
    lines.append(f"trained and evaluated in {time.perf_counter() - start:.0f} s")
    t = time.perf_counter()
    report = ReportStage().report(out / "eval", out / "report", {adapter: root}, explain=True)
    lines.append(f"report with explanations in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    result = export_model(out / "finetune", out / "export", out / "eval")
    lines.append(
        f"export in {time.perf_counter() - t:.0f} s; ONNX max |difference| "
        f"{result.onnx_max_abs_diff:.1e}"
    )
    entry = ReportSummary.load(report.json).entries[0]
    overall = entry.metrics["overall"]
    for name in ("macro_auroc", "balanced_accuracy", "accuracy"):
        e = overall[name]
        lines.append(f"test {name}: {e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]")
    panel = entry.explanations or {}
    lines.append(f"Grad-CAM layer: {panel['layer']}")
    lines += [
        f"  {d['kind']}: true {d['true']}, called {d['explained']} {d['probability']:.2f}"
        for d in panel["images"]
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    lines = run(args.adapter, args.root, args.out, args.backbone, args.epochs, args.image_size)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
