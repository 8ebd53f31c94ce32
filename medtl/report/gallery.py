"""The gallery of most confident errors: test images the model got wrong with the highest
(calibrated) probability for the wrong class.

Only images named by the manifest are shown, read with :func:`medtl.data.readers.read_array`
and shrunk to a thumbnail; each carries its true class, predicted class and probability,
never the row id, file name or group (which may hold patient identifiers). When the data
root is unknown or an image cannot be read, the card says so instead of showing pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medtl.calibrate import Calibrator
from medtl.data.manifest import Manifest, Row, resolve
from medtl.data.readers import read_array
from medtl.errors import MedtlError
from medtl.predictions import Predictions
from medtl.report.plots import png_uri

THUMB_PX = 96
MAX_ERRORS = 8


@dataclass
class Card:
    """One gallery card: the thumbnail as a data URI, or the reason there is none."""

    rank: int
    true: str
    predicted: str
    probability: float
    image: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "true": self.true,
            "predicted": self.predicted,
            "probability": self.probability,
            "thumbnail": self.image is not None,
            "reason": self.reason,
        }


def confident_errors(
    pred: Predictions, calibration: Calibrator | float, limit: int = MAX_ERRORS
) -> list[tuple[int, int, float]]:
    """``[(row index, predicted class, its probability)]`` of the ``limit`` labelled,
    misclassified rows with the highest calibrated predicted-class probability, most confident
    first (``calibration``: the entry's calibrator, or a temperature)."""
    probs = pred.probs(calibration)
    called = probs.argmax(axis=1)
    wrong = np.flatnonzero((pred.labels >= 0) & (called != pred.labels))
    confidence = probs[wrong, called[wrong]]
    order = np.argsort(-confidence, kind="stable")[:limit]
    return [(int(wrong[i]), int(called[wrong[i]]), float(confidence[i])) for i in order]


def build_gallery(
    pred: Predictions,
    calibration: Calibrator | float,
    manifest: Manifest | None,
    root: Path | None,
    missing: str = "no image",
) -> list[Card]:
    """Cards for the most confident errors; pixels only when ``manifest`` and ``root`` are
    known, else each card shows ``missing``."""
    rows = {r.id: r for r in manifest.rows} if manifest is not None else {}
    cards = []
    for rank, (i, called, p) in enumerate(confident_errors(pred, calibration), start=1):
        card = Card(rank, pred.classes[int(pred.labels[i])], pred.classes[called], p)
        if manifest is not None and root is not None:
            card.image, card.reason = _thumbnail(rows.get(pred.ids[i]), root)
        else:
            card.reason = missing
        cards.append(card)
    return cards


def _thumbnail(row: Row | None, root: Path) -> tuple[str | None, str | None]:
    """``(data URI, None)`` or ``(None, reason)``; the reason never names the file."""
    if row is None:
        return None, "not in the manifest"
    try:
        arr = read_array(resolve(root, row.path), row.locator)
    except (MedtlError, OSError, ValueError):
        return None, "image missing or unreadable"
    return png_uri(thumbnail_png(arr)), None


def thumbnail_png(arr: np.ndarray, size: int = THUMB_PX) -> bytes:
    """PNG bytes of ``arr: [C, H, W]`` in ``[0, 1]``, its longer side scaled to ``size`` px."""
    channels = arr[:3] if arr.shape[0] >= 3 else arr[:1]
    pixels = (np.clip(np.nan_to_num(channels), 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[0] if len(pixels) == 1 else np.moveaxis(pixels, 0, -1))
    scale = size / max(image.size)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(shape, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Gallery:
    """The cards of one entry, and a message when thumbnails (or errors) are missing."""

    cards: list[Card]
    message: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message, "cards": [c.to_dict() for c in self.cards]}


def entry_gallery(
    pred: Predictions | None,
    calibration: Calibrator | float,
    dataset: str,
    manifest: Manifest | str | None,
    root: Path | None,
) -> Gallery:
    """The gallery of one entry; ``manifest`` is the loaded manifest or why it is missing."""
    if pred is None:
        return Gallery([], "Not shown: the test predictions are not available (see notes).")
    reason, missing = None, "no image"
    if root is None:
        reason = (
            f"Thumbnails not shown: no data root was given for dataset {dataset!r} "
            f"(pass --data-root {dataset}=PATH)."
        )
        missing = "data root not given"
    elif not isinstance(manifest, Manifest):
        reason = f"Thumbnails not shown: {manifest or 'the manifest is unknown'}."
        missing = "manifest unavailable"
    usable = manifest if isinstance(manifest, Manifest) and root is not None else None
    cards = build_gallery(pred, calibration, usable, root, missing)
    if not cards:
        return Gallery([], "No misclassified test images.")
    return Gallery(cards, reason)
