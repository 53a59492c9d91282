"""The one update ``X ← (X + U) W_k`` that runs every A(τ, W, v): state, init, step, fused rounds.

Each worker ``i`` computes its gradient on its slice of the batch, its optax optimizer turns it into
an update ``U[:, i]`` (``−ηg`` for plain SGD; auxiliary columns get ``U = 0``), and after the last
local step of a round the columns mix, ``new[j] = Σ_i W[i, j] (X + U)[:, i]`` (Wang & Joshi,
"Cooperative SGD", arXiv:1808.07576, §3, ``X_{k+1} = (X_k − ηG_k) W_k``). The communication of the
mixing follows W's structure (:mod:`coopsgd.communication`); the layout of the worker axis is the
backend's (:mod:`coopsgd.backends`).

Example:
    >>> import jax.numpy as jnp, numpy as np, optax, coopsgd
    >>> def loss(p, batch):  # a least-squares loss on one worker's batch
    ...     return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)
    >>> trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, tau=2), optax.sgd(0.1), loss)
    >>> state = trainer.init({"w": jnp.zeros(3)})
    >>> batch = {"x": np.ones((4, 5, 3), np.float32), "y": np.ones((4, 5), np.float32)}
    >>> state, metrics = trainer.step(state, batch)
    >>> int(state.step), bool(metrics.communicated)
    (1, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from coopsgd import backends as _backends
from coopsgd import communication as _comm
from coopsgd.algorithms import Algorithm

__all__ = [
    "EngineState",
    "StepMetrics",
    "CooperativeSGD",
    "NonFiniteError",
    "SYNC_OPTIMIZER_STATE",
    "mix",
]

mix = _comm.mix

SYNC_OPTIMIZER_STATE = ("keep", "average", "reset")
"""What happens to each worker's optimizer state when the models mix:

- ``"keep"`` (default): nothing; every worker keeps its own moments (e.g. momentum buffers), which
  now belong to a model that has moved. This is what most local-SGD papers do.
- ``"average"``: every floating-point leaf becomes the mean over the m workers at each mixing (one
  extra all-reduce of the optimizer state); integer leaves (step counts) are kept.
- ``"reset"``: re-initialise the optimizer state from the mixed model (``optimizer.init``), as if
  training restarted from it; Adam's bias correction starts again.
"""


class EngineState(NamedTuple):
    """The trainer's state (a pytree; every field a JAX array).

    Attributes:
        params: the columns, stacked: leaves of shape (n, …) with ``n = m + v`` on the simulate
            backend and on shard_map when ``v = 0``; otherwise in the backend's per-device layout
            (``trainer.columns(state)`` always gives the n columns).
        opt_state: each worker's optax state, every leaf with leading axis m (or the pmap layout).
        step: number of local steps taken (int32 scalar).
        rounds: number of rounds completed, i.e. mixings done (int32 scalar). A record for users
            and checkpoints: the engine reads the round index of step k from the period schedule
            (``algorithm.period.round_index(k)``), which this counter always equals at a round end.
        key: base PRNG key; the key of worker i at step k is ``fold_in(fold_in(key, k), i)``.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rounds: jax.Array
    key: jax.Array


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


def _is_optax(optimizer) -> bool:
    return isinstance(optimizer, optax.GradientTransformation) or (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    )


def _leaves_shapes(tree):
    return jax.tree.map(lambda x: (tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))), tree)


