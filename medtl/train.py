"""``fit``: the one training loop behind MAE pretraining, every fine-tuning strategy and every
search candidate.

What differs between them is the *step* (a callable returning ``{"loss", "output"}``) and the
parameter groups (which tensors train, and each group's ``lr_scale``). ``fit`` owns what must
be done once and right: seeding, data order, the learning-rate schedule, checkpoints written
atomically every N steps, exact resume, the NaN guard, validation and early stopping, the
progress bar, and DistributedDataParallel.

The loop reads at once because its parts are small typed pieces: :class:`LoopState` (where a run
is; what a checkpoint holds), :class:`Checkpointer` (atomic save and exact restore),
:class:`EarlyStopping` (best weights and patience), :func:`check_finite` (the NaN guard) and the
caller's :class:`Hooks`; ``_Loop`` strings them together epoch by epoch.

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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
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
    amp: bool = False  # bfloat16 autocast (CUDA where bf16 is supported, and CPU)
    # channels-last memory format for weights and images; None: on for CPU, off for CUDA
    # (measured: 1.55x for efficientnet_lite0 fine-tuning on CPU, docs/performance.md)
    channels_last: bool | None = None
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


class OptimConfig(BaseModel):
    """The optimisation keys shared by the ``pretrain`` and ``finetune`` recipe sections (and so
    by search candidates, which train with the ``finetune`` section's): AdamW, linear warm-up,
    cosine decay. Both sections subclass it, so the keys stay flat in a recipe;
    :meth:`schedule` is the one place they become a :class:`Schedule`."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(
        32, ge=1, description="global batch (split across processes under torchrun)"
    )
    lr: float = Field(1e-3, gt=0, description="base learning rate (AdamW, warm-up then cosine)")
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="gradient-norm clip (null: none)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    amp: bool = Field(
        False,
        description="bfloat16 autocast (CUDA where bf16 is supported, and CPU; on CPU it pays "
        "with AVX-512 BF16 or AMX, docs/performance.md)",
    )
    channels_last: bool | None = Field(
        None,
        description="channels-last memory format; null: the stage's default (fine-tuning and "
        "masked BatchNorm-CNN pretraining: on for CPU, off for CUDA; other pretraining: off)",
    )

    def schedule(self, **stage: Any) -> Schedule:
        """These keys as a :class:`Schedule`; ``stage`` adds or replaces what the caller decides
        (``patience``, ``checkpoint_every``, the ``epochs`` of a search rung)."""
        keys = self.model_dump(include=set(OptimConfig.model_fields))
        return Schedule(**{**keys, **stage})


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
    """Index ``epoch * n + i`` -> sample ``i`` with its random transforms seeded by ``(seed, epoch, i)``.

    A base with a ``pick(epoch, i)`` method (a weighted pool of sources) gives the sample that
    epoch's draw ``i`` names instead."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.n = base, seed, len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, code: int) -> Any:
        epoch, i = divmod(int(code), self.n)
        transform: Any = getattr(self.base, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=mix_seed(self.seed, epoch, i))
        pick = getattr(self.base, "pick", None)  # a weighted pool: draw ``i`` of ``epoch``
        item = self.base[pick(epoch, i) if pick is not None else i]
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
        for start, stop in batch_bounds(self.n, self.batch)[self.skip :]:
            chunk = np.array_split(order[start:stop], self.world)[self.rank]
            out.append([self.epoch * self.n + int(i) for i in chunk])
        return out

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each global batch of an epoch of ``n`` samples. A last batch of one
    sample joins the batch before it: BatchNorm cannot train on a batch of one (timm's
    EfficientNet and ResNet stop with "Expected more than 1 value per channel"), and dropping
    it would leave that sample out of the epoch."""
    starts = list(range(0, n, batch))
    if batch > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def steps_per_epoch(n: int, batch: int) -> int:
    return max(1, len(batch_bounds(n, batch)))


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


