"""BioTune (Davila et al., IEEE Access 2025): an evolutionary search over which blocks of a
backbone to fine-tune and at which learning rate, scored on the validation split only.

A genome holds one gene in [0, 1] per block of :func:`~medtl.finetune.blocks.blocks_of` (stem ..
head) and a threshold gene last; the ``genome`` strategy decodes it (a block trains iff its gene
exceeds the threshold, at ``10 ** (2 * (gene - 0.5))`` times the base rate). The search minimises
``fitness = 1 - mean over seeds of the best validation balanced accuracy``; the operators live
in :mod:`medtl.finetune.evolution`, the frozen-prefix feature cache in
:mod:`medtl.finetune.prefix`.

The search is an Optuna study. Trial ``n`` is member ``n % population`` of generation
``n // population``; :class:`~medtl.finetune.search.sampler.BioTuneSampler` proposes its genome
from the previous generation's results with the operators of :mod:`medtl.finetune.evolution`.
Two evaluation schedules share the search space and the population settings:

- ``reference``: every member of every generation (carried elites included) trains for up to
  ``max_epochs`` with early stopping (``patience``) for every seed: a plain :func:`fit`.
- ``halving``: asynchronous successive halving, Optuna's ``SuccessiveHalvingPruner``. A
  candidate is one ``max_epochs`` run reporting its validation score every epoch; at each rung
  (``min_epochs * eta**r`` epochs) it goes on only if among the best ``1/eta`` of the scores
  reported there so far, so promoted candidates continue and no worker waits for a rung to
  fill. Candidates that reach ``max_epochs`` train the other seeds. A genome already evaluated
  is looked up, not retrained (the validation split is fixed, so the result would be the same).

Compute is counted in epoch-equivalents: FLOPs actually run over those of one forward and
backward pass of the whole model over the training split, with backward = 2 x forward (so a
forward pass is 1/3). With first trainable block ``k``, ``s_k`` the share of the forward FLOPs
from block ``k`` on (torch's ``FlopCounterMode`` per segment; parameter shares for families
without segments) and ``v = n_val / n_train``, one epoch and its validation pass cost
``(1 + 2 s_k) / 3 + v / 3`` uncached (the frozen prefix runs forward only) and
``s_k (1 + v / 3)`` cached; filling the cache costs ``(1 - s_k) / 3 * (1 + v)``, once per
process and prefix (see :class:`~medtl.finetune.prefix.Cuts`).

The package: :mod:`~medtl.finetune.search.config` (the recipe section, presets, rungs),
:mod:`~medtl.finetune.search.sampler` (the evolution as an Optuna sampler),
:mod:`~medtl.finetune.search.study` (the study's storage, its typed rows, workers' claims),
:mod:`~medtl.finetune.search.candidate` (training one candidate),
:mod:`~medtl.finetune.search.driver` (workers and one candidate's run) and
:mod:`~medtl.finetune.search.results` (ranking, the best genome, ``trials.csv``,
``search.png``, and :func:`read_search`, the read API that compares finished searches).

The study lives in a SQLite file (``storage = "sqlite:///PATH"``) or a PostgreSQL database
(``postgresql://...``) that workers on many machines share. A stopped or killed search resumes
where it was; with one worker it reaches the same result, as every random choice is seeded
from ``(seed, generation)`` and training is deterministic. The test split is never read here;
:func:`biotune_search` retrains the best genome with :func:`~medtl.finetune.loop.finetune`,
which writes test predictions once, after the choice.
"""

from __future__ import annotations

from medtl.finetune.search.candidate import Runner, Search, SearchTask
from medtl.finetune.search.config import (
    PRESETS,
    RETRAIN_ONLY,
    BioTuneConfig,
    Rung,
    first_trainable,
    generation_epochs,
    genome_key,
    rungs,
    warmup_note,
)
from medtl.finetune.search.driver import (
    Candidate,
    biotune_search,
    finished,
    next_candidate,
    open_study,
    pruner,
    retrain_best,
    retrain_genome,
    run_search,
    run_worker,
    search_to_the_end,
    work,
)
from medtl.finetune.search.results import (
    SearchRecord,
    SearchResult,
    Standing,
    cost_to_reach,
    knowledge,
    per_generation,
    plot_search,
    ranking,
    read_search,
    stage_curve,
    summarise,
    write_trials_csv,
)
from medtl.finetune.search.sampler import BioTuneSampler, gene_names
from medtl.finetune.search.study import (
    RESULT_FIELDS,
    SQLITE,
    SearchStudy,
    Trial,
    connect,
    identity,
    load_study,
    masked,
    read_trials,
    storage_url,
    trial_rows,
    worker_id,
)

__all__ = [
    "PRESETS",
    "RESULT_FIELDS",
    "RETRAIN_ONLY",
    "SQLITE",
    "BioTuneConfig",
    "BioTuneSampler",
    "Candidate",
    "Rung",
    "Runner",
    "Search",
    "SearchRecord",
    "SearchResult",
    "SearchStudy",
    "SearchTask",
    "Standing",
    "Trial",
    "biotune_search",
    "connect",
    "cost_to_reach",
    "finished",
    "first_trainable",
    "gene_names",
    "generation_epochs",
    "genome_key",
    "identity",
    "knowledge",
    "load_study",
    "masked",
    "next_candidate",
    "open_study",
    "per_generation",
    "plot_search",
    "pruner",
    "ranking",
    "read_search",
    "read_trials",
    "retrain_best",
    "retrain_genome",
    "run_search",
    "run_worker",
    "rungs",
    "search_to_the_end",
    "stage_curve",
    "storage_url",
    "summarise",
    "trial_rows",
    "warmup_note",
    "work",
    "worker_id",
    "write_trials_csv",
]  # fmt: skip
