"""``finetune``: one fine-tuning run of a classifier with a registered strategy.

The classifier starts from a pretrained source (:mod:`medtl.sources`), a medtl MAE encoder, a
local weights file, or random initialisation; it trains on the manifest's ``train`` split, chooses its epoch on ``val``
(balanced accuracy) and writes validation and test predictions for calibration and reports.
The test split is read once, after training, to write its predictions; nothing is chosen on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from medtl import __version__
from medtl.artifacts import ModelCard, Normalisation, WeightsProvenance
from medtl.data.dataset import DataConfig, build_dataset, input_stats
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError, DataError, reason
from medtl.finetune.defaults import STRATEGY_KNOBS, Start, defaults_for, start_of
from medtl.io import atomic_open
from medtl.models import Classifier, build_classifier, check_backbone, create_backbone
from medtl.predictions import Predictions
from medtl.train import FitResult, OptimConfig, Schedule, fit, supervised_step

if TYPE_CHECKING:
    from medtl.finetune.strategies import Plan
    from medtl.sources import SourceInfo

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


class FinetuneConfig(OptimConfig):
    """The ``finetune`` recipe section: the shared optimisation keys (:class:`OptimConfig`) and
    what fine-tuning adds.

    The start-dependent keys (``warmup_epochs``, ``label_smoothing``, ``augment``,
    ``backbone_lr_scale``, ``layer_decay``) may be null: :meth:`for_start` fills them with the
    pretrained or the scratch defaults of :mod:`medtl.finetune.defaults`."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("convnext_atto", description="timm model name")
    weights: str | None = Field(
        None,
        description="initial weights: a pretrained source ('imagenet:efficientnet_lite0', see "
        "`medtl list sources`), a local file (a medtl encoder, a timm checkpoint, a torchvision "
        "ResNet or a lukemelas EfficientNet), or 'pretrain' = this run's MAE encoder",
    )
    strategy: str = Field("full", description="fine-tuning strategy (`medtl list strategies`)")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the strategy"
    )
    patience: int | None = Field(
        5, ge=1, description="early stopping on validation balanced accuracy"
    )
    min_epochs: int = Field(
        10,
        ge=0,
        description="early stopping never ends a run before this epoch (a ConvNeXt from scratch "
        "can sit at chance for its first epochs while its layer scales grow)",
    )
    warmup_epochs: float | None = Field(  # type: ignore[assignment]
        None,
        ge=0,
        description="linear warm-up epochs; null: the start's default (docs/finetune.md)",
    )
    label_smoothing: float | None = Field(
        None, ge=0, lt=1, description="null: the start's default (docs/finetune.md)"
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="'balanced': inverse class frequency in the loss"
    )
    augment: Literal["none", "light", "medium"] | None = Field(
        None,
        description="train-time augmentation (data.loader's augment); null: the start's default",
    )
    backbone_lr_scale: float | None = Field(
        None,
        ge=0,
        le=1,
        description="learning rate of every block but the head, as a fraction of lr (strategies "
        "full and lpft); null: the start's default",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise decay: each block nearer the input trains at this times the rate "
        "of the next (strategies full and lpft; 1: none); null: the start's default",
    )

    def model_post_init(self, __context: Any) -> None:
        check_backbone(self.backbone)
        if self.weights not in (None, "pretrain"):
            from medtl.sources import check_spec

            try:
                check_spec(str(self.weights), self.backbone)
            except ValueError as exc:
                raise ConfigError(f"finetune.weights: {exc}") from None

    @property
    def start(self) -> Start:
        """Which defaults apply: ``pretrained`` when ``weights`` is set, else ``scratch``."""
        return start_of(self.weights)

    def for_start(self, start: Start | None = None) -> FinetuneConfig:
        """This section with every unset start-dependent key filled for ``start`` (default:
        :attr:`start`), ``backbone_lr_scale`` and ``layer_decay`` handed to the strategy
        when it takes them (``strategy_options`` given in the recipe win)."""
        from medtl.finetune.strategies import strategy_options_of

        start = start or self.start
        fill = {k: v for k, v in defaults_for(start).items() if getattr(self, k) is None}
        resolved = self.model_copy(update=fill)
        takes = strategy_options_of(self.strategy)
        options = dict(self.strategy_options)
        for key in STRATEGY_KNOBS:
            given = getattr(self, key)
            if key not in takes:
                if given is not None:
                    raise ConfigError(
                        f"finetune.{key}: strategy {self.strategy!r} takes no {key}; remove the "
                        f"key (strategies that take it: full, lpft)"
                    )
                resolved = resolved.model_copy(update={key: None})
                continue
            if key in options:
                if given is not None and given != options[key]:
                    raise ConfigError(
                        f"finetune.{key}={given} and finetune.strategy_options.{key}="
                        f"{options[key]}: set one of them"
                    )
                resolved = resolved.model_copy(update={key: options[key]})
            options[key] = getattr(resolved, key)
        return resolved.model_copy(update={"strategy_options": options})

    def schedule(self, **stage: Any) -> Schedule:
        """:meth:`OptimConfig.schedule` of a section resolved by :meth:`for_start`."""
        if self.warmup_epochs is None:
            raise ValueError(
                "finetune.warmup_epochs is unresolved: call FinetuneConfig.for_start() first"
            )
        return super().schedule(**stage)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        """A registered strategy, or a registered search (``biotune``) over strategies."""
        from medtl.finetune.methods import check_strategy

        return check_strategy(name)


