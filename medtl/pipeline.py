"""Stages of a recipe run, each skipped when its ``DONE`` matches its inputs.

``medtl pretrain``, ``medtl finetune`` and (later) ``medtl run`` call these; each reads what the
previous stage wrote to the run folder, so any stage can be rerun, resumed or replaced alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from medtl.data.manifest import Manifest
from medtl.errors import ConfigError, DataError
from medtl.io import check_writable, remove_stray_temps
from medtl.recipe import DataSection, Recipe
from medtl.results import (
    CALIBRATION_FILE,
    EVALUATION_FILE,
    REPORT_FILE,
    CalibrationRecord,
    EvaluationResults,
    ReportSummary,
)
from medtl.runs import (
    RESPLIT_FILE,
    RunLock,
    Stage,
    check_manifest_path,
    check_named_files,
    data_root,
    start_run,
)
from medtl.tracking import Tracker, TrackingConfig, log_artifact, log_summary, log_to_run_folder

if TYPE_CHECKING:
    from medtl.artifacts import EncoderCard, ModelCard
    from medtl.data.dataset import DataConfig
    from medtl.data.prepare import PrepareResult
    from medtl.finetune.loop import FinetuneConfig
    from medtl.pretrain.loop import PretrainConfig

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of a run reads: the recipe, the run folder, the data root, the device,
    the tracker, and the manifest that :class:`PrepareStage` sets when the run is opened."""

    recipe: Recipe
    out: Path
    root: Path
    device: str
    progress: bool
    tracker: Tracker
    lock: RunLock | None = None
    manifest: Manifest = field(init=False, repr=False)  # set by PrepareStage().run(ctx)

    def close(self) -> None:
        """Flush and close the trackers (TensorBoard writers, the MLflow run); unlock."""
        try:
            self.tracker.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    recipe: Recipe,
    out: Path | None,
    root_override: str | None,
    device: str,
    progress: bool,
    lock: bool = True,
) -> RunContext:
    """Run folder, data root and manifest (rank 0 prepares it; other ranks wait, then load).

    Rank 0 locks the run folder for writing (:class:`~medtl.runs.RunLock`) unless ``lock`` is
    false (a search worker joining a locked run); closing the context unlocks it."""
    out = out or Path("runs") / recipe.name
    device = pick_device(device)
    init_distributed(device)
    section = recipe.section("data")
    root = data_root(section, root_override)
    check_named_files(recipe, root)  # a bad weights file fails now, not after pretraining
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    held = RunLock(check_writable(out)).acquire() if rank == 0 and lock else None
    try:
        return _open_locked(recipe, out, root, device, progress, rank, held)
    except BaseException:
        if held is not None:
            held.release()
        raise


def _open_locked(
    recipe: Recipe,
    out: Path,
    root: Path,
    device: str,
    progress: bool,
    rank: int,
    held: RunLock | None,
) -> RunContext:
    if rank == 0:
        start_run(recipe, out)
        log_to_run_folder(out)
    tracking: TrackingConfig = (
        recipe.section("tracking") if recipe.has("tracking") else TrackingConfig()
    )
    if rank != 0:  # one process writes the event files
        tracking = TrackingConfig(tensorboard=False, mlflow=False)
    tracker = Tracker(out, tracking, recipe.name, recipe.resolved())
    ctx = RunContext(recipe, out, root, device, progress and rank == 0, tracker, held)
    try:
        ctx.manifest = PrepareStage().run(ctx).artifact
    except BaseException:
        tracker.close()
        raise
    return ctx


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
    from medtl.pretrain.loop import ENCODER_FILE

    stage = Stage(ctx.out / "pretrain", stage_inputs(ctx, "pretrain", _corpus_input(ctx)))
    if stage.done():
        log.info("pretrain: already done (%s)", stage.folder)
        return stage.folder / ENCODER_FILE
    stage.begin()
    with ctx.tracker.scope("pretrain"):
        pretrain = PretrainStage(resume, ctx.recipe.section("pretrain"))
        card = pretrain.pretrain(training_data(ctx), stage.folder)
        loss = card.final_loss  # None: no epoch ran (nothing to train on)
        log_summary({"final_loss": loss} if loss is not None else {})
    stage.mark_done({"final_loss": card.final_loss})
    return stage.folder / ENCODER_FILE


