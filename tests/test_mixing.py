import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import coopsgd
from coopsgd import mixing, topology

RULES = [mixing.metropolis, mixing.max_degree, mixing.best_constant]


@st.composite
def connected_graphs(draw):
    """Graph families of decentralized training, all connected."""
    family = draw(st.sampled_from(
        ["ring", "torus", "hypercube", "star", "complete", "random_regular", "erdos_renyi", "exponential"]
    ))
    if family == "ring":
        return nx.cycle_graph(draw(st.integers(3, 40)))
    if family == "torus":
        return nx.grid_2d_graph(draw(st.integers(3, 6)), draw(st.integers(3, 6)), periodic=True)
    if family == "hypercube":
        return nx.hypercube_graph(draw(st.integers(1, 6)))
    if family == "star":
        return nx.star_graph(draw(st.integers(1, 30)))
    if family == "complete":
        return nx.complete_graph(draw(st.integers(2, 20)))
    if family == "exponential":
        return topology.exponential(draw(st.integers(2, 40)))
    seed = draw(st.integers(0, 2**31 - 1))
    if family == "random_regular":
        n = draw(st.integers(4, 30))
        d = draw(st.integers(2, n - 1))
        assume(n * d % 2 == 0)
        graph = nx.random_regular_graph(d, n, seed=seed)
    else:
        graph = nx.gnp_random_graph(draw(st.integers(2, 30)), draw(st.floats(0.1, 0.9)), seed=seed)
    assume(nx.is_connected(graph))  # Erdős–Rényi / random regular conditioned on connectivity
    return graph


class TestWeightRules:
    @settings(max_examples=120, deadline=None)
    @given(connected_graphs(), st.sampled_from(RULES))
    def test_symmetric_doubly_stochastic_and_contracting(self, graph, rule):
        w = rule(graph)
        n = graph.number_of_nodes()
        assert w.shape == (n, n)
        np.testing.assert_allclose(w, w.T, atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=0), np.ones(n), atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=1), np.ones(n), atol=1e-12)
        # zero off the graph's edges
        adjacency = nx.to_numpy_array(topology.canonical(graph), nodelist=range(n)) != 0
        off = ~adjacency & ~np.eye(n, dtype=bool)
        assert np.all(w[off] == 0)
        if n > 1:
            assert coopsgd.zeta(w) < 1 - 1e-9  # connected graph: consensus

    @settings(max_examples=60, deadline=None)
    @given(connected_graphs())
    def test_metropolis_edge_weights(self, graph):
        g = topology.canonical(graph)
        w = mixing.metropolis(g)
        for i, j in g.edges:
            assert w[i, j] == pytest.approx(1 / (1 + max(g.degree[i], g.degree[j])))

    @settings(max_examples=60, deadline=None)
    @given(connected_graphs())
    def test_best_constant_zeta_formula(self, graph):
        assume(graph.number_of_nodes() > 1)
        lam = np.linalg.eigvalsh(nx.laplacian_matrix(topology.canonical(graph)).toarray())
        expected = (lam[-1] - lam[1]) / (lam[-1] + lam[1])
        assert coopsgd.zeta(mixing.best_constant(graph)) == pytest.approx(expected, abs=1e-9)
        # no other constant edge weight does better (Xiao & Boyd 2004, §4.1)
        lap = nx.laplacian_matrix(topology.canonical(graph)).toarray().astype(float)
        for alpha in np.linspace(0.01, 2 / lam[-1], 25):
            assert coopsgd.zeta(np.eye(len(lap)) - alpha * lap) >= expected - 1e-9

    def test_star_by_hand(self):
        # centre of degree 4, leaves of degree 1: every edge weighs 1/(1+4)
        w = mixing.metropolis(nx.star_graph(4))
        assert w[0, 0] == pytest.approx(1 / 5)
        assert w[1, 1] == pytest.approx(4 / 5)
        assert w[0, 3] == pytest.approx(1 / 5)
        w = mixing.max_degree(nx.star_graph(4))
        assert w[1, 1] == pytest.approx(1 - 1 / 5)

    def test_max_degree_on_path(self):
        # path 0-1-2: d_max = 2, edge weight 1/3
        w = mixing.max_degree(nx.path_graph(3))
        expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
        np.testing.assert_allclose(w, expected)

    def test_lazy_halves_the_eigenvalues_toward_one(self):
        w = mixing.metropolis(nx.cycle_graph(6))
        expected = np.sort((np.linalg.eigvalsh(w) + 1) / 2)
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(mixing.lazy(w))), expected, atol=1e-12)

    def test_from_graph_by_name(self):
        g = nx.cycle_graph(5)
        np.testing.assert_allclose(mixing.from_graph(g, "max_degree"), mixing.max_degree(g))
        np.testing.assert_allclose(mixing.from_graph(g, "lazy_metropolis"), mixing.lazy(mixing.metropolis(g)))
        with pytest.raises(ValueError, match="unknown weight rule 'metro'.*metropolis.*best_constant"):
            mixing.from_graph(g, "metro")


