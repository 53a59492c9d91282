"""Mixing matrices: weight rules that turn a graph into W, group means, and the checks on every W.

Conventions (Wang & Joshi, Cooperative SGD, arXiv:1808.07576, §2): workers' models are the columns
of X and one update is ``X ← (X − ηG) W``, so ``W[i, j]`` is the weight node ``j`` gives to node
``i`` and the *columns* of W sum to 1. Every rule here builds a sparse
:class:`~coopsgd.core.operator.MixingMatrix` in O(edges) time and memory, in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from coopsgd.core import topology
from coopsgd.core.operator import (
    DENSE_LIMIT,
    MixingMatrix,
    as_operator,
    averaging,
    identity,
)
from coopsgd.core.validate import require_real_dtype

__all__ = [
    "ATOL",
    "WEIGHT_RULES",
    "ZETA_ATOL",
    "averaging",
    "best_constant",
    "check",
    "component_sizes",
    "edge_matrix",
    "from_graph",
    "group_averaging",
    "lazy",
    "max_degree",
    "metropolis",
    "push_weights",
    "require_connected",
    "require_connected_union",
    "require_consensus",
    "support_graph",
    "weight_rule_names",
]

ATOL = 1e-8
"""Tolerance for column sums and symmetry in :func:`check`."""

ZETA_ATOL = 1e-6
"""How far above 1 an eigenvalue modulus of W may lie (round-off) before :func:`require_consensus`
calls repeated mixing divergent."""


def group_averaging(n: int, g: int) -> MixingMatrix:
    """Averaging within contiguous groups of ``g``: ``I_{n/g} ⊗ J_g`` (workers ``b·g … b·g + g − 1``
    take their group's mean; ``J_n`` for g = n, ``I_n`` for g = 1), in O(n·g) memory.

    Example:
        >>> np.asarray(group_averaging(4, 2)).tolist()
        [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]

    Raises:
        ValueError: if g is not a divisor of n.
    """
    n, g = int(n), int(g)
    if n < 1 or g < 1 or n % g:
        raise ValueError(f"group size g = {g} must be a divisor of n = {n} (contiguous groups of equal size)")
    if g == n:
        return averaging(n)
    if g == 1:
        return identity(n)
    block = sp.csr_array(np.full((g, g), 1.0 / g))
    return MixingMatrix.from_blocks(sp.kron(sp.identity(n // g, format="csr"), block, format="csr"))


def _edges(graph: nx.Graph) -> tuple[int, np.ndarray, np.ndarray]:
    graph = topology.canonical(graph)
    edges = np.array(list(graph.edges), dtype=np.int64).reshape(-1, 2)
    return graph.number_of_nodes(), edges[:, 0], edges[:, 1]


def _symmetric_with_self_weights(n: int, a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> MixingMatrix:
    """W with ``weight`` on both arcs of every edge {a, b} and ``W_ii = 1 − Σ_{j≠i} W_ji``.

    The self-weights sum each column's edge weights in row order, as a dense column sum would."""
    rows = np.concatenate([a, b])
    cols = np.concatenate([b, a])
    vals = np.concatenate([weight, weight])
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    diag = 1.0 - np.bincount(cols, weights=vals, minlength=n)
    rows = np.concatenate([rows, np.arange(n)])
    cols = np.concatenate([cols, np.arange(n)])
    vals = np.concatenate([vals, diag])
    return MixingMatrix.from_blocks(sp.csr_array((vals, (rows, cols)), shape=(n, n)))


def metropolis(graph: nx.Graph) -> MixingMatrix:
    """Metropolis–Hastings weights: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 − Σ_j W_ij``.

    Symmetric and doubly stochastic on any undirected graph; needs no global knowledge.

    References:
        Xiao, Boyd & Lall, "A scheme for robust distributed sensor fusion based on average
        consensus", IPSN 2005.

    Example:
        >>> import networkx as nx
        >>> metropolis(nx.cycle_graph(4))[0].round(3).tolist()
        [0.333, 0.333, 0.0, 0.333]
    """
    n, a, b = _edges(graph)
    deg = np.bincount(np.concatenate([a, b]), minlength=n)
    return _symmetric_with_self_weights(n, a, b, 1.0 / (1.0 + np.maximum(deg[a], deg[b])))


def push_weights(graph: nx.DiGraph) -> MixingMatrix:
    """Push-sum's column-stochastic P on a directed graph: node j keeps ``1/(1 + outdeg j)`` and
    sends as much to each out-neighbour, ``P[i, j] = 1/(1 + outdeg j)`` for ``i = j`` or ``j → i``.
    Every column sums to 1; rows need not (P is the math convention ``x_i ← Σ_j P_ij x_j``, the
    engine's W is Pᵀ).

    References:
        Kempe, Dobra & Gehrke, "Gossip-based computation of aggregate information", FOCS 2003;
        Assran, Loizou, Ballas & Rabbat, "Stochastic gradient push", ICML 2019, §3.

    Example:
        >>> import networkx as nx
        >>> push_weights(nx.DiGraph([(0, 1), (1, 2), (2, 0), (0, 2)])).toarray().round(3).tolist()
        [[0.333, 0.0, 0.5], [0.333, 0.5, 0.0], [0.333, 0.5, 0.5]]
    """
    graph = topology.canonical_digraph(graph)
    n = graph.number_of_nodes()
    edges = np.array(list(graph.edges), dtype=np.int64).reshape(-1, 2)
    share = 1.0 / (1.0 + np.bincount(edges[:, 0], minlength=n))
    off = sp.csr_array((share[edges[:, 0]], (edges[:, 1], edges[:, 0])), shape=(n, n))
    return MixingMatrix.from_blocks(off + sp.diags_array(share, format="csr"))


def max_degree(graph: nx.Graph) -> MixingMatrix:
    """Max-degree weights: ``1 / (d_max + 1)`` on every edge, ``1 − d_i / (d_max + 1)`` on the diagonal.

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", Systems & Control
        Letters 53, 2004, §4.2.
    """
    n, a, b = _edges(graph)
    lap = edge_matrix(n, a, b, -np.ones(len(a)), np.bincount(np.concatenate([a, b]), minlength=n))
    return MixingMatrix.from_blocks(sp.identity(n, format="csr") - lap / (float(lap.diagonal().max(initial=0)) + 1.0))


def edge_matrix(n: int, a: np.ndarray, b: np.ndarray, weight, diagonal) -> sp.csr_array:
    """The symmetric n × n CSR matrix with ``weight`` on both arcs of every edge {a, b} and
    ``diagonal`` on the diagonal (a Laplacian: weight −1, the degrees)."""
    weight = np.broadcast_to(np.asarray(weight, dtype=np.float64), a.shape)
    return sp.csr_array((np.concatenate([weight, weight, np.asarray(diagonal, dtype=np.float64)]),
                         (np.concatenate([a, b, np.arange(n)]), np.concatenate([b, a, np.arange(n)]))),
                        shape=(n, n))


def best_constant(graph: nx.Graph) -> MixingMatrix:
    """Best constant edge weight: ``W = I − α* L_G`` with ``α* = 2 / (λ_1(L_G) + λ_{n−1}(L_G))``.

    Minimises ζ over all constant edge weights; then ``ζ = (λ_1 − λ_{n−1}) / (λ_1 + λ_{n−1})``.
    Entries may be negative. Needs a connected graph with at least one edge. The Laplacian's
    extreme eigenvalues come from a dense solver up to 2048 nodes, beyond from sparse ones
    (``scipy.sparse.linalg.eigsh`` and networkx's algebraic connectivity).

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004, §4.1.
    """
    graph = require_connected(topology.canonical(graph), "best_constant weights")
    n, a, b = _edges(graph)
    if n == 1:
        return MixingMatrix.from_blocks(sp.identity(1, format="csr"))
    lap = edge_matrix(n, a, b, -1.0, np.bincount(np.concatenate([a, b]), minlength=n))
    if n <= 2048:
        eig = np.linalg.eigvalsh(lap.toarray())  # ascending: 0 = eig[0] < eig[1] <= ... <= eig[-1]
        low, high = eig[1], eig[-1]
    else:
        from scipy.sparse.linalg import eigsh

        high = float(eigsh(lap, k=1, which="LA", return_eigenvectors=False)[0])
        low = float(nx.algebraic_connectivity(graph, method="tracemin_lu", tol=1e-10))
    return MixingMatrix.from_blocks(sp.identity(n, format="csr") - (2.0 / (high + low)) * lap)


def lazy(w) -> MixingMatrix:
    """The lazy version ``(W + I) / 2``: same eigenvectors, eigenvalues ``(λ + 1) / 2 ≥ 0``.

    Makes ``|λ_n| < 1`` on bipartite graphs, where a zero-self-weight W has ``λ_n = −1``.
    """
    w = check(w)
    half = (w.wa / 2.0, w.aw / 2.0, (w.aa + np.eye(w.v)) / 2.0) if w.v else (None, None, None)
    if w.form == "mean":
        return MixingMatrix.mean((w.worker_diagonal() + 1.0) / 2.0, w.c / 2.0, *half)
    ww = w.worker_block()
    eye = sp.identity(w.m, format="csr") if w.form == "sparse" else np.eye(w.m)
    return MixingMatrix.from_blocks((ww + eye) / 2.0, *half)


WEIGHT_RULES: dict[str, Callable[[nx.Graph], MixingMatrix]] = {
    "metropolis": metropolis,
    "max_degree": max_degree,
    "best_constant": best_constant,
}
"""Weight rules by name; each maps an undirected graph to a symmetric doubly stochastic W."""


def weight_rule_names() -> list[str]:
    """Every name :func:`from_graph` accepts: the rules and their ``lazy_`` versions."""
    return [*WEIGHT_RULES, *(f"lazy_{r}" for r in WEIGHT_RULES)]


def from_graph(graph: nx.Graph, weights: str | Callable[[nx.Graph], object] = "metropolis") -> MixingMatrix:
    """W for ``graph`` under a named rule (``"metropolis"``, ``"max_degree"``, ``"best_constant"``,
    any of them prefixed ``"lazy_"``) or a callable ``graph -> W``."""
    if callable(weights):
        return check(weights(topology.canonical(graph)))
    name = weights
    make_lazy = isinstance(name, str) and name.startswith("lazy_")
    if make_lazy:
        name = name[len("lazy_"):]
    if name not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {weights!r}; valid rules: {', '.join(weight_rule_names())}")
    w = WEIGHT_RULES[name](graph)
    return lazy(w) if make_lazy else w


def _first_nonfinite(w: MixingMatrix) -> tuple[list[int], float]:
    if w.n <= DENSE_LIMIT:
        dense = w.toarray()
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(dense))[0])
        return list(idx), float(dense[idx])
    coo = sp.coo_array(w.tocsr())
    k = int(np.flatnonzero(~np.isfinite(coo.data))[0])
    return [int(coo.row[k]), int(coo.col[k])], float(coo.data[k])