def _corpus_input(ctx: RunContext) -> dict[str, Any]:
    """``pretrain.data``'s files (names, sizes, times) as a stage input: a changed corpus
    runs pretraining again, as a changed manifest does."""
    sources = ctx.recipe.section("pretrain").data
    if not sources:
        return {}
    from medtl.data.corpus import listing_key

    return {"corpus": listing_key(sources)}


STAGES = ("pretrain", "finetune", "calibrate", "evaluate", "report")


def run_all(ctx: RunContext, resume: bool = True, force: str | None = None) -> dict[str, Path]:
    """Every stage the recipe has, in order; ``force`` reruns from that stage on."""
    if force is not None:
        if force not in STAGES:
            raise ConfigError(f"--force {force!r}: not a stage ({', '.join(STAGES)})")
        for name in STAGES[STAGES.index(force) :]:
            Stage(ctx.out / name, {}).invalidate()
    done = {stage.name: stage.run(ctx).path for stage in recipe_stages(ctx, resume)}
    remove_stray_temps(ctx.out)  # left by a process killed while writing; the run holds the lock
    return done


def _done_key(folder: Path) -> str:
    marker = folder / "DONE"
    return marker.read_text() if marker.is_file() else ""


def run_calibrate(ctx: RunContext) -> Path:
    """The ``calibrate`` stage: fit on validation, store in the model's meta.json; the stage
    folder keeps a copy of ``calibration.json``."""
    cfg = _section_or_default(ctx, "calibrate")
    folder = model_dir(ctx.out)
    stage = Stage(
        ctx.out / "calibrate",
        {"config": cfg.model_dump(mode="json"), "model": _done_key(ctx.out / "finetune")},
    )
    if stage.done():
        return stage.folder
    stage.begin()
    record = CalibrateStage(cfg).calibrate(folder)
    record.save(stage.folder / CALIBRATION_FILE)
    stage.mark_done({"method": cfg.method})
    return stage.folder


def _section_or_default(ctx: RunContext, name: str) -> Any:
    """The recipe's ``name`` section, or that section's defaults when the recipe has none."""
    from medtl.recipe import SECTION_MODELS

    return ctx.recipe.section(name) if ctx.recipe.has(name) else SECTION_MODELS[name]()


def run_evaluate(ctx: RunContext) -> Path:
    """The ``evaluate`` stage: the run's model on its manifest's test split (and extra datasets)."""
    from medtl.evaluate import DataSpec, ModelSpec

    cfg = _section_or_default(ctx, "evaluate")
    manifest_path = _manifest_path(ctx)
    leaks = ctx.recipe.section("data").leaks
    stage = Stage(
        ctx.out / "evaluate",
        {
            "config": cfg.model_dump(mode="json"),
            "model": _done_key(ctx.out / "calibrate"),
            "manifest": ctx.manifest.sha256,
            **({"leaks": leaks} if leaks != "keep" else {}),
            **({"external": _external_data(cfg)} if cfg.external else {}),
            **({"ensemble": _ensemble_inputs(ctx)} if ctx.recipe.has("ensemble") else {}),
        },
    )
    if stage.done():
        return stage.folder
    stage.begin()
    model = ModelSpec(
        model_dir(ctx.out),
        f"{ctx.recipe.name}/{ctx.recipe.section('finetune').strategy}/seed{ctx.recipe.seed}",
    )
    models, chosen = [model], None
    if ctx.recipe.has("ensemble"):
        models, chosen = choose_run_ensemble(ctx, model, stage.folder)
    data = [
        DataSpec(manifest_path, ctx.root, ctx.recipe.name, leaks),
        *(DataSpec.parse(e) for e in cfg.external),
    ]
    results = EvaluateStage(cfg).evaluate(
        models,
        data,
        stage.folder,
        seed=ctx.recipe.seed,
        device=ctx.device,
        progress=ctx.progress,
        chosen=chosen,
    )
    with ctx.tracker.scope("evaluate"):
        track_evaluation(results)
    stage.mark_done()
    return stage.folder


