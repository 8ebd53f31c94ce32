"""The section of one model on one dataset split: run information, per-class figures,
confusion matrix, ROC / PR curves, calibration, operating points, notes and the gallery."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

from medtl.data.manifest import SPLITS
from medtl.report import plots
from medtl.report.conformal import conformal_block
from medtl.report.gallery import Gallery
from medtl.report.html import bullet_list, ci_cell, definition_list, esc, figure, na, table
from medtl.report.leaks import leaks_block
from medtl.report.load import EntryView, as_float
from medtl.report.site import site_block
from medtl.report.tables import fmt, fmt_count, pretty

PER_CLASS = (
    "prevalence",
    "tp",
    "fp",
    "tn",
    "fn",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "auroc",
    "auprc",
)
AVERAGED = ("specificity", "ppv", "npv", "f1", "auroc", "auprc")
CALIBRATION = ("ece", "adaptive_ece", "classwise_ece", "mce", "brier", "nll", "slope", "intercept")


def entry_section(entry: EntryView, number: str, gallery: Gallery, extra: str = "") -> str:
    """The whole per-model section (``number`` like ``3.1``); ``extra``: HTML after the gallery."""
    m = entry.metrics
    split = esc(entry.split)
    parts = [
        f'<section class="entry" id="{entry.anchor}"><h2>{esc(number)} {esc(entry.model)}'
        f'<span class="tag">{esc(entry.dataset)} · {split} split · n = '
        f"{esc(fmt_count(m.get('n')))}</span>"
        '<a class="top" href="#top">back to top</a></h2>',
        "<h3>Run information</h3>",
        definition_list((k, esc(v)) for k, v in run_info(entry).items()),
        f"<h3>Overall figures ({split} split)</h3>",
        overall_table(m),
        leaks_block(entry),
        f"<h3>Per-class figures ({split} split, one-vs-rest)</h3>",
        per_class_table(m),
        confusion_block(m, entry.split),
        curves_block(entry),
        calibration_block(m, entry.split),
        operating_block(m, entry.split),
        site_block(entry),
        conformal_block(entry),
        "<h3>Notes</h3>",
        bullet_list((esc(n) for n in all_notes(entry)), "notes"),
        gallery_block(gallery, entry.split),
        extra,
    ]
    return "".join(parts) + "</section>"


# -- run information ------------------------------------------------------------------------
def run_info(entry: EntryView) -> dict[str, str]:
    """Display strings of the model's training run and the evaluation data."""
    meta, data = mapping(entry.record.get("model_meta")), mapping(entry.record.get("data"))
    recipe, plan = mapping(meta.get("recipe")), mapping(meta.get("plan"))
    return {
        "Recipe": str(recipe.get("name") or "n/a"),
        "Backbone": str(meta.get("backbone") or "n/a"),
        "Pretrained weights": _source(mapping(meta.get("source")), meta.get("init_weights")),
        "Fine-tuning strategy": _strategy(meta, plan),
        "Seed(s)": _seeds(meta.get("seed")),
        "Trained with medtl": str(meta.get("medtl_version") or "n/a"),
        "Epochs": _epochs(meta),
        "Epoch-equivalents": fmt(meta.get("epoch_equivalents"), 1),
        "Training wall time": duration(meta.get("seconds")),
        "Manifest": _manifest(entry.record, data),
        "Split sizes": _counts(data.get("split_sizes")),
        f"Class counts ({entry.split})": _counts(
            mapping(data.get("class_counts")).get(entry.split)
        ),
        "Calibration (fitted on validation)": _calibrator(entry),
        "Model folder": _short_path(entry.record.get("model_dir")),
        "Test predictions": _short_path(entry.record.get("predictions")),
        "Validation predictions": _short_path(entry.record.get("val_predictions")),
    }


def mapping(value: Any) -> dict[str, Any]:
    """``value`` when it is a dict, else an empty one (a malformed record shows ``n/a``)."""
    return value if isinstance(value, dict) else {}


