"""Official test vs clean test: figures, the paired difference, the policies, and evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import medtl.evaluate as evaluate_module
from medtl.artifacts import ModelCard
from medtl.clean_test import evaluate_with_leaks, headline_resamples, subset
from medtl.data.leaks import SplitLeaks
from medtl.data.manifest import Manifest
from medtl.errors import DataError
from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec, evaluate
from medtl.metrics import evaluate_predictions
from medtl.predictions import Predictions
from tests.data.test_leaks import Planted, make_planted

CLASSES = ["a", "b"]


def _logits(labels: np.ndarray, correct: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Two-class logits: the true class (or the other one where not ``correct``) by ``margin``."""
    called = np.where(correct, labels, 1 - labels)
    out = np.zeros((len(labels), 2))
    out[np.arange(len(labels)), called] = margin
    return out


def _pred(n: int, leak: int, split: str, seed: int) -> Predictions:
    """``n`` cases, the first ``leak`` of them (ids l*) called right with a large margin, the
    clean rest (ids c*) right on every other case."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    correct = np.r_[np.ones(leak, bool), np.arange(n - leak) % 2 == 0]
    margin = np.r_[np.full(leak, 6.0), rng.uniform(0.5, 2.0, n - leak)]
    ids = [f"l{i}" for i in range(leak)] + [f"c{i}" for i in range(n - leak)]
    return Predictions(ids, ids, labels, _logits(labels, correct, margin), CLASSES, split)


def _leaks(test: Predictions, leak: int, source: str = "official+carved-val") -> SplitLeaks:
    return SplitLeaks(source, len(test.ids), frozenset(test.ids[:leak]), leak)


def test_keep_reports_official_and_clean_side_by_side_with_the_difference() -> None:
    test, val = _pred(40, 8, "test", 0), _pred(30, 0, "val", 1)
    reported, metrics, record = evaluate_with_leaks(
        test, val, _leaks(test, 8), "keep", "b", 300, 0, 1.0
    )
    assert record is not None and reported is test
    clean = record["clean_metrics"]
    assert (metrics["n"], clean["n"]) == (40, 32)
    assert (record["n_official"], record["n_leaking"], record["n_clean"]) == (40, 8, 32)
    official_acc = metrics["overall"]["accuracy"]["value"]
    clean_acc = clean["overall"]["accuracy"]["value"]
    assert (official_acc, clean_acc) == (pytest.approx(24 / 40), pytest.approx(16 / 32))
    diff = record["difference"]["accuracy"]
    assert diff["value"] == pytest.approx(24 / 40 - 16 / 32)
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"] and diff["ci_low"] >= 0
    for name in ("balanced_accuracy", "macro_auroc"):
        d = record["difference"][name]
        point = metrics["overall"][name]["value"] - clean["overall"][name]["value"]
        assert d["value"] == pytest.approx(point) and d["ci_low"] <= d["ci_high"]


def test_no_leak_gives_equal_figures_and_a_zero_difference() -> None:
    test, val = _pred(40, 0, "test", 0), _pred(30, 0, "val", 1)
    _, metrics, record = evaluate_with_leaks(test, val, _leaks(test, 0), "keep", None, 200, 0, 1.0)
    assert record is not None
    assert record["clean_metrics"]["overall"] == metrics["overall"]
    assert record["difference"]["accuracy"]["value"] == 0.0
    assert record["difference"]["accuracy"]["ci_high"] == 0.0


def test_drop_evaluates_the_clean_subset_only() -> None:
    test, val = _pred(40, 8, "test", 0), _pred(30, 0, "val", 1)
    reported, metrics, record = evaluate_with_leaks(
        test, val, _leaks(test, 8), "drop", None, 200, 0, 1.0
    )
    assert record is not None and record["evaluated_on"] == "clean"
    assert reported.ids == test.ids[8:] and metrics["n"] == 32
    assert metrics["overall"]["accuracy"]["value"] == pytest.approx(0.5)
    assert "clean_metrics" not in record


def test_drop_with_nothing_clean_is_a_clear_error() -> None:
    test = _pred(10, 10, "test", 0)
    with pytest.raises(DataError, match=r"data\.leaks=resplit"):
        evaluate_with_leaks(test, None, _leaks(test, 10), "drop", None, 200, 0, 1.0)


def test_a_seeded_split_has_no_record_and_a_resplit_says_so() -> None:
    test = _pred(20, 0, "test", 0)
    _, _, none = evaluate_with_leaks(test, None, _leaks(test, 0, "seeded"), "keep", None, 200, 0, 1)
    assert none is None
    _, metrics, record = evaluate_with_leaks(
        test, None, _leaks(test, 0, "resplit"), "keep", None, 200, 0, 1.0
    )
    assert record is not None and record["evaluated_on"] == "resplit"
    assert "official split was ignored" in record["note"] and metrics["n"] == 20


def test_thresholds_and_temperature_come_from_validation_on_both_sets() -> None:
    """The test split chooses nothing: the clean figures use the official figures' thresholds."""
    test, val = _pred(40, 8, "test", 0), _pred(30, 0, "val", 1)
    _, metrics, record = evaluate_with_leaks(test, val, _leaks(test, 8), "keep", "b", 200, 0, 1.7)
    assert record is not None
    ours, theirs = (
        metrics["operating_points"]["b"],
        record["clean_metrics"]["operating_points"]["b"],
    )
    assert ours["thresholds"] == theirs["thresholds"]
    direct = evaluate_predictions(test, val, "b", 200, 0, 1.7)["operating_points"]["b"]
    assert ours["thresholds"] == direct["thresholds"]
    assert record["clean_metrics"]["calibration"]["after"]["temperature"] == 1.7


