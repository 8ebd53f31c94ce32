"""``build_report`` on an evaluation folder in the exact ``medtl evaluate`` layout.

The fixture (``evaluation_fixture.py``) holds two models on a 3-class task, one on a 2-class
task, a failed entry and a DeLong comparison, with real prediction files, a manifest of tiny
PNGs and metrics from the real ``evaluate_predictions``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medtl.errors import DataError
from medtl.metrics import evaluate_predictions
from medtl.predictions import Predictions
from medtl.report import ReportResult, build_report
from medtl.report.load import load_evaluation
from tests.report.evaluation_fixture import (
    EvaluationFolder,
    build_evaluation_folder,
    data_block,
    entry_head,
    make_predictions,
    model_meta,
    write_evaluation,
)

SECTIONS = (
    "How to read this report",
    "1. Leaderboard",
    "2. Failures",
    "3. Per-model results",
    "4. Comparisons (DeLong)",
)
ENTRY_HEADINGS = (
    "Run information",
    "Overall figures (test split)",
    "Per-class figures (test split, one-vs-rest)",
    "Confusion matrix (test split)",
    "ROC and precision-recall curves (test split)",
    "Calibration (test split)",
    "Operating points (thresholds chosen on validation, figures on test)",
    "Notes",
    "Most confident errors (test split)",
)
OK_MODELS = ("toy3/full/seed0", "toy3/linear/seed0", "toy2/full/seed0")


class Page(HTMLParser):
    """Collects headings, ids, image sources and link targets of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.ids: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(str(a["id"]))
        if "src" in a:
            self.srcs.append(str(a["src"]))
        if "href" in a:
            self.hrefs.append(str(a["href"]))
        if tag in ("h1", "h2", "h3", "h4"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def roots(folder: EvaluationFolder) -> dict[str, Path]:
    return {"toy3": folder.data_root, "toy2": folder.data_root}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvaluationFolder, ReportResult]:
    base = tmp_path_factory.mktemp("report")
    folder = build_evaluation_folder(base)
    return folder, build_report(folder.evaluation_dir, base / "out", roots(folder))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def strict_load(path: Path) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path.name} holds the non-JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


