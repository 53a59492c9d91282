"""Outer updates at synchronisations: global (outer) momentum on the averaged model (SlowMo,
DiLoCo's outer optimizer).

Pure, branch-free functions over parameter pytrees, usable inside ``jax.jit``. Stacked pytrees
carry the worker axis first (shape ``(m, …)``), as in the engine.

**Global momentum** (SlowMo, Wang et al. 2020; DiLoCo, Douillard et al. 2023). At the ``t``-th
synchronisation the workers' models are averaged to ``x̄_after``; the *pseudo-gradient*
``Δ_t = x̄_before − x̄_after`` (``x̄_before`` = the model all workers started the round from) is fed
to any optax ``GradientTransformation`` — the outer optimizer — and the result is applied to
``x̄_before``; every worker restarts from it. With :func:`outer_momentum`::

    u_t = β u_{t−1} + Δ_t,         x_t = x_{t−1} − γ u_t          (SlowMo, Algorithm 1, α = γ,
                                                                    its buffer scaled by the inner lr)

``outer_momentum(learning_rate=1, momentum=0)`` gives back plain local SGD (``x_t = x̄_after``).

**As A(τ, W, v = 2).** The update is linear in the models, so with heavy-ball momentum and a
constant learning rate it is a column-stochastic W on the columns ``[x_1 … x_m, p, q]``: ``p`` is
the anchor and ``q = p − u`` stores the momentum ``u`` (in model units) so that consensus
(``x_i = p = q``, ``u = 0``) is a fixed point and the columns of W sum to 1
(:func:`local_sgd_global_momentum`; Overlap-M is the same construction in
:mod:`coopsgd.algorithms.overlap`). The engine then runs it with no extra code. The functional
form above is the general one (any optax outer optimizer, a changing learning rate).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from coopsgd.core import schedules
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.communication import NONE
from coopsgd.core.operator import MixingMatrix, averaging
from coopsgd.core.validate import require_fraction, require_int, require_number
from coopsgd.parallel import plan as _plan
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound

__all__ = [
    "OuterOptimizer",
    "OuterState",
    "average_workers",
    "broadcast_workers",
    "global_momentum_matrix",
    "local_sgd_global_momentum",
    "outer_mixer",
    "overlapped_period",
    "outer_momentum",
    "outer_optimizer",
    "pseudo_gradient",
    "require_optax",
]


def _concrete(check, name: str, value, rule: str) -> None:
    """Check a concrete number; traced values (inside jit) pass through."""
    if isinstance(value, numbers.Real):
        check(name, value, rule=rule)


def _positive(name: str, value, rule: str) -> None:
    require_number(name, value, positive=True, rule=rule)


def pseudo_gradient(before, after):
    """``Δ = x̄_before − x̄_after``: how far a round of local steps and averaging moved the model,
    signed like a gradient (SlowMo, Wang et al., ICLR 2020; DiLoCo, Douillard et al., arXiv:2311.08105)."""
    return jax.tree.map(lambda b, a: b - a, before, after)


def outer_momentum(learning_rate: float | Callable = 1.0, momentum: float = 0.9,
                   nesterov: bool = False) -> optax.GradientTransformation:
    """Outer SGD with (optionally Nesterov) momentum, fed the pseudo-gradient at each sync.

    ``u_t = β u_{t−1} + Δ_t`` and the update is ``−γ u_t`` (Nesterov: ``−γ (Δ_t + β u_t)``), i.e.
    ``optax.trace`` followed by ``optax.scale_by_learning_rate``. SlowMo (Wang, Tantia, Ballas &
    Rabbat, ICLR 2020, Algorithm 1) is this heavy-ball form with slow learning rate γ and slow
    momentum β; DiLoCo (Douillard et al., arXiv:2311.08105) uses the Nesterov form (γ = 0.7,
    β = 0.9 in its experiments).

    Args:
        learning_rate: the outer step γ > 0 (or an optax schedule of the sync count).
        momentum: β ∈ [0, 1).
        nesterov: Nesterov momentum.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = outer_momentum(0.5, 0.9)
        >>> state = tx.init(jnp.zeros(()))
        >>> updates, state = tx.update(jnp.asarray(0.2), state)   # Δ = 0.2
        >>> round(float(updates), 6)                             # −0.5 · 0.2
        -0.1
    """
    _concrete(require_fraction, "momentum", momentum, "outer momentum beta")
    if not callable(learning_rate):
        _concrete(_positive, "learning_rate", learning_rate, "outer step size")
    return optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


class OuterState(NamedTuple):
    """``anchor``: the model the current round started from (x̄_before); ``inner``: the outer
    optimizer's state."""

    anchor: Any
    inner: Any


