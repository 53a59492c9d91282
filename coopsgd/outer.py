"""Updates applied at synchronisations: global (outer) momentum on the averaged model, and
Overlap Local-SGD's anchor update with anchor momentum (Overlap-M).

Both are pure, branch-free functions over parameter pytrees, usable inside ``jax.jit``. Stacked
pytrees carry the worker axis first (shape ``(m, …)``), as in the engine.

**Global momentum** (SlowMo, Wang et al. 2020; DiLoCo, Douillard et al. 2023). At the ``t``-th
synchronisation the workers' models are averaged to ``x̄_after``; the *pseudo-gradient*
``Δ_t = x̄_before − x̄_after`` (``x̄_before`` = the model all workers started the round from) is fed
to any optax ``GradientTransformation`` — the outer optimizer — and the result is applied to
``x̄_before``; every worker restarts from it. With :func:`outer_momentum`::

    u_t = β u_{t−1} + Δ_t,         x_t = x_{t−1} − γ u_t          (SlowMo, Algorithm 1, α = γ,
                                                                    its buffer scaled by the inner lr)

``outer_momentum(learning_rate=1, momentum=0)`` gives back plain local SGD (``x_t = x̄_after``).

**Overlap-M** (Wang, Liang & Joshi, Overlap Local-SGD, arXiv:2002.09539, with anchor
momentum as in the authors' code). Every τ steps, with anchor ``z`` (the last synchronised model) and momentum buffer ``u``::

    x_i ← (1 − α) x_i + α z                 (pull back toward the anchor)
    x̄   = (1/m) Σ_i x_i                     (over the pulled-back models)
    u   ← β u + (z − x̄) / η
    z   ← z − η u                           (the new anchor, all-reduced behind the next τ steps)

With β = 0 the new anchor is ``x̄`` and this is exactly the mixing ``W_ov`` of
:func:`coopsgd.algorithms.overlap_matrix` on the columns ``[x_1 … x_m, z]``.

**As A(τ, W, v = 2).** Both updates are linear in the models, so with heavy-ball momentum and a
constant learning rate each is a column-stochastic W on the columns ``[x_1 … x_m, p, q]``: ``p`` is
the anchor and ``q = p − u`` stores the momentum ``u`` (in model units) so that consensus
(``x_i = p = q``, ``u = 0``) is a fixed point and the columns of W sum to 1
(:func:`local_sgd_global_momentum`, :func:`overlap_local_sgd_momentum`). The engine then runs them
with no extra code. The functional forms above are the general ones (any optax outer optimizer, a
changing learning rate).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopsgd import schedules
from coopsgd.algorithms import Algorithm

__all__ = [
    "pseudo_gradient",
    "outer_momentum",
    "OuterState",
    "OuterOptimizer",
    "outer_optimizer",
    "average_workers",
    "broadcast_workers",
    "OverlapMState",
    "OverlapM",
    "overlap_m",
    "overlap_m_sync",
    "global_momentum_matrix",
    "local_sgd_global_momentum",
    "overlap_m_matrix",
    "overlap_local_sgd_momentum",
]


def _check_fraction(name: str, value, rule: str, *, closed_low: bool = True) -> None:
    """Eagerly check a concrete Python/NumPy number lies in [0, 1); traced values pass through."""
    if isinstance(value, numbers.Real):
        x = float(value)
        if not (0.0 <= x < 1.0) or (not closed_low and x == 0.0):
            raise ValueError(f"{name} must lie in {'[' if closed_low else '('}0, 1) ({rule}), got {name} = {value!r}")


def _check_positive(name: str, value, rule: str) -> None:
    if isinstance(value, numbers.Real) and not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0 ({rule}), got {name} = {value!r}")


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
    _check_fraction("momentum", momentum, "outer momentum beta")
    if not callable(learning_rate):
        _check_positive("learning_rate", learning_rate, "outer step size")
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


class OverlapMState(NamedTuple):
    """``anchor`` z (unstacked) and the anchor-momentum buffer u (same shape)."""

    anchor: Any
    momentum: Any


def overlap_m_sync(workers, state: OverlapMState, *, alpha, beta, lr):
    """One Overlap-M synchronisation (Overlap Local-SGD, arXiv:2002.09539, with anchor momentum as in
    the authors' code; see the module docstring for the equations).

    Args:
        workers: stacked worker models, leading axis m.
        state: the anchor z and momentum u from the previous synchronisation.
        alpha: pull-back weight α ∈ [0, 1).
        beta: anchor momentum β ∈ [0, 1).
        lr: the current (inner) learning rate η > 0; the buffer is kept in units of 1/η as in the
            authors' code, so β = 0 gives ``z ← x̄`` for any η.

    Returns:
        ``(pulled_back_workers, OverlapMState(new_anchor, new_momentum))``.
    """
    _check_fraction("alpha", alpha, "Overlap Local-SGD pull-back weight")
    _check_fraction("beta", beta, "Overlap-M anchor momentum")
    _check_positive("lr", lr, "the learning rate the anchor momentum is scaled by")
    pulled = jax.tree.map(lambda x, z: (1.0 - alpha) * x + alpha * z, workers, state.anchor)
    mean = average_workers(pulled)
    momentum = jax.tree.map(lambda u, z, xb: beta * u + (z - xb) / lr, state.momentum, state.anchor, mean)
    anchor = jax.tree.map(lambda z, u: z - lr * u, state.anchor, momentum)
    return pulled, OverlapMState(anchor=anchor, momentum=momentum)


class OverlapM(NamedTuple):
    """Overlap-M as a pair of pure functions: ``init(params) -> OverlapMState`` (anchor = params,
    zero momentum) and ``sync(workers, state, lr) -> (workers, state)``."""

    init: Callable[[Any], OverlapMState]
    sync: Callable[..., tuple[Any, OverlapMState]]


def overlap_m(alpha: float = 0.6, beta: float = 0.7) -> OverlapM:
    """Overlap Local-SGD with anchor momentum (the authors' CIFAR-10 settings are the defaults:
    α = 0.6, β = 0.7, τ = 2).

    Raises:
        ValueError: α or β outside [0, 1).

    References:
        Wang, Liang & Joshi, "Overlap Local-SGD: An Algorithmic Approach to Hide Communication
        Delays in Distributed SGD", ICASSP 2020, arXiv:2002.09539.
    """
    _check_fraction("alpha", alpha, "Overlap Local-SGD pull-back weight")
    _check_fraction("beta", beta, "Overlap-M anchor momentum")

    def init(params) -> OverlapMState:
        return OverlapMState(anchor=params, momentum=jax.tree.map(jnp.zeros_like, params))

    def sync(workers, state: OverlapMState, lr):
        return overlap_m_sync(workers, state, alpha=alpha, beta=beta, lr=lr)

    return OverlapM(init, sync)


def global_momentum_matrix(m: int, lr: float = 1.0, momentum: float = 0.9) -> np.ndarray:
    """W of local SGD with heavy-ball global momentum on the columns ``[x_1 … x_m, p, q]``.

    With ``a = (1/m) Σ x_i`` (the averaged model), anchor ``p`` = x̄_before and ``q = p − u``::

        u ← β u + (p − a),   p ← p − γ u,   x_i ← p      (outer_momentum(γ, β), heavy ball)

    gives ``p_new = γ a + (1 − γ − γβ) p + γβ q`` (every worker restarts from it) and
    ``q_new = (1 + γ) a − (γ + β + γβ) p + β(1 + γ) q``. Each column of W sums to 1.
    """
    m = schedules.require_int("m", m, 1)
    g, b = float(lr), float(momentum)
    _check_positive("lr", g, "outer step size")
    _check_fraction("momentum", b, "outer momentum beta")
    w = np.zeros((m + 2, m + 2))
    p, q = m, m + 1
    for j in (*range(m), p):  # every worker and the anchor become p_new
        w[:m, j] = g / m
        w[p, j] = 1.0 - g - g * b
        w[q, j] = g * b
    w[:m, q] = (1.0 + g) / m
    w[p, q] = -(g + b + g * b)
    w[q, q] = b * (1.0 + g)
    return w


def local_sgd_global_momentum(m: int, tau, lr: float = 1.0, momentum: float = 0.9) -> Algorithm:
    """Local SGD with heavy-ball global (outer) momentum as A(τ, W, v = 2) (see
    :func:`global_momentum_matrix`); ``lr = 1, momentum = 0`` is plain local SGD.

    References:
        Wang, Tantia, Ballas & Rabbat, "SlowMo", ICLR 2020, Algorithm 1 (α = γ; buffer in model
        units, equal to the paper's for a constant inner learning rate).
    """
    return Algorithm(global_momentum_matrix(m, lr, momentum), tau=tau, v=2, name="local_sgd_global_momentum")


def overlap_m_matrix(m: int, alpha: float, beta: float) -> np.ndarray:
    """W of Overlap-M on the columns ``[x_1 … x_m, z, q]`` with ``q = z − η u`` (constant η).

    With ``a = (1/m) Σ x_i`` before the pull-back, the update of :func:`overlap_m_sync` reads
    ``x_i ← (1 − α) x_i + α z``, ``z ← (1 − α) a + (α − β) z + β q`` and
    ``q ← 2(1 − α) a + (2α − 2β − 1) z + 2β q``. Each column of W sums to 1; β = 0 gives
    :func:`coopsgd.algorithms.overlap_matrix` on the first m + 1 columns.
    """
    m = schedules.require_int("m", m, 1)
    _check_fraction("alpha", alpha, "Overlap Local-SGD pull-back weight")
    _check_fraction("beta", beta, "Overlap-M anchor momentum")
    a, b = float(alpha), float(beta)
    w = np.zeros((m + 2, m + 2))
    z, q = m, m + 1
    for j in range(m):
        w[j, j] = 1.0 - a
        w[z, j] = a
    w[:m, z] = (1.0 - a) / m
    w[z, z] = a - b
    w[q, z] = b
    w[:m, q] = 2.0 * (1.0 - a) / m
    w[z, q] = 2.0 * a - 2.0 * b - 1.0
    w[q, q] = 2.0 * b
    return w


def overlap_local_sgd_momentum(m: int, tau, alpha: float = 0.6, beta: float = 0.7) -> Algorithm:
    """Overlap Local-SGD with anchor momentum (Overlap-M) as A(τ, W, v = 2), exact for a constant
    learning rate (see :func:`overlap_m_matrix`). W is column-stochastic but not symmetric, so
    Theorem 1 of Cooperative SGD does not apply.

    References:
        Wang, Liang & Joshi, "Overlap Local-SGD", ICASSP 2020, arXiv:2002.09539.
    """
    return Algorithm(overlap_m_matrix(m, alpha, beta), tau=tau, v=2, name="overlap_local_sgd_momentum")
