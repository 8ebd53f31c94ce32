"""The per-model block of a new site: the operating thresholds chosen on the model's own
validation split and those chosen again on the site's labelled calibration split, side by
side, both applied to the same evaluated split (``entry["site_thresholds"]``)."""

from __future__ import annotations

from typing import Any

from medtl.report.html import ci_cell, esc, table
from medtl.report.load import EntryView
from medtl.report.tables import fmt, pretty

RATES = ("sensitivity", "specificity", "ppv", "npv")


def site_block(entry: EntryView) -> str:
    """The "Thresholds re-chosen on the site" subsection; empty when none were chosen."""
    site = entry.record.get("site_thresholds")
    if not isinstance(site, dict) or not site:
        return ""
    own = entry.metrics.get("operating_points") or {}
    split = esc(entry.split)
    out = [
        f"<h3>Thresholds re-chosen on the site (figures on {split})</h3><p>Each operating point "
        "twice: with the threshold chosen on the model's own validation split, and with the "
        "threshold chosen again on this dataset's labelled calibration split. Both are applied "
        f"unchanged to the {split} split, which chose neither.</p>"
    ]
    for cls, record in site.items():
        chosen_on = esc(record.get("chosen_on", "?"))
        out.append(f"<h4>Positive class: {esc(cls)} (site thresholds from {chosen_on})</h4>")
        if "error" in record:
            out.append(f"<p>Not re-chosen: {esc(record['error'])}</p>")
            continue
        out.append(_side_by_side(own.get(cls) or {}, record))
    return "".join(out)


def _side_by_side(own: dict[str, Any], site: dict[str, Any]) -> str:
    rows = []
    for name, site_test in (site.get("test") or {}).items():
        if name == "argmax":
            continue  # no threshold: the same call either way
        own_test = (own.get("test") or {}).get(name) or {}
        own_t = (own.get("thresholds") or {}).get(name)
        site_t = (site.get("thresholds") or {}).get(name)
        for label, t, test in (
            ("model's validation", own_t, own_test),
            ("site", site_t, site_test),
        ):
            cells = [ci_cell(test.get(k)) for k in RATES]
            rows.append([esc(pretty(name)), esc(label), esc(f"p ≥ {fmt(t, 4)}"), *cells])
    header = ["Operating point", "Chosen on", "Rule", "Sensitivity", "Specificity", "PPV", "NPV"]
    return table(header, rows, "stack ops")
