"""CHOCO-SGD: decentralized SGD with compressed gossip (Koloskova, Stich & Jaggi, "Decentralized
stochastic optimization and gossip algorithms with compressed communication", ICML 2019,
Algorithm 1).

Every worker keeps a public copy x̂_i of its model (x̂⁰ = 0) that all its neighbours also hold.
After the local step ``x_i^{t+½} = x_i − η g_i(x_i)`` (any optax update),

    q_i = Q(x_i^{t+½} − x̂_i)                              (compressed, sent to the neighbours)
    x̂_j ← x̂_j + q_j                                       (on every worker that holds x̂_j)
    x_i ← x_i^{t+½} + γ Σ_j W_ij (x̂_j − x̂_i)

W is a static symmetric doubly stochastic matrix. Each worker keeps ``s_i = Σ_j W_ij x̂_j``,
updated by the received q's (``s ← s + Wq``), so the consensus term is ``s_i − x̂_i``: two more
copies of the models per worker, and only the compressed payloads cross the network. With
``Q = identity`` and γ = 1 it is D-PSGD, ``X ← W(X − ηG)``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.algorithms import compression
from coopsgd.algorithms.decentralized import consensus_matrix
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.communication import Communication
from coopsgd.core.validate import require_int, require_proportion
from coopsgd.parallel import plan as _plan
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.linear import LinearRounds
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound

__all__ = ["choco_mixer", "choco_sgd", "gossip_payloads"]


def _bcast(coef, x):
    return coef.reshape(coef.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def gossip_payloads(plan: _plan.MixPlan, payload, decode, coef, axis: WorkerAxis):
    """``(W q)_i = Σ_j W_ij q_j`` on this device's workers, where only the payloads of the q_j
    travel: one ``ppermute`` of the payload per neighbour slot, or an all-gather of the payloads for
    a full W. ``decode(payload) -> q`` acts on stacked rows (leading axis: workers)."""
    own = decode(payload)
    if plan.kind == "none":
        return own
    if plan.kind == "diag":
        return _bcast(axis.local(coef["d"]), own) * own
    if plan.kind in ("mean", "dense"):
        everyone = decode(jax.tree.map(axis.gather, payload))
        if plan.kind == "dense":
            cols = axis.local(coef["dense"], axis=1)
            return jnp.tensordot(cols.T.astype(own.dtype), everyone, axes=1)
        total = coef["c"].astype(own.dtype) * jnp.sum(everyone, axis=0, keepdims=True)
        return _bcast(axis.local(coef["d"]), own) * own + total if plan.self_weight else jnp.broadcast_to(total, own.shape)
    out = _bcast(axis.local(coef["d"]), own) * own
    slot_coef = axis.local(coef["slots"], axis=1)
    for s, shift in enumerate(plan.shifts):
        moved = jax.tree.map(partial(_move, axis, shift, plan.sources[s]), payload)
        out = out + _bcast(slot_coef[s], out) * decode(moved)
    return out


def _move(axis: WorkerAxis, shift, sources, array):
    """One neighbour slot's incoming arrays: a ring shift, or a permutation by its source table."""
    return axis.shift(array, shift) if shift is not None else axis.permute(array, sources)


def _traffic(plan: _plan.MixPlan, payload: float) -> Communication:
    """What one compressed gossip sends per worker: the payload once per neighbour slot, or to
    every other worker (an all-gather) for a full W."""
    if plan.kind in ("mean", "dense") and plan.m > 1:
        return Communication("dense", (plan.m - 1) * payload, plan.m - 1, 0, 0, plan.m)
    return _plan.communication(plan, payload)