def check(w, *, n: int | None = None, symmetric: bool = False, atol: float = ATOL, name: str = "W",
          v: int = 0) -> MixingMatrix:
    """Validate a mixing matrix and return it as a :class:`~coopsgd.core.operator.MixingMatrix`.

    Accepts a NumPy array, a ``scipy.sparse`` matrix or a MixingMatrix (the last ``v`` columns
    auxiliary). Rules: 2-D and square (of size ``n`` if given), real and finite, every column summing
    to 1 within ``atol`` (1ᵀW = 1ᵀ, which keeps the average of the columns moving only by
    gradients), and, when ``symmetric=True``, ``W = Wᵀ`` within ``atol`` (so W is doubly
    stochastic, as Theorem 1 of Wang & Joshi assumes). O(non-zeros).

    Integer and boolean arrays are refused too (weights are fractions; convert to float first).

    Raises:
        ValueError: naming the first rule ``W`` breaks and where.
    """
    if not isinstance(w, MixingMatrix):
        require_real_dtype(name, w.dtype if sp.issparse(w) else np.asarray(w).dtype, what="a float matrix")
    w = as_operator(w, v=v, name=name)
    if n is not None and w.n != n:
        raise ValueError(f"{name} must be {n} x {n} (n = m + v), got {w.n} x {w.n}")
    if not w.is_finite():
        where, value = _first_nonfinite(w)
        raise ValueError(f"{name} must be finite, but {name}{where} = {value}")
    sums = w.column_sums()
    off = np.abs(sums - 1.0)
    if np.any(off > atol):
        j = int(np.argmax(off))
        raise ValueError(
            f"columns of {name} must sum to 1 (1ᵀW = 1ᵀ), but column {j} sums to {sums[j]:.12g}"
        )
    if symmetric and w.asymmetry() > atol:
        i, j = _most_asymmetric(w)
        raise ValueError(
            f"{name} must be symmetric, but {name}[{i}, {j}] = {w[i, j]:.12g} "
            f"!= {name}[{j}, {i}] = {w[j, i]:.12g}"
        )
    return w


