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


# The pretrained column: a one-factor-at-a-time screen on VALIDATION (docs/finetune.md): short
# CPU runs until benchmarks/pretrained_defaults.py's full grid has run. That screen ran before a
# new head on pretrained weights started small (medtl.models.init_head), so where it differs from
# scratch its winner is not adopted until the grid is run again.
SCREEN = "CPU screen (before the new-head fix), validation score"
START_DEFAULTS: tuple[StartDefault, ...] = (
    StartDefault(
        "backbone_lr_scale",
        1.0,
        1.0,
        f"{SCREEN}: 1.0 beat 0.3 and 0.1 on both datasets",
    ),
    StartDefault(
        "layer_decay",
        1.0,
        1.0,
        f"{SCREEN}: none (1.0) beat 0.75 on the mean (0.75 was better on BUSI's one seed)",
    ),
    StartDefault(
        "warmup_epochs",
        1.0,
        1.0,
        f"{SCREEN}: 0 beat 1 by 0.033 (better on BUSI's one seed, worse on BreastMNIST), while "
        "the new head started with large logits that no warm-up undid fastest; not adopted, 1 "
        "kept until the grid is rerun",
    ),
    StartDefault(
        "label_smoothing",
        0.0,
        0.0,
        f"{SCREEN}: 0 beat 0.1 on the mean (0.1 was better on BUSI's one seed)",
    ),
    StartDefault(
        "augment",
        "light",
        "light",
        f"{SCREEN}: light kept ('none' within the 0.01 margin, 'medium' below)",
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
