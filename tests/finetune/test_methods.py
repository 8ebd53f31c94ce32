"""``finetune.strategy`` names a registered strategy or a registered search; a search runs
behind one interface, and the finetune stage records where its model is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from medtl.demo import DEMO_RECIPE, make_phantom
from medtl.finetune.loop import FinetuneConfig
from medtl.finetune.methods import SEARCHES, BioTune, check_strategy
from medtl.finetune.search import BioTuneConfig
from medtl.finetune.strategies import STRATEGIES
from medtl.pipeline import model_dir, open_run, run_finetune
from medtl.recipe import load_recipe


def test_strategies_and_searches_are_registered() -> None:
    assert "biotune" in SEARCHES and "biotune" not in STRATEGIES
    assert isinstance(SEARCHES.get("biotune"), BioTune)
    assert SEARCHES.get("biotune").config is BioTuneConfig
    for name in [*STRATEGIES.names(), "biotune"]:
        assert check_strategy(name) == name
        assert FinetuneConfig(strategy=name).strategy == name


def test_unknown_strategy_names_the_closest_of_both_registries() -> None:
    with pytest.raises(ValidationError) as err:
        FinetuneConfig(strategy="biotun")
    message = str(err.value)
    assert "did you mean 'biotune'" in message and "searches: biotune" in message
    with pytest.raises(ValueError, match="did you mean 'full'"):
        check_strategy("ful")


def _done(out: Path, record: dict[str, object]) -> None:
    (out / "finetune").mkdir(parents=True, exist_ok=True)
    (out / "finetune" / "DONE").write_text(json.dumps({"inputs": "x", **record}))


def test_model_folder_is_the_one_the_stage_recorded(tmp_path: Path) -> None:
    """A ``final/`` left in the stage folder by an earlier search is not taken for the model
    of a plain run: the stage's ``DONE`` names the folder."""
    stale = tmp_path / "finetune" / "final"
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text("{}")
    _done(tmp_path, {"model": "."})
    assert model_dir(tmp_path) == tmp_path / "finetune" / "."
    _done(tmp_path, {"model": "final"})
    assert model_dir(tmp_path) == stale


@pytest.mark.usefixtures("one_thread")
def test_a_search_runs_through_the_registry_and_records_its_model(tmp_path: Path) -> None:
    root = make_phantom(tmp_path / "data", n=24, size=32, seed=0)
    overrides = [
        "pretrain.backbone=medtl_tiny_convnext", "pretrain.epochs=1", "pretrain.batch_size=8",
        "finetune.backbone=medtl_tiny_convnext", "finetune.strategy=biotune",
        "finetune.epochs=1", "finetune.min_epochs=1", "finetune.batch_size=16",
        "data.loader.image_size=32", "search.preset=cpu", "search.population=2",
        "search.elite=1", "search.exploit=0", "search.generations=1", "search.seeds=1",
        "search.max_epochs=1", "search.min_epochs=1",
    ]  # fmt: skip
    recipe = load_recipe(DEMO_RECIPE, overrides)
    with open_run(recipe, tmp_path / "run", str(root), "cpu", progress=False) as ctx:
        folder = run_finetune(ctx)
    done = json.loads((tmp_path / "run" / "finetune" / "DONE").read_text())
    assert done["model"] == "final" and "best_fitness" in done
    assert folder == tmp_path / "run" / "finetune" / "final" == model_dir(tmp_path / "run")
    assert (folder / "meta.json").is_file()