# -- structure ------------------------------------------------------------------------------------
def test_outputs_exist_and_every_section_is_there(built: tuple[EvaluationFolder, ReportResult]):
    _, result = built
    assert (result.n_ok, result.n_failed) == (3, 1)
    page = parse(result.html.read_text(encoding="utf-8"))
    assert "Model evaluation report" in page.headings
    for title in SECTIONS:
        assert title in page.headings, title
    for i, model in enumerate(OK_MODELS, start=1):
        assert f"3.{i} {model}" in " ".join(page.headings)
    for heading in ENTRY_HEADINGS:
        assert page.headings.count(heading) == len(OK_MODELS), heading
    assert {"leaderboard", "failures", "comparisons", "entry-1", "entry-2", "entry-3"} <= set(
        page.ids
    )
    assert not list(result.html.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_leaderboard_shows_each_model_with_intervals(built: tuple[EvaluationFolder, ReportResult]):
    folder, result = built
    html = result.html.read_text(encoding="utf-8")
    board = html[html.index('id="leaderboard"') : html.index('id="failures"')]
    for entry in folder.evaluation()["entries"][:3]:
        overall = entry["metrics"]["overall"]
        for key in ("macro_auroc", "balanced_accuracy", "accuracy"):
            e = overall[key]
            text = (
                f'{e["value"]:.3f} <span class="ci">[{e["ci_low"]:.3f}, {e["ci_high"]:.3f}]</span>'
            )
            assert text in board, (entry["model"], key)
        assert entry["model"] in board
    board = strict_load(result.json)["leaderboard"]
    assert [r["dataset"] for r in board] == ["toy2", "toy3", "toy3"]  # datasets in name order
    aurocs = [r["macro_auroc"]["value"] for r in board[1:]]
    assert aurocs == sorted(aurocs, reverse=True)  # best macro AUROC first within a dataset


def test_failed_entry_is_listed_and_the_rest_reported(built: tuple[EvaluationFolder, ReportResult]):
    _, result = built
    html = result.html.read_text(encoding="utf-8")
    failures = html[html.index('id="failures"') : html.index('id="models"')]
    assert "toy3/broken/seed0" in failures
    assert "predictions have 2 classes, the manifest 3" in failures
    report = strict_load(result.json)
    assert [f["model"] for f in report["failures"]] == ["toy3/broken/seed0"]
    assert [e["model"] for e in report["entries"]] == list(OK_MODELS)


# -- numbers ---------------------------------------------------------------------------------------
def expected_value(evaluation: dict[str, Any], row: dict[str, str]) -> Any:
    """The evaluation.json value a tables.csv row claims to hold, looked up independently."""
    if row["section"] == "comparison":
        for c in evaluation["comparisons"]:
            if f"{c['model_a']} vs {c['model_b']}" == row["model"]:
                block = c["delong"][row["class"]]
                key = "difference" if row["metric"] == "auroc_difference" else row["metric"]
                ci = {"ci_low": block["ci_low"], "ci_high": block["ci_high"]}
                return {
                    "value": block[key],
                    "method": "delong",
                    **(ci if key == "difference" else {}),
                }
        raise AssertionError(f"no comparison {row['model']}")
    entry = next(
        e
        for e in evaluation["entries"]
        if (e["model"], e["dataset"], e["split"]) == (row["model"], row["dataset"], row["split"])
    )
    m, section, metric = entry["metrics"], row["section"], row["metric"]
    if section == "overall":
        return m["overall"][metric]
    if section == "per_class":
        return m["per_class"][row["class"]][metric]
    if section.startswith("calibration_"):
        return m["calibration"][section.removeprefix("calibration_")][metric]
    assert section == "operating_point", section
    name, key = metric.split(":")
    op = m["operating_points"][row["class"]]
    return op["thresholds"][name] if key == "threshold" else op["test"][name][key]


def same_number(cell: str, value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == ""
    return cell != "" and float(cell) == float(value)


def test_every_number_in_tables_csv_matches_evaluation_json(
    built: tuple[EvaluationFolder, ReportResult],
):
    folder, result = built
    evaluation = folder.evaluation()
    rows = read_csv(result.csv)
    assert rows
    for row in rows:
        expected = expected_value(evaluation, row)
        if isinstance(expected, dict):
            for key in ("value", "ci_low", "ci_high"):
                assert same_number(row[key], expected.get(key)), (row, key, expected)
            assert row["method"] == expected["method"], row
        else:
            assert same_number(row["value"], expected), (row, expected)
            assert row["ci_low"] == row["ci_high"] == "", row
    # and nothing is left out: every overall, per-class and calibration figure has its row
    for entry in evaluation["entries"][:3]:
        mine = [r for r in rows if r["model"] == entry["model"]]
        m = entry["metrics"]
        assert sum(r["section"] == "overall" for r in mine) == len(m["overall"])
        n_class = sum(len(t) for t in m["per_class"].values())
        assert sum(r["section"] == "per_class" for r in mine) == n_class
        for stage in ("before", "after"):
            assert any(
                r["section"] == f"calibration_{stage}" and r["metric"] == "ece" for r in mine
            )
    assert sum(r["section"] == "comparison" for r in rows) == 3 * 4  # 3 classes x 4 figures


def test_report_json_is_strict_and_holds_the_csv_rows(built: tuple[EvaluationFolder, ReportResult]):
    folder, result = built
    report = strict_load(result.json)
    rows = read_csv(result.csv)
    assert len(report["tables"]) == len(rows)
    for mine, theirs in zip(report["tables"], rows, strict=True):
        for key in ("value", "ci_low", "ci_high"):
            assert same_number(theirs[key], mine[key]), (mine, theirs)
        assert (mine["model"], mine["metric"], mine["method"] or "") == (
            theirs["model"],
            theirs["metric"],
            theirs["method"],
        )
    evaluation = folder.evaluation()
    for mine, source in zip(report["entries"], evaluation["entries"], strict=False):
        assert (
            mine["metrics"]["overall"]["macro_auroc"] == source["metrics"]["overall"]["macro_auroc"]
        )


# -- self-contained and private ----------------------------------------------------------------------
def test_html_is_self_contained(built: tuple[EvaluationFolder, ReportResult]):
    _, result = built
    html = result.html.read_text(encoding="utf-8")
    page = parse(html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "url(" not in html and "@import" not in html
    assert page.srcs and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert page.hrefs and all(h.startswith("#") and not h.startswith("//") for h in page.hrefs)
    for src in page.srcs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "PNG"
            img.verify()


def test_no_data_root_path_leaks(built: tuple[EvaluationFolder, ReportResult]):
    folder, result = built
    for path in (result.html, result.json, result.csv):
        text = path.read_text(encoding="utf-8")
        assert str(folder.data_root) not in text, path.name
        assert str(folder.data_root.resolve()) not in text, path.name
    # the failure message named a file under the data root: shown with a placeholder
    assert "&lt;data root of toy3&gt;/toy3/test/000.png" in result.html.read_text(encoding="utf-8")


def test_gallery_shows_thumbnails_without_identifiers(built: tuple[EvaluationFolder, ReportResult]):
    folder, result = built
    report = strict_load(result.json)
    html = result.html.read_text(encoding="utf-8")
    for entry in report["entries"]:
        cards = entry["gallery"]["cards"]
        assert 0 < len(cards) <= 8
        assert all(c["thumbnail"] and c["reason"] is None for c in cards)
        probs = [c["probability"] for c in cards]
        assert probs == sorted(probs, reverse=True)
    gallery = html[html.index("Most confident errors") :]
    thumbs = re.findall(r'<div class="card"><img src="([^"]+)"', gallery)
    assert thumbs
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))) as img:
        assert max(img.size) == 96
    shown = html[html.index('id="models"') :]  # the failure message quotes a path on purpose
    for manifest in folder.manifests.values():
        for row in manifest.rows:
            assert row.id not in shown and row.path not in shown and row.group not in shown


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_data_root_and_missing_image(
    built: tuple[EvaluationFolder, ReportResult], tmp_path: Path
):
    folder, _ = built
    images = tmp_path / "images"
    shutil.copytree(folder.data_root, images)
    pred = folder.predictions[("toy2/full/seed0", "toy2")]
    probs = pred.probs(folder.temperatures[("toy2/full/seed0", "toy2")])
    wrong = np.flatnonzero(probs.argmax(axis=1) != pred.labels)
    worst = wrong[np.argmax(probs[wrong].max(axis=1))]
    row = next(r for r in folder.manifests["toy2"].rows if r.id == pred.ids[worst])
    (images / row.path).unlink()
    result = build_report(folder.evaluation_dir, tmp_path / "out", {"toy2": images})
    report = strict_load(result.json)
    by_model = {e["model"]: e["gallery"] for e in report["entries"]}
    toy2 = by_model["toy2/full/seed0"]["cards"]
    assert toy2[0]["reason"] == "image missing or unreadable" and not toy2[0]["thumbnail"]
    assert all(c["thumbnail"] for c in toy2[1:])
    for model in OK_MODELS[:2]:
        assert "no data root was given for dataset 'toy3'" in by_model[model]["message"]
        assert not any(c["thumbnail"] for c in by_model[model]["cards"])
    html = result.html.read_text(encoding="utf-8")
    assert "image missing or unreadable" in html and "data root not given" in html
    assert str(images) not in html