@dataclass
class FinetuneResult:
    model_path: Path
    card: ModelCard
    val: Predictions
    test: Predictions | None

    @property
    def meta(self) -> dict[str, Any]:
        """The model card as the JSON object written to ``meta.json``."""
        return self.card.model_dump(mode="json")


def make_step(weights: torch.Tensor | None, smoothing: float) -> Any:
    def step(model: nn.Module, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        if weights is None and smoothing == 0:
            return supervised_step(model, batch, ctx)
        logits = model(batch["image"])
        w = weights.to(logits.device) if weights is not None else None
        loss = nn.functional.cross_entropy(
            logits, batch["label"], weight=w, label_smoothing=smoothing
        )
        return {"loss": loss, "output": logits}

    return step


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Row ids, labels ``[N]`` and logits ``[N, K]`` for every item of ``dataset``, in order;
    with ``desc``, a progress bar on an interactive terminal."""
    import sys

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    model.eval().to(device)
    ids: list[str] = []
    labels, logits = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    show = desc is not None and sys.stderr.isatty()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show):
        logits.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
        ids += list(batch["row"])
    return ids, torch.cat(labels).numpy(), torch.cat(logits).numpy()


def as_predictions(
    manifest: Manifest,
    split: str,
    ids: list[str],
    labels: np.ndarray,
    logits: np.ndarray,
    model: str,
) -> Predictions:
    group = {r.id: r.group for r in manifest.rows}
    return Predictions(
        ids,
        [group[i] for i in ids],
        labels,
        logits,
        list(manifest.classes),
        split,
        model,
        manifest.sha256,
    )


def balanced_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    return float(balanced_accuracy_score(labels, logits.argmax(1)))


def class_weight_tensor(manifest: Manifest) -> torch.Tensor:
    counts = np.array(
        [sum(r.label == c for r in manifest.split("train")) for c in manifest.classes], dtype=float
    )
    w = counts.sum() / np.maximum(counts, 1) / len(counts)
    return torch.tensor(w, dtype=torch.float32)


def finetune(
    cfg: FinetuneConfig,
    manifest: Manifest,
    root: Path,
    data_cfg: DataConfig,
    out: Path,
    seed: int = 0,
    weights: str | Path | None = None,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    recipe: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Train, select on validation, write ``model.safetensors``, ``meta.json`` and predictions."""
    out.mkdir(parents=True, exist_ok=True)
    if not manifest.classes:
        raise ConfigError("fine-tuning needs a labelled manifest; this one has no classes")
    cfg = cfg.for_start(start_of(weights))  # the start actually loaded decides the defaults
    run = _Run(cfg, manifest, root, data_cfg, out, seed, weights, device)
    built = _build(run)
    start = time.perf_counter()
    result = _fit(run, built, resume, progress)
    val, test = _predictions(run, built.model, built.val_ds)
    export_model(built.model, built.plan, out / MODEL_FILE)
    card = _model_card(run, built, result, time.perf_counter() - start, recipe or {})
    val.save(out / "predictions_val.csv")
    if test is not None:
        test.save(out / "predictions_test.csv")
    card.save(out / META_FILE)
    return FinetuneResult(out / MODEL_FILE, card, val, test)


@dataclass(frozen=True)
class _Run:
    """What one :func:`finetune` call was given, its section resolved for the start."""

    cfg: FinetuneConfig
    manifest: Manifest
    root: Path
    data_cfg: DataConfig
    out: Path
    seed: int
    weights: str | Path | None
    device: str

    def dataset(self, split: str) -> Any:
        """The un-augmented dataset of ``split`` (validation and test)."""
        plain = self.data_cfg.model_copy(update={"augment": "none"})
        return build_dataset(self.manifest, split, self.root, plain)


@dataclass
class _Built:
    """The classifier, where its weights came from, its strategy's plan and its data."""

    model: Classifier
    source: SourceInfo | None
    plan: Plan
    train_ds: Any
    val_ds: Any


def _build(run: _Run) -> _Built:
    """Seed, create the classifier from its starting weights, and apply the strategy."""
    from medtl.finetune.blocks import blocks_of
    from medtl.finetune.strategies import plan as make_plan
    from medtl.sources import load_source

    cfg, data_cfg = run.cfg, run.data_cfg
    torch.manual_seed(run.seed)
    mean, std = input_stats(run.manifest, run.root, data_cfg)
    backbone = create_backbone(cfg.backbone, len(run.manifest.classes), data_cfg.channels)
    source = load_source(backbone, run.weights) if run.weights else None
    model = Classifier(backbone, data_cfg.channels, mean, std)  # the source's mean / std by default
    train_ds = build_dataset(
        run.manifest,
        "train",
        run.root,
        data_cfg.model_copy(update={"augment": cfg.augment}),
        train=True,
        seed=run.seed,
    )
    the_plan = make_plan(
        cfg.strategy,
        model,
        blocks_of(model),
        weight_decay=cfg.weight_decay,
        data=calibration_batches(train_ds, cfg.batch_size, run.seed),  # autorgn; others ignore it
        **cfg.strategy_options,
    )
    return _Built(model, source, the_plan, train_ds, run.dataset("val"))


def _fit(run: _Run, built: _Built, resume: bool, progress: bool) -> FitResult:
    """Train with the plan's parameter groups, keeping the epoch of best validation balanced
    accuracy."""
    cfg = run.cfg

    def evaluate(m: nn.Module) -> dict[str, float]:
        _, y, z = predict(m, built.val_ds, cfg.batch_size, run.device)
        loss = float(nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)))
        return {"val_loss": loss, "val_bacc": balanced_accuracy(y, z)}

    schedule = cfg.schedule(patience=cfg.patience, min_epochs=cfg.min_epochs)
    weights_t = class_weight_tensor(run.manifest) if cfg.class_weights == "balanced" else None
    return fit(
        built.model,
        make_step(weights_t, cfg.label_smoothing or 0.0),
        built.plan.param_groups,
        built.train_ds,
        schedule,
        run.out,
        seed=run.seed,
        device=run.device,
        evaluate=evaluate,
        monitor="val_bacc",
        on_epoch_start=built.plan.on_epoch_start,
        train_mode=built.plan.train_mode,
        resume=resume,
        progress=progress,
    )


