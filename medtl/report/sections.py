"""The report's sections as HTML: header, leaderboard, failures, comparisons.

Per-model sections are in :mod:`medtl.report.entry`. Every function takes the loaded
evaluation (or part of it) and returns an HTML fragment; all evaluation text is escaped.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from medtl.report.html import bullet_list, ci_cell, esc, na, table
from medtl.report.load import Evaluation
from medtl.report.tables import LEADERBOARD, delong_blocks, fmt, fmt_count, fmt_p

HOW_TO_READ = (
    "Every figure is given as <b>value [95% confidence interval]</b> and was measured on the "
    "split named beside it (normally <b>test</b>). Proportions (sensitivity, specificity, PPV, "
    "NPV, accuracy, prevalence) carry Wilson intervals; everything else carries a bootstrap "
    "interval that resamples whole patients / lesions / duplicate clusters.",
    "<b>The test split never chooses anything.</b> The calibration temperature and every "
    "operating threshold were chosen on the <b>validation</b> split only and applied unchanged "
    "to test; the test figures are the honest estimate for new patients.",
    "A wide interval means few cases: do not rank two models whose intervals overlap heavily; "
    "use the DeLong comparison at the end instead.",
    "<b>n/a</b> marks a figure that is undefined on this split (e.g. AUROC of a class absent "
    "from the test set); the notes of each model say why.",
)

DEFINITIONS = (
    ("Sensitivity", "TP / (TP + FN): share of the class's cases that are called that class."),
    ("Specificity", "TN / (TN + FP): share of the other cases that are not called that class."),
    (
        "PPV / NPV",
        "TP / (TP + FP) and TN / (TN + FN): how often a positive / negative call is right.",
    ),
    ("F1", "2 TP / (2 TP + FP + FN)."),
    (
        "AUROC",
        "probability that a random case of the class scores above a random other case "
        "(one-vs-rest); 0.5 is chance. Macro AUROC averages the classes.",
    ),
    ("AUPRC", "average precision over thresholds; compare it with the class prevalence."),
    ("Balanced accuracy", "mean sensitivity over the classes present."),
    (
        "ECE",
        "expected calibration error: mean |accuracy - confidence| over 15 equal-width "
        "confidence bins, weighted by bin size. Adaptive ECE uses equal-count bins; class-wise "
        "ECE averages one-vs-rest ECEs; MCE is the worst bin.",
    ),
    (
        "Brier, NLL",
        "mean squared error of the probability vector (0-2) and mean -ln p(true class).",
    ),
    (
        "Calibration slope / intercept",
        "logistic recalibration: slope 1 and intercept 0 are ideal; "
        "a slope below 1 means predictions are too extreme.",
    ),
    (
        "Operating points",
        "argmax: the most probable class; Youden: maximises sensitivity + "
        "specificity - 1 on validation; target sensitivity 0.90 / 0.95: the highest validation "
        "threshold reaching that sensitivity.",
    ),
    (
        "Intervals",
        "Wilson score interval for proportions; stratified group bootstrap "
        "(percentile) for the rest; DeLong for the difference of two AUROCs on the same cases.",
    ),
)


def header(
    evaluation: Evaluation, created: str, version: str, toc: list[tuple[str, str, int]]
) -> str:
    """Title, dates, versions, how to read the report, definitions, and the contents
    (``toc``: anchor, title, level 0 or 1)."""
    h = evaluation.header
    meta = (
        f"Evaluation created {esc(h.get('created', 'n/a'))} with medtl "
        f"{esc(h.get('medtl_version', 'n/a'))} · report generated {esc(created)} with medtl "
        f"{esc(version)} · bootstrap: {esc(h.get('n_boot', 'n/a'))} resamples, seed "
        f"{esc(h.get('seed', 'n/a'))}"
    )
    defs = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in DEFINITIONS)
    contents = "".join(
        f'<li class="level{level}"><a href="#{a}">{esc(t)}</a></li>' for a, t, level in toc
    )
    return (
        f'<header id="top"><h1>Model evaluation report</h1><p class="meta">{meta}</p></header>'
        '<section class="box" id="how-to-read"><h3>How to read this report</h3>'
        f"{bullet_list(HOW_TO_READ)}"
        "<details><summary>Definitions (summary of docs/metrics.md)</summary>"
        f'<ul class="defs">{defs}</ul></details></section>'
        f'<nav class="toc"><h3>Contents</h3><ul>{contents}</ul></nav>'
    )


# -- leaderboard ------------------------------------------------------------------------------
def leaderboard_section(rows: list[dict[str, Any]], rank_by: str = "clean") -> str:
    """Models grouped by dataset and split, best macro AUROC first; says which test set
    (official or clean) the rows of a dataset with an official split are ranked on."""
    out = ['<section id="leaderboard"><h2>1. Leaderboard</h2>']
    if not rows:
        return out[0] + "<p>No model was evaluated successfully.</p></section>"
    out.append(
        "<p>Sorted by macro AUROC within each dataset and split. ECE is measured after the "
        "calibration fitted on validation. Click a model for its full section.</p>"
    )
    if any(r.get("test_set") in ("clean", "official") for r in rows):
        out.append(_ranked_on(rank_by))
    header = ["Model", *[label for _, label in LEADERBOARD], "n", "Split", "Test set"]
    body: list[str] = []
    for (dataset, split), group in groupby(rows, key=lambda r: (r["dataset"], r["split"])):
        body.append(
            f'<tr class="group"><th colspan="{len(header)}">Dataset {esc(dataset)} · '
            f"{esc(split)} split</th></tr>"
        )
        for row in group:
            cells = [f'<a href="#{row["anchor"]}">{esc(row["model"])}</a>']
            cells += [ci_cell(row[key]) for key, _ in LEADERBOARD]
            cells += [na(fmt_count(row["n"])), esc(split), esc(row.get("test_set") or split)]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    out.append(
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div></section>"
    )
    return "".join(out)


def _ranked_on(rank_by: str) -> str:
    which = (
        "the <b>clean test subset</b>: the official test images that share no exact or "
        "near-duplicate cluster and no lesion / patient group with train or val"
        if rank_by == "clean"
        else "the <b>official test split</b>, leaking images included"
    )
    return (
        f"<p>Where a dataset ships an official split, rows are ranked by their figures on "
        f"{which} (column Test set). Each model's section shows the official and the clean "
        "figures side by side with their difference.</p>"
    )


# -- failures ---------------------------------------------------------------------------------
def failures_section(evaluation: Evaluation) -> str:
    """Every failed entry with its one-line error; the rest of the batch is still reported."""
    failed = evaluation.failed_entries
    out = '<section id="failures"><h2>2. Failures</h2>'
    if not failed:
        return out + "<p>No entry failed.</p></section>"
    items = [
        f"<b>{esc(e.model)}</b> on {esc(e.dataset)} / {esc(e.split)} split: {esc(e.error)}"
        for e in failed
    ]
    return (
        out + f"<p>{len(failed)} of {len(evaluation.entries)} entries failed and are not "
        "reported further; the others are unaffected.</p>"
        f'<div class="failures">{bullet_list(items)}</div></section>'
    )


# -- comparisons ------------------------------------------------------------------------------
def comparisons_section(comparisons: list[dict[str, Any]], number: int) -> str:
    """DeLong tests of paired AUROCs: difference (A - B) with its 95% CI and p-value."""
    out = [f'<section id="comparisons"><h2>{number}. Comparisons (DeLong)</h2>']
    if not comparisons:
        return out[0] + "<p>No pairs of models were compared.</p></section>"
    out.append(
        "<p>Paired DeLong test of two AUROCs measured on the same cases (one-vs-rest per class "
        "for more than two classes). A positive difference favours model A. p-values are not "
        "corrected for multiple comparisons.</p>"
    )
    for comparison in comparisons:
        out.append(_comparison(comparison))
    return "".join(out) + "</section>"


def _comparison(comparison: dict[str, Any]) -> str:
    a, b = esc(comparison.get("model_a", "?")), esc(comparison.get("model_b", "?"))
    title = (
        f"<h3>A = {a} vs B = {b}</h3><p class='meta'>Dataset {esc(comparison.get('dataset'))}"
        f" · {esc(comparison.get('split'))} split</p>"
    )
    blocks = delong_blocks(comparison)
    if not blocks:
        return title + "<p>No DeLong result recorded for this pair.</p>"
    with_notes = any(test.get("note") for _, test in blocks)
    rows = []
    for cls, test in blocks:
        diff = {k: test.get(k) for k in ("ci_low", "ci_high")} | {"value": test.get("difference")}
        cases = f"{fmt_count(test.get('n_positive'))} / {fmt_count(test.get('n_negative'))}"
        row = [
            esc(cls or "positive class"),
            esc(cases),
            na(fmt(test.get("auroc_a"))),
            na(fmt(test.get("auroc_b"))),
            ci_cell(diff),
            na(fmt_p(test.get("p_value"))),
        ]
        note = f'<div class="wrap">{esc(test.get("note", ""))}</div>'
        rows.append([*row, note] if with_notes else row)
    header = ["Class", "Cases (class / rest)", "AUROC A", "AUROC B", "Difference A - B [95% CI]"]
    header += ["p-value", *(["Note"] if with_notes else [])]
    return title + table(header, rows)
