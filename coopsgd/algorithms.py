"""Every local-update SGD algorithm as one value A(τ, W, v), and the named ones of the literature.

Columns of ``X = [x^(1) … x^(m), z^(1) … z^(v)]`` are the m workers' models and v auxiliary
variables; one update runs them all, ``X_{k+1} = (X_k − η G_k) W_k`` with ``W_k = W`` after every
τ-th local step and ``I`` otherwise (Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021,
arXiv:1808.07576, §3).
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from coopsgd import mixing, schedules, topology

__all__ = [
    "Algorithm",
    "fully_sync",
    "local_sgd",
    "easgd",
    "dpsgd",
    "decentralized_periodic",
    "overlap_local_sgd",
    "easgd_matrix",
    "overlap_matrix",
]


class Algorithm:
    """The triple A(τ, W, v), validated and immutable.

    Args:
        W: an ``n × n`` column-stochastic matrix (``n = m + v``), or a
            :class:`~coopsgd.schedules.MixingSchedule` for a time-varying topology.
        tau: the period: an int ≥ 1, a :class:`~coopsgd.schedules.PeriodSchedule`, or a callable
            ``start_step -> τ``.
        v: number of auxiliary columns (the last ``v`` columns of W), ≥ 0.
        m: the number of workers, if you want W's size checked against ``m + v``.
        name: a label for reprs and tables.

    Example:
        >>> import coopsgd
        >>> algo = coopsgd.local_sgd(8, tau=4)
        >>> algo.m, algo.n, algo.zeta
        (8, 8, 0.0)
        >>> bool(algo.mixing_at(2).trace() == 8), bool(algo.mixing_at(3)[0, 0] == 1 / 8)
        (True, True)
    """

    __slots__ = ("_mixing", "_period", "_v", "_name")

    def __init__(self, W, tau=1, v: int = 0, *, m: int | None = None, name: str = "custom"):
        mixing_schedule = schedules.as_mixing(W)
        v = schedules.require_int("v", v, 0)
        if m is not None and mixing_schedule.n != schedules.require_int("m", m, 1) + v:
            raise ValueError(
                f"W is {mixing_schedule.n} x {mixing_schedule.n} but m + v = {m} + {v} = {m + v}"
            )
        if v >= mixing_schedule.n:
            raise ValueError(
                f"v = {v} auxiliary columns leave no workers in a {mixing_schedule.n} x "
                f"{mixing_schedule.n} W (n = m + v needs m >= 1)"
            )
        object.__setattr__(self, "_mixing", mixing_schedule)
        object.__setattr__(self, "_period", schedules.as_period(tau))
        object.__setattr__(self, "_v", v)
        object.__setattr__(self, "_name", str(name))

    def __setattr__(self, key, value):
        raise AttributeError(f"Algorithm is immutable; build a new one instead of setting {key!r}")

    @property
    def W(self):
        """The mixing matrix (read-only float64), or the mixing schedule if W varies with time."""
        cycle = self._mixing.cycle
        return cycle[0] if cycle is not None and len(cycle) == 1 else self._mixing

    @property
    def mixing(self) -> schedules.MixingSchedule:
        """The mixing schedule (static for a fixed W)."""
        return self._mixing

    @property
    def tau(self):
        """τ as an int when constant, else the period schedule."""
        const = self._period.constant_tau
        return const if const is not None else self._period

    @property
    def period(self) -> schedules.PeriodSchedule:
        return self._period

    @property
    def v(self) -> int:
        return self._v

    @property
    def n(self) -> int:
        return self._mixing.n

    @property
    def m(self) -> int:
        return self.n - self._v

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_static(self) -> bool:
        """Whether W is the same at every mixing."""
        return isinstance(self.W, np.ndarray)

    @property
    def symmetric(self) -> bool:
        """Whether every W_k is symmetric (so doubly stochastic), as Theorem 1 assumes."""
        return self._mixing.symmetric

    @property
    def zeta(self) -> float:
        """ζ of W (:func:`coopsgd.mixing.zeta`); for a time-varying W, ``sqrt(‖E[WᵀW] − J‖₂)``."""
        return mixing.zeta(self.W) if self.is_static else self._mixing.zeta

    def communicates(self, k: int) -> bool:
        """Whether the 0-based step ``k`` ends with a mixing."""
        return self._period.communicates(k)

    def mixing_at(self, k: int) -> np.ndarray:
        """``W_k``, the matrix applied after the 0-based step ``k``: ``W^(r)`` if step ``k`` ends
        round ``r``, else the identity."""
        if not self._period.communicates(k):
            return np.eye(self.n)
        return self._mixing.at(self._period.round_index(k))

    def __repr__(self) -> str:
        if self.is_static:
            kind = "symmetric" if self.symmetric else "column-stochastic"
            w = f"{self.n}x{self.n} {kind}"
        else:
            w = repr(self._mixing)
        return (
            f"Algorithm({self._name}: tau={self.tau!r}, W={w}, v={self._v}, m={self.m}, "
            f"zeta={self.zeta:.4g})"
        )


def fully_sync(m: int) -> Algorithm:
    """Fully synchronous (mini-batch) SGD: τ = 1, W = J_m, v = 0, ζ = 0."""
    m = schedules.require_int("m", m, 1)
    return Algorithm(mixing.averaging(m), tau=1, name="fully_sync")


def local_sgd(m: int, tau) -> Algorithm:
    """Local SGD / periodic averaging (PASGD): τ local steps, then exact averaging W = J_m.

    References:
        Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.1; Stich, "Local SGD converges fast
        and communicates little", ICLR 2019.
    """
    m = schedules.require_int("m", m, 1)
    return Algorithm(mixing.averaging(m), tau=tau, name="local_sgd")


def easgd_matrix(m: int, alpha: float) -> np.ndarray:
    """EASGD's W_α with the anchor last: ``[[(1−α) I_m, α 1_m], [α 1_mᵀ, 1 − mα]]``."""
    w = np.zeros((m + 1, m + 1))
    w[:m, :m] = (1.0 - alpha) * np.eye(m)
    w[:m, m] = w[m, :m] = alpha
    w[m, m] = 1.0 - m * alpha
    return w