def choose_run_ensemble(ctx: RunContext, model: Any, folder: Path) -> tuple[list[Any], Any]:
    """The ``ensemble`` section: members (``this`` = the run's model) weighted on validation
    only, the choice written to ``<run>/evaluate/ensemble.json``; returns the models to
    evaluate (the run's own first) and the :class:`~medtl.ensemble.EnsembleCard`."""
    from medtl.ensemble import choose_ensemble, resolve_members

    members = resolve_members(ctx.recipe.section("ensemble"), model)
    card = choose_ensemble(ctx.recipe.section("ensemble"), members, ctx.manifest.sha256)
    card.save(folder / "ensemble.json")
    log.info("ensemble chosen on validation: %s", card.label)
    others = [m for m in members if m.folder != model.folder]
    return [model, *others], card


def _ensemble_inputs(ctx: RunContext) -> dict[str, Any]:
    """The ensemble section and each member's card and validation predictions, hashed: the
    stage reruns when any member is retrained or recalibrated."""
    from medtl.artifacts import file_sha256
    from medtl.ensemble import THIS, resolve_members

    cfg = ctx.recipe.section("ensemble")
    others = [m for m in cfg.members if m != THIS]
    members = resolve_members(cfg.model_copy(update={"members": others}), None) if others else []
    files = [m.folder / n for m in members for n in ("meta.json", "predictions_val.csv")]
    return {
        "config": cfg.model_dump(mode="json"),
        "members": [file_sha256(f) if f.is_file() else None for f in files],
    }


def _external_data(cfg: Any) -> list[str]:
    """The hashes of ``evaluate.external`` manifests, their files verified first: a stage is
    never skipped over an external test set that changed."""
    from medtl.data.manifest import check_root
    from medtl.data.verify import verify_data
    from medtl.evaluate import DataSpec

    hashes = []
    for text in cfg.external:
        spec = DataSpec.parse(text)
        external = Manifest.load(spec.manifest)
        if spec.root is not None:
            verify_data(external, check_root(spec.root), cfg.splits)
        hashes.append(external.sha256)
    return hashes


def run_report(ctx: RunContext) -> Path:
    """The ``report`` stage: report.html, report.json and tables.csv from the evaluation."""
    from medtl.evaluate import DataSpec

    cfg = _section_or_default(ctx, "report")
    stage = Stage(
        ctx.out / "report",
        {"evaluation": _done_key(ctx.out / "evaluate"), "config": cfg.model_dump()},
    )
    if stage.done():
        return stage.folder / "report.html"
    stage.begin()
    roots: dict[str, Path] = {}
    if cfg.thumbnails:
        evaluate_cfg = _section_or_default(ctx, "evaluate")
        roots = {ctx.recipe.name: ctx.root}
        for text in evaluate_cfg.external:
            spec = DataSpec.parse(text)
            if spec.root is not None:
                roots[spec.name] = spec.root
    result = ReportStage(cfg).report(ctx.out / "evaluate", stage.folder, roots)
    with ctx.tracker.scope("report"):
        log_artifact(Path(result.html))
    stage.mark_done()
    return Path(result.html)


def track_evaluation(results: EvaluationResults) -> None:
    """Each evaluated split's headline figures with their 95% CIs, as ``<dataset>/<split>/...``
    (a leaking official test split's clean subset as ``<dataset>/test_clean/...``)."""
    for entry in results.entries:
        if entry.status != "ok" or entry.metrics is None:
            continue
        clean = (entry.leaks or {}).get("clean_metrics") or {}
        figures: dict[str, float] = {}
        for split, metrics in ((entry.split, entry.metrics), (f"{entry.split}_clean", clean)):
            overall = metrics.get("overall") or {}
            for name in ("macro_auroc", "balanced_accuracy", "accuracy"):
                for part in ("value", "ci_low", "ci_high"):
                    value = (overall.get(name) or {}).get(part)
                    if value is not None:
                        figures[f"{entry.dataset}/{split}/{name}/{part}"] = value
        log_summary(figures)


