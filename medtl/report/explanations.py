"""The report's explanation panels: Grad-CAM and occlusion overlays of a few test images.

Which images: :func:`medtl.explain.choose_examples`, a sample seeded by row id (chosen
without looking at labels or predictions) and the most confident errors. The model is loaded
from the entry's model folder and the images read as evaluation read them; a panel that cannot
be drawn (no data root, model folder gone) says why. Captions carry the class and probability
only, never a row id or file name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.report.html import esc
from medtl.report.load import EntryView
from medtl.report.plots import data_uri

log = logging.getLogger(__name__)

N_SAMPLE, N_ERRORS = 4, 4
METHODS = ("gradcam", "occlusion")
TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion"}


@dataclass
class Panel:
    """The figure of one entry (a data URI) with what it shows, or why it is missing."""

    image: str | None = None
    rows: list[dict[str, object]] = field(default_factory=list)
    layer: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "message": self.message, "images": self.rows}


def entry_panel(
    entry: EntryView, folder: Path, manifest: Manifest | str | None, root: Path | None, seed: int
) -> Panel:
    """The explanation panel of one entry (``folder``: the evaluation folder)."""
    if entry.test is None:
        return Panel(message="Not shown: the test predictions are not available.")
    if root is None or not isinstance(manifest, Manifest):
        return Panel(
            message=f"Not shown: no data root for dataset {entry.dataset!r} "
            f"(pass --data-root {entry.dataset}=PATH) or its manifest is unreadable."
        )
    try:
        return _panel(entry, folder, manifest, root, seed)
    except (MedtlError, OSError, ValueError) as exc:
        log.warning("explanations of %s not drawn: %s", entry.model, exc)
        return Panel(message=f"Not shown: {str(exc).strip().splitlines()[-1]}")


def _model_dir(entry: EntryView, folder: Path) -> Path:
    path = Path(str(entry.record.get("model_dir") or ""))
    return path if path.is_absolute() or path.exists() else folder / path


def _panel(entry: EntryView, folder: Path, manifest: Manifest, root: Path, seed: int) -> Panel:
    from medtl.data.dataset import DataConfig, deterministic_transforms
    from medtl.explain import choose_examples, explain
    from medtl.finetune.loop import load_classifier

    pred = entry.test
    assert pred is not None
    model, card = load_classifier(_model_dir(entry, folder))
    sample, errors = choose_examples(pred, pred.probs(entry.calibrator), N_SAMPLE, N_ERRORS, seed)
    chosen = [("sample", i) for i in sample] + [("error", i) for i in errors]
    rows = {r.id: r for r in manifest.rows}
    transforms = deterministic_transforms(
        DataConfig(image_size=card.image_size, channels=card.in_chans, resize=card.resize), root
    )
    images = []
    for _, i in chosen:
        row = rows[pred.ids[i]]
        item: dict = {"image": row.path, "locator": row.locator}
        for t in transforms:
            item = t(item)
        images.append(item["image"])
    result = explain(model, card, torch.stack(images), METHODS)
    info: list[dict[str, object]] = [
        {
            "kind": kind,
            "true": pred.classes[int(pred.labels[i])] if pred.labels[i] >= 0 else None,
            "explained": card.classes[int(t)],
            "probability": float(result.probs[n, int(t)]),
        }
        for n, ((kind, i), t) in enumerate(zip(chosen, result.target, strict=True))
    ]
    figure = overlay_figure(torch.stack(images).numpy(), result.maps, info)
    return Panel(data_uri(figure), info, result.layer)


def overlay_figure(
    images: np.ndarray, maps: dict[str, np.ndarray], info: list[dict[str, object]]
) -> Figure:
    """One column per image: the image, then each map over it (``images: [N, C, H, W]``)."""
    n, rows = len(images), 1 + len(maps)
    fig = Figure(figsize=(1.7 * n, 1.8 * rows))
    axes = fig.subplots(rows, n, squeeze=False)
    for j in range(n):
        grey = images[j].mean(axis=0)
        d = info[j]
        true = d["true"] if d["true"] is not None else "?"
        axes[0, j].set_title(
            f"{d['kind']}\ntrue {true}\n{d['explained']} {float(d['probability']):.2f}",  # type: ignore[arg-type]
            fontsize=7,
        )
        axes[0, j].imshow(grey, cmap="gray", vmin=0, vmax=1)
        for r, (method, m) in enumerate(maps.items(), start=1):
            axes[r, j].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[r, j].imshow(m[j], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if j == 0:
                axes[r, j].set_ylabel(TITLES[method], fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def panel_block(panel: Panel | None, split: str) -> str:
    """The HTML of one entry's panel (empty when explanations were not asked for)."""
    if panel is None:
        return ""
    head = f"<h3>Explanations ({esc(split)} split)</h3>"
    if panel.image is None:
        return head + f"<p>{esc(panel.message or 'not drawn')}</p>"
    intro = (
        f"<p>Grad-CAM (layer {esc(panel.layer or '')}) and occlusion sensitivity for the class "
        "the model called, over the image as the model saw it. Columns: images sampled by a "
        "seeded hash of their id (chosen without looking at labels or predictions), then the "
        "most confident errors. Red: regions that raised the called class's score.</p>"
    )
    return head + intro + f'<img class="explain" src="{panel.image}" alt="explanation maps">'
