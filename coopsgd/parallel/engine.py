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
    has_state: bool = False
    state_sync: OptimizerSync | None = None


def init_state(spec: Spec, params, seed: int = 0, rule=(), model_state=(), opt_state=None) -> EngineState:
    """The state before step 0 on the simulate layout: every worker starts at ``params`` (and
    ``model_state``), with its own ``optimizer.init`` (or the ``opt_state`` given, already laid out
    by a backend); the mixer's state comes from ``mixer.init`` of those columns."""
    workers = jax.tree.map(lambda p: np.broadcast_to(np.asarray(p), (spec.m,) + np.shape(p)), params)
    if opt_state is None:
        init = _programs.program(("optimizer init", _programs.fingerprint(spec.optimizer.init), spec.m),
                                 lambda: jax.jit(jax.vmap(spec.optimizer.init, in_axes=None, axis_size=spec.m)))
        opt_state = init(params)
    states = jax.tree.map(lambda p: np.broadcast_to(np.asarray(p), (spec.m,) + np.shape(p)), model_state)
    return EngineState(params=workers, opt_state=opt_state, mix_state=spec.mixer.init(workers),
                       step=jnp.asarray(0, jnp.int32), rounds=jnp.asarray(0, jnp.int32),
                       key=jax.random.key(seed), period=PeriodState(rule=rule), model_state=states)


def _per_worker_loss(spec: Spec, state_tree):
    """``f(params, model_state_leaves, batch[, key]) -> ((loss, (aux, model_state)), grads)`` for
    one worker, whatever of ``has_aux``, ``has_state`` and ``with_rng`` the loss was given with.
    The model state is rebuilt from its leaves inside the differentiated function, so that state
    objects a model mutates in place (flax nnx's ``Variable`` s) belong to the trace that mutates
    them."""
    def loss(params, leaves, batch, *key):
        model_state = jax.tree.unflatten(state_tree, leaves)
        if spec.has_state:
            out, model_state = spec.loss_fn(params, model_state, batch, *key)
        else:
            out = spec.loss_fn(params, batch, *key)
        value, aux = out if spec.has_aux else (out, None)
        return value, (aux, model_state)

    return jax.value_and_grad(loss, has_aux=True)


def local_step(spec: Spec, axis: WorkerAxis, x, o, s: MixerState, ms, k, key, batch):
    """One optimizer step on this device's workers: ``(x, o, s, ms, losses, aux)``, ``ms`` the
    workers' model states (``()`` unless the loss has state). With ``with_rng`` the loss gets the
    key ``fold_in(fold_in(key, k), i)`` of worker i. A mixer with a ``direction`` turns the
    gradients into what the optimizer is given (gradient tracking's y)."""
    leaves, tree = jax.tree.flatten(ms)
    value_and_grad = _per_worker_loss(spec, tree)
    if spec.with_rng:
        keys = jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(key, k), w))(axis.ids())
        (loss, (aux, ms)), grads = jax.vmap(value_and_grad)(x, leaves, batch, keys)
    else:
        (loss, (aux, ms)), grads = jax.vmap(value_and_grad)(x, leaves, batch)
    if spec.mixer.direction is not None:
        grads, s = spec.mixer.direction(grads, x, s, axis)
    updates, o = jax.vmap(spec.optimizer.update)(grads, o, x)
    return optax.apply_updates(x, updates), o, s, ms, loss, aux


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


def _synced(policy: OptimizerSync | None, tree, x, axis: WorkerAxis, moves):
    """``tree`` after ``policy`` where this round's mixing ``moves`` data (unchanged elsewhere)."""
    if policy is None or policy.identity or not jax.tree.leaves(tree):
        return tree
    synced = policy.apply(tree, x, axis)
    return jax.tree.map(lambda a, b: jnp.where(moves, a, b), synced, tree)


def round_end(spec: Spec, axis: WorkerAxis, x, o, s: MixerState, mix_round: MixRound, sync_some: bool,
              ms=()):
    """The round's end: the mixer, then (if ``sync_some``: some round of this program moved data)
    the optimizer-state and model-state policies where ``mix_round.moves``: ``(x, o, s, ms)``."""
    x, s = spec.mixer.apply(x, s, mix_round, axis)
    if sync_some:
        o = _synced(spec.sync, o, x, axis, mix_round.moves)
        ms = _synced(spec.state_sync, ms, x, axis, mix_round.moves)
    return x, o, s, ms


