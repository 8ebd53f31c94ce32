"""Per-subgroup figures of a brief ISIC 2018 model: the subgroup machinery on real metadata.

Prepares the ISIC 2018 layout under ROOT (HAM10000_metadata.csv gives age bands, sex and
localization), fine-tunes a model from random initialisation for a few epochs, calibrates it
on validation and evaluates it on the validation and test splits, then prints each split's
balanced accuracy, every subgroup's n and balanced accuracy and the largest gap with its
interval. docs/report.md quotes its output on ../shared/data/isic2018_sample.

    OMP_NUM_THREADS=1 python benchmarks/isic_subgroups.py ../shared/data/isic2018_sample --out runs/isic-subgroups
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.data.dataset import DataConfig
from medtl.evaluate import CalibrateConfig, DataSpec, EvaluateConfig, ModelSpec
from medtl.finetune.loop import FinetuneConfig
from medtl.pipeline import CalibrateStage, EvaluateStage, FinetuneStage, PrepareStage, TrainingData


def run(
    root: Path, out: Path, backbone: str, epochs: int, size: int, n_boot: int
) -> dict[str, object]:
    """Prepare, fine-tune, calibrate, evaluate; the evaluation's entries by split."""
    manifest = PrepareStage(workers=1).prepare("isic2018", root, out / "isic.csv").manifest
    data = DataConfig(image_size=size, channels=3, batch_size=32)
    ft = FinetuneConfig(backbone=backbone, epochs=epochs, batch_size=32, min_epochs=epochs, lr=1e-3)
    FinetuneStage(config=ft).finetune(
        TrainingData(manifest, root, data, progress=False), out / "model"
    )
    CalibrateStage(CalibrateConfig(method="temperature", compare=[])).calibrate(out / "model")
    spec = DataSpec(out / "isic.csv", root, "isic2018")
    cfg = EvaluateConfig(splits=["val", "test"], n_boot=n_boot)
    model = ModelSpec(out / "model", backbone)
    results = EvaluateStage(cfg).evaluate([model], [spec], out / "eval", progress=False)
    return {e.split: e.model_dump(mode="json", exclude_unset=True) for e in results.entries}


def summary(entries: dict[str, object]) -> list[str]:
    lines = []
    for split, entry in entries.items():
        m = entry["metrics"]  # type: ignore[index]
        bacc = m["overall"]["balanced_accuracy"]["value"]
        lines.append(f"{split}: n {m['n']}, balanced accuracy {bacc:.3f}")
        for column, r in (m.get("subgroups") or {}).items():
            groups = ", ".join(
                f"{g} {v['n']} ({v['balanced_accuracy']['value']:.2f})"
                for g, v in r["groups"].items()
            )
            lines.append(f"  {column}: {groups}")
            gap = r["largest_gap"]
            lines.append(
                f"    largest gap: {gap['high']} - {gap['low']} = {gap['value']:.3f} "
                f"[{gap['ci_low']:.3f}, {gap['ci_high']:.3f}]"
                if gap
                else f"    largest gap: none (fewer than two known subgroups of {r['min_n']}+)"
            )
        if not m.get("subgroups"):
            lines.append("  no subgroup metadata for these rows")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    entries = run(args.root, args.out, args.backbone, args.epochs, args.image_size, args.n_boot)
    print("\n".join(summary(entries)))


if __name__ == "__main__":
    main()
