"""The round as pure functions: local steps on every worker, then the mixer, then the optimizer-state
policy — written once for every backend (the worker axis is a
:class:`~coopsgd.parallel.collectives.WorkerAxis`).

Each worker ``i`` computes its gradient on its slice of the batch, its optax optimizer turns it into
an update ``U[:, i]`` (``−ηg`` for plain SGD), and after the last local step of a round the mixer
runs — for a linear W, ``new[j] = Σ_i W[i, j] (X + U)[:, i]`` (Wang & Joshi, "Cooperative SGD",
arXiv:1808.07576, §3, ``X_{k+1} = (X_k − ηG_k) W_k``).

:func:`init_state` and :func:`round_program` are what :class:`~coopsgd.parallel.trainer.
CooperativeSGD` compiles; :func:`local_step` and :func:`round_end` (the mixer, then the optimizer
policy) are the pieces, usable inside a user's own jitted code.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound, OptimizerSync
from coopsgd.parallel.state import EngineState, PeriodState

__all__ = ["Spec", "consensus", "init_state", "local_step", "round_end", "round_program", "summarize"]


class Spec(NamedTuple):
    """What one round computes, fixed when a trainer is built."""

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    mixer: Mixer
    sync: OptimizerSync
    m: int
    has_aux: bool = False
    with_rng: bool = False
    track_consensus: bool = True


def init_state(spec: Spec, params, seed: int = 0, rule=()) -> EngineState:
    """The state before step 0 on the simulate layout: every worker starts at ``params``, with its
    own ``optimizer.init``; the mixer's state comes from ``mixer.init`` of those columns."""
    workers = jax.tree.map(lambda p: np.broadcast_to(np.asarray(p), (spec.m,) + np.shape(p)), params)
    opt_state = jax.jit(jax.vmap(spec.optimizer.init, in_axes=None, axis_size=spec.m))(params)
    return EngineState(params=workers, opt_state=opt_state, mix_state=spec.mixer.init(workers),
                       step=jnp.asarray(0, jnp.int32), rounds=jnp.asarray(0, jnp.int32),
                       key=jax.random.key(seed), period=PeriodState(rule=rule))


def local_step(spec: Spec, axis: WorkerAxis, x, o, s: MixerState, k, key, batch):
    """One optimizer step on this device's workers: ``(x, o, s, losses, aux)``. With ``with_rng``
    the loss gets the key ``fold_in(fold_in(key, k), i)`` of worker i. A mixer with a
    ``direction`` turns the gradients into what the optimizer is given (gradient tracking's y)."""
    value_and_grad = jax.value_and_grad(spec.loss_fn, has_aux=spec.has_aux)
    if spec.with_rng:
        keys = jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(key, k), w))(axis.ids())
        out, grads = jax.vmap(value_and_grad)(x, batch, keys)
    else:
        out, grads = jax.vmap(value_and_grad)(x, batch)
    loss, aux = out if spec.has_aux else (out, None)
    if spec.mixer.direction is not None:
        grads, s = spec.mixer.direction(grads, x, s, axis)
    updates, o = jax.vmap(spec.optimizer.update)(grads, o, x)
    return optax.apply_updates(x, updates), o, s, loss, aux


def consensus(axis: WorkerAxis, x):
    """``(1/m) Σ_i ‖x_i − x̄‖²`` over all workers (float32)."""
    mean = jax.tree.map(lambda a: axis.sum(a) / axis.m, x)
    dev = jax.tree.map(lambda a, b: jnp.sum((a - b).astype(jnp.float32) ** 2), x, mean)
    return axis.psum(sum(jax.tree.leaves(dev))) / axis.m


def round_end(spec: Spec, axis: WorkerAxis, x, o, s: MixerState, mix_round: MixRound, sync_some: bool):
    """The round's end: the mixer, then (if ``sync_some``: some round of this program moved data)
    the optimizer-state policy where ``mix_round.moves``."""
    x, s = spec.mixer.apply(x, s, mix_round, axis)
    if sync_some and not spec.sync.identity:
        synced = spec.sync.apply(o, x, axis)
        o = jax.tree.map(lambda a, b: jnp.where(mix_round.moves, a, b), synced, o)
    return x, o, s


def round_program(spec: Spec, axis: WorkerAxis, rounds: int, length: int, mixes: bool,
                  static: Hashable | None, sync_some: bool) -> Callable:
    """The per-device computation of ``rounds`` rounds of ``length`` local steps, each ending (if
    ``mixes``) with the mixing whose static structure is ``static``.

    Returns ``fn(params, opt, mix_state, step, key, batches, args, moves) -> (params, opt,
    mix_state, outs)`` with ``batches`` leaves (rounds·length, m/D, …), ``args`` and ``moves``
    stacked over the rounds, and ``outs`` the per-step losses, aux and consensus.
    """
    track = spec.track_consensus

    def fn(params, opt, mix_state, step, key, batches, args, moves):
        def body(c, b):
            x, o, s, k = c
            x, o, s, loss, aux = local_step(spec, axis, x, o, s, k, key, b)
            return (x, o, s, k + 1), (loss, aux, consensus(axis, x) if track else None)

        def one_round(carry, xs):
            x, s, o, k = carry
            batch, round_args, moved = xs
            if not mixes or not track:
                # One scan over the whole round, then the mixing (the usual, leanest program).
                (x, o, s, k), outs = lax.scan(body, (x, o, s, k), batch)
                if mixes:
                    x, o, s = round_end(spec, axis, x, o, s, MixRound(static, round_args, moved, k), sync_some)
                return (x, s, o, k), outs
            # With the consensus metric the last step is unrolled, so that its consensus is
            # measured after the mixing without computing it twice.
            head = jax.tree.map(lambda a: a[: length - 1], batch)
            last = jax.tree.map(lambda a: a[length - 1], batch)
            if length > 1:
                (x, o, s, k), outs_head = lax.scan(body, (x, o, s, k), head)
            x, o, s, loss, aux = local_step(spec, axis, x, o, s, k, key, last)
            k = k + 1
            x, o, s = round_end(spec, axis, x, o, s, MixRound(static, round_args, moved, k), sync_some)
            outs_last = jax.tree.map(lambda a: a[None], (loss, aux, consensus(axis, x)))
            if length > 1:
                outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs_head, outs_last)
            else:
                outs = outs_last
            return (x, s, o, k), outs

        batches = jax.tree.map(lambda a: a.reshape((rounds, length) + a.shape[1:]), batches)
        (params, mix_state, opt, _), (losses, aux, cons) = lax.scan(
            one_round, (params, mix_state, opt, step), (batches, args, moves))
        flat = lambda a: a.reshape((rounds * length,) + a.shape[2:])
        outs = {"losses": flat(losses), "aux": jax.tree.map(flat, aux),
                "consensus": None if cons is None else flat(cons)}
        return params, opt, mix_state, outs

    return fn


def summarize(outs) -> dict[str, Any]:
    """Per-step mean loss and the finite flag from a program's outputs."""
    losses = outs["losses"]
    finite = jnp.all(jnp.isfinite(losses), axis=1)
    if outs["consensus"] is not None:
        finite = finite & jnp.isfinite(outs["consensus"])
    return {**outs, "loss": jnp.mean(losses, axis=1), "finite": finite}