def round_program(spec: Spec, axis: WorkerAxis, rounds: int, length: int, mixes: bool,
                  static: Hashable | None, sync_some: bool) -> Callable:
    """The per-device computation of up to ``rounds`` rounds of ``length`` local steps, each ending
    (if ``mixes``) with the mixing whose static structure is ``static``.

    Returns ``fn(params, opt, mix_state, model_state, step, key, batches, args, moves, todo=None) ->
    (params, opt, mix_state, model_state, outs)`` with ``batches`` leaves (rounds·length, m/D, …), ``args`` and ``moves``
    stacked over the rounds, and ``outs`` the per-step losses, aux and consensus. With
    ``rounds > 1`` only the first ``todo`` rounds run (a traced count, 1 ≤ todo ≤ rounds: one
    program serves every call of whole rounds, the last, shorter one of a run included); the
    outputs of the rounds not run are zeros.
    """
    track = spec.track_consensus
    # With the metric on, each step's consensus is measured in the scan, except where a round ends
    # with a mixing: there the last step's is measured after the mixing (the scan skips it), so
    # the step is compiled once, not once in the scan and again unrolled.
    inside = track and (length > 1 or not mixes)

    def body(c, b):
        x, o, s, ms, k, key = c
        batch, last = b
        x, o, s, ms, loss, aux = local_step(spec, axis, x, o, s, ms, k, key, batch)
        if not inside:
            cons = None
        elif mixes:
            cons = lax.cond(last, lambda x: jnp.zeros((), jnp.float32), lambda x: consensus(axis, x), x)
        else:
            cons = consensus(axis, x)
        return (x, o, s, ms, k + 1, key), (loss, aux, cons)

    @jax.jit
    def one_round(x, o, s, ms, k, key, batch, round_args, moved):
        last = jnp.arange(length) == length - 1
        (x, o, s, ms, k, _), outs = lax.scan(body, (x, o, s, ms, k, key), (batch, last))
        if mixes:
            x, o, s, ms = round_end(spec, axis, x, o, s, MixRound(static, round_args, moved, k), sync_some, ms)
            if track:
                loss, aux, cons = outs
                after = consensus(axis, x)
                outs = loss, aux, after[None] if cons is None else cons.at[-1].set(after)
        return (x, o, s, ms, k), outs

    def fn(params, opt, mix_state, model_state, step, key, batches, args, moves, todo=None):
        batches = jax.tree.map(lambda a: a.reshape((rounds, length) + a.shape[1:]), batches)
        carry = (params, opt, mix_state, model_state, step)
        if rounds == 1:
            first = lambda a: a[0]
            (*carry, _), outs = one_round(*carry, key, *jax.tree.map(first, (batches, args, moves)))
            outs = jax.tree.map(lambda a: a[None], outs)
        else:
            def loop(i, carry):
                *state, buffers = carry
                pick = lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False)
                state, outs = one_round(*state, key, *jax.tree.map(pick, (batches, args, moves)))
                put = lambda buf, v: lax.dynamic_update_index_in_dim(buf, v, i, 0)
                return *state, jax.tree.map(put, buffers, outs)

            # The round is traced once: its shapes size the buffers, and the loop reuses the trace.
            shapes = jax.eval_shape(lambda *a: one_round(*a)[1], *carry, key,
                                    *jax.tree.map(lambda a: a[0], (batches, args, moves)))
            buffers = jax.tree.map(lambda a: jnp.zeros((rounds,) + a.shape, a.dtype), shapes)
            *carry, _, outs = lax.fori_loop(0, todo, loop, (*carry, buffers))
        params, opt, mix_state, model_state = carry[:4]
        flat = lambda a: a.reshape((rounds * length,) + a.shape[2:])
        losses, aux, cons = outs
        return params, opt, mix_state, model_state, {"losses": flat(losses), "aux": jax.tree.map(flat, aux),
                                                     "consensus": None if cons is None else flat(cons)}

    return fn


def summarize(outs) -> dict[str, Any]:
    """Per-step mean loss and the finite flag from a program's outputs."""
    losses = outs["losses"]
    finite = jnp.all(jnp.isfinite(losses), axis=1)
    if outs["consensus"] is not None:
        finite = finite & jnp.isfinite(outs["consensus"])
    return {**outs, "loss": jnp.mean(losses, axis=1), "finite": finite}
