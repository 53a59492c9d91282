"""Overlap Local-SGD: every τ steps pull each model toward an anchor and re-anchor, with the
anchor's all-reduce hidden behind the next τ local steps; and its anchor-momentum form Overlap-M.

**Overlap-M** (Wang, Liang & Joshi, Overlap Local-SGD, arXiv:2002.09539, with anchor momentum as
in the authors' code). Every τ steps, with anchor ``z`` (the last synchronised model) and momentum
buffer ``u``::

    x_i ← (1 − α) x_i + α z                 (pull back toward the anchor)
    x̄   = (1/m) Σ_i x_i                     (over the pulled-back models)
    u   ← β u + (z − x̄) / η
    z   ← z − η u                           (the new anchor, all-reduced behind the next τ steps)

With β = 0 the new anchor is ``x̄`` and this is exactly the mixing ``W_ov`` of
:func:`overlap_matrix` on the columns ``[x_1 … x_m, z]``. With a constant η the update is linear,
so Overlap-M is also A(τ, W, v = 2) on ``[x_1 … x_m, z, q]`` with ``q = z − η u``
(:func:`overlap_m_matrix`, :func:`overlap_local_sgd_momentum`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix, averaging
from coopsgd.core.validate import require_fraction, require_int, require_number
from coopsgd.parallel import plan as _plan
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound

__all__ = [
    "OverlapM",
    "OverlapMState",
    "overlap_local_sgd",
    "overlap_local_sgd_momentum",
    "overlap_m",
    "overlap_m_matrix",
    "overlap_m_mixer",
    "overlap_m_sync",
    "overlap_matrix",
]

_ALPHA = "Overlap Local-SGD pull-back weight"
_BETA = "Overlap-M anchor momentum"


def _concrete_fraction(name: str, value, rule: str) -> None:
    """Check a concrete number lies in [0, 1); traced values (inside jit) pass through."""
    if isinstance(value, numbers.Real):
        require_fraction(name, value, rule=rule)


def overlap_matrix(m: int, alpha: float) -> MixingMatrix:
    """Overlap Local-SGD's column-stochastic ``W_ov = [[(1−α) I_m, ((1−α)/m) 1_m], [α 1_mᵀ, α]]``."""
    m = require_int("m", m, 1)
    alpha = float(alpha)
    return MixingMatrix.from_blocks(sp.identity(m, format="csr") * (1.0 - alpha),
                                    np.full((m, 1), (1.0 - alpha) / m), np.full((1, m), alpha),
                                    np.array([[alpha]]))


def overlap_local_sgd(m: int, tau, alpha: float) -> Algorithm:
    """Overlap Local-SGD: every τ steps pull each model toward the anchor, then re-anchor.

    ``x_i ← (1−α) x_i + α z`` and ``z ← (1/m) Σ_i x_i`` over the pulled-back models; the anchor's
    all-reduce runs behind the next τ local steps. W_ov is column-stochastic but not symmetric, so
    Theorem 1 of Cooperative SGD does not apply; its eigenvalues are 1, 1−α (m−1 times) and 0.

    References:
        Wang, Liang & Joshi, "Overlap Local-SGD", ICASSP 2020, arXiv:2002.09539, Algorithm 1.
    """
    m = require_int("m", m, 1)
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"Overlap Local-SGD alpha must lie in [0, 1), got alpha = {alpha!r}")
    return Algorithm(overlap_matrix(m, alpha), tau=tau, v=1, name="overlap_local_sgd")


class OverlapMState(NamedTuple):
    """``anchor`` z (unstacked) and the anchor-momentum buffer u (same shape)."""

    anchor: Any
    momentum: Any


def overlap_m_sync(workers, state: OverlapMState, *, alpha, beta, lr, axis: WorkerAxis | None = None):
    """One Overlap-M synchronisation (see the module docstring for the equations).

    Args:
        workers: stacked worker models, leading axis m (this device's, with ``axis``).
        state: the anchor z and momentum u from the previous synchronisation.
        alpha: pull-back weight α ∈ [0, 1).
        beta: anchor momentum β ∈ [0, 1).
        lr: the current (inner) learning rate η > 0; the buffer is kept in units of 1/η as in the
            authors' code, so β = 0 gives ``z ← x̄`` for any η.
        axis: the worker axis the mean runs over (default: all workers are in ``workers``).

    Returns:
        ``(pulled_back_workers, OverlapMState(new_anchor, new_momentum))``.
    """
    _concrete_fraction("alpha", alpha, _ALPHA)
    _concrete_fraction("beta", beta, _BETA)
    if isinstance(lr, numbers.Real):
        require_number("lr", lr, positive=True, rule="the learning rate the anchor momentum is scaled by")
    pulled = jax.tree.map(lambda x, z: (1.0 - alpha) * x + alpha * z, workers, state.anchor)
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0) if axis is None else axis.mean(x), pulled)
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
    _concrete_fraction("alpha", alpha, _ALPHA)
    _concrete_fraction("beta", beta, _BETA)

    def init(params) -> OverlapMState:
        return OverlapMState(anchor=params, momentum=jax.tree.map(jnp.zeros_like, params))

    def sync(workers, state: OverlapMState, lr):
        return overlap_m_sync(workers, state, alpha=alpha, beta=beta, lr=lr)

    return OverlapM(init, sync)


