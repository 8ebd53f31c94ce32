"""The human-readable model card: Markdown and HTML from the typed :class:`ModelCard`.

Both renderings come from one small document (sections of paragraphs, bullet lists and
tables), so the two files always say the same thing. Every figure is read from the typed card,
the model folder's ``calibration.json`` and, when given, an evaluation of the model; a section
whose source is absent says so instead of being left out silently.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from medtl.artifacts import EvaluationEntry, ModelCard
from medtl.errors import ConfigError
from medtl.report.tables import fmt_entry
from medtl.results import EVALUATION_FILE, EvaluationResults

Table = tuple[list[str], list[list[str]]]


@dataclass
class Section:
    """One heading with its paragraphs, bullet points and tables, in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class CardDocument:
    title: str
    sections: list[Section]

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            out += [line for p in s.paragraphs for line in (p, "")]
            out += [f"- {b}" for b in s.bullets] + ([""] if s.bullets else [])
            for head, rows in s.tables:
                out.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
                out.append("|" + "---|" * len(head))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        for s in self.sections:
            body.append(f"<h2>{esc(s.title)}</h2>")
            body += [f"<p>{esc(p)}</p>" for p in s.paragraphs]
            if s.bullets:
                body.append("<ul>" + "".join(f"<li>{esc(b)}</li>" for b in s.bullets) + "</ul>")
            for head, rows in s.tables:
                th = "".join(f"<th>{esc(h)}</th>" for h in head)
                trs = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows
                )
                body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n"
        )


_CSS = (
    "body{font:15px/1.5 system-ui,sans-serif;color:#1b1f24;margin:0}"
    "main{max-width:960px;margin:0 auto;padding:20px 28px 60px}"
    "h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:32px}"
    "table{border-collapse:collapse;font-size:.9rem;margin:6px 0 14px}"
    "th,td{padding:4px 10px;border-bottom:1px solid #d0d7de;text-align:left}"
    "th{background:#f6f8fa}"
)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# -- where the figures come from ---------------------------------------------------------------
def evaluation_entries(evaluation: Path, folder: Path) -> list[EvaluationEntry]:
    """The successful entries of ``evaluation`` (a folder or its ``evaluation.json``) that
    evaluated the model in ``folder``."""
    path = evaluation / EVALUATION_FILE if evaluation.is_dir() else evaluation
    entries = [
        e
        for e in EvaluationResults.load(path).entries
        if e.status == "ok" and Path(str(e.model_dir or "")).resolve() == folder
    ]
    if not entries:
        raise ConfigError(
            f"evaluation {path} holds no successful entry for the model {folder}; evaluate this "
            "model folder with 'medtl evaluate --model' first, or leave out --evaluation"
        )
    return entries


def build_document(
    card: ModelCard,
    folder: Path,
    entries: list[EvaluationEntry],
    name: str,
    intended_use: str | None = None,
) -> CardDocument:
    """The model card's sections from the typed card, ``calibration.json`` and ``entries``."""
    sections = [
        _intended_use(card, intended_use),
        _model_section(card),
        _data_section(card, entries),
        _metrics_section(entries),
        _calibration_section(card, folder, entries),
        _subgroup_section(entries),
        _conformal_section(entries),
        _limitations(card, entries),
        _licence(card),
    ]
    return CardDocument(f"Model card: {name}", sections)


def _intended_use(card: ModelCard, given: str | None) -> Section:
    text = given or (
        f"Research use: classifies {card.in_chans}-channel images into {len(card.classes)} "
        f"classes ({', '.join(card.classes)}). Not a medical device; not validated for "
        "clinical decisions."
    )
    return Section("Intended use", [text])


def _model_section(card: ModelCard) -> Section:
    norm = card.normalize
    bullets = [
        f"Backbone: {card.backbone}; fine-tuning strategy: {card.strategy}; seed {card.seed}",
        f"Input: {card.in_chans} channel(s), {card.image_size} x {card.image_size} px "
        f"({card.resize}), intensities in [0, 1]",
        "Normalisation inside the model: "
        + (
            f"mean {_short(norm.mean)}, std {_short(norm.std)} ({norm.source})"
            if norm
            else "the backbone's"
        ),
        f"Classes (output order): {', '.join(card.classes)}",
        f"Selected at epoch {card.best_epoch} of {card.epochs_run} "
        f"(validation balanced accuracy {card.val_bacc:.3f})",
        f"medtl {card.medtl_version}",
    ]
    return Section("Model", bullets=bullets)


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _data_section(card: ModelCard, entries: list[EvaluationEntry]) -> Section:
    data = card.recipe.get("data", {}) if isinstance(card.recipe, dict) else {}
    bullets = [f"Training manifest SHA-256: {card.manifest_sha256}"]
    if isinstance(data, dict) and data.get("dataset"):
        bullets.insert(0, f"Dataset: {data['dataset']}")
    section = Section("Data and splits", bullets=bullets)
    rows = []
    for e in entries:
        summary = e.data or {}
        sizes = summary.get("split_sizes", {})
        rows.append(
            [
                e.dataset,
                str(summary.get("manifest_sha256", "n/a")),
                ", ".join(f"{s} {n}" for s, n in sizes.items()) or "n/a",
            ]
        )
    if rows:
        section.tables.append((["dataset", "manifest SHA-256", "images per split"], rows))
    else:
        section.paragraphs.append("No evaluation was given: split sizes are not shown.")
    return section


