"""DiLoCo and Streaming DiLoCo: local steps with any inner optimizer, then an outer optimizer step on
the averaged pseudo-gradient — inside the compiled round, as a mixer.

**DiLoCo** (Douillard et al., "DiLoCo: Distributed low-communication training of language
models", arXiv:2311.08105, Algorithm 1). Every τ = H inner steps (any optax optimizer, AdamW in the
paper; each worker keeps its inner state)::

    Δ = θ_global − (1/m) Σ_i θ_i                  (the outer gradient; one all-reduce)
    θ_global ← OuterOpt(θ_global, Δ)              (Nesterov SGD, lr 0.7, momentum 0.9 in the paper)
    θ_i ← θ_global                                (every worker restarts from it)

Outer SGD with learning rate 1 and no momentum is local SGD. Any optax transformation is an outer
optimizer; its own count drives a learning-rate schedule over the synchronisations.

**Streaming DiLoCo** (Douillard et al., "Streaming DiLoCo with overlapping communication",
arXiv:2501.18512). The parameters are split into P fragments; fragment p is synchronised every H
steps, at offset (p + 1)·H/P, so each round of H/P steps all-reduces one fragment (1/P of the model)
and the communication is spread over the H steps. The arriving global fragment is blended into the
workers as ``α·local + (1 − α)·global`` (α = 0: replaced). Fragments are contiguous slices of the
flattened parameters (leaf order), of equal size to within one entry; each has its own outer
state, so the outer optimizer must act entry by entry (SGD, Nesterov, Adam — not a masked or
layer-wise one). With a delay V > 0 a fragment's all-reduce overlaps the next V inner steps, as in
the paper: the outer step uses the workers' fragment at the synchronisation, and the global
fragment is merged V steps later into the workers' fragment as it is then (rounds alternate H/P − V
and V steps; the merge rounds send nothing).
"""

from __future__ import annotations

from functools import partial

import optax

from coopsgd.algorithms.outer import outer_mixer, outer_momentum, overlapped_period, require_optax
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import averaging
from coopsgd.core.validate import require_fraction, require_int

__all__ = ["diloco", "streaming_diloco"]


def _outer(outer_optimizer):
    if outer_optimizer is None:
        return outer_momentum(0.7, 0.9, nesterov=True)
    return require_optax("outer_optimizer", outer_optimizer)


def diloco(m: int, tau=500, outer_optimizer: optax.GradientTransformation | None = None, *,
           name: str = "diloco") -> Algorithm:
    """DiLoCo (Douillard et al. 2023, Algorithm 1): τ = H inner steps, then the outer step on
    ``Δ = θ_global − mean_i θ_i`` and every worker restarts from θ_global.

    Args:
        m: workers.
        tau: H, the inner steps per round (500 in the paper), or any period schedule.
        outer_optimizer: an optax transformation; default Nesterov SGD with lr 0.7 and momentum 0.9
            (:func:`coopsgd.algorithms.outer.outer_momentum`), the paper's choice.

    Raises:
        ValueError: an outer optimizer that is not optax.

    Example:
        >>> import optax, coopsgd
        >>> coopsgd.diloco(8, 4, optax.sgd(1.0)).name   # outer SGD, lr 1: local SGD
        'diloco'
    """
    m = require_int("m", m, 1)
    tx = _outer(outer_optimizer)
    return Algorithm(averaging(m), tau=tau, name=name, mixer=partial(outer_mixer, tx=tx))


def streaming_diloco(m: int, tau: int = 100, outer_optimizer: optax.GradientTransformation | None = None, *,
                     fragments: int = 2, alpha: float = 0.0, delay: int = 0) -> Algorithm:
    """Streaming DiLoCo (Douillard et al. 2025): the model in ``fragments`` = P parts, each
    synchronised by the outer optimizer every ``tau`` = H steps at staggered offsets, H/P steps
    apart; with ``delay`` = V > 0 each fragment's all-reduce overlaps the next V inner steps (the
    global fragment is merged V steps after the workers' fragment was sent).

    Args:
        m: workers.
        tau: H, the steps between two synchronisations of one fragment (a multiple of P).
        outer_optimizer: an entry-wise optax transformation (default Nesterov, lr 0.7, momentum 0.9).
        fragments: P ≥ 1 (1 with V = 0 is DiLoCo).
        alpha: blend of the arriving global fragment, ``α·local + (1 − α)·global``, in [0, 1).
        delay: V, the overlap in inner steps, 0 ≤ V < H/P (the paper's τ; 0: merged at once).

    Raises:
        ValueError: ``tau`` not a multiple of ``fragments``, V outside [0, H/P), α outside
            [0, 1), a non-optax outer optimizer.
    """
    m = require_int("m", m, 1)
    p = require_int("fragments", fragments, 1)
    h = require_int("tau", tau, 1)
    if h % p:
        raise ValueError(f"Streaming DiLoCo needs tau = H a multiple of fragments = P (rounds of H/P steps), "
                         f"got tau = {h}, fragments = {p}")
    v = require_int("delay", delay, 0)
    if v >= h // p:
        raise ValueError(f"Streaming DiLoCo's delay V must be below H/P = {h // p} steps (a fragment merged "
                         f"before the next one is sent), got delay = {v}")
    alpha = require_fraction("alpha", alpha, rule="the blend of the local fragment into the global one")
    tx = _outer(outer_optimizer)
    period = overlapped_period(h // p, v) if v else h // p
    return Algorithm(averaging(m), tau=period, name="streaming_diloco",
                     mixer=partial(outer_mixer, tx=tx, fragments=p, alpha=alpha, delay=v))
