"""The report's figures, drawn with matplotlib's object API (Agg, no pyplot state) and
embedded as base64 PNG ``data:`` URIs so that the HTML is one self-contained file.

Every figure states the split it was measured on. Numbers drawn come from the evaluation
record (reliability tables, operating points, AUROC entries); only the ROC / PR curves
themselves are traced from the test predictions, with scikit-learn.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from medtl.report.tables import fmt, fmt_entry

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DPI = 110
# Colour-blind-safe colours (Okabe-Ito). Operating-point markers shrink from argmax down, so
# points that coincide stay visible as concentric shapes; unknown names get a grey "X".
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
MARKERS: dict[str, dict[str, Any]] = {
    "argmax": {"marker": "o", "ms": 13, "mfc": "none", "mec": "black", "mew": 1.5},
    "youden": {"marker": "s", "ms": 10, "mfc": "none", "mec": COLOURS[3], "mew": 2},
    "target_sensitivity_0.90": {"marker": "^", "ms": 7, "mfc": COLOURS[2], "mec": COLOURS[2]},
    "target_sensitivity_0.95": {"marker": "D", "ms": 5, "mfc": "black", "mec": "black"},
}
OTHER_MARKER = {"marker": "X", "ms": 6, "mfc": "grey", "mec": "grey"}


def data_uri(fig: Figure) -> str:
    """``data:image/png;base64,...`` of ``fig`` (no timestamp metadata: same input, same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# -- confusion matrix -------------------------------------------------------------------------
def confusion_figure(counts: list[list[float]], classes: list[str], split: str) -> Figure:
    """Heatmap coloured by the row-normalised matrix; each cell shows count and row share."""
    cm = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = cm / cm.sum(axis=1, keepdims=True)
    k = len(classes)
    size = 1.2 + 0.9 * k
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(rows), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            share = "n/a" if not math.isfinite(rows[i, j]) else f"{100 * rows[i, j]:.0f}%"
            colour = "white" if np.nan_to_num(rows[i, j]) > 0.6 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{share}", ha="center", va="center", color=colour)
    ax.set_xticks(
        range(k), _short(classes), rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center"
    )
    ax.set_yticks(range(k), _short(classes))
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix ({split} split)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class (row)")
    return fig


def _short(names: list[str], width: int = 14) -> list[str]:
    return [n if len(n) <= width else n[: width - 1] + "…" for n in names]


# -- ROC / PR ---------------------------------------------------------------------------------
def curves_figure(
    positive: np.ndarray,
    scores: np.ndarray,
    cls: str,
    split: str,
    per_class: dict[str, Any],
    points: dict[str, Any] | None,
) -> Figure:
    """ROC (left) and precision-recall (right) of class ``cls`` one-vs-rest, legend on the right.

    ``positive: [N]`` bool with both values present, ``scores: [N]`` the class probability. ``points`` is the
    evaluation's operating-point record for this class (thresholds chosen on validation, test
    figures); each is marked at its test (1 - specificity, sensitivity) and (sensitivity, PPV).
    """
    fig = Figure(figsize=(9.6, 3.9), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    fig.suptitle(f"{cls} vs rest ({split} split)", fontsize="medium", fontweight="bold")
    _roc(roc_ax, positive, scores, per_class.get("auroc"))
    _pr(pr_ax, positive, scores, per_class.get("auprc"))
    if points:
        _mark_points(roc_ax, pr_ax, points)
    handles, labels = roc_ax.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside right center",
            fontsize="small",
            title="operating point\n(threshold set on validation)",
            title_fontsize="small",
        )
    return fig


def _roc(ax: Axes, positive: np.ndarray, scores: np.ndarray, auroc: Any) -> None:
    fpr, tpr, _ = roc_curve(positive, scores)
    ax.plot(fpr, tpr, color=COLOURS[0], lw=1.8)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.text(0.62, 0.55, "chance", color="grey", fontsize="small", rotation=40)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title(f"ROC · AUROC {fmt_entry(auroc)}", fontsize="small")
    ax.set_aspect("equal")


def _pr(ax: Axes, positive: np.ndarray, scores: np.ndarray, auprc: Any) -> None:
    precision, recall, _ = precision_recall_curve(positive, scores)
    ax.step(recall, precision, where="post", color=COLOURS[1], lw=1.8)
    prevalence = float(positive.mean())
    ax.axhline(prevalence, ls="--", color="grey", lw=0.8)
    ax.text(0.02, prevalence + 0.02, f"prevalence {prevalence:.2f}", color="grey", fontsize="small")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="sensitivity (recall)", ylabel="PPV (precision)")
    ax.set_title(f"Precision-recall · AUPRC {fmt_entry(auprc)}", fontsize="small")
    ax.set_aspect("equal")


