"""BioTune's evolutionary operators: pure functions on genomes, for :mod:`medtl.finetune.search`.

A genome is a float array in [0, 1]: one gene per block of the backbone (stem .. head, as
:func:`~medtl.finetune.blocks.blocks_of` orders them) and a threshold gene last; a population is
an array ``[N, L]``. Every random choice takes a seeded ``np.random.Generator``, so a generation
follows from ``(seed, generation, previous fitness)`` alone; that is what lets an interrupted
search resume to the same result. Genes are clipped to [0, 1] and rounded to
:data:`GENE_DECIMALS` places, so a genome survives a JSON round trip bit for bit and the trial
store can look it up.

Populations are ordered best first (``order[0]`` is the index of the best member); the rank of a
member is its position in that order. The next generation (:func:`next_generation`) is made of:

- the ``elite`` best distinct members, unchanged;
- ``exploit`` perturbations of the elites: every gene plus ``N(0, exploit_sigma)``;
- offspring: two parents by linear rank selection (:func:`rank_probabilities`), per-gene blend
  crossover (BLX-alpha, :func:`blend_crossover`), then Gaussian mutation whose size grows with
  the parents' *extinction probability* (:func:`extinction_probability`);
- random immigrants (uniform genomes) when the mating pool runs dry: half of the offspring
  slots when the population is degenerate (:func:`degenerate`), and any child that still
  duplicates a known genome after ``retries`` attempts.

Two objectives (fitness, trainable fraction) are ranked by non-dominated sorting with crowding
distance, as NSGA-II does (:func:`order_candidates`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

GENE_DECIMALS = 6
ELITE, EXPLOIT, OFFSPRING, IMMIGRANT, RANDOM = (
    "elite",
    "exploit",
    "offspring",
    "immigrant",
    "random",
)


@dataclass(frozen=True)
class Operators:
    """Settings of the operators (see the module docstring); checked on creation."""

    elite: int
    exploit: int = 1
    selection_pressure: float = 1.8  # expected offspring of the best member, in [1, 2]
    blx_alpha: float = 0.5
    mutation_rate: float = 0.25  # probability that a gene mutates
    sigma_min: float = 0.02  # mutation std for parents of extinction probability 0 (the best)
    sigma_max: float = 0.25  # ... and 1 (the worst)
    exploit_sigma: float = 0.05
    diversity_min: float = 0.02  # mean per-gene std below which the pool is degenerate
    retries: int = 3

    def __post_init__(self) -> None:
        if self.elite < 1 or self.exploit < 0 or self.retries < 0:
            raise ValueError(
                f"bad operators: elite={self.elite}, exploit={self.exploit}, retries={self.retries}"
            )
        if not 1.0 <= self.selection_pressure <= 2.0:
            raise ValueError(f"selection_pressure must be in [1, 2], got {self.selection_pressure}")
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(
                f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )


def canonical(genomes: np.ndarray) -> np.ndarray:
    """``genomes`` clipped to [0, 1] and rounded to :data:`GENE_DECIMALS` places (float64)."""
    return np.round(np.clip(np.asarray(genomes, dtype=np.float64), 0.0, 1.0), GENE_DECIMALS)


def random_genomes(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, length]`` uniform genomes: the first generation and the immigrants."""
    return canonical(rng.uniform(0.0, 1.0, size=(n, length)))


# -- selection ---------------------------------------------------------------------------------
def rank_probabilities(n: int, pressure: float) -> np.ndarray:
    """Linear ranking (Baker 1985): ``p[r] = (s - 2 (s - 1) r / (n - 1)) / n`` for rank ``r``
    (0 = best) and pressure ``s`` in [1, 2]; the best member is chosen ``s`` times as often as
    the average, the worst ``2 - s`` times. Depends on ranks only, not on fitness values."""
    if n < 1:
        raise ValueError(f"need at least one member, got {n}")
    if n == 1:
        return np.ones(1)
    r = np.arange(n, dtype=np.float64)
    p = (pressure - 2.0 * (pressure - 1.0) * r / (n - 1)) / n
    return p / p.sum()


