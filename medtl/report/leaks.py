"""Official test vs clean test in the report: the per-model table, the rows of ``tables.csv``,
and which figures the leaderboard ranks by.

An evaluation entry of a dataset with an official split carries a ``leaks`` record
(:func:`medtl.clean_test.evaluate_with_leaks`): with ``data.leaks: keep`` the clean subset's
figures and the difference official - clean; with ``drop`` the entry's figures are the clean
subset's; with ``resplit`` the official split was replaced by a group-aware one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from medtl.report.html import ci_cell, esc, table
from medtl.report.load import EntryView
from medtl.report.tables import Row, _row, fmt_count

RankBy = Literal["clean", "official"]
FIGURES = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_auroc", "Macro AUROC"),
)


def record(entry: EntryView) -> dict[str, Any]:
    """The entry's ``leaks`` record, or ``{}``."""
    value = entry.record.get("leaks")
    return value if isinstance(value, dict) else {}


def clean_metrics(entry: EntryView) -> dict[str, Any] | None:
    """The clean subset's metrics of a ``keep`` entry, else None."""
    value = record(entry).get("clean_metrics")
    return value if isinstance(value, dict) else None


def ranked_metrics(entry: EntryView, rank_by: RankBy) -> tuple[dict[str, Any], str]:
    """``(metrics, test set name)`` the leaderboard shows and ranks for this entry."""
    rec = record(entry)
    clean = clean_metrics(entry)
    if rank_by == "clean" and clean is not None:
        return clean, "clean"
    evaluated = rec.get("evaluated_on")
    name = {"clean": "clean", "resplit": "resplit"}.get(str(evaluated), "official" if rec else "")
    return entry.metrics, name or entry.split


def leaks_block(entry: EntryView) -> str:
    """The section's "Official vs clean test" part; empty for a dataset without an official
    split."""
    rec = record(entry)
    if not rec:
        return ""
    head = "<h3>Official test split vs clean test subset</h3>"
    note = f"<p>{esc(rec.get('note') or '')}</p>"
    clean = clean_metrics(entry)
    if rec.get("policy") != "keep" or clean is None:
        return head + note
    official, diff = entry.metrics.get("overall") or {}, rec.get("difference") or {}
    rows = [
        [
            esc(label),
            ci_cell(official.get(key)),
            ci_cell((clean.get("overall") or {}).get(key)),
            ci_cell(diff.get(key)),
        ]
        for key, label in FIGURES
    ]
    header = [
        "Figure",
        f"Official test (n = {esc(fmt_count(entry.metrics.get('n')))})",
        f"Clean test (n = {esc(fmt_count(clean.get('n')))})",
        "Difference official - clean",
    ]
    reading = (
        "<p>Same model, same temperature and validation-chosen thresholds. The difference has a "
        "paired interval (one group bootstrap of the official test set); a positive difference "
        "is what images seen in training add to the official figure.</p>"
    )
    return head + note + table(header, rows) + reading


def leak_rows(entry: EntryView) -> Iterator[Row]:
    """``tables.csv`` rows: the clean subset's overall figures and the differences."""
    clean = clean_metrics(entry)
    if clean is None:
        return
    for name, value in (clean.get("overall") or {}).items():
        yield {**_row(entry, "clean_test", "", name, value), "n": clean.get("n")}
    for name, value in (record(entry).get("difference") or {}).items():
        yield _row(entry, "official_minus_clean", "", name, value)
