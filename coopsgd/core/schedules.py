"""Period schedules (how long each round is) and mixing schedules (which W each mixing uses).

A run is a sequence of *rounds*: round ``r`` starts at step ``s_r``, lasts ``τ_r`` local steps, and
its last step ends with the ``r``-th mixing, with ``W^(r)`` from the mixing schedule (Wang & Joshi,
Cooperative SGD, arXiv:1808.07576, §3: ``W_k = W`` after every τ-th step, ``I`` otherwise).

**Period schedules** are values with an explicit state, like an optax transformation::

    state = period.init()
    tau = period.tau(state, start, index)          # τ of round `index`, which starts at `start`
    tau, state = period.begin(state, start, index) # the same, recording the assignment
    state = period.observe(state, **report)        # after a round (adaptive rules read it)

The trainer calls ``begin`` when a round starts and keeps the state in its ``EngineState``,
checkpointed by value. Static schedules
(:func:`constant`, :func:`piecewise`, a callable ``start_step -> τ``) have no state and can also be
asked about any step ahead of time (``round_index``, ``round_start``, ``communicates``); adaptive
ones (AdaComm, ADPSGD in :mod:`coopsgd.algorithms.adaptive`) decide at run time.

**Mixing schedules** are deterministic functions of the round index (random ones of a seed and
the index), so every worker and every host derives the same ``W^(r)`` without talking.

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
import scipy.sparse as sp

from coopsgd.core import mixing, spectral, topology
from coopsgd.core.operator import DENSE_LIMIT, MixingMatrix
from coopsgd.core.validate import INT32_MAX, INT32_RULE, require_int

__all__ = [
    "AdaptivePeriod",
    "MixingSchedule",
    "PeriodSchedule",
    "as_mixing",
    "as_period",
    "constant",
    "cyclic",
    "one_peer_directed_exponential",
    "one_peer_exponential",
    "piecewise",
    "static",
]


class PeriodSchedule:
    """A static period schedule: ``tau_fn(start)`` is the period of the round that starts at step
    ``start``. Rounds are laid end to end from step 0.

    Args:
        tau_fn: ``start_step -> τ`` (an integer ≥ 1).
        description: shown in reprs.
    """

    adaptive = False

    def __init__(self, tau_fn: Callable[[int], int], description: str = "custom"):
        if not callable(tau_fn):
            raise ValueError(f"a period schedule needs a callable start_step -> tau, got {tau_fn!r}")
        self._tau_fn = tau_fn
        self.description = description
        self._ends: list[int] = []  # memo of the round ends (derived, never state)

    # -- the protocol ------------------------------------------------------------------------
    def init(self):
        """The schedule's state before the first round (``()`` for static schedules)."""
        return ()

    def tau(self, state, start: int, index: int) -> int:
        """The period of round ``index``, which starts at step ``start``."""
        return require_int(f"period at step {start}", self._tau_fn(start), 1, INT32_MAX, rule=INT32_RULE)

    def begin(self, state, start: int, index: int):
        """``(τ, state)`` when round ``index`` starts at ``start``: the period it gets and the state
        that records the assignment (unchanged unless a rule keeps track of it)."""
        return self.tau(state, start, index), state

    def observe(self, state, **report):
        """The state after a round; a static schedule ignores the report."""
        return state

    @property
    def constant_tau(self) -> int | None:
        """τ if the period never changes, else None."""
        return None

    # -- rounds ahead of time (static schedules only) -----------------------------------------
    def _extend_past(self, k: int) -> None:
        while not self._ends or self._ends[-1] <= k:
            start = self._ends[-1] if self._ends else 0
            self._ends.append(start + self.tau((), start, len(self._ends)))

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

    def __repr__(self) -> str:
        return f"PeriodSchedule({self.description})"


