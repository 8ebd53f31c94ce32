"""``medtl report``: one self-contained HTML report of an evaluation folder, plus its numbers.

:func:`build_report` reads ``<evaluation_dir>/evaluation.json`` (written by ``medtl evaluate``)
and the prediction files it names, and writes into ``out_dir``:

- ``report.html``: one file, plots embedded as PNG ``data:`` URIs, inline CSS, no JavaScript
  and no external requests (it opens offline);
- ``report.json``: the same numbers (strict JSON: undefined values are ``null``), a
  :class:`~medtl.results.ReportSummary` checked before it is written;
- ``tables.csv``: one row per model x dataset x split x metric (value, ci_low, ci_high, method).

A failed entry, a missing prediction file or an unreadable image is reported, never fatal.
Sections and how to read them: ``docs/report.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtl import __version__
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.io import atomic_write_text, check_writable
from medtl.report.entry import all_notes, entry_section, run_info
from medtl.report.explanations import Panel, entry_panel, panel_block
from medtl.report.gallery import Gallery, entry_gallery
from medtl.report.html import esc, page
from medtl.report.load import EntryView, Evaluation, load_evaluation, resolve_manifest, strict_json
from medtl.report.sections import (
    comparisons_section,
    failures_section,
    header,
    leaderboard_section,
)
from medtl.report.subgroups import subgroup_block
from medtl.report.tables import all_rows, leaderboard, rows_csv
from medtl.results import REPORT_FILE, ReportSummary, save_checked

__all__ = ["ReportResult", "build_report"]

HTML_FILE, JSON_FILE, CSV_FILE = "report.html", REPORT_FILE, "tables.csv"


@dataclass(frozen=True)
class ReportResult:
    """Paths of the three outputs, and how many entries were reported / had failed."""

    html: Path
    json: Path
    csv: Path
    n_ok: int
    n_failed: int


def build_report(
    evaluation_dir: Path,
    out_dir: Path,
    data_roots: dict[str, Path] | None = None,
    rank_by: str = "clean",
    explain: bool = False,
) -> ReportResult:
    """Write ``report.html``, ``report.json`` and ``tables.csv`` for ``evaluation_dir``.

    ``data_roots`` maps a dataset (manifest) name to the folder its manifest paths are relative
    to; thumbnails of that dataset's errors are drawn only when it is given. Its absolute paths
    never appear in any output. ``rank_by`` (``clean`` or ``official``): the test set the
    leaderboard ranks a dataset with a leaking official split on. ``explain``: Grad-CAM and
    occlusion panels per entry (loads each model; needs the data roots). Raises :class:`~medtl.errors.DataError` only when
    ``evaluation.json`` itself is missing or unreadable.
    """
    evaluation_dir, out_dir = Path(evaluation_dir), Path(out_dir)
    roots = {str(k): Path(v) for k, v in (data_roots or {}).items()}
    check_writable(out_dir)
    evaluation = load_evaluation(evaluation_dir, roots)
    galleries = _galleries(evaluation, roots)
    panels = _panels(evaluation, roots) if explain else {}
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = all_rows(evaluation)
    payload = _payload(evaluation, galleries, rows, created, rank_by)
    for item, entry in zip(payload["entries"], evaluation.ok_entries, strict=True):
        if entry.index in panels:
            item["explanations"] = panels[entry.index].to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(
        out_dir / HTML_FILE,
        out_dir / JSON_FILE,
        out_dir / CSV_FILE,
        len(evaluation.ok_entries),
        len(evaluation.failed_entries),
    )
    save_checked(ReportSummary, strict_json(payload), result.json)
    atomic_write_text(result.csv, rows_csv(rows))
    atomic_write_text(result.html, render_html(evaluation, galleries, created, rank_by, panels))
    return result


def render_html(
    evaluation: Evaluation,
    galleries: dict[int, Gallery],
    created: str,
    rank_by: str = "clean",
    panels: dict[int, Panel] | None = None,
) -> str:
    """The whole HTML document."""
    panels = panels or {}
    ok = evaluation.ok_entries
    toc = [("leaderboard", "1. Leaderboard", 0), ("failures", "2. Failures", 0)]
    toc.append(("models", "3. Per-model results", 0))
    toc += [(e.anchor, f"3.{i} {e.model} ({e.dataset}, {e.split})", 1) for i, e in enumerate(ok, 1)]
    toc.append(("comparisons", "4. Comparisons", 0))
    parts = [
        header(evaluation, created, __version__, toc),
        leaderboard_section(leaderboard(evaluation, rank_by), rank_by),
        failures_section(evaluation),
        '<section id="models"><h2>3. Per-model results</h2><p>One section per model, dataset '
        f"and split ({len(ok)} in all).</p></section>",
        *(
            entry_section(
                e,
                f"3.{i}",
                galleries[e.index],
                subgroup_block(e.metrics, e.split) + panel_block(panels.get(e.index), e.split),
            )
            for i, e in enumerate(ok, 1)
        ),
        comparisons_section(evaluation.comparisons, 4),
        f"<footer>Generated by medtl {esc(__version__)} on {esc(created)} from "
        f"{esc(evaluation.folder.name)}/evaluation.json. Definitions: docs/metrics.md; "
        "reading guide: docs/report.md.</footer>",
    ]
    return page("medtl evaluation report", "\n".join(parts))


def _galleries(evaluation: Evaluation, roots: dict[str, Path]) -> dict[int, Gallery]:
    """The error gallery of every ok entry (manifests are read once each)."""
    manifests: dict[Path, Manifest | str] = {}
    out = {}
    for entry in evaluation.ok_entries:
        manifest = _entry_manifest(entry.record, evaluation.folder, manifests)
        out[entry.index] = entry_gallery(
            entry.test, entry.calibrator, entry.dataset, manifest, roots.get(entry.dataset)
        )
    return out


def _panels(evaluation: Evaluation, roots: dict[str, Path], seed: int = 0) -> dict[int, Panel]:
    """The explanation panel of every ok entry (each model is loaded and run on a few images)."""
    manifests: dict[Path, Manifest | str] = {}
    out = {}
    for entry in evaluation.ok_entries:
        manifest = _entry_manifest(entry.record, evaluation.folder, manifests)
        root = roots.get(entry.dataset)
        out[entry.index] = entry_panel(entry, evaluation.folder, manifest, root, seed)
    return out


def _entry_manifest(
    record: dict[str, Any], folder: Path, cache: dict[Path, Manifest | str]
) -> Manifest | str | None:
    """The manifest an entry names (None when it names none), read once per path via ``cache``."""
    path = resolve_manifest(record, folder)
    if path is None:
        return None
    if path not in cache:
        cache[path] = _load_manifest(path)
    return cache[path]


def _load_manifest(path: Path) -> Manifest | str:
    try:
        return Manifest.load(path)
    except (MedtlError, OSError, ValueError):
        return f"the manifest {path.name} could not be read"


def _payload(
    evaluation: Evaluation,
    galleries: dict[int, Gallery],
    rows: list[dict[str, Any]],
    created: str,
    rank_by: str = "clean",
) -> dict[str, Any]:
    """Everything ``report.json`` holds: the same numbers as the HTML and ``tables.csv``."""
    board = [
        {k: v for k, v in r.items() if k != "anchor"} for r in leaderboard(evaluation, rank_by)
    ]
    return {
        "report": {"medtl_version": __version__, "created": created, "ranked_by": rank_by},
        "evaluation": evaluation.header,
        "leaderboard": board,
        "failures": [_failure(e) for e in evaluation.failed_entries],
        "entries": [_entry_payload(e, galleries[e.index]) for e in evaluation.ok_entries],
        "comparisons": evaluation.comparisons,
        "tables": rows,
    }


def _leaks_payload(record: Any) -> Any:
    """The entry's leaks record without the row ids of the leaking images (the evaluation
    folder keeps them; the report shows no identifiers)."""
    if not isinstance(record, dict):
        return record
    return {k: v for k, v in record.items() if k != "leaking_ids"}


def _failure(entry: EntryView) -> dict[str, Any]:
    return {
        "model": entry.model,
        "dataset": entry.dataset,
        "split": entry.split,
        "error": entry.error,
    }


def _entry_payload(entry: EntryView, gallery: Gallery) -> dict[str, Any]:
    keep = ("model_dir", "manifest", "predictions", "val_predictions", "temperature", "calibrator")
    return {
        "model": entry.model,
        "dataset": entry.dataset,
        "split": entry.split,
        "anchor": entry.anchor,
        "run": run_info(entry),
        **{k: entry.record.get(k) for k in keep},
        "model_meta": entry.record.get("model_meta"),
        "data": entry.record.get("data"),
        "leaks": _leaks_payload(entry.record.get("leaks")),
        "conformal": entry.record.get("conformal"),
        "site_thresholds": entry.record.get("site_thresholds"),
        "metrics": entry.metrics,
        "notes": all_notes(entry),
        "gallery": gallery.to_dict(),
    }
