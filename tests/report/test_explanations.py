"""``medtl report --explain``: Grad-CAM and occlusion panels of a real (tiny) model, drawn
for a seeded sample and the most confident errors, with no identifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtl.cli import main
from medtl.data.manifest import Manifest
from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec, evaluate
from medtl.report import build_report
from tests.conftest import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An evaluation folder of a tiny model on a phantom, and the phantom's data root."""
    base = tmp_path_factory.mktemp("explain_report")
    root = train_tiny(base, base / "model", epochs=1)
    spec = DataSpec(base / "m.csv", root, "phantom")
    evaluate(
        [ModelSpec(base / "model", "tiny")],
        [spec],
        base / "eval",
        EvaluateConfig(n_boot=100),
        progress=False,
    )
    return base / "eval", root


def test_report_draws_explanations_without_identifiers(
    evaluated: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, root = evaluated
    result = build_report(folder, tmp_path / "r", {"phantom": root}, explain=True)
    html = result.html.read_text()
    assert "<h3>Explanations (test split)</h3>" in html and 'class="explain"' in html
    panel = json.loads(result.json.read_text())["entries"][0]["explanations"]
    kinds = [d["kind"] for d in panel["images"]]
    assert kinds[:4] == ["sample"] * 4 and set(kinds[4:]) <= {"error"}
    assert panel["layer"].startswith("backbone.stages.")
    for d in panel["images"]:
        assert set(d) == {"kind", "true", "explained", "probability"}
        if d["kind"] == "error":
            assert d["true"] != d["explained"]
    rows = Manifest.load(folder.parent / "m.csv").rows
    assert not any(r.id in html or Path(r.path).name in html for r in rows)


def test_report_explains_nothing_without_data_root(
    evaluated: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, _ = evaluated
    assert main(["report", str(folder), "--out", str(tmp_path / "r"), "--explain"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Not shown: no data root for dataset" in html
    plain = build_report(folder, tmp_path / "plain")
    assert "Explanations (" not in plain.html.read_text()
