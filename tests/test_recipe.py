"""Recipes: validation errors name the key and the allowed values; presets and --set apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtl.cli import main
from medtl.errors import ConfigError
from medtl.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("data: {adapter: bsui}", ["data.adapter", "did you mean 'busi'"]),
        (
            "data: {adapter: busi, loader: {image_sise: 3}}",
            ["data.loader.image_sise", "did you mean 'image_size'"],
        ),
        ("data: {adapter: busi, loader: {cache: ram}}", ["data.loader.cache", "'memory'"]),
        ("dta: {}", ["dta", "did you mean 'data'"]),
        ("pretrain: {masking: entropi}", ["pretrain.masking", "did you mean 'entropy'"]),
        ("pretrain: {backbone: convnext_ato}", ["pretrain.backbone", "convnext_atto"]),
        ("pretrain: {epochs: many}", ["pretrain.epochs", "integer"]),
        (
            "finetune: {strategy_option: {}}",
            ["finetune.strategy_option", "did you mean 'strategy_options'"],
        ),
        ("calibrate: {method: tempreature}", ["calibrate.method", "did you mean 'temperature'"]),
        ("data: {adapter: busi, split_ratios: {train: 1, hold: 1}}", ["data", "hold"]),
        ("- a\n- b", ["mapping"]),
        ("a: [", ["not valid YAML"]),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, text))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [("batch_size", "64", "finetune.batch_size"), ("augment", "medium", "finetune.augment")],
)
def test_loader_keys_without_effect_are_refused(
    tmp_path: Path, key: str, value: str, where: str
) -> None:
    """``data.loader.batch_size`` / ``augment`` never reached a stage: a recipe (or ``--set``)
    naming them is refused with the key that does."""
    in_file = tmp_path / "in_file.yaml"
    in_file.write_text(f"data: {{adapter: busi, loader: {{{key}: {value}}}}}")
    plain = tmp_path / "plain.yaml"
    plain.write_text("data: {adapter: busi}")
    for source, overrides in ((in_file, []), (plain, [f"data.loader.{key}={value}"])):
        with pytest.raises(ConfigError) as err:
            load_recipe(source, overrides)
        message = str(err.value)
        assert f"data.loader.{key}: unknown key" in message and where in message, message
        assert len(message.splitlines()) == 1


def test_stage_data_config_takes_the_loader_and_the_stage_settings(tmp_path: Path) -> None:
    loader = (
        load_recipe(
            _write(tmp_path, "data: {adapter: busi, loader: {image_size: 48, channels: 1}}")
        )
        .section("data")
        .loader
    )
    cfg = loader.data_config(augment="light", batch_size=8)
    assert (cfg.image_size, cfg.channels, cfg.augment, cfg.batch_size) == (48, 1, "light", 8)
    assert "batch_size" not in loader.model_dump() and "augment" not in loader.model_dump()


def test_presets_then_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data: {adapter: busi}\npresets: {gpu: {data.loader.image_size: 224, pretrain.epochs: 800}}",
    )
    recipe = load_recipe(path, ["preset=gpu", "pretrain.epochs=5"])
    assert recipe.section("data").loader.image_size == 224
    assert recipe.section("pretrain").epochs == 5
    with pytest.raises(ConfigError, match="preset 'tpu' is not defined"):
        load_recipe(path, ["preset=tpu"])


def test_resolved_recipe_has_defaults(tmp_path: Path) -> None:
    resolved = load_recipe(
        _write(tmp_path, "name: x\ndata: {adapter: busi}\nfinetune: {}")
    ).resolved()
    assert resolved["finetune"]["strategy"] == "full"
    assert resolved["data"]["loader"]["image_size"] == 128


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_passes_check(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(recipe)]) == 0
    assert "valid" in capsys.readouterr().out
    text = recipe.read_text()
    for preset in ("gpu", "cpu"):
        if f"  {preset}:" in text:
            assert main(["check", str(recipe), "--set", f"preset={preset}"]) == 0


def test_check_reports_manifest_not_matching_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Path(__file__).resolve().parents[1]
    path = _write(
        tmp_path, f"data: {{adapter: busi, manifest: {repo / 'data_manifests' / 'busi.csv'}}}"
    )
    assert main(["check", str(path), "--data-root", str(tmp_path)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_recipe_keys_doc_is_generated_from_the_models() -> None:
    from medtl.recipe import keys_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "recipe_keys.md"
    assert doc.read_text() == keys_markdown(), "run: python -m medtl.recipe > docs/recipe_keys.md"


def test_missing_named_manifest_is_an_error_not_a_resplit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "data: {adapter: busi, manifest: data_manifests/typo.csv}")
    assert main(["check", str(path)]) == 2
    assert "typo.csv does not exist" in capsys.readouterr().err


def test_a_key_given_twice_is_refused_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  adapter: busi\n  split_seed: 1\n  split_seed: 2\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'split_seed' appears twice.*line 3"):
        load_recipe(path)
    top = _write(tmp_path, "seed: 1\ndata: {adapter: busi}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: line 3: key 'seed' appears twice"):
        load_recipe(top)


def test_one_optimisation_section_for_pretraining_and_fine_tuning(tmp_path: Path) -> None:
    """``pretrain`` and ``finetune`` share :class:`OptimConfig`: the flat recipe keys reach
    the :class:`Schedule` of each stage unchanged, and no shared key is lost on the way."""
    from dataclasses import fields

    from medtl.train import OptimConfig, Schedule

    assert set(OptimConfig.model_fields) <= {f.name for f in fields(Schedule)}
    keys = "{epochs: 7, batch_size: 12, lr: 0.002, weight_decay: 0.1, warmup_epochs: 2, "
    keys += "grad_clip: 1.5, num_workers: 1, amp: true, channels_last: false}"
    recipe = load_recipe(_write(tmp_path, f"pretrain: {keys}\nfinetune: {keys}"))
    for name in ("pretrain", "finetune"):
        section = recipe.section(name)
        assert isinstance(section, OptimConfig)
        schedule = section.schedule()
        got = {key: getattr(schedule, key) for key in OptimConfig.model_fields}
        assert got == {
            "epochs": 7, "batch_size": 12, "lr": 0.002, "weight_decay": 0.1,
            "warmup_epochs": 2.0, "grad_clip": 1.5, "num_workers": 1, "amp": True,
            "channels_last": False,
        }  # fmt: skip
    assert recipe.section("finetune").schedule(epochs=3, patience=2).epochs == 3
    # each stage keeps its own defaults
    defaults = load_recipe(_write(tmp_path, "pretrain: {}\nfinetune: {}"))
    assert defaults.section("pretrain").schedule().grad_clip == 3.0
    assert defaults.section("finetune").for_start().schedule().grad_clip is None
