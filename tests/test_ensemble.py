"""Ensembles chosen on validation: Caruana's greedy weights, the typed card, a guard that the
test split is never read to choose, the ``ensemble`` recipe section end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtl.artifacts import ModelCard
from medtl.calibrate import TemperatureScaling
from medtl.demo import run_demo
from medtl.ensemble import (
    EnsembleCard,
    EnsembleConfig,
    choose_ensemble,
    greedy_weights,
    log_loss,
    resolve_members,
)
from medtl.errors import ConfigError, DataError
from medtl.evaluate import CalibrateConfig, ModelSpec, calibrate_model
from medtl.predictions import Predictions
from medtl.recipe import load_recipe
from tests.test_pipeline import TINY

CLASSES = ["benign", "malignant"]


def test_greedy_picks_the_better_model_alone() -> None:
    labels = np.array([0, 1])
    good = np.array([[0.9, 0.1], [0.1, 0.9]])
    flat = np.full((2, 2), 0.5)
    weights, trace = greedy_weights([flat, good], labels, rounds=5)
    assert weights == [0.0, 1.0]
    assert trace == pytest.approx([-np.log(0.9)] * 5)


def test_greedy_keeps_the_best_round() -> None:
    """After round 2 (the mix of A and B) every addition hurts: round 3's weights (2:1) are
    worse on validation than round 2's, so the weights are round 2's."""
    labels = np.array([0, 1])
    a = np.array([[0.99, 0.01], [0.6, 0.4]])
    b = np.array([[0.4, 0.6], [0.01, 0.99]])
    weights, trace = greedy_weights([a, b], labels, rounds=3)
    assert trace[2] > trace[1] and weights == [0.5, 0.5]


def test_greedy_mixes_models_that_err_on_different_images() -> None:
    """A is right with confidence on image 0 only, B on image 1 only: round 1 takes A (a tie,
    the first), round 2 adds B, whose average (0.695 on each true class) beats A alone."""
    labels = np.array([0, 1])
    a = np.array([[0.99, 0.01], [0.6, 0.4]])
    b = np.array([[0.4, 0.6], [0.01, 0.99]])
    weights, trace = greedy_weights([a, b], labels, rounds=2)
    assert weights == [0.5, 0.5]
    assert trace[0] == pytest.approx((-np.log(0.99) - np.log(0.4)) / 2)
    assert trace[1] == pytest.approx(-np.log(0.695))


def _member(folder: Path, seed: int, temperature: float, manifest: str = "m" * 64) -> Path:
    """A model folder without a network: a card, validation predictions and POISONED test
    predictions (labels flipped, absurd logits) that would change any choice that read them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    card = ModelCard(
        medtl_version="test",
        backbone="medtl_tiny_convnext",
        classes=CLASSES,
        in_chans=1,
        image_size=32,
        strategy="full",
        seed=seed,
        manifest_sha256=manifest,
        best_epoch=1,
        val_bacc=0.5,
        epochs_run=1,
        calibrator=TemperatureScaling(temperature),
    )
    card.save(folder / "meta.json")
    labels = np.array([0, 1] * 20)
    logits = np.stack([-labels, labels], axis=1) * 2.0 + rng.normal(0, 2.0, (40, 2))
    ids = [f"r{i}" for i in range(40)]
    Predictions(ids, ids, labels, logits, CLASSES, "val", f"m{seed}", manifest).save(
        folder / "predictions_val.csv"
    )
    poison = np.stack([labels, -labels], axis=1) * 50.0 * (seed + 1)
    Predictions(ids, ids, 1 - labels, poison, CLASSES, "test", f"m{seed}", manifest).save(
        folder / "predictions_test.csv"
    )
    return folder


def test_the_choice_never_reads_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = [ModelSpec(_member(tmp_path / f"m{s}", s, 1.0 + s), f"m{s}") for s in range(3)]
    read: list[str] = []
    load = Predictions.load

    def guarded(path: str | Path) -> Predictions:
        read.append(Path(path).name)
        if "test" in Path(path).name:
            raise AssertionError(f"the ensemble choice read {path}")
        return load(path)

    monkeypatch.setattr(Predictions, "load", staticmethod(guarded))
    card = choose_ensemble(EnsembleConfig(members=["a", "b", "c"], rounds=10), members)
    assert read == ["predictions_val.csv"] * 3
    assert card.chosen_on == "val" and sum(card.weights) == pytest.approx(1.0)
    # poisoning the test predictions another way changes nothing
    for spec in members:
        (spec.folder / "predictions_test.csv").write_text("garbage")
    again = choose_ensemble(EnsembleConfig(members=["a", "b", "c"], rounds=10), members)
    assert again.weights == card.weights


def test_the_card_records_calibrated_validation_losses(tmp_path: Path) -> None:
    members = [ModelSpec(_member(tmp_path / f"m{s}", s, 1.0 + s), f"m{s}") for s in range(2)]
    card = choose_ensemble(EnsembleConfig(members=["a", "b"]), members)
    val = Predictions.load(members[1].folder / "predictions_val.csv")
    assert card.members[1].val_log_loss == pytest.approx(log_loss(val.probs(2.0), val.labels))
    assert card.members[1].calibrator["name"] == "temperature"
    assert card.members[1].calibrator["temperature"] == 2.0
    assert card.val_log_loss <= min(m.val_log_loss for m in card.members) + 1e-12
    card.save(tmp_path / "ensemble.json")
    assert EnsembleCard.load(tmp_path / "ensemble.json") == card
    assert card.label.startswith("ensemble(")


