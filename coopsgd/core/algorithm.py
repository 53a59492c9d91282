"""Every local-update SGD algorithm as one value A(τ, W, v).

Columns of ``X = [x^(1) … x^(m), z^(1) … z^(v)]`` are the m workers' models and v auxiliary
variables; one update runs them all, ``X_{k+1} = (X_k − η G_k) W_k`` with ``W_k = W`` after every
τ-th local step and ``I`` otherwise (Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021,
arXiv:1808.07576, §3). The named algorithms of the literature are built in :mod:`coopsgd.algorithms`.
"""

from __future__ import annotations

import numpy as np

from coopsgd.core import mixing, schedules, spectral
from coopsgd.core.operator import MixingMatrix, identity
from coopsgd.core.validate import INT32_MAX, INT32_RULE, require_int

__all__ = ["Algorithm"]


class Algorithm:
    """The triple A(τ, W, v), validated and immutable.

    Args:
        W: an ``n × n`` column-stochastic matrix (``n = m + v``: a NumPy array, a ``scipy.sparse``
            matrix or a :class:`~coopsgd.core.operator.MixingMatrix`), or a
            :class:`~coopsgd.core.schedules.MixingSchedule` for a time-varying topology.
        tau: the period: an int ≥ 1, a :class:`~coopsgd.core.schedules.PeriodSchedule`, or a
            callable ``start_step -> τ``.
        v: number of auxiliary columns (the last ``v`` columns of W), ≥ 0.
        m: the number of workers, if you want W's size checked against ``m + v``.
        name: a label for reprs and tables.
        mixer: for an algorithm whose mixing is not the linear ``X ← X W`` (compressed gossip,
            push-sum, an outer optimizer), the factory ``mixer(algorithm, devices) -> Mixer`` of
            its :class:`~coopsgd.parallel.protocol.Mixer` (``devices``: whether the workers are
            spread over devices); the trainer then runs it. None: the linear W.
        allow_nonconsensus: skip the consensus checks. By default a static W must have a
            connected support and ζ ≤ 1 (no eigenvalue but the one at 1 outside the unit circle:
            :func:`coopsgd.core.mixing.require_consensus`), and a time-varying W must connect the
            workers over its rounds (the union of its supports); set True to study a W that breaks
            them (independent workers, W = I; a divergent W).

    Raises:
        ValueError: a W that is not column-stochastic, real and finite; a disconnected W or one
            with ζ > 1 (unless ``allow_nonconsensus``); τ < 1 or τ > 2³¹ − 1 (the int32 step
            counter); a bad v or m.

    Example:
        >>> import coopsgd
        >>> algo = coopsgd.local_sgd(8, tau=4)
        >>> algo.m, algo.n, algo.zeta
        (8, 8, 0.0)
        >>> bool(algo.mixing_at(2).trace() == 8), bool(algo.mixing_at(3)[0, 0] == 1 / 8)
        (True, True)
    """

    __slots__ = ("_mixer", "_mixing", "_name", "_period", "_v")

    def __init__(self, W, tau=1, v: int = 0, *, m: int | None = None, name: str = "custom", mixer=None,
                 allow_nonconsensus: bool = False):
        v = require_int("v", v, 0)
        shape = getattr(W, "shape", None) or (np.shape(W) if not isinstance(W, schedules.MixingSchedule) else None)
        n = W.n if isinstance(W, schedules.MixingSchedule) else (shape[0] if shape else None)
        if m is not None and n is not None and n != require_int("m", m, 1) + v:
            raise ValueError(f"W is {n} x {n} but m + v = {m} + {v} = {m + v}")
        if n is not None and v >= n:
            raise ValueError(f"v = {v} auxiliary columns leave no workers in a {n} x {n} W (n = m + v needs m >= 1)")
        if not isinstance(W, (schedules.MixingSchedule, MixingMatrix)):
            W = mixing.check(W, v=v)  # named "W" in messages (a schedule's matrices are W[r])
        mixing_schedule = schedules.as_mixing(W, v)
        if not allow_nonconsensus:
            _require_consensus(mixing_schedule)
        period = schedules.as_period(tau)
        if period.constant_tau is not None:
            require_int("tau", period.constant_tau, 1, INT32_MAX, rule=INT32_RULE)
        object.__setattr__(self, "_mixing", mixing_schedule)
        object.__setattr__(self, "_period", period)
        object.__setattr__(self, "_v", v)
        object.__setattr__(self, "_name", str(name))
        if mixer is not None and not callable(mixer):
            raise ValueError(f"mixer must be a factory mixer(algorithm, devices) -> Mixer, got {mixer!r}")
        object.__setattr__(self, "_mixer", mixer)

    def __setattr__(self, key, value):
        raise AttributeError(f"Algorithm is immutable; build a new one instead of setting {key!r}")

    @property
    def W(self):
        """The mixing matrix (a read-only :class:`~coopsgd.core.operator.MixingMatrix`, which acts
        like a NumPy array for small n), or the mixing schedule if W varies with time."""
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
    def mixer(self):
        """The factory of this algorithm's own mixer, or None for the linear W."""
        return self._mixer

    @property
    def is_static(self) -> bool:
        """Whether W is the same at every mixing."""
        return isinstance(self.W, MixingMatrix)

    @property
    def symmetric(self) -> bool:
        """Whether every W_k is symmetric (so doubly stochastic), as Theorem 1 assumes."""
        return self._mixing.symmetric

    @property
    def zeta(self) -> float:
        """ζ of W (:func:`coopsgd.core.spectral.zeta`); for a time-varying W, ``sqrt(‖E[WᵀW] − J‖₂)``."""
        return spectral.zeta(self.W) if self.is_static else self._mixing.zeta

    def communicates(self, k: int) -> bool:
        """Whether the 0-based step ``k`` ends with a mixing (static periods)."""
        return self._period.communicates(k)

    def mixing_at(self, k: int) -> MixingMatrix:
        """``W_k``, the matrix applied after the 0-based step ``k``: ``W^(r)`` if step ``k`` ends
        round ``r``, else the identity (static periods)."""
        if not self._period.communicates(k):
            return identity(self.n, self._v)
        return self._mixing.at(self._period.round_index(k))

    def __repr__(self) -> str:
        if self.is_static:
            kind = "symmetric" if self.symmetric else "column-stochastic"
            w = f"{self.n}x{self.n} {kind}"
        else:
            w = repr(self._mixing)
        # ζ is cheap up to the dense limit and for static W; a large time-varying W's contraction
        # may take a while, so the repr leaves it to .zeta
        cheap = self.is_static or self.n <= spectral.DENSE_EIG_LIMIT
        zeta = f", zeta={self.zeta:.4g}" if cheap else ""
        return f"Algorithm({self._name}: tau={self.tau!r}, W={w}, v={self._v}, m={self.m}{zeta})"


_OPT_OUT = " (pass allow_nonconsensus=True to build it anyway)"


def _require_consensus(schedule: schedules.MixingSchedule) -> None:
    """A static W: connected and ζ ≤ 1; a cycle or a random schedule: the union of its supports
    connected (a schedule that says neither is not checked)."""
    cycle = schedule.cycle
    if cycle is not None and len(cycle) == 1:
        mixing.require_consensus(cycle[0], opt_out=_OPT_OUT)
    elif cycle is not None:
        mixing.require_connected_union(schedules._distinct(cycle), opt_out=_OPT_OUT)
    elif schedule.support is not None:
        mixing.require_connected_union([schedule.support], opt_out=_OPT_OUT)