def easgd(m: int, tau=1, alpha: float | None = None) -> Algorithm:
    """Elastic averaging SGD with one anchor z (v = 1) and τ local steps between elastic pulls.

    Each mixing does ``x_i ← (1−α) x_i + α z`` and ``z ← (1 − mα) z + α Σ_i x_i`` (all from the
    pre-mixing values). ζ = max(|1−α|, |1−(m+1)α|) < 1 iff 0 < α < 2/(m+1); the default is the
    minimiser α* = 2/(m+2), where ζ* = m/(m+2).

    References:
        Zhang, Choromanska & LeCun, "Deep learning with elastic averaging SGD", NeurIPS 2015
        (their α = ηρ); Wang & Joshi, "Cooperative SGD", §3.2.
    """
    m = schedules.require_int("m", m, 1)
    if alpha is None:
        alpha = 2.0 / (m + 2)
    alpha = float(alpha)
    if not 0.0 < alpha < 2.0 / (m + 1):
        raise ValueError(
            f"EASGD alpha must lie in (0, 2/(m+1)) = (0, {2.0 / (m + 1):.6g}) for m = {m} "
            f"(otherwise zeta >= 1 and workers never agree), got alpha = {alpha!r}"
        )
    return Algorithm(easgd_matrix(m, alpha), tau=tau, v=1, name="easgd")


def _consensus_matrix(graph_or_w, weights, purpose: str) -> np.ndarray:
    if isinstance(graph_or_w, nx.Graph):
        graph = mixing.require_connected(topology.canonical(graph_or_w), purpose)
        w = mixing.from_graph(graph, weights)
    else:
        w = mixing.check(graph_or_w, symmetric=True)
        mixing.require_connected(mixing.support_graph(w), purpose)
    z = mixing.zeta(w)
    if z >= 1.0 - 1e-12:
        raise ValueError(
            f"{purpose} needs zeta < 1, but this W has zeta = {z:.6g} (a bipartite graph with "
            "zero self-weights has an eigenvalue -1; use mixing.lazy(W) or a 'lazy_' rule)"
        )
    return w


def dpsgd(graph_or_W, weights="metropolis") -> Algorithm:
    """Decentralized parallel SGD: after every step each worker averages with its neighbours by W.

    ``x_j ← Σ_i W[i, j] (x_i − η g_i)`` with a symmetric doubly stochastic W on a connected graph
    (τ = 1, v = 0). Pass a networkx graph (weighted by the ``weights`` rule) or W itself.

    References:
        Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS
        2017; Wang & Joshi, "Cooperative SGD", §3.3.
    """
    return Algorithm(_consensus_matrix(graph_or_W, weights, "D-PSGD"), tau=1, name="dpsgd")


def decentralized_periodic(graph_or_W, tau, weights="metropolis") -> Algorithm:
    """Decentralized periodic averaging: τ local steps, then one neighbour averaging by W.

    References:
        Wang & Joshi, "Cooperative SGD", §3.4.
    """
    w = _consensus_matrix(graph_or_W, weights, "decentralized periodic averaging")
    return Algorithm(w, tau=tau, name="decentralized_periodic")


def overlap_matrix(m: int, alpha: float) -> np.ndarray:
    """Overlap Local-SGD's column-stochastic ``W_ov = [[(1−α) I_m, ((1−α)/m) 1_m], [α 1_mᵀ, α]]``."""
    w = np.zeros((m + 1, m + 1))
    w[:m, :m] = (1.0 - alpha) * np.eye(m)
    w[:m, m] = (1.0 - alpha) / m
    w[m, :] = alpha
    return w


def overlap_local_sgd(m: int, tau, alpha: float) -> Algorithm:
    """Overlap Local-SGD: every τ steps pull each model toward the anchor, then re-anchor.

    ``x_i ← (1−α) x_i + α z`` and ``z ← (1/m) Σ_i x_i`` over the pulled-back models; the anchor's
    all-reduce runs behind the next τ local steps. W_ov is column-stochastic but not symmetric, so
    Theorem 1 of Cooperative SGD does not apply; its eigenvalues are 1, 1−α (m−1 times) and 0.

    References:
        Wang, Liang & Joshi, "Overlap Local-SGD", ICASSP 2020, arXiv:2002.09539, Algorithm 1.
    """
    m = schedules.require_int("m", m, 1)
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"Overlap Local-SGD alpha must lie in [0, 1), got alpha = {alpha!r}")
    return Algorithm(overlap_matrix(m, alpha), tau=tau, v=1, name="overlap_local_sgd")
