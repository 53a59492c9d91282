"""The linear mixer: ``X ← X W^(r)`` on the columns ``[x_1 … x_m, z_1 … z_v]``, with the
communication W's structure picks (:mod:`coopsgd.parallel.plan`).

The v auxiliary columns (EASGD's and Overlap Local-SGD's anchor, global momentum's buffers) are
this mixer's shared state, replicated on every device; the workers' columns are the models. One
mixing is ``new[j] = Σ_i W[i, j] · old[i]`` (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576,
§3).
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import as_operator
from coopsgd.parallel import plan as _plan
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound

__all__ = ["LinearRounds", "linear", "linear_unmixed", "mix", "mix_local"]


def mix(stacked, w):
    """One mixing of stacked columns: ``new[j] = Σ_i W[i, j] · old[i]`` for every leaf.

    This is the reference kernel (a dense contraction, jittable); the trainer applies the same
    map with the communication its plan picks.

    Args:
        stacked: a pytree whose leaves have leading axis ``n``.
        w: an ``n × n`` matrix (NumPy, JAX or a MixingMatrix).

    Returns:
        The mixed pytree, same structure, shapes and dtypes.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> mix(jnp.array([[0.0], [2.0]]), np.full((2, 2), 0.5)).tolist()
        [[1.0], [1.0]]

    References:
        Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3: X_{k+1} = (X_k − ηG_k) W_k.
    """
    w = jnp.asarray(w if isinstance(w, jax.Array) else np.asarray(w))
    n = w.shape[0]
    if w.ndim != 2 or w.shape != (n, n):
        raise ValueError(f"W must be a square matrix, got shape {tuple(w.shape)}")

    def one(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] != n:
            raise ValueError(f"every leaf needs leading axis n = {n}, got shape {tuple(x.shape)}")
        return jnp.tensordot(w.astype(x.dtype).T, x, axes=1).astype(x.dtype)

    return jax.tree.map(one, stacked)


def _bcast(coef, x):
    """Coefficient vector (k,) against a stacked leaf (k, …)."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


PACK_BELOW = 1 << 16
"""On devices, leaves with fewer entries per worker than this travel packed into one buffer."""


def _packed(plan, workers, aux, coef, axis: WorkerAxis):
    """On devices, exchange the small leaves as one buffer per worker (concatenated: one ppermute
    per slot, one all-reduce per reduction, instead of one per leaf) and every large leaf on its
    own (its concatenation would cost a copy of it: with 8 CPU devices and a 1 M-parameter MLP,
    packing everything was 1.3× slower than one collective per leaf; per leaf was 2–3× slower
    at 6 k parameters)."""
    leaves, treedef = jax.tree.flatten(workers)
    aux_leaves = jax.tree.leaves(aux)
    small = [i for i, x in enumerate(leaves) if x[0].size < PACK_BELOW]
    groups = [[i] for i in range(len(leaves)) if i not in small] + ([small] if small else [])
    out_w, out_a = list(leaves), list(aux_leaves)
    for group in groups:
        if len(group) == 1:  # a large leaf: mixed as it is (no reshape, no concatenation)
            i = group[0]
            aux_i = aux_leaves[i] if plan.v else jnp.zeros((0,) + leaves[i].shape[1:], leaves[i].dtype)
            out_w[i], new_a = mix_local(plan, leaves[i], aux_i, coef, axis)
            if plan.v:
                out_a[i] = new_a
            continue
        sizes = [int(np.prod(leaves[i].shape[1:])) for i in group]
        flat = lambda xs: jnp.concatenate([xs[i].reshape(xs[i].shape[0], -1) for i in group], axis=1)
        flat_a = flat(aux_leaves) if plan.v else jnp.zeros((0, sum(sizes)), leaves[group[0]].dtype)
        new_w, new_a = mix_local(plan, flat(leaves), flat_a, coef, axis)
        cuts = np.cumsum(sizes)[:-1].tolist()
        for i, w in zip(group, jnp.split(new_w, cuts, axis=1)):
            out_w[i] = w.reshape(leaves[i].shape)
        if plan.v:
            for i, a in zip(group, jnp.split(new_a, cuts, axis=1)):
                out_a[i] = a.reshape(aux_leaves[i].shape)
    new_aux = jax.tree.unflatten(jax.tree.structure(aux), out_a) if plan.v else aux
    return jax.tree.unflatten(treedef, out_w), new_aux