class OuterOptimizer(NamedTuple):
    """An outer optimizer at synchronisations, as a pair of pure functions.

    ``init(params) -> OuterState`` and ``sync(state, averaged) -> (new_params, new_state)``, where
    ``averaged`` is the workers' averaged model after the round; every worker restarts from
    ``new_params``.
    """

    init: Callable[[Any], OuterState]
    sync: Callable[[OuterState, Any], tuple[Any, OuterState]]


def outer_optimizer(tx: optax.GradientTransformation | None = None, **momentum_kwargs) -> OuterOptimizer:
    """Wrap any optax transformation as the outer optimizer applied at synchronisations.

    ``sync`` computes ``Δ = anchor − averaged`` (:func:`pseudo_gradient`), then
    ``updates, inner = tx.update(Δ, inner, anchor)`` and ``new = anchor + updates``.

    Args:
        tx: the outer transformation; default ``outer_momentum(**momentum_kwargs)``.

    References:
        Wang et al., "SlowMo", ICLR 2020, Algorithm 1; Douillard et al., "DiLoCo",
        arXiv:2311.08105, Algorithm 1.
    """
    if tx is None:
        tx = outer_momentum(**momentum_kwargs)
    elif momentum_kwargs:
        raise ValueError(f"pass either tx or outer_momentum keywords, not both (got {sorted(momentum_kwargs)})")

    def init(params) -> OuterState:
        return OuterState(anchor=params, inner=tx.init(params))

    def sync(state: OuterState, averaged):
        delta = pseudo_gradient(state.anchor, averaged)
        updates, inner = tx.update(delta, state.inner, state.anchor)
        new = optax.apply_updates(state.anchor, updates)
        return new, OuterState(anchor=new, inner=inner)

    return OuterOptimizer(init, sync)


def average_workers(stacked, num_workers: int | None = None):
    """Mean over the leading worker axis (the first ``num_workers`` rows if given)."""
    return jax.tree.map(lambda x: jnp.mean(x if num_workers is None else x[:num_workers], axis=0), stacked)


