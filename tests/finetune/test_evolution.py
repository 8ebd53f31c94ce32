"""BioTune's evolutionary operators: bounds, determinism, selection pressure, immigrants, Pareto."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.finetune import evolution as ea

OPS = ea.Operators(elite=2, exploit=1)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _population(n: int = 8, length: int = 6, seed: int = 1) -> np.ndarray:
    return ea.random_genomes(n, length, _rng(seed))


# -- bounds and determinism ----------------------------------------------------------------------
def test_every_operator_keeps_genes_in_the_unit_interval() -> None:
    rng = _rng()
    edges = np.array([[0.0, 1.0, 0.0, 1.0, 0.5], [1.0, 0.0, 1.0, 0.0, 0.5]])
    for _ in range(200):
        a, b = edges[0], edges[1]
        children = [
            ea.blend_crossover(a, b, alpha=2.0, rng=rng),
            ea.mutate(a, sigma=5.0, rate=1.0, rng=rng),
            ea.exploit(b, sigma=5.0, rng=rng),
            ea.random_genomes(3, 5, rng),
        ]
        for child in children:
            assert child.min() >= 0.0 and child.max() <= 1.0
    new, _ = ea.next_generation(edges.repeat(3, axis=0), np.arange(6), OPS, rng)
    assert new.min() >= 0.0 and new.max() <= 1.0


def test_next_generation_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    pop = _population()
    order = np.argsort(pop[:, 0])
    first = ea.next_generation(pop, order, OPS, _rng(7))
    again = ea.next_generation(pop, order, OPS, _rng(7))
    other = ea.next_generation(pop, order, OPS, _rng(8))
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1]
    assert not np.array_equal(first[0], other[0])


def test_genes_are_rounded_so_that_a_json_round_trip_is_exact() -> None:
    import json

    genome = ea.canonical(np.array([0.1234567891, 1.7, -0.2]))
    assert genome.tolist() == [0.123457, 1.0, 0.0]
    assert json.loads(json.dumps(genome.tolist())) == genome.tolist()


def test_next_generation_keeps_the_elites_first_and_unchanged() -> None:
    pop = _population()
    order = np.array([5, 2, 0, 1, 3, 4, 6, 7])
    new, origins = ea.next_generation(pop, order, OPS, _rng())
    np.testing.assert_array_equal(new[:2], pop[[5, 2]])
    assert origins[:3] == [ea.ELITE, ea.ELITE, ea.EXPLOIT]
    assert len(new) == len(pop) and len(origins) == len(pop)
    assert np.abs(new[2] - pop[5]).max() < 0.3  # a small step around the best elite


def test_rejects_an_order_that_is_not_a_permutation() -> None:
    with pytest.raises(ValueError, match="permutation"):
        ea.next_generation(_population(4), np.array([0, 0, 1, 2]), OPS, _rng())


# -- selection -----------------------------------------------------------------------------------
def test_rank_probabilities_follow_linear_ranking() -> None:
    p = ea.rank_probabilities(5, pressure=1.8)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(1.8 / 5) and p[-1] == pytest.approx(0.2 / 5)
    assert np.all(np.diff(p) < 0)
    np.testing.assert_allclose(ea.rank_probabilities(4, pressure=1.0), 0.25)


def test_rank_selection_prefers_better_ranks_statistically() -> None:
    order = np.array([3, 0, 4, 1, 2])  # member 3 is best, member 2 worst
    rng = _rng(3)
    counts = np.zeros(5)
    draws = 4000
    for _ in range(draws):
        a, b = ea.select_parents(order, 1.8, rng)
        assert a != b
        counts[a] += 1
    by_rank = counts[order] / draws
    expected = ea.rank_probabilities(5, 1.8)
    np.testing.assert_allclose(by_rank, expected, atol=0.03)
    assert by_rank[0] > 3 * by_rank[-1]


def test_extinction_probability_is_the_share_of_members_ranked_better() -> None:
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(ea.extinction_probability(order), [1 / 3, 1.0, 0.0, 2 / 3])


def test_children_of_likely_extinct_parents_mutate_more() -> None:
    genome = np.full(200, 0.5)
    calm = ea.mutate(genome, ea.mutation_sigma(0.0, OPS), 1.0, _rng(1))
    wild = ea.mutate(genome, ea.mutation_sigma(1.0, OPS), 1.0, _rng(1))
    assert np.std(calm - 0.5) == pytest.approx(OPS.sigma_min, rel=0.25)
    assert np.std(wild - 0.5) > 5 * np.std(calm - 0.5)


def test_blend_crossover_spans_the_parents_and_alpha_beyond() -> None:
    a, b = np.full(4000, 0.4), np.full(4000, 0.6)
    child = ea.blend_crossover(a, b, alpha=0.5, rng=_rng())
    assert child.min() >= 0.3 - 1e-9 and child.max() <= 0.7 + 1e-9
    assert child.min() < 0.32 and child.max() > 0.68
    np.testing.assert_array_equal(ea.blend_crossover(a, a, 0.5, _rng()), a)


# -- immigrants ------------------------------------------------------------------------------------
def test_immigrants_arrive_when_the_pool_is_degenerate() -> None:
    clones = np.tile(np.array([0.2, 0.7, 0.4, 0.9]), (6, 1))
    assert ea.degenerate(clones, OPS.diversity_min)
    new, origins = ea.next_generation(clones, np.arange(6), OPS, _rng())
    assert origins.count(ea.ELITE) == 1  # one distinct member: one elite
    assert origins.count(ea.IMMIGRANT) >= 2
    assert ea.diversity(new) > ea.diversity(clones)
    assert len(np.unique(new, axis=0)) == 6  # no child duplicates another member


def test_a_diverse_pool_breeds_offspring_not_immigrants() -> None:
    pop = _population(10, 8, seed=4)
    assert not ea.degenerate(pop, OPS.diversity_min)
    _, origins = ea.next_generation(pop, np.arange(10), OPS, _rng())
    assert origins.count(ea.OFFSPRING) == 7 and ea.IMMIGRANT not in origins


def test_a_duplicate_child_is_replaced_by_an_immigrant() -> None:
    pair = np.array([[0.3, 0.3], [0.3, 0.3], [0.3, 0.3]])
    ops = ea.Operators(elite=1, exploit=0, mutation_rate=0.0, diversity_min=0.0, retries=2)
    _, origins = ea.next_generation(pair, np.arange(3), ops, _rng())
    assert origins == [ea.ELITE, ea.IMMIGRANT, ea.IMMIGRANT]


# -- Pareto ------------------------------------------------------------------------------------------
POINTS = np.array([[0.1, 0.9], [0.2, 0.5], [0.3, 0.6], [0.4, 0.1], [0.5, 0.5], [0.2, 0.5]])


def test_non_dominated_sort_on_a_hand_example() -> None:
    # (0.3, 0.6) and (0.5, 0.5) are dominated by (0.2, 0.5); equal points do not dominate.
    assert ea.non_dominated_sort(POINTS) == [[0, 1, 3, 5], [2, 4]]
    assert ea.pareto_front(POINTS) == [0, 1, 3, 5]
    assert ea.pareto_front(np.zeros((0, 2))) == []


def test_crowding_distance_on_a_hand_example() -> None:
    front = np.array([[0.0, 1.0], [0.25, 0.5], [0.5, 0.25], [1.0, 0.0]])
    dist = ea.crowding_distance(front)
    assert np.isinf(dist[0]) and np.isinf(dist[3])
    assert dist[1] == pytest.approx(0.5 / 1.0 + 0.75 / 1.0)
    assert dist[2] == pytest.approx(0.75 / 1.0 + 0.5 / 1.0)


def test_order_candidates_puts_higher_fidelity_first() -> None:
    fidelity = np.array([0, 1, 1, 0])
    fitness = np.array([[0.1], [0.5], [0.3], [0.2]])
    assert ea.order_candidates(fidelity, fitness).tolist() == [2, 1, 0, 3]


def test_order_candidates_with_two_objectives_uses_fronts() -> None:
    points = POINTS[:5]
    order = ea.order_candidates(np.zeros(5), points).tolist()
    assert set(order[:3]) == {0, 1, 3} and set(order[3:]) == {2, 4}
