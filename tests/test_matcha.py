"""MATCHA: random matchings under a budget (Wang et al., arXiv:1905.09435)."""

import itertools

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.algorithms.matcha import (
    MatchaSchedule,
    activation_probabilities,
    algebraic_connectivity,
    best_alpha,
    expected_laplacian_moments,
    matching_laplacians,
)

GRAPHS = {
    "ring8": nx.cycle_graph(8),
    "petersen": nx.petersen_graph(),
    "er16": nx.erdos_renyi_graph(16, 0.4, seed=1),
}


def _laplacian(n, edges):
    lap = np.zeros((n, n))
    for a, b in edges:
        lap[a, a] += 1
        lap[b, b] += 1
        lap[a, b] -= 1
        lap[b, a] -= 1
    return lap


class TestConstructor:
    def test_importable_from_package(self):
        algo = coopsgd.matcha(nx.cycle_graph(6), 0.5)
        assert isinstance(algo, coopsgd.Algorithm)
        assert isinstance(algo.mixing, MatchaSchedule)
        assert algo.tau == 1 and algo.v == 0 and algo.m == 6
        assert not algo.is_static and algo.symmetric

    @pytest.mark.parametrize("budget", [0, -0.1, 1.01, 2, float("nan"), "half"])
    def test_budget_outside_unit_interval(self, budget):
        with pytest.raises(ValueError, match="budget"):
            coopsgd.matcha(nx.cycle_graph(6), budget)

    def test_disconnected_graph(self):
        graph = nx.union(nx.cycle_graph(3), nx.cycle_graph(3), rename=("a", "b"))
        with pytest.raises(ValueError, match="connected"):
            coopsgd.matcha(nx.convert_node_labels_to_integers(graph), 0.5)

    def test_negative_seed(self):
        with pytest.raises(ValueError, match="seed"):
            coopsgd.matcha(nx.cycle_graph(6), 0.5, seed=-1)


class TestMatchings:
    def test_laplacians_written_out(self):
        lap = matching_laplacians(4, [[(0, 1), (2, 3)], [(1, 2)]])
        expected0 = np.array([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, -1], [0, 0, -1, 1]], float)
        expected1 = np.array([[0, 0, 0, 0], [0, 1, -1, 0], [0, -1, 1, 0], [0, 0, 0, 0]], float)
        np.testing.assert_array_equal(lap[0], expected0)
        np.testing.assert_array_equal(lap[1], expected1)

    @pytest.mark.parametrize("name", GRAPHS)
    def test_laplacians_square_to_twice_themselves_and_sum_to_graph(self, name):
        sched = MatchaSchedule(GRAPHS[name], 0.5)
        for lap in sched.laplacians:
            np.testing.assert_allclose(lap @ lap, 2 * lap)
        np.testing.assert_allclose(sched.laplacians.sum(0), nx.laplacian_matrix(sched.graph).toarray())


class TestProbabilities:
    @pytest.mark.parametrize("name", GRAPHS)
    @pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.8])
    def test_mean_activation_within_budget(self, name, budget):
        sched = MatchaSchedule(GRAPHS[name], budget)
        p = sched.probabilities
        assert np.all(p >= 0) and np.all(p <= 1)
        assert sched.mean_activation <= budget + 1e-9
        # lambda_2 is non-decreasing in each p_j, so the optimum spends the whole budget
        assert sched.mean_activation == pytest.approx(budget, abs=1e-6)

    def test_full_budget_activates_everything(self):
        sched = MatchaSchedule(GRAPHS["er16"], 1.0)
        np.testing.assert_array_equal(sched.probabilities, np.ones(sched.num_matchings))
        for r in range(5):
            np.testing.assert_allclose(
                sched.at(r), np.eye(16) - sched.alpha * nx.laplacian_matrix(sched.graph).toarray()
            )

    def test_not_worse_than_uniform_and_beats_random_feasible_points(self):
        sched = MatchaSchedule(GRAPHS["er16"], 0.5)
        lap = sched.laplacians
        got = algebraic_connectivity(sched.expected_laplacian())
        uniform = algebraic_connectivity(np.tensordot(np.full(len(lap), 0.5), lap, axes=1))
        assert got > uniform + 0.1  # the irregular graph rewards unequal probabilities
        rng = np.random.default_rng(0)
        for _ in range(200):
            q = rng.random(len(lap))
            q *= min(1.0, 0.5 * len(lap) / q.sum())
            assert algebraic_connectivity(np.tensordot(q, lap, axes=1)) <= got + 1e-9

    def test_path_graph_hand_solution(self):
        # Path 0-1-2: two matchings {01}, {12}; by symmetry p = (C_b, C_b) is optimal, and
        # E[L] = C_b * L_path has lambda_2 = C_b * 1.
        lap = matching_laplacians(3, [[(0, 1)], [(1, 2)]])
        p = activation_probabilities(lap, 0.4)
        np.testing.assert_allclose(p, [0.4, 0.4], atol=1e-6)
        assert algebraic_connectivity(np.tensordot(p, lap, axes=1)) == pytest.approx(0.4, abs=1e-6)