def mix_local(plan: _plan.MixPlan, workers, aux, coef, axis: WorkerAxis):
    """Apply one planned mixing to this device's columns.

    Args:
        plan: the :class:`~coopsgd.parallel.plan.MixPlan`.
        workers: pytree of this device's worker columns, leaves (m/D, …).
        aux: pytree of the (replicated) auxiliary columns, leaves (v, …).
        coef: the plan's coefficients (:func:`~coopsgd.parallel.plan.coefficients`) as arrays.
        axis: the worker axis.

    Returns:
        ``(workers, aux)`` after ``new[j] = Σ_i W[i, j] old[i]``.
    """
    if plan.kind == "none":
        return workers, aux
    leaves = jax.tree.leaves(workers)
    if axis.name is not None and len(leaves) > 1 and len({x.dtype for x in leaves}) == 1:
        return _packed(plan, workers, aux, coef, axis)

    def shifted(x, s):
        shift = plan.shifts[s]
        return axis.shift(x, shift) if shift is not None else axis.permute(x, plan.sources[s])

    def mix_workers(x):
        if plan.kind == "dense":
            cols = axis.local(coef["dense"], axis=1)
            return jnp.tensordot(cols.T.astype(x.dtype), axis.gather(x), axes=1)
        if plan.kind == "mean":
            total = coef["c"].astype(x.dtype) * axis.sum(x, keepdims=True)
            if not plan.self_weight:  # exact averaging: every worker takes c · Σ_i x_i
                return jnp.broadcast_to(total, x.shape)
            return _bcast(axis.local(coef["d"]), x) * x + total
        if plan.kind == "groups":  # the mean within each group of g (a grouped all-reduce on devices)
            total = coef["c"].astype(x.dtype) * axis.group_sum(x, plan.group)
            if not plan.self_weight:
                return total
            return _bcast(axis.local(coef["d"]), x) * x + total
        out = _bcast(axis.local(coef["d"]), x) * x
        if plan.kind == "neighbour":
            slot_coef = axis.local(coef["slots"], axis=1)
            for s in range(len(plan.shifts)):
                out = out + _bcast(slot_coef[s], x) * shifted(x, s)
        return out

    new_workers = jax.tree.map(mix_workers, workers)
    if plan.v:
        if plan.aux_to_worker:
            aw = axis.local(coef["aw"], axis=1)  # (v, m/D)
            new_workers = jax.tree.map(
                lambda nw, z: nw + jnp.tensordot(aw.T.astype(z.dtype), z, axes=1), new_workers, aux)

        def mix_aux(x, z):
            out = jnp.tensordot(coef["aa"].T.astype(z.dtype), z, axes=1)
            if plan.worker_to_aux:
                wa = axis.local(coef["wa"], axis=0)  # (m/D, v)
                out = out + axis.psum(jnp.tensordot(wa.T.astype(x.dtype), x, axes=1))
            return out

        aux = jax.tree.map(mix_aux, workers, aux)
    return new_workers, aux


class LinearRounds:
    """The host side of the linear mixer: each round's plan, coefficients and traffic, from the
    algorithm's mixing schedule (cycles planned once per distinct matrix, so a long cycle that
    repeats a few matrices — hierarchical averaging's — plans those few; random schedules per
    round, cached)."""

    def __init__(self, algorithm: Algorithm, prune: bool):
        self.m, self.v = algorithm.m, algorithm.v
        self.schedule = algorithm.mixing
        cycle = self.schedule.cycle
        if cycle is not None:
            planned: dict[int, MixRound] = {}  # by the matrix object (the cycle holds them all)
            for w in cycle:
                if id(w) not in planned:
                    p = _plan.plan_for_matrix(w, self.m, self.v)
                    planned[id(w)] = MixRound(p, _plan.coefficients(p, w), p.communicates)
            self.cycle = tuple(planned[id(w)] for w in cycle)
            self.support_plan = None
        else:
            self.cycle = None
            self.support_plan = _plan.plan_for_support(self.schedule.support, self.m, self.v,
                                                       getattr(self.schedule, "matchings", None))
        # On devices a random schedule sends only the slots active in each round's W (one program
        # per activation pattern); simulated, one program over the whole support keeps rounds fused.
        self.prune = prune and self.support_plan is not None and self.support_plan.kind == "neighbour"
        self._recent: OrderedDict = OrderedDict()

    def _random(self, r: int):
        if r not in self._recent:
            w = self.schedule.at(r)
            active = _plan.active_slots(self.support_plan, w)
            plan = active if self.prune else self.support_plan
            moves = active.communicates and not as_operator(w, self.v).is_identity(atol=1e-12)
            self._recent[r] = (w, MixRound(plan, _plan.coefficients(plan, w), moves))
            while len(self._recent) > 1024:  # more than a fused call's rounds (steps_per_call)
                self._recent.popitem(last=False)
        return self._recent[r]

    def round(self, r: int) -> MixRound:
        """The :class:`MixRound` of round ``r`` (its plan, coefficients and whether it moves data)."""
        if self.cycle is not None:
            return self.cycle[r % len(self.cycle)]
        return self._random(r)[1]

    def traffic(self, r: int, param_bytes: float):
        """The :class:`Communication` of round ``r`` for models of ``param_bytes`` bytes (none when its W is I)."""
        if self.cycle is not None:
            return _plan.communication(self.round(r).static, param_bytes)
        w, mix_round = self._random(r)
        if not mix_round.moves:  # this round's W is I: nothing is sent, whatever the plan
            return _plan.communication(_plan.MixPlan(self.m, self.v, "none"), param_bytes)
        return _plan.communication(mix_round.static, param_bytes, w)


