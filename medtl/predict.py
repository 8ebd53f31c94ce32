"""``predict``: a fine-tuned, calibrated model applied to new, unlabelled images.

The input is a folder (images, DICOM files, NIfTI volumes, found recursively) or a manifest
with its data root. Each image goes through the same deterministic transforms as training
(:func:`medtl.data.dataset.deterministic_transforms` with the model card's size, channels and
resize rule; the normalisation is inside the model), in batches. Per image the output holds
the calibrated probabilities (the card's calibrator), the class called at the operating
point chosen on validation (the card's thresholds), the conformal prediction set
(``conformal.json``) and an abstain flag where that set is not exactly one class.

Outputs in ``OUT``: ``predictions.csv``, ``predictions.jsonl``, ``skipped.csv`` (unreadable
files and why) and ``summary.json``, each written atomically once every image is done. While
running, completed batches are appended to ``OUT/.partial/``; a run that is killed resumes
from there: a torn last line is dropped, nothing is predicted twice. Identifiers: images are
named by their path under the input (DICOM paths are checked not to spell the patient's ID or
name, as ``medtl prepare`` does) and DICOM / NIfTI images carry a pseudonym group
(``patient-0001``); no header value is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.artifacts import ModelCard, file_sha256
from medtl.calibrate import Calibrator
from medtl.conformal import CONFORMAL_FILE, ConformalCard
from medtl.data.manifest import Manifest, row_id
from medtl.data.readers import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, is_dicom
from medtl.errors import ConfigError, DataError, MedtlError
from medtl.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

PARTIAL = ".partial"
OUTPUTS = ("predictions.csv", "predictions.jsonl", "skipped.csv", "summary.json")


@dataclass(frozen=True)
class InputItem:
    """One image to predict: ``path`` relative to the input root, ``locator`` inside it."""

    id: str
    path: str
    locator: str = ""
    group: str = ""


@dataclass(frozen=True)
class Skipped:
    """A file (or image) that could not be used, and why."""

    id: str
    path: str
    reason: str


@dataclass
class PredictOptions:
    """How ``predict`` runs: batch size, device, the operating point and the fallbacks."""

    batch_size: int = 32
    device: str = "cpu"
    positive: str | None = None
    operating_point: str = "youden"
    uncalibrated: bool = False
    split: str | None = None
    progress: bool = True
    explain: tuple[str, ...] = ()  # maps to draw per image (e.g. gradcam, occlusion); none: off

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        from medtl.explain import METHODS

        unknown = [m for m in self.explain if m not in METHODS]
        if unknown:
            raise ConfigError(
                f"--explain: unknown explanation method(s) {unknown}; choose from "
                f"{', '.join(METHODS)}"
            )


@dataclass
class PredictResult:
    out: Path
    predicted: int
    skipped: int
    seconds: float
    resumed: int = 0
    files: dict[str, Path] = field(default_factory=dict)


# -- the input ------------------------------------------------------------------------------
def list_inputs(
    source: Path, root: Path | None, split: str | None
) -> tuple[Path, list[InputItem], list[Skipped]]:
    """The data root, the images to predict in a stable order, and the files refused while
    listing (a DICOM without pixels, a NIfTI that is not a volume, an unknown format)."""
    if source.is_file() and source.suffix.lower() == ".csv":
        if root is None:
            raise DataError(f"manifest {source} needs its data root: pass --data-root")
        manifest = Manifest.load(source)
        rows = manifest.split(split) if split else manifest.rows
        return root, [InputItem(r.id, r.path, r.locator, r.group) for r in rows], []
    if not source.is_dir():
        raise DataError(f"{source} is neither a folder of images nor a manifest (.csv)")
    if split is not None:
        raise ConfigError("--split selects rows of a manifest; the input is a folder")
    items: list[InputItem] = []
    skipped: list[Skipped] = []
    patients: dict[str, str] = {}
    files = sorted(
        (p for p in source.rglob("*") if p.is_file() and not _hidden(p, source)),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    for number, file in enumerate(files, start=1):
        path = file.relative_to(source).as_posix()
        try:
            items += _items_of(file, source, path, number, patients)
        except DataError as exc:
            if "patient's ID or name" in str(exc):  # neither the path nor its hash is written
                skipped.append(Skipped(f"file-{number}", f"(file no. {number})", str(exc)))
            else:
                skipped.append(Skipped(row_id(path), path, _relative(str(exc), source)))
    return source, items, skipped


def _items_of(
    file: Path, root: Path, path: str, number: int, patients: dict[str, str]
) -> list[InputItem]:
    name = file.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return [InputItem(row_id(path), path)]
    if name.endswith(NIFTI_SUFFIXES):
        from medtl.data.scans import _kept_slices

        return [
            InputItem(row_id(path, loc), path, loc, path)
            for loc in (f"axis=2/slice={k}" for k in _kept_slices(file, 2, 0.05)[0])
        ]
    if name.endswith(DICOM_SUFFIXES) or is_dicom(file):
        from medtl.data.scans import _pseudonym, _scan_dicom

        scanned = _scan_dicom(file, root, number)
        group = _pseudonym(patients, scanned.patient)
        locators = [f"frame={k}" for k in range(scanned.frames)] if scanned.frames > 1 else [""]
        return [InputItem(row_id(path, loc), path, loc, group) for loc in locators]
    raise DataError(
        f"{path}: not an image medtl reads ({', '.join(IMAGE_SUFFIXES)}, DICOM, NIfTI); "
        "remove it from the folder or ignore this line"
    )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _relative(message: str, root: Path) -> str:
    """A reader's message with the input root removed from the paths it names."""
    return message.replace(f"{root.resolve()}/", "").replace(f"{root}/", "")


