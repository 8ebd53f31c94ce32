"""The report's numbers as flat rows, and how one number is written for a reader.

``tables.csv`` has one row per model x dataset x split x metric: the overall figures, every
per-class figure, calibration before and after, each operating point, and each DeLong
comparison. A value that is undefined (NaN) is an empty cell, and ``n/a`` in the HTML; the
evaluation's notes say why.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Iterator
from typing import Any

from medtl.report.load import EntryView, Evaluation, as_float

COLUMNS = (
    "model",
    "dataset",
    "split",
    "n",
    "section",
    "class",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "method",
)
RATES = ("sensitivity", "specificity", "ppv", "npv")
COUNTS = ("support", "tp", "fp", "tn", "fn")
LEADERBOARD = (
    ("macro_auroc", "Macro AUROC"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("accuracy", "Accuracy"),
    ("ece_after", "ECE (calibrated)"),
)
Row = dict[str, Any]


# -- formatting -------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``n/a`` for NaN, None and non-numbers."""
    x = as_float(value)
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def fmt_entry(entry: Any, digits: int = 3) -> str:
    """``value [ci_low, ci_high]`` of a metric entry; ``n/a`` where undefined."""
    if not isinstance(entry, dict):
        return "n/a"
    value = fmt(entry.get("value"), digits)
    if value == "n/a" or "ci_low" not in entry:
        return value
    return f"{value} [{fmt(entry.get('ci_low'), digits)}, {fmt(entry.get('ci_high'), digits)}]"


def fmt_p(p: Any) -> str:
    """A p-value: three decimals, ``<0.001`` below that, ``n/a`` when undefined."""
    x = as_float(p)
    if not math.isfinite(x):
        return "n/a"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def fmt_count(value: Any) -> str:
    x = as_float(value)
    return str(int(x)) if math.isfinite(x) else "n/a"


def mean_sd(values: Iterable[float | None], digits: int = 3, missing: str = "n/a") -> str:
    """``mean ± SD`` of the defined values (None and NaN left out), the sample SD: a spread
    over seeds, not a confidence interval. One value is written alone, none as ``missing``."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}" if xs else missing
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def pretty(name: str) -> str:
    """Display name of a metric or operating-point key (``target_sensitivity_0.90`` ->
    ``target sensitivity 0.90``, ``ppv`` -> ``PPV``)."""
    special = {
        "ppv": "PPV",
        "npv": "NPV",
        "auroc": "AUROC",
        "auprc": "AUPRC",
        "f1": "F1",
        "ece": "ECE",
        "mce": "MCE",
        "nll": "NLL",
        "tp": "TP",
        "fp": "FP",
        "tn": "TN",
        "fn": "FN",
    }
    text = " ".join(special.get(w, w) for w in name.split("_"))
    return text[:1].upper() + text[1:]


# -- flat rows --------------------------------------------------------------------------------
def _row(entry: EntryView, section: str, cls: str, metric: str, value: Any) -> Row:
    """One ``tables.csv`` row; ``value`` is a metric entry (dict) or a bare number."""
    out: Row = {
        "model": entry.model,
        "dataset": entry.dataset,
        "split": entry.split,
        "n": entry.metrics.get("n"),
        "section": section,
        "class": cls,
        "metric": metric,
    }
    if isinstance(value, dict):
        out.update({k: value.get(k) for k in ("value", "ci_low", "ci_high", "method")})
    else:
        out.update({"value": value, "ci_low": None, "ci_high": None, "method": ""})
    return out


def entry_rows(entry: EntryView) -> Iterator[Row]:
    """Every figure of one ok entry as rows."""
    m = entry.metrics
    for name, value in (m.get("overall") or {}).items():
        yield _row(entry, "overall", "", name, value)
    for cls, table in (m.get("per_class") or {}).items():
        for name, value in table.items():
            yield _count_row(entry, "per_class", cls, name, value)
    for stage, calib in (m.get("calibration") or {}).items():
        yield _row(entry, f"calibration_{stage}", "", "temperature", calib.get("temperature"))
        for name, value in calib.items():
            if isinstance(value, dict) and "value" in value:
                yield _row(entry, f"calibration_{stage}", "", name, value)
    for cls, points in (m.get("operating_points") or {}).items():
        yield from _operating_rows(entry, cls, points)
    from medtl.report.leaks import leak_rows  # leaks builds on this module's rows

    yield from leak_rows(entry)


def _count_row(entry: EntryView, section: str, cls: str, name: str, value: Any) -> Row:
    row = _row(entry, section, cls, name, value)
    if name in COUNTS:
        row["method"] = "count"
    return row


def _operating_rows(entry: EntryView, cls: str, points: dict[str, Any]) -> Iterator[Row]:
    thresholds = points.get("thresholds") or {}
    for name, test in (points.get("test") or {}).items():
        threshold = _row(entry, "operating_point", cls, f"{name}:threshold", thresholds.get(name))
        threshold["method"] = "chosen_on_validation" if name != "argmax" else "argmax"
        yield threshold
        for key in (*RATES, "tp", "fp", "tn", "fn"):
            if key in test:
                yield _count_row(entry, "operating_point", cls, f"{name}:{key}", test[key])


def comparison_rows(comparison: dict[str, Any]) -> Iterator[Row]:
    """DeLong figures of one comparison (one block per class, or one for a binary task)."""
    base = {
        "model": f"{comparison.get('model_a')} vs {comparison.get('model_b')}",
        "dataset": comparison.get("dataset"),
        "split": comparison.get("split"),
        "n": None,
        "section": "comparison",
        "ci_low": None,
        "ci_high": None,
        "method": "delong",
    }
    for cls, test in delong_blocks(comparison):
        n = as_float(test.get("n_positive")) + as_float(test.get("n_negative"))
        common = {**base, "n": int(n) if math.isfinite(n) else None, "class": cls}
        interval = {k: test.get(k) for k in ("ci_low", "ci_high")}
        yield {**common, "metric": "auroc_difference", "value": test.get("difference"), **interval}
        for key in ("auroc_a", "auroc_b", "p_value"):
            yield {**common, "metric": key, "value": test.get(key)}


def delong_blocks(comparison: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(class, DeLong result)]``: per class, or ``[("", result)]`` for a binary test."""
    delong = comparison.get("delong")
    if not isinstance(delong, dict):
        return []
    if "p_value" in delong or "difference" in delong:
        return [("", delong)]
    return [(str(k), v) for k, v in delong.items() if isinstance(v, dict)]


