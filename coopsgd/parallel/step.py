"""Cooperative SGD inside a training step the user already has.

The shape of MaxText's ``build_diloco_train_step(train_step)``: the user keeps a per-worker step
``train_step(worker_state, batch) -> (worker_state, metrics)`` — their model, their optimizer
(``nnx.Optimizer``, optax, anything), their loss — and :func:`cooperative_step` returns
``init`` and a ``step`` over all m workers that runs every worker's own step and, at the round
ends of the algorithm's period, its mixing on the workers' parameters (Wang & Joshi, "Cooperative
SGD", arXiv:1808.07576, §3: ``X ← (X − ηG) W_k`` with the local update left to the user).

Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, coopsgd
    >>> tx = optax.sgd(0.1)
    >>> def train_step(ws, batch):  # one worker: ws = (params, optimizer state)
    ...     params, opt = ws
    ...     loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch @ p - 1.0) ** 2))(params)
    ...     updates, opt = tx.update(grads, opt)
    ...     return (optax.apply_updates(params, updates), opt), {"loss": loss}
    >>> init, step = coopsgd.cooperative_step(coopsgd.local_sgd(4, tau=2), train_step,
    ...                                       params=lambda ws: ws[0], with_params=lambda ws, p: (p, ws[1]))
    >>> w = jnp.zeros(3)
    >>> state = init((w, tx.init(w)))
    >>> state, metrics = step(state, np.ones((4, 5, 3), np.float32))
    >>> metrics["loss"].shape, bool(metrics["communicated"])
    ((4,), False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.core.algorithm import Algorithm
from coopsgd.parallel import programs as _programs
from coopsgd.parallel.batches import check_leading
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.linear import linear
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound, check_mixer

__all__ = ["CooperativeStep", "StepState", "cooperative_step"]


class StepState(NamedTuple):
    """The state of :func:`cooperative_step` (a pytree).

    Attributes:
        workers: every worker's own training state, stacked (leaves with leading axis m).
        mix_state: the mixer's :class:`~coopsgd.parallel.protocol.MixerState` (the linear
            mixer's auxiliary columns, e.g. EASGD's anchor).
        step: local steps taken (int32 scalar).
    """

    workers: Any
    mix_state: MixerState
    step: jax.Array


def _params_attribute(worker_state):
    return worker_state.params


def _replace_params(worker_state, params):
    replace = getattr(worker_state, "_replace", None) or getattr(worker_state, "replace")
    return replace(params=params)


class CooperativeStep(NamedTuple):
    """``(init, step)`` from :func:`cooperative_step`; unpacks as a pair."""

    init: Callable[[Any], StepState]
    step: Callable[[StepState, Any], tuple[StepState, dict]]


def cooperative_step(algorithm: Algorithm, train_step: Callable, *, params: Callable | None = None,
                     with_params: Callable | None = None, donate: bool = False) -> CooperativeStep:
    """Wrap a per-worker ``train_step`` into a step over all the algorithm's m workers.

    Args:
        algorithm: any :class:`~coopsgd.core.algorithm.Algorithm` with a static period (its
            period decides the round ends, its mixer — the linear W unless it has its own — what
            happens at them).
        train_step: ``train_step(worker_state, batch) -> (worker_state, metrics)`` for one
            worker, jittable; it is vmapped over the workers.
        params: ``worker_state -> params``, the part the algorithm mixes (default: the
            ``.params`` attribute, as in flax's ``TrainState``).
        with_params: ``(worker_state, params) -> worker_state`` (default: ``._replace`` or
            ``.replace`` with ``params=``).
        donate: let every compiled call reuse the state's buffers (the state passed in is
            consumed).

    Returns:
        ``(init, step)``: ``init(worker_state)`` gives every worker a copy of one worker's state
        (the mixer's state from the m copies of its params); ``step(state, batch)`` takes a batch
        whose leaves have leading axis m and returns ``(state, metrics)``, the metrics stacked
        over the workers plus ``communicated`` (whether this step ended with a mixing that moved
        data). One compiled program per distinct mixing structure (two for a static W: with and
        without the mixing).

    Raises:
        ValueError: for an algorithm with an adaptive period (it needs the observations
            :class:`~coopsgd.CooperativeSGD` feeds it) or a mixer that changes the gradients
            (gradient tracking: this step never sees them), a train step that is not callable,
            or a batch whose leading axes are not m.
    """
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"algorithm must be a coopsgd.Algorithm, got {type(algorithm).__name__}")
    if not callable(train_step):
        raise ValueError(f"train_step must be callable train_step(worker_state, batch), got {train_step!r}")
    if algorithm.period.adaptive:
        raise ValueError(f"{algorithm.name} has an adaptive period, which decides each round from what the "
                         "training loop observes; run it with coopsgd.CooperativeSGD")
    get = params or _params_attribute
    put = with_params or _replace_params
    m = algorithm.m
    mixer: Mixer = algorithm.mixer(algorithm, False) if algorithm.mixer is not None else linear(algorithm)
    if mixer.direction is not None:
        raise ValueError(f"{algorithm.name}'s mixer {mixer.name!r} changes the gradients the optimizer is given, "
                         "which a user's own train step computes out of its reach; use coopsgd.CooperativeSGD")
    schedule, axis = algorithm.period, WorkerAxis(m)
    programs: dict = {}
    donated = (0, 1) if donate else ()

    def program(mixes: bool, static, state: StepState):
        """The compiled step for this mixing structure and this layout of the state: its results
        pinned to the layout given (workers placed over a mesh stay there, never replicated)."""
        layout, signature = _programs.layout((state.workers, state.mix_state))
        key = (mixes, static, signature)
        if key not in programs:
            def run(workers, mix_state, batch, args, moves, k):
                workers, metrics = jax.vmap(train_step)(workers, batch)
                if mixes:
                    x, mix_state = mixer.apply(get(workers), mix_state, MixRound(static, args, moves, k + 1), axis)
                    workers = put(workers, x)
                return workers, mix_state, k + 1, metrics

            programs[key] = jax.jit(run, donate_argnums=donated, out_shardings=(*layout, None, None))
        return programs[key]

    def init(worker_state) -> StepState:
        workers = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (m,) + jnp.shape(a)), worker_state)
        try:
            columns = get(workers)
        except Exception as err:  # the getter does not fit the user's state
            raise ValueError(f"params(worker_state) failed on the given state: {type(err).__name__}: {err}; pass "
                             "params= and with_params= to say where the parameters are") from err
        mix_state = mixer.init(jax.tree.map(np.asarray, columns))
        check_mixer(mixer, columns, mix_state, mixer.plan(0), m)
        return StepState(workers, jax.tree.map(jnp.asarray, mix_state), jnp.asarray(0, jnp.int32))

    def step(state: StepState, batch) -> tuple[StepState, dict]:
        check_leading(batch, m)
        k = int(state.step)
        mixes = schedule.communicates(k)
        mix_round = mixer.plan(schedule.round_index(k)) if mixes else MixRound(None, (), False)
        workers, mix_state, count, metrics = program(mixes, mix_round.static, state)(
            state.workers, state.mix_state, batch, mix_round.args, np.asarray(bool(mix_round.moves)), state.step)
        return StepState(workers, mix_state, count), {**metrics, "communicated": bool(mixes and mix_round.moves)}

    return CooperativeStep(init, step)
