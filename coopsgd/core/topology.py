"""Graphs of decentralized training that networkx lacks, and the graph catalogue by name.

Every function returns a :class:`networkx.Graph` on the nodes ``0..n-1``. Any other graph can be
passed straight from networkx; :func:`canonical` relabels its nodes ``0..n-1`` in sorted order
(deterministically, so every worker and host derives the same numbering).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import networkx as nx

__all__ = [
    "TOPOLOGIES",
    "bipartite_edge_colouring",
    "by_name",
    "canonical",
    "canonical_digraph",
    "exponential",
    "matchings",
    "one_peer_exponential_digraphs",
    "torus",
    "torus_shape",
]


def canonical(graph: nx.Graph) -> nx.Graph:
    """Return ``graph`` with its nodes relabelled ``0..n-1`` in sorted order.

    A plain :class:`networkx.Graph` already on the nodes ``0..n-1`` is returned as it is (nothing
    here changes a graph); any other is copied. Directed graphs and graphs with self-loops or
    unsortable node labels are rejected with a ``ValueError``. O(nodes + edges).
    """
    if not isinstance(graph, nx.Graph):
        raise ValueError(f"expected a networkx.Graph, got {type(graph).__name__}")
    if graph.is_directed():
        raise ValueError("graph must be undirected (mixing matrices here are built on undirected graphs)")
    if graph.number_of_nodes() == 0:
        raise ValueError("graph has no nodes; a topology needs at least one worker")
    loops = list(nx.selfloop_edges(graph))
    if loops:
        raise ValueError(f"graph has self-loops {loops[:3]}; self-weights come from the weight rule")
    n = graph.number_of_nodes()
    if type(graph) is nx.Graph and all(isinstance(v, int) and 0 <= v < n for v in graph):
        return graph  # already 0..n-1 (n distinct integers in range)
    try:
        order = sorted(graph.nodes)
    except TypeError as err:
        raise ValueError(
            "graph nodes cannot be sorted to number them 0..n-1 deterministically "
            f"({err}); relabel them with networkx.convert_node_labels_to_integers first"
        ) from None
    mapping = {node: i for i, node in enumerate(order)}
    out = nx.Graph()
    out.add_nodes_from(range(len(order)))
    out.add_edges_from((mapping[a], mapping[b]) for a, b in graph.edges)
    return out


def exponential(n: int) -> nx.Graph:
    """Exponential graph: node ``i`` is linked to ``i ± 2^k (mod n)`` for every ``2^k < n``.

    Degree is about ``2 log2 n`` while the spectral gap stays bounded away from zero.

    References:
        Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep Training",
        NeurIPS 2021 (arXiv:2110.13363).

    Examples:
        >>> sorted(exponential(8).neighbors(0))
        [1, 2, 4, 6, 7]
    """
    n = _node_count(n)
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    hop = 1
    while hop < n:
        for i in range(n):
            graph.add_edge(i, (i + hop) % n)
        hop *= 2
    return graph


def one_peer_exponential_digraphs(n: int) -> list[nx.DiGraph]:
    """The one-peer time-varying exponential graph: at round ``r`` node ``i`` sends to the one node
    ``i + 2^(r mod ⌈log₂ n⌉) (mod n)`` only (a directed graph of out-degree 1 per round).

    References:
        Assran, Loizou, Ballas & Rabbat, "Stochastic gradient push", ICML 2019, §6 (the
        time-varying directed exponential graph of their experiments); Ying et al., "Exponential
        graph is provably efficient for decentralized deep training", NeurIPS 2021, §4.

    Examples:
        >>> [sorted(g.successors(0)) for g in one_peer_exponential_digraphs(8)]
        [[1], [2], [4]]
    """
    n = _node_count(n)
    graphs = []
    for j in range(max(1, math.ceil(math.log2(n)))):
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from((i, (i + 2**j) % n) for i in range(n) if (i + 2**j) % n != i)
        graphs.append(graph)
    return graphs


def canonical_digraph(graph: nx.DiGraph) -> nx.DiGraph:
    """``graph`` with its nodes relabelled ``0..n-1`` in sorted order (self-loops rejected: a node's
    own share comes from the weight rule). O(nodes + edges)."""
    if not isinstance(graph, nx.DiGraph):
        raise ValueError(f"expected a networkx.DiGraph, got {type(graph).__name__}")
    if graph.number_of_nodes() == 0:
        raise ValueError("graph has no nodes; a topology needs at least one worker")
    loops = list(nx.selfloop_edges(graph))
    if loops:
        raise ValueError(f"graph has self-loops {loops[:3]}; self-weights come from the weight rule")
    try:
        order = sorted(graph.nodes)
    except TypeError as err:
        raise ValueError(f"graph nodes cannot be sorted to number them 0..n-1 deterministically ({err})") from None
    mapping = {node: i for i, node in enumerate(order)}
    out = nx.DiGraph()
    out.add_nodes_from(range(len(order)))
    out.add_edges_from((mapping[a], mapping[b]) for a, b in graph.edges)
    return out


def matchings(graph: nx.Graph) -> list[list[tuple[int, int]]]:
    """Split ``graph``'s edges into disjoint matchings whose union is the graph.

    The matchings are the colour classes of a proper edge colouring: Δ of them on a bipartite graph
    (König's theorem; an even ring needs 2), at most Δ + 1 otherwise (Misra–Gries, Vizing's bound);
    Δ is the maximum degree. Each edge appears in exactly one matching, as ``(a, b)`` with
    ``a < b``; matchings are sorted and non-empty. This is the decomposition MATCHA activates
    matching by matching.

    References:
        König, "Gráfok és mátrixok", 1931; Misra & Gries, "A constructive proof of Vizing's
        theorem", IPL 41(3), 1992; Wang et al., "MATCHA", arXiv:1905.09435, §3.
    """
    graph = canonical(graph)
    edges = sorted((min(a, b), max(a, b)) for a, b in graph.edges)
    if nx.is_bipartite(graph):
        side = nx.bipartite.color(graph)
        colours = bipartite_edge_colouring([(a, b) if side[a] == 0 else (b, a) for a, b in edges])
        colouring = dict(zip(edges, colours))
    else:
        colouring = _misra_gries(graph)
    classes: dict[int, list[tuple[int, int]]] = {}
    for (a, b), colour in colouring.items():
        classes.setdefault(colour, []).append((min(a, b), max(a, b)))
    return sorted(sorted(edges) for edges in classes.values())


def bipartite_edge_colouring(edges) -> list[int]:
    """Colour the edges ``(left, right)`` of a bipartite (multi-edge-free) graph with Δ colours.

    Left and right vertices live in separate namespaces (``(0, 0)`` is an edge from left 0 to
    right 0). Returns one colour in ``0..Δ−1`` per edge, in order; edges of one colour share no
    vertex. Greedy with alternating-path recolouring, which always succeeds on bipartite graphs.

    References:
        König, "Gráfok és mátrixok", 1931 (every bipartite graph is Δ-edge-colourable).
    """
    at: dict[tuple[int, object], dict[int, tuple[int, object]]] = {}  # vertex -> colour -> other end
    for u, v in edges:
        left, right = (0, u), (1, v)
        at.setdefault(left, {})
        at.setdefault(right, {})
        a = next(c for c in range(len(at[left]) + 1) if c not in at[left])  # free at left
        b = next(c for c in range(len(at[right]) + 1) if c not in at[right])  # free at right
        if a in at[right]:  # free a at right: swap a <-> b along the alternating path from right
            _swap_along_path(at, right, a, b)
        at[left][a], at[right][a] = right, left
    return [next(c for c, y in at[(0, u)].items() if y == (1, v)) for u, v in edges]


def _swap_along_path(at: dict, start, first: int, other: int) -> None:
    """Swap colours ``first`` ↔ ``other`` on the maximal path from ``start`` whose edges alternate
    between them, beginning with ``first`` (``at[x][colour]`` is x's neighbour by that colour)."""
    path, x, colour = [], start, first
    while colour in at[x]:
        y = at[x][colour]
        path.append((x, y, colour))
        x, colour = y, (other if colour == first else first)
    for x, y, colour in path:
        del at[x][colour], at[y][colour]
    for x, y, colour in path:
        swapped = other if colour == first else first
        at[x][swapped], at[y][swapped] = y, x


def _misra_gries(graph: nx.Graph) -> dict[tuple[int, int], int]:
    """Proper edge colouring with at most Δ + 1 colours (Misra & Gries 1992)."""
    palette = range(max((d for _, d in graph.degree), default=0) + 1)
    at: dict[int, dict[int, int]] = {x: {} for x in graph.nodes}  # node -> colour -> neighbour

    def colour_of(a, b):
        for c, y in at[a].items():
            if y == b:
                return c
        return None

    def set_colour(a, b, c):
        old = colour_of(a, b)
        if old is not None:
            del at[a][old], at[b][old]
        if c is not None:
            at[a][c] = b
            at[b][c] = a

    def free(x):
        return next(c for c in palette if c not in at[x])

    for u, v in sorted(graph.edges):
        # A maximal fan of u starting at v.
        fan = [v]
        while True:
            last_free = set(palette) - set(at[fan[-1]])
            nxt = next(
                (w for w in sorted(graph[u])
                 if w not in fan and colour_of(u, w) is not None and colour_of(u, w) in last_free),
                None,
            )
            if nxt is None:
                break
            fan.append(nxt)
        c, d = free(u), free(fan[-1])
        # Invert the cd-path that starts at u (its first edge has colour d, since c is free on u).
        _swap_along_path(at, u, d, c)
        # The longest prefix of the fan that is still a fan and ends on a node where d is free.
        end = None
        for i, w in enumerate(fan):
            if i > 0 and colour_of(u, w) in at[fan[i - 1]]:
                break
            if d not in at[w]:
                end = i
                break
        assert end is not None, "Misra-Gries invariant broken"  # guaranteed by the algorithm's proof
        # Rotate the prefix and colour its last edge d.
        shifted = [colour_of(u, w) for w in fan[1 : end + 1]] + [d]
        for w in fan[: end + 1]:
            set_colour(u, w, None)
        for w, colour in zip(fan[: end + 1], shifted):
            set_colour(u, w, colour)
    return {(a, b): colour_of(a, b) for a, b in graph.edges}


def _node_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be an integer >= 1, got {n!r}")
    return n


def torus_shape(n: int) -> tuple[int, int]:
    """The most nearly square ``rows × cols = n`` with ``3 <= rows <= cols`` (12 → 3 × 4, 36 → 6 × 6);
    a ``ValueError`` when there is none (n prime, 2·p, or below 9)."""
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0 and n // rows >= 3:
            return rows, n // rows
    raise ValueError(f"torus needs n = rows*cols nodes with rows, cols >= 3 (9, 12, 15, 16, ...), got n={n}")


def torus(rows: int, cols: int) -> nx.Graph:
    """The ``rows × cols`` torus (a 2-D grid with wrap-around, degree 4) on nodes ``0..n-1``, node
    ``i · cols + j`` at row i, column j. Both sides must be ≥ 3 (a side of 2 would double its edges)."""
    if min(rows, cols) < 3:
        raise ValueError(f"torus sides must be >= 3, got {rows}x{cols}")
    return canonical(nx.grid_2d_graph(rows, cols, periodic=True))


def _torus(n: int) -> nx.Graph:
    return torus(*torus_shape(n))


def _hypercube(n: int) -> nx.Graph:
    dim = n.bit_length() - 1
    if n != 1 << dim:
        raise ValueError(f"hypercube needs n a power of two, got n={n}")
    return nx.hypercube_graph(dim)


def _ring(n: int) -> nx.Graph:
    if n < 3:
        return nx.path_graph(n)
    return nx.cycle_graph(n)


TOPOLOGIES: dict[str, Callable[[int], nx.Graph]] = {
    "ring": _ring,
    "path": nx.path_graph,
    "torus": _torus,
    "hypercube": _hypercube,
    "star": nx.star_graph,
    "complete": nx.complete_graph,
    "exponential": exponential,
}
"""Named topologies on ``n`` nodes (``star`` has node 0 as centre)."""


def by_name(name: str, n: int) -> nx.Graph:
    """The named topology on ``n`` nodes ``0..n-1``; see :data:`TOPOLOGIES` for the names."""
    n = _node_count(n)
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; valid names: {', '.join(TOPOLOGIES)}")
    if name == "star":
        return canonical(nx.star_graph(n - 1))
    return canonical(TOPOLOGIES[name](n))