def _manifest_path(ctx: RunContext) -> Path:
    return manifest_file(ctx.recipe.section("data"), ctx.out, ctx.manifest)


def manifest_file(section: DataSection, out: Path, manifest: Manifest) -> Path:
    """Where a run's ``manifest`` is: ``data/resplit.csv`` (``data.leaks: resplit``), the
    recipe's ``data.manifest``, or the one prepared into ``data/manifest.csv``."""
    if (out / RESPLIT_FILE).is_file() and manifest.meta.split_source == "resplit":
        return out / RESPLIT_FILE
    if section.manifest and Path(section.manifest).is_file():
        return Path(section.manifest)
    return out / PREPARED_FILE


def finetune_stage(ctx: RunContext, resume: bool = True) -> tuple[Stage, str | None]:
    """The finetune stage (its inputs include the encoder's and the search's settings) and the
    initial weights, pretraining first when ``finetune.weights`` is ``pretrain``."""
    cfg = ctx.recipe.section("finetune")
    weights = cfg.weights
    encoder_hash = None
    if weights == "pretrain":
        weights = str(run_pretrain(ctx, resume))
        encoder_hash = (ctx.out / "pretrain" / "DONE").read_text()
    search = ctx.recipe.resolved().get("search") if _is_search(cfg.strategy) else None
    return Stage(
        ctx.out / "finetune",
        stage_inputs(ctx, "finetune", {"encoder": encoder_hash, "search": search}),
    ), weights


def _is_search(strategy: str) -> bool:
    from medtl.finetune.methods import SEARCHES

    return strategy in SEARCHES


def model_dir(out: Path) -> Path:
    """The fine-tuned model of a run, as its finetune stage recorded it in ``DONE``:
    ``finetune/``, or the folder a search retrained its winner into (``finetune/final/``)."""
    marker = out / "finetune" / "DONE"
    record = json.loads(marker.read_text()) if marker.is_file() else {}
    if "model" in record:
        return out / "finetune" / record["model"]
    final = out / "finetune" / "final"  # a run finished before DONE recorded the model
    return final if (final / "meta.json").is_file() else out / "finetune"


def run_finetune(ctx: RunContext, resume: bool = True) -> Path:
    """The ``finetune`` stage: ``<run>/finetune/model.safetensors`` and predictions; with
    ``finetune.strategy: biotune``, the search (``search`` section), then the best genome
    retrained into ``<run>/finetune/final/``."""
    cfg = ctx.recipe.section("finetune")
    stage, weights = finetune_stage(ctx, resume)
    if stage.done():
        log.info("finetune: already done (%s)", stage.folder)
        return model_dir(ctx.out)
    stage.begin()
    if _is_search(cfg.strategy):
        return _run_search(ctx, stage, weights)
    with ctx.tracker.scope("finetune"):
        card = FinetuneStage(resume, cfg).finetune(training_data(ctx), stage.folder, weights)
        log_summary({"best_val_bacc": card.val_bacc})
    stage.mark_done({"val_bacc": card.val_bacc, "model": "."})
    return stage.folder


def search_job(ctx: RunContext, folder: Path, weights: str | None) -> Any:
    """The :class:`~medtl.finetune.methods.SearchJob` of this run's ``finetune`` section."""
    from medtl.finetune.methods import SearchJob

    return SearchJob(
        ctx.recipe.section("finetune"),
        ctx.recipe.sections.get("search"),
        ctx.manifest,
        ctx.root,
        ctx.recipe.section("data").loader.data_config(),
        folder,
        weights,
        ctx.device,
        ctx.progress,
    )


def _run_search(ctx: RunContext, stage: Stage, weights: str | None) -> Path:
    """A registered search (``finetune.strategy``) to the end; ``DONE`` records its model."""
    from medtl.finetune.methods import SEARCHES

    search = SEARCHES.get(ctx.recipe.section("finetune").strategy)
    with ctx.tracker.scope("finetune"):
        outcome = search.run(search_job(ctx, stage.folder, weights))
        log_summary(outcome.summary)
    stage.mark_done({**outcome.summary, "model": str(outcome.model)})
    return stage.folder / outcome.model


