"""The report's subgroup block: per-subgroup figures with intervals and the largest gap."""

from __future__ import annotations

from typing import Any

from medtl.report.html import esc, table
from medtl.report.tables import fmt_entry

LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_auroc": "macro AUROC",
}


def subgroup_block(metrics: dict[str, Any], split: str) -> str:
    """One table per subgroup column (age band, sex, ...), or nothing without subgroups."""
    record = metrics.get("subgroups")
    if not isinstance(record, dict) or not record:
        return ""
    parts = [
        f"<h3>Subgroups ({esc(split)} split)</h3><p>Figures per subgroup of the manifest's "
        "metadata, with 95% intervals (group bootstrap within the subgroup). The largest gap in "
        "balanced accuracy between two known subgroups of at least "
        f"{esc(str(next(iter(record.values())).get('min_n', '')))} cases is flagged, with the "
        "interval of the difference (independent bootstraps of the two subgroups).</p>"
    ]
    for column, result in record.items():
        groups = result.get("groups", {})
        rows = [
            [esc(value), esc(str(r.get("n", "")))] + [esc(fmt_entry(r.get(k))) for k in LABELS]
            for value, r in groups.items()
        ]
        parts.append(table(["", "n", *LABELS.values()], rows, caption=esc(column)))
        gap = result.get("largest_gap")
        if gap:
            parts.append(
                f'<p class="flag">Largest gap in {esc(column)}: {esc(gap["high"])} minus '
                f"{esc(gap['low'])}, balanced accuracy {esc(fmt_entry(gap))}.</p>"
            )
        else:
            parts.append(
                f"<p>{esc(column)}: fewer than two known subgroups large enough for a gap.</p>"
            )
    return "".join(parts)