# -- the loop's typed state and its pluggable pieces --------------------------------------------
@dataclass
class LoopState:
    """Where a run is. Saved in every checkpoint as plain types (loads with ``weights_only``)."""

    seed: int
    n: int  # training samples; a checkpoint of another data size is refused
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # optimizer steps in all
    samples: int = 0  # samples seen in all (global)
    running: float = 0.0  # the current epoch's summed loss (so a resumed epoch reports the
    seen: int = 0  # same mean as an uninterrupted one) and its sample count
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: Path) -> LoopState:
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in raw]
        if missing:
            raise TrainingError(
                f"checkpoint {where} lacks the loop state {missing}; delete it to start over"
            )
        return cls(**{k: raw[k] for k in names})


@dataclass
class Checkpointer:
    """Model, optimizer, loop state and best weights in one file, written atomically by rank 0
    (as timm's ``CheckpointSaver`` owns checkpoint files); restores them on resume."""

    path: Path | None
    rank: int = 0
    ddp: bool = False

    def restore(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
        if self.path is None or not self.path.is_file():
            return state, None
        loaded = load_checkpoint(self.path)
        saved = loaded["state"]
        if saved.get("seed") != state.seed or saved.get("n") != state.n:
            raise TrainingError(
                f"checkpoint {self.path} belongs to another run (seed or data size differ); "
                "use another output folder or delete it"
            )
        unwrap(model).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        state = LoopState.from_dict(saved, self.path)
        log.info("resumed from %s at epoch %d, batch %d", self.path, state.epoch, state.batch)
        return state, loaded.get("best")

    def save(
        self,
        state: LoopState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        best: dict[str, torch.Tensor] | None,
    ) -> None:
        if self.path is not None and self.rank == 0:
            save_checkpoint(self.path, model, optimizer, state.to_dict(), best)
        if self.ddp:
            dist.barrier()

    def last_good(self) -> str:
        if self.path is not None and self.path.is_file():
            return f"the last good checkpoint is {self.path}"
        return "no checkpoint was written yet"


@dataclass
class EarlyStopping:
    """Keeps the weights of the best epoch by ``monitor`` (maximised) and says when ``patience``
    epochs in a row have not beaten it (never before ``min_epochs``)."""

    monitor: str | None
    patience: int | None = None
    min_epochs: int = 0
    best: dict[str, torch.Tensor] | None = None

    def update(self, state: LoopState, record: dict[str, float], model: nn.Module) -> None:
        if self.monitor is None:
            return
        if self.monitor not in record:
            raise TrainingError(f"monitored metric {self.monitor!r} is not among {sorted(record)}")
        score = float(record[self.monitor])
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = score, int(record["epoch"]), 0
            self.best = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1

    def should_stop(self, state: LoopState) -> bool:
        return (
            self.patience is not None
            and self.monitor is not None
            and state.bad_epochs >= self.patience
            and state.epoch >= self.min_epochs
        )


def check_finite(loss: torch.Tensor, state: LoopState, saver: Checkpointer) -> None:
    """The NaN guard: a non-finite loss stops the run, naming where and what is kept."""
    if torch.isfinite(loss.detach()).all():
        return
    raise TrainingError(
        f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step}; "
        f"{saver.last_good()}. Lower the learning rate, enable gradient clipping (grad_clip) "
        "or check the data"
    )


@dataclass
class Hooks:
    """What a caller plugs into the loop: validation and per-epoch callbacks."""

    evaluate: Evaluate | None = None  # on the unwrapped model in eval mode, after every epoch
    on_epoch_start: Callable[[nn.Module, int], None] | None = None  # e.g. Auto-RGN's lr weights
    on_epoch_end: Callable[[nn.Module, int, dict[str, float]], None] | None = None  # pictures
    train_mode: Callable[[nn.Module], None] | None = None  # after ``model.train()``


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
    device, (rank, world) = torch.device(device), dist_info()
    torch.manual_seed(seed)
    schedule = _memory_format(model.to(device), schedule, device)
    optimizer, groups = _adamw(param_groups, schedule)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    saver = Checkpointer(out / CHECKPOINT if out is not None else None, rank, world > 1)
    state = LoopState(seed=seed, n=len(data))  # type: ignore[arg-type]
    best = None
    if resume:
        state, best = saver.restore(state, wrapped, optimizer)
        _rebind_groups(optimizer, groups)
    loop = _Loop(
        wrapped,
        step,
        optimizer,
        EpochSeeded(data, seed),
        schedule,
        device,
        Hooks(evaluate, on_epoch_start, on_epoch_end, train_mode),
        saver,
        EarlyStopping(monitor, schedule.patience, schedule.min_epochs, best),
        state,
        out,
        progress and rank == 0,
        rank,
        world,
    )
    try:
        return loop.run(stop_after_steps)
    finally:  # the caller gets plain contiguous weights (safetensors refuses other strides)
        model.to(memory_format=torch.contiguous_format)


