"""Which first-rung rule ranks BioTune candidates as their full runs do?

Trains ``--candidates`` random genomes (a search's first generation) for ``--epochs`` epochs
each, as the search trains a candidate that is never pruned (one run, the recipe's cosine
schedule over all its epochs, frozen-prefix features cached), and records validation balanced
accuracy and loss after every epoch. Then, for each first rung ``e`` and each promotion rule,
compares the ranking at epoch ``e`` with the ranking by the full run's fitness (1 - best val
balanced accuracy over all epochs): Spearman's rho, how many candidates share a score with
another at the rung (ties are broken by trial order, which is how a rung "promotes by index"),
and the full-run fitness lost by promoting the best ``1/eta`` at the rung instead of the truly
best candidate. The test split is never read.

    python benchmarks/first_rung.py [--candidates 12] [--epochs 12] [--rungs 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune import evolution as ea
from medtl.finetune.loop import FinetuneConfig
from medtl.finetune.search import BioTuneConfig, Search, SearchTask
from medtl.train import mix_seed

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RULES: dict[str, Callable[[list[list[float]], int], float]] = {
    # lower is better; curve[i] = [val_bacc, val_loss] after epoch i + 1
    "val_bacc": lambda curve, e: 1.0 - max(c[0] for c in curve[:e]),
    "val_loss": lambda curve, e: min(c[1] for c in curve[:e]),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--manifest", type=Path, default=ROOT / "data_manifests/breastmnist.csv")
    add("--root", type=Path, default=SHARED / "medmnist")
    add("--backbone", default="medtl_tiny_convnext")
    add("--image-size", type=int, default=32)
    add("--candidates", type=int, default=12)
    add("--epochs", type=int, default=12)
    add("--rungs", type=int, nargs="+", default=[1, 2, 4])
    add("--eta", type=int, default=3)
    add("--lr", type=float, default=3e-3)
    add("--seed", type=int, default=0)
    add("--work", type=Path, default=ROOT / "benchmarks/out/first_rung")
    return parser.parse_args(argv)


def curves(args: argparse.Namespace) -> list[list[list[float]]]:
    """Per candidate, ``[val_bacc, val_loss]`` after every epoch (cached in ``--work``)."""
    cache = args.work / "curves.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = BioTuneConfig(preset="cpu", population=max(args.candidates, 3), seed=args.seed)
    ft = FinetuneConfig(
        backbone=args.backbone, epochs=args.epochs, batch_size=32, lr=args.lr, warmup_epochs=1
    )
    data = DataConfig(image_size=args.image_size, channels=3, cache="memory", batch_size=32)
    task = SearchTask(cfg, ft, Manifest.load(args.manifest), args.root, data, args.work,
                      progress=False)  # fmt: skip
    search = Search(task)
    rng = np.random.default_rng(mix_seed(args.seed, 0))  # the search's first generation
    genomes = ea.random_genomes(args.candidates, len(search.blocks) + 1, rng)
    out: list[list[list[float]]] = []
    for i, genome in enumerate(genomes):
        start, curve = time.perf_counter(), []
        prepared = search.prepare(genome.tolist(), args.seed)
        search.train(
            prepared, args.seed, args.epochs, args.work / f"c{i}",
            recorder(curve),
        )  # fmt: skip
        print(f"candidate {i}: best val bacc {max(c[0] for c in curve):.3f}, "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        out.append(curve)
    args.work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def recorder(curve: list[list[float]]) -> Callable[[int, dict[str, float]], None]:
    def record(_: int, r: dict[str, float]) -> None:
        curve.append([r["val_bacc"], r["val_loss"]])

    return record


def compare(runs: list[list[list[float]]], rungs: Sequence[int], eta: int) -> list[dict[str, Any]]:
    """One row per (first rung, rule): rank agreement with the full runs, ties, regret."""
    final = np.array([RULES["val_bacc"](c, len(c)) for c in runs])
    keep = max(1, len(runs) // eta)
    rows = []
    for e in rungs:
        for name, rule in RULES.items():
            score = np.array([rule(c, e) for c in runs])
            promoted = np.lexsort((np.arange(len(runs)), score))[:keep]  # ties: by index
            _, counts = np.unique(score, return_counts=True)
            constant = np.ptp(score) == 0 or np.ptp(final) == 0  # ranks nothing
            rho = None if constant else float(spearmanr(score, final).statistic)
            rows.append({
                "rung": e, "rule": name, "rho": rho,
                "tied": int(counts[counts > 1].sum()),
                "regret": float(final[promoted].min() - final.min()),
                "best_promoted": bool(final.argmin() in promoted),
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], n: int, eta: int) -> str:
    lines = [
        f"| first rung (epochs) | rank by | Spearman rho with the full run | candidates tied "
        f"(of {n}) | fitness lost promoting the best {max(1, n // eta)} |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rho = "undefined" if r["rho"] is None else f"{r['rho']:.2f}"
        lines.append(f"| {r['rung']} | {r['rule']} | {rho} | {r['tied']} | {r['regret']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = curves(args)
    rows = compare(runs, args.rungs, args.eta)
    print(table(rows, len(runs), args.eta))
    final = [1.0 - max(c[0] for c in curve) for curve in runs]
    print(f"full-run fitness: best {min(final):.3f}, median {float(np.median(final)):.3f}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
