import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coopsgd import mixing, topology
from coopsgd.core import spectral


class TestExponential:
    def test_neighbours_of_zero_on_eight_nodes(self):
        # 2^k < 8 for k = 0, 1, 2: offsets ±1, ±2, ±4 (mod 8) -> {1, 7, 2, 6, 4}
        assert sorted(topology.exponential(8).neighbors(0)) == [1, 2, 4, 6, 7]

    @pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 16, 31])
    def test_edges_match_the_definition(self, n):
        expected = set()
        hop = 1
        while hop < n:
            for i in range(n):
                j = (i + hop) % n
                expected.add(frozenset((i, j)))
            hop *= 2
        got = {frozenset(e) for e in topology.exponential(n).edges}
        assert got == expected
        assert sorted(topology.exponential(n).nodes) == list(range(n))

    def test_degree_for_power_of_two(self):
        # offsets ±1, ±2, ..., ±2^(k-1) with +2^(k-1) = -2^(k-1): 2k - 1 neighbours
        for k in range(1, 7):
            degrees = {d for _, d in topology.exponential(2**k).degree}
            assert degrees == {2 * k - 1}

    @pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
    def test_bad_n(self, bad):
        with pytest.raises(ValueError, match="number of nodes"):
            topology.exponential(bad)


def _check_decomposition(graph):
    parts = topology.matchings(graph)
    edges = [e for part in parts for e in part]
    assert len(edges) == len(set(edges)), "an edge appears in two matchings"
    assert set(edges) == {(min(a, b), max(a, b)) for a, b in graph.edges}
    for part in parts:
        nodes = [x for e in part for x in e]
        assert len(nodes) == len(set(nodes)), f"{part} is not a matching"
    max_deg = max((d for _, d in graph.degree), default=0)
    assert max_deg <= len(parts) <= max_deg + 1  # Vizing
    if nx.is_bipartite(graph):
        assert len(parts) == max_deg  # König
    return parts


class TestMatchings:
    @settings(max_examples=60, deadline=None)
    @given(st.integers(2, 24), st.floats(0.05, 1.0), st.integers(0, 10_000))
    def test_random_graphs(self, n, p, seed):
        _check_decomposition(nx.gnp_random_graph(n, p, seed=seed))

    @pytest.mark.parametrize(
        "graph",
        [nx.cycle_graph(7), nx.cycle_graph(10), nx.petersen_graph(), nx.complete_graph(9),
         nx.star_graph(6), nx.hypercube_graph(4), topology.exponential(16)],
        ids=["ring7", "ring10", "petersen", "K9", "star", "hypercube", "exponential16"],
    )
    def test_families(self, graph):
        _check_decomposition(topology.canonical(graph))

    @pytest.mark.parametrize("graph,count", [(nx.cycle_graph(8), 2), (nx.cycle_graph(9), 3),
                                             (nx.hypercube_graph(4), 4), (nx.star_graph(3), 3)])
    def test_counts_by_hand(self, graph, count):
        assert len(topology.matchings(topology.canonical(graph))) == count

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 12), st.integers(1, 12), st.floats(0.05, 1.0), st.integers(0, 10_000))
    def test_bipartite_colouring_uses_max_degree_colours(self, left, right, p, seed):
        graph = nx.bipartite.random_graph(left, right, p, seed=seed)
        edges = sorted((a, b) if a < left else (b, a) for a, b in graph.edges)  # (left, right)
        colours = topology.bipartite_edge_colouring(edges)
        seen = set()
        for (u, v), c in zip(edges, colours):
            assert ("L", u, c) not in seen and ("R", v, c) not in seen
            seen |= {("L", u, c), ("R", v, c)}
        max_deg = max((d for _, d in graph.degree), default=0)
        assert len(set(colours)) == max_deg

    def test_star_needs_one_matching_per_leaf(self):
        parts = topology.matchings(nx.star_graph(5))
        assert len(parts) == 5 and all(len(p) == 1 for p in parts)

    def test_empty_graph(self):
        assert topology.matchings(nx.empty_graph(4)) == []


