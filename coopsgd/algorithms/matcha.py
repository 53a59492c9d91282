"""MATCHA: random matchings of a base graph, activated under a communication budget.

The base graph is split into disjoint matchings ``G_1 … G_M`` with Laplacians ``L_j``. At every
mixing each matching is activated independently with probability ``p_j`` (the same draw on every
worker and host), and the mixing matrix is ``W_k = I − α L^(k)`` with ``L^(k) = Σ_j B_j L_j``,
``B_j ~ Bernoulli(p_j)``. The probabilities maximise the algebraic connectivity of the expected
graph under a budget on the expected number of matchings used; α minimises the contraction
``‖E[W_kᵀ W_k] − J‖₂`` that replaces ζ² in the convergence bound.

References:
    Wang, Sahu, Yang, Joshi & Kar, "MATCHA: Speeding Up Decentralized SGD via Matching
    Decomposition Sampling", arXiv:1905.09435 (2019): the matching decomposition, the budgeted
    activation probabilities and the choice of α (restated in coopsgd's reference notes, math §3).

Example::

    import networkx as nx
    import coopsgd

    algo = coopsgd.matcha(nx.cycle_graph(8), budget=0.5, seed=0)
    w0 = algo.mixing_at(0)          # a random symmetric doubly stochastic W_0
    algo.mixing.probabilities       # p_j, summing to at most 0.5 * M
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import networkx as nx
import numpy as np

from coopsgd.core import mixing, schedules, spectral, topology
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix
from coopsgd.core.validate import require_int

__all__ = [
    "MatchaSchedule",
    "activation_probabilities",
    "algebraic_connectivity",
    "best_alpha",
    "contraction",
    "expected_gram",
    "expected_laplacian_moments",
    "matcha",
    "matching_laplacians",
]


def matching_laplacians(n: int, matchings) -> np.ndarray:
    """Stack of the Laplacians ``L_j`` (shape ``(M, n, n)``) of matchings given as edge lists.

    Each ``L_j`` has ``+1`` on the diagonal of matched nodes and ``−1`` on each matched pair, so
    ``L_j² = 2 L_j`` (MATCHA, arXiv:1905.09435).
    """
    laplacians = np.zeros((len(matchings), n, n))
    for j, edges in enumerate(matchings):
        seen: set[int] = set()
        for a, b in edges:
            if a == b or a in seen or b in seen:
                raise ValueError(f"matching {j} is not a matching: edge ({a}, {b}) shares a node")
            seen.update((a, b))
            laplacians[j, a, a] += 1.0
            laplacians[j, b, b] += 1.0
            laplacians[j, a, b] -= 1.0
            laplacians[j, b, a] -= 1.0
    return laplacians


def algebraic_connectivity(laplacian: np.ndarray) -> float:
    """λ₂ of a graph Laplacian: its second-smallest eigenvalue (0 iff the graph is disconnected)."""
    return float(np.linalg.eigvalsh(laplacian)[1])


def _project_budget(q: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection onto ``{p : 0 ≤ p ≤ 1, Σ p ≤ total}``.

    Clip to the box; if the budget is still exceeded, the projection is ``clip(q − μ, 0, 1)`` with
    the shift ``μ > 0`` that makes the sum equal ``total`` (KKT conditions). The sum is piecewise
    linear in ``μ`` with knots at ``q_i`` and ``q_i − 1``, so ``μ`` is found exactly between the two
    knots that bracket ``total``.
    """
    p = np.clip(q, 0.0, 1.0)
    if p.sum() <= total:
        return p
    knots = np.unique(np.concatenate([q, q - 1.0]))
    sums = np.clip(q[None, :] - knots[:, None], 0.0, 1.0).sum(axis=1)  # non-increasing in the knot
    j = int(np.flatnonzero(sums >= total)[-1])  # sums[0] ≥ Σ clip(q) > total; the last sum is 0
    drop = sums[j] - sums[j + 1]
    mu = knots[j] + (knots[j + 1] - knots[j]) * (sums[j] - total) / drop
    return np.clip(q - mu, 0.0, 1.0)