def single_class_folder(folder: EvaluationFolder, base: Path) -> Path:
    """An evaluation folder with one entry whose test split holds only class 'negative'."""
    manifest = folder.manifests["toy2"]
    full = make_predictions(manifest, "test", "toy2/only-negative/seed0", 1.3, seed=7)
    keep = full.labels == 0
    test = Predictions(
        [i for i, k in zip(full.ids, keep, strict=True) if k],
        [g for g, k in zip(full.groups, keep, strict=True) if k],
        full.labels[keep],
        full.logits[keep],
        full.classes,
        "test",
        full.model,
        full.manifest_sha256,
    )
    evaluation_dir = base / "evaluation"
    sub = EvaluationFolder(
        evaluation_dir, folder.data_root, folder.manifests, folder.manifest_paths
    )
    test.save(evaluation_dir / "predictions" / "single__toy2__test.csv")
    entry = {
        **entry_head(sub, "toy2", "toy2/only-negative/seed0"),
        "status": "ok",
        "error": None,
        "predictions": "predictions/single__toy2__test.csv",
        "val_predictions": None,
        "temperature": 1.0,
        "calibrator": {"name": "none"},
        "metrics": evaluate_predictions(test, None, None, 50, 0, 1.0),
        "model_meta": model_meta(manifest, "toy2/only-negative/seed0", 7),
        "data": data_block(manifest),
    }
    write_evaluation(sub, [entry], [])
    return evaluation_dir


def test_single_class_test_set_shows_na_with_its_note(
    built: tuple[EvaluationFolder, ReportResult], tmp_path: Path
):
    folder, _ = built
    evaluation_dir = single_class_folder(folder, tmp_path)
    result = build_report(evaluation_dir, tmp_path / "out", roots(folder))
    html = result.html.read_text(encoding="utf-8")
    assert '<span class="na">n/a</span>' in html
    assert "the test split holds only class" in html
    assert "curves undefined, the split holds no case of it" in html
    assert "no validation predictions" in html
    assert "No pairs of models were compared." in html
    report = strict_load(result.json)
    assert report["entries"][0]["metrics"]["overall"]["macro_auroc"]["value"] is None
    auroc = next(r for r in read_csv(result.csv) if r["metric"] == "macro_auroc")
    assert auroc["value"] == auroc["ci_low"] == ""


