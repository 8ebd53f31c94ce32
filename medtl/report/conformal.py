"""The per-model block of conformal prediction sets: coverage per class with Wilson intervals
against the target, set sizes, abstentions, and the risk-coverage curve of abstaining on the
least confident images. Numbers come from the evaluation record (``entry["conformal"]``)."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from medtl.report import plots
from medtl.report.html import ci_cell, esc, figure, table
from medtl.report.load import EntryView
from medtl.report.tables import fmt


def conformal_block(entry: EntryView) -> str:
    """The "Conformal prediction sets" subsection; empty when the model has none."""
    record = entry.record.get("conformal")
    if not isinstance(record, dict):
        return ""
    split = esc(record.get("measured_on", entry.split))
    kind = "class-conditional (Mondrian)" if record.get("mondrian") else "marginal"
    target = float(record.get("target", 0.9))
    head = (
        f"<h3>Conformal prediction sets ({split} split)</h3><p>Split-conformal sets "
        f"({esc(str(record.get('score', '?')).upper())} score, {kind}) fitted on the "
        f"<b>validation</b> split for a target coverage of {100 * target:.0f}% and applied "
        "unchanged here. A set holding exactly one class is a call; any other set is an "
        "abstention. Coverage whose interval excludes the target says the validation and "
        "this split are not exchangeable (e.g. a different class mix).</p>"
    )
    rows = [["All", ci_cell(record.get("coverage")), _verdict(record.get("coverage"), target)]]
    rows += [
        [esc(c), ci_cell(v), _verdict(v, target)]
        for c, v in (record.get("per_class") or {}).items()
    ]
    coverage = table(["Class", "Coverage [95% CI]", "Target in CI"], rows, "stack")
    sizes = record.get("set_sizes") or {}
    size_line = (
        f"<p>Mean set size {fmt(record.get('mean_set_size'), 2)}; sets of size "
        + ", ".join(f"{esc(k)}: {esc(v)}" for k, v in sizes.items())
        + f". Abstained: {ci_cell(record.get('abstain'))}; accuracy of the single-class "
        f"sets: {ci_cell(record.get('singleton_accuracy'))}.</p>"
    )
    curve = record.get("risk_coverage") or {}
    fig = ""
    if curve.get("coverage"):
        uri = plots.data_uri(risk_coverage_figure(curve, entry.split))
        fig = figure(
            uri,
            "risk-coverage curve",
            "Error rate of the argmax call among the images kept when abstaining on the least "
            "confident (lowest maximum probability) first.",
        )
    return head + coverage + size_line + fig


def _verdict(entry: Any, target: float) -> str:
    if not isinstance(entry, dict) or entry.get("ci_low") is None:
        return '<span class="na">n/a</span>'
    inside = entry["ci_low"] <= target <= entry["ci_high"]
    return "yes" if inside else "<b>no</b>"


def risk_coverage_figure(curve: dict[str, list[float]], split: str) -> Figure:
    """Selective risk against the share of images kept."""
    fig = Figure(figsize=(4.2, 3.2))
    ax = fig.add_subplot()
    ax.plot(curve["coverage"], curve["risk"], marker="o", ms=3, color=plots.COLOURS[0])
    ax.set_xlabel("share of images kept (most confident first)")
    ax.set_ylabel("error rate among kept")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, max(0.05, max(curve["risk"]) * 1.1))
    ax.set_title(f"Risk-coverage ({split} split)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