def _source(source: dict[str, Any], init: Any) -> str:
    """The initial weights' source, licence and sha256 (``meta['source']``); models from
    before sources were recorded show their ``init_weights`` only."""
    if not source:
        return f"{init} (source not recorded)" if init else "none (random initialisation)"
    licence = source.get("licence") or "licence not recorded"
    return f"{source.get('name')} ({source.get('arch')}, {licence}), sha256 {source.get('sha256')}"


def _strategy(meta: dict[str, Any], plan: dict[str, Any]) -> str:
    text = str(meta.get("strategy") or plan.get("strategy") or "n/a")
    fraction = as_float(plan.get("trainable_fraction"))
    if math.isfinite(fraction):
        text += f" ({100 * fraction:.1f}% of parameters trained)"
    return text


def _seeds(seed: Any) -> str:
    if isinstance(seed, list):
        return ", ".join(str(s) for s in seed) or "n/a"
    return "n/a" if seed is None else str(seed)


def _epochs(meta: dict[str, Any]) -> str:
    run, best = fmt_count(meta.get("epochs_run")), fmt_count(meta.get("best_epoch"))
    text = f"{run} run, best epoch {best}"
    if meta.get("stopped_early"):
        text += " (stopped early)"
    return text


def duration(seconds: Any) -> str:
    """``2 h 05 min``, ``3 min 20 s`` or ``42 s``; ``n/a`` when unknown."""
    s = as_float(seconds)
    if not math.isfinite(s) or s < 0:
        return "n/a"
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def _manifest(record: dict[str, Any], data: dict[str, Any]) -> str:
    sha = str(data.get("manifest_sha256") or "")
    name = PurePath(str(record.get("manifest") or "n/a")).name
    return f"{name} · sha256 {sha[:12]}" if sha else name


def _counts(counts: Any) -> str:
    """``train 544 · val 118 · test 118`` (splits in pipeline order, other keys after)."""
    if not isinstance(counts, dict) or not counts:
        return "n/a"
    order = {name: i for i, name in enumerate(SPLITS)}
    keys = sorted(counts, key=lambda k: order.get(k, len(order)))  # stable: classes keep order
    return " · ".join(f"{k} {counts[k]}" for k in keys)


def _calibrator(entry: EntryView) -> str:
    calibrator = entry.record.get("calibrator") or {}
    name = calibrator.get("name", "temperature") if isinstance(calibrator, dict) else "?"
    if name in ("vector", "platt"):
        return esc(entry.calibrator.label())
    return f"{name}, T = {fmt(entry.temperature, 3)}"


def _short_path(path: Any) -> str:
    """A relative path as given; an absolute one shortened to its last two parts."""
    if not path:
        return "none"
    p = PurePath(str(path))
    return str(p) if not p.is_absolute() else "…/" + "/".join(p.parts[-2:])


# -- discrimination ---------------------------------------------------------------------------
def overall_table(m: dict[str, Any]) -> str:
    overall = m.get("overall") or {}
    line = definition_list(
        (label, ci_cell(overall.get(key)))
        for key, label in (
            ("accuracy", "Accuracy"),
            ("balanced_accuracy", "Balanced accuracy"),
            ("cohen_kappa", "Cohen's kappa"),
        )
    )
    rows = [
        [kind.title(), *(ci_cell(overall.get(f"{kind}_{k}")) for k in AVERAGED)]
        for kind in ("macro", "weighted")
    ]
    return line + table(["Average", *(pretty(k) for k in AVERAGED)], rows, "stack")


def per_class_table(m: dict[str, Any]) -> str:
    """Rows = figures, columns = classes (readable for a handful of classes)."""
    per_class = m.get("per_class") or {}
    classes = list(per_class)
    rows = [["Cases", *(na(fmt_count(per_class[c].get("support"))) for c in classes)]]
    for key in PER_CLASS:
        cells = [_per_class_cell(per_class[c].get(key)) for c in classes]
        rows.append([pretty(key), *cells])
    return table(["Figure", *(esc(c) for c in classes)], rows)