class TestAlpha:
    def test_moments_against_enumeration(self):
        sched = MatchaSchedule(GRAPHS["petersen"], 0.3)
        p, lap = sched.probabilities, sched.laplacians
        mean = np.zeros_like(lap[0])
        second = np.zeros_like(lap[0])
        gram = np.zeros_like(lap[0])
        for bits in itertools.product([0, 1], repeat=len(p)):
            prob = np.prod([pj if b else 1 - pj for pj, b in zip(p, bits)])
            l_k = sum(b * lj for b, lj in zip(bits, lap))
            w = np.eye(len(mean)) - sched.alpha * l_k
            mean += prob * l_k
            second += prob * l_k @ l_k
            gram += prob * w.T @ w
        got_mean, got_second = expected_laplacian_moments(lap, p)
        np.testing.assert_allclose(got_mean, mean, atol=1e-12)
        np.testing.assert_allclose(got_second, second, atol=1e-12)
        np.testing.assert_allclose(sched.expected_gram(), gram, atol=1e-12)

    def test_alpha_minimises_contraction(self):
        sched = MatchaSchedule(GRAPHS["er16"], 0.5)
        rho = sched.contraction()
        assert 0 < rho < 1
        _, rho_search = best_alpha(sched.laplacians, sched.probabilities)
        assert rho == pytest.approx(rho_search, abs=1e-9)
        for alpha in np.linspace(0.01, 1.0, 100):
            other = MatchaSchedule(GRAPHS["er16"], 0.5, probabilities=sched.probabilities, alpha=alpha)
            assert other.contraction() >= rho - 1e-9

    def test_single_edge_hand_value(self):
        # One edge, p = 1: W = I - alpha L with L = [[1,-1],[-1,1]] has eigenvalue 1 - 2 alpha, so
        # alpha = 1/2 gives exact averaging and rho = 0.
        sched = MatchaSchedule(nx.path_graph(2), 1.0)
        assert sched.alpha == pytest.approx(0.5, abs=1e-8)
        np.testing.assert_allclose(sched.at(0), np.full((2, 2), 0.5), atol=1e-8)
        assert sched.contraction() == pytest.approx(0.0, abs=1e-7)

    def test_single_edge_half_budget_hand_value(self):
        # p = 1/2 on one edge: E[W^2] - J has eigenvalue 1 - 2 alpha*(1/2)*2 + alpha^2 * E[l^2] on
        # the difference vector, with l in {0, 2}: E[l^2] = 2; so rho(a) = 1 - 2a + 2a^2, min at
        # a = 1/2, rho = 1/2.
        sched = MatchaSchedule(nx.path_graph(2), 0.5)
        np.testing.assert_allclose(sched.probabilities, [0.5])
        assert sched.alpha == pytest.approx(0.5, abs=1e-7)
        assert sched.contraction() == pytest.approx(0.5, abs=1e-9)


class TestDraws:
    @pytest.mark.parametrize("name", GRAPHS)
    def test_every_w_symmetric_doubly_stochastic_on_the_graph(self, name):
        algo = coopsgd.matcha(GRAPHS[name], 0.4, seed=3)
        sched = algo.mixing
        for k in range(30):
            w = algo.mixing_at(k)
            mixing.check(w, n=algo.n, symmetric=True)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
            assert np.all(np.asarray(sched.support)[np.asarray(w) != 0])
            np.testing.assert_allclose(w, np.eye(algo.n) - sched.alpha * sched.laplacian_at(k))

    def test_w_is_identity_minus_alpha_times_active_matchings(self):
        sched = MatchaSchedule(GRAPHS["ring8"], 0.5, seed=11)
        for r in range(10):
            active = np.random.default_rng([11, r]).random(sched.num_matchings) < sched.probabilities
            lap = sum(_laplacian(8, edges) for edges, on in zip(sched.matchings, active) if on)
            np.testing.assert_allclose(sched.at(r), np.eye(8) - sched.alpha * lap)

    def test_same_seed_same_draws_in_any_order(self):
        a = MatchaSchedule(GRAPHS["er16"], 0.5, seed=7)
        b = MatchaSchedule(GRAPHS["er16"], 0.5, seed=7)
        forward = [a.at(r) for r in range(20)]
        backward = [b.at(r) for r in reversed(range(20))][::-1]
        for x, y in zip(forward, backward):
            np.testing.assert_array_equal(x, y)
        c = MatchaSchedule(GRAPHS["er16"], 0.5, seed=8)
        assert any(not np.array_equal(a.at(r), c.at(r)) for r in range(20))

    def test_empirical_activation_rate_matches_probabilities(self):
        sched = MatchaSchedule(GRAPHS["er16"], 0.3, seed=0)
        draws = np.array([sched.active(r) for r in range(4000)])
        np.testing.assert_allclose(draws.mean(0), sched.probabilities, atol=0.04)
        assert draws.mean() <= 0.3 + 0.02

    def test_empirical_gram_matches_expected_gram(self):
        sched = MatchaSchedule(GRAPHS["ring8"], 0.5, seed=0)
        grams = [sched.at(r).T @ sched.at(r) for r in range(4000)]
        np.testing.assert_allclose(np.mean(grams, axis=0), sched.expected_gram(), atol=0.03)

    def test_zeta_is_sqrt_contraction(self):
        algo = coopsgd.matcha(GRAPHS["petersen"], 0.5)
        assert algo.zeta == pytest.approx(np.sqrt(algo.mixing.contraction()))
        assert 0 < algo.zeta < 1
        assert isinstance(algo.mixing, schedules.MixingSchedule) and algo.mixing.cycle is None


