"""``medtl export``: a fine-tuned model folder to what a clinic or another tool runs.

``export_model`` writes one folder::

    OUT/model_card.md, model_card.html   the human-readable card (from the typed ModelCard)
    OUT/model_card.json                  the typed card itself (meta.json of the model)
    OUT/model.onnx                       calibrated probabilities, dynamic batch axis
    OUT/bundle/                          a MONAI bundle (configs/, models/model.ts)
    OUT/export.json                      what was written, hashes, the ONNX parity measured

Everything is written into a temporary folder beside OUT and renamed when complete, so a
failure (an operator ONNX cannot express, a parity check that fails) leaves no OUT at all.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medtl import __version__
from medtl.artifacts import EvaluationEntry, ModelCard
from medtl.errors import ConfigError
from medtl.export.modelcard import build_document, evaluation_entries
from medtl.export.network import (
    OPSET,
    CalibratedClassifier,
    ExportError,
    example_batch,
    export_onnx,
    onnx_parity,
)
from medtl.io import _UMASK, sha256_file, write_json

FORMATS = ("card", "onnx", "bundle")
__all__ = ["FORMATS", "ExportError", "ExportResult", "export_model"]


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    onnx_max_abs_diff: float | None


def check_formats(formats: Sequence[str]) -> list[str]:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def export_model(
    folder: Path,
    out: Path,
    evaluation: Path | None = None,
    formats: Sequence[str] = FORMATS,
    intended_use: str | None = None,
) -> ExportResult:
    """Export the fine-tuned model in ``folder`` to the new folder ``out`` (see module doc)."""
    from medtl.finetune.loop import load_classifier

    formats = check_formats(formats)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another --out")
    folder = folder.resolve()
    model, card = load_classifier(folder)
    entries = evaluation_entries(evaluation, folder) if evaluation is not None else []
    net = CalibratedClassifier(model, card.calibrator, len(card.classes)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; OUT gets the usual permissions
    try:
        parity = _write(net, card, folder, entries, tmp, formats, intended_use)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        record = {
            "medtl_version": __version__,
            "model": str(folder),
            "formats": formats,
            "onnx": {"opset": OPSET, "max_abs_diff": parity} if "onnx" in formats else None,
            "files": {f: sha256_file(tmp / f) for f in files},
        }
        write_json(tmp / "export.json", record)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, [*files, "export.json"], parity)


def _write(
    net: CalibratedClassifier,
    card: ModelCard,
    folder: Path,
    entries: list[EvaluationEntry],
    tmp: Path,
    formats: list[str],
    intended_use: str | None,
) -> float | None:
    from medtl.export.bundle import write_bundle

    example = example_batch(card.in_chans, card.image_size)
    parity = None
    if "onnx" in formats:
        export_onnx(net, example, tmp / "model.onnx")
        others = (example, example_batch(card.in_chans, card.image_size, batch=5, seed=1))
        parity = onnx_parity(net, tmp / "model.onnx", others)
    if "bundle" in formats:
        write_bundle(net, example, card, tmp / "bundle")
    if "card" in formats:
        name = (
            folder.parent.name if folder.name == "finetune" else folder.name
        )  # runs/NAME/finetune
        doc = build_document(card, folder, entries, name, intended_use)
        (tmp / "model_card.md").write_text(doc.markdown(), encoding="utf-8")
        (tmp / "model_card.html").write_text(doc.html(), encoding="utf-8")
        card.save(tmp / "model_card.json")
    return parity