def _tuples(x):
    """JSON lists back to tuples (so a restored state compares equal to the saved one)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class AdaptivePeriod(PeriodSchedule):
    """Base of period schedules decided at run time from what the loop observes.

    Subclasses implement ``init`` (returning a NamedTuple of plain values), ``tau(state, start,
    index)`` and ``observe(state, **report)``, and may override ``begin``; their rounds cannot be
    asked for ahead of time, so ``round_index``, ``round_start`` and ``communicates`` raise. The
    trainer tracks the current round in ``EngineState.period``; checkpoints save the state as JSON
    and :meth:`restore` rebuilds it (a ``history`` field's entries as ``history_entry``, when a
    subclass names that NamedTuple).
    """

    adaptive = True
    history_entry = None

    def __init__(self, description: str):
        super().__init__(lambda start: 1, description)

    def restore(self, saved):
        """The state from its JSON form (``state._asdict()`` after a JSON round trip)."""
        state_type = type(self.init())
        if not hasattr(state_type, "_fields"):
            raise ValueError(f"{self.description}: restoring needs a NamedTuple state from init(), "
                             f"got {state_type.__name__}")
        state = state_type(**{k: _tuples(v) for k, v in dict(saved).items()})
        if self.history_entry is not None and "history" in state._fields:
            state = state._replace(history=tuple(self.history_entry(*h) for h in state.history))
        return state

    def _ahead(self, what: str):
        raise ValueError(
            f"{self.description} decides each period at run time from what the training loop "
            f"observes, so {what} is not known ahead; the trainer's EngineState.period holds the "
            "current round")

    def round_index(self, k: int) -> int:
        self._ahead(f"the round of step {k}")

    def round_start(self, r: int) -> int:
        self._ahead(f"the start of round {r}")

    def communicates(self, k: int) -> bool:
        self._ahead(f"whether step {k} mixes")


class _ConstantPeriod(PeriodSchedule):
    def __init__(self, tau: int):
        self._tau = require_int("tau", tau, 1)
        super().__init__(lambda _: self._tau, str(self._tau))

    def tau(self, state, start: int, index: int) -> int:
        return self._tau

    def round_index(self, k: int) -> int:
        return k // self._tau

    def round_start(self, r: int) -> int:
        return r * self._tau

    def communicates(self, k: int) -> bool:
        return (k + 1) % self._tau == 0

    @property
    def constant_tau(self) -> int:
        return self._tau


def constant(tau: int) -> PeriodSchedule:
    """A fixed period τ ≥ 1: mix after steps τ−1, 2τ−1, … (τ = 1: after every step)."""
    return _ConstantPeriod(tau)


def piecewise(segments: Sequence[tuple[int, int]]) -> PeriodSchedule:
    """Periods that change at given steps: ``[(0, 8), (1000, 2)]`` uses τ = 8 for rounds starting
    before step 1000 and τ = 2 after (a round keeps the τ of the step it starts at)."""
    segments = [(require_int("segment start", s, 0, INT32_MAX, rule=INT32_RULE),
                 require_int("segment tau", t, 1, INT32_MAX, rule=INT32_RULE)) for s, t in segments]
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


# ------------------------------------------------------------------------------ mixing schedules


def _distinct(ops: Sequence[MixingMatrix]) -> list[MixingMatrix]:
    """The distinct matrix objects of ``ops``, in order of first appearance (a long cycle that
    repeats a few matrices, as hierarchical averaging's does, is worked on once per matrix)."""
    return list({id(w): w for w in ops}.values())


def _pattern(ops: Sequence[MixingMatrix]) -> MixingMatrix:
    """The union of the non-zero patterns of ``ops`` as a 0/1 MixingMatrix (v = 0)."""
    ops = _distinct(ops)
    n = ops[0].n
    if n <= DENSE_LIMIT:
        union = np.logical_or.reduce([np.asarray(w) != 0 for w in ops]).astype(float)
        return MixingMatrix.from_blocks(sp.csr_array(union) if n > 1 else union)
    union = sum(abs(w.tocsr()) for w in ops)
    union.data[:] = 1.0
    return MixingMatrix.from_blocks(union)


class MixingSchedule:
    """The W used at each mixing: ``at(r)`` is ``W^(r)``, the matrix of the ``r``-th mixing.

    Subclasses define ``at`` (returning a :class:`~coopsgd.core.operator.MixingMatrix`) and ``n``.
    A schedule that repeats a finite list sets ``cycle`` to it (the engine then compiles each
    matrix's communication once); a random one sets ``support``, the pattern every W^(r) lies in
    (a 0/1 MixingMatrix), from which the engine picks its neighbour exchanges.
    """

    n: int
    v: int = 0
    cycle: tuple[MixingMatrix, ...] | None = None
    support = None
    """A random schedule's pattern: every W^(r) is non-zero only where it is (an array or a
    MixingMatrix of 0/1, with the diagonal)."""

    def at(self, r: int) -> MixingMatrix:
        """W of round ``r``."""
        raise NotImplementedError

    @property
    def symmetric(self) -> bool:
        """Whether every W^(r) is symmetric (so doubly stochastic); a random schedule that does
        not say so (by overriding this) is taken not to be."""
        return self.cycle is not None and all(w.is_symmetric(mixing.ATOL) for w in _distinct(self.cycle))

    def with_auxiliary(self, v: int) -> MixingSchedule:
        """The same schedule with the last ``v`` columns of every W^(r) read as auxiliary."""
        if v == self.v:
            return self
        if self.cycle is None:
            raise ValueError(f"{type(self).__name__} has no auxiliary columns; it needs v = {self.v}")
        split = {id(w): w.with_auxiliary(v) for w in _distinct(self.cycle)}
        return _Cyclic([split[id(w)] for w in self.cycle], getattr(self, "description", "cyclic"), v)

    def expected_gram(self):
        """``E[W^(r)ᵀ W^(r)]`` over rounds (the uniform average over a cycle): a dense array up to
        the dense limit, a sparse MixingMatrix beyond."""
        if self.cycle is None:
            raise NotImplementedError(f"{type(self).__name__} does not know E[WᵀW] in closed form")
        counts: dict[int, int] = {}
        for w in self.cycle:
            counts[id(w)] = counts.get(id(w), 0) + 1
        distinct = _distinct(self.cycle)
        if self.n <= spectral.DENSE_EIG_LIMIT:
            return sum(counts[id(w)] * (np.asarray(w).T @ np.asarray(w)) for w in distinct) / len(self.cycle)
        return MixingMatrix.from_blocks(
            sum(counts[id(w)] * (w.tocsr().T @ w.tocsr()) for w in distinct) / len(self.cycle))

    def contraction(self) -> float:
        """``‖E[Wᵀ W] − J‖₂`` over the cycle, which replaces ζ² in the bound when W is drawn i.i.d.
        each round (Wang et al., MATCHA, arXiv:1905.09435, Theorem 1); a deterministic cycle is held
        to its worst W^(r) instead (:func:`coopsgd.analysis.consensus.consensus_rate`). Beyond the dense
        limit a cycle of circulant or of exchangeable matrices has a closed form
        (:func:`coopsgd.core.spectral.cycle_contraction`)."""
        if self.cycle is not None and self.n > spectral.DENSE_EIG_LIMIT:
            closed = spectral.cycle_contraction(self.cycle)
            if closed is not None:
                return closed
        return spectral.norm_minus_averaging(self.expected_gram())

    @property
    def zeta(self) -> float:
        """A ζ-equivalent: ``sqrt(‖E[WᵀW] − J‖₂)``, equal to ζ(W) for a static symmetric W."""
        return math.sqrt(self.contraction())


class _Cyclic(MixingSchedule):
    def __init__(self, matrices: Sequence, description: str, v: int = 0):
        if len(matrices) == 0:
            raise ValueError("a cyclic mixing schedule needs at least one matrix")
        checked: dict[int, MixingMatrix] = {}  # each distinct matrix object is checked once
        cycle = []
        for i, w in enumerate(matrices):
            if id(w) not in checked:
                checked[id(w)] = mixing.check(w, n=cycle[0].n if cycle else None, name=f"W[{i}]", v=v)
            cycle.append(checked[id(w)])
        self.cycle = tuple(cycle)
        first = cycle[0]
        self.n, self.v = first.n, first.v
        self.description = description

    def at(self, r: int) -> MixingMatrix:
        """W of round ``r``."""
        return self.cycle[r % len(self.cycle)]

    @property
    def support(self) -> MixingMatrix:
        """The union of the non-zero patterns of the cycle's matrices."""
        return _pattern(self.cycle)

    def __repr__(self) -> str:
        return f"{self.description}(n={self.n}, length={len(self.cycle)})"


def static(w, v: int = 0) -> MixingSchedule:
    """The same W at every mixing (its last ``v`` columns auxiliary)."""
    return _Cyclic([w], "static", v)


def cyclic(matrices: Sequence, v: int = 0, description: str = "cyclic") -> MixingSchedule:
    """``W^(r) = matrices[r mod len(matrices)]``: a time-varying topology that repeats (the last
    ``v`` columns of every matrix auxiliary; ``description`` names it in reprs). A matrix object
    that appears several times is checked and planned once."""
    return _Cyclic(list(matrices), str(description), v)


def one_peer_exponential(n: int) -> MixingSchedule:
    """Time-varying exponential graph: at mixing ``r`` node ``i`` averages with ``i ± 2^(r mod ⌈log₂ n⌉)``.

    Each ``W^(r)`` is the Metropolis matrix of the circulant graph with that offset (weights 1/3,
    or 1/2 when the offset is ``n/2``); for ``n`` a power of two the cycle's union is
    :func:`coopsgd.core.topology.exponential`.

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


def one_peer_directed_exponential(n: int) -> MixingSchedule:
    """The one-peer directed exponential graph as mixings: at mixing ``r`` node ``i`` keeps half of
    its model and sends half to ``i + 2^(r mod ⌈log₂ n⌉)`` alone (one message per node and round;
    :func:`coopsgd.core.topology.one_peer_exponential_digraphs`). Every node also receives from
    exactly one, so each W^(r) = (push weights)ᵀ is doubly stochastic but not symmetric.

    References:
        Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep Training",
        NeurIPS 2021, §4; Assran et al., "Stochastic gradient push", ICML 2019, §6.
    """
    n = require_int("n", n, 2)
    return _Cyclic([mixing.push_weights(g).T for g in topology.one_peer_exponential_digraphs(n)],
                   "one_peer_directed_exponential")


def as_mixing(w, v: int = 0) -> MixingSchedule:
    """A MixingSchedule is kept (its matrices re-split for ``v`` auxiliary columns); a matrix
    becomes a static schedule."""
    return w.with_auxiliary(v) if isinstance(w, MixingSchedule) else static(w, v)
