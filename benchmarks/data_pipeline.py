"""Data-pipeline throughput on BUSI: no cache vs MONAI memory cache vs disk cache.

Builds a manifest of BUSI straight from its files, then runs ``--epochs`` epochs of the
loader of :mod:`medtl.data.dataset` in each cache mode and reports images per second. The
first ("cold") epoch of a cached mode includes filling the cache; "warm" is the mean of the
later epochs. The target: a warm cached epoch at least 5x faster than a warm uncached one.
The table is printed and written into ``docs/performance.md`` between the markers below.

    python benchmarks/data_pipeline.py [--data-root ../shared/data/busi] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import monai
import torch
from PIL import Image

from medtl.data.dataset import DataConfig, build_dataset, build_loader
from medtl.data.manifest import Manifest, ManifestMeta, Row, row_id
from medtl.io import sha256_file, write_marked_section

REPO = Path(__file__).resolve().parents[1]
START = "<!-- data_pipeline:start -->"
END = "<!-- data_pipeline:end -->"
TARGET = 5.0
MODES = ("none", "memory", "disk")


@dataclass
class ModeResult:
    """Images per second of each epoch of one cache mode; epoch 1 includes building."""

    mode: str
    per_epoch: list[float]

    @property
    def cold(self) -> float:
        return self.per_epoch[0]

    @property
    def warm(self) -> float | None:
        return statistics.mean(self.per_epoch[1:]) if len(self.per_epoch) > 1 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=REPO / "../shared/data/busi",
        help="BUSI folder holding Dataset_BUSI_with_GT/ (default: %(default)s)",
    )
    parser.add_argument("--size", type=int, default=128, help="image side S (default: 128)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per mode (default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader workers, also memory-cache fill threads (default: 2)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs/performance.md",
        help="markdown file to update (default: docs/performance.md)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def busi_manifest(root: Path) -> Manifest:
    """Every BUSI image (no masks) as a train row labelled by its class folder."""
    files = sorted(p for p in root.glob("Dataset_BUSI_with_GT/*/*.png") if "_mask" not in p.name)
    if not files:
        sys.exit(f"error: no BUSI images under {root}/Dataset_BUSI_with_GT; pass --data-root")
    rows = []
    for file in files:
        rel = file.relative_to(root).as_posix()
        with Image.open(file) as img:
            width, height = img.size
        rid = row_id(rel)
        rows.append(Row(rid, rel, file.parent.name, "train", rid, sha256_file(file), width, height))
    classes = sorted({r.label for r in rows})
    return Manifest(rows, ManifestMeta("busi", classes, 0, {"train": 1.0}, "seeded"))


def run_mode(manifest: Manifest, root: Path, cfg: DataConfig, epochs: int) -> ModeResult:
    """Time ``epochs`` passes over a shuffled loader; the first includes building the dataset."""
    rates = []
    start = time.perf_counter()
    dataset = build_dataset(manifest, "train", root, cfg, train=True)
    loader = build_loader(dataset, cfg, train=True)
    for _ in range(epochs):
        n = sum(len(batch["row"]) for batch in loader)
        now = time.perf_counter()
        rates.append(n / (now - start))
        start = now
    return ModeResult(cfg.cache, rates)


def speedup(result: ModeResult, base: ModeResult) -> float | None:
    if result.warm is None or base.warm is None:
        return None
    return result.warm / base.warm


def fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}{suffix}" if value >= 100 else f"{value:.1f}{suffix}"


def table(results: list[ModeResult]) -> str:
    base = results[0]
    lines = [
        "| cache | cold epoch (img/s) | warm epochs (img/s) | warm speed-up | every epoch (img/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        epochs = ", ".join(fmt(v) for v in r.per_epoch)
        up = fmt(speedup(r, base), "x")
        lines.append(f"| {r.mode} | {fmt(r.cold)} | {fmt(r.warm)} | {up} | {epochs} |")
    return "\n".join(lines)


def verdict(results: list[ModeResult]) -> str:
    base, cached = results[0], results[1:]
    parts = []
    for r in cached:
        up = speedup(r, base)
        if up is None:
            parts.append(f"{r.mode}: not measured (needs --epochs 2 or more)")
        else:
            parts.append(f"{r.mode}: {'met' if up >= TARGET else 'MISSED'} ({up:.1f}x)")
    return f"Target (warm cached epoch >= {TARGET:g}x the uncached one): " + "; ".join(parts) + "."


def section(args: argparse.Namespace, n_images: int, results: list[ModeResult]) -> str:
    command = shlex.join(["python", *sys.argv])
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join(
        [
            START,
            "## Data pipeline (`benchmarks/data_pipeline.py`)",
            "",
            f"BUSI ({n_images} PNG images, 256x256 RGB in this copy; Al-Dhabyani et al. 2020) read "
            f"through `medtl.data.dataset` at {args.size}x{args.size}, 3 channels, squash resize, "
            f"no augmentation, batch {args.batch_size}, {args.workers} DataLoader workers, "
            f"{args.epochs} shuffled epochs per cache mode. The cold epoch includes building the "
            "dataset (filling the memory cache, writing the disk cache); warm is the mean of the "
            "later epochs. Figures move by tens of percent between runs on a shared machine; "
            "the load average below says how busy it was.",
            "",
            table(results),
            "",
            verdict(results),
            "",
            f"- command: `{command}` (from the repository root)",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {os.cpu_count()} CPUs ({platform.machine()}), load average {load} at the end",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
            f"MONAI {monai.__version__}",
            END,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.data_root.resolve()
    manifest = busi_manifest(root)
    results = []
    with tempfile.TemporaryDirectory(prefix="medtl-bench-") as tmp:
        for mode in MODES:
            cfg = DataConfig(
                image_size=args.size,
                batch_size=args.batch_size,
                num_workers=args.workers,
                cache=mode,
                cache_dir=tmp,
            )
            results.append(run_mode(manifest, root, cfg, args.epochs))
            print(f"{mode}: " + ", ".join(f"{v:.1f}" for v in results[-1].per_epoch) + " img/s")
    text = section(args, len(manifest.rows), results)
    print("\n" + table(results) + "\n\n" + verdict(results))
    write_marked_section(args.out, text, START, END, "Performance")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
