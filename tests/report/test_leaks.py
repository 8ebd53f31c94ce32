"""The report of an official split that leaks: official and clean side by side, the leaderboard
says which it ranks by."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

import medtl.evaluate as evaluate_module
from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec, evaluate
from medtl.report import build_report
from tests.data.test_leaks import Planted, make_planted
from tests.test_clean_test import _fake_predict


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report-leaks")
    planted: Planted = make_planted(tmp / "brain")
    patch = pytest.MonkeyPatch()
    patch.setattr(evaluate_module, "_predict", _fake_predict(planted))
    try:
        models = [ModelSpec(tmp / "m1", "m1"), ModelSpec(tmp / "m2", "m2")]
        data = DataSpec(planted.path, planted.root, "brain", "keep")
        evaluate(models, [data], tmp / "eval", EvaluateConfig(n_boot=200), progress=False)
    finally:
        patch.undo()
    return tmp / "eval"


@pytest.mark.parametrize(("rank_by", "n"), [("clean", 21), ("official", 25)])
def test_leaderboard_ranks_by_the_chosen_test_set_and_says_so(
    evaluation: Path, tmp_path: Path, rank_by: str, n: int
) -> None:
    result = build_report(evaluation, tmp_path, rank_by=rank_by)
    payload = json.loads(result.json.read_text())
    board = payload["leaderboard"]
    leaks = payload["entries"][0]["leaks"]
    assert leaks["n_leaking"] == 4 and "leaking_ids" not in leaks  # no identifiers
    assert {(r["test_set"], r["n"]) for r in board} == {(rank_by, n)}
    html = result.html.read_text()
    said = "the <b>clean test subset</b>" if rank_by == "clean" else "the <b>official test split"
    assert said in html


def test_each_model_section_shows_both_sets_with_n_and_the_difference(
    evaluation: Path, tmp_path: Path
) -> None:
    result = build_report(evaluation, tmp_path)
    html = result.html.read_text()
    assert html.count("Official test split vs clean test subset") == 2
    assert "Official test (n = 25)" in html and "Clean test (n = 21)" in html
    assert "4 of 25 official test images share" in html
    rows = list(csv.DictReader(io.StringIO(result.csv.read_text())))
    diff = [r for r in rows if r["section"] == "official_minus_clean" and r["model"] == "m1"]
    clean = [r for r in rows if r["section"] == "clean_test" and r["model"] == "m1"]
    official = [r for r in rows if r["section"] == "overall" and r["model"] == "m1"]
    value = {r["metric"]: float(r["value"]) for r in official}
    clean_value = {r["metric"]: float(r["value"]) for r in clean}
    for r in diff:
        expected = value[r["metric"]] - clean_value[r["metric"]]
        assert float(r["value"]) == pytest.approx(expected)
        assert r["ci_low"] and r["ci_high"]
    assert {r["n"] for r in clean} == {"21"} and {r["metric"] for r in diff} == {
        "accuracy",
        "balanced_accuracy",
        "macro_auroc",
    }
