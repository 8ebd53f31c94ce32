"""``benchmarks/pretrained_defaults.py`` end to end at toy scale: it ranks on validation alone
and never lets a run see the test split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from medtl.data.manifest import Manifest
from medtl.predictions import Predictions
from tests.test_benchmark_scripts import fake_breastmnist, load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pretrained_defaults_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two configurations, one seed, one epoch on a fake BreastMNIST: validation-only records,
    no test predictions anywhere, the ranking between markers; ``--report-only`` trains nothing
    and marks what never ran."""
    root, manifest = fake_breastmnist(tmp_path)
    out = tmp_path / "finetune.md"
    out.write_text("# Fine-tuning\n\nkept text\n", encoding="utf-8")
    loaded: list[str] = []
    real_load = Predictions.load

    def spy(path: Any) -> Predictions:
        loaded.append(str(path))
        return real_load(path)

    monkeypatch.setattr(Predictions, "load", spy)
    tiny = ["finetune.epochs=1", "finetune.min_epochs=1", "finetune.batch_size=8"]
    argv = [
        "--datasets", "breastmnist", "--seeds", "0", "--configs", "base", "smoothing_0.1",
        "--data-root", f"breastmnist={root}", "--manifest", f"breastmnist={manifest}",
        "--work", str(tmp_path / "work"), "--out", str(out), "--device", "cpu",
        *[x for o in tiny for x in ("--set", o)],
    ]  # fmt: skip
    script = load_script("pretrained_defaults")
    first = script.main(argv)
    assert [(r["config"], r["seed"]) for r in first] == [("base", 0), ("smoothing_0.1", 0)]
    assert first[1]["knobs"]["label_smoothing"] == 0.1 and first[0]["knobs"]["label_smoothing"] == 0
    for r in first:
        assert 0 <= r["val_bacc"] <= 1 and 0 <= r["val_auroc"] <= 1
    # no run saw the test split: its manifest has no test rows, no test predictions exist,
    # and only validation predictions were read
    trainval = Manifest.load(tmp_path / "work/breastmnist/trainval.csv")
    assert {r.split for r in trainval.rows} == {"train", "val"}
    assert not list((tmp_path / "work").rglob("predictions_test*"))
    assert loaded and all(Path(p).name == "predictions_val.csv" for p in loaded)
    text = out.read_text(encoding="utf-8")
    assert "kept text" in text and text.count("<!-- pretrained_defaults:start -->") == 1
    assert "| 1 | " in text and "smoothing_0.1" in text
    # report only: nothing trains, a configuration never run is marked
    stamp = (tmp_path / "work/breastmnist/base/seed0/result.json").stat().st_mtime_ns
    again = script.main([*argv, "--report-only", "--configs", "base", "smoothing_0.1", "warmup_3"])
    assert again == first
    assert (tmp_path / "work/breastmnist/base/seed0/result.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "work/breastmnist/warmup_3").exists()
    assert re.search(r"^\| 3 \| warmup_3 \| not run \|", out.read_text(encoding="utf-8"), re.M)


def test_val_scores_refuse_a_folder_with_test_predictions(tmp_path: Path) -> None:
    script = load_script("pretrained_defaults")
    (tmp_path / "predictions_test.csv").write_text("id\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="test predictions"):
        script.val_scores(tmp_path)


def _record(config: str, auroc: float, bacc: float, seed: int = 0) -> dict[str, Any]:
    return {"dataset": "d", "config": config, "seed": seed, "val_auroc": auroc, "val_bacc": bacc}


def test_ranking_and_choice_by_validation_score() -> None:
    script = load_script("pretrained_defaults")
    results = [
        _record("base", 0.80, 0.70),
        _record("base", 0.90, 0.80, seed=1),  # base: auroc 0.85, bacc 0.75, score 0.80
        _record("backbone_lr_0.3", 0.90, 0.80),  # 0.85
        _record("backbone_lr_0.1", 0.95, 0.85),  # 0.90
        _record("smoothing_0.1", 0.70, 0.60),  # 0.65
        _record("warmup_0", 0.86, 0.76),  # 0.81: better than the base, but within the margin
    ]
    configs = ["base", "backbone_lr_0.3", "backbone_lr_0.1", "smoothing_0.1", "warmup_0"]
    configs += ["augment_none"]
    ranked = script.ranking(results, configs)
    assert [c for c, _ in ranked] == [
        "backbone_lr_0.1",
        "backbone_lr_0.3",
        "warmup_0",
        "base",
        "smoothing_0.1",
        "augment_none",
    ]
    assert ranked[3][1] == pytest.approx({"val_auroc": 0.85, "val_bacc": 0.75, "score": 0.80})
    pick = script.chosen(results, configs)
    assert pick["backbone_lr_scale"] == 0.1  # better than the base
    assert pick["label_smoothing"] == 0.0  # the base wins
    assert pick["warmup_epochs"] == 1.0  # warmup_0 is within the margin: the base stays
    assert pick["augment"] is None  # its alternatives never ran: not compared
    assert script.chosen([], configs)["backbone_lr_scale"] is None


def test_every_knob_is_set_explicitly() -> None:
    """A run's knobs never come from the defaults being chosen."""
    script = load_script("pretrained_defaults")
    for config in script.CONFIGS:
        sets = dict(o.split("=", 1) for o in script.config_overrides(config))
        assert set(sets) == {f"finetune.{k}" for k in script.BASE}
    assert json.dumps(script.config_overrides("warmup_3")).count("warmup_epochs=3.0") == 1


def test_each_dataset_weighs_the_same_whatever_its_seeds() -> None:
    script = load_script("pretrained_defaults")
    records = [{**_record("base", 0.6, 0.6, seed=s), "dataset": "a"} for s in range(3)] + [
        {**_record("base", 1.0, 1.0), "dataset": "b"}
    ]
    assert script.score(records)["score"] == pytest.approx(0.8)  # not (3 * 0.6 + 1.0) / 4


def _grid(configs: list[str], scores: dict[str, float]) -> list[dict[str, Any]]:
    """One record per configuration with auroc = bacc = its score (unlisted ones at 0.5)."""
    return [_record(c, scores.get(c, 0.5), scores.get(c, 0.5)) for c in configs]


def test_chosen_levels_are_adopted_together_only_if_they_beat_the_base_together() -> None:
    script = load_script("pretrained_defaults")
    configs = list(script.CONFIGS)
    grid = _grid(configs, {"base": 0.80, "warmup_3": 0.85, "augment_medium": 0.83})
    pick = script.chosen(grid, configs)
    assert (pick["warmup_epochs"], pick["augment"]) == (3.0, "medium")
    name = script.combined_name(pick)
    assert name == "combined_warmup_epochs=3.0,augment=medium"
    assert script.adopted(grid, [], configs) is None  # the combination has not run
    together = [_record(name, 0.86, 0.86)]
    assert script.adopted(grid, together, configs) == pick
    # a combination that has not run on every dataset and seed the base ran on decides nothing
    partial = [*grid, _record("base", 0.80, 0.80, seed=1)]
    assert script.adopted(partial, together, configs) is None
    # together they lose what each won alone: only the best single change is adopted
    worse = [_record(name, 0.79, 0.79)]
    assert script.adopted(grid, worse, configs) == {**script.BASE, "warmup_epochs": 3.0}
    # nothing beats the base: the base, and no combination is needed
    flat = _grid(configs, {"base": 0.80})
    assert script.chosen(flat, configs) == script.BASE
    assert script.adopted(flat, [], configs) == script.BASE


def test_the_grid_runs_the_chosen_levels_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every knob is compared, ``main`` runs the combination for every dataset and seed
    with the chosen knobs, and the report gives its row and what to adopt."""
    script = load_script("pretrained_defaults")
    scores = {"base": 0.80, "smoothing_0.1": 0.84, "augment_none": 0.82}
    calls: list[tuple[str, str, int, Any]] = []

    def fake_run(args: Any, dataset: str, config: str, seed: int, knobs: Any = None) -> Any:
        calls.append((dataset, config, seed, knobs))
        value = 0.83 if config.startswith("combined") else scores.get(config, 0.5)
        return {**_record(config, value, value, seed), "dataset": dataset}

    monkeypatch.setattr(script, "one_run", fake_run)
    out = tmp_path / "finetune.md"
    script.main(["--datasets", "busi", "--seeds", "0", "1", "--out", str(out)])
    combined = [c for c in calls if c[1].startswith("combined")]
    knobs = {**script.BASE, "label_smoothing": 0.1, "augment": "none"}
    assert combined == [("busi", script.combined_name(knobs), s, knobs) for s in (0, 1)]
    text = out.read_text(encoding="utf-8")
    assert "| together | combined_label_smoothing=0.1,augment=none | 0.830 |" in text
    assert "scored 0.830 against the base's 0.800: adopted together" in text