def _memory_format(model: nn.Module, schedule: Schedule, device: torch.device) -> Schedule:
    """``schedule`` with ``channels_last`` decided (``None``: on for CPU, off elsewhere), the
    model's weights put in that format."""
    on = device.type == "cpu" if schedule.channels_last is None else schedule.channels_last
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    return replace(schedule, channels_last=on)


def _adamw(
    param_groups: Sequence[dict[str, Any]], schedule: Schedule
) -> tuple[torch.optim.Optimizer, list[dict[str, Any]]]:
    """AdamW over the caller's group dicts themselves (torch keeps them), so that a hook that
    changes a group's ``lr_scale`` between epochs (Auto-RGN) reaches the next step."""
    groups = list(param_groups)
    for g in groups:
        g["params"] = list(g["params"])
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
    return optimizer, groups


def _rebind_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Make the caller's group dicts the optimizer's again after ``load_state_dict`` (which
    puts copies in their place), holding the restored values, so that an epoch hook's
    ``lr_scale`` keeps reaching the steps after a resume."""
    for i, (mine, loaded) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        mine.update(loaded)
        optimizer.param_groups[i] = mine


@dataclass
class _Loop:
    """One call of :func:`fit`: the epochs, their steps and their end-of-epoch work."""

    model: nn.Module  # wrapped in DistributedDataParallel under DDP
    step_fn: Step
    optimizer: torch.optim.Optimizer
    data: EpochSeeded
    schedule: Schedule
    device: torch.device
    hooks: Hooks
    saver: Checkpointer
    stopper: EarlyStopping
    state: LoopState
    out: Path | None
    show_progress: bool
    rank: int = 0
    world: int = 1
    lr: float = 0.0
    steps_this_call: int = 0
    stopped_early: bool = False
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.started -= self.state.seconds
        self.per_epoch = steps_per_epoch(self.state.n, self.schedule.batch_size)

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    def run(self, stop_after_steps: int | None) -> FitResult:
        while self.state.epoch < self.schedule.epochs:
            seconds = self.train_epoch(stop_after_steps)
            if seconds is None:
                return self.result(interrupted=True)
            self.end_epoch(seconds)
        if self.stopper.best is not None:
            self.net.load_state_dict(self.stopper.best)
        return self.result()

    def checkpoint(self) -> None:
        self.state.seconds = time.perf_counter() - self.started
        self.saver.save(self.state, self.model, self.optimizer, self.stopper.best)

    def loader(self, epoch: int) -> tuple[DataLoader, list[int], list[int]]:
        """This process's batches of the epoch from the resume point, with the local and the
        global size of each."""
        n, size, done = self.state.n, self.schedule.batch_size, self.state.batch
        sampler = OrderSampler(n, size, self.state.seed, epoch, True, done, self.rank, self.world)
        local = [len(b) for b in sampler.batches()]
        global_ = [stop - start for start, stop in batch_bounds(n, size)[done:]]
        loader = DataLoader(
            self.data,
            batch_sampler=_BatchSampler(sampler),
            num_workers=self.schedule.num_workers,
            collate_fn=default_collate,
        )
        return loader, local, global_

    def train_epoch(self, stop_after_steps: int | None) -> float | None:
        """The epoch's remaining steps; its seconds, or None when stopped after
        ``stop_after_steps`` (checkpointed)."""
        state, epoch = self.state, self.state.epoch
        if self.hooks.on_epoch_start is not None:
            self.hooks.on_epoch_start(self.net, epoch)
        loader, local, global_ = self.loader(epoch)
        self.model.train()
        if self.hooks.train_mode is not None:
            self.hooks.train_mode(self.net)
        bar = _progress(len(local), f"epoch {epoch + 1}/{self.schedule.epochs}", self.show_progress)
        if state.batch == 0:
            state.running, state.seen = 0.0, 0
        t0, seen_at_start = time.perf_counter(), state.seen
        self.lr = self.schedule.lr_at(max(state.step - 1, 0), self.per_epoch)  # none left
        for k, batch in enumerate(loader):
            self.train_step(batch, local[k], global_[k])
            bar.update(1)
            img_s = (state.seen - seen_at_start) * self.world / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{state.running / state.seen:.4f}", img_s=f"{img_s:.0f}")
            if stop_after_steps is not None and self.steps_this_call >= stop_after_steps:
                bar.close()
                self.checkpoint()
                return None
            if state.step % self.schedule.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        return time.perf_counter() - t0

    def train_step(self, batch: dict[str, Any], local: int, global_: int) -> None:
        state = self.state
        self.lr = self.schedule.lr_at(state.step, self.per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)
        torch.manual_seed(mix_seed(state.seed, state.step))
        batch = _to_device(batch, self.device)
        image = batch.get("image")
        if self.schedule.channels_last and isinstance(image, torch.Tensor) and image.ndim == 4:
            batch["image"] = image.contiguous(memory_format=torch.channels_last)
        seeds = [int(s) for s in batch.pop("sample_seed")]
        ctx = StepContext(state.epoch, state.step, seeds, self.device)
        with _autocast(self.device, self.schedule.amp):
            loss = self.step_fn(self.model, batch, ctx)["loss"]
        check_finite(loss, state, self.saver)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * (local * self.world / global_)).backward()  # exact global mean under DDP
        if self.schedule.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.grad_clip)
        self.optimizer.step()
        state.step, state.batch, state.samples = (
            state.step + 1,
            state.batch + 1,
            state.samples + global_,
        )
        state.running += float(loss.detach()) * local
        state.seen += local
        self.steps_this_call += 1

    def end_epoch(self, seconds: float) -> None:
        """Validation, the best weights, history, logs, hooks, early stopping, a checkpoint."""
        state, epoch = self.state, self.state.epoch
        record = {
            "epoch": epoch + 1,
            "train_loss": _global_mean(state.running, state.seen, self.device, self.world > 1),
            "lr": self.lr,
            "seconds": seconds,
        }
        if self.hooks.evaluate is not None:
            self.net.eval()
            with torch.no_grad():
                record.update(self.hooks.evaluate(self.net))
        self.stopper.update(state, record, self.net)
        state.history.append(record)
        if self.rank == 0:
            per_epoch_s = (time.perf_counter() - self.started) / (epoch + 1)
            report_epoch(
                record, self.schedule.epochs, per_epoch_s * (self.schedule.epochs - epoch - 1)
            )
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(self.net, epoch, record)
        state.epoch, state.batch = epoch + 1, 0
        if self.out is not None and self.rank == 0:
            write_history(self.out / "history.csv", state.history)
        if self.stopper.should_stop(state):
            self.stopped_early = True
            state.epoch = self.schedule.epochs  # finished: a resume does not train further
        self.checkpoint()

    def result(self, interrupted: bool = False) -> FitResult:
        s = self.state
        return FitResult(
            list(s.history),
            s.best_epoch,
            s.best_score,
            self.stopped_early,
            s.step,
            s.samples,
            time.perf_counter() - self.started,
            {"interrupted": True} if interrupted else {},
        )


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


def bf16_autocast(device: str | torch.device, amp: bool) -> Any:
    """The bfloat16 autocast context training runs under with ``amp`` (bf16 needs no loss
    scaling): on CUDA where the GPU supports bf16, and on CPU (fast with AVX-512 BF16 or AMX);
    ``None`` without ``amp`` or elsewhere."""
    kind = torch.device(device).type
    if amp and (kind == "cpu" or (kind == "cuda" and torch.cuda.is_bf16_supported())):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return None


def _autocast(device: torch.device, amp: bool) -> Any:
    return bf16_autocast(device, amp) or torch.autocast(device.type, enabled=False)


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