def _per_class_cell(value: Any) -> str:
    return ci_cell(value) if isinstance(value, dict) else na(fmt_count(value))


def confusion_block(m: dict[str, Any], split: str) -> str:
    cm = m.get("confusion_matrix") or {}
    classes, counts = list(cm.get("classes") or []), cm.get("counts")
    if not classes or not counts:
        return "<h3>Confusion matrix</h3><p>No confusion matrix recorded.</p>"
    fig = plots.confusion_figure(counts, classes, split)
    img = figure(plots.data_uri(fig), f"confusion matrix on the {split} split")
    rows = [
        [
            esc(c),
            *(f"{int(v)} <span class='ci'>({_share(s)})</span>" for v, s in zip(r, n, strict=True)),
        ]
        for c, r, n in zip(classes, counts, cm.get("row_normalised") or counts, strict=True)
    ]
    tab = table(["True \\ predicted", *(esc(c) for c in classes)], rows)
    return (
        f"<h3>Confusion matrix ({esc(split)} split)</h3>"
        "<p>Rows: true class; columns: predicted class (argmax). Each cell: count and share of "
        f'the true class.</p><div class="figs">{img}<div>{tab}</div></div>'
    )


def _share(value: Any) -> str:
    x = as_float(value)
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def curves_block(entry: EntryView) -> str:
    """ROC and PR curves per class, one-vs-rest (only the positive class of a binary task,
    whose other curve is its mirror image)."""
    head = f"<h3>ROC and precision-recall curves ({esc(entry.split)} split)</h3>"
    if entry.test is None:
        return head + "<p>Not drawn: the test predictions are not available (see notes).</p>"
    keep = entry.test.labels >= 0
    labels, probs = entry.test.labels[keep], entry.test.probs(entry.calibrator)[keep]
    points = entry.metrics.get("operating_points") or {}
    per_class = entry.metrics.get("per_class") or {}
    classes = entry.test.classes
    # a binary task: the class(es) with operating points (class 1 unless another was named)
    shown = ([c for c in classes if c in points] or classes[1:]) if len(classes) == 2 else classes
    figs = []
    for cls in shown:
        c = classes.index(cls)
        if (labels == c).all() or not (labels == c).any():
            side = "only cases of" if (labels == c).all() else "no case of"
            figs.append(f"<p><b>{esc(cls)}</b>: curves undefined, the split holds {side} it.</p>")
            continue
        fig = plots.curves_figure(
            labels == c, probs[:, c], cls, entry.split, per_class.get(cls) or {}, points.get(cls)
        )
        figs.append(figure(plots.data_uri(fig), f"ROC and PR curves of {cls}"))
    intro = (
        "<p>One-vs-rest curves traced on the test predictions. Markers: the operating points "
        "whose thresholds were chosen on validation, placed where they land on this split.</p>"
    )
    return head + intro + "".join(figs)


# -- calibration and operating points ---------------------------------------------------------
def calibration_block(m: dict[str, Any], split: str) -> str:
    calibration = m.get("calibration") or {}
    head = f"<h3>Calibration ({esc(split)} split)</h3>"
    if not calibration:
        return head + "<p>No calibration figures recorded.</p>"
    fig = plots.reliability_figure(calibration, split)
    img = figure(plots.data_uri(fig), "reliability diagrams before and after calibration")
    before, after = calibration.get("before") or {}, calibration.get("after") or {}
    rows = [[pretty(k), ci_cell(before.get(k)), ci_cell(after.get(k))] for k in CALIBRATION]
    t_before, t_after = _stage_label(before, 1.0), _stage_label(after, None)
    header = ["Measure", f"Before ({t_before})", f"After ({t_after})"]
    outcome = esc(after.get("slope_outcome") or before.get("slope_outcome") or "n/a")
    return (
        head + "<p>Top-label reliability: bars show the accuracy in each confidence bin, the "
        "grey histogram the number of cases per bin. The calibrator was fitted on validation."
        f'</p>{img}{table(header, rows)}<p class="meta">Slope and intercept refer to: {outcome}; '
        "ideal slope 1, intercept 0.</p>"
    )