def all_rows(evaluation: Evaluation) -> list[Row]:
    """Rows of every ok entry, then of every comparison."""
    rows = [row for entry in evaluation.ok_entries for row in entry_rows(entry)]
    for comparison in evaluation.comparisons:
        rows.extend(comparison_rows(comparison))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def rows_csv(rows: list[Row]) -> str:
    """CSV text of ``rows`` (full float precision; undefined values are empty cells)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    return buffer.getvalue()


# -- leaderboard ------------------------------------------------------------------------------
def leaderboard(evaluation: Evaluation, rank_by: str = "clean") -> list[Row]:
    """One row per ok entry with the headline figures, grouped by dataset and split and
    sorted by macro AUROC (undefined last) within each group. Where a dataset's official test
    split leaks, ``rank_by`` chooses the clean subset's figures (default) or the official ones;
    ``test_set`` says which a row shows."""
    from medtl.report.leaks import ranked_metrics

    rows = []
    for entry in evaluation.ok_entries:
        metrics, test_set = ranked_metrics(entry, "clean" if rank_by == "clean" else "official")
        overall = metrics.get("overall") or {}
        after = (metrics.get("calibration") or {}).get("after") or {}
        rows.append(
            {
                "model": entry.model,
                "anchor": entry.anchor,
                "dataset": entry.dataset,
                "split": entry.split,
                "test_set": test_set,
                "n": metrics.get("n"),
                "macro_auroc": overall.get("macro_auroc"),
                "balanced_accuracy": overall.get("balanced_accuracy"),
                "accuracy": overall.get("accuracy"),
                "ece_after": after.get("ece"),
            }
        )
    return sorted(rows, key=_leaderboard_key)


def _leaderboard_key(row: Row) -> tuple[str, str, float, str]:
    auroc = as_float((row.get("macro_auroc") or {}).get("value"))
    return (
        row["dataset"],
        row["split"],
        -auroc if math.isfinite(auroc) else math.inf,
        row["model"],
    )
