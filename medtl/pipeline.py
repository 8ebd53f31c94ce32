"""Stages of a recipe run, each skipped when its ``DONE`` matches its inputs.

``medtl pretrain``, ``medtl finetune`` and (later) ``medtl run`` call these; each reads what the
previous stage wrote to the run folder, so any stage can be rerun, resumed or replaced alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medtl.data.manifest import Manifest
from medtl.errors import ConfigError
from medtl.recipe import Recipe
from medtl.runs import Stage, data_root, ensure_manifest, start_run

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    root: Path
    manifest: Manifest
    device: str
    progress: bool


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available; use --device cpu")
    return name


def init_distributed(device: str) -> None:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def open_run(
    recipe: Recipe, out: Path | None, root_override: str | None, device: str, progress: bool
) -> RunContext:
    """Run folder, data root and manifest (rank 0 prepares it; other ranks wait, then load)."""
    out = out or Path("runs") / recipe.name
    device = pick_device(device)
    init_distributed(device)
    section = recipe.section("data")
    root = data_root(section, root_override)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        start_run(recipe, out)
        manifest = ensure_manifest(section, root, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank != 0:
            manifest = ensure_manifest(section, root, out)
    return RunContext(recipe, out, root, manifest, device, progress and rank == 0)


def stage_inputs(ctx: RunContext, name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    resolved = ctx.recipe.resolved()
    return {
        "stage": name,
        "section": resolved.get(name),
        "loader": resolved["data"]["loader"],
        "manifest": ctx.manifest.sha256,
        "seed": ctx.recipe.seed,
        **(extra or {}),
    }


def run_pretrain(ctx: RunContext, resume: bool = True) -> Path:
    """The ``pretrain`` stage: ``<run>/pretrain/encoder.safetensors``."""
    from medtl.pretrain.loop import ENCODER_FILE, pretrain

    stage = Stage(ctx.out / "pretrain", stage_inputs(ctx, "pretrain"))
    if stage.done():
        log.info("pretrain: already done (%s)", stage.folder)
        return stage.folder / ENCODER_FILE
    stage.begin()
    data_cfg = ctx.recipe.section("data").loader
    result = pretrain(
        ctx.recipe.section("pretrain"),
        ctx.manifest,
        ctx.root,
        data_cfg,
        stage.folder,
        seed=ctx.recipe.seed,
        device=ctx.device,
        resume=resume,
        progress=ctx.progress,
        recipe=ctx.recipe.resolved(),
    )
    stage.mark_done({"final_loss": result.meta["final_loss"]})
    return result.encoder


def run_finetune(ctx: RunContext, resume: bool = True) -> Path:
    """The ``finetune`` stage: ``<run>/finetune/model.safetensors`` and predictions."""
    from medtl.finetune.loop import finetune

    cfg = ctx.recipe.section("finetune")
    weights = cfg.weights
    encoder_hash = None
    if weights == "pretrain":
        weights = str(run_pretrain(ctx, resume))
        encoder_hash = (ctx.out / "pretrain" / "DONE").read_text()
    stage = Stage(ctx.out / "finetune", stage_inputs(ctx, "finetune", {"encoder": encoder_hash}))
    if stage.done():
        log.info("finetune: already done (%s)", stage.folder)
        return stage.folder
    stage.begin()
    result = finetune(
        cfg,
        ctx.manifest,
        ctx.root,
        ctx.recipe.section("data").loader,
        stage.folder,
        seed=ctx.recipe.seed,
        weights=weights,
        device=ctx.device,
        resume=resume,
        progress=ctx.progress,
        recipe=ctx.recipe.resolved(),
    )
    stage.mark_done({"val_bacc": result.meta["val_bacc"]})
    return stage.folder
