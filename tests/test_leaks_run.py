"""``medtl run`` with each ``data.leaks`` policy on planted cross-split duplicates (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medtl.data.manifest import Manifest
from medtl.pipeline import open_run, run_all
from medtl.recipe import load_recipe
from tests.data.test_leaks import Planted, make_planted
from tests.test_tracking import scalars

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("leaks-run") / "brain")


def _run(planted: Planted, policy: str, out: Path) -> dict:
    recipe = {
        "name": "leaks",
        "data": {
            "adapter": "brain_tumor_mri",
            "manifest": str(planted.path),
            "leaks": policy,
            "loader": {"image_size": 32, "channels": 1},
        },
        "finetune": {
            "backbone": "medtl_tiny_convnext",
            "strategy": "full",
            "epochs": 1,
            "batch_size": 16,
        },
        "evaluate": {"n_boot": 100},
        "report": {"thumbnails": False},
    }
    path = out.parent / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with open_run(load_recipe(path), out, str(planted.root), "cpu", progress=False) as ctx:
        run_all(ctx)
    return json.loads((out / "evaluate" / "evaluation.json").read_text())["entries"][0]


@pytest.mark.parametrize(("policy", "n"), [("keep", 25), ("drop", 21)])
def test_keep_and_drop_train_on_the_official_split(
    planted: Planted, policy: str, n: int, tmp_path: Path
) -> None:
    entry = _run(planted, policy, tmp_path / "run")
    assert entry["status"] == "ok" and entry["leaks"]["policy"] == policy
    assert entry["metrics"]["n"] == n and entry["leaks"]["n_leaking"] == 4
    assert not (tmp_path / "run" / "data" / "resplit.csv").exists()
    report = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "Official test split vs clean test subset" in report
    tracked = scalars(tmp_path / "run" / "tensorboard" / "evaluate")
    assert ("leaks/test_clean/accuracy/value" in tracked) == (policy == "keep")


def test_resplit_trains_and_tests_on_a_group_aware_split(planted: Planted, tmp_path: Path) -> None:
    entry = _run(planted, "resplit", tmp_path / "run")
    manifest = Manifest.load(tmp_path / "run" / "data" / "resplit.csv")
    assert manifest.meta.split_source == "resplit"
    assert entry["manifest"].endswith("resplit.csv")
    assert entry["leaks"]["evaluated_on"] == "resplit" and entry["leaks"]["n_leaking"] == 0
    assert entry["metrics"]["n"] == sum(r.split == "test" for r in manifest.rows)
    meta = json.loads((tmp_path / "run" / "finetune" / "meta.json").read_text())
    assert meta["manifest_sha256"] == manifest.sha256
    assert "official split was ignored" in (tmp_path / "run" / "report" / "report.html").read_text()