# -- the stage protocol ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingData:
    """What a training stage reads: the manifest, its data root and how its images are loaded
    (``data``), with the run's seed, device, progress setting and resolved recipe (recorded in
    the card)."""

    manifest: Manifest
    root: Path
    data: DataConfig
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    recipe: dict[str, Any] | None = None

    def reads(self) -> tuple[Manifest, Path, DataConfig]:
        return self.manifest, self.root, self.data

    def options(self) -> dict[str, Any]:
        """The training loops' keyword arguments."""
        keys = ("seed", "device", "progress", "recipe")
        return {key: getattr(self, key) for key in keys}


def training_data(ctx: RunContext) -> TrainingData:
    """A run's :class:`TrainingData`: its manifest and root, ``data.loader`` as a
    ``DataConfig``, and the recipe's seed."""
    return TrainingData(
        ctx.manifest,
        ctx.root,
        ctx.recipe.section("data").loader.data_config(),
        ctx.recipe.seed,
        ctx.device,
        ctx.progress,
        ctx.recipe.resolved(),
    )


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands on: where its output is, and the typed artifact read back from it
    (validated, so a later stage never reads a loose dict)."""

    path: Path
    artifact: Any


class RunStage(Protocol):
    """One stage of a run: ``run(ctx)`` does the work, or skips it when its ``DONE`` matches
    its inputs, and returns its :class:`StageOutput`."""

    @property
    def name(self) -> str: ...

    def run(self, ctx: RunContext) -> StageOutput: ...


PREPARED_FILE = "data/manifest.csv"


@dataclass(frozen=True)
class PrepareStage:
    """``prepare``: the run's manifest, the recipe's ``data.manifest`` verified against the
    data root or one prepared into ``<run>/data/manifest.csv`` (split again by group into
    ``data/resplit.csv`` with ``data.leaks: resplit``); artifact: the
    :class:`~medtl.data.manifest.Manifest` (its rows and typed sidecar,
    :class:`~medtl.data.manifest.ManifestMeta`). Opening a run runs it, so every later stage
    reads ``ctx.manifest``; ``medtl prepare`` calls :meth:`prepare`."""

    workers: int = 4  # image reader threads
    progress: Any = None  # a medtl.data.prepare.Progress wrapper (the CLI's bar); None: none
    name: str = "prepare"

    def run(self, ctx: RunContext) -> StageOutput:
        """Rank 0 prepares or verifies the manifest; other ranks wait for it, then load it."""
        section = ctx.recipe.section("data")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            manifest = self.manifest(section, ctx.root, ctx.out)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank != 0:
            manifest = self.manifest(section, ctx.root, ctx.out)
        return StageOutput(manifest_file(section, ctx.out, manifest), manifest)

    def manifest(self, section: DataSection, root: Path, out: Path) -> Manifest:
        """The data section's manifest for the run folder ``out``; with ``data.leaks: resplit``
        and an official split, that manifest split again by group into ``data/resplit.csv``."""
        from medtl.data.leaks import OFFICIAL_SOURCES, read_audit_clusters, resplit

        manifest = self._source(section, root, out)
        if section.leaks != "resplit" or manifest.meta.split_source not in OFFICIAL_SOURCES:
            return manifest
        source = Path(section.manifest) if section.manifest else out / PREPARED_FILE
        clusters = read_audit_clusters(source)
        fresh = resplit(manifest, section.split_ratios, section.split_seed, clusters)
        target = out / RESPLIT_FILE
        if not target.is_file() or Manifest.load(target).sha256 != fresh.sha256:
            fresh.save(target)
        log.info("data.leaks=resplit: official split ignored; group-aware split in %s", target)
        return fresh

    def _source(self, section: DataSection, root: Path, out: Path) -> Manifest:
        """The recipe's named manifest, or one prepared into ``out/data/manifest.csv``. An
        existing manifest is verified against the files under ``root``
        (:func:`~medtl.data.verify.verify_data`) before any stage can be skipped: the stages'
        keys hold the manifest's hash, which covers every row's sha256."""
        from medtl.data.verify import verify_data

        check_manifest_path(section)
        if section.manifest:
            manifest = Manifest.load(section.manifest)
            if manifest.meta.adapter != section.adapter:
                raise DataError(
                    f"manifest {section.manifest} was made by adapter {manifest.meta.adapter!r}, "
                    f"the recipe names {section.adapter!r}"
                )
            verify_data(manifest, root)
            return manifest
        target = out / PREPARED_FILE
        if target.is_file():
            manifest = Manifest.load(target)
            verify_data(manifest, root)
            return manifest
        return self.prepare(
            section.adapter,
            root,
            target,
            options=section.options,
            ratios=section.split_ratios,
            seed=section.split_seed,
            near_bits=section.near_dup_bits,
            phash_bits=section.near_dup_phash_bits,
        ).manifest

    def prepare(
        self,
        adapter: str,
        root: Path,
        out: Path,
        options: dict[str, Any] | None = None,
        ratios: dict[str, float] | None = None,
        seed: int = 0,
        near_bits: int | None = None,
        phash_bits: int | None = None,
    ) -> PrepareResult:
        """Build, audit and split the manifest of the dataset at ``root`` into ``out`` (a CSV
        path): a :class:`~medtl.data.prepare.PrepareResult`. ``None`` thresholds: the
        defaults."""
        from medtl.data.audit import DEFAULT_NEAR_BITS, DEFAULT_PHASH_BITS
        from medtl.data.prepare import prepare

        return prepare(
            adapter,
            root,
            out,
            options=options,
            ratios=ratios,
            seed=seed,
            near_bits=DEFAULT_NEAR_BITS if near_bits is None else near_bits,
            workers=self.workers,
            progress=self.progress,
            phash_bits=DEFAULT_PHASH_BITS if phash_bits is None else phash_bits,
        )


@dataclass(frozen=True)
class PretrainStage:
    """``pretrain``: the encoder file; artifact: its :class:`~medtl.artifacts.EncoderCard`.
    ``run(ctx)`` (``medtl pretrain``, ``medtl run``) calls :meth:`pretrain` with the recipe's
    section."""

    resume: bool = True
    config: PretrainConfig | None = None  # None: the defaults (run: the recipe's section)
    name: str = "pretrain"

    def run(self, ctx: RunContext) -> StageOutput:
        from medtl.artifacts import EncoderCard
        from medtl.pretrain.loop import META_FILE

        encoder = run_pretrain(ctx, self.resume)
        return StageOutput(encoder, EncoderCard.load(encoder.parent / META_FILE))

    def pretrain(self, data: TrainingData, out: Path) -> EncoderCard:
        """Pretrain on ``data`` into the folder ``out`` (``encoder.safetensors``,
        ``meta.json``), resuming its checkpoint if ``resume``."""
        from medtl.pretrain.loop import PretrainConfig, pretrain

        cfg = self.config or PretrainConfig()
        return pretrain(cfg, *data.reads(), out, resume=self.resume, **data.options()).card


@dataclass(frozen=True)
class FinetuneStage:
    """``finetune`` (one strategy, or a registered search): the model folder; artifact: its
    :class:`~medtl.artifacts.ModelCard`. ``run(ctx)`` (``medtl finetune``, ``medtl run``) calls
    :meth:`finetune` with the recipe's section, or a search through its registry."""

    resume: bool = True
    config: FinetuneConfig | None = None  # None: the defaults (run: the recipe's section)
    name: str = "finetune"

    def run(self, ctx: RunContext) -> StageOutput:
        folder = run_finetune(ctx, self.resume)
        return StageOutput(folder, _model_card(folder))

    def finetune(self, data: TrainingData, out: Path, weights: str | None = None) -> ModelCard:
        """Fine-tune one strategy from ``weights`` (``None``: random initialisation) on
        ``data`` into the folder ``out`` (``model.safetensors``, ``meta.json``, predictions),
        resuming its checkpoint if ``resume``."""
        from medtl.finetune.loop import FinetuneConfig, finetune

        cfg = self.config or FinetuneConfig()
        if _is_search(cfg.strategy):
            raise ConfigError(
                f"finetune.strategy {cfg.strategy!r} is a search: run it from a recipe "
                "(medtl search / medtl run)"
            )
        run = finetune(
            cfg, *data.reads(), out, weights=weights, resume=self.resume, **data.options()
        )
        return run.card


