"""``fit``: the one training loop behind MAE pretraining, every fine-tuning strategy and every
search candidate.

What differs between them is the *step* (a callable returning ``{"loss", "output"}``) and the
parameter groups (which tensors train, and each group's ``lr_scale``). ``fit`` owns what must
be done once and right: seeding, data order, the learning-rate schedule, checkpoints written
atomically every N steps, exact resume, the NaN guard, validation and early stopping, the
progress bar, and DistributedDataParallel.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from ``(seed, e)``; the
random augmentation of sample ``i`` in epoch ``e`` is seeded from ``(seed, e, i)``; each step
reseeds torch from ``(seed, step)`` and hands the step a per-sample seed list. A run resumed from
any checkpoint therefore continues exactly as the uninterrupted run would have, and a run on
``W`` processes with per-process batch ``B/W`` follows the one-process run with batch ``B``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from medtl import tracking
from medtl.errors import MedtlError
from medtl.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class TrainingError(MedtlError):
    """Training cannot go on (non-finite loss, a checkpoint from another run)."""


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class Schedule:
    """Optimisation settings shared by every caller of :func:`fit`."""

    epochs: int
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = None
    batch_size: int = 32  # global batch (split across processes under DDP)
    num_workers: int = 0
    amp: bool = False  # bfloat16 autocast on CUDA (where supported); ignored on CPU
    patience: int | None = None  # early stopping on the monitored validation metric
    min_epochs: int = 0  # early stopping never ends a run before this many epochs
    checkpoint_every: int = 50  # steps; also at every epoch end

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(
                f"bad schedule: epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}"
            )

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Linear warm-up then cosine decay, per step."""
        total = self.epochs * steps_per_epoch
        warm = self.warmup_epochs * steps_per_epoch
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1.0, total - warm)
        low = self.lr * self.min_lr_ratio
        return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class StepContext:
    """What a step may need beyond the batch: where it is, and per-sample seeds."""

    epoch: int
    step: int
    sample_seeds: list[int]  # one per sample in the (local) batch, independent of sharding
    device: torch.device


Step = Callable[[nn.Module, dict[str, Any], StepContext], dict[str, torch.Tensor]]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int | None
    best_score: float | None
    stopped_early: bool
    steps: int
    samples_seen: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- data order ---------------------------------------------------------------------------------
class EpochSeeded(Dataset):
    """Index ``epoch * n + i`` -> sample ``i`` with its random transforms seeded by ``(seed, epoch, i)``."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.n = base, seed, len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, code: int) -> Any:
        epoch, i = divmod(int(code), self.n)
        transform: Any = getattr(self.base, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=mix_seed(self.seed, epoch, i))
        item = self.base[i]
        if isinstance(item, dict):
            item = {**item, "index": i, "sample_seed": mix_seed(self.seed, epoch, i, 1)}
        return item


class OrderSampler(Sampler[int]):
    """This process's share of epoch ``epoch``'s seeded order, from batch ``skip`` on.

    The global order is cut into global batches; under DDP rank ``r`` of ``W`` takes the
    ``r``-th contiguous chunk of every global batch.
    """

    def __init__(
        self,
        n: int,
        batch: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        skip: int,
        rank: int,
        world: int,
    ):
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, epoch
        self.shuffle, self.skip, self.rank, self.world = shuffle, skip, rank, world

    def batches(self) -> list[list[int]]:
        order = (
            np.random.default_rng(mix_seed(self.seed, self.epoch)).permutation(self.n)
            if self.shuffle
            else np.arange(self.n)
        )
        out = []
        for start in range(self.skip * self.batch, self.n, self.batch):
            chunk = np.array_split(order[start : start + self.batch], self.world)[self.rank]
            out.append([self.epoch * self.n + int(i) for i in chunk])
        return out

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())


def steps_per_epoch(n: int, batch: int) -> int:
    return max(1, math.ceil(n / batch))


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model, optimizer, loop state and the best weights so far in one file, written
    atomically (tensors and plain types only, so that it loads with ``weights_only=True``)."""
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
    }
    if best is not None:
        payload["best"] = best
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"checkpoint {path} cannot be read ({exc}); delete it to start over"
        ) from None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- the loop ---------------------------------------------------------------------------------------
