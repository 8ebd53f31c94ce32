"""The stage protocol: every stage of ``medtl run`` is ``stage.run(ctx) -> StageOutput`` with
a typed artifact, and a rerun skips each stage yet hands on the same artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtl.artifacts import EncoderCard, EvaluationEntry, ModelCard
from medtl.demo import DEMO_RECIPE, make_phantom
from medtl.pipeline import model_dir, open_run, recipe_stages, run_all
from medtl.recipe import load_recipe
from medtl.results import CalibrationRecord, EvaluationResults, ReportSummary

TINY = [
    "pretrain.backbone=medtl_tiny_convnext", "pretrain.epochs=1", "pretrain.batch_size=8",
    "finetune.backbone=medtl_tiny_convnext", "finetune.epochs=1", "finetune.batch_size=16",
    "data.loader.image_size=32", "evaluate.n_boot=100", "report.thumbnails=false",
]  # fmt: skip
ARTIFACTS = {
    "pretrain": EncoderCard,
    "finetune": ModelCard,
    "calibrate": CalibrationRecord,
    "evaluate": EvaluationResults,
    "report": ReportSummary,
}


@pytest.mark.usefixtures("one_thread")
def test_each_stage_hands_on_its_typed_artifact(tmp_path: Path) -> None:
    root = make_phantom(tmp_path / "data", n=24, size=32, seed=0)
    recipe = load_recipe(DEMO_RECIPE, TINY)
    with open_run(recipe, tmp_path / "run", str(root), "cpu", progress=False) as ctx:
        stages = recipe_stages(ctx)
        assert [s.name for s in stages] == list(ARTIFACTS)
        first = {s.name: s.run(ctx) for s in stages}
        # a rerun skips every stage (DONE matches) and reads the same artifacts back
        again = {s.name: s.run(ctx) for s in recipe_stages(ctx)}
        paths = run_all(ctx)
    for name, kind in ARTIFACTS.items():
        assert isinstance(first[name].artifact, kind), name
        if name != "finetune":  # calibration completes the card fine-tuning wrote
            assert again[name].artifact == first[name].artifact, name
        assert first[name].path == again[name].path == paths[name]
    record = first["calibrate"].artifact
    assert record.method == recipe.section("calibrate").method
    assert first["finetune"].artifact.calibrator.name == "none"  # before calibration
    calibrated = ModelCard.load(model_dir(tmp_path / "run") / "meta.json")
    assert again["finetune"].artifact == calibrated
    assert calibrated.calibrator == record.chosen.params
    entries = first["evaluate"].artifact.entries
    assert entries and all(isinstance(e, EvaluationEntry) and e.status == "ok" for e in entries)
    assert [e.model for e in first["report"].artifact.entries] == [e.model for e in entries]
    card = first["pretrain"].artifact
    assert EncoderCard.model_validate_json(card.model_dump_json()) == card


def test_prepare_stage_gives_the_run_and_medtl_prepare_one_manifest(tmp_path: Path) -> None:
    """Opening a run prepares its manifest through ``PrepareStage``; ``run(ctx)`` hands on the
    typed manifest, a rerun verifies it instead of preparing again, and ``medtl prepare`` with
    the recipe's data settings writes the same manifest (one code path)."""
    from medtl.cli import main
    from medtl.data.manifest import Manifest
    from medtl.pipeline import PrepareStage

    root = make_phantom(tmp_path / "data", n=24, size=32, seed=0)
    recipe = load_recipe(DEMO_RECIPE, TINY)
    with open_run(recipe, tmp_path / "run", str(root), "cpu", progress=False) as ctx:
        prepared = tmp_path / "run" / "data" / "manifest.csv"
        written = prepared.stat().st_mtime_ns
        out = PrepareStage().run(ctx)
        assert out.path == prepared and prepared.stat().st_mtime_ns == written
        assert isinstance(out.artifact, Manifest)
        assert out.artifact.sha256 == ctx.manifest.sha256 == Manifest.load(prepared).sha256
    data = recipe.section("data")
    ratios = ",".join(str(data.split_ratios[s]) for s in ("train", "val", "test"))
    argv = ["-q", "prepare", data.adapter, str(root), "-o", str(tmp_path / "cli.csv")]
    assert main([*argv, "--seed", str(data.split_seed), "--split-ratios", ratios]) == 0
    cli = Manifest.load(tmp_path / "cli.csv")
    assert cli.sha256 == ctx.manifest.sha256
    assert cli.meta.adapter == ctx.manifest.meta.adapter == data.adapter


@pytest.mark.usefixtures("one_thread")
def test_folder_methods_train_as_the_run_does(tmp_path: Path) -> None:
    """``PretrainStage(config).pretrain`` and ``FinetuneStage(config).finetune`` on folders (as
    the benchmarks call them) write the same weights as ``run(ctx)`` with the recipe's
    sections; a search strategy is refused there (it runs from a recipe)."""
    from medtl.errors import ConfigError
    from medtl.pipeline import FinetuneStage, PretrainStage, TrainingData

    root = make_phantom(tmp_path / "data", n=24, size=32, seed=0)
    recipe = load_recipe(DEMO_RECIPE, TINY)
    data = recipe.section("data").loader.data_config()
    with open_run(recipe, tmp_path / "run", str(root), "cpu", progress=False) as ctx:
        encoder = PretrainStage().run(ctx).path
        model = FinetuneStage().run(ctx).path
        manifest = ctx.manifest
    reads = TrainingData(manifest, root, data, seed=recipe.seed)
    card = PretrainStage(config=recipe.section("pretrain")).pretrain(reads, tmp_path / "pre")
    assert card.final_loss == EncoderCard.load(encoder.parent / "meta.json").final_loss
    written = (tmp_path / "pre" / "encoder.safetensors").read_bytes()
    assert written == encoder.read_bytes()
    finetune = FinetuneStage(config=recipe.section("finetune"))
    alone = tmp_path / "ft"
    card = finetune.finetune(reads, alone, weights=str(encoder))
    assert card.val_bacc == ModelCard.load(model / "meta.json").val_bacc
    written = (alone / "model.safetensors").read_bytes()
    assert written == (model / "model.safetensors").read_bytes()
    search = recipe.section("finetune").model_copy(update={"strategy": "biotune"})
    with pytest.raises(ConfigError, match="is a search"):
        FinetuneStage(config=search).finetune(reads, tmp_path / "s")
