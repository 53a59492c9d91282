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

from coopsgd.parallel import programs as _programs
from coopsgd.parallel.collectives import WorkerAxis, leading_sum
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound, OptimizerSync
from coopsgd.parallel.state import EngineState, PeriodState

__all__ = ["Spec", "column_mean", "consensus", "init_state", "local_step", "round_end", "round_program", "summarize",
           "workers_consensus"]


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
    init = _programs.program(("optimizer init", _programs.fingerprint(spec.optimizer.init), spec.m),
                             lambda: jax.jit(jax.vmap(spec.optimizer.init, in_axes=None, axis_size=spec.m)))
    opt_state = init(params)
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
    """``(1/m) Σ_i ‖x_i − x̄‖²`` over all workers (float32). Two collectives on devices (one
    all-reduce of every leaf's sum, one of the distances); the sums by the worker axis's fastest
    form, the distances one per worker (per-worker sums: XLA:CPU runs them several times faster
    than one sum over the stacked deviations)."""
    sums, tree = jax.tree.flatten(jax.tree.map(leading_sum, x))
    if axis.name is not None and len(sums) > 1 and len({v.dtype for v in sums}) == 1:  # one all-reduce
        total = axis.psum(jnp.concatenate([v.reshape(-1) for v in sums]))
        cuts = np.cumsum([v.size for v in sums])[:-1].tolist()
        sums = [part.reshape(v.shape) for part, v in zip(jnp.split(total, cuts), sums)]
    else:
        sums = [axis.psum(v) for v in sums]
    means = jax.tree.unflatten(tree, [v / axis.m for v in sums])
    dist = jax.tree.map(lambda a, mean: jnp.sum(jax.vmap(
        lambda w: jnp.sum(jnp.square((w - mean).astype(jnp.float32))))(a)), x, means)
    return axis.psum(sum(jax.tree.leaves(dist))) / axis.m


@jax.jit
def workers_consensus(workers):
    """:func:`consensus` of the m workers' models (leaves (m, …)), one compiled call."""
    return consensus(WorkerAxis(jax.tree.leaves(workers)[0].shape[0]), workers)


@jax.jit
def column_mean(columns):
    """The mean of stacked columns (leaves (n, …)) by the fastest sum (:func:`leading_sum`)."""
    return jax.tree.map(lambda x: leading_sum(x) / x.shape[0], columns)


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
    """The per-device computation of up to ``rounds`` rounds of ``length`` local steps, each ending
    (if ``mixes``) with the mixing whose static structure is ``static``.

    Returns ``fn(params, opt, mix_state, step, key, batches, args, moves, todo=None) -> (params,
    opt, mix_state, outs)`` with ``batches`` leaves (rounds·length, m/D, …), ``args`` and ``moves``
    stacked over the rounds, and ``outs`` the per-step losses, aux and consensus. With
    ``rounds > 1`` only the first ``todo`` rounds run (a traced count, 1 ≤ todo ≤ rounds: one
    program serves every call of whole rounds, the last, shorter one of a run included); the
    outputs of the rounds not run are zeros.
    """
    track = spec.track_consensus

    def body(c, b):
        x, o, s, k, key = c
        x, o, s, loss, aux = local_step(spec, axis, x, o, s, k, key, b)
        return (x, o, s, k + 1, key), (loss, aux, consensus(axis, x) if track else None)

    def one_round(x, o, s, k, key, batch, round_args, moved):
        if not mixes or not track:
            # One scan over the whole round, then the mixing (the usual, leanest program).
            (x, o, s, k, _), outs = lax.scan(body, (x, o, s, k, key), batch)
            if mixes:
                x, o, s = round_end(spec, axis, x, o, s, MixRound(static, round_args, moved, k), sync_some)
            return (x, o, s, k), outs
        # With the consensus metric the last step is unrolled, so that its consensus is
        # measured after the mixing without computing it twice.
        if length > 1:
            (x, o, s, k, _), head = lax.scan(body, (x, o, s, k, key), jax.tree.map(lambda a: a[:-1], batch))
        x, o, s, loss, aux = local_step(spec, axis, x, o, s, k, key, jax.tree.map(lambda a: a[-1], batch))
        k = k + 1
        x, o, s = round_end(spec, axis, x, o, s, MixRound(static, round_args, moved, k), sync_some)
        outs = jax.tree.map(lambda a: a[None], (loss, aux, consensus(axis, x)))
        if length > 1:
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, outs)
        return (x, o, s, k), outs

    def fn(params, opt, mix_state, step, key, batches, args, moves, todo=None):
        batches = jax.tree.map(lambda a: a.reshape((rounds, length) + a.shape[1:]), batches)
        if rounds == 1:
            first = lambda a: a[0]
            (params, opt, mix_state, _), outs = one_round(
                params, opt, mix_state, step, key, *jax.tree.map(first, (batches, args, moves)))
            outs = jax.tree.map(lambda a: a[None], outs)
        else:
            def loop(i, carry):
                *state, buffers = carry
                pick = lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False)
                state, outs = one_round(*state, key, *jax.tree.map(pick, (batches, args, moves)))
                put = lambda buf, v: lax.dynamic_update_index_in_dim(buf, v, i, 0)
                return *state, jax.tree.map(put, buffers, outs)

            shapes = jax.eval_shape(lambda *a: one_round(*a)[1], params, opt, mix_state, step, key,
                                    *jax.tree.map(lambda a: a[0], (batches, args, moves)))
            buffers = jax.tree.map(lambda a: jnp.zeros((rounds,) + a.shape, a.dtype), shapes)
            params, opt, mix_state, _, outs = lax.fori_loop(
                0, todo, loop, (params, opt, mix_state, step, buffers))
        flat = lambda a: a.reshape((rounds * length,) + a.shape[2:])
        losses, aux, cons = outs
        return params, opt, mix_state, {"losses": flat(losses), "aux": jax.tree.map(flat, aux),
                                        "consensus": None if cons is None else flat(cons)}

    return fn


def summarize(outs) -> dict[str, Any]:
    """Per-step mean loss and the finite flag from a program's outputs."""
    losses = outs["losses"]
    finite = jnp.all(jnp.isfinite(losses), axis=1)
    if outs["consensus"] is not None:
        finite = finite & jnp.isfinite(outs["consensus"])
    return {**outs, "loss": jnp.mean(losses, axis=1), "finite": finite}