def select_parents(order: np.ndarray, pressure: float, rng: np.random.Generator) -> tuple[int, int]:
    """Two population indices by rank selection, distinct when the population has two members."""
    p = rank_probabilities(len(order), pressure)
    first = int(rng.choice(len(order), p=p))
    if len(order) == 1:
        return int(order[0]), int(order[0])
    rest = np.delete(np.arange(len(order)), first)
    second = int(rng.choice(rest, p=p[rest] / p[rest].sum()))
    return int(order[first]), int(order[second])


def extinction_probability(order: np.ndarray) -> np.ndarray:
    """Per member: the fraction of the *other* members ranked better, ``rank / (N - 1)``.

    0 for the best member, 1 for the worst: how likely the member's line is to die out under
    rank selection and elitism. Parents likely to go extinct are mutated more (exploration), the
    best ones less (exploitation).
    """
    n = len(order)
    eps = np.zeros(n)
    eps[np.asarray(order, dtype=int)] = np.arange(n) / max(n - 1, 1)
    return eps


# -- variation ---------------------------------------------------------------------------------
def blend_crossover(
    a: np.ndarray, b: np.ndarray, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """BLX-alpha (Eshelman & Schaffer 1993): each gene uniform in
    ``[min - alpha d, max + alpha d]`` with ``d = |a - b|``, then clipped to [0, 1]."""
    low, high = np.minimum(a, b), np.maximum(a, b)
    spread = alpha * (high - low)
    return canonical(rng.uniform(low - spread, high + spread))


def mutation_sigma(extinction: float, ops: Operators) -> float:
    """Mutation std for a child whose parents have mean extinction probability ``extinction``:
    ``sigma_min + (sigma_max - sigma_min) * extinction``."""
    return ops.sigma_min + (ops.sigma_max - ops.sigma_min) * float(extinction)


def mutate(genome: np.ndarray, sigma: float, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each gene, with probability ``rate``, plus ``N(0, sigma)``; clipped to [0, 1]."""
    hit = rng.random(genome.shape) < rate
    noise = rng.normal(0.0, sigma, size=genome.shape)
    return canonical(genome + hit * noise)


def exploit(elite: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A small Gaussian step around an elite: every gene plus ``N(0, sigma)``."""
    return canonical(elite + rng.normal(0.0, sigma, size=elite.shape))


# -- diversity ------------------------------------------------------------------------------------
def diversity(population: np.ndarray) -> float:
    """Mean over genes of the population's standard deviation (0 for identical members)."""
    return float(np.asarray(population, dtype=np.float64).std(axis=0).mean())


def is_duplicate(genome: np.ndarray, others: np.ndarray | list[np.ndarray]) -> bool:
    """Whether ``genome`` equals one of ``others`` after :func:`canonical` rounding."""
    known = np.asarray(others, dtype=np.float64).reshape(-1, len(genome))
    return bool(len(known)) and bool(np.any(np.all(known == canonical(genome), axis=1)))


def degenerate(population: np.ndarray, threshold: float) -> bool:
    """The mating pool has run dry: fewer than two distinct members, or diversity below
    ``threshold``."""
    distinct = np.unique(canonical(population), axis=0)
    return len(distinct) < 2 or diversity(population) < threshold


# -- the next generation ------------------------------------------------------------------------
def next_generation(
    population: np.ndarray, order: np.ndarray, ops: Operators, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """The next population ``[N, L]`` and each member's origin (``elite``, ``exploit``,
    ``offspring``, ``immigrant``), from ``population`` ordered best first by ``order``."""
    pop = canonical(population)
    n, length = pop.shape
    order = np.asarray(order, dtype=int)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}), got {order.tolist()}")
    kids = _elites(pop, order, min(ops.elite, n))
    elite = len(kids)
    origins = [ELITE] * elite
    for j in range(min(ops.exploit, n - elite)):
        step = partial(exploit, kids[j % elite], ops.exploit_sigma, rng)
        _add(kids, origins, step, EXPLOIT, pop, ops, rng)
    slots = n - len(kids)
    immigrants = max(1, math.ceil(slots / 2)) if slots and degenerate(pop, ops.diversity_min) else 0
    eps = extinction_probability(order)
    for _ in range(slots - immigrants):
        _add(
            kids, origins, partial(_offspring, pop, order, eps, ops, rng), OFFSPRING, pop, ops, rng
        )
    for _ in range(immigrants):
        kids.append(random_genomes(1, length, rng)[0])
        origins.append(IMMIGRANT)
    return np.stack(kids), origins


def _elites(pop: np.ndarray, order: np.ndarray, count: int) -> list[np.ndarray]:
    """The best ``count`` distinct members (a copy of an elite is no second elite)."""
    chosen: list[np.ndarray] = []
    for i in order:
        if len(chosen) < count and not is_duplicate(pop[i], chosen):
            chosen.append(pop[i])
    return chosen


def _offspring(
    pop: np.ndarray, order: np.ndarray, eps: np.ndarray, ops: Operators, rng: np.random.Generator
) -> np.ndarray:
    """Rank-selected parents, blend crossover, extinction-scaled mutation."""
    a, b = select_parents(order, ops.selection_pressure, rng)
    child = blend_crossover(pop[a], pop[b], ops.blx_alpha, rng)
    sigma = mutation_sigma((eps[a] + eps[b]) / 2.0, ops)
    return mutate(child, sigma, ops.mutation_rate, rng)


def _add(
    kids: list[np.ndarray],
    origins: list[str],
    make: Callable[[], np.ndarray],
    origin: str,
    pop: np.ndarray,
    ops: Operators,
    rng: np.random.Generator,
) -> None:
    """Append ``make()``, retried while it duplicates a member of ``pop`` or ``kids``; an
    immigrant takes the slot when every try was a duplicate."""
    for _ in range(ops.retries + 1):
        child = make()
        if not is_duplicate(child, [*pop, *kids]):
            kids.append(child)
            origins.append(origin)
            return
    kids.append(random_genomes(1, pop.shape[1], rng)[0])
    origins.append(IMMIGRANT)


# -- ranking ----------------------------------------------------------------------------------------
def non_dominated_sort(points: np.ndarray) -> list[list[int]]:
    """Pareto fronts of ``points [M, K]`` (every objective minimised), best front first; indices
    ascending within a front. ``a`` dominates ``b`` when no worse in every objective and better
    in one."""
    pts = np.asarray(points, dtype=np.float64)
    remaining = list(range(len(pts)))
    fronts: list[list[int]] = []
    while remaining:
        front = [i for i in remaining if not any(_dominates(pts[j], pts[i]) for j in remaining)]
        fronts.append(front)
        remaining = [i for i in remaining if i not in front]
    return fronts


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point of one front: the sum over objectives of the
    normalised gap between its neighbours; infinite at each objective's extremes."""
    pts = np.asarray(points, dtype=np.float64)
    m = len(pts)
    dist = np.zeros(m)
    if m <= 2:
        return np.full(m, np.inf)
    for k in range(pts.shape[1]):
        idx = np.argsort(pts[:, k], kind="stable")
        span = pts[idx[-1], k] - pts[idx[0], k]
        dist[idx[0]] = dist[idx[-1]] = np.inf
        if span > 0:
            dist[idx[1:-1]] += (pts[idx[2:], k] - pts[idx[:-2], k]) / span
    return dist


def order_candidates(fidelity: np.ndarray, objectives: np.ndarray) -> np.ndarray:
    """Indices best first: higher ``fidelity`` (e.g. the successive-halving rung reached) first;
    within one fidelity, by the first objective (one column) or by Pareto front and then
    crowding distance (two columns); ties by the first objective, then by index."""
    fid = np.asarray(fidelity)
    obj = np.asarray(objectives, dtype=np.float64).reshape(len(fid), -1)
    front = np.zeros(len(fid))
    crowd = np.zeros(len(fid))
    if obj.shape[1] > 1:
        for level in np.unique(fid):
            members = np.flatnonzero(fid == level)
            for f, idx in enumerate(non_dominated_sort(obj[members])):
                front[members[idx]] = f
                crowd[members[idx]] = crowding_distance(obj[members[idx]])
    keys = (np.arange(len(fid)), obj[:, 0], -crowd, front, -fid)
    return np.lexsort(keys)


def pareto_front(points: np.ndarray) -> list[int]:
    """Indices of the non-dominated points of ``points [M, K]`` (all objectives minimised)."""
    return non_dominated_sort(points)[0] if len(points) else []