class TestOnTheEngine:
    def test_engine_applies_the_drawn_w_each_step(self):
        engine = pytest.importorskip("coopsgd.parallel.trainer")
        import jax.numpy as jnp
        import optax

        algo = coopsgd.matcha(GRAPHS["ring8"], 0.5, seed=5)
        trainer = engine.CooperativeSGD(algo, optax.sgd(0.0), lambda p, b: jnp.sum(p["w"]) * 0.0)
        state = trainer.init({"w": jnp.zeros(2)})
        x0 = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
        state = state._replace(params={"w": jnp.asarray(x0)})
        batch = {"x": np.zeros((6, 8, 1), np.float32)}
        state, metrics = trainer.run(state, batch, 6)
        expected = x0.astype(np.float64)
        for k in range(6):
            expected = algo.mixing_at(k).T @ expected  # new[j] = sum_i W[i, j] old[i]
        np.testing.assert_allclose(np.asarray(trainer.workers(state)["w"]), expected, rtol=1e-5, atol=1e-5)

    def test_agrees_with_theory_matching_contraction(self):
        from coopsgd.analysis import theory

        algo = coopsgd.matcha(GRAPHS["er16"], 0.3)
        sched = algo.mixing
        expected = theory.matching_contraction(list(sched.laplacians), sched.probabilities, sched.alpha)
        assert sched.contraction() == pytest.approx(expected, abs=1e-10)
        assert theory.contraction(algo) == pytest.approx(expected, abs=1e-10)


class TestRandomGraphs:
    """Invariants on random connected graphs (hypothesis)."""

    @staticmethod
    def _graph(n, p, seed):
        graph = nx.gnp_random_graph(n, p, seed=seed)
        graph.add_edges_from((i, i + 1) for i in range(n - 1))  # a path keeps it connected
        return graph

    def test_invariants(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=10, deadline=None)
        @given(st.integers(3, 10), st.floats(0.0, 0.8), st.integers(0, 10**6),
               st.floats(0.05, 1.0), st.integers(0, 2**31 - 1), st.integers(0, 10**9))
        def check(n, p, graph_seed, budget, seed, r):
            sched = MatchaSchedule(self._graph(n, p, graph_seed), budget, seed)
            assert sched.mean_activation <= budget + 1e-9
            assert np.all((sched.probabilities >= 0) & (sched.probabilities <= 1))
            w = sched.at(r)
            mixing.check(w, n=n, symmetric=True)
            twin = MatchaSchedule(sched.graph, budget, seed, probabilities=sched.probabilities, alpha=sched.alpha)
            np.testing.assert_array_equal(w, twin.at(r))
            assert 0 <= sched.contraction() < 1

        check()


@pytest.mark.parametrize("q, total, expected", [
    ([0.9, 0.5, 0.2], 1.0, [0.7, 0.3, 0.0]),  # Σ(q − μ) = 1: μ = 0.2
    ([1.8, 0.6, 0.4], 1.5, [1.0, 0.35, 0.15]),  # the first stays at its bound 1: 1 + (1 − 2μ) = 1.5, μ = 0.25
    ([0.3, 0.2], 1.0, [0.3, 0.2]),  # within the budget: only clipped
    ([-0.5, 1.4], 2.0, [0.0, 1.0]),
])
def test_budget_projection_solves_its_kkt_conditions(q, total, expected):
    from coopsgd.algorithms.matcha import _project_budget

    np.testing.assert_allclose(_project_budget(np.array(q), total), expected, atol=1e-12)


def test_the_probabilities_are_solved_once_per_graph_and_budget(monkeypatch):
    from coopsgd.algorithms import matcha as matcha_module

    solved = []
    real = matcha_module._ascent
    monkeypatch.setattr(matcha_module, "_ascent", lambda *a: solved.append(1) or real(*a))
    graph = nx.random_regular_graph(3, 10, seed=7)  # a graph no other test solves for
    first = np.array(coopsgd.matcha(graph, budget=0.3).mixing.probabilities)
    again = coopsgd.matcha(graph, budget=0.3).mixing.probabilities
    other = coopsgd.matcha(graph, budget=0.6).mixing.probabilities
    assert len(solved) == 2  # the second build reused the first solve; another budget solved anew
    np.testing.assert_array_equal(again, first)
    assert other.sum() > again.sum()  # a larger budget activates more
    lap = coopsgd.matcha(graph, budget=0.3).mixing.laplacians
    mine = activation_probabilities(lap, 0.3)
    mine[:] = -1.0  # the caller's own copy: the next call must not see it
    np.testing.assert_array_equal(activation_probabilities(lap, 0.3), first)
    assert len(solved) == 2
