"""The engine's state and metrics: NamedTuples of arrays, saved and restored by value.

Everything that changes during training is a field of :class:`EngineState`: the models, each
worker's optimizer state and model state (BatchNorm statistics), the mixer's state, the step and round counters, the PRNG key, and the
period schedule's position and state (:class:`PeriodState`, host values, a static pytree node).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["EngineState", "NonFiniteError", "PeriodState", "StepMetrics", "raise_if_nonfinite"]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PeriodState:
    """Where the run is in its rounds, on the host: the current round started at step ``start``
    and lasts ``tau`` steps (``start + tau`` is where it mixes); ``rule`` is the period schedule's
    own state (``()`` for static schedules; AdaComm's and ADPSGD's NamedTuples).

    A static pytree node (no array leaves): ``jax.tree.map`` and ``jit`` pass it through unchanged.
    Initially ``start = tau = 0``: round 0 begins (and gets its τ) when the first step runs.
    """

    start: int = 0
    tau: int = 0
    rule: Any = ()

    @property
    def end(self) -> int:
        """The step after the current round's last (where it mixes)."""
        return self.start + self.tau


class EngineState(NamedTuple):
    """The trainer's state (a pytree).

    Attributes:
        params: the m worker models, stacked: leaves of shape (m, …) on the simulate and shard_map
            backends, (D, m/D, …) on pmap (``trainer.workers(state)`` always gives (m, …)).
        opt_state: each worker's optax state, every leaf with leading axis m (or the pmap layout).
        mix_state: the mixer's :class:`~coopsgd.parallel.protocol.MixerState` (the linear mixer's
            auxiliary columns, replicated).
        step: number of local steps taken (int32 scalar).
        rounds: number of rounds completed, i.e. mixings done (int32 scalar): the index of the
            current round.
        key: base PRNG key; the key of worker i at step k is ``fold_in(fold_in(key, k), i)``.
        period: the :class:`PeriodState` (host values).
        model_state: each worker's model state that is not trained by gradients (BatchNorm
            statistics), laid out like ``params``; ``()`` unless the loss has state.
    """

    params: Any
    opt_state: Any
    mix_state: Any
    step: jax.Array
    rounds: jax.Array
    key: jax.Array
    period: PeriodState = PeriodState()
    model_state: Any = ()


class StepMetrics(NamedTuple):
    """Per-step metrics. From :meth:`CooperativeSGD.run` every field has a leading axis of steps.

    Attributes:
        losses: each worker's loss, (m,), evaluated at its pre-update model.
        loss: the mean of ``losses``.
        communicated: whether this step ended with a mixing that moves data between workers.
        consensus: ``(1/m) Σ_i ‖x_i − x̄‖²`` over the workers after the step (mixing included), or
            None when the trainer was built with ``track_consensus=False``.
        finite: whether every loss (and the consensus distance) was finite.
        aux: the loss function's auxiliary output per worker, with ``has_aux=True``; else None.
    """

    losses: Any
    loss: Any
    communicated: Any
    consensus: Any
    finite: Any
    aux: Any = None


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared during :meth:`CooperativeSGD.run`; ``.step`` is the first bad step."""

    def __init__(self, message: str, step: int, worker: int | None = None):
        super().__init__(message)
        self.step, self.worker = step, worker


def raise_if_nonfinite(metrics: StepMetrics, k0: int, after_mixing: bool, mixer_name: str) -> None:
    """Raise :class:`NonFiniteError` at the first step of ``metrics`` (the first is step ``k0``)
    with a non-finite value, naming the worker (or the consensus distance) and whether a mixing by
    ``mixer_name`` came just before (``after_mixing``: the step before ``k0`` mixed)."""
    finite = np.asarray(metrics.finite)
    if finite.all():
        return
    i = int(np.argmin(finite))
    losses = np.asarray(metrics.losses)[i]
    bad = np.flatnonzero(~np.isfinite(losses))
    worker = int(bad[0]) if bad.size else None
    communicated = np.asarray(metrics.communicated)
    if worker is not None:
        where = f"worker {worker} loss {losses[worker]}"
        if (communicated[i - 1] if i else after_mixing):
            where += f" (the first step after a mixing by {mixer_name!r})"
    else:
        where = f"consensus distance {np.asarray(metrics.consensus)[i]}"
        if communicated[i]:
            where += f" right after the mixing by {mixer_name!r}"
    raise NonFiniteError(
        f"non-finite value at step {k0 + i} (0-based): {where}; stopping the run. "
        "Lower the learning rate or check the data.", step=k0 + i, worker=worker)
