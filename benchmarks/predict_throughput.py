"""``medtl predict`` throughput: images per second from a folder of image files to the final
CSV / JSON lines, as a user runs it.

The first ``--n`` images of ``--input`` (sorted; segmentation masks left out) are copied into a
temporary folder and predicted with :func:`medtl.predict.predict_images` in one process on
``--threads`` torch threads: listing, decoding, resizing, the model, the calibrator, the
conformal sets and the atomic writes are all in the time. Needs a calibrated model folder
(``medtl finetune`` then ``medtl calibrate``).

    python benchmarks/predict_throughput.py --model runs/busi/finetune [--n 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medtl.artifacts import ModelCard
from medtl.data.readers import IMAGE_SUFFIXES
from medtl.io import write_marked_section
from medtl.predict import PredictOptions, predict_images

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- predict_throughput:start -->", "<!-- predict_throughput:end -->"


def sample_images(source: Path, n: int, into: Path) -> int:
    """Copy the first ``n`` images under ``source`` (no ``_mask`` files) into ``into``."""
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and "_mask" not in p.name
    )[:n]
    for i, file in enumerate(files):
        shutil.copyfile(file, into / f"{i:05d}{file.suffix.lower()}")
    return len(files)


def measure(model: Path, source: Path, n: int, batch_size: int) -> tuple[int, float]:
    """Images predicted and wall seconds of one ``predict_images`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        count = sample_images(source, n, folder)
        opts = PredictOptions(batch_size=batch_size, device="cpu", progress=False)
        start = time.perf_counter()
        result = predict_images(model, folder, Path(tmp) / "out", opts)
        seconds = time.perf_counter() - start
    if result.predicted != count:
        raise SystemExit(f"{count - result.predicted} of {count} images were skipped")
    return count, seconds


def report(count: int, seconds: float, card: ModelCard, args: argparse.Namespace) -> str:
    cmd = (
        f"python benchmarks/predict_throughput.py --model MODEL --input {os.path.relpath(args.input, ROOT)} "
        f"--n {args.n} --batch-size {args.batch_size} --threads {args.threads}"
    )
    return "\n".join(
        [
            START,
            "## Prediction throughput (`benchmarks/predict_throughput.py`)",
            "",
            f"`medtl predict` on {count} image files, `{card.backbone}` at {card.image_size} px, "
            f"batch {args.batch_size}, CPU, one process, {torch.get_num_threads()} torch "
            "thread(s). The time covers listing, decoding, resizing, the model, the calibrator, "
            "the conformal sets and writing the outputs.",
            "",
            "| images | seconds | images/s |",
            "|---:|---:|---:|",
            f"| {count} | {seconds:.1f} | {count / seconds:.1f} |",
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
            f"{os.cpu_count()} CPUs ({platform.machine()}), shared with other work, load average "
            f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
            END,
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="calibrated model folder")
    parser.add_argument(
        "--input", type=Path, default=ROOT.parent / "shared" / "data" / "busi", help="image folder"
    )
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = ModelCard.load(args.model / "meta.json")
    count, seconds = measure(args.model, args.input, args.n, args.batch_size)
    section = report(count, seconds, card, args)
    print(section)
    write_marked_section(args.out, section, START, END, "Performance")
    return section


if __name__ == "__main__":
    main()