def _most_asymmetric(w: MixingMatrix) -> tuple[int, int]:
    if w.n <= DENSE_LIMIT:
        dense = w.toarray()
        return tuple(int(k) for k in np.unravel_index(np.argmax(np.abs(dense - dense.T)), dense.shape))
    diff = sp.coo_array(w.tocsr() - w.tocsr().T)
    k = int(np.argmax(np.abs(diff.data)))
    return int(diff.row[k]), int(diff.col[k])


def _support_csr(w: MixingMatrix) -> sp.csr_array:
    """The symmetric off-diagonal pattern of W (an edge {i, j} where W[i, j] or W[j, i] ≠ 0)."""
    pattern = w.tocsr()
    pattern = (abs(pattern) + abs(pattern.T)).tocsr()
    pattern.setdiag(0)
    pattern.eliminate_zeros()
    return pattern


def _links(w: MixingMatrix) -> sp.csr_array:
    """A sparse pattern with the connectivity of W's support, O(edges) at any size: the support
    itself, or for a full mean-form worker block (c ≠ 0) a star over the workers."""
    if w.form != "mean" or w.c == 0:
        return _support_csr(w)
    m = w.m
    star = sp.csr_array((np.ones(m - 1), (np.zeros(m - 1, dtype=np.int64), np.arange(1, m))), shape=(m, m))
    if w.v:
        star = sp.block_array([[star, sp.csr_array(w.wa)], [sp.csr_array(w.aw), sp.csr_array(w.aa)]],
                              format="csr")
    return (abs(star) + abs(star.T)).tocsr()


