"""The shared training loop: learning, exact resume, the NaN guard, early stopping, DDP."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from medtl.models import build_classifier
from medtl.train import (
    CHECKPOINT,
    EarlyStopping,
    FitResult,
    LoopState,
    Schedule,
    StepContext,
    TrainingError,
    fit,
    supervised_step,
)


class Blobs(Dataset):
    """Two classes of 32x32 images: a bright or a dark square, plus noise."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 0.3
        self.images[self.labels == 1, :, 8:24, 8:24] += 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("medtl_tiny_convnext", num_classes=2, in_chans=1)


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def test_fit_learns_and_writes_history(tmp_path: Path) -> None:
    model = _model()
    sched = Schedule(epochs=6, lr=3e-3, batch_size=16, warmup_epochs=1)
    result = fit(model, supervised_step, _groups(model), Blobs(), sched, tmp_path, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.steps == 6 * 3 and result.samples_seen == 6 * 48
    assert (tmp_path / "history.csv").read_text().count("\n") == 7
    assert (tmp_path / CHECKPOINT).is_file()


@pytest.mark.parametrize(
    "stop", [7, 5, 10], ids=["mid-epoch", "epoch-last-step", "epoch-2-last-step"]
)
def test_resume_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    """Killed mid-epoch, or after an epoch's last step but before its end-of-epoch work (48
    samples in batches of 10: 5 steps an epoch), the resumed run ends bit-equal."""
    sched = Schedule(epochs=3, lr=2e-3, batch_size=10, checkpoint_every=2)
    full = _model()
    fit(
        full, supervised_step, _groups(full), Blobs(), sched, tmp_path / "a", seed=5, progress=False
    )
    part = _model()
    r = fit(
        part,
        supervised_step,
        _groups(part),
        Blobs(),
        sched,
        tmp_path / "b",
        seed=5,
        progress=False,
        stop_after_steps=stop,
    )
    assert r.extra["interrupted"]
    resumed = _model(seed=123)  # whatever the fresh init, the checkpoint decides
    fit(
        resumed,
        supervised_step,
        _groups(resumed),
        Blobs(),
        sched,
        tmp_path / "b",
        seed=5,
        progress=False,
    )
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    def history(run: str) -> list[dict[str, str]]:  # wall seconds left out
        with open(tmp_path / run / "history.csv", newline="") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert history("b") == history("a") and len(history("b")) == 3  # no epoch lost or repeated


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    model = _model()
    sched = Schedule(epochs=1, batch_size=16)
    fit(model, supervised_step, _groups(model), Blobs(), sched, tmp_path, seed=1, progress=False)
    with pytest.raises(TrainingError, match="another run"):
        fit(
            model, supervised_step, _groups(model), Blobs(), sched, tmp_path, seed=2, progress=False
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    def poisoned(
        model: torch.nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        out = supervised_step(model, batch, ctx)
        return {**out, "loss": out["loss"] * (float("nan") if ctx.step == 4 else 1.0)}

    model = _model()
    sched = Schedule(epochs=3, batch_size=16, checkpoint_every=2)
    with pytest.raises(
        TrainingError, match=r"loss became nan at epoch 2, step 4; the last good checkpoint is"
    ):
        fit(model, poisoned, _groups(model), Blobs(), sched, tmp_path, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["state"]["step"] == 4  # steps 0-3 finished cleanly; step 4 hit NaN
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def _fit_scored(
    model: torch.nn.Module, scores: list[float], sched: Schedule, out: Path, **kwargs: Any
) -> FitResult:
    """``fit`` whose validation returns ``scores`` in turn as the monitored ``val_score``."""
    feed = iter(scores)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"val_score": next(feed)}

    return fit(
        model, supervised_step, _groups(model), Blobs(), sched, out,
        evaluate=evaluate, monitor="val_score", progress=False, **kwargs,
    )  # fmt: skip


def test_early_stopping_restores_best_weights(tmp_path: Path) -> None:
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def remember(model: torch.nn.Module, epoch: int, record: dict[str, float]) -> None:
        snapshots[epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}

    model = _model()
    sched = Schedule(epochs=6, batch_size=16, patience=2)
    r = _fit_scored(model, [0.5, 0.9, 0.7, 0.6, 0.8, 0.99], sched, tmp_path, on_epoch_end=remember)
    assert r.stopped_early and r.best_epoch == 2 and len(r.history) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])


def test_frozen_parameters_do_not_change(tmp_path: Path) -> None:
    model = _model()
    stem = model.backbone.stem
    for p in stem.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    fit(
        model,
        supervised_step,
        _groups(model),
        Blobs(),
        Schedule(epochs=1, batch_size=16),
        tmp_path,
        progress=False,
    )
    for k, v in stem.state_dict().items():
        assert torch.equal(v, before[k])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _model()
        r = fit(
            model,
            supervised_step,
            _groups(model),
            Blobs(),
            Schedule(epochs=3, lr=2e-3, batch_size=12),
            Path(out),
            progress=False,
        )
        if rank == 0:
            torch.save(
                {"losses": [h["train_loss"] for h in r.history], "weights": model.state_dict()},
                Path(out) / "result.pt",
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_follow_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = _model()
    r = fit(
        single,
        supervised_step,
        _groups(single),
        Blobs(),
        Schedule(epochs=3, lr=2e-3, batch_size=12),
        tmp_path / "one",
        progress=False,
    )
    (tmp_path / "two").mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    assert two["losses"] == pytest.approx([h["train_loss"] for h in r.history], rel=1e-4, abs=1e-5)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(two["weights"][k], v, rtol=1e-4, atol=1e-5)


def test_min_epochs_holds_off_early_stopping(tmp_path: Path) -> None:
    sched = Schedule(epochs=6, batch_size=16, patience=2, min_epochs=5)
    r = _fit_scored(_model(), [0.5, 0.5, 0.5, 0.5, 0.6, 0.6], sched, tmp_path)
    assert (
        len(r.history) == 6 and r.best_epoch == 5
    )  # without min_epochs it would stop after epoch 3


def test_loop_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """The typed loop state is what the checkpoint holds, key for key, and reads back equal."""
    model = _model()
    sched = Schedule(epochs=2, lr=1e-3, batch_size=16)
    fit(model, supervised_step, _groups(model), Blobs(), sched, tmp_path, progress=False)
    raw = torch.load(tmp_path / CHECKPOINT, weights_only=True)["state"]
    state = LoopState.from_dict(raw, tmp_path / CHECKPOINT)
    assert state.to_dict() == raw
    assert (state.epoch, state.step, state.samples, state.n) == (2, 6, 96, 48)


def test_checkpoint_without_loop_state_is_one_clear_error(tmp_path: Path) -> None:
    model = _model()
    sched = Schedule(epochs=1, lr=1e-3, batch_size=16)
    fit(model, supervised_step, _groups(model), Blobs(), sched, tmp_path, progress=False)
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    del payload["state"]["history"]
    torch.save(payload, tmp_path / CHECKPOINT)
    sched = Schedule(epochs=2, lr=1e-3, batch_size=16)
    with pytest.raises(TrainingError, match=r"lacks the loop state \['history'\]"):
        fit(model, supervised_step, _groups(model), Blobs(), sched, tmp_path, progress=False)


def test_early_stopping_keeps_the_best_and_waits_for_min_epochs() -> None:
    net = torch.nn.Linear(2, 1)
    stop = EarlyStopping("auc", patience=2, min_epochs=5)
    state = LoopState(seed=0, n=4)
    for epoch, auc in enumerate([0.6, 0.8, 0.7, 0.7], start=1):
        if epoch == 2:
            with torch.no_grad():
                net.weight.fill_(3.0)
        else:
            with torch.no_grad():
                net.weight.fill_(-1.0)
        stop.update(state, {"epoch": epoch, "auc": auc}, net)
        state.epoch = epoch
    assert (state.best_epoch, state.best_score, state.bad_epochs) == (2, 0.8, 2)
    assert stop.best is not None and bool((stop.best["weight"] == 3.0).all())
    assert not stop.should_stop(state)  # patience met, but min_epochs not yet
    state.epoch = 5
    assert stop.should_stop(state)


@pytest.mark.parametrize(("n", "batch"), [(33, 32), (65, 32), (1, 32), (32, 32), (34, 32), (2, 1)])
def test_epoch_batches_cover_every_sample_once_and_none_holds_one_of_several(
    n: int, batch: int
) -> None:
    from medtl.train import OrderSampler, steps_per_epoch

    batches = OrderSampler(n, batch, 0, 2, True, 0, 0, 1).batches()
    assert sorted(i for b in batches for i in b) == list(range(2 * n, 3 * n))
    assert len(batches) == steps_per_epoch(n, batch)
    assert n <= 1 or batch == 1 or min(len(b) for b in batches) > 1


def test_a_batchnorm_network_trains_when_the_last_batch_would_hold_one_sample(
    tmp_path: Path,
) -> None:
    """17 samples in batches of 16: the 17th joins the first batch instead of a batch of one,
    which a BatchNorm network cannot train on."""
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=2, in_chans=1)
    sched = Schedule(epochs=1, lr=1e-3, batch_size=16)
    result = fit(model, supervised_step, _groups(model), Blobs(17), sched, tmp_path, progress=False)
    assert result.steps == 1 and result.samples_seen == 17


@pytest.mark.parametrize(("setting", "expected"), [(None, True), (False, False), (True, True)])
def test_channels_last_on_cpu_by_default_and_weights_handed_back_contiguous(
    tmp_path: Path, setting: bool | None, expected: bool
) -> None:
    """``channels_last=None`` trains in channels-last on CPU (measured faster there); whatever
    the setting, the caller gets contiguous weights (safetensors refuses other strides)."""
    model = _model()
    stem = next(  # a weight whose two formats differ (not 1 input channel, not 1x1)
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[2] > 1
    )
    seen: list[bool] = []

    def look(net: torch.nn.Module, epoch: int, metrics: dict[str, float]) -> None:
        seen.append(
            stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        )

    sched = Schedule(epochs=1, lr=1e-3, batch_size=16, channels_last=setting)
    fit(
        model,
        supervised_step,
        _groups(model),
        Blobs(),
        sched,
        tmp_path,
        on_epoch_end=look,
        progress=False,
    )
    assert seen == [expected]
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("amp", [False, True])
def test_amp_trains_under_bfloat16_autocast_on_cpu(tmp_path: Path, amp: bool) -> None:
    """``amp`` runs the step under bfloat16 autocast on CPU too (measured faster for ConvNeXt
    there); the weights stay float32 and the run learns."""
    dtypes: list[torch.dtype] = []

    def step(
        model: torch.nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        out = supervised_step(model, batch, ctx)
        dtypes.append(out["output"].dtype)
        return out

    model = _model()
    sched = Schedule(epochs=3, lr=3e-3, batch_size=16, amp=amp)
    result = fit(model, step, _groups(model), Blobs(), sched, tmp_path, progress=False)
    assert set(dtypes) == {torch.bfloat16 if amp else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