def choco_mixer(algorithm: Algorithm, devices: bool = False, *, gamma: float = 1.0,
                compressor: compression.Compressor | None = None, seed: int = 0) -> Mixer:
    """CHOCO-SGD's mixing for ``algorithm``'s static W (see the module docstring).

    Its state (per worker): the public copy x̂ and ``s = Σ_j W_ij x̂_j``, both zero at the start.
    A random compressor draws with the key ``fold_in(fold_in(fold_in(key(seed), step), worker),
    leaf)``. The bytes it reports are the compressed payload's, read from the model the mixer is
    initialised with (so :meth:`CooperativeSGD.communication` needs ``init`` first).
    """
    compressor = compressor or compression.identity()
    rounds = LinearRounds(algorithm, prune=devices)
    seed = int(seed)  # the key is made inside the round: a captured array would be a new program each time
    ratio: list[float] = []  # payload bytes per model byte, from the model at init

    def init(columns) -> MixerState:
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), columns)
        model = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(one))
        ratio[:] = [compression.payload_bytes(compressor, one) / max(model, 1)]
        zeros = jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.result_type(x)), columns)
        return MixerState(per_worker={"hat": zeros, "s": zeros})

    def gossip_leaf(x, hat, s, keys, mix_round: MixRound, axis: WorkerAxis):
        rows, size = x.shape[0], int(np.prod(x.shape[1:]))
        # The barrier keeps XLA from folding the neighbour shifts into the compressor's own
        # operations: folded into top-k's sort, they stop XLA:CPU from selecting with its TopK
        # kernel, and it sorts each row whole (a compare --quick's CHOCO-SGD ran 0.84 s, 0.38 s now).
        payload = jax.lax.optimization_barrier(jax.vmap(compressor.encode)((x - hat).reshape(rows, size), keys))
        decode = jax.vmap(partial(compressor.decode, size=size))

        def dense(p):
            return decode(p).astype(x.dtype)

        hat = hat + dense(payload).reshape(x.shape)
        s = s + gossip_payloads(mix_round.static, payload, dense, mix_round.args, axis).reshape(x.shape)
        return x + jnp.asarray(gamma, x.dtype) * (s - hat), hat, s

    def apply(columns, state: MixerState, mix_round: MixRound, axis: WorkerAxis):
        leaves, treedef = jax.tree.flatten(columns)
        hats, sums = jax.tree.leaves(state.per_worker["hat"]), jax.tree.leaves(state.per_worker["s"])
        step = jnp.asarray(0 if mix_round.step is None else mix_round.step)
        base = jax.random.key(seed)
        worker_keys = jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(base, step), w))(axis.ids())
        out = [gossip_leaf(x, hat, s, jax.vmap(partial(jax.random.fold_in, data=index))(worker_keys), mix_round, axis)
               for index, (x, hat, s) in enumerate(zip(leaves, hats, sums))]
        new_x, new_hat, new_s = (jax.tree.unflatten(treedef, list(part)) for part in zip(*out))
        return new_x, MixerState(per_worker={"hat": new_hat, "s": new_s})

    def traffic(r: int, param_bytes: float) -> Communication:
        if not ratio:
            raise ValueError("CHOCO-SGD's bytes are the compressed payload's, read from the model: "
                             "call trainer.init(params) before trainer.communication")
        return _traffic(rounds.round(r).static, float(param_bytes) * ratio[0])

    return Mixer(init=init, apply=apply, traffic=traffic, plan=rounds.round,
                 name=f"CHOCO-SGD gossip ({compressor.name}, gamma={gamma:g})")


def choco_sgd(graph_or_W, gamma: float, compressor: compression.Compressor | None = None, *,
              weights="metropolis", tau=1, seed: int = 0) -> Algorithm:
    """CHOCO-SGD (Koloskova, Stich & Jaggi, ICML 2019, Algorithm 1): D-PSGD whose gossip sends
    ``Q(x_i − x̂_i)`` instead of the model, with consensus step size γ.

    Args:
        graph_or_W: a connected networkx graph (weighted by ``weights``) or a symmetric doubly
            stochastic W.
        gamma: the consensus step γ ∈ (0, 1]; their theory takes γ of order δρ² (δ the
            compressor's contraction, ρ the spectral gap), in practice tuned: with top-k at 1 %
            on an 8-worker ring 0.05 and 0.1 train, 0.2 diverges (docs/reproductions.md).
        compressor: a :class:`~coopsgd.algorithms.compression.Compressor` (default identity).
        tau: local steps between gossips (1 in the paper).
        seed: the random compressors' seed.

    Raises:
        ValueError: γ outside (0, 1], a compressor that is not one, a disconnected graph.
    """
    gamma = require_proportion("gamma", gamma, rule="CHOCO-SGD's consensus step size")
    if compressor is not None and not isinstance(compressor, compression.Compressor):
        raise ValueError(f"compressor must be a coopsgd.compression.Compressor (e.g. compression.top_k(0.01)), "
                         f"got {compressor!r}")
    seed = require_int("seed", seed, 0)
    w = consensus_matrix(graph_or_W, weights, "CHOCO-SGD")
    factory = partial(choco_mixer, gamma=gamma, compressor=compressor, seed=seed)
    return Algorithm(w, tau=tau, name="choco_sgd", mixer=factory)