def activation_probabilities(laplacians: np.ndarray, budget: float, *, iterations: int = 300) -> np.ndarray:
    """Activation probabilities solving MATCHA's budgeted connectivity problem (MATCHA, arXiv:1905.09435)::

        maximise λ₂(Σ_j p_j L_j)   subject to   Σ_j p_j ≤ C_b · M,   0 ≤ p_j ≤ 1.

    λ₂ of a Laplacian is concave in ``p`` (a minimum of linear functions over unit vectors ⊥ 1), so
    the problem is convex. The authors solve it with a convex-programming package; here a projected
    supergradient ascent is used instead: the supergradient is ``(vᵀ L_j v)_j`` for a unit
    eigenvector ``v`` of λ₂, steps shrink like ``1/√t``, each iterate is projected back onto the
    feasible set, and the best iterate is kept (never worse than the uniform start ``p_j = C_b``).
    With ``C_b = 1`` the answer is exactly ``p = 1`` (λ₂ is non-decreasing in every ``p_j``).

    Args:
        laplacians: ``(M, n, n)`` matching Laplacians.
        budget: ``C_b ∈ (0, 1]``, the expected fraction of matchings active per mixing.
        iterations: supergradient steps.

    Returns:
        ``p`` of shape ``(M,)`` with ``0 ≤ p ≤ 1`` and ``Σ p ≤ C_b M`` (solved once per process for
        the same Laplacians and budget: a command builds its schedule more than once).
    """
    budget = _check_budget(budget)
    laplacians = np.ascontiguousarray(laplacians, dtype=np.float64)
    key = (hashlib.sha256(laplacians.tobytes()).digest(), laplacians.shape, budget, iterations)
    with _LOCK:
        known = _SOLVED.get(key)
    if known is None:
        known = _ascent(laplacians, budget, iterations)
        with _LOCK:
            _SOLVED[key] = known
            while len(_SOLVED) > 16:
                _SOLVED.popitem(last=False)
    return known.copy()


_SOLVED: OrderedDict = OrderedDict()  # (digest of the Laplacians, shape, budget, iterations) -> p
_LOCK = threading.Lock()


def _ascent(laplacians: np.ndarray, budget: float, iterations: int) -> np.ndarray:
    """:func:`activation_probabilities`' projected supergradient ascent."""
    count = len(laplacians)
    if budget >= 1.0:
        return np.ones(count)
    total = budget * count
    p = np.full(count, budget)
    best_p, best_val = p.copy(), -np.inf
    # Step scale: the supergradient entries vᵀL_jv lie in [0, 2], so a step of ~budget/2 moves p
    # by at most its own size.
    scale = 0.5 * budget
    for t in range(iterations):
        eigval, eigvec = np.linalg.eigh(np.tensordot(p, laplacians, axes=1))
        if eigval[1] > best_val:
            best_val, best_p = float(eigval[1]), p.copy()
        v = eigvec[:, 1]
        grad = np.einsum("i,jik,k->j", v, laplacians, v)
        norm = float(np.linalg.norm(grad))
        if norm == 0.0:
            break
        p = _project_budget(p + scale / math.sqrt(t + 1) * grad / norm, total)
    final = algebraic_connectivity(np.tensordot(p, laplacians, axes=1))
    return p if final > best_val else best_p


def expected_laplacian_moments(laplacians: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[L], E[L²])`` of ``L = Σ_j B_j L_j`` with independent ``B_j ~ Bernoulli(p_j)``.

    ``E[L] = Σ p_j L_j`` and ``E[L²] = E[L]² + 2 Σ p_j (1 − p_j) L_j`` (MATCHA, arXiv:1905.09435,
    using ``L_j² = 2 L_j``; checked against enumeration in the tests).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    mean = np.tensordot(p, laplacians, axes=1)
    second = mean @ mean + 2.0 * np.tensordot(p * (1.0 - p), laplacians, axes=1)
    return mean, second


