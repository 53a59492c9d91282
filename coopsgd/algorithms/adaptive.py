"""Adaptive communication periods: AdaComm (τ shrinks as the loss falls) and ADPSGD (τ grows as the
workers' models agree).

Both are :class:`~coopsgd.core.schedules.AdaptivePeriod` values: immutable rules whose state is
an explicit NamedTuple of plain numbers, kept by the trainer in ``EngineState.period`` and saved
and restored by value::

    state = rule.init()
    tau = rule.tau(state, start, index)    # the period of round `index`, starting at step `start`
    state = rule.observe(state, start=..., index=..., tau=..., **measurements)   # after the round

``trainer.observe(state, **measurements)`` fills in the round's position. The measurements each
rule reads: ``loss``, ``time`` (and ``lr`` or ``step``) for AdaComm; ``consensus`` for ADPSGD.
Both ignore extra keywords, so a loop may pass one metrics dict to any adaptive schedule.

Plain NumPy/Python; nothing here is traced by JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from coopsgd.core.schedules import AdaptivePeriod
from coopsgd.core.validate import require_int, require_number

__all__ = [
    "ADPSGD",
    "ADPSGDRound",
    "ADPSGDState",
    "AdaComm",
    "AdaCommState",
    "AdaCommUpdate",
    "adacomm",
    "adacomm_period",
    "adpsgd",
    "consensus_distance",
]

_CEIL_SLACK = 1e-9
"""Relative slack so that ⌈x⌉ of a value that is an integer up to round-off (e.g. √0.36 · 10) is
that integer, not the next one."""


def _position(rule: str, start, index, tau) -> tuple[int, int, int]:
    if start is None or index is None or tau is None:
        raise ValueError(
            f"{rule}.observe needs the observed round's start, index and tau (trainer.observe "
            "fills them in); observe is called after a round, not before any round")
    return (require_int("round start", start, 0), require_int("round index", index, 0),
            require_int("round tau", tau, 1))


def adacomm_period(tau0: int, loss0: float, loss: float, lr0: float = 1.0, lr: float = 1.0) -> int:
    """AdaComm's period for the next wall-clock interval (Wang & Joshi, AdaComm, arXiv:1810.08313:
    the rule for a fixed learning rate and its learning-rate-aware form)::

        τ_l = ⌈ sqrt( (η_0 / η_l) · F(x_l) / F(x_0) ) · τ_0 ⌉,   at least 1.

    ``F(x_l)`` is the worker-averaged training loss at the start of interval ``l`` and ``F(x_0)``
    the initial one; with a constant learning rate the η factor is 1. τ shrinks as the loss falls
    and grows when the learning rate decays.

    Args:
        tau0: the initial period τ_0 ≥ 1.
        loss0: F(x_0) > 0.
        loss: F(x_l) ≥ 0.
        lr0, lr: the initial and the current learning rate (> 0).

    Example:
        >>> adacomm_period(10, loss0=2.0, loss=0.5)        # ⌈sqrt(1/4)·10⌉
        5
        >>> adacomm_period(10, 2.0, 0.5, lr0=0.1, lr=0.01)  # ⌈sqrt(10/4)·10⌉ = ⌈15.81⌉
        16
    """
    tau0 = require_int("AdaComm tau0", tau0, 1)
    rule = "AdaComm: tau_l = ceil(sqrt((lr0/lr) * loss/loss0) * tau0)"
    loss0 = require_number("AdaComm loss0", loss0, positive=True, rule=rule)
    loss = require_number("AdaComm loss", loss, positive=False, rule=rule)
    lr0 = require_number("AdaComm lr0", lr0, positive=True, rule=rule)
    lr = require_number("AdaComm lr", lr, positive=True, rule=rule)
    x = math.sqrt((lr0 / lr) * (loss / loss0)) * tau0
    return max(1, math.ceil(x - _CEIL_SLACK * max(1.0, x)))


class AdaCommUpdate(NamedTuple):
    """One interval update of AdaComm: when, at what loss and learning rate, and the new τ."""

    time: float
    loss: float
    lr: float | None
    tau: int


class AdaCommState(NamedTuple):
    """AdaComm's state: the current period, the next interval boundary, the last observed time,
    F(x_0) and η_0 once known, and the interval updates so far."""

    tau: int
    next_update: float
    last_time: float
    loss0: float | None
    lr0: float | None
    history: tuple = ()


class AdaComm(AdaptivePeriod):
    """AdaComm's adaptive period: τ is recomputed every ``interval`` of (simulated) wall-clock time
    from the worker-averaged training loss by :func:`adacomm_period`.

    Protocol: every round started gets the current period (``tau(state, …) = state.tau``); after
    each round the loop observes the worker-averaged training loss, the simulated wall-clock time
    at the end of the round (e.g. from :mod:`coopsgd.sim.runtime`), and the learning rate in use.
    When ``time`` reaches the next interval boundary ``l · interval``, the period for the
    following rounds becomes ``adacomm_period(tau0, loss0, loss, lr0, lr)``; the next boundary is
    the first multiple of ``interval`` after ``time``.

    Args:
        tau0: the initial period τ_0 ≥ 1 (the paper picks it by a short grid search).
        interval: T_0 > 0, the wall-clock length of an interval.
        loss0: F(x_0); by default the first observed loss.
        lr0: η_0; by default the learning rate in effect at the first ``observe`` (``lr=`` or
            ``lr_schedule(step)``), so a warm-up starting at 0 is harmless; without either the
            learning-rate factor is 1.
        lr_schedule: optional ``step -> η`` (e.g. an optax schedule) used when ``observe`` is given
            a ``step`` but no ``lr``.
        tau_max: optional upper cap on τ.

    References:
        Wang & Joshi, "Adaptive Communication Strategies to Achieve the Best Error-Runtime
        Trade-off in Local-Update SGD", SysML 2019, arXiv:1810.08313.
    """

    history_entry = AdaCommUpdate

    def __init__(self, tau0: int, interval: float, *, loss0: float | None = None, lr0: float | None = None,
                 lr_schedule: Callable[[int], float] | None = None, tau_max: int | None = None):
        self.tau0 = require_int("AdaComm tau0", tau0, 1)
        self.interval = require_number("AdaComm interval", interval, positive=True,
                                rule="wall-clock length between period updates")
        self.tau_max = None if tau_max is None else require_int("AdaComm tau_max", tau_max, self.tau0)
        if lr_schedule is not None and not callable(lr_schedule):
            raise ValueError(f"AdaComm lr_schedule must be a callable step -> lr, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.loss0 = None if loss0 is None else require_number("AdaComm loss0", loss0, positive=True,
                                                       rule="the initial training loss")
        self.lr0 = None if lr0 is None else require_number("AdaComm lr0", lr0, positive=True,
                                                   rule="the initial learning rate")
        super().__init__(f"AdaComm(tau0={self.tau0}, interval={self.interval:g})")

    def init(self) -> AdaCommState:
        return AdaCommState(tau=self.tau0, next_update=self.interval, last_time=0.0, loss0=self.loss0,
                            lr0=self.lr0)

    def tau(self, state: AdaCommState, start: int, index: int) -> int:
        return state.tau

    def _lr(self, lr, step) -> float | None:
        if lr is not None:
            return require_number("AdaComm lr", lr, positive=True, rule="the current learning rate")
        if self.lr_schedule is not None and step is not None:
            return require_number("AdaComm lr_schedule(step)", self.lr_schedule(step), positive=True,
                           rule="the current learning rate")
        return None

    def observe(self, state: AdaCommState, *, loss: float, time: float, lr: float | None = None,
                step: int | None = None, **_ignored) -> AdaCommState:
        """The state after a round.

        Args:
            state: the state before.
            loss: the worker-averaged training loss F(x) now.
            time: simulated wall-clock time now (non-decreasing across calls).
            lr: the learning rate in use now; if omitted, ``lr_schedule(step)`` when both exist,
                else the learning-rate factor is 1.
            step: the number of local steps done so far (only used with ``lr_schedule``).
        """
        loss = require_number("AdaComm loss", loss, positive=False, rule="the worker-averaged training loss")
        time = require_number("AdaComm time", time, positive=False, rule="simulated wall-clock time")
        if time < state.last_time:
            raise ValueError(f"AdaComm time must not decrease: got {time!r} after {state.last_time!r}")
        lr = self._lr(lr, step)
        lr0 = state.lr0 if state.lr0 is not None else lr  # the rate at the first observation
        loss0 = state.loss0
        if loss0 is None:
            if loss == 0:
                raise ValueError("AdaComm loss0 (the first observed loss) must be > 0, got 0.0")
            loss0 = loss
        tau, next_update, history = state.tau, state.next_update, state.history
        if time >= next_update:
            base = lr0 if lr0 is not None else 1.0
            tau = adacomm_period(self.tau0, loss0, loss, base, lr if lr is not None else base)
            tau = min(tau, self.tau_max) if self.tau_max is not None else tau
            history = history + (AdaCommUpdate(time, loss, lr, tau),)
            next_update = (math.floor(time / self.interval) + 1) * self.interval
        return AdaCommState(tau, next_update, time, loss0, lr0, history)


def adacomm(tau0: int, interval: float, **kwargs) -> AdaComm:
    """An :class:`AdaComm` period schedule (see there for keywords and the ``observe`` protocol)."""
    return AdaComm(tau0, interval, **kwargs)


class ADPSGDRound(NamedTuple):
    """One observed round of ADPSGD: its start, length, consensus distance and drift rate."""

    start: int
    tau: int
    consensus: float
    rate: float


class ADPSGDState(NamedTuple):
    """ADPSGD's state: the current period, the target Δ* once known, averagings spent, and the
    observed rounds."""

    tau: int
    target: float | None
    averagings: int = 0
    history: tuple = ()


class ADPSGD(AdaptivePeriod):
    """Adaptive periodic averaging: the period grows as the workers' models drift apart more slowly,
    under a budget of averagings (after Jiang & Agrawal, ADPSGD, arXiv:2007.06134).

    The paper's argument: the error of periodic averaging is governed by the variance of the
    parameters across workers, which is large early in training and small later, so under a fixed
    budget of averagings it pays to average often early and rarely late. Its exact schedule is not
    pinned down here; this class implements the following rule (coopsgd's choice).

    **Rule.** After round ``r`` (period ``τ_r``) the loop reports the consensus distance before the
    averaging, ``Δ_r = (1/m) Σ_i ‖x_i − x̄‖²`` (see :func:`consensus_distance`), measured ``s`` steps
    into the round (default ``s = τ_r``). Since exact averaging resets Δ to 0, Δ grows roughly
    linearly over a round, at rate ``ρ_r = Δ_r / s``.
    The target ``Δ*`` is the disagreement tolerated per round (by default ``ρ_0 τ_0``, the
    disagreement the first round builds up). The next period is the
    longest one predicted to stay within the target, never shorter than the current one and
    growing by at most ``max_growth`` per round::

        τ_{r+1} = min( max(τ_r, ⌊Δ* / ρ_r⌋), cap_r, tau_max ),
        cap_r = max(⌊max_growth · τ_r⌋, τ_r + 1)   (cap_r = τ_r if max_growth = 1).

    **Budget.** With ``budget`` averagings over ``total_steps`` steps, a round starting at step
    ``s`` when ``b`` averagings remain and ``R = total_steps − s`` steps are left gets at least

        floor = max( ⌈R (g − 1) / (g^b − 1)⌉,  ⌈R / (f b)⌉ )     (g = max_growth, f = front_load;
                                                                  ⌈R / b⌉ for the first when g = 1)

    steps, and at most ``R``, so the last round ends exactly at ``total_steps``. The first term is
    feasibility: the shortest period from which ``b`` rounds growing by g each can still cover
    ``R``; if round r meets it, the next one is at most g times it, and with one averaging left it
    is R, so at most ``budget`` rounds fit in ``total_steps``. The second is pace: averaging may run
    at most f times faster than the uniform pace ``R / b`` (average more often early, but do not
    spend the budget so early that the last rounds become huge); ``front_load=None`` drops it. The
    floor wins over ``tau_max`` and over the growth cap, and a period raised by the floor stays
    raised. Apart from the final truncation to the horizon the period never shrinks. After
    ``total_steps`` the last period is kept.

    Args:
        tau0: the first period τ_0 ≥ 1.
        total_steps: the horizon K ≥ 1 over which the budget counts.
        budget: the number of averagings allowed in ``total_steps`` (≥ 1).
        target: Δ* > 0; default ``ρ_0 τ_0`` from the first observation.
        max_growth: the largest factor by which τ may grow in one round (≥ 1).
        front_load: f ≥ 1, how much faster than the uniform pace averagings may be spent (default
            2); None: only feasibility limits early spending.
        tau_max: optional cap on τ (≥ τ_0).

    The state (:class:`ADPSGDState`) counts the averagings spent (rounds observed that start
    before ``total_steps``); a round's budget floor uses its index as the count before it.

    References:
        Jiang & Agrawal, "Adaptive Periodic Averaging: A Practical Approach to Reducing
        Communication in Distributed Learning", arXiv:2007.06134 (the argument); the rule is coopsgd's.
    """

    history_entry = ADPSGDRound

    def __init__(self, tau0: int, total_steps: int, budget: int, *, target: float | None = None,
                 max_growth: float = 2.0, front_load: float | None = 2.0, tau_max: int | None = None):
        self.tau0 = require_int("ADPSGD tau0", tau0, 1)
        self.total_steps = require_int("ADPSGD total_steps", total_steps, 1)
        self.budget = require_int("ADPSGD budget (number of averagings)", budget, 1)
        self.target = None if target is None else require_number("ADPSGD target", target, positive=True,
                                                         rule="the tolerated consensus distance")
        self.max_growth = require_number("ADPSGD max_growth", max_growth, positive=True,
                                  rule="largest growth factor of tau per round")
        if self.max_growth < 1.0:
            raise ValueError(f"ADPSGD max_growth must be >= 1 (the period never shrinks), got {max_growth!r}")
        self.tau_max = None if tau_max is None else require_int("ADPSGD tau_max", tau_max, self.tau0)
        self.front_load = None
        if front_load is not None:
            self.front_load = require_number("ADPSGD front_load", front_load, positive=True,
                                      rule="how much faster than the uniform pace averagings may be spent")
            if self.front_load < 1.0:
                raise ValueError(f"ADPSGD front_load must be >= 1 (1 = uniform pace), got {front_load!r}")
        super().__init__(f"ADPSGD(tau0={self.tau0}, budget={self.budget}/{self.total_steps})")

    def init(self) -> ADPSGDState:
        return ADPSGDState(tau=self.tau0, target=self.target)

    def _raised(self, state: ADPSGDState, start: int, index: int) -> int:
        """The period after the budget floor of round ``index`` (starting at ``start``) raised it;
        a raise persists for later rounds: the period never shrinks."""
        remaining = self.total_steps - start
        if remaining <= 0:
            return state.tau
        return max(state.tau, self.budget_floor(remaining, max(self.budget - index, 1)))

    def tau(self, state: ADPSGDState, start: int, index: int) -> int:
        tau = self._raised(state, start, index)
        remaining = self.total_steps - start
        return min(tau, remaining) if remaining > 0 else tau

    def begin(self, state: ADPSGDState, start: int, index: int):
        """The round's period, and the state with the floor's raise and the averaging recorded
        (so both persist whether or not the round is observed)."""
        spent = index + 1 if start < self.total_steps else state.averagings
        return self.tau(state, start, index), state._replace(tau=self._raised(state, start, index),
                                                              averagings=max(state.averagings, spent))

    def budget_floor(self, remaining: int, left: int) -> int:
        """The shortest period allowed for a round with ``left`` averagings for ``remaining`` steps.

        The larger of the pace floor ``⌈R / (f b)⌉`` (f = ``front_load``) and the feasibility floor
        ``⌈R (g − 1) / (g^b − 1)⌉`` (g = ``max_growth``; ``⌈R / b⌉`` for g = 1), the shortest
        period from which ``b`` rounds growing by g each can still cover ``R``."""
        g = self.max_growth
        if g == 1.0:
            feasible = -(-remaining // left)
        elif left * math.log(g) > 700.0:  # g^b overflows: no constraint yet
            feasible = 1
        else:
            feasible = max(1, math.ceil(remaining * (g - 1.0) / (g**left - 1.0) - _CEIL_SLACK))
        if self.front_load is None:
            return feasible
        pace = math.ceil(remaining / (self.front_load * left) - _CEIL_SLACK)
        return max(feasible, pace, 1)

    def observe(self, state: ADPSGDState, *, consensus: float, start: int | None = None,
                index: int | None = None, tau: int | None = None, steps: int | None = None,
                **_ignored) -> ADPSGDState:
        """The state after round ``index`` (started at ``start``, ``tau`` steps long).

        Args:
            state: the state before.
            consensus: Δ = (1/m) Σ_i ‖x_i − x̄‖² measured ``steps`` local steps after the previous
                exact averaging, *before* this round's averaging (after it Δ is 0: a loop that
                only has post-mixing values can pass the value after the round's second-to-last
                step with ``steps = τ − 1``).
            start, index, tau: the observed round (``trainer.observe`` fills them in).
            steps: how many local steps Δ accumulated over; by default ``tau``.
        """
        delta = require_number("ADPSGD consensus", consensus, positive=False,
                        rule="the consensus distance (1/m) sum ||x_i - mean||^2")
        start, index, length = _position("ADPSGD", start, index, tau)
        raised = self._raised(state, start, index)
        averagings = max(state.averagings, index + 1) if start < self.total_steps else state.averagings
        steps = length if steps is None else require_int("ADPSGD observed steps", steps, 1)
        rate = delta / steps
        target = state.target
        if target is None:
            if delta == 0:
                raise ValueError(
                    "ADPSGD target (the first measured consensus distance) must be > 0, got 0.0; "
                    "pass the consensus distance before the averaging, not after it"
                )
            target = rate * length  # the disagreement the first round builds up
        proposed = math.inf if rate == 0 else math.floor(target / rate + _CEIL_SLACK)
        cap = math.floor(self.max_growth * raised + _CEIL_SLACK)
        if self.max_growth > 1.0:
            cap = max(cap, raised + 1)  # a small τ can still grow by one step
        new = min(max(raised, proposed), cap)
        if self.tau_max is not None:
            new = min(new, self.tau_max)
        history = state.history + (ADPSGDRound(start, length, delta, rate),)
        return ADPSGDState(max(raised, int(new)), target, averagings, history)


def adpsgd(tau0: int, total_steps: int, budget: int, **kwargs) -> ADPSGD:
    """An :class:`ADPSGD` period schedule (see there for the rule and keywords)."""
    return ADPSGD(tau0, total_steps, budget, **kwargs)


def consensus_distance(params, num_workers: int | None = None):
    """``(1/m) Σ_i ‖x_i − x̄‖²`` over a pytree whose leaves have the worker axis first.

    ``num_workers`` takes the first ``m`` rows only (drop auxiliary columns such as an anchor).
    Works on NumPy arrays and inside ``jax.jit`` (uses ``jax.numpy``).
    """
    import jax
    import jax.numpy as jnp

    total = 0.0
    for leaf in jax.tree.leaves(params):
        x = jnp.asarray(leaf)
        if num_workers is not None:
            x = x[:num_workers]
        x = x.reshape(x.shape[0], -1)
        total = total + jnp.sum((x - jnp.mean(x, axis=0)) ** 2) / x.shape[0]
    return total
