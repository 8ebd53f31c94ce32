"""Subgroups: the manifest's optional ``subgroups`` column, HAM10000's metadata as coarse
bands, per-subgroup figures with intervals, the largest gap and its interval, in the
evaluation, the report and the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from medtl.data.adapters import age_band
from medtl.data.dataset import DataConfig
from medtl.data.manifest import COLUMNS, Manifest, format_subgroups, parse_subgroups
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.errors import DataError
from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec, evaluate
from medtl.export import export_model
from medtl.finetune.loop import FinetuneConfig, finetune
from medtl.predictions import Predictions
from medtl.report import build_report
from medtl.subgroups import MIN_N, subgroup_report
from tests.conftest import shared

pytestmark = pytest.mark.usefixtures("one_thread")


def test_age_bands_keep_no_exact_age() -> None:
    assert [age_band(a) for a in ("57", "57.0", "0", "80", "", "nan?", "-5")] == [
        "50-59",
        "50-59",
        "0-9",
        "80-89",
        "unknown",
        "unknown",
        "unknown",
    ]


def test_subgroup_cells_round_trip_and_refuse_separators() -> None:
    cell = format_subgroups({"sex": "female", "age": "50-59"})
    assert cell == "age=50-59;sex=female"
    assert parse_subgroups(cell) == {"age": "50-59", "sex": "female"}
    with pytest.raises(DataError, match="may not hold"):
        format_subgroups({"site": "a;b"})
    with pytest.raises(DataError, match="name=value"):
        parse_subgroups("female")


def _pred(labels: np.ndarray, logits: np.ndarray) -> Predictions:
    ids = [f"r{i}" for i in range(len(labels))]
    return Predictions(ids, ids, labels, logits, ["a", "b"], "test")


def test_the_largest_gap_is_flagged_with_its_interval() -> None:
    rng = np.random.default_rng(0)
    n = 120
    labels = np.arange(n) % 2
    good = np.eye(2)[labels] * 4  # right with confidence
    noise = rng.normal(size=(n, 2))  # chance
    sex = np.array(["female"] * 60 + ["male"] * 54 + ["unknown"] * 6)
    logits = np.where((sex == "female")[:, None], good, noise)
    pred = _pred(labels, logits)
    result = subgroup_report(pred, pred.probs(), {"sex": list(sex)}, n_boot=200)["sex"]
    assert result["groups"]["female"]["n"] == 60 and result["groups"]["unknown"]["n"] == 6
    assert result["groups"]["female"]["balanced_accuracy"]["value"] == 1.0
    gap = result["largest_gap"]
    male = result["groups"]["male"]["balanced_accuracy"]["value"]
    assert (gap["high"], gap["low"]) == ("female", "male")  # unknown is never in the gap
    assert gap["value"] == pytest.approx(1.0 - male)
    assert 0 < gap["ci_low"] <= gap["value"] <= gap["ci_high"]


def test_no_gap_without_two_large_known_subgroups() -> None:
    labels = np.arange(30) % 2
    pred = _pred(labels, np.eye(2)[labels])
    site = ["back"] * 25 + ["face"] * (MIN_N - 5)
    assert (
        subgroup_report(pred, pred.probs(), {"site": site}, n_boot=100)["site"]["largest_gap"]
        is None
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny model evaluated on a phantom manifest whose rows carry a ``sex`` subgroup."""
    base = tmp_path_factory.mktemp("subgroups")
    root = make_phantom(base / "phantom", n=160, size=32, duplicates=0)
    manifest = prepare("folder", root, base / "m.csv", workers=1).manifest
    ft = FinetuneConfig(backbone="medtl_tiny_convnext", epochs=2, batch_size=16, min_epochs=2)
    cfg = DataConfig(image_size=32, channels=1, batch_size=16)
    finetune(ft, manifest, root, cfg, base / "model", progress=False)
    seen: dict[str, int] = {}  # alternate within each split: both subgroups of equal size
    rows = []
    for r in manifest.rows:
        seen[r.split] = seen.get(r.split, -1) + 1
        sex = format_subgroups({"sex": ("female", "male")[seen[r.split] % 2]})
        rows.append(dataclasses.replace(r, subgroups=sex))
    Manifest(rows, manifest.meta).save(base / "with_sex.csv")
    spec = DataSpec(base / "with_sex.csv", root, "phantom")
    cfg_eval = EvaluateConfig(n_boot=100)
    evaluate([ModelSpec(base / "model", "tiny")], [spec], base / "eval", cfg_eval, progress=False)
    return base, root, base / "eval"


def test_manifest_column_round_trips_and_is_absent_without_subgroups(
    evaluated: tuple[Path, Path, Path],
) -> None:
    base = evaluated[0]
    plain, with_sex = Manifest.load(base / "m.csv"), Manifest.load(base / "with_sex.csv")
    assert (base / "m.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert (base / "with_sex.csv").read_text().splitlines()[0] == ",".join(COLUMNS) + ",subgroups"
    assert {r.subgroups for r in with_sex.rows} == {"sex=female", "sex=male"}
    assert plain.sha256 != with_sex.sha256


def test_evaluation_report_and_card_show_subgroups(
    evaluated: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, _, folder = evaluated
    entry = json.loads((folder / "evaluation.json").read_text())["entries"][0]
    assert entry["status"] == "ok", entry["error"]
    sex = entry["metrics"]["subgroups"]["sex"]
    assert set(sex["groups"]) == {"female", "male"}
    assert sum(g["n"] for g in sex["groups"].values()) == entry["metrics"]["n"]
    gap = sex["largest_gap"]
    assert {gap["high"], gap["low"]} == {"female", "male"}
    html = build_report(folder, tmp_path / "report").html.read_text()
    assert "<h3>Subgroups (test split)</h3>" in html and "Largest gap in sex" in html
    export_model(base / "model", tmp_path / "card", folder, formats=["card"])
    card = (tmp_path / "card" / "model_card.md").read_text()
    assert "sex: largest gap in balanced_accuracy" in card


def test_real_isic_sample_carries_ham_subgroups(tmp_path: Path) -> None:
    root = shared("isic2018_sample")
    manifest = prepare("isic2018", root, tmp_path / "isic.csv", workers=1).manifest
    train = [r for r in manifest.rows if r.split in ("train", "val")]
    assert train and all(r.subgroups for r in train)
    columns = {k for r in train for k in parse_subgroups(r.subgroups)}
    assert columns == {"age", "sex", "localization"}  # the sample's metadata has no 'dataset'
    ages = {parse_subgroups(r.subgroups)["age"] for r in train}
    assert all(a == "unknown" or a.endswith("9") for a in ages)
    assert not any("HAM_" in r.subgroups or "ISIC_" in r.subgroups for r in manifest.rows)


def test_isic_benchmark_runs_on_the_real_sample(tmp_path: Path) -> None:
    from tests.test_benchmark_scripts import load_script

    root = shared("isic2018_sample")
    script = load_script("isic_subgroups")
    entries = script.run(root, tmp_path, "medtl_tiny_convnext", 1, 32, 100)
    lines = script.summary(entries)
    assert lines[0].startswith("val: n ") and any(line.startswith("  sex: ") for line in lines)
    assert "test: n 70" in "\n".join(lines)  # the sample's metadata covers training images only