@dataclass(frozen=True)
class CalibrateStage:
    """``calibrate``: the stage folder; artifact: its
    :class:`~medtl.results.CalibrationRecord` (the model card now holds the chosen calibrator
    and the operating thresholds). ``medtl calibrate`` calls :meth:`calibrate` per folder."""

    config: Any = None  # a CalibrateConfig; None: the defaults (run: the recipe's section)
    name: str = "calibrate"

    def run(self, ctx: RunContext) -> StageOutput:
        folder = run_calibrate(ctx)
        return StageOutput(folder, CalibrationRecord.load(folder / CALIBRATION_FILE))

    def calibrate(self, folder: Path) -> CalibrationRecord:
        """Fit on ``folder``'s validation predictions and store the calibrator in its card."""
        from medtl.evaluate import CalibrateConfig, calibrate_model

        return calibrate_model(folder, self.config or CalibrateConfig())


@dataclass(frozen=True)
class EvaluateStage:
    """``evaluate``: the stage folder; artifact: its
    :class:`~medtl.results.EvaluationResults`. ``medtl evaluate`` calls :meth:`evaluate`."""

    config: Any = None  # an EvaluateConfig; None: the defaults (run: the recipe's section)
    name: str = "evaluate"

    def run(self, ctx: RunContext) -> StageOutput:
        folder = run_evaluate(ctx)
        return StageOutput(folder, EvaluationResults.load(folder / EVALUATION_FILE))

    def evaluate(
        self,
        models: list[Any],
        datasets: list[Any],
        out: Path,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
        chosen: Any = None,
    ) -> EvaluationResults:
        """Every model (``ModelSpec``) on every dataset (``DataSpec``) into ``out``."""
        from medtl.evaluate import EvaluateConfig, evaluate

        cfg = self.config or EvaluateConfig()
        path = evaluate(models, datasets, out, cfg, seed, device, progress, chosen)
        return EvaluationResults.load(path)