def linear(algorithm: Algorithm, *, prune: bool = False, unmixed_updates: bool = False) -> Mixer:
    """The mixer of A(τ, W, v): ``X ← X W^(r)`` with the communication W's structure picks.

    Args:
        algorithm: the :class:`~coopsgd.core.algorithm.Algorithm`.
        prune: send only a random schedule's active neighbour slots each round (one program per
            activation pattern; what the device backends do).
        unmixed_updates: mix the models the round's last gradient was taken at and add that step's
            update unmixed, ``X ← [x_t, z] W + [U_t, 0]``, instead of Cooperative SGD's
            ``(X_t + U_t) W``: D-PSGD as Lian et al. (NeurIPS 2017, Algorithm 1) write it,
            ``x_i ← Σ_j W_ij x_j − η g_i(x_i)``, and synchronous EASGD as Zhang, Choromanska &
            LeCun (NeurIPS 2015, eqs. 5–6) do, the elastic pull taken at the same x_t as the
            gradient. It keeps x_t per worker (one more copy of the models).

    Its state is the v auxiliary columns (``MixerState(shared=...)``, replicated); ``columns``
    appends them to the workers, so the n columns of X are always at hand.
    """
    rounds = LinearRounds(algorithm, prune)
    v = algorithm.v

    def init(columns) -> MixerState:
        at = jax.tree.map(jnp.asarray, columns) if unmixed_updates else ()
        if not v:
            return MixerState(per_worker=at)
        return MixerState(per_worker=at, shared=jax.tree.map(
            lambda x: jnp.broadcast_to(jnp.asarray(x[:1]), (v,) + jnp.shape(x)[1:]), columns))

    def apply(columns, state: MixerState, mix_round: MixRound, axis: WorkerAxis):
        aux = state.shared if v else jax.tree.map(lambda x: x[:0], columns)
        mixed = state.per_worker if unmixed_updates else columns
        new, aux = mix_local(mix_round.static, mixed, aux, mix_round.args, axis)
        if unmixed_updates:  # + U_t = x_end − x_t, the last step's update
            new = jax.tree.map(lambda n, x, t: n + (x - t), new, columns, mixed)
        return new, state._replace(shared=aux) if v else state

    def remember(grads, params, state: MixerState, axis: WorkerAxis):
        return grads, state._replace(per_worker=params)

    def columns(workers, state: MixerState):
        if not v:
            return workers
        return jax.tree.map(lambda x, z: jnp.concatenate([x, z.astype(x.dtype)]), workers, state.shared)

    def from_columns(cols, state: MixerState):
        m = algorithm.m
        workers = jax.tree.map(lambda x: x[:m], cols)
        return workers, state._replace(shared=jax.tree.map(lambda x: x[m:], cols)) if v else state

    return Mixer(init=init, apply=apply, traffic=rounds.traffic, plan=rounds.round, columns=columns,
                 from_columns=from_columns, name=f"linear W of {algorithm.name}",
                 direction=remember if unmixed_updates else None)


def linear_unmixed(algorithm: Algorithm, devices: bool = False) -> Mixer:
    """The mixer factory of the classic forms: :func:`linear` with ``unmixed_updates=True``
    (``Algorithm(..., mixer=linear_unmixed)``)."""
    return linear(algorithm, prune=devices, unmixed_updates=True)
