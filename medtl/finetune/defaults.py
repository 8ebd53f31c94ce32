"""Fine-tuning defaults that depend on where the weights start.

A ``finetune`` key left unset (``null``) takes its value from the start: one set of values for a
pretrained start (``finetune.weights`` names a source, a local checkpoint or this run's MAE
encoder) and one for random initialisation. The scratch values are what medtl used before the
distinction, so scratch recipes train as they did. The pretrained values are chosen on
VALIDATION only by ``benchmarks/pretrained_defaults.py`` (``docs/finetune.md`` has the table,
what was measured and how).

:meth:`medtl.finetune.loop.FinetuneConfig.for_start` applies them; the model card records the
resolved values and which set they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Start = Literal["pretrained", "scratch"]


@dataclass(frozen=True)
class StartDefault:
    """One knob: its value for each start and how the pretrained value was chosen."""

    key: str
    pretrained: Any
    scratch: Any
    chosen: str

    def value(self, start: Start) -> Any:
        return self.pretrained if start == "pretrained" else self.scratch


# The pretrained column: benchmarks/pretrained_defaults.py's grid on VALIDATION (docs/finetune.md):
# efficientnet_lite0 from ImageNet on BUSI and BreastMNIST, 2 seeds each, one knob changed at a
# time from the scratch column; the score is the mean of validation macro AUROC and balanced
# accuracy over datasets. A level replaces the base's only if it beats it by more than 0.01, and
# the levels so chosen were run together before adoption: together (warm-up 3, smoothing 0.1,
# augment medium) they scored 0.875 against the base's 0.879, so only the best single change,
# augment medium (0.906), is adopted.
GRID = "full grid (BUSI + BreastMNIST, 2 seeds each), validation score; base 0.879"
START_DEFAULTS: tuple[StartDefault, ...] = (
    StartDefault(
        "backbone_lr_scale",
        1.0,
        1.0,
        f"{GRID}: 0.3 scored 0.878, 0.1 scored 0.827",
    ),
    StartDefault(
        "layer_decay",
        1.0,
        1.0,
        f"{GRID}: 0.75 scored 0.860",
    ),
    StartDefault(
        "warmup_epochs",
        1.0,
        1.0,
        f"{GRID}: 3 scored 0.903 alone (0 scored 0.885) but lost with the other winners: 3 "
        "epochs, smoothing 0.1 and augment medium together scored 0.875; not adopted",
    ),
    StartDefault(
        "label_smoothing",
        0.0,
        0.0,
        f"{GRID}: 0.1 scored 0.896 alone but lost with the other winners (0.875 together); "
        "not adopted",
    ),
    StartDefault(
        "augment",
        "medium",
        "light",
        f"{GRID}: medium scored 0.906, the best single change (better on BreastMNIST, 0.913 "
        "against 0.852; worse on BUSI, 0.899 against 0.906); none scored 0.877",
    ),
)
# knobs a strategy receives as options when it takes them (``full``, ``lpft``)
STRATEGY_KNOBS = ("backbone_lr_scale", "layer_decay")


def start_of(weights: Any) -> Start:
    """``pretrained`` when fine-tuning starts from any weights, ``scratch`` otherwise."""
    return "scratch" if weights in (None, "") else "pretrained"


def defaults_for(start: Start) -> dict[str, Any]:
    """Every start-dependent knob's default for ``start``."""
    return {d.key: d.value(start) for d in START_DEFAULTS}


def defaults_markdown() -> str:
    """The table of ``docs/finetune.md``: knob, pretrained default, scratch default, how chosen."""
    rows = [
        "| key | pretrained start | scratch | how the pretrained value was chosen |",
        "|---|---|---|---|",
    ]
    for d in START_DEFAULTS:
        rows.append(f"| `finetune.{d.key}` | `{d.pretrained!r}` | `{d.scratch!r}` | {d.chosen} |")
    return "\n".join(rows)