def test_missing_prediction_file_is_a_note(
    built: tuple[EvaluationFolder, ReportResult], tmp_path: Path
):
    folder, _ = built
    evaluation_dir = tmp_path / "evaluation"
    shutil.copytree(folder.evaluation_dir, evaluation_dir)
    (evaluation_dir / "predictions" / "toy2-full-seed0__toy2__test.csv").unlink()
    result = build_report(evaluation_dir, tmp_path / "out", roots(folder))
    html = result.html.read_text(encoding="utf-8")
    assert "test predictions unreadable" in html
    assert "<evaluation folder>" not in html and "&lt;evaluation folder&gt;" in html
    assert result.n_ok == 3
    assert any(r["model"] == "toy2/full/seed0" for r in read_csv(result.csv))


def test_missing_or_broken_evaluation_json_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        build_report(tmp_path, tmp_path / "out")
    (tmp_path / "evaluation.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        build_report(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


# -- headless Chromium -----------------------------------------------------------------------------
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no 'chromium' binary on PATH (Debian: apt-get install chromium)")
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(
    built: tuple[EvaluationFolder, ReportResult], tmp_path: Path
):
    _, result = built
    url = result.html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    logging = ["--enable-logging=stderr", "--v=0"]
    run = chromium(
        [*logging, f"--screenshot={shot}", "--window-size=1366,2400", url], tmp_path / "p1"
    )
    assert shot.is_file(), run.stderr[-2000:]
    if os.environ.get("MEDTL_SCREENSHOT_DIR"):
        target = Path(os.environ["MEDTL_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")
    with Image.open(shot) as img:
        assert img.size == (1366, 2400)
        grey = np.asarray(img.convert("L"))
    assert grey.std() > 10 and len(np.unique(grey)) > 64  # text, tables and figures, not blank
    # a page without scripts logs nothing to the console unless a load is refused or fails
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = chromium([*logging, "--dump-dom", url], tmp_path / "p2")
    page = parse(dom.stdout)
    assert len(page.srcs) == len(parse(result.html.read_text(encoding="utf-8")).srcs) > 0
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.width > 0 and img.height > 0
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"metrcs": {}}, "metrcs: Extra inputs are not permitted"),
        ({"status": "done"}, "status: Input should be 'ok' or 'failed'"),
        ({"schema_version": 99}, "schema_version: schema version 99 is not one this medtl reads"),
    ],
)
def test_an_entry_that_is_not_an_evaluation_entry_is_reported_as_such(
    built: tuple[EvaluationFolder, ReportResult], tmp_path: Path, edit: dict, needle: str
):
    """The report validates each entry as an ``EvaluationEntry``: a mistyped or unknown key,
    or a newer schema, makes that entry a failed one naming the key; the rest are reported."""
    folder, whole = built
    evaluation_dir = tmp_path / "evaluation"
    shutil.copytree(folder.evaluation_dir, evaluation_dir)
    data = folder.evaluation()
    assert data["entries"][0]["status"] == "ok"
    data["entries"][0].update(edit)
    (evaluation_dir / "evaluation.json").write_text(json.dumps(data))
    evaluation = load_evaluation(evaluation_dir, roots(folder))
    bad = evaluation.entries[0]
    assert not bad.ok and needle in bad.error, bad.error
    assert all(e.invalid is None for e in evaluation.entries[1:])
    result = build_report(evaluation_dir, tmp_path / "out", roots(folder))
    text = result.html.read_text(encoding="utf-8")
    assert result.n_ok == whole.n_ok - 1 and html.escape(needle) in text


def test_an_entry_manifest_is_read_once_per_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medtl.report as report

    reads: list[Path] = []

    def fake_load(path: Path) -> str:
        reads.append(path)
        return f"read {path.name}"

    monkeypatch.setattr(report, "_load_manifest", fake_load)
    (tmp_path / "m.csv").write_text("path,label\n")
    cache: dict[Path, Any] = {}
    first = report._entry_manifest({"manifest": "m.csv"}, tmp_path, cache)
    second = report._entry_manifest({"manifest": "m.csv"}, tmp_path, cache)
    assert first == second == "read m.csv"
    assert reads == [tmp_path / "m.csv"]
    assert report._entry_manifest({}, tmp_path, cache) is None