class TestZeta:
    @pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 16, 33])
    def test_ring_closed_form(self, n):
        # weights 1/3: eigenvalues 1/3 + 2/3 cos(2πk/n)
        expected = max(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n),
                       abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * (n // 2) / n)))
        w = mixing.metropolis(nx.cycle_graph(n))
        assert coopsgd.zeta(w) == pytest.approx(expected, abs=1e-12)
        assert coopsgd.spectral_gap(w) == pytest.approx(1 - expected, abs=1e-12)

    def test_averaging_has_zeta_zero(self):
        assert coopsgd.zeta(mixing.averaging(7)) == 0.0

    def test_identity_and_disconnected_have_zeta_one(self):
        assert coopsgd.zeta(np.eye(4)) == pytest.approx(1.0)
        two_pairs = np.kron(np.eye(2), np.full((2, 2), 0.5))
        assert coopsgd.zeta(two_pairs) == pytest.approx(1.0)

    def test_bipartite_without_self_weight(self):
        # a 4-cycle averaging only the two neighbours has eigenvalue -1
        w = 0.5 * nx.to_numpy_array(nx.cycle_graph(4))
        assert coopsgd.zeta(w) == pytest.approx(1.0)
        assert coopsgd.zeta(mixing.lazy(w)) == pytest.approx(0.5)

    def test_column_stochastic_non_symmetric(self):
        # Overlap Local-SGD's W_ov: eigenvalues 1, 1 - alpha (m - 1 times), 0
        m, alpha = 4, 0.6
        w = np.zeros((m + 1, m + 1))
        w[:m, :m] = (1 - alpha) * np.eye(m)
        w[:m, m] = (1 - alpha) / m
        w[m, :] = alpha
        assert coopsgd.zeta(w) == pytest.approx(1 - alpha)


class TestCheck:
    def test_accepts_and_freezes(self):
        w = mixing.check(np.full((3, 3), 1 / 3), symmetric=True)
        assert w.dtype == np.float64 and not np.asarray(w).flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            w[0, 0] = 1.0

    def test_not_square(self):
        with pytest.raises(ValueError, match="square.*\\(2, 3\\)"):
            mixing.check(np.ones((2, 3)) / 2)

    def test_wrong_size(self):
        with pytest.raises(ValueError, match="must be 4 x 4"):
            mixing.check(np.eye(3), n=4)

    def test_not_finite(self):
        w = np.eye(3)
        w[1, 2] = np.nan
        with pytest.raises(ValueError, match=r"finite.*W\[1, 2\] = nan"):
            mixing.check(w)

    def test_columns_not_summing_to_one(self):
        w = np.eye(3)
        w[0, 2] = 0.5
        with pytest.raises(ValueError, match="column 2 sums to 1.5"):
            mixing.check(w)

    def test_rows_need_not_sum_to_one(self):
        w = np.array([[0.5, 1.0], [0.5, 0.0]])  # column-stochastic only
        mixing.check(w)
        with pytest.raises(ValueError, match="symmetric"):
            mixing.check(w, symmetric=True)

    def test_not_numeric(self):
        with pytest.raises(ValueError, match="numeric"):
            mixing.check([["a", "b"], ["c", "d"]])

    def test_require_connected_names_component_sizes(self):
        graph = nx.disjoint_union(nx.cycle_graph(5), nx.path_graph(2))
        with pytest.raises(ValueError, match=r"2 components of sizes \[5, 2\]"):
            mixing.require_connected(graph)

    def test_best_constant_needs_connected(self):
        with pytest.raises(ValueError, match="components"):
            mixing.best_constant(nx.empty_graph(3))

    def test_support_graph(self):
        w = mixing.metropolis(nx.cycle_graph(6))
        assert {frozenset(e) for e in mixing.support_graph(w).edges} == {
            frozenset((i, (i + 1) % 6)) for i in range(6)
        }


class TestStationary:
    def test_doubly_stochastic_is_uniform(self):
        np.testing.assert_allclose(coopsgd.stationary(mixing.metropolis(nx.star_graph(4))), np.full(5, 0.2))

    def test_overlap_weights_by_hand(self):
        # W_ov π = π with π = ((1−α)/m, …, (1−α)/m, α): X π = (1 − α) x̄ + α z
        m, alpha = 4, 0.6
        w = np.zeros((m + 1, m + 1))
        w[:m, :m] = (1 - alpha) * np.eye(m)
        w[:m, m] = (1 - alpha) / m
        w[m, :] = alpha
        np.testing.assert_allclose(coopsgd.stationary(w), [0.1, 0.1, 0.1, 0.1, 0.6], atol=1e-12)

    def test_no_unique_combination(self):
        w = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])  # two absorbing columns
        with pytest.raises(ValueError, match="zeta = 1"):
            coopsgd.stationary(w)
