"""Pretraining throughput: MAE steps with random and entropy masking vs a supervised step.

One process, ``convnext_atto`` at 128 px by default, real BUSI images held in memory (the
loader is measured by ``data_pipeline.py``; this measures the training step: mask drawing,
forward, backward, optimizer). Steps alternate between the kinds in rounds so that machine
noise hits all of them alike; the median step time of each kind is reported.

Targets: entropy masking costs at most 10% more time per step than random masking; a
pretraining step costs at most 1.25x a supervised step (ConvNeXt, ViT), 1.3x for a masked
BatchNorm CNN (``--backbone efficientnet_lite0`` / ``resnet18``, which also times a finer
mask unit, ``--mask-unit 16``). Each backbone has its own section in docs/performance.md.

    python benchmarks/pretrain_throughput.py [--steps 30] [--batch-size 32] [--size 128]
    python benchmarks/pretrain_throughput.py --backbone efficientnet_lite0 --mask-unit 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medtl.data.dataset import DataConfig
from medtl.io import write_marked_section
from medtl.models import build_classifier
from medtl.pretrain.loop import (
    PretrainConfig,
    build_model,
    build_strategy,
    draw_masks,
    param_groups,
)

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- pretrain_throughput:start -->", "<!-- pretrain_throughput:end -->"
DEFAULT_BACKBONE = "convnext_atto"


def load_images(data_root: Path, n: int, size: int) -> torch.Tensor:
    """``n`` BUSI images as ``[n, 3, size, size]`` in [0, 1] (synthetic noise if BUSI is absent)."""
    files = sorted(
        p for p in (data_root / "Dataset_BUSI_with_GT").glob("*/*.png") if "_mask" not in p.name
    )[:n]
    if not files:
        print(f"note: {data_root} not found; using random images")
        return torch.rand(n, 3, size, size)
    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def make_steps(
    backbone: str, size: int, mask_unit: int | None = None, channels_last: bool = False
) -> dict[str, callable]:
    """One training step per kind; with ``channels_last`` every model and batch is in
    channels-last memory format (as ``finetune.channels_last`` / ``pretrain.channels_last``)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    data_cfg = DataConfig(image_size=size, channels=3)
    steps = {}
    kinds = [("random", None), ("entropy", None)] + ([("random", mask_unit)] if mask_unit else [])
    for masking, unit in kinds:
        cfg = PretrainConfig(backbone=backbone, masking=masking, mask_unit=unit)
        torch.manual_seed(0)
        mae = build_model(cfg, data_cfg).to(memory_format=fmt)
        strategy = build_strategy(cfg, mae)
        opt = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-4)

        def step(
            x: torch.Tensor, y: torch.Tensor, seeds: list[int], mae=mae, strategy=strategy, opt=opt
        ) -> None:
            x = x.contiguous(memory_format=fmt)
            out = mae(x, draw_masks(strategy, x, mae.patch_size, seeds))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        unit_label = f", mask unit {unit}" if unit else ""
        steps[f"MAE, {masking} masking{unit_label}"] = step
    torch.manual_seed(0)
    clf = build_classifier(backbone, num_classes=3, in_chans=3).to(memory_format=fmt)
    opt_c = torch.optim.AdamW(clf.parameters(), lr=1e-4)

    def supervised(x: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> None:
        loss = torch.nn.functional.cross_entropy(clf(x.contiguous(memory_format=fmt)), y)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    steps["supervised"] = supervised
    return steps


def measure(
    steps: dict[str, callable], images: torch.Tensor, batch: int, n_steps: int, warmup: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    rng = np.random.default_rng(0)
    for i in range(warmup + n_steps):
        idx = rng.choice(len(images), batch, replace=False)
        x, y = images[idx], torch.from_numpy(idx % 3)
        seeds = [int(s) for s in rng.integers(0, 2**31, batch)]
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(x, y, seeds)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    sup = med["supervised"]
    rows = [
        f"| {k} | {args.batch_size / v:.1f} | {v * 1000:.0f} | {v / sup:.2f}x |"
        for k, v in med.items()
    ]
    entropy_cost = med["MAE, entropy masking"] / med["MAE, random masking"] - 1
    pre_ratio = max(med["MAE, entropy masking"], med["MAE, random masking"]) / sup
    target = 1.3 if masked_cnn(args.backbone) else 1.25
    verdict = [
        f"- entropy vs random masking: {entropy_cost * 100:+.1f}% time per step (target <= +10%): "
        f"{'met' if entropy_cost <= 0.10 else 'NOT met'}",
        f"- pretraining vs supervised step: {pre_ratio:.2f}x (target <= {target}x): "
        f"{'met' if pre_ratio <= target else 'NOT met'}",
    ]
    cmd = f"python benchmarks/pretrain_throughput.py --steps {args.steps} --batch-size {args.batch_size} --size {args.size} --backbone {args.backbone}"
    if args.mask_unit:
        cmd += f" --mask-unit {args.mask_unit}"
    if args.channels_last:
        cmd += " --channels-last"
    start, end = markers(label(args))
    title = "" if label(args) == DEFAULT_BACKBONE else f": {label(args).replace(':', ', ')}"
    return "\n".join(
        [
            start,
            f"## Pretraining throughput{title} (`benchmarks/pretrain_throughput.py`)",
            "",
            f"`{args.backbone}` at {args.size} px, batch {args.batch_size}, BUSI images held in memory, one process, "
            f"{'channels-last' if args.channels_last else 'contiguous'} memory format, "
            f"{torch.get_num_threads()} torch threads; median of {args.steps} steps per kind after {args.warmup} warm-up "
            "rounds, the kinds interleaved step by step. A step = mask drawing (MAE) + forward + backward + AdamW update.",
            "",
            "| step | images/s | ms/step | vs supervised |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            *verdict,
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
            f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
            "- the machine is shared with other work; its load shows in the load average above",
            end,
        ]
    )


def label(args: argparse.Namespace) -> str:
    """The backbone, with ``:channels_last`` when every step ran so (its own section)."""
    return f"{args.backbone}:channels_last" if args.channels_last else args.backbone


def masked_cnn(backbone: str) -> bool:
    """Whether ``backbone`` is pretrained as a masked BatchNorm CNN (EfficientNet, ResNet)."""
    return backbone.startswith(("efficientnet", "resnet", "tf_efficientnet"))


def markers(backbone: str) -> tuple[str, str]:
    """The section markers of ``backbone`` in docs/performance.md (the default keeps its own)."""
    if backbone == DEFAULT_BACKBONE:
        return START, END
    return (
        f"<!-- pretrain_throughput:{backbone}:start -->",
        f"<!-- pretrain_throughput:{backbone}:end -->",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "busi")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument(
        "--mask-unit", type=int, default=None, help="also time random masking at this mask unit"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="every step channels-last")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args()
    images = load_images(args.data_root, 256, args.size)
    times = measure(
        make_steps(args.backbone, args.size, args.mask_unit, args.channels_last),
        images,
        args.batch_size,
        args.steps,
        args.warmup,
    )
    section = report(times, args)
    print(section)
    write_marked_section(args.out, section, *markers(label(args)), "Performance")


if __name__ == "__main__":
    main()