class CooperativeSGD:
    """Train any A(τ, W, v) with any optax optimizer on any backend.

    Args:
        algorithm: the :class:`~coopsgd.Algorithm` (W or a mixing schedule, a period, v).
        optimizer: an optax ``GradientTransformation``, run independently on every worker; its
            update is U in ``X ← (X + U) W_k`` (auxiliary columns get U = 0).
        loss_fn: ``loss_fn(params, batch)`` → scalar, or ``(scalar, aux)`` with ``has_aux=True``;
            with ``with_rng=True`` it is called as ``loss_fn(params, batch, key)`` with a key per
            worker and step (e.g. for gradient noise or dropout).
        backend: ``"simulate"``, ``"pmap"`` or ``"shard_map"`` (or a :class:`~coopsgd.backends.Backend`).
        sync_optimizer_state: ``"keep"``, ``"average"`` or ``"reset"``; see
            :data:`SYNC_OPTIMIZER_STATE`.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        with_rng: whether ``loss_fn`` takes a third argument, a PRNG key.
        track_consensus: compute the consensus distance every step (on device backends this costs
            two all-reduces per step; turn it off for production runs).
        devices, mesh: override the devices (pmap, shard_map) or the mesh (shard_map; it needs an
            axis named ``"workers"``).
        steps_per_call: how many steps :meth:`run` fuses into one compiled call when the period
            and the mixing plan do not change (several rounds in one ``lax.scan``).

    Raises:
        ValueError: for an optimizer that is not an optax transformation, an unknown backend or
            sync option, or m not a multiple of the device count.

    References:
        Wang & Joshi, "Cooperative SGD: A unified framework for the design and analysis of local-
        update SGD algorithms", JMLR 22(213), 2021, arXiv:1808.07576.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        optimizer: optax.GradientTransformation,
        loss_fn: Callable,
        backend="simulate",
        sync_optimizer_state: str = "keep",
        has_aux: bool = False,
        *,
        with_rng: bool = False,
        track_consensus: bool = True,
        devices=None,
        mesh=None,
        steps_per_call: int = 256,
    ):
        if not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be a coopsgd.Algorithm, got {type(algorithm).__name__}")
        if not _is_optax(optimizer):
            raise ValueError(
                f"optimizer must be an optax GradientTransformation (with init and update), got "
                f"{optimizer!r} of type {type(optimizer).__name__}; e.g. optax.sgd(0.1)"
            )
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable loss_fn(params, batch), got {loss_fn!r}")
        if sync_optimizer_state not in SYNC_OPTIMIZER_STATE:
            raise ValueError(
                f"sync_optimizer_state must be one of {SYNC_OPTIMIZER_STATE}, got "
                f"{sync_optimizer_state!r}"
            )
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.sync_optimizer_state = sync_optimizer_state
        self.has_aux = bool(has_aux)
        self.with_rng = bool(with_rng)
        self.track_consensus = bool(track_consensus)
        self.steps_per_call = steps_per_call
        self.m, self.v, self.n = algorithm.m, algorithm.v, algorithm.n
        self.backend = _backends.make_backend(backend, self.m, self.v, devices=devices, mesh=mesh)
        self._programs: dict = {}
        self._coef_cache: dict = {}
        self._checked_batches: set = set()
        sched = algorithm.mixing
        if sched.cycle is not None:
            self._cycle_plans = tuple(_comm.plan_for_matrix(w, self.m, self.v) for w in sched.cycle)
            self._cycle_coefs = tuple(
                _comm.coefficients(p, w) for p, w in zip(self._cycle_plans, sched.cycle)
            )
            self._support_plan = None
        else:
            self._cycle_plans = self._cycle_coefs = None
            self._support_plan = _comm.plan_for_support(
                sched.support, self.m, self.v, getattr(sched, "matchings", None))
        # A random schedule on devices sends only the slots active in each round's W (one program
        # per activation pattern, cached); simulated, one program over the whole support keeps
        # rounds fused.
        self._prune = (self._support_plan is not None and self._support_plan.kind == "neighbour"
                       and not isinstance(self.backend, _backends.Simulate))
        self._round_w: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ plans and coefficients
    def _w_at(self, r: int) -> np.ndarray:
        """W^(r) of a random schedule (the last few are kept: plan and coefficients both need it)."""
        if r not in self._round_w:
            if len(self._round_w) > 64:
                self._round_w.clear()
            self._round_w[r] = self.algorithm.mixing.at(r)
        return self._round_w[r]

    def plan(self, r: int = 0) -> _comm.MixPlan:
        """The communication plan of the r-th mixing (compiled once per distinct plan)."""
        if self._cycle_plans is not None:
            return self._cycle_plans[r % len(self._cycle_plans)]
        if self._prune:
            return _comm.active_slots(self._support_plan, self._w_at(r))
        return self._support_plan

    def mixing_coefficients(self, r: int = 0) -> dict[str, np.ndarray]:
        """The run-time arguments of the r-th mixing (see :func:`coopsgd.communication.coefficients`)."""
        if self._cycle_coefs is not None:
            return self._cycle_coefs[r % len(self._cycle_coefs)]
        return {**_comm.coefficients(self.plan(r), self._w_at(r)),
                "moves": np.float64(self.round_communicates(r))}

    def communication(self, param_bytes: float, r: int = 0) -> _comm.Communication:
        """What the r-th mixing sends per worker, for a model of ``param_bytes`` bytes.

        Returns a :class:`~coopsgd.communication.Communication` ``(kind, bytes_per_worker, messages,
        all_reduces, neighbour_slots)`` with kind ``"none"``, ``"all-reduce"``, ``"neighbour"`` or
        ``"dense"``. A runtime model multiplies it by the ``communicated`` metric of each step.

        Example:
            >>> import optax, coopsgd
            >>> t = coopsgd.CooperativeSGD(coopsgd.local_sgd(8, 4), optax.sgd(0.1), lambda p, b: 0.0)
            >>> t.communication(4000).kind
            'all-reduce'
        """
        w = None if self._cycle_plans is not None else self._w_at(r)
        return _comm.communication(self.plan(r), param_bytes, w)

    def round_communicates(self, r: int) -> bool:
        """Whether the r-th mixing moves data between workers (False for W^(r) = I, or a random
        schedule's round with no active slot), on every backend alike."""
        if self._cycle_plans is not None:
            return self.plan(r).communicates
        return _comm.active_slots(self._support_plan, self._w_at(r)).communicates

    @property
    def uniform_plan(self) -> bool:
        """Whether every mixing uses the same compiled plan (so rounds can be fused)."""
        if self._cycle_plans is None:
            return not self._prune
        return len(set(self._cycle_plans)) == 1

    # ------------------------------------------------------------------------------- state
    def init(self, params, seed: int = 0) -> EngineState:
        """Every column (auxiliary ones too) starts at ``params``; each worker gets ``optimizer.init``.

        Raises:
            ValueError: if a leaf of ``params`` is not finite or not an array of floats.
        """
        leaves, _ = jax.tree.flatten(params)
        if not leaves:
            raise ValueError("params has no array leaves")
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            arr = np.asarray(leaf)
            name = jax.tree_util.keystr(path) or "params"
            if not jnp.issubdtype(arr.dtype, jnp.floating):  # np.issubdtype misses bfloat16
                raise ValueError(f"params{name} must be floating point, got dtype {arr.dtype}")
            finite = np.isfinite(arr.astype(np.float32))
            if not np.all(finite):
                bad = int(np.sum(~finite))
                raise ValueError(f"initial params{name} has {bad} non-finite entries (NaN or Inf)")
        columns = jax.tree.map(lambda p: np.broadcast_to(np.asarray(p), (self.n,) + np.shape(p)), params)
        workers = jax.tree.map(lambda p: jnp.broadcast_to(jnp.asarray(p), (self.m,) + jnp.shape(p)), params)
        opt_state = jax.vmap(self.optimizer.init)(workers)
        be = self.backend
        return EngineState(
            params=be.place_params(columns),
            opt_state=be.place_workers(jax.tree.map(np.asarray, opt_state)),
            step=be.replicate(jnp.asarray(0, jnp.int32)),
            rounds=be.replicate(jnp.asarray(0, jnp.int32)),
            key=be.replicate(jax.random.key(seed)),
        )

    def columns(self, state: EngineState):
        """The n columns ``[x_1 … x_m, z_1 … z_v]`` as one pytree with leading axis n."""
        return self.backend.columns(state.params)

    def average(self, state: EngineState):
        """``u_k``: the mean of all n columns, one params pytree (Wang & Joshi, §4, ``X_k 1/n``)."""
        return jax.tree.map(lambda x: jnp.mean(x, axis=0), self.columns(state))

    def workers(self, state: EngineState):
        """The m worker models (leading axis m)."""
        return jax.tree.map(lambda x: x[: self.m], self.columns(state))

    # ------------------------------------------------------------------ the per-device program
    def _local_program(self, rounds: int, length: int, plan: _comm.MixPlan | None, num_devices: int,
                       axis: str | None) -> Callable:
        """The per-device computation of ``rounds`` rounds of ``length`` local steps each, every
        round ending with ``plan``'s mixing (none if ``plan`` is None)."""
        m = self.m
        ml = m // num_devices
        loss_fn, optimizer, has_aux, with_rng = self.loss_fn, self.optimizer, self.has_aux, self.with_rng
        sync, track = self.sync_optimizer_state, self.track_consensus
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

        def psum(x):
            return x if axis is None else lax.psum(x, axis)

        def fn(params, opt, step, key, batches, coefs):
            device = 0 if axis is None else lax.axis_index(axis)
            wid = device * ml + jnp.arange(ml)
            work = jax.tree.map(lambda p: p[:ml], params)
            aux_cols = jax.tree.map(lambda p: p[ml:], params)

            def local_step(x, o, k, batch):
                if with_rng:
                    keys = jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(key, k), w))(wid)
                    out, grads = jax.vmap(value_and_grad)(x, batch, keys)
                else:
                    out, grads = jax.vmap(value_and_grad)(x, batch)
                loss, aux = out if has_aux else (out, None)
                updates, o = jax.vmap(optimizer.update)(grads, o, x)
                return optax.apply_updates(x, updates), o, loss, aux

            def consensus(x):
                if not track:
                    return None
                mean = jax.tree.map(lambda a: psum(jnp.sum(a, axis=0)) / m, x)
                dev = jax.tree.map(lambda a, b: jnp.sum((a - b).astype(jnp.float32) ** 2), x, mean)
                return psum(sum(jax.tree.leaves(dev))) / m

            def sync_opt(o, x):
                if sync == "keep":
                    return o
                if sync == "reset":
                    return jax.vmap(optimizer.init)(x)

                def avg(a):
                    if not jnp.issubdtype(a.dtype, jnp.floating):
                        return a
                    return jnp.broadcast_to(psum(jnp.sum(a, axis=0)) / m, a.shape).astype(a.dtype)

                return jax.tree.map(avg, o)

            def sync_if_moved(o, x, coef):
                # Optimizer state follows the models only when they mixed: a plan that moves
                # nothing skips it statically, a random schedule's W = I round by its flag.
                if sync == "keep" or not plan.communicates:
                    return o
                synced = sync_opt(o, x)
                if "moves" not in coef:
                    return synced
                return jax.tree.map(lambda a, b: jnp.where(coef["moves"] > 0, a, b), synced, o)

            def one_round(carry, xs):
                x, z, o, k = carry
                batch, coef = xs

                def body(c, b):
                    x, o, k = c
                    x, o, loss, aux = local_step(x, o, k, b)
                    return (x, o, k + 1), (loss, aux, consensus(x))

                if plan is None or not track:
                    # One scan over the whole round, then the mixing (the usual, leanest program).
                    (x, o, k), outs = lax.scan(body, (x, o, k), batch)
                    if plan is not None:
                        x, z = _comm.mix_local(plan, x, z, coef, axis, num_devices, device)
                        o = sync_if_moved(o, x, coef)
                    return (x, z, o, k), outs
                # With the consensus metric the last step is unrolled, so that its consensus is
                # measured after the mixing without computing it twice.
                head = jax.tree.map(lambda a: a[: length - 1], batch)
                last = jax.tree.map(lambda a: a[length - 1], batch)
                if length > 1:
                    (x, o, k), outs_head = lax.scan(body, (x, o, k), head)
                x, o, loss, aux = local_step(x, o, k, last)
                k = k + 1
                x, z = _comm.mix_local(plan, x, z, coef, axis, num_devices, device)
                o = sync_if_moved(o, x, coef)
                outs_last = jax.tree.map(lambda a: a[None], (loss, aux, consensus(x)))
                if length > 1:
                    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs_head, outs_last)
                else:
                    outs = outs_last
                return (x, z, o, k), outs

            batches = jax.tree.map(lambda a: a.reshape((rounds, length) + a.shape[1:]), batches)
            (work, aux_cols, opt, _), (losses, aux, cons) = lax.scan(
                one_round, (work, aux_cols, opt, step), (batches, coefs))
            flat = lambda a: a.reshape((rounds * length,) + a.shape[2:])  # noqa: E731
            outs = {"losses": flat(losses), "aux": jax.tree.map(flat, aux),
                    "consensus": None if cons is None else flat(cons)}
            params = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), work, aux_cols)
            return params, opt, outs

        return fn

    @staticmethod
    def _summarize(outs):
        losses = outs["losses"]
        finite_w = jnp.isfinite(losses)
        finite = jnp.all(finite_w, axis=1)
        if outs["consensus"] is not None:
            finite = finite & jnp.isfinite(outs["consensus"])
        return {**outs, "loss": jnp.mean(losses, axis=1), "finite": finite}

    def _program(self, rounds: int, length: int, plan):
        key = (rounds, length, plan)
        if key not in self._programs:
            be = self.backend
            local = self._local_program(rounds, length, plan, be.num_devices, be.axis)
            self._programs[key] = be.compile(local, self._summarize, rounds * length,
                                             rounds if plan is not None else 0)
        return self._programs[key]

    def _stacked_coefficients(self, r0: int, rounds: int):
        """Coefficients of mixings r0 … r0 + rounds − 1, stacked, as device arrays (cached when
        they repeat: a static or cyclic W)."""
        if self._cycle_coefs is not None:
            cycle = len(self._cycle_coefs)
            key = (r0 % cycle, rounds)
            if key not in self._coef_cache:
                coefs = [self._cycle_coefs[(r0 + i) % cycle] for i in range(rounds)]
                self._coef_cache[key] = jax.tree.map(
                    lambda *c: self.backend.replicate(jnp.asarray(np.stack(c))), *coefs)
            return self._coef_cache[key]
        coefs = [self.mixing_coefficients(r0 + i) for i in range(rounds)]
        return jax.tree.map(lambda *c: np.stack(c), *coefs)

    def round_fn(self, tau: int, r: int = 0, mix: bool = True) -> Callable:
        """A pure, jittable, vmappable function for one round on the simulate layout.

        ``f(state, batches) -> (state, metrics)`` runs ``tau`` local steps and (if ``mix``) the
        r-th mixing, with W^(r) baked in as constants; ``batches`` leaves have shape
        ``(tau, m, …)`` (any pytree, e.g. PRNG keys for a loss that draws its own noise).
        Metrics are :class:`StepMetrics` with a leading axis ``tau``.

        Many seeds at once (the theory harness)::

            f = jax.jit(jax.vmap(trainer.round_fn(tau)))
            states = jax.tree.map(lambda *xs: jnp.stack(xs), *[trainer.init(p, s) for s in seeds])
            states, metrics = f(states, batches)   # batches leaves (seeds, tau, m, …)

        Only for the simulate backend (its state is the plain n-column layout).
        """
        if not isinstance(self.backend, _backends.Simulate):
            raise ValueError(f"round_fn needs backend='simulate', this trainer uses {self.backend.name!r}")
        tau = int(tau)
        if tau < 1:
            raise ValueError(f"tau must be an integer >= 1, got {tau!r}")
        plan = self.plan(r) if mix else None
        coef = self.mixing_coefficients(r) if mix else {}
        local = self._local_program(1, tau, plan, 1, None)
        communicated = np.zeros(tau, bool)
        communicated[-1] = bool(mix and self.round_communicates(r))
        summarize = self._summarize
        rounds_inc = int(bool(mix))

        def f(state: EngineState, batches):
            coefs = jax.tree.map(lambda c: jnp.asarray(c)[None], coef)
            params, opt, outs = local(state.params, state.opt_state, state.step, state.key, batches,
                                      coefs)
            s = summarize(outs)
            new = EngineState(params, opt, state.step + tau, state.rounds + rounds_inc, state.key)
            return new, self._metrics(s, jnp.asarray(communicated))

        return f

    def _metrics(self, s, communicated) -> StepMetrics:
        return StepMetrics(losses=s["losses"], loss=s["loss"], communicated=communicated,
                           consensus=s["consensus"], finite=s["finite"],
                           aux=s["aux"] if self.has_aux else None)

    # ----------------------------------------------------------------------------- checks
    def _check_batch(self, batch, lead: tuple[int, ...], what: str):
        leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
        if not leaves:
            raise ValueError(f"{what} has no array leaves")
        for path, leaf in leaves:
            shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
            name = jax.tree_util.keystr(path) or ""
            if shape[: len(lead)] != lead:
                if len(lead) == 1:
                    raise ValueError(
                        f"batch{name} has leading axis {shape[:1] or '()'} but there are m = "
                        f"{self.m} workers: every batch leaf needs shape (m, ...) = ({self.m}, ...), "
                        f"got {shape}"
                    )
                raise ValueError(
                    f"{what}{name} has shape {shape} but needs leading axes {lead} "
                    f"(steps, m = {self.m}, ...)"
                )
        single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape)[len(lead):], x.dtype), batch)
        sig = str(jax.tree.structure(single)) + str(_leaves_shapes(single))
        if sig in self._checked_batches:
            return
        self._check_loss(single)
        self._checked_batches.add(sig)

    def _check_loss(self, single_batch):
        args = (self._column_spec, single_batch) + ((jax.random.key(0),) if self.with_rng else ())
        try:
            out = jax.eval_shape(self.loss_fn, *args)
        except Exception as err:  # the user's function failed on one worker's batch
            raise ValueError(f"loss_fn failed on one worker's params and batch slice: {err}") from err
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"with has_aux=True loss_fn must return (loss, aux), got {out!r}")
            out = out[0]
        shape = getattr(out, "shape", None)
        if shape != ():
            raise ValueError(
                f"loss_fn must return a scalar loss for one worker, got shape {shape} ({out!r}); "
                "reduce it (e.g. jnp.mean) or pass has_aux=True if it returns (loss, aux)"
            )

    # --------------------------------------------------------------------------- training
    def _call(self, state: EngineState, batches, rounds: int, length: int, r0: int, mixes: bool):
        """Run ``rounds`` rounds of ``length`` steps starting at round index ``r0``; ``batches``
        leaves have shape (rounds·length, m, …)."""
        lead = self._lead
        self._column_spec = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), state.params)
        self._check_batch(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batches),
            (self.m,), "batch")
        plan = self.plan(r0) if mixes else None
        coefs = self._stacked_coefficients(r0, rounds) if mixes else {}
        program = self._program(rounds, length, plan)
        params, opt, step, count, s = program(state.params, state.opt_state, state.step,
                                              state.rounds, state.key,
                                              self.backend.place_batches(batches), coefs)
        communicated = np.zeros(rounds * length, bool)
        if mixes:
            communicated[length - 1 :: length] = [self.round_communicates(r0 + i)
                                                  for i in range(rounds)]
        return EngineState(params, opt, step, count, state.key), self._metrics(s, communicated)

    @property
    def _lead(self) -> int:
        return 2 if isinstance(self.backend, _backends.Pmap) else 1

    def step(self, state: EngineState, batch) -> tuple[EngineState, StepMetrics]:
        """One iteration: each worker's gradient on its slice of ``batch`` (leaves (m, …)), the
        optimizer update, then ``W_k`` (the identity unless this step ends a round)."""
        self._check_batch_leading(batch)
        k = int(state.step)
        period = self.algorithm.period
        mixes = period.communicates(k)
        r = period.round_index(k)
        batches = jax.tree.map(lambda x: x[None], batch)
        new, metrics = self._call(state, batches, 1, 1, r, mixes)
        return new, jax.tree.map(lambda x: x[0], metrics)

    def _check_batch_leading(self, batch):
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            shape = tuple(np.shape(leaf))
            if shape[:1] != (self.m,):
                raise ValueError(
                    f"batch{jax.tree_util.keystr(path)} has leading axis "
                    f"{shape[0] if shape else '() (a scalar)'} but there are m = {self.m} workers: "
                    f"every batch leaf needs shape (m, ...) = ({self.m}, ...), got {shape}"
                )

    def run(self, state: EngineState, batches, steps: int, *, check_finite: bool = True):
        """``steps`` iterations, whole rounds fused into compiled ``lax.scan`` calls.

        Args:
            state: from :meth:`init` (or a previous call; a run may start mid-round).
            batches: a pytree whose leaves have shape ``(steps, m, …)`` (or longer; the first
                ``steps`` are used), or an iterator yielding one batch (leaves (m, …)) per step
                (e.g. ``iter(list_of_batches)`` or a generator), or a callable ``step -> batch``.
            steps: number of iterations.
            check_finite: stop with :class:`NonFiniteError` at the first non-finite loss.

        Returns:
            ``(state, metrics)`` with metrics stacked over the steps.

        The period is asked round by round at run time (``algorithm.period``, e.g. AdaComm's
        ``tau_at(start)`` sees the loss so far); one program is compiled per distinct
        (rounds per call, τ, mixing plan) and cached.

        Raises:
            ValueError: bad ``steps`` or batch shapes (before anything compiles).
            NonFiniteError: a NaN or Inf loss; the message names the step and the worker.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        steps = int(steps)
        source = _BatchSource(batches, steps, self.m)
        period = self.algorithm.period
        k0 = k = int(state.step)
        pieces: list[StepMetrics] = []
        while k - k0 < steps:
            remaining = steps - (k - k0)
            r = period.round_index(k)
            end = period.round_start(r + 1)
            length = min(end - k, remaining)
            mixes = length == end - k
            rounds = 1
            tau = period.constant_tau
            if mixes and tau is not None and length == tau and self.uniform_plan:
                rounds = max(1, min(remaining // tau, self.steps_per_call // tau))
            batch = source.take(k - k0, rounds * length)
            state, metrics = self._call(state, batch, rounds, length, r, mixes)
            if check_finite:
                self._raise_if_nonfinite(metrics, k)
            pieces.append(metrics)
            k += rounds * length
        if len(pieces) == 1:
            return state, pieces[0]
        if not pieces:
            empty = StepMetrics(np.zeros((0, self.m)), np.zeros(0), np.zeros(0, bool),
                                np.zeros(0) if self.track_consensus else None, np.zeros(0, bool))
            return state, empty
        return state, jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *pieces)

    def _raise_if_nonfinite(self, metrics: StepMetrics, k0: int):
        finite = np.asarray(metrics.finite)
        if finite.all():
            return
        i = int(np.argmin(finite))
        losses = np.asarray(metrics.losses)[i]
        bad = np.flatnonzero(~np.isfinite(losses))
        worker = int(bad[0]) if bad.size else None
        where = (f"worker {worker} loss {losses[worker]}" if worker is not None
                 else f"consensus distance {np.asarray(metrics.consensus)[i]}")
        raise NonFiniteError(
            f"non-finite value at step {k0 + i} (0-based): {where}; stopping the run. "
            "Lower the learning rate or check the data.", step=k0 + i, worker=worker)

    def lower_step(self, state: EngineState, batch, mixes: bool = True, r: int = 0):
        """The lowered program of one step (``mixes``: with the r-th mixing), to read its HLO:
        ``trainer.lower_step(state, batch).compile().as_text()``."""
        self._check_batch_leading(batch)
        batches = self.backend.place_batches(jax.tree.map(lambda x: x[None], batch))
        plan = self.plan(r) if mixes else None
        coefs = jax.tree.map(lambda c: np.asarray(c)[None], self.mixing_coefficients(r)) if mixes else {}
        be = self.backend
        local = self._local_program(1, 1, plan, be.num_devices, be.axis)
        if isinstance(be, _backends.ShardMap):
            fn = jax.jit(be.shard_mapped(local))
        elif isinstance(be, _backends.Pmap):
            mapped = jax.pmap(lambda args: local(*args), axis_name=be.axis,
                              in_axes=((0, 0, None, None, 0, None),), devices=be.devices)
            return mapped.lower((state.params, state.opt_state, state.step, state.key, batches, coefs))
        else:
            fn = jax.jit(local)
        return fn.lower(state.params, state.opt_state, state.step, state.key, batches, coefs)


class _BatchSource:
    """Batches for ``run``: a pytree of stacked leaves (steps, m, …), an iterator of per-step
    batches, or a callable ``step -> batch``; handed out as leaves (count, m, …)."""

    def __init__(self, batches, steps: int, m: int):
        self.m, self.steps = m, steps
        if isinstance(batches, Iterator):
            self.kind, self.it = "iter", batches
        elif callable(batches) and not isinstance(batches, (np.ndarray, jax.Array)):
            self.kind, self.fn = "callable", batches
        else:
            self.kind, self.tree = "stacked", batches
            for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]:
                shape = tuple(np.shape(leaf))
                if len(shape) < 2 or shape[0] < steps or shape[1] != m:
                    raise ValueError(
                        f"batches{jax.tree_util.keystr(path)} has shape {shape} but run needs "
                        f"leaves of shape (steps, m, ...) with steps >= {steps} and m = {m}"
                    )

    def take(self, offset: int, count: int):
        if self.kind == "stacked":
            out = jax.tree.map(
                lambda x: x if (offset == 0 and x.shape[0] == count) else x[offset: offset + count],
                self.tree)
        else:
            items = [self.fn(offset + i) if self.kind == "callable" else next(self.it)
                     for i in range(count)]
            for item in items:
                for path, leaf in jax.tree_util.tree_flatten_with_path(item)[0]:
                    if tuple(np.shape(leaf))[:1] != (self.m,):
                        raise ValueError(
                            f"batch{jax.tree_util.keystr(path)} has shape {np.shape(leaf)} but every "
                            f"batch leaf needs leading axis m = {self.m}")
            out = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
        return out

