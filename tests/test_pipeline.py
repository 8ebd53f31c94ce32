"""End to end on the synthetic phantom with tiny backbones: every stage, skip, resume, force."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medtl.data.dataset import DataConfig
from medtl.data.prepare import prepare
from medtl.demo import make_phantom, run_demo
from medtl.models import read_state_dict
from medtl.pretrain.loop import PretrainConfig, pretrain
from tests.conftest import pretrain_killed_and_resumed

TINY = [
    "pretrain.backbone=medtl_tiny_convnext",
    "finetune.backbone=medtl_tiny_convnext",
    "pretrain.epochs=2",
    "finetune.epochs=2",
    "pretrain.batch_size=16",
    "finetune.batch_size=16",
    "evaluate.n_boot=200",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, n=48, size=32, quiet=True, overrides=TINY)
    assert report.is_file()
    return out


@pytest.mark.slow
def test_demo_runs_every_stage(demo_run: Path) -> None:
    for stage in ("pretrain", "finetune", "calibrate", "evaluate", "report"):
        assert (demo_run / stage / "DONE").is_file(), stage
    for name in (
        "recipe.yaml",
        "env.json",
        "data/manifest.csv",
        "data/manifest.audit.json",
        "summary.json",
        "pretrain/encoder.safetensors",
        "finetune/model.safetensors",
        "finetune/predictions_test.csv",
        "evaluate/evaluation.json",
        "report/report.html",
        "report/report.json",
        "report/tables.csv",
    ):
        assert (demo_run / name).is_file(), name
    meta = json.loads((demo_run / "finetune" / "meta.json").read_text())
    assert meta["calibrator"]["name"] == "temperature" and meta["temperature"] > 0
    evaluation = json.loads((demo_run / "evaluate" / "evaluation.json").read_text())
    assert [e["status"] for e in evaluation["entries"]] == ["ok"]


@pytest.mark.slow
def test_rerun_skips_finished_stages(demo_run: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in demo_run.glob("*/DONE")}
    run_demo(demo_run, n=48, size=32, quiet=True, overrides=TINY)
    assert {p: p.stat().st_mtime_ns for p in demo_run.glob("*/DONE")} == stamps


@pytest.mark.slow
def test_changed_input_redoes_the_stage_and_what_follows(demo_run: Path) -> None:
    before = {p.parent.name: p.read_text() for p in demo_run.glob("*/DONE")}
    run_demo(demo_run, n=48, size=32, quiet=True, overrides=[*TINY, "evaluate.n_boot=300"])
    after = {p.parent.name: p.read_text() for p in demo_run.glob("*/DONE")}
    assert after["pretrain"] == before["pretrain"] and after["finetune"] == before["finetune"]
    assert after["evaluate"] != before["evaluate"]


def _phantom_manifest(tmp_path: Path) -> tuple[Path, object]:
    root = make_phantom(tmp_path / "phantom", n=32, size=32, seed=1)
    return root, prepare("folder", root, tmp_path / "m.csv").manifest


def _tiny_convnext(**options: Any) -> PretrainConfig:
    """Pretraining of ``medtl_tiny_convnext`` in batches of 8, 1 warm-up epoch, no pictures;
    ``options`` add or change keys."""
    base: dict[str, Any] = dict(
        backbone="medtl_tiny_convnext", batch_size=8, warmup_epochs=1, picture_every=0
    )
    return PretrainConfig(**{**base, **options})


def test_pretrain_resume_equals_uninterrupted(tmp_path: Path) -> None:
    root, manifest = _phantom_manifest(tmp_path)
    cfg = _tiny_convnext(epochs=3, checkpoint_every=2)
    data_cfg = DataConfig(image_size=32, channels=1)
    pretrain_killed_and_resumed(cfg, manifest, root, data_cfg, tmp_path, 5)
    assert (tmp_path / "a" / "loss.png").is_file() and (
        tmp_path / "a" / "masks_epoch003.png"
    ).is_file()


def test_pretrain_loss_falls_and_encoder_loads_into_timm(tmp_path: Path) -> None:
    root, manifest = _phantom_manifest(tmp_path)
    cfg = _tiny_convnext(epochs=6, lr=3e-3)
    result = pretrain(
        cfg, manifest, root, DataConfig(image_size=32, channels=1), tmp_path / "p", progress=False
    )
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    clf = timm.create_model("medtl_tiny_convnext", num_classes=2, in_chans=1)
    missing, unexpected = clf.load_state_dict(read_state_dict(result.encoder), strict=False)
    assert unexpected == [] and all(k.startswith("head.fc.") for k in missing)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["masking"]["name"] == "entropy" and meta["manifest_sha256"] == manifest.sha256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pretrain_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        root, manifest = _phantom_manifest(Path(tmp) / f"data{rank}")
        cfg = _tiny_convnext(epochs=2)
        r = pretrain(
            cfg,
            manifest,
            root,
            DataConfig(image_size=32, channels=1),
            Path(tmp) / "ddp",
            progress=False,
        )
        if rank == 0:
            torch.save(
                {"losses": [h["train_loss"] for h in r.history]}, Path(tmp) / "ddp_losses.pt"
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pretrain_ddp_two_processes_follow_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    root, manifest = _phantom_manifest(tmp_path / "data0")
    cfg = _tiny_convnext(epochs=2)
    single = pretrain(
        cfg, manifest, root, DataConfig(image_size=32, channels=1), tmp_path / "one", progress=False
    )
    mp.spawn(_pretrain_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "ddp_losses.pt", weights_only=True)["losses"]
    assert two == pytest.approx([h["train_loss"] for h in single.history], rel=1e-4)
    assert (tmp_path / "ddp" / "encoder.safetensors").is_file()


@pytest.mark.slow
def test_report_without_thumbnails_redoes_only_the_report(demo_run: Path) -> None:
    before = {p.parent.name: p.read_text() for p in demo_run.glob("*/DONE")}
    images_before = (demo_run / "report" / "report.html").read_text().count("<img")
    run_demo(
        demo_run,
        n=48,
        size=32,
        quiet=True,
        overrides=[*TINY, "evaluate.n_boot=300", "report.thumbnails=false"],
    )
    after = {p.parent.name: p.read_text() for p in demo_run.glob("*/DONE")}
    assert {k for k in after if after[k] != before[k]} == {"report"}
    assert (demo_run / "report" / "report.html").read_text().count("<img") < images_before