def _mark_points(roc_ax: Axes, pr_ax: Axes, points: dict[str, Any]) -> None:
    thresholds = points.get("thresholds") or {}
    for name, test in (points.get("test") or {}).items():
        sens, spec, ppv = (_value(test.get(k)) for k in ("sensitivity", "specificity", "ppv"))
        t = thresholds.get(name)
        label = name.replace("_", " ") + ("" if t is None else f" (p ≥ {fmt(t, 2)})")
        style = {**MARKERS.get(name, OTHER_MARKER), "ls": "none"}
        roc_ax.plot([1 - spec], [sens], label=label, **style)
        pr_ax.plot([sens], [ppv], label=label, **style)


def _value(entry: Any) -> float:
    value = entry.get("value") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else math.nan


# -- reliability ------------------------------------------------------------------------------
def reliability_figure(calibration: dict[str, Any], split: str) -> Figure:
    """Reliability diagrams before (T = 1) and after calibration, with bin counts underneath.

    Drawn from the stored reliability tables (rather than :func:`medtl.calibrate.reliability_diagram`,
    which needs the probabilities) so the figure shows exactly the numbers in ``report.json``.
    """
    fig = Figure(figsize=(8.4, 4.8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, stage in enumerate(("before", "after")):
        record = calibration.get(stage) or {}
        t = record.get("temperature", 1.0)
        name = (record.get("calibrator") or {}).get("name", "temperature")
        how = f"T={fmt(t, 2)}" if t is not None else f"{name} scaling"
        title = f"{'Before' if stage == 'before' else 'After'} calibration ({how})"
        title += f"\nECE {fmt_entry(record.get('ece'))}"
        _reliability(axes[0, col], axes[1, col], record.get("reliability") or {}, title)
    fig.suptitle(f"Reliability ({split} split, top-label confidence)", fontsize="medium")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    return fig


def _reliability(ax: Axes, hist_ax: Axes, table: dict[str, Any], title: str) -> None:
    edges = np.asarray(table.get("edges") or np.linspace(0, 1, 16), dtype=np.float64)
    count = np.asarray(table.get("count") or np.zeros(len(edges) - 1), dtype=np.float64)
    acc = np.asarray(table.get("accuracy") or np.full(len(count), np.nan), dtype=np.float64)
    conf = np.asarray(table.get("confidence") or np.full(len(count), np.nan), dtype=np.float64)
    left, width = edges[:-1], np.diff(edges)
    full = (count > 0) & np.isfinite(acc)
    ax.bar(
        left[full],
        acc[full],
        width[full],
        align="edge",
        color=COLOURS[5],
        edgecolor="black",
        lw=0.5,
        label="accuracy in bin",
    )
    ax.plot(conf[full], acc[full], "o", color="black", ms=3, label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(title, fontsize="small")
    hist_ax.bar(left, count, width, align="edge", color="grey", edgecolor="black", lw=0.5)
    for x, w, c in zip(left, width, count, strict=True):
        if c > 0:
            hist_ax.text(x + w / 2, c, str(int(c)), ha="center", va="bottom", fontsize=6)
    hist_ax.set(xlim=(0, 1), xlabel="confidence", ylabel="count")
    hist_ax.set_ylim(0, max(1.0, float(count.max(initial=0)) * 1.3))