def _stage_label(record: dict[str, Any], default: float | None) -> str:
    """``T = 1.23`` for a temperature (the only label before vector / Platt existed), else the
    calibrator's name, e.g. ``vector scaling``."""
    t = record.get("temperature", default)
    calibrator = record.get("calibrator")
    if t is None and isinstance(calibrator, dict) and calibrator.get("name"):
        return esc(f"{calibrator['name']} scaling")
    return f"T = {fmt(t, 2)}"


def operating_block(m: dict[str, Any], split: str) -> str:
    points = m.get("operating_points") or {}
    head = f"<h3>Operating points (thresholds chosen on validation, figures on {esc(split)})</h3>"
    if not points:
        return head + "<p>No operating points recorded.</p>"
    out = [head]
    for cls, record in points.items():
        out.append(f"<h4>Positive class: {esc(cls)}</h4>")
        out.append(_operating_table(record))
    return "".join(out)


def _operating_table(record: dict[str, Any]) -> str:
    thresholds = record.get("thresholds") or {}
    rows = []
    for name, test in (record.get("test") or {}).items():
        t = thresholds.get(name)
        rule = "argmax (no threshold)" if name == "argmax" and t is None else f"p ≥ {fmt(t, 4)}"
        counts = " / ".join(fmt_count(test.get(k)) for k in ("tp", "fp", "tn", "fn"))
        rates = [ci_cell(test.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv")]
        rows.append([esc(pretty(name)), esc(rule), *rates, counts])
    header = [
        "Operating point",
        "Rule",
        "Sensitivity",
        "Specificity",
        "PPV",
        "NPV",
        "TP / FP / TN / FN",
    ]
    return table(header, rows, "stack ops")


def all_notes(entry: EntryView) -> list[str]:
    """The evaluation's notes, the operating points' notes (with their class), the report's."""
    m = entry.metrics
    notes = [str(n) for n in m.get("notes") or []]
    for cls, record in (m.get("operating_points") or {}).items():
        notes += [f"{cls}: {n}" for n in record.get("notes") or []]
    notes += _manifest_note(entry)
    return notes + entry.notes


def _manifest_note(entry: EntryView) -> list[str]:
    trained = str(mapping(entry.record.get("model_meta")).get("manifest_sha256") or "")
    evaluated = str(mapping(entry.record.get("data")).get("manifest_sha256") or "")
    if trained and evaluated and trained != evaluated:
        return [
            f"the model was trained with manifest sha256 {trained[:12]} but evaluated with "
            f"{evaluated[:12]}: check that no test image was seen in training"
        ]
    return []


# -- gallery ------------------------------------------------------------------------------------
def gallery_block(gallery: Gallery, split: str) -> str:
    head = f"<h3>Most confident errors ({esc(split)} split)</h3>"
    if gallery.message:
        head += f"<p>{esc(gallery.message)}</p>"
    if not gallery.cards:
        return head
    cards = []
    for card in gallery.cards:
        if card.image is not None:
            pic = f'<img src="{card.image}" alt="error {card.rank}: true {esc(card.true)}">'
        else:
            pic = f'<div class="missing">{esc(card.reason or "no image")}</div>'
        cards.append(
            f'<div class="card">{pic}<b>#{card.rank}</b> · p = {card.probability:.3f}<br>'
            f"true: <b>{esc(card.true)}</b><br>predicted: <b>{esc(card.predicted)}</b></div>"
        )
    intro = (
        "<p>Misclassified test images with the highest calibrated probability for the wrong "
        "class, most confident first. No identifiers are shown.</p>"
    )
    return head + intro + f'<div class="gallery">{"".join(cards)}</div>'