# -- the model ------------------------------------------------------------------------------
@dataclass
class Decision:
    """What turns logits into an output row: calibrator, operating point and conformal sets."""

    card: ModelCard
    calibrator: Calibrator
    conformal: ConformalCard | None
    positive: int | None
    threshold: float | None
    rule: str

    def rows(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Probabilities ``[B, K]``, called class indices ``[B]`` and set membership ``[B, K]``."""
        probs = self.calibrator.probs(logits)
        called = probs.argmax(axis=1)
        if self.positive is not None and self.threshold is not None:
            others = probs.copy()
            others[:, self.positive] = -1.0
            is_pos = probs[:, self.positive] >= self.threshold
            called = np.where(is_pos, self.positive, others.argmax(axis=1))
        sets = self.conformal.sets(probs) if self.conformal is not None else None
        return probs, called, sets


def decision(folder: Path, card: ModelCard, opts: PredictOptions) -> Decision:
    """The card's calibrator and thresholds and the folder's conformal sets; a model that was
    never calibrated is refused unless ``opts.uncalibrated``."""
    path = folder / CONFORMAL_FILE
    if not path.is_file() and not opts.uncalibrated:
        raise ConfigError(
            f"{folder} has not been calibrated (no {CONFORMAL_FILE}; calibrator "
            f"'{card.calibrator.name}'): run 'medtl calibrate {folder}' first, or pass "
            "--uncalibrated for raw probabilities without operating point or conformal sets"
        )
    conformal = ConformalCard.load(path) if path.is_file() and not opts.uncalibrated else None
    if conformal is not None:
        conformal.check_calibrator(card.calibrator, path)
    positive = _positive(card, opts.positive)
    thresholds = card.thresholds.get(card.classes[positive], {}) if positive is not None else {}
    if positive is None or opts.uncalibrated:
        return Decision(card, card.calibrator, conformal, None, None, "argmax")
    if opts.operating_point not in thresholds:
        raise ConfigError(
            f"operating point {opts.operating_point!r} was not chosen on validation for class "
            f"{card.classes[positive]!r}; known: {sorted(thresholds) or 'none'}"
        )
    threshold = thresholds[opts.operating_point]
    rule = "argmax" if threshold is None else f"{opts.operating_point} ({card.classes[positive]})"
    return Decision(card, card.calibrator, conformal, positive, threshold, rule)


def _positive(card: ModelCard, positive: str | None) -> int | None:
    """The class the operating point is for: given, else the recipe's ``evaluate.positive``,
    else class 1 of a binary task; None (argmax) for a multi-class task without one."""
    recipe_positive = (card.recipe.get("evaluate") or {}).get("positive")
    name = positive or recipe_positive
    if name is None:
        return 1 if len(card.classes) == 2 else None
    if name not in card.classes:
        raise ConfigError(f"positive class {name!r} is not one of the model's {card.classes}")
    return card.classes.index(name)


# -- the partial output ---------------------------------------------------------------------
class PartialOutput:
    """Append-only files in ``OUT/.partial`` that a killed run resumes from."""

    def __init__(self, out: Path, state: dict[str, Any], header: list[str]) -> None:
        self.dir = out / PARTIAL
        self.state, self.header = state, header
        self.csv, self.jsonl = self.dir / "predictions.csv", self.dir / "predictions.jsonl"
        self.skipped = self.dir / "skipped.jsonl"

    def open(self) -> set[str]:
        """Start, or resume a run of the same model and input: the ids already done (each
        present in both files; a torn last line is dropped and both files rewritten)."""
        state_file = self.dir / "state.json"
        if state_file.is_file():
            if json.loads(state_file.read_text(encoding="utf-8")) != self.state:
                raise DataError(
                    f"{self.dir.parent} holds an unfinished prediction of another model, input "
                    f"or settings; choose another --out or delete {self.dir}"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(state_file, self.state)
        rows = {r[0]: r for r in _complete_csv(self.csv)[1:]}
        records = {r["id"]: r for r in _complete_jsonl(self.jsonl)}
        done = rows.keys() & records.keys()
        atomic_write_text(
            self.csv, _csv_text([self.header, *(r for i, r in rows.items() if i in done)])
        )
        atomic_write_text(self.jsonl, "".join(_json_line(records[i]) for i in rows if i in done))
        skipped = _complete_jsonl(self.skipped)
        atomic_write_text(self.skipped, "".join(_json_line(s) for s in skipped))
        return set(done) | {s["id"] for s in skipped}

    def append(self, rows: list[list[Any]], records: list[dict[str, Any]]) -> None:
        _append(self.csv, _csv_text(rows))
        _append(self.jsonl, "".join(_json_line(r) for r in records))

    def skip(self, item: Skipped) -> None:
        _append(self.skipped, _json_line(item.__dict__))


def _append(path: Path, text: str) -> None:
    import os

    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _complete_lines(path: Path) -> list[str]:
    """Lines ending in a newline; a last line without one (torn by a kill) is dropped."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


def _complete_csv(path: Path) -> list[list[str]]:
    return [next(csv.reader([line])) for line in _complete_lines(path) if line]


def _complete_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in _complete_lines(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn inside: it and anything after it are redone
    return out


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, allow_nan=False) + "\n"


# -- predicting -----------------------------------------------------------------------------
def predict_images(
    model_dir: Path, source: Path, out: Path, opts: PredictOptions, root: Path | None = None
) -> PredictResult:
    """Predict every image of ``source`` (a folder, or a manifest with ``root``) into ``out``."""
    from medtl.finetune.loop import load_classifier

    start = time.perf_counter()
    model, card = load_classifier(model_dir)
    rule = decision(model_dir, card, opts)
    data_root, items, refused = list_inputs(source, root, opts.split)
    state = _state(model_dir, card, items, refused, opts, rule)
    if all((out / name).is_file() for name in OUTPUTS) and not (out / PARTIAL).is_dir():
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        if summary.get("state") == state:
            log.info("%s is complete already", out)
            return _result(out, summary, 0, time.perf_counter() - start)
        raise DataError(
            f"{out} holds the predictions of another model or input; choose another --out"
        )
    header = _header(card.classes)
    partial = PartialOutput(out, state, header)
    done = partial.open()
    if done:
        log.info("resuming: %d of %d images done before", len(done), len(items) + len(refused))
    for item in refused:
        if item.id not in done:
            partial.skip(item)
            done.add(item.id)
    todo = [item for item in items if item.id not in done]
    model.eval().to(opts.device)
    for batch, images in _batches(todo, data_root, card, opts, partial):
        with torch.no_grad():
            logits = model(images.to(opts.device)).float().cpu().numpy()
        if not np.isfinite(logits).all():
            raise DataError(
                f"the model produced NaN or infinite outputs on {batch[0].path} or its batch"
            )
        partial.append(*_output_rows(batch, logits, rule))
        if opts.explain:
            write_explanations(out / EXPLANATIONS, model, card, batch, images, opts)
    return _finish(out, partial, items, refused, state, len(items) - len(todo), start)


def _state(
    folder: Path,
    card: ModelCard,
    items: list[InputItem],
    refused: list[Skipped],
    opts: PredictOptions,
    rule: Decision,
) -> dict[str, Any]:
    """What a resumed run must share with the run it completes."""
    listing = "\n".join(f"{i.id}\t{i.path}\t{i.locator}" for i in items)
    listing += "\n" + "\n".join(s.id for s in refused)
    conformal = folder / CONFORMAL_FILE
    return {
        "model_sha256": file_sha256(folder / "model.safetensors"),
        "card_sha256": file_sha256(folder / "meta.json"),
        "conformal_sha256": file_sha256(conformal) if rule.conformal is not None else None,
        "input_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        "rule": rule.rule,
        "threshold": rule.threshold,
        "uncalibrated": opts.uncalibrated,
    }


def _header(classes: list[str]) -> list[str]:
    probs = [f"prob_{c}" for c in classes]
    return ["id", "path", "locator", "group", *probs, "predicted", "set", "set_size", "abstain"]


def _batches(
    todo: list[InputItem], root: Path, card: ModelCard, opts: PredictOptions, partial: PartialOutput
) -> Iterator[tuple[list[InputItem], torch.Tensor]]:
    """Batches of ``[B, C, S, S]`` images read with training's deterministic transforms; an
    unreadable image is recorded as skipped and the stream goes on."""
    from monai.transforms import Compose
    from tqdm import tqdm

    from medtl.data.dataset import DataConfig, deterministic_transforms, user_errors

    cfg = DataConfig(image_size=card.image_size, channels=card.in_chans, resize=card.resize)  # type: ignore[arg-type]
    transform = Compose(deterministic_transforms(cfg, root))
    show = opts.progress and sys.stderr.isatty()
    batch: list[InputItem] = []
    images: list[torch.Tensor] = []
    for item in tqdm(todo, desc="predict", unit="img", disable=not show):
        try:
            with user_errors():
                data = transform({"image": item.path, "locator": item.locator})
        except MedtlError as exc:
            partial.skip(Skipped(item.id, item.path, _relative(str(exc).splitlines()[-1], root)))
            continue
        batch.append(item)
        images.append(torch.as_tensor(data["image"]))
        if len(batch) == opts.batch_size:
            yield batch, torch.stack(images)
            batch, images = [], []
    if batch:
        yield batch, torch.stack(images)


def _output_rows(
    batch: list[InputItem], logits: np.ndarray, rule: Decision
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    classes = rule.card.classes
    probs, called, sets = rule.rows(logits)
    rows, records = [], []
    for i, item in enumerate(batch):
        members = (
            [c for c, m in zip(classes, sets[i], strict=True) if m] if sets is not None else None
        )
        abstain = None if members is None else len(members) != 1
        rows.append(
            [
                item.id,
                item.path,
                item.locator,
                item.group,
                *(f"{p:.6f}" for p in probs[i]),
                classes[called[i]],
                "" if members is None else "|".join(members),
                "" if members is None else len(members),
                "" if abstain is None else str(abstain).lower(),
            ]
        )
        records.append(
            {
                "id": item.id,
                "path": item.path,
                "locator": item.locator,
                "group": item.group,
                "probs": {c: round(float(p), 6) for c, p in zip(classes, probs[i], strict=True)},
                "predicted": classes[called[i]],
                "set": members,
                "abstain": abstain,
            }
        )
    return rows, records


def _finish(
    out: Path,
    partial: PartialOutput,
    items: list[InputItem],
    refused: list[Skipped],
    state: dict[str, Any],
    resumed: int,
    start: float,
) -> PredictResult:
    """The final files in input order, written atomically; then the partial folder goes."""
    order = {item.id: n for n, item in enumerate(items)}
    rows = sorted(_complete_csv(partial.csv)[1:], key=lambda r: order[r[0]])
    records = sorted(_complete_jsonl(partial.jsonl), key=lambda r: order[r["id"]])
    skipped = _complete_jsonl(partial.skipped)
    atomic_write_text(out / "predictions.csv", _csv_text([partial.header, *rows]))
    atomic_write_text(out / "predictions.jsonl", "".join(_json_line(r) for r in records))
    atomic_write_text(
        out / "skipped.csv",
        _csv_text(
            [["id", "path", "reason"], *([s["id"], s["path"], s["reason"]] for s in skipped)]
        ),
    )
    seconds = time.perf_counter() - start
    summary = {
        "predicted": len(rows),
        "skipped": len(skipped),
        "abstained": sum(1 for r in records if r["abstain"]),
        "seconds": round(seconds, 3),
        "state": state,
    }
    write_json(out / "summary.json", summary)
    shutil.rmtree(partial.dir)
    return _result(out, summary, resumed, seconds)


def _result(out: Path, summary: dict[str, Any], resumed: int, seconds: float) -> PredictResult:
    files = {name: out / name for name in OUTPUTS}
    return PredictResult(
        out, int(summary["predicted"]), int(summary["skipped"]), seconds, resumed, files
    )


EXPLANATIONS = "explanations"


def write_explanations(
    folder: Path,
    model: torch.nn.Module,
    card: ModelCard,
    batch: list[InputItem],
    images: torch.Tensor,
    opts: PredictOptions,
) -> None:
    """One PNG per image (``<id>.png``, named by the row id, never the file name): the image and
    each map of ``opts.explain`` over it, for the class the calibrated model calls most likely.
    Maps are computed on the CPU (:func:`medtl.explain.explain`); written atomically."""
    from medtl.explain import explain
    from medtl.io import atomic_write_bytes
    from medtl.report.explanations import overlay_figure

    device = next(model.parameters()).device
    result = explain(model.cpu(), card, images.cpu(), tuple(opts.explain))
    model.to(device)
    folder.mkdir(parents=True, exist_ok=True)
    for n, item in enumerate(batch):
        t = int(result.target[n])
        info: list[dict[str, object]] = [
            {
                "kind": "",
                "true": None,
                "explained": card.classes[t],
                "probability": float(result.probs[n, t]),
            }
        ]
        maps = {m: v[n : n + 1] for m, v in result.maps.items()}
        figure = overlay_figure(images[n : n + 1].cpu().numpy(), maps, info)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        atomic_write_bytes(folder / f"{item.id}.png", buffer.getvalue())
