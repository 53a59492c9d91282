"""Period schedules (which steps end with a mixing) and mixing schedules (which W each mixing uses).

A run is a sequence of *rounds*: round ``r`` starts at step ``s_r``, lasts ``τ_r`` local steps, and
its last step ends with the ``r``-th mixing, with ``W^(r)`` from the mixing schedule (Wang & Joshi,
Cooperative SGD, arXiv:1808.07576, §3: ``W_k = W`` after every τ-th step, ``I`` otherwise). Both
kinds of schedule are deterministic functions of the step or round index (and a seed for random
ones), so every worker and every host derives the same ``W_k`` without talking.

Example — a period that doubles every 100 steps, on a ring that alternates with its lazy version::

    import networkx as nx
    import coopsgd
    from coopsgd import mixing, schedules

    w = mixing.metropolis(nx.cycle_graph(8))
    algo = coopsgd.Algorithm(
        W=schedules.cyclic([w, mixing.lazy(w)]),
        tau=lambda step: 2 ** (step // 100),
    )
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np

from coopsgd import mixing

__all__ = [
    "PeriodSchedule",
    "constant",
    "piecewise",
    "as_period",
    "MixingSchedule",
    "static",
    "cyclic",
    "one_peer_exponential",
    "as_mixing",
    "require_int",
]


def require_int(name: str, value, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``; otherwise raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class PeriodSchedule:
    """Round lengths: ``tau_at(s)`` is the period of the round that starts at step ``s``.

    Rounds are laid end to end from step 0, so step ``k`` (0-based) ends with a mixing iff ``k + 1``
    is the end of a round. Round boundaries are computed lazily and cached.

    Args:
        tau_fn: ``start_step -> τ`` (an integer ≥ 1) for the round starting at ``start_step``.
        description: shown in reprs.
    """

    def __init__(self, tau_fn: Callable[[int], int], description: str = "custom"):
        if not callable(tau_fn):
            raise ValueError(f"a period schedule needs a callable start_step -> tau, got {tau_fn!r}")
        self._tau_fn = tau_fn
        self.description = description
        self._ends: list[int] = []  # exclusive end step of each round, increasing

    def tau_at(self, start_step: int) -> int:
        """The period of the round that starts at ``start_step``."""
        return require_int(f"period at step {start_step}", self._tau_fn(start_step), 1)

    def _extend_past(self, k: int) -> None:
        while not self._ends or self._ends[-1] <= k:
            start = self._ends[-1] if self._ends else 0
            self._ends.append(start + self.tau_at(start))

    def round_index(self, k: int) -> int:
        """Index ``r`` of the round that step ``k`` belongs to."""
        self._extend_past(k)
        return bisect.bisect_right(self._ends, k)

    def round_start(self, r: int) -> int:
        """First step of round ``r``."""
        while len(self._ends) < r:
            self._extend_past(self._ends[-1] if self._ends else 0)
        return 0 if r == 0 else self._ends[r - 1]

    def communicates(self, k: int) -> bool:
        """Whether step ``k`` (0-based) ends with a mixing."""
        self._extend_past(k)
        r = bisect.bisect_right(self._ends, k)
        return self._ends[r] == k + 1

    @property
    def constant_tau(self) -> int | None:
        """τ if the period never changes, else None."""
        return None

    def __repr__(self) -> str:
        return f"PeriodSchedule({self.description})"


class _ConstantPeriod(PeriodSchedule):
    def __init__(self, tau: int):
        self.tau = require_int("tau", tau, 1)
        super().__init__(lambda _: self.tau, str(self.tau))

    def round_index(self, k: int) -> int:
        return k // self.tau

    def round_start(self, r: int) -> int:
        return r * self.tau

    def communicates(self, k: int) -> bool:
        return (k + 1) % self.tau == 0

    @property
    def constant_tau(self) -> int:
        return self.tau


def constant(tau: int) -> PeriodSchedule:
    """A fixed period τ ≥ 1: mix after steps τ−1, 2τ−1, … (τ = 1: after every step)."""
    return _ConstantPeriod(tau)


def piecewise(segments: Sequence[tuple[int, int]]) -> PeriodSchedule:
    """Periods that change at given steps: ``[(0, 8), (1000, 2)]`` uses τ = 8 for rounds starting
    before step 1000 and τ = 2 after (a round keeps the τ of the step it starts at)."""
    segments = [(require_int("segment start", s, 0), require_int("segment tau", t, 1)) for s, t in segments]
    if not segments or segments[0][0] != 0:
        raise ValueError(f"piecewise periods must start at step 0, got segments {segments}")
    starts = [s for s, _ in segments]
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"piecewise segment starts must increase strictly, got {starts}")
    taus = [t for _, t in segments]
    return PeriodSchedule(
        lambda step: taus[bisect.bisect_right(starts, step) - 1],
        "piecewise " + ", ".join(f"{t} from {s}" for s, t in segments),
    )


def as_period(tau) -> PeriodSchedule:
    """An int is a constant period; a PeriodSchedule is kept; a callable ``start_step -> τ`` is wrapped."""
    if isinstance(tau, PeriodSchedule):
        return tau
    if callable(tau):
        return PeriodSchedule(tau, getattr(tau, "__name__", "custom"))
    return constant(tau)


class MixingSchedule:
    """The W used at each mixing: ``at(r)`` is ``W^(r)``, the matrix of the ``r``-th mixing.

    Subclasses define ``at``. A schedule that repeats a finite list sets ``cycle`` to it (the engine
    then compiles each matrix's communication once). ``support`` is the union of the non-zero
    patterns of every W it can return: the engine uses it to pick neighbour exchanges.
    """

    n: int
    cycle: tuple[np.ndarray, ...] | None = None
    support: np.ndarray

    def at(self, r: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def symmetric(self) -> bool:
        """Whether every W^(r) is symmetric (so doubly stochastic)."""
        return all(np.allclose(w, w.T, atol=mixing.ATOL) for w in self.cycle or ())

    def expected_gram(self) -> np.ndarray:
        """``E[W^(r)ᵀ W^(r)]`` over rounds (the uniform average over a cycle)."""
        if self.cycle is None:
            raise NotImplementedError(f"{type(self).__name__} does not know E[WᵀW] in closed form")
        return sum(w.T @ w for w in self.cycle) / len(self.cycle)

    def contraction(self) -> float:
        """``‖E[Wᵀ W] − J‖₂``, which replaces ζ² in the bound for time-varying W (Wang & Joshi,
        Cooperative SGD, §5; Wang et al., MATCHA, arXiv:1905.09435, Theorem 1)."""
        return float(np.linalg.norm(self.expected_gram() - mixing.averaging(self.n), 2))

    @property
    def zeta(self) -> float:
        """A ζ-equivalent: ``sqrt(‖E[WᵀW] − J‖₂)``, equal to ζ(W) for a static symmetric W."""
        return math.sqrt(self.contraction())


class _Cyclic(MixingSchedule):
    def __init__(self, matrices: Sequence[np.ndarray], description: str):
        if len(matrices) == 0:
            raise ValueError("a cyclic mixing schedule needs at least one matrix")
        first = mixing.check(matrices[0], name="W[0]")
        self.cycle = (first,) + tuple(
            mixing.check(w, n=len(first), name=f"W[{i}]") for i, w in enumerate(matrices[1:], 1)
        )
        self.n = len(first)
        self.support = np.logical_or.reduce([w != 0 for w in self.cycle])
        self.description = description

    def at(self, r: int) -> np.ndarray:
        return self.cycle[r % len(self.cycle)]

    def __repr__(self) -> str:
        return f"{self.description}(n={self.n}, length={len(self.cycle)})"


def static(w) -> MixingSchedule:
    """The same W at every mixing."""
    return _Cyclic([w], "static")


def cyclic(matrices: Sequence[np.ndarray]) -> MixingSchedule:
    """``W^(r) = matrices[r mod len(matrices)]``: a time-varying topology that repeats."""
    return _Cyclic(list(matrices), "cyclic")


def one_peer_exponential(n: int) -> MixingSchedule:
    """Time-varying exponential graph: at mixing ``r`` node ``i`` averages with ``i ± 2^(r mod ⌈log₂ n⌉)``.

    Each ``W^(r)`` is the Metropolis matrix of the circulant graph with that offset (weights 1/3,
    or 1/2 when the offset is ``n/2``); for ``n`` a power of two the cycle's union is
    :func:`coopsgd.topology.exponential`.

    References:
        Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep Training",
        NeurIPS 2021, §4 (one-peer exponential graph; here the symmetric two-peer form).
    """
    n = require_int("n", n, 2)
    matrices = []
    for j in range(math.ceil(math.log2(n))):
        hop = 2**j
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from((i, (i + hop) % n) for i in range(n))
        matrices.append(mixing.metropolis(graph))
    return _Cyclic(matrices, "one_peer_exponential")


def as_mixing(w) -> MixingSchedule:
    """A MixingSchedule is kept; a matrix becomes a static schedule."""
    return w if isinstance(w, MixingSchedule) else static(w)


# Adaptive periods live in coopsgd.adaptive (which imports this module); they are re-exported here
# lazily (PEP 562) so that importing schedules stays light and free of import cycles.
_ADAPTIVE_NAMES = ("adacomm_period", "adacomm", "AdaComm", "adpsgd", "ADPSGD")
__all__ += list(_ADAPTIVE_NAMES)


def __getattr__(name: str):
    if name in _ADAPTIVE_NAMES:
        from coopsgd import adaptive

        return getattr(adaptive, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