def broadcast_workers(params, m: int):
    """Stack ``m`` copies of ``params`` along a new leading worker axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + jnp.shape(x)), params)


def global_momentum_matrix(m: int, lr: float = 1.0, momentum: float = 0.9) -> MixingMatrix:
    """W of local SGD with heavy-ball global momentum on the columns ``[x_1 … x_m, p, q]``.

    With ``a = (1/m) Σ x_i`` (the averaged model), anchor ``p`` = x̄_before and ``q = p − u``::

        u ← β u + (p − a),   p ← p − γ u,   x_i ← p      (outer_momentum(γ, β), heavy ball)

    gives ``p_new = γ a + (1 − γ − γβ) p + γβ q`` (every worker restarts from it) and
    ``q_new = (1 + γ) a − (γ + β + γβ) p + β(1 + γ) q``. Each column of W sums to 1.
    """
    m = require_int("m", m, 1)
    g = require_number("lr", lr, positive=True, rule="outer step size")
    b = require_fraction("momentum", momentum, rule="outer momentum beta")
    wa = np.empty((m, 2))
    wa[:, 0], wa[:, 1] = g / m, (1.0 + g) / m
    aw = np.empty((2, m))
    aw[0], aw[1] = 1.0 - g - g * b, g * b
    aa = np.array([[1.0 - g - g * b, -(g + b + g * b)], [g * b, b * (1.0 + g)]])
    return MixingMatrix.mean(np.full(m, g / m), g / m, wa, aw, aa)


def require_optax(name: str, tx) -> optax.GradientTransformation:
    """``tx`` if it is an optax transformation (``init`` and ``update``); else ValueError naming it."""
    if isinstance(tx, optax.GradientTransformation) or (
            callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        return tx
    raise ValueError(f"{name} must be an optax GradientTransformation (e.g. optax.sgd(0.7, momentum=0.9, "
                     f"nesterov=True)), got {tx!r} of type {type(tx).__name__}")


def _bounds(size: int, fragments: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, size, fragments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(cuts)]


def _outer_step(tx, theta, outer, mean):
    delta = jax.tree.map(lambda t, a: t - a.astype(t.dtype), theta, mean)
    updates, outer = tx.update(delta, outer, theta)
    return optax.apply_updates(theta, updates), outer


def outer_mixer(algorithm: Algorithm, devices: bool = False, *, tx: optax.GradientTransformation,
                fragments: int = 1, alpha: float = 0.0, delay: int = 0) -> Mixer:
    """The outer-optimizer mixing over P = ``fragments`` fragments of the model (all of it for
    P = 1). Without ``delay`` round r synchronises fragment ``r mod P``: the outer step on
    ``Δ = θ_global − mean_i θ_i`` and the workers' merge ``α·local + (1 − α)·θ_global`` (α = 0:
    replaced). With ``delay`` = V > 0 the rounds alternate: round 2q synchronises fragment
    ``q mod P`` (the all-reduce) and round 2q + 1, V steps later, merges it (no communication), so
    the all-reduce overlaps V inner steps (the period schedule lays the rounds out). Its shared
    state is θ_global (the first worker's model at the start) and one outer state per fragment."""
    m = algorithm.m
    full = _plan.plan_for_matrix(averaging(m), m)

    def init(columns) -> MixerState:
        theta = jax.tree.map(lambda x: jnp.asarray(x[0]), columns)
        if fragments == 1:
            return MixerState(shared={"global": theta, "outer": (tx.init(theta),)})
        flat, _ = ravel_pytree(theta)
        if flat.shape[0] < fragments:
            raise ValueError(f"a model of {flat.shape[0]} entries cannot be split into {fragments} fragments")
        outer = tuple(tx.init(flat[a:b]) for a, b in _bounds(flat.shape[0], fragments))
        return MixerState(shared={"global": theta, "outer": outer})

    def blend(x, g):
        g = jnp.broadcast_to(g.astype(x.dtype), x.shape)
        return g if alpha == 0 else (alpha * x + (1.0 - alpha) * g).astype(x.dtype)

    def apply(columns, state: MixerState, mix_round: MixRound, axis: WorkerAxis):
        part, f = mix_round.static
        theta, outer = state.shared["global"], list(state.shared["outer"])
        if fragments == 1:
            if part != "merge":
                theta, outer[0] = _outer_step(tx, theta, outer[0], jax.tree.map(axis.mean, columns))
            if part != "sync":
                columns = jax.tree.map(blend, columns, theta)
            return columns, MixerState(shared={"global": theta, "outer": tuple(outer)})
        flat_theta, unravel = ravel_pytree(theta)  # the workers' models flattened once per round
        lo, hi = _bounds(flat_theta.shape[0], fragments)[f]
        flat_x = jax.vmap(lambda col: ravel_pytree(col)[0])(columns)
        if part != "merge":
            fragment, outer[f] = _outer_step(tx, flat_theta[lo:hi], outer[f], axis.mean(flat_x[:, lo:hi]))
            flat_theta = flat_theta.at[lo:hi].set(fragment)
            theta = unravel(flat_theta)
        if part != "sync":
            columns = jax.vmap(unravel)(flat_x.at[:, lo:hi].set(blend(flat_x[:, lo:hi], flat_theta[lo:hi])))
        return columns, MixerState(shared={"global": theta, "outer": tuple(outer)})

    def plan(r: int) -> MixRound:
        if not delay:
            return MixRound(static=("both", r % fragments))
        return MixRound(static=("merge" if r % 2 else "sync", (r // 2) % fragments), moves=not r % 2)

    def traffic(r: int, param_bytes: float):
        if delay and r % 2:
            return NONE
        return _plan.communication(full, float(param_bytes) / fragments)

    kind = "DiLoCo" if fragments == 1 else f"Streaming DiLoCo ({fragments} fragments)"
    return Mixer(init=init, apply=apply, traffic=traffic, plan=plan,
                 name=f"{kind} outer optimizer" + (f", merged {delay} steps late" if delay else ""))


def overlapped_period(round_steps: int, delay: int) -> schedules.PeriodSchedule:
    """The rounds of an outer synchronisation every ``round_steps`` steps whose result is merged
    ``delay`` steps later: ``round_steps`` first, then ``delay`` and ``round_steps − delay`` in turn."""
    def tau(start: int) -> int:
        if start == 0:
            return round_steps
        return delay if start % round_steps == 0 else round_steps - delay

    return schedules.PeriodSchedule(tau, f"{round_steps} steps, merged {delay} later")


def local_sgd_global_momentum(m: int, tau, lr: float | Callable = 1.0, momentum: float = 0.9) -> Algorithm:
    """Local SGD with heavy-ball global (outer) momentum; ``lr = 1, momentum = 0`` is plain local
    SGD. With a constant outer ``lr`` it is A(τ, W, v = 2) (see :func:`global_momentum_matrix`);
    with ``lr`` an optax schedule of the synchronisations it runs as DiLoCo's outer-optimizer
    mixer with :func:`outer_momentum` ``(lr, momentum)`` (:func:`coopsgd.algorithms.diloco.diloco`).

    References:
        Wang, Tantia, Ballas & Rabbat, "SlowMo", ICLR 2020, Algorithm 1 (α = γ; buffer in model
        units, equal to the paper's for a constant inner learning rate).
    """
    if callable(lr):
        m = require_int("m", m, 1)
        return Algorithm(averaging(m), tau=tau, name="local_sgd_global_momentum",
                         mixer=partial(outer_mixer, tx=outer_momentum(lr, momentum)))
    return Algorithm(global_momentum_matrix(m, lr, momentum), tau=tau, v=2, name="local_sgd_global_momentum")