def _predictions(
    run: _Run, model: nn.Module, val_ds: Any
) -> tuple[Predictions, Predictions | None]:
    """The trained model's validation predictions, and its test predictions when the manifest
    has a test split (read here once, after training)."""
    cfg, manifest = run.cfg, run.manifest
    name = f"{cfg.backbone}/{cfg.strategy}/seed{run.seed}"
    val = as_predictions(manifest, "val", *predict(model, val_ds, cfg.batch_size, run.device), name)
    if not any(r.split == "test" for r in manifest.rows):
        return val, None
    test_ds = run.dataset("test")
    test = as_predictions(
        manifest, "test", *predict(model, test_ds, cfg.batch_size, run.device), name
    )
    return val, test


def _model_card(
    run: _Run, built: _Built, result: FitResult, seconds: float, recipe: dict[str, Any]
) -> ModelCard:
    """The ``meta.json`` of the run: what a report and a later ``predict`` need."""
    cfg, data_cfg, manifest, model = run.cfg, run.data_cfg, run.manifest, built.model
    return ModelCard(
        medtl_version=__version__,
        backbone=cfg.backbone,
        weights=WeightsProvenance.of_file(run.weights),
        init_weights=str(run.weights) if run.weights else None,
        source=built.source.model_dump(mode="json") if built.source else None,
        classes=list(manifest.classes),
        in_chans=data_cfg.channels,
        image_size=data_cfg.image_size,
        resize=data_cfg.resize,
        normalize=Normalisation(
            source=data_cfg.normalize,
            mean=model.normalize.mean.flatten().tolist(),
            std=model.normalize.std.flatten().tolist(),
        ),
        strategy=cfg.strategy,
        genome=_genome(cfg),
        plan=built.plan.describe(),
        seed=run.seed,
        manifest_sha256=manifest.sha256,
        best_epoch=result.best_epoch,
        val_bacc=result.best_score,
        epochs_run=len(result.history),
        stopped_early=result.stopped_early,
        epoch_equivalents=result.samples_seen / max(1, len(manifest.split("train"))),
        seconds=seconds,
        config=cfg.model_dump(mode="json"),
        defaults_for=start_of(run.weights),
        recipe=recipe,
    )