def _norm_bound(w: MixingMatrix) -> float:
    """``min(‖W‖₁, ‖W‖_∞)`` (largest absolute column or row sum), which bounds the modulus of every
    eigenvalue of W; O(non-zeros)."""
    if w.form == "mean":
        diag, c = w.worker_block()
        cols = rows = np.abs(diag) + abs(c) * (w.m - 1)
    else:
        ww = abs(w.worker_block())
        cols, rows = (np.asarray(ww.sum(axis=a), dtype=np.float64).reshape(-1) for a in (0, 1))
    wa, aw, aa = np.abs(w.wa), np.abs(w.aw), np.abs(w.aa)
    cols = np.concatenate([cols + aw.sum(axis=0), wa.sum(axis=0) + aa.sum(axis=0)])
    rows = np.concatenate([rows + wa.sum(axis=1), aw.sum(axis=1) + aa.sum(axis=1)])
    return float(min(cols.max(), rows.max()))


def _sizes(pattern) -> list[int]:
    count, labels = csgraph.connected_components(pattern, directed=False)
    return sorted(np.bincount(labels, minlength=count).tolist(), reverse=True)


def _components(sizes: list[int]) -> str:
    shown = ", ".join(str(s) for s in sizes[:10]) + (", ..." if len(sizes) > 10 else "")
    return f"{len(sizes)} components of sizes [{shown}]"