class TestCanonical:
    def test_relabels_in_sorted_order(self):
        graph = nx.Graph([("c", "a"), ("a", "b")])
        out = topology.canonical(graph)
        assert sorted(out.nodes) == [0, 1, 2]
        assert {frozenset(e) for e in out.edges} == {frozenset((0, 2)), frozenset((0, 1))}

    def test_grid_nodes_become_integers(self):
        out = topology.canonical(nx.grid_2d_graph(3, 3, periodic=True))
        assert sorted(out.nodes) == list(range(9))
        # (0,0) -> 0 is linked to (0,1) -> 1, (0,2) -> 2, (1,0) -> 3, (2,0) -> 6
        assert sorted(out.neighbors(0)) == [1, 2, 3, 6]

    def test_rejects_unsortable_nodes(self):
        with pytest.raises(ValueError, match="cannot be sorted"):
            topology.canonical(nx.Graph([(1, "a")]))

    def test_rejects_directed_and_self_loops(self):
        with pytest.raises(ValueError, match="undirected"):
            topology.canonical(nx.DiGraph([(0, 1)]))
        with pytest.raises(ValueError, match="self-loops"):
            topology.canonical(nx.Graph([(0, 0), (0, 1)]))

    def test_rejects_empty(self):
        with pytest.raises(ValueError, match="no nodes"):
            topology.canonical(nx.Graph())


class TestByName:
    @pytest.mark.parametrize("name,n,degree", [("ring", 8, {2}), ("torus", 16, {4}),
                                               ("hypercube", 16, {4}), ("complete", 5, {4}),
                                               ("exponential", 8, {5})])
    def test_regular_families(self, name, n, degree):
        graph = topology.by_name(name, n)
        assert graph.number_of_nodes() == n
        assert {d for _, d in graph.degree} == degree

    def test_star_has_n_nodes(self):
        graph = topology.by_name("star", 6)
        assert graph.number_of_nodes() == 6 and graph.degree[0] == 5

    def test_unknown_name_lists_valid_ones(self):
        with pytest.raises(ValueError, match="unknown topology 'rign'.*ring.*torus"):
            topology.by_name("rign", 8)

    def test_bad_sizes(self):
        with pytest.raises(ValueError, match="power of two"):
            topology.by_name("hypercube", 6)
        with pytest.raises(ValueError, match="rows\\*cols"):
            topology.by_name("torus", 10)

    @pytest.mark.parametrize("n,shape", [(9, (3, 3)), (12, (3, 4)), (15, (3, 5)), (16, (4, 4)),
                                         (24, (4, 6)), (36, (6, 6)), (45, (5, 9))])
    def test_torus_shape_is_the_most_square_factorisation(self, n, shape):
        assert topology.torus_shape(n) == shape

    @pytest.mark.parametrize("n", [4, 8, 13, 14, 22, 26])
    def test_torus_shape_refuses_sizes_without_sides_of_three(self, n):
        with pytest.raises(ValueError, match="rows, cols >= 3"):
            topology.torus_shape(n)

    def test_rectangular_torus_neighbours_by_row_and_column(self):
        # node i*cols + j sits at row i, column j; its neighbours wrap around both ways
        graph = topology.torus(4, 5)
        assert graph.number_of_edges() == 2 * 20
        assert set(graph[0]) == {1, 4, 5, 15}
        assert set(graph[13]) == {12, 14, 8, 18}

    def test_rectangular_torus_zeta_by_hand(self):
        # Metropolis on a 4-regular graph: W = (I + A)/5; A's eigenvalues on the 3 x 4 torus are
        # 2cos(2πa/3) + 2cos(2πb/4); the second largest modulus is (1 + 2)/5 = 0.6.
        W = mixing.from_graph(topology.by_name("torus", 12), "metropolis")
        assert spectral.zeta(W) == pytest.approx(0.6, abs=1e-9)