def test_a_member_whose_val_file_holds_test_predictions_is_refused(tmp_path: Path) -> None:
    folder = _member(tmp_path / "m0", 0, 1.0)
    for suffix in (".csv", ".json"):
        shutil.copy(folder / f"predictions_test{suffix}", folder / f"predictions_val{suffix}")
    with pytest.raises(DataError, match="validation only"):
        choose_ensemble(EnsembleConfig(members=["a"]), [ModelSpec(folder, "a")])


def test_members_from_another_split_are_refused(tmp_path: Path) -> None:
    a = ModelSpec(_member(tmp_path / "a", 0, 1.0), "a")
    b = ModelSpec(_member(tmp_path / "b", 1, 1.0, manifest="x" * 64), "b")
    with pytest.raises(DataError, match="share the run's split"):
        choose_ensemble(EnsembleConfig(members=["a", "b"]), [a, b])


def test_fixed_and_equal_weights(tmp_path: Path) -> None:
    members = [ModelSpec(_member(tmp_path / f"m{s}", s, 1.0), f"m{s}") for s in range(2)]
    fixed = EnsembleConfig(members=["a", "b"], select="fixed", weights=[3, 1])
    assert choose_ensemble(fixed, members).weights == [0.75, 0.25]
    equal = choose_ensemble(EnsembleConfig(members=["a", "b"], select="equal"), members)
    assert equal.weights == [0.5, 0.5] and equal.val_log_loss == equal.val_log_loss_equal


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ensemble.select=fixed", "exactly when select is 'fixed'"),
        ("ensemble.weights=[1, 2]", "exactly when select is 'fixed'"),
        ("ensemble.select=best", "ensemble.select"),
    ],
)
def test_the_recipe_section_is_checked(tmp_path: Path, override: str, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {adapter: folder}\nensemble: {members: [this, runs/b]}\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])


def test_a_member_folder_without_a_model_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no fine-tuned model"):
        resolve_members(EnsembleConfig(members=[str(tmp_path)]), None)
    with pytest.raises(ConfigError, match="'this' names a run's own model"):
        resolve_members(EnsembleConfig(), None)


def test_the_recipe_ensemble_is_an_entry_of_the_evaluation_and_the_report(
    tmp_path: Path,
) -> None:
    """A demo run, then its model and a copy calibrated by vector scaling as the members: the
    evaluation gains the members' entries and the ensemble's, weighted as its card says."""
    run = tmp_path / "run"
    run_demo(run, n=48, size=32, quiet=True, overrides=TINY)
    member = tmp_path / "member"
    shutil.copytree(run / "finetune", member)
    calibrate_model(member, CalibrateConfig(method="vector", compare=[]))
    ensemble = [f"ensemble.members=[this, {member}@vector]", "ensemble.rounds=4"]
    report = run_demo(run, n=48, size=32, quiet=True, overrides=[*TINY, *ensemble])
    card = EnsembleCard.load(run / "evaluate" / "ensemble.json")
    assert [m.name for m in card.members] == ["demo/full/seed0", "vector"]
    assert sum(card.weights) == pytest.approx(1.0) and card.chosen_on == "val"
    entries = json.loads((run / "evaluate" / "evaluation.json").read_text())["entries"]
    assert [e["model"] for e in entries] == ["demo/full/seed0", "vector", card.label]
    assert all(e["status"] == "ok" for e in entries), [e["error"] for e in entries]
    chosen = entries[2]
    assert chosen["model_meta"]["chosen_on"] == "val"
    assert "ci_low" in chosen["metrics"]["overall"]["macro_auroc"]
    kept = [m for m in card.members if m.weight > 0]
    preds = {e["model"]: Predictions.load(run / "evaluate" / e["predictions"]) for e in entries}
    from medtl.calibrate import Calibrator

    mean = sum(
        m.weight * preds[m.name].probs(Calibrator.from_dict(dict(m.calibrator))) for m in kept
    )
    assert np.allclose(preds[card.label].probs(), mean, atol=1e-9)
    assert card.label in report.read_text()


def test_weighted_ensemble_of_probabilities() -> None:
    from medtl import metrics

    ids = ["a", "b"]
    one = Predictions(ids, ids, [0, 1], np.log([[0.8, 0.2], [0.4, 0.6]]), CLASSES, "test", "x")
    two = Predictions(ids, ids, [0, 1], np.log([[0.4, 0.6], [0.2, 0.8]]), CLASSES, "test", "y")
    combined = metrics.ensemble([one, two], weights=[3, 1])
    assert np.allclose(combined.probs(), [[0.7, 0.3], [0.35, 0.65]])
    assert combined.extra["weights"] == "0.75,0.25"
    with pytest.raises(ConfigError, match="one per member"):
        metrics.ensemble([one, two], weights=[1.0])
