"""BioTune's evolution as an Optuna sampler: candidate ``n`` of a study is member
``n % population`` of generation ``n // population``, and a generation's genomes follow from the
previous generation's results alone (rank selection, blend crossover, extinction-scaled
mutation, elite perturbation, immigrants; :mod:`medtl.finetune.evolution`), every random choice
seeded from ``(seed, generation)``. So any worker proposes the same genome for the same
candidate, and a resumed search proposes what an uninterrupted one did."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial

from medtl.finetune import evolution as ea
from medtl.finetune.search.config import BioTuneConfig, Rung
from medtl.finetune.search.study import rows_of
from medtl.train import mix_seed

GENE = FloatDistribution(0.0, 1.0)


def gene_names(blocks: Sequence[str]) -> list[str]:
    """The study's parameter names, in genome order (they sort that way too)."""
    return [f"g{i:02d}_{b}" for i, b in enumerate(blocks)] + ["threshold"]


class BioTuneSampler(optuna.samplers.BaseSampler):
    """Proposes every gene of a candidate at once (a relative sample over the whole genome)."""

    def __init__(
        self, cfg: BioTuneConfig, blocks: Sequence[str], rungs: Sequence[Rung], seeds: Sequence[int]
    ) -> None:
        self.cfg, self.names = cfg, gene_names(blocks)
        self.rungs, self.seeds = list(rungs), list(seeds)
        self._known: dict[int, tuple[np.ndarray, list[str]]] = {}

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {name: GENE for name in self.names}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        genomes, _ = self.generation(study, trial.number // self.cfg.population)
        genome = genomes[trial.number % self.cfg.population]
        return {name: float(v) for name, v in zip(self.names, genome, strict=True)}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        raise ValueError(f"the BioTune sampler proposes genes only, not {param_name!r}")

    def origin(self, study: optuna.Study, number: int) -> str:
        """How candidate ``number`` was made (random, elite, exploit, offspring, immigrant)."""
        _, origins = self.generation(study, number // self.cfg.population)
        return origins[number % self.cfg.population]

    def generation(self, study: optuna.Study, g: int) -> tuple[np.ndarray, list[str]]:
        """Generation ``g``'s genomes ``[population, genes]`` and origins; generation ``g - 1``
        must be finished."""
        if g not in self._known:
            self._known[g] = self._breed(study, g)
        return self._known[g]

    def _breed(self, study: optuna.Study, g: int) -> tuple[np.ndarray, list[str]]:
        n, rng = self.cfg.population, np.random.default_rng(mix_seed(self.cfg.seed, g))
        if g == 0:
            return ea.random_genomes(n, len(self.names), rng), [ea.RANDOM] * n
        from medtl.finetune.search.results import knowledge, ranking

        trials = study.get_trials(deepcopy=False)
        parents = trials[(g - 1) * n : g * n]
        if len(parents) < n or not all(t.state.is_finished() for t in parents):
            raise RuntimeError(f"generation {g - 1} is not finished; generation {g} must wait")
        population = np.array([[t.params[k] for k in sorted(t.params)] for t in parents])
        rows = [row for t in trials[: g * n] for row in rows_of(t, n)]
        known = knowledge(rows, self.rungs, self.seeds)
        order = ranking(self.cfg, population, known)
        return ea.next_generation(population, order, self.cfg.operators(), rng)