def overlap_m_matrix(m: int, alpha: float, beta: float) -> MixingMatrix:
    """W of Overlap-M on the columns ``[x_1 … x_m, z, q]`` with ``q = z − η u`` (constant η).

    With ``a = (1/m) Σ x_i`` before the pull-back, the update of :func:`overlap_m_sync` reads
    ``x_i ← (1 − α) x_i + α z``, ``z ← (1 − α) a + (α − β) z + β q`` and
    ``q ← 2(1 − α) a + (2α − 2β − 1) z + 2β q``. Each column of W sums to 1; β = 0 gives
    :func:`overlap_matrix` on the first m + 1 columns.
    """
    m = require_int("m", m, 1)
    a = require_fraction("alpha", alpha, rule=_ALPHA)
    b = require_fraction("beta", beta, rule=_BETA)
    wa = np.empty((m, 2))
    wa[:, 0], wa[:, 1] = (1.0 - a) / m, 2.0 * (1.0 - a) / m
    aw = np.zeros((2, m))
    aw[0] = a
    aa = np.array([[a - b, 2.0 * a - 2.0 * b - 1.0], [b, 2.0 * b]])
    return MixingMatrix.from_blocks(sp.identity(m, format="csr") * (1.0 - a), wa, aw, aa)


def overlap_m_mixer(algorithm: Algorithm, devices: bool = False, *, alpha: float, beta: float,
                    lr: Callable) -> Mixer:
    """Overlap-M's synchronisation (:func:`overlap_m_sync`) as a mixer, for a learning rate that
    changes: ``lr(k)`` is the inner learning rate of update k (an optax schedule), read at the
    round's last update ``k = step − 1``. Its shared state is the anchor and the momentum buffer."""
    full = _plan.plan_for_matrix(averaging(algorithm.m), algorithm.m)

    def init(columns) -> MixerState:
        anchor = jax.tree.map(lambda x: jnp.asarray(x[0]), columns)
        return MixerState(shared=OverlapMState(anchor, jax.tree.map(jnp.zeros_like, anchor)))

    def apply(columns, state: MixerState, mix_round: MixRound, axis: WorkerAxis):
        eta = jnp.asarray(lr(mix_round.step - 1), jnp.float32)
        pulled, shared = overlap_m_sync(columns, state.shared, alpha=alpha, beta=beta, lr=eta, axis=axis)
        shared = jax.tree.map(lambda new, old: new.astype(old.dtype), shared, state.shared)
        return pulled, MixerState(shared=shared)

    return Mixer(init=init, apply=apply, traffic=lambda r, p: _plan.communication(full, p),
                 name=f"Overlap-M (alpha={alpha:g}, beta={beta:g})")


def overlap_local_sgd_momentum(m: int, tau, alpha: float = 0.6, beta: float = 0.7,
                               lr: float | Callable | None = None) -> Algorithm:
    """Overlap Local-SGD with anchor momentum (Overlap-M).

    With ``lr=None`` (or a number: a constant learning rate) it is A(τ, W, v = 2), exact for a
    constant learning rate (see :func:`overlap_m_matrix`); W is column-stochastic but not
    symmetric, so Theorem 1 of Cooperative SGD does not apply. With ``lr`` an optax schedule of the
    inner updates (the one the inner optimizer uses), the synchronisation runs as
    :func:`overlap_m_mixer`, the buffer kept in units of 1/η as in the authors' code.

    References:
        Wang, Liang & Joshi, "Overlap Local-SGD", ICASSP 2020, arXiv:2002.09539.
    """
    if not callable(lr):
        return Algorithm(overlap_m_matrix(m, alpha, beta), tau=tau, v=2, name="overlap_local_sgd_momentum")
    m = require_int("m", m, 1)
    alpha = require_fraction("alpha", alpha, rule=_ALPHA)
    beta = require_fraction("beta", beta, rule=_BETA)
    return Algorithm(averaging(m), tau=tau, name="overlap_local_sgd_momentum",
                     mixer=partial(overlap_m_mixer, alpha=alpha, beta=beta, lr=lr))