def _genome(cfg: FinetuneConfig) -> list[float] | None:
    """The genes of a ``genome`` (BioTune) run: the block genes and the threshold gene last."""
    if cfg.strategy != "genome":
        return None
    options = cfg.strategy_options
    genes = options.get("genes")
    if not isinstance(genes, list | tuple):
        return None
    return [float(g) for g in genes] + (
        [float(options["threshold"])] if "threshold" in options else []
    )


def calibration_batches(dataset: Any, batch_size: int, seed: int) -> Any:
    """Batches for strategies that look at gradients before an epoch (Auto-RGN): a fresh,
    seeded shuffle of the training split each time it is called."""
    from torch.utils.data import DataLoader

    def batches() -> Any:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )

    return batches


def export_model(model: Classifier, the_plan: Any, path: Path) -> None:
    """The classifier's weights as safetensors (LoRA adapters merged first, so the file matches
    the plain timm architecture), written atomically."""
    from safetensors.torch import save

    from medtl.finetune.strategies import merge_lora

    merge_lora(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()}
    with atomic_open(path, "wb") as handle:
        handle.write(save(state))


def load_classifier(folder: str | Path) -> tuple[Classifier, ModelCard]:
    """A fine-tuned classifier and its model card from a ``finetune`` folder (no pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, model_path = folder / META_FILE, folder / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ConfigError(
            f"{folder} holds no fine-tuned model ({MODEL_FILE} and {META_FILE}); run 'medtl finetune' first"
        )
    card = ModelCard.load(meta_path)
    stats = card.normalize  # models from before normalize was recorded: the backbone's
    model = build_classifier(
        card.backbone,
        len(card.classes),
        card.in_chans,
        mean=stats.mean if stats else None,
        std=stats.std if stats else None,
    )
    try:
        state = load_file(str(model_path))
    except Exception as exc:  # safetensors raises its own error types for a cut or garbled file
        raise DataError(
            f"{model_path} cannot be read ({reason(exc)}); the file is truncated or corrupt: "
            "fine-tune the model again or restore the file"
        ) from None
    model.backbone.load_state_dict(state, strict=True)
    return model.eval(), card