@dataclass(frozen=True)
class ReportStage:
    """``report``: ``report.html``; artifact: its :class:`~medtl.results.ReportSummary`
    (``report.json``). ``medtl report`` calls :meth:`report`."""

    config: Any = None  # a ReportConfig; None: the defaults (run: the recipe's section)
    name: str = "report"

    def run(self, ctx: RunContext) -> StageOutput:
        html = run_report(ctx)
        return StageOutput(html, ReportSummary.load(html.parent / REPORT_FILE))

    def report(
        self,
        evaluation_dir: Path,
        out: Path,
        data_roots: dict[str, Path] | None = None,
        explain: bool = False,
    ) -> Any:
        """The report of ``evaluation_dir`` into ``out``: a :class:`~medtl.report.ReportResult`."""
        from medtl.evaluate import ReportConfig
        from medtl.report import build_report

        cfg = self.config or ReportConfig()
        return build_report(evaluation_dir, out, data_roots, cfg.rank_by, explain=explain)


def _model_card(folder: Path) -> Any:
    from medtl.artifacts import ModelCard
    from medtl.finetune.loop import META_FILE

    return ModelCard.load(folder / META_FILE)


def recipe_stages(ctx: RunContext, resume: bool = True) -> list[RunStage]:
    """The stages the recipe has, in order (``medtl run``)."""
    stages: list[RunStage] = []
    if ctx.recipe.has("pretrain"):
        stages.append(PretrainStage(resume))
    if ctx.recipe.has("finetune"):
        stages += [FinetuneStage(resume), CalibrateStage(), EvaluateStage(), ReportStage()]
    return stages
