"""Speed of training steps: channels-last, bfloat16 autocast and ``torch.compile``, on the CPU
or (``--device cuda``) on a GPU, whose figures go into a section of their own.

Fine-tuning steps (``efficientnet_lite0`` and ``convnext_atto`` classifiers) and MAE steps
(``convnext_atto``, random masking) at 128 px, batch 32, on BUSI images held in memory (random
images when BUSI is absent), with 1 and 2 torch threads. A step = forward + cross-entropy (or
the MAE loss) + backward + AdamW update. Each setting is measured in ``--repeats`` rounds of
``--steps`` steps, the settings interleaved round by round so that load from other processes
hits them alike; the table gives the median images/s over rounds and the range (min-max), so
the spread shows how noisy the machine was.

    python benchmarks/cpu_speed.py [--steps 4] [--repeats 3] [--threads 1 2] [--compile]
    python benchmarks/cpu_speed.py --device cuda --batch-size 128 --threads 1 --compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pretrain_throughput import load_images  # benchmarks/, this script's folder

from medtl.data.dataset import DataConfig
from medtl.io import write_marked_section
from medtl.models import build_classifier
from medtl.pretrain.loop import PretrainConfig, build_model, build_strategy, draw_masks

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- cpu_speed:start -->", "<!-- cpu_speed:end -->"
GPU_START, GPU_END = "<!-- gpu_speed:start -->", "<!-- gpu_speed:end -->"
VARIANTS = {  # name -> (channels_last, bf16 autocast, torch.compile)
    "fp32": (False, False, False),
    "channels-last": (True, False, False),
    "bf16 autocast": (False, True, False),
    "channels-last + bf16": (True, True, False),
    "torch.compile": (False, False, True),
}
Step = Callable[[torch.Tensor, torch.Tensor, list[int]], None]


def make_step(
    kind: str, size: int, channels_last: bool, bf16: bool, compiled: bool, device: torch.device
) -> Step:
    """One training step of ``kind`` (``finetune:<backbone>`` or ``mae:<backbone>``)."""
    torch.manual_seed(0)
    stage, backbone = kind.split(":")
    model: Any
    if stage == "mae":
        cfg = PretrainConfig(backbone=backbone, masking="random")
        model = build_model(cfg, DataConfig(image_size=size, channels=3))
        strategy = build_strategy(cfg, model)
    else:
        model = build_classifier(backbone, num_classes=3, in_chans=3)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(x: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> None:
        x = x.contiguous(memory_format=fmt)
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with cast:
            if stage == "mae":
                loss = forward(x, draw_masks(strategy, x, model.patch_size, seeds))["loss"]
            else:
                loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(
    kind: str, images: torch.Tensor, args: argparse.Namespace, threads: int
) -> dict[str, dict[str, Any]]:
    """images/s of each variant in ``args.repeats`` interleaved rounds of ``args.steps`` steps;
    the first step of each variant (warm-up, compilation) is timed apart."""
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    images = images.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = {k: v for k, v in VARIANTS.items() if args.compile or not v[2]}
    steps, first = {}, {}
    rng = np.random.default_rng(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        idx = rng.choice(len(images), args.batch_size, replace=False)
        seeds = [int(s) for s in rng.integers(0, 2**31, args.batch_size)]
        return images[torch.from_numpy(idx).to(device)], torch.from_numpy(idx % 3).to(device), seeds

    for name, (cl, bf16, compiled) in variants.items():
        steps[name] = make_step(kind, args.size, cl, bf16, compiled, device)
        t0 = time.perf_counter()
        steps[name](*batch())
        sync()
        first[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*batch())
            sync()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    return {
        k: {"rates": rates[k], "median": statistics.median(rates[k]), "first_s": first[k]}
        for k in variants
    }


def table(results: dict[tuple[str, int], dict[str, dict[str, Any]]]) -> list[str]:
    rows = [
        "| step | threads | setting | images/s (median) | range over rounds | vs fp32 | first step s |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for (kind, threads), by_variant in results.items():
        base = by_variant["fp32"]["median"]
        for name, r in by_variant.items():
            low, high = min(r["rates"]), max(r["rates"])
            rows.append(
                f"| {kind} | {threads} | {name} | {r['median']:.1f} | {low:.1f}-{high:.1f} | "
                f"{r['median'] / base:.2f}x | {r['first_s']:.1f} |"
            )
    return rows


def report(results: dict[tuple[str, int], dict[str, dict[str, Any]]], args: Any) -> str:
    cmd = (
        f"python benchmarks/cpu_speed.py --size {args.size} --batch-size {args.batch_size} "
        f"--kinds {' '.join(args.kinds)} --steps {args.steps} --repeats {args.repeats} "
        f"--threads {' '.join(map(str, args.threads))}{' --compile' if args.compile else ''}"
    )
    if args.device != "cpu":
        return gpu_report(results, args, cmd)
    return "\n".join(
        [
            START,
            "## CPU speed: channels-last, bfloat16 autocast, torch.compile (`benchmarks/cpu_speed.py`)",
            "",
            f"{args.size} px, batch {args.batch_size}, BUSI images held in memory, one process; a "
            "step = forward + loss + backward + AdamW update (MAE: `convnext_atto`, random "
            f"masking). Median images/s over {args.repeats} rounds of {args.steps} steps, the "
            "settings interleaved round by round; the range shows the spread between rounds. "
            "**The machine was shared with other processes while this ran** (load average "
            "below): figures are comparable within a row group, not as absolute capacity.",
            "",
            *table(results),
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
            f"{os.cpu_count()} CPUs ({platform.machine()}, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), load average "
            f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
            END,
        ]
    )


def gpu_report(
    results: dict[tuple[str, int], dict[str, dict[str, Any]]], args: Any, cmd: str
) -> str:
    return "\n".join(
        [
            GPU_START,
            "## GPU speed: channels-last, bfloat16 autocast, torch.compile (`benchmarks/cpu_speed.py --device cuda`)",
            "",
            f"{args.size} px, batch {args.batch_size}, BUSI images held in GPU memory, one process; "
            "a step as in the CPU table (forward + loss + backward + AdamW update). Median "
            f"images/s over {args.repeats} rounds of {args.steps} steps, settings interleaved.",
            "",
            *table(results),
            "",
            f"- command: `{cmd} --device {args.device}`",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
            GPU_END,
        ]
    )


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "busi")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["finetune:efficientnet_lite0", "finetune:convnext_atto", "mae:convnext_atto"],
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (its own section in --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    images = load_images(args.data_root, 128, args.size)
    results = {}
    for threads in args.threads:
        for kind in args.kinds:
            results[(kind, threads)] = measure(kind, images, args, threads)
            print(
                kind,
                threads,
                {k: round(v["median"], 1) for k, v in results[(kind, threads)].items()},
                flush=True,
            )
    section = report(results, args)
    print(section)
    markers = (START, END) if args.device == "cpu" else (GPU_START, GPU_END)
    write_marked_section(args.out, section, *markers, "Performance")
    return results


if __name__ == "__main__":
    main()