def expected_gram(alpha: float, mean: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``E[WᵀW] = I − 2α E[L] + α² E[L²]`` for the symmetric ``W = I − αL`` (MATCHA,
    arXiv:1905.09435), from the moments of :func:`expected_laplacian_moments`."""
    return np.eye(len(mean)) - 2.0 * alpha * mean + alpha**2 * second


def contraction(alpha: float, mean: np.ndarray, second: np.ndarray) -> float:
    """``ρ(α) = ‖E[WᵀW] − J‖₂``: the largest eigenvalue modulus of the symmetric
    ``expected_gram(α, …) − J``."""
    return spectral.norm_minus_averaging(expected_gram(alpha, mean, second), symmetric=True)


def best_alpha(laplacians: np.ndarray, probabilities: np.ndarray, *, tol: float = 1e-10) -> tuple[float, float]:
    """α minimising ``ρ(α) = ‖E[W_kᵀ W_k] − J‖₂`` for ``W_k = I − α L^(k)`` (MATCHA, arXiv:1905.09435).

    ``E[WᵀW] − J = (I − J) − 2α E[L] + α² E[L²]`` is positive semi-definite and a matrix-convex
    function of α, so ρ is convex in α with ρ(0) = 1. The authors solve a small SDP; here the
    bracket ``[0, a]`` is grown until ρ(a) ≥ 1 and then narrowed by golden-section search to
    ``tol``, which finds the same minimiser.

    Returns:
        ``(alpha, rho)``: the step and the contraction it achieves (``rho < 1`` on a connected
        graph with positive probabilities).
    """
    mean, second = expected_laplacian_moments(laplacians, probabilities)
    hi = 1.0
    while contraction(hi, mean, second) < 1.0 and hi < 1e6:
        hi *= 2.0
    lo = 0.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = contraction(a, mean, second), contraction(b, mean, second)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = contraction(a, mean, second)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = contraction(b, mean, second)
    alpha = 0.5 * (lo + hi)
    return alpha, contraction(alpha, mean, second)


def _check_budget(budget) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"MATCHA budget C_b must be a number in (0, 1], got {budget!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"MATCHA budget C_b must lie in (0, 1] (expected fraction of matchings used per "
            f"mixing), got budget = {budget!r}"
        )
    return value


class MatchaSchedule(schedules.MixingSchedule):
    """The random mixing schedule of MATCHA: ``W^(r) = I − α Σ_j B_j^(r) L_j``.

    The draw ``B^(r)`` comes from ``numpy.random.default_rng([seed, r])``, so it depends only on
    ``(seed, r)``: every worker and host computes the same ``W^(r)``, in any order. Every ``W^(r)``
    is symmetric and doubly stochastic; its off-diagonal pattern lies inside the base graph's.

    Args:
        graph: the base graph (connected, undirected; nodes relabelled ``0..n-1`` in sorted order).
        budget: ``C_b ∈ (0, 1]``, the expected fraction of matchings active per mixing.
        seed: a non-negative integer seeding the draws.
        probabilities: activation probabilities to use instead of solving MATCHA's connectivity problem.
        alpha: the step to use instead of the 1-D search over α.

    Attributes:
        matchings: the edge lists of ``G_1 … G_M`` (:func:`coopsgd.core.topology.matchings`).
        laplacians: ``(M, n, n)`` array of their Laplacians (dense; built on first use, up to
            :data:`coopsgd.core.spectral.DENSE_EIG_LIMIT` nodes).
        probabilities: ``p``, shape ``(M,)``.
        alpha: the step α.

    Each ``W^(r)`` is a sparse MixingMatrix built from the active matchings' edges in O(edges).
    Solving for the probabilities and α needs the dense Laplacians, so beyond
    :data:`~coopsgd.core.spectral.DENSE_EIG_LIMIT` nodes pass both explicitly.
    """

    cycle = None

    def __init__(self, graph: nx.Graph, budget: float, seed: int = 0, *, probabilities=None, alpha=None):
        self.budget = _check_budget(budget)
        self.seed = require_int("MATCHA seed", seed, 0)
        graph = mixing.require_connected(topology.canonical(graph), "MATCHA")
        if graph.number_of_edges() == 0:
            raise ValueError("MATCHA needs a graph with at least one edge (a single worker never mixes)")
        self.graph = graph
        self.n = graph.number_of_nodes()
        self.matchings = topology.matchings(graph)
        self._edges = [np.asarray(edges, dtype=np.int64).reshape(-1, 2) for edges in self.matchings]
        if (probabilities is None or alpha is None) and self.n > spectral.DENSE_EIG_LIMIT:
            raise ValueError(
                f"MATCHA on {self.n} nodes: solving for the activation probabilities and alpha needs "
                f"dense {self.n} x {self.n} Laplacians (limit {spectral.DENSE_EIG_LIMIT} nodes); pass "
                "probabilities= and alpha= explicitly")
        if probabilities is None:
            p = activation_probabilities(self.laplacians, self.budget)
        else:
            p = np.asarray(probabilities, dtype=np.float64)
            if p.shape != (len(self.matchings),) or np.any(p < 0) or np.any(p > 1):
                raise ValueError(
                    f"MATCHA probabilities must be {len(self.matchings)} numbers in [0, 1] "
                    f"(one per matching), got {probabilities!r}"
                )
        p.setflags(write=False)
        self.probabilities = p
        if alpha is None:
            self.alpha, _ = best_alpha(self.laplacians, p)
        else:
            self.alpha = float(alpha)
            if not self.alpha > 0.0:
                raise ValueError(f"MATCHA alpha must be > 0, got alpha = {alpha!r}")
        edges = np.concatenate(self._edges)
        self._support = MixingMatrix.from_blocks(
            mixing.edge_matrix(self.n, edges[:, 0], edges[:, 1], 1.0, np.ones(self.n)))

    @property
    def support(self) -> MixingMatrix:
        """The base graph's pattern with the diagonal (0/1): every W^(r) lies inside it."""
        return self._support

    @property
    def laplacians(self) -> np.ndarray:
        """``(M, n, n)`` dense Laplacians of the matchings (built once, read-only)."""
        if "_laplacians" not in self.__dict__:
            if self.n > spectral.DENSE_EIG_LIMIT:
                raise ValueError(f"dense Laplacians of {self.n} nodes exceed the limit "
                                 f"{spectral.DENSE_EIG_LIMIT}; use the sparse W^(r) instead")
            lap = matching_laplacians(self.n, self.matchings)
            lap.setflags(write=False)
            self.__dict__["_laplacians"] = lap
        return self.__dict__["_laplacians"]

    @property
    def num_matchings(self) -> int:
        """M, the number of matchings."""
        return len(self.matchings)

    @property
    def mean_activation(self) -> float:
        """``Σ p_j / M``: the expected fraction of matchings active per mixing (≤ the budget)."""
        return float(np.mean(self.probabilities))

    def active(self, r: int) -> np.ndarray:
        """The Bernoulli draw ``B^(r)`` (boolean, shape ``(M,)``) of the ``r``-th mixing."""
        r = require_int("MATCHA round", r, 0)
        rng = np.random.default_rng([self.seed, r])
        return rng.random(len(self.probabilities)) < self.probabilities

    def laplacian_at(self, r: int) -> np.ndarray:
        """``L^(r) = Σ_j B_j^(r) L_j`` (dense; small n)."""
        return np.tensordot(self.active(r).astype(np.float64), self.laplacians, axes=1)

    def at(self, r: int) -> MixingMatrix:
        """``W^(r) = I − α L^(r)`` (MATCHA, arXiv:1905.09435): α on every active matched edge,
        ``1 − α · (active edges at i)`` on the diagonal; sparse, O(edges)."""
        on = [e for e, active in zip(self._edges, self.active(r)) if active]
        edges = np.concatenate(on) if on else np.zeros((0, 2), dtype=np.int64)
        count = np.bincount(edges.reshape(-1), minlength=self.n).astype(np.float64)
        return MixingMatrix.from_blocks(
            mixing.edge_matrix(self.n, edges[:, 0], edges[:, 1], self.alpha, 1.0 - self.alpha * count))

    @property
    def symmetric(self) -> bool:
        return True

    def expected_laplacian(self) -> np.ndarray:
        """``E[L^(r)] = Σ_j p_j L_j``."""
        return expected_laplacian_moments(self.laplacians, self.probabilities)[0]

    def expected_gram(self) -> np.ndarray:
        """``E[W^(r)ᵀ W^(r)] = I − 2α E[L] + α² E[L²]`` exactly (MATCHA, arXiv:1905.09435)."""
        return expected_gram(self.alpha, *expected_laplacian_moments(self.laplacians, self.probabilities))

    def __repr__(self) -> str:
        return (
            f"MatchaSchedule(n={self.n}, matchings={self.num_matchings}, budget={self.budget:g}, "
            f"mean_activation={self.mean_activation:.4g}, alpha={self.alpha:.4g}, seed={self.seed})"
        )


def matcha(graph: nx.Graph, budget: float, seed: int = 0, *, tau=1) -> Algorithm:
    """MATCHA decentralized SGD on ``graph`` with communication budget ``C_b = budget``.

    Returns an :class:`~coopsgd.core.algorithm.Algorithm` with ``v = 0`` whose mixing schedule is a
    :class:`MatchaSchedule`; ``algo.mixing_at(k)`` is the random ``W_k = I − α L^(k)``, applied
    after every local step (τ = 1, as in the paper) unless ``tau`` says otherwise.

    Args:
        graph: the base communication graph (networkx, connected, undirected).
        budget: ``C_b ∈ (0, 1]``: the expected fraction of matchings used per mixing.
            ``budget = 1`` activates every matching every time (D-PSGD with ``W = I − α L_G``).
        seed: seeds the activations; the same seed gives the same ``W_k`` everywhere.
        tau: the period (default 1).

    Raises:
        ValueError: budget outside (0, 1], a disconnected or edgeless graph, a negative seed.

    References:
        Wang, Sahu, Yang, Joshi & Kar, "MATCHA", arXiv:1905.09435.
    """
    return Algorithm(MatchaSchedule(graph, budget, seed), tau=tau, name="matcha")