def fit(
    model: nn.Module,
    step: Step,
    param_groups: Sequence[dict[str, Any]],
    data: Dataset,
    schedule: Schedule,
    out: Path | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    evaluate: Evaluate | None = None,
    monitor: str | None = None,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    on_epoch_end: Callable[[nn.Module, int, dict[str, float]], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with AdamW over ``param_groups`` (each may carry ``lr_scale``).

    Args:
        step: ``(model, batch, ctx) -> {"loss": scalar, "output": ...}``; loss is the mean
            over the local batch.
        evaluate: validation, called after every epoch on the unwrapped model (eval mode);
            ``monitor`` names the key it returns whose maximum is kept (best weights are restored
            at the end) and drives early stopping with ``schedule.patience``.
        on_epoch_start / on_epoch_end: hooks (e.g. Auto-RGN's lr weights, pictures).
        train_mode: called after ``model.train()`` (e.g. frozen BatchNorm back to eval).
        out: folder for ``checkpoint.pt`` and ``history.csv``; resumed from when ``resume``.
        stop_after_steps: stop (after checkpointing) once this many steps are done in this call;
            used to test interruption.
    """
    device = torch.device(device)
    rank, world = dist_info()
    torch.manual_seed(seed)
    model.to(device)
    # The caller's group dicts themselves go to the optimizer (torch keeps them), so a hook that
    # changes a group's ``lr_scale`` between epochs (Auto-RGN) reaches the next step.
    groups = list(param_groups)
    for g in groups:
        g["params"] = list(g["params"])
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
    ddp = world > 1
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    n = len(data)  # type: ignore[arg-type]
    per_epoch = steps_per_epoch(n, schedule.batch_size)
    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "samples": 0,
        "history": [],
        "running": 0.0,
        "seen": 0,
        "best_score": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "seconds": 0.0,
        "seed": seed,
        "n": n,
    }
    best_weights: dict[str, torch.Tensor] | None = None
    ckpt = out / CHECKPOINT if out is not None else None
    if ckpt is not None and resume and ckpt.is_file():
        loaded = load_checkpoint(ckpt)
        if loaded["state"].get("seed") != seed or loaded["state"].get("n") != n:
            raise TrainingError(
                f"checkpoint {ckpt} belongs to another run (seed or data size differ); "
                "use another output folder or delete it"
            )
        unwrap(wrapped).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        state = loaded["state"]
        best_weights = loaded.get("best")
        log.info("resumed from %s at epoch %d, batch %d", ckpt, state["epoch"], state["batch"])

    seeded = EpochSeeded(data, seed)
    started = time.perf_counter() - state["seconds"]
    steps_this_call = 0
    stopped_early = False

    def checkpoint() -> None:
        if ckpt is not None and rank == 0:
            state["seconds"] = time.perf_counter() - started
            save_checkpoint(ckpt, wrapped, optimizer, dict(state), best_weights)
        if ddp:
            dist.barrier()

    while state["epoch"] < schedule.epochs:
        epoch = state["epoch"]
        if on_epoch_start is not None:
            on_epoch_start(unwrap(wrapped), epoch)
        sampler = OrderSampler(
            n, schedule.batch_size, seed, epoch, True, state["batch"], rank, world
        )
        local_sizes = [len(b) for b in sampler.batches()]
        global_sizes = [
            min(schedule.batch_size, n - (state["batch"] + k) * schedule.batch_size)
            for k in range(len(local_sizes))
        ]
        loader = DataLoader(
            seeded,
            batch_sampler=_BatchSampler(sampler),
            num_workers=schedule.num_workers,
            collate_fn=default_collate,
        )
        wrapped.train()
        if train_mode is not None:
            train_mode(unwrap(wrapped))
        bar = _progress(
            len(local_sizes), f"epoch {epoch + 1}/{schedule.epochs}", progress and rank == 0
        )
        # The epoch's running loss lives in the state, so an epoch resumed mid-way reports the
        # same mean as an uninterrupted one.
        if state["batch"] == 0:
            state["running"], state["seen"] = 0.0, 0
        t0, seen_at_start = time.perf_counter(), state["seen"]
        lr = schedule.lr_at(max(state["step"] - 1, 0), per_epoch)  # if no batch is left to resume
        for k, batch in enumerate(loader):
            lr = schedule.lr_at(state["step"], per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            torch.manual_seed(mix_seed(seed, state["step"]))
            batch = _to_device(batch, device)
            ctx = StepContext(
                epoch, state["step"], [int(s) for s in batch.pop("sample_seed")], device
            )
            with _autocast(device, schedule.amp):
                result = step(wrapped, batch, ctx)
            loss = result["loss"]
            if not torch.isfinite(loss.detach()).all():
                where = f"epoch {epoch + 1}, step {state['step']}"
                kept = (
                    f"the last good checkpoint is {ckpt}"
                    if ckpt is not None and ckpt.is_file()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"loss became {loss.item()} at {where}; {kept}. Lower the learning rate, "
                    "enable gradient clipping (grad_clip) or check the data"
                )
            scale = local_sizes[k] * world / global_sizes[k]  # exact global mean under DDP
            optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()
            if schedule.grad_clip:
                nn.utils.clip_grad_norm_(wrapped.parameters(), schedule.grad_clip)
            optimizer.step()
            state["step"] += 1
            state["batch"] += 1
            state["samples"] += global_sizes[k]
            state["running"] += float(loss.detach()) * local_sizes[k]
            state["seen"] += local_sizes[k]
            steps_this_call += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{state['running'] / state['seen']:.4f}",
                img_s=f"{(state['seen'] - seen_at_start) * world / max(1e-9, time.perf_counter() - t0):.0f}",
            )
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                bar.close()
                checkpoint()
                return _result(state, stopped_early, started, extra={"interrupted": True})
            if state["step"] % schedule.checkpoint_every == 0:
                checkpoint()
        bar.close()
        record = {
            "epoch": epoch + 1,
            "train_loss": _global_mean(state["running"], state["seen"], device, ddp),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        if evaluate is not None:
            unwrap(wrapped).eval()
            with torch.no_grad():
                record.update(evaluate(unwrap(wrapped)))
        if monitor is not None:
            if monitor not in record:
                raise TrainingError(f"monitored metric {monitor!r} is not among {sorted(record)}")
            score = float(record[monitor])
            if state["best_score"] is None or score > state["best_score"]:
                state["best_score"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
                best_weights = {
                    k: v.detach().clone().cpu() for k, v in unwrap(wrapped).state_dict().items()
                }
            else:
                state["bad_epochs"] += 1
        state["history"].append(record)
        if rank == 0:
            per_epoch_s = (time.perf_counter() - started) / (epoch + 1)
            report_epoch(record, schedule.epochs, per_epoch_s * (schedule.epochs - epoch - 1))
        if on_epoch_end is not None:
            on_epoch_end(unwrap(wrapped), epoch, record)
        state["epoch"], state["batch"] = epoch + 1, 0
        if out is not None and rank == 0:
            write_history(out / "history.csv", state["history"])
        if (
            schedule.patience is not None
            and monitor is not None
            and state["bad_epochs"] >= schedule.patience
            and epoch + 1 >= schedule.min_epochs
        ):
            stopped_early = True
            state["epoch"] = schedule.epochs  # finished: a resume does not train further
        checkpoint()
    if best_weights is not None:
        unwrap(wrapped).load_state_dict(best_weights)
    return _result(state, stopped_early, started)


def report_epoch(record: dict[str, float], epochs: int, eta_s: float) -> None:
    """One log line per epoch (with the time left at most, early stopping aside) and the
    record to the active tracker (TensorBoard / MLflow), if a stage opened one."""
    shown = ", ".join(
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k not in ("epoch", "lr", "seconds") and isinstance(v, int | float)
    )
    log.info(
        "epoch %d/%d: %s; %.0f s; at most %s left",
        record["epoch"],
        epochs,
        shown,
        record["seconds"],
        duration(eta_s),
        extra={"event": "epoch", "epochs": epochs, "eta_s": eta_s, "metrics": record},
    )
    tracking.log_epoch(record, int(record["epoch"]))


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _result(
    state: dict[str, Any], stopped_early: bool, started: float, extra: dict[str, Any] | None = None
) -> FitResult:
    return FitResult(
        list(state["history"]),
        state["best_epoch"],
        state["best_score"],
        stopped_early,
        state["step"],
        state["samples"],
        time.perf_counter() - started,
        extra or {},
    )


class _BatchSampler(Sampler[list[int]]):
    def __init__(self, order: OrderSampler) -> None:
        self.order = order

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.order.batches())

    def __len__(self) -> int:
        return len(self.order.batches())


def _to_device(batch: Any, device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _global_mean(total: float, count: int, device: torch.device, ddp: bool) -> float:
    if not ddp:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1.0)


def _autocast(device: torch.device, amp: bool) -> Any:
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)  # bf16 needs no loss scaling
    return torch.autocast(device.type, enabled=False)


class _Quiet:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, show: bool) -> Any:
    """A tqdm bar on an interactive terminal; nothing in logs, CI or batch jobs."""
    if not show or not sys.stderr.isatty():
        return _Quiet()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """``history.csv``: one row per epoch, all keys seen so far as columns."""
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def supervised_step(
    model: nn.Module, batch: dict[str, Any], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """Cross-entropy of ``model(batch["image"])`` against ``batch["label"]``."""
    logits = model(batch["image"])
    return {"loss": nn.functional.cross_entropy(logits, batch["label"]), "output": logits}
