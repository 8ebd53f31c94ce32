"""Candidate training: what every worker of a search shares (:class:`Search`), and how it
trains and scores one trial, on the train and val splits only."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtl import tracking
from medtl.data.dataset import DataConfig, build_dataset, input_stats
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError
from medtl.finetune import prefix as px
from medtl.finetune.blocks import blocks_of
from medtl.finetune.defaults import STRATEGY_KNOBS, start_of
from medtl.finetune.loop import (
    FinetuneConfig,
    balanced_accuracy,
    class_weight_tensor,
    make_step,
    predict,
)
from medtl.finetune.search.config import RETRAIN_ONLY, BioTuneConfig, rungs, warmup_note
from medtl.finetune.search.sampler import BioTuneSampler, gene_names
from medtl.finetune.strategies import Plan, plan
from medtl.models import Classifier, build_classifier
from medtl.sources import resolve as resolve_weights
from medtl.train import FitResult, Schedule, bf16_autocast, fit

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class SearchTask:
    """What a search is asked to do: its settings, the fine-tuning it stands for, the data, the
    search folder, the initial weights and where it runs."""

    cfg: BioTuneConfig
    ft: FinetuneConfig
    manifest: Manifest
    root: Path
    data_cfg: DataConfig
    out: Path
    weights: str | Path | None = None
    device: str = "cpu"
    progress: bool = True


@dataclasses.dataclass
class Runner:
    """What ``fit`` trains for one trial: the network (the whole model, or its trainable suffix
    on cached features), its train data, the validation score, the train-mode rule and the
    epoch-equivalents spent filling the feature cache."""

    net: nn.Module
    data: Any
    evaluate: Evaluate
    train_mode: Callable[[nn.Module], None]
    fill: float


@dataclasses.dataclass
class Prepared:
    """One candidate ready to train: its plan, what ``fit`` trains, whether on cached features,
    and the epoch-equivalents of one of its epochs (validation included)."""

    plan: Plan
    runner: Runner
    cached: bool
    cost: float


class Search:
    """What every worker of a search shares: configuration, data, blocks, where the model can be
    cut (:class:`~medtl.finetune.prefix.Cuts`) and this process's prefix-feature cache.
    Datasets are built on first use."""

    def __init__(self, task: SearchTask) -> None:
        if not task.manifest.classes:
            raise ConfigError("the BioTune search needs a labelled manifest; it has no classes")
        self.task, self.cfg, self.manifest = task, task.cfg, task.manifest
        self.ft = task.ft.for_start(start_of(task.weights))  # candidates train as finetune does
        self.root, self.data_cfg, self.out = Path(task.root), task.data_cfg, Path(task.out)
        self.weights, self.device, self.progress = task.weights, task.device, task.progress
        self.seeds = [self.cfg.seed + i for i in range(self.cfg.seeds)]
        self.rungs = rungs(self.cfg)
        if note := warmup_note(self.cfg, self.ft.warmup_epochs or 0.0):
            log.warning("%s", note)
        self.n_train = len(self.manifest.split("train"))
        self.n_val = len(self.manifest.split("val"))
        self.mean, self.std = input_stats(self.manifest, self.root, self.data_cfg)
        self.augment = "none" if self.cfg.cache_prefix else self.ft.augment
        self.cache = px.FeatureCache(2)
        self._data: dict[str, Any] = {}
        model = self.build(self.seeds[0])
        self.blocks = [b.name for b in blocks_of(model)]
        side, channels = self.data_cfg.image_size, self.data_cfg.channels
        sample = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(0))
        self.cuts = px.Cuts.of(model, blocks_of(model), sample, self.n_train + self.n_val)
        self.genes = gene_names(self.blocks)
        self.sampler = BioTuneSampler(self.cfg, self.blocks, self.rungs, self.seeds)

    def build(self, seed: int) -> Classifier:
        """The candidate's initial model, built under ``seed`` as ``finetune`` builds it."""
        torch.manual_seed(seed)
        classes, channels = len(self.manifest.classes), self.data_cfg.channels
        return build_classifier(
            self.ft.backbone, classes, channels, self.weights, mean=self.mean, std=self.std
        )

    def identity(self) -> dict[str, Any]:
        """What must match for workers and resumed runs to share a store."""
        skip = {"storage", "study", "poll_seconds", "stale_seconds", "heartbeat_seconds"}
        return {
            "biotune": self.cfg.model_dump(mode="json", exclude=skip),
            # knobs that genome candidates never take stay out, so older stores stay valid
            "finetune": self.ft.model_dump(
                mode="json",
                exclude=RETRAIN_ONLY | {k for k in STRATEGY_KNOBS if getattr(self.ft, k) is None},
            ),
            # stores made before data.loader.normalize existed stay valid at its default
            "data": self.data_cfg.model_dump(
                mode="json",
                exclude={"normalize"} if self.data_cfg.normalize == "backbone" else None,
            ),
            "manifest": self.manifest.sha256,
            "weights": resolve_weights(self.weights).sha256 if self.weights else None,
            "blocks": self.blocks,
        }

    def cached(self, k: int) -> bool:
        """Whether a candidate whose first trainable block is ``k`` trains on cached features
        (never in ``reference``, which recomputes the prefix every epoch as plain ``fit`` does)."""
        if self.cfg.schedule == "reference" or not self.cfg.cache_prefix:
            return False
        return self.cuts.cacheable(k, self.cfg.cache_max_gb * 1e9)

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, split: Literal["train", "val"]) -> Any:
        """The train (``self.augment``) or val (no augmentation) dataset; never the test split."""
        if split not in self._data:
            aug = self.augment if split == "train" else "none"
            cfg = self.data_cfg.model_copy(update={"augment": aug})
            self._data[split] = build_dataset(
                self.manifest, split, self.root, cfg, train=split == "train", seed=self.cfg.seed
            )
        return self._data[split]

    def features(self, model: Classifier, k: int) -> tuple[dict[str, Any], bool]:
        """Prefix outputs of train and val for cut ``k`` of ``model``, and whether they came
        from the cache (keyed by ``k`` and the frozen prefix's weights). Train features are
        computed under ``fit``'s autocast, val features without, as ``predict`` runs."""
        segments, batch, device = px.segments_of(model) or [], self.ft.batch_size, self.device
        train, val = self.dataset("train"), self.dataset("val")

        def compute() -> dict[str, Any]:
            if self.ft.channels_last:  # the format the candidates then train in
                model.to(memory_format=torch.channels_last)
            cast = bf16_autocast(device, self.ft.amp)
            return {
                "train": px.prefix_features(model, segments, k, train, batch, device, cast),
                "val": px.prefix_features(model, segments, k, val, batch, device),
            }

        return self.cache.get((k, px.prefix_digest(model, segments, k)), compute)

    # -- one candidate ------------------------------------------------------------------------------
    def schedule(self, epochs: int) -> Schedule:
        """The recipe's optimisation for ``epochs``; early stopping only in ``reference``;
        checkpoints at epoch ends only (enough to resume a killed candidate); contiguous
        memory unless ``finetune.channels_last`` is set, as the cached prefix features are
        computed (so that cached and uncached candidates train alike)."""
        patience = self.cfg.patience if self.cfg.schedule == "reference" else None
        return self.ft.schedule(
            epochs=epochs,
            patience=patience,
            checkpoint_every=10**9,
            channels_last=bool(self.ft.channels_last),
        )

    def folder(self, number: int, seed: int) -> Path:
        """Candidate ``number``'s checkpoint folder for ``seed`` (kept only while it trains, to
        resume a killed run)."""
        return self.out / "trials" / f"t{number}-s{seed}"

    def prepare(self, genome: Sequence[float], seed: int) -> Prepared:
        """The candidate's model under ``seed``, its plan, what ``fit`` trains and the cost of
        one of its epochs (filling the prefix cache first when it trains on cached features)."""
        model = self.build(seed)
        genes = list(genome)
        the_plan = plan("genome", model, blocks_of(model), genes=genes[:-1], threshold=genes[-1])
        k = min(self.blocks.index(b) for b in the_plan.trainable_blocks)
        cached = self.cached(k)
        cost = self.cuts.epoch_cost(k, cached, self.n_val / self.n_train)
        return Prepared(the_plan, self._runner(model, the_plan, k, cached), cached, cost)

    def train(
        self,
        prepared: Prepared,
        seed: int,
        epochs: int,
        folder: Path,
        on_epoch: Callable[[int, dict[str, float]], None],
    ) -> FitResult:
        """Train ``prepared`` for ``epochs`` in ``folder`` (resuming its checkpoint; removed
        after), calling ``on_epoch(epoch, record)`` after each epoch's validation, which may
        raise to stop the run (a pruned candidate)."""
        runner = prepared.runner
        balanced = self.ft.class_weights == "balanced"
        step = make_step(
            class_weight_tensor(self.manifest) if balanced else None, self.ft.label_smoothing or 0.0
        )
        with tracking.child(f"search/{folder.name}"):
            result = fit(
                runner.net, step, prepared.plan.param_groups, runner.data, self.schedule(epochs),
                folder, seed=seed, device=self.device, evaluate=runner.evaluate,
                monitor="val_bacc", on_epoch_end=lambda _, epoch, record: on_epoch(epoch, record),
                train_mode=runner.train_mode, progress=self.progress,
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def _runner(self, model: Classifier, the_plan: Plan, k: int, cached: bool) -> Runner:
        """What ``fit`` trains: the whole model on images, or (``cached``) its suffix from
        block ``k`` on the frozen prefix's cached features."""
        if not cached:
            evaluate = self._val_score()  # the val split is built before train
            return Runner(model, self.dataset("train"), evaluate, the_plan.train_mode, 0.0)
        feats, hit = self.features(model, k)
        batch, device = self.ft.batch_size, self.device
        xv, yv = feats["val"]

        def evaluate_cached(m: nn.Module) -> dict[str, float]:
            parts = [
                m(xv[i : i + batch].to(device)).float().cpu() for i in range(0, len(xv), batch)
            ]
            return scores(yv.numpy(), torch.cat(parts).numpy())

        def train_mode(m: nn.Module) -> None:
            the_plan.train_mode(model)  # the plan names modules of the whole model

        # the candidate's own segments: ``self.cuts`` runs the model it was measured on
        net = px.SuffixModel(model, px.segments_of(model) or [], k)
        fill = 0.0 if hit else self.cuts.caching_cost(k, self.n_val / self.n_train)
        return Runner(net, px.FeatureSet(*feats["train"]), evaluate_cached, train_mode, fill)

    def _val_score(self) -> Evaluate:
        """Validation balanced accuracy of a whole model on the val images."""
        val, batch, device = self.dataset("val"), self.ft.batch_size, self.device

        def evaluate(m: nn.Module) -> dict[str, float]:
            _, y, z = predict(m, val, batch, device)
            return scores(y, z)

        return evaluate


def scores(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Validation balanced accuracy and mean cross-entropy of ``logits [N, K]``."""
    loss = F.cross_entropy(torch.from_numpy(logits).float(), torch.from_numpy(labels).long())
    return {"val_bacc": balanced_accuracy(labels, logits), "val_loss": float(loss)}
