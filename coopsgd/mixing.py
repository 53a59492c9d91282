"""Mixing matrices: weight rules that turn a graph into W, checks on W, and its spectral quantities.

Conventions (Wang & Joshi, Cooperative SGD, arXiv:1808.07576, §2): workers' models are the columns
of X and one update is ``X ← (X − ηG) W``, so ``W[i, j]`` is the weight node ``j`` gives to node
``i`` and the *columns* of W sum to 1. All functions here are plain NumPy in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np

from coopsgd import topology

__all__ = [
    "metropolis",
    "max_degree",
    "best_constant",
    "lazy",
    "from_graph",
    "WEIGHT_RULES",
    "check",
    "require_connected",
    "zeta",
    "spectral_gap",
    "stationary",
    "averaging",
    "support_graph",
]

ATOL = 1e-8
"""Tolerance for column sums and symmetry in :func:`check`."""


def metropolis(graph: nx.Graph) -> np.ndarray:
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
    graph = topology.canonical(graph)
    w = np.zeros((graph.number_of_nodes(),) * 2)
    for i, j in graph.edges:
        w[i, j] = w[j, i] = 1.0 / (1.0 + max(graph.degree[i], graph.degree[j]))
    np.fill_diagonal(w, 1.0 - w.sum(axis=0))
    return w


def max_degree(graph: nx.Graph) -> np.ndarray:
    """Max-degree weights: ``1 / (d_max + 1)`` on every edge, ``1 − d_i / (d_max + 1)`` on the diagonal.

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", Systems & Control
        Letters 53, 2004, §4.2.
    """
    graph = topology.canonical(graph)
    lap = nx.laplacian_matrix(graph, nodelist=range(graph.number_of_nodes())).toarray().astype(float)
    d_max = max(d for _, d in graph.degree)
    return np.eye(len(lap)) - lap / (d_max + 1.0)


def best_constant(graph: nx.Graph) -> np.ndarray:
    """Best constant edge weight: ``W = I − α* L_G`` with ``α* = 2 / (λ_1(L_G) + λ_{n−1}(L_G))``.

    Minimises ζ over all constant edge weights; then ``ζ = (λ_1 − λ_{n−1}) / (λ_1 + λ_{n−1})``.
    Entries may be negative. Needs a connected graph with at least one edge.

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004, §4.1.
    """
    graph = require_connected(topology.canonical(graph), "best_constant weights")
    lap = nx.laplacian_matrix(graph, nodelist=range(graph.number_of_nodes())).toarray().astype(float)
    eig = np.linalg.eigvalsh(lap)  # ascending: 0 = eig[0] < eig[1] <= ... <= eig[-1]
    if len(eig) == 1:
        return np.ones((1, 1))
    return np.eye(len(lap)) - (2.0 / (eig[-1] + eig[1])) * lap


def lazy(w: np.ndarray) -> np.ndarray:
    """The lazy version ``(W + I) / 2``: same eigenvectors, eigenvalues ``(λ + 1) / 2 ≥ 0``.

    Makes ``|λ_n| < 1`` on bipartite graphs, where a zero-self-weight W has ``λ_n = −1``.
    """
    w = check(w)
    return (w + np.eye(len(w))) / 2.0


WEIGHT_RULES: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis": metropolis,
    "max_degree": max_degree,
    "best_constant": best_constant,
}
"""Weight rules by name; each maps an undirected graph to a symmetric doubly stochastic W."""


def from_graph(graph: nx.Graph, weights: str | Callable[[nx.Graph], np.ndarray] = "metropolis") -> np.ndarray:
    """W for ``graph`` under a named rule (``"metropolis"``, ``"max_degree"``, ``"best_constant"``,
    any of them prefixed ``"lazy_"``) or a callable ``graph -> W``."""
    if callable(weights):
        return check(weights(topology.canonical(graph)))
    name = weights
    make_lazy = isinstance(name, str) and name.startswith("lazy_")
    if make_lazy:
        name = name[len("lazy_"):]
    if name not in WEIGHT_RULES:
        valid = ", ".join([*WEIGHT_RULES, *(f"lazy_{r}" for r in WEIGHT_RULES)])
        raise ValueError(f"unknown weight rule {weights!r}; valid rules: {valid}")
    w = WEIGHT_RULES[name](graph)
    return lazy(w) if make_lazy else w


def check(
    w,
    *,
    n: int | None = None,
    symmetric: bool = False,
    atol: float = ATOL,
    name: str = "W",
) -> np.ndarray:
    """Validate a mixing matrix and return it as a float64 array.

    Rules: 2-D and square (of size ``n`` if given), finite, every column summing to 1 within
    ``atol`` (1ᵀW = 1ᵀ, which keeps the average of the columns moving only by gradients), and,
    when ``symmetric=True``, ``W = Wᵀ`` within ``atol`` (so W is doubly stochastic, as Theorem 1 of
    Wang & Joshi assumes).

    Raises:
        ValueError: naming the first rule ``W`` breaks and where.
    """
    try:
        w = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric matrix: {err}") from None
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {w.shape}")
    if n is not None and w.shape[0] != n:
        raise ValueError(f"{name} must be {n} x {n} (n = m + v), got {w.shape[0]} x {w.shape[1]}")
    if not np.all(np.isfinite(w)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
        raise ValueError(f"{name} must be finite, but {name}{list(bad)} = {w[bad]}")
    sums = w.sum(axis=0)
    off = np.abs(sums - 1.0)
    if np.any(off > atol):
        j = int(np.argmax(off))
        raise ValueError(
            f"columns of {name} must sum to 1 (1ᵀW = 1ᵀ), but column {j} sums to {sums[j]:.12g}"
        )
    if symmetric:
        asym = np.abs(w - w.T)
        if np.any(asym > atol):
            i, j = (int(k) for k in np.unravel_index(np.argmax(asym), w.shape))
            raise ValueError(
                f"{name} must be symmetric, but {name}[{i}, {j}] = {w[i, j]:.12g} "
                f"!= {name}[{j}, {i}] = {w[j, i]:.12g}"
            )
    w.setflags(write=False)
    return w


def support_graph(w: np.ndarray) -> nx.Graph:
    """The undirected graph with an edge {i, j} wherever W[i, j] or W[j, i] is non-zero (i ≠ j)."""
    w = np.asarray(w)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(w)))
    rows, cols = np.nonzero((w != 0) | (w.T != 0))
    graph.add_edges_from((int(i), int(j)) for i, j in zip(rows, cols) if i < j)
    return graph


def require_connected(graph: nx.Graph, purpose: str = "consensus") -> nx.Graph:
    """Return ``graph`` if it is connected; otherwise raise naming the components' sizes."""
    if graph.number_of_nodes() > 0 and not nx.is_connected(graph):
        sizes = sorted((len(c) for c in nx.connected_components(graph)), reverse=True)
        raise ValueError(
            f"{purpose} needs a connected graph, but it has {len(sizes)} components "
            f"of sizes {sizes}: workers in different components never agree"
        )
    return graph