def test_headline_resamples_match_the_point_figures() -> None:
    test = _pred(30, 6, "test", 3)
    probs = test.probs()
    w = np.ones((1, 30))
    for keep in (np.ones(30, bool), np.arange(30) >= 6):
        got = headline_resamples(probs, test.labels, np.array([True, True]), w * keep)
        ref = evaluate_predictions(subset(test, keep.tolist()), None, None, 100, 0)["overall"]
        for name in ("accuracy", "balanced_accuracy", "macro_auroc"):
            assert got[name][0] == pytest.approx(ref[name]["value"])


# -- through evaluate(), the model's inference replaced by known logits ---------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("leaks") / "brain")


def _fake_predict(planted: Planted) -> Any:
    """Leaking test images called right, clean ones right on every other image."""
    manifest = Manifest.load(planted.path)
    leaking = {r.id for r in manifest.rows if r.path in planted.leaking}

    def predict(spec: ModelSpec, data: DataSpec, split: str, *args: Any) -> Any:
        rows = manifest.split(split)
        labels = np.array([manifest.label_index(r.label) for r in rows])
        correct = np.array([r.id in leaking or i % 2 == 0 for i, r in enumerate(rows)])
        called = np.where(correct, labels, (labels + 1) % 4)
        logits = np.zeros((len(rows), 4))
        logits[np.arange(len(rows)), called] = 3.0 + int(spec.name[-1])
        ids, groups = [r.id for r in rows], [r.group for r in rows]
        pred = Predictions(ids, groups, labels, logits, manifest.classes, split, spec.name)
        val = Predictions(ids, groups, labels, logits, manifest.classes, "val", spec.name)
        card = ModelCard(
            medtl_version="test",
            backbone="medtl_tiny_convnext",
            classes=manifest.classes,
            in_chans=3,
            image_size=32,
            strategy="full",
            manifest_sha256="0" * 64,
            best_epoch=1,
            val_bacc=0.5,
            epochs_run=1,
        )
        return card, pred, val

    return predict


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_evaluate_records_the_policy_for_every_model_and_the_ensemble(
    planted: Planted, policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate_module, "_predict", _fake_predict(planted))
    models = [ModelSpec(tmp_path / "m1", "m1"), ModelSpec(tmp_path / "m2", "m2")]
    data = DataSpec(planted.path, planted.root, "brain", policy)
    cfg = EvaluateConfig(n_boot=200, ensemble=True)
    path = evaluate(models, [data], tmp_path / "eval", cfg, progress=False)
    entries = json.loads(path.read_text())["entries"]
    assert [e["status"] for e in entries] == ["ok"] * 3
    for e in entries:
        record = e["leaks"]
        assert (record["policy"], record["n_official"], record["n_leaking"]) == (policy, 25, 4)
        n = e["metrics"]["n"]
        saved = Predictions.load(tmp_path / "eval" / e["predictions"])
        assert len(saved.ids) == n == (25 if policy == "keep" else 21)
        if policy == "keep":
            assert record["clean_metrics"]["n"] == 21
            assert record["difference"]["accuracy"]["value"] > 0  # the leak flatters
