"""Wall time of one BioTune search run by one worker and by two, sharing a PostgreSQL study.

The search: BreastMNIST's official split at ``--image-size`` px, ``--backbone`` from scratch
or from ``--weights`` (a pretrained source),
the ``cpu`` preset cut to ``--population`` members, ``--generations`` generations and
``--max-epochs`` epochs (halving from ``--min-epochs``), one training seed. Each worker is a
separate process on one intra-op thread (``medtl.finetune.search.run_worker``); each count of
workers gets its own study in the database at ``--storage``. Prints the wall time of each, the
candidates each worker ran and the best fitness found.

    python benchmarks/search_workers.py --storage postgresql://medtl@127.0.0.1:5432/medtl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--storage", required=True, help="PostgreSQL URL the workers share")
    add("--workers", type=int, nargs="+", default=[1, 2])
    add("--manifest", type=Path, default=ROOT / "data_manifests/breastmnist.csv")
    add("--root", type=Path, default=SHARED / "medmnist")
    add("--backbone", default="medtl_tiny_convnext")
    add("--weights", default="", help="a pretrained source, e.g. imagenet:efficientnet_lite0")
    add("--image-size", type=int, default=32)
    add("--population", type=int, default=6)
    add("--generations", type=int, default=2)
    add("--max-epochs", type=int, default=6)
    add("--min-epochs", type=int, default=2)
    add("--join", help=argparse.SUPPRESS)  # internal: run one worker of this study
    add("--work", type=Path, help=argparse.SUPPRESS)  # internal: that worker's search folder
    return parser.parse_args(argv)


def worker(args: argparse.Namespace, study: str, out: Path) -> int:
    import torch

    from medtl.data.dataset import DataConfig
    from medtl.data.manifest import Manifest
    from medtl.finetune.loop import FinetuneConfig
    from medtl.finetune.search import BioTuneConfig, SearchTask, run_worker

    torch.set_num_threads(1)
    cfg = BioTuneConfig(
        preset="cpu", population=args.population, generations=args.generations,
        max_epochs=args.max_epochs, min_epochs=args.min_epochs, storage=args.storage,
        study=study, poll_seconds=0.2,
    )  # fmt: skip
    ft = FinetuneConfig(
        backbone=args.backbone, weights=args.weights or None, epochs=args.max_epochs,
        batch_size=32, lr=3e-3,
    )  # fmt: skip
    data = DataConfig(image_size=args.image_size, channels=3, cache="memory", batch_size=32)
    manifest = Manifest.load(args.manifest)
    return run_worker(SearchTask(cfg, ft, manifest, args.root, data, out, progress=False))


def timed(args: argparse.Namespace, n: int, work: Path) -> dict[str, object]:
    """One search run by ``n`` worker processes started together; its wall time."""
    from medtl.finetune.search import read_trials

    study = f"workers{n}-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--storage", args.storage, "--join", study]
    command += [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("manifest", "root", "backbone", "weights", "image_size", "population",
                  "generations", "max_epochs", "min_epochs")
    ]  # fmt: skip
    start = time.perf_counter()
    jobs = [
        subprocess.Popen([*command, f"--work={work / str(n)}"], env=env, stdout=subprocess.PIPE)
        for _ in range(n)
    ]
    counts = [int(job.communicate()[0].decode().split()[-1]) for job in jobs]
    wall = time.perf_counter() - start
    if any(job.returncode for job in jobs):
        sys.exit(f"a worker of {study} failed")
    rows = read_trials(args.storage, study)
    best = min(r.fitness for r in rows if r.rung == max(x.rung for x in rows))
    return {"workers": n, "wall_s": round(wall, 1), "candidates": counts, "best_fitness": best}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.join:
        print(worker(args, args.join, args.work))
        return
    with tempfile.TemporaryDirectory() as folder:
        for n in args.workers:
            print(json.dumps(timed(args, n, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