def zeta(w: np.ndarray) -> float:
    """Second-largest eigenvalue modulus ζ of a mixing matrix.

    For symmetric W this is ``max(|λ_2|, |λ_n|)`` with ``1 = λ_1 ≥ λ_2 ≥ … ≥ λ_n`` (Wang & Joshi,
    Cooperative SGD, Assumption 4). For a column-stochastic W that is not symmetric (Overlap
    Local-SGD's ``W_ov``) it is the largest modulus among the eigenvalues other than the one at 1
    (one copy of the eigenvalue closest to 1 is removed). ζ < 1 means repeated mixing reaches
    consensus; a disconnected graph or a bipartite graph with zero self-weights gives ζ = 1.

    Example:
        >>> import numpy as np
        >>> round(zeta(np.full((4, 4), 0.25)), 12)
        0.0
    """
    w = check(w)
    if len(w) == 1:
        return 0.0
    if np.allclose(w, w.T, atol=ATOL):
        eig = np.linalg.eigvalsh((w + w.T) / 2.0)
    else:
        eig = np.linalg.eigvals(w)
    eig = np.delete(eig, np.argmin(np.abs(eig - 1.0)))
    z = float(np.max(np.abs(eig)))
    return 0.0 if z < 1e-12 else z  # exact averaging: round-off, not a real eigenvalue


def spectral_gap(w: np.ndarray) -> float:
    """Spectral gap ``1 − ζ``: the consensus rate per mixing; larger is faster."""
    return 1.0 - zeta(w)


def stationary(w: np.ndarray) -> np.ndarray:
    """The weights π (π ≥ 0, Σπ = 1) with ``W π = π``: the combination ``X π`` of the columns that
    mixing leaves unchanged, which every column approaches when ζ < 1.

    Uniform ``1/n`` for a doubly stochastic W; for Overlap Local-SGD's ``W_ov`` it is
    ``(1−α)/m`` per worker and ``α`` for the anchor, so ``X π = (1−α) x̄ + α z`` (Wang, Liang &
    Joshi, arXiv:2002.09539, §3). Raises ValueError when ζ = 1 (no unique such combination).

    Example:
        >>> stationary(np.full((3, 3), 1 / 3)).round(6).tolist()
        [0.333333, 0.333333, 0.333333]
    """
    w = check(w)
    if np.allclose(w.sum(axis=1), 1.0, atol=ATOL):
        return np.full(len(w), 1.0 / len(w))
    if zeta(w) >= 1.0 - 1e-12:
        raise ValueError("W has zeta = 1: no unique combination of the columns is left unchanged")
    eig, vec = np.linalg.eig(w)
    pi = np.real(vec[:, np.argmin(np.abs(eig - 1.0))])
    return pi / pi.sum()


def averaging(n: int) -> np.ndarray:
    """Exact averaging ``J_n = 11ᵀ / n`` (ζ = 0)."""
    return np.full((n, n), 1.0 / n)
