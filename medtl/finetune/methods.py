"""Fine-tuning searches: a ``finetune.strategy`` that trains many candidates, then one model.

``finetune.strategy`` names a registered strategy (one run of
:func:`medtl.finetune.loop.finetune`, :data:`medtl.finetune.strategies.STRATEGIES`) or a
registered search here. A search reads its own recipe section (``search``), trains its
candidates into the stage folder, retrains the winner, and says where that model is: the
finetune stage records the folder, so nothing downstream guesses it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest
from medtl.finetune.loop import FinetuneConfig
from medtl.registry import Registry

__all__ = ["SEARCHES", "BioTune", "SearchJob", "SearchOutcome", "check_strategy"]


@dataclass(frozen=True)
class SearchJob:
    """Everything one search (or one of its worker processes) trains with."""

    finetune: FinetuneConfig
    search: BaseModel | None  # the recipe's ``search`` section; ``None``: the search's defaults
    manifest: Manifest
    root: Path
    data: DataConfig
    out: Path
    weights: str | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class SearchOutcome:
    """Where the retrained model is (relative to the stage folder) and what to log."""

    model: Path
    summary: dict[str, float] = field(default_factory=dict)


class FinetuneSearch(Protocol):
    """A search behind ``finetune.strategy``: ``run`` to the end (and retrain), or ``work`` as
    one more process on a running search."""

    @property
    def config(self) -> type[BaseModel]: ...

    def run(self, job: SearchJob) -> SearchOutcome: ...

    def work(self, job: SearchJob) -> int: ...


SEARCHES: Registry[FinetuneSearch] = Registry("fine-tuning search")


class BioTune:
    """BioTune: evolves ``genome`` strategies, then retrains the best one into ``final/``.

    The search itself is :mod:`medtl.finetune.search`; its recipe section is ``search``."""

    @property
    def config(self) -> type[BaseModel]:
        from medtl.finetune.search import BioTuneConfig

        return BioTuneConfig

    def _cfg(self, job: SearchJob) -> Any:
        return job.search if job.search is not None else self.config()

    def _task(self, job: SearchJob) -> Any:
        """The :class:`~medtl.finetune.search.SearchTask` of ``job``."""
        from medtl.finetune.search import SearchTask

        return SearchTask(
            self._cfg(job), job.finetune, job.manifest, job.root, job.data, job.out,
            job.weights, job.device, job.progress,
        )  # fmt: skip

    def run(self, job: SearchJob) -> SearchOutcome:
        from medtl.finetune.search import run_search

        found = run_search(self._task(job))
        if found.finetune is None:
            raise RuntimeError("the BioTune search ended without its retrained model")
        model = found.finetune.model_path.parent.relative_to(job.out)
        summary = {"best_fitness": found.best_fitness, "epoch_equivalents": found.epoch_equivalents}
        return SearchOutcome(model, summary)

    def work(self, job: SearchJob) -> int:
        from medtl.finetune.search import run_worker

        return run_worker(self._task(job))


SEARCHES.register("biotune")(BioTune())


def check_strategy(name: str) -> str:
    """``name`` if it is a registered strategy or search; else a ValueError naming both lists
    (pydantic reports it with the key)."""
    from medtl.finetune.strategies import STRATEGIES

    if name in STRATEGIES or name in SEARCHES:
        return name
    close = difflib.get_close_matches(name, [*STRATEGIES.names(), *SEARCHES.names()], 1, 0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown fine-tuning strategy {name!r}{hint} (strategies: "
        f"{', '.join(STRATEGIES.names())}; searches: {', '.join(SEARCHES.names())})"
    )