_HEADLINE = ("macro_auroc", "balanced_accuracy", "accuracy", "macro_f1")


def _metrics_section(entries: list[EvaluationEntry]) -> Section:
    section = Section("Metrics (95% confidence intervals)")
    if not entries:
        section.paragraphs.append(
            "No evaluation was given ('medtl export --evaluation DIR'): no test metrics."
        )
        return section
    rows = []
    for e in entries:
        overall = (e.metrics or {}).get("overall", {})
        rows.append([f"{e.dataset}/{e.split}"] + [fmt_entry(overall.get(k)) for k in _HEADLINE])
    section.tables.append((["data", *_HEADLINE], rows))
    section.paragraphs.append(
        "Intervals are percentile bootstraps over patients / lesions / duplicate groups "
        "(accuracy: Wilson); probabilities are the calibrated ones."
    )
    return section


def _calibration_section(card: ModelCard, folder: Path, entries: list[EvaluationEntry]) -> Section:
    cal = card.calibrator
    section = Section(
        "Calibration",
        [
            f"Calibrator (fitted on validation, applied by every output of the export): {cal.label()}"
        ],
    )
    rows = []
    for e in entries:
        calib = (e.metrics or {}).get("calibration", {})
        for stage in ("before", "after"):
            ece = (calib.get(stage) or {}).get("ece")
            if ece is not None:
                rows.append([f"{e.dataset}/{e.split}", stage, fmt_entry(ece)])
    if rows:
        section.tables.append((["data", "calibration", "ECE"], rows))
    elif (folder / "calibration.json").is_file():
        section.paragraphs.append(
            "Calibrators compared on test: see calibration.json in the model folder."
        )
    return section


def _subgroup_section(entries: list[EvaluationEntry]) -> Section:
    section = Section("Subgroups")
    for e in entries:
        subgroups = (e.metrics or {}).get("subgroups")
        if not subgroups:
            continue
        for column, result in subgroups.items():
            rows = [
                [str(g), str(r.get("n", "")), fmt_entry(r.get(result.get("metric", "")))]
                for g, r in result.get("groups", {}).items()
            ]
            section.tables.append(([f"{column} ({e.dataset}/{e.split})", "n", "value"], rows))
            gap = result.get("largest_gap")
            if gap:
                section.paragraphs.append(
                    f"{column}: largest gap in {result.get('metric')} between {gap['high']} and "
                    f"{gap['low']}: {fmt_entry(gap)}"
                )
    if not section.tables:
        section.paragraphs.append(
            "No subgroup metadata in the evaluated manifests."
            if entries
            else "No evaluation was given: no subgroup figures."
        )
    return section


def _conformal_section(entries: list[EvaluationEntry]) -> Section:
    section = Section("Conformal coverage")
    for e in entries:
        conformal = (e.metrics or {}).get("conformal")
        if isinstance(conformal, dict):
            rows = [
                [f"{e.dataset}/{e.split}", k, fmt_entry(v)]
                for k, v in conformal.items()
                if isinstance(v, dict) and "value" in v
            ]
            if rows:
                section.tables.append((["data", "measure", "value"], rows))
    if not section.tables:
        section.paragraphs.append("No conformal prediction sets were evaluated for this model.")
    return section


def _limitations(card: ModelCard, entries: list[EvaluationEntry]) -> Section:
    datasets = sorted({e.dataset for e in entries})
    bullets = [
        "Trained on one manifest (hash above); performance on another site, scanner or "
        "population is unknown until measured there.",
        f"Images are resized to {card.image_size} px ({card.resize}); findings smaller than a "
        "few pixels at that size cannot be seen by the model.",
        "Probabilities are calibrated on the validation split of the training data; "
        "calibration may not hold elsewhere.",
    ]
    bullets.append(
        f"Evaluated on: {', '.join(datasets)}." if datasets else "No test evaluation was given."
    )
    return Section("Limitations", bullets=bullets)


def _licence(card: ModelCard) -> Section:
    weights = card.weights
    source = card.source or {}
    licence = (weights.licence if weights else None) or source.get("licence")
    name = (weights.source if weights else None) or source.get("name")
    bullets = [
        f"Pretrained source: {name or (weights.path if weights else None) or 'none (random initialisation)'}",
        f"Licence of the pretrained weights: {licence or 'not recorded: check it before sharing'}",
    ]
    if weights and weights.sha256:
        bullets.append(f"Pretrained weights SHA-256: {weights.sha256}")
    return Section("Licence of the pretrained source", bullets=bullets)