def support_graph(w) -> nx.Graph:
    """The undirected graph with an edge {i, j} wherever W[i, j] or W[j, i] is non-zero (i ≠ j)."""
    pattern = sp.coo_array(_support_csr(check(w) if not isinstance(w, MixingMatrix) else w))
    graph = nx.Graph()
    graph.add_nodes_from(range(pattern.shape[0]))
    keep = pattern.row < pattern.col
    graph.add_edges_from(zip(pattern.row[keep].tolist(), pattern.col[keep].tolist()))
    return graph


def component_sizes(graph_or_w) -> list[int]:
    """Sizes of the connected components (largest first) of a graph or of W's support; O(edges)."""
    if isinstance(graph_or_w, nx.Graph):
        return sorted((len(c) for c in nx.connected_components(graph_or_w)), reverse=True)
    w = graph_or_w if isinstance(graph_or_w, MixingMatrix) else check(graph_or_w)
    return _sizes(_links(w))


def require_connected(graph_or_w, purpose: str = "consensus"):
    """Return ``graph_or_w`` (a graph or a W) if it is connected; otherwise raise naming the
    components' sizes."""
    if isinstance(graph_or_w, nx.Graph) and graph_or_w.number_of_nodes() == 0:
        return graph_or_w
    sizes = component_sizes(graph_or_w)
    if len(sizes) > 1:
        raise ValueError(
            f"{purpose} needs a connected graph, but it has {_components(sizes)}: "
            "workers in different components never agree"
        )
    return graph_or_w


def require_connected_union(ops, name: str = "the mixing schedule", opt_out: str = "") -> None:
    """ValueError unless the union of the supports of ``ops`` (MixingMatrix values, or 0/1
    patterns) is connected: a time-varying W may leave every single W^(r) disconnected (matchings,
    one-peer graphs), but over its rounds every worker must reach every other. O(edges)."""
    ops = [w if isinstance(w, MixingMatrix) else as_operator(w) for w in ops]
    sizes = _sizes(sum(_links(w) for w in ops))
    if len(sizes) > 1:
        raise ValueError(f"{name} never connects its workers: the union of its supports has "
                         f"{_components(sizes)}, so workers in different components never agree{opt_out}")


def require_consensus(w: MixingMatrix, name: str = "W", opt_out: str = "") -> MixingMatrix:
    """``w`` if mixing with it again and again reaches every worker and cannot blow up: its support
    is connected, and no eigenvalue but the one at 1 has modulus above ``1 + ZETA_ATOL`` (ζ ≤ 1).

    ζ = 1 is accepted (a bipartite graph with zero self-weights, or W = I for n = 1). A W with
    ``‖W‖₁ ≤ 1`` or ``‖W‖_∞ ≤ 1`` (every non-negative column-stochastic W) has no eigenvalue
    outside the unit circle, so ζ is computed only for the others, and only where that is cheap:
    up to :data:`~coopsgd.core.spectral.DENSE_EIG_LIMIT` columns, or by a closed form beyond
    (exchangeable workers, a circulant W). ``opt_out`` ends the messages (how to skip the check).
    """
    sizes = component_sizes(w)
    if len(sizes) > 1:
        raise ValueError(f"{name} is disconnected: its support has {_components(sizes)}, so workers in "
                         f"different components never agree{opt_out}")
    if _norm_bound(w) <= 1.0 + ZETA_ATOL:
        return w
    from coopsgd.core import spectral

    if w.n > spectral.DENSE_EIG_LIMIT and spectral._exchangeable(w) is None and w.circulant_offsets() is None:
        return w  # a sparse eigen-solver may take long here; such W come from weight rules
    z = spectral.zeta(w)
    if z > 1.0 + ZETA_ATOL:
        raise ValueError(f"{name} has zeta = {z:.6g} > 1: an eigenvalue of modulus {z:.6g} besides the one at "
                         "1 makes repeated mixing amplify the workers' differences until they overflow; a "
                         f"mixing matrix needs every other eigenvalue within the unit circle{opt_out}")
    return w
