"""``CooperativeSGD``: a thin class over the pure round functions that caches compiled programs and
runs rounds, with host callbacks (hooks) between them.

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

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopsgd.core.algorithm import Algorithm
from coopsgd.core.communication import Communication
from coopsgd.core.validate import require_int
from coopsgd.parallel import backends as _backends
from coopsgd.parallel import engine as _engine
from coopsgd.parallel import programs as _programs
from coopsgd.parallel.backends import BackendName
from coopsgd.parallel.batches import BatchSource, check_batch, check_leading, check_params, pad_steps
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.hooks import Hook, RoundEnd, call_hooks, concat
from coopsgd.parallel.linear import linear
from coopsgd.parallel.protocol import (Mixer, MixRound, OptimizerSync, StatePolicy, SyncPolicy, check_mixer,
                                       optimizer_sync)
from coopsgd.parallel.protocol import state_sync as model_state_sync
from coopsgd.parallel.state import EngineState, PeriodState, StepMetrics, raise_if_nonfinite

__all__ = ["CooperativeSGD"]


def _is_optax(optimizer) -> bool:
    return isinstance(optimizer, optax.GradientTransformation) or (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    )


class CooperativeSGD:
    """Train any A(τ, W, v) — or any mixer — with any optax optimizer on any backend.

    Args:
        algorithm: the :class:`~coopsgd.core.algorithm.Algorithm` (its period; its W unless a
            ``mixer`` is given).
        optimizer: an optax ``GradientTransformation``, run independently on every worker.
        loss_fn: ``loss_fn(params, batch)`` → scalar, or ``(scalar, aux)`` with ``has_aux=True``;
            with ``with_rng=True`` it is called as ``loss_fn(params, batch, key)`` with a key per
            worker and step (e.g. for gradient noise or dropout); with ``has_state=True`` as
            ``loss_fn(params, model_state, batch[, key])`` → ``(loss, new_model_state)`` (or
            ``((loss, aux), new_model_state)``), the model state (BatchNorm statistics) carried
            per worker and never differentiated.
        backend: ``"simulate"``, ``"pmap"`` or ``"shard_map"`` (or a
            :class:`~coopsgd.parallel.backends.Backend`).
        sync_optimizer_state: ``"keep"``, ``"average"``, ``"reset"`` (see
            :data:`~coopsgd.parallel.protocol.SYNC_POLICIES`) or an
            :class:`~coopsgd.parallel.protocol.OptimizerSync`.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        with_rng: whether ``loss_fn`` takes a PRNG key as its last argument.
        has_state: whether ``loss_fn`` takes and returns a model state (see ``loss_fn``); the
            initial state is given to :meth:`init`.
        state_sync: the model state at every mixing that moves data: ``"average"`` (default) or
            ``"local"`` (:data:`~coopsgd.parallel.protocol.STATE_POLICIES`), or an
            :class:`~coopsgd.parallel.protocol.OptimizerSync` applied to it.
        track_consensus: compute the consensus distance ``(1/m) Σ_i ‖x_i − x̄‖²`` after every
            step into ``metrics.consensus`` (off by default: it costs a pass over the models every
            step, 20–35 % of a step at 1 M parameters simulated on a CPU, and two all-reduces per
            step on devices; :meth:`consensus` measures it once, when a hook asks).
        devices, mesh: override the devices (pmap, shard_map) or the mesh (shard_map; it needs an
            axis named ``"workers"``; with more axes a worker is a group of devices).
        param_specs: with a mesh of more axes than ``"workers"``: how each worker's model is
            sharded over them, a pytree of ``PartitionSpec`` s matching the params (see
            :class:`~coopsgd.parallel.backends.ShardMap`).
        steps_per_call: the most steps one compiled call runs: whole rounds of a constant period
            with the same mixing structure are fused up to it (one program per round shape runs
            any number of them, up to that many), longer rounds are split.
        mixer: a :class:`~coopsgd.parallel.protocol.Mixer` to run at round ends instead of the
            algorithm's own (``algorithm.mixer``, a factory) or, by default, its linear W.
        donate: let each compiled call reuse the buffers of the state it is given: the state passed
            to :meth:`run` or :meth:`step` is consumed, and so is every ``RoundEnd.state`` a hook
            sees once the next call runs (copy what a hook keeps, e.g. with ``jax.device_get``).
            Two copies of the models at peak instead of three; not on the pmap backend.
        program_key: a string naming what the rounds trace beyond coopsgd and the flags above (the
            algorithm, optimizer, loss, sync options; e.g. a hash of their configuration): with a
            :func:`~coopsgd.parallel.programs.keep_in` folder, later processes load them untraced.

    Raises:
        ValueError: for an optimizer that is not an optax transformation, an unknown backend or
            sync option, m not a multiple of the device count, or a mixer that breaks the protocol.

    References:
        Wang & Joshi, "Cooperative SGD: A unified framework for the design and analysis of local-
        update SGD algorithms", JMLR 22(213), 2021, arXiv:1808.07576.
    """

    def __init__(self, algorithm: Algorithm, optimizer: optax.GradientTransformation, loss_fn: Callable,
                 backend: BackendName | _backends.Backend = "simulate",
                 sync_optimizer_state: SyncPolicy | OptimizerSync = "keep", has_aux: bool = False, *,
                 with_rng: bool = False, has_state: bool = False,
                 state_sync: StatePolicy | OptimizerSync = "average", track_consensus: bool = False,
                 devices=None, mesh=None, param_specs=None, steps_per_call: int = 256,
                 mixer: Mixer | None = None, donate: bool = False, program_key: str | None = None):
        if not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be a coopsgd.Algorithm, got {type(algorithm).__name__}")
        if not _is_optax(optimizer):
            raise ValueError(
                f"optimizer must be an optax GradientTransformation (with init and update), got "
                f"{optimizer!r} of type {type(optimizer).__name__}; e.g. optax.sgd(0.1)"
            )
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable loss_fn(params, batch), got {loss_fn!r}")
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
        if program_key is not None and not isinstance(program_key, str):
            raise ValueError(f"program_key must be a string (or None), got {type(program_key).__name__}")
        if mixer is not None and not isinstance(mixer, Mixer):
            raise ValueError(f"mixer must be a coopsgd Mixer, got {type(mixer).__name__}")
        self.algorithm, self.optimizer, self.loss_fn = algorithm, optimizer, loss_fn
        self.m = algorithm.m
        self.backend = _backends.make_backend(backend, self.m, devices=devices, mesh=mesh, param_specs=param_specs)
        devices = not isinstance(self.backend, _backends.Simulate)
        if mixer is None:
            mixer = algorithm.mixer(algorithm, devices) if algorithm.mixer is not None else linear(
                algorithm, prune=devices)
        if not isinstance(mixer, Mixer):
            raise ValueError(f"{algorithm.name}'s mixer factory must return a coopsgd Mixer, got "
                             f"{type(mixer).__name__}")
        self.mixer = mixer
        self.spec = _engine.Spec(loss_fn, optimizer, self.mixer, optimizer_sync(sync_optimizer_state, optimizer),
                                self.m, bool(has_aux), bool(with_rng), bool(track_consensus), bool(has_state),
                                model_state_sync(state_sync))
        self.steps_per_call, self.donate, self.program_key = steps_per_call, bool(donate), program_key
        self._programs: dict = {}
        self._args_cache: OrderedDict = OrderedDict()
        self._placed_cache: dict = {}
        self._checked_batches: set = set()

    has_aux = property(lambda self: self.spec.has_aux, doc="Whether ``loss_fn`` returns ``(loss, aux)``.")
    with_rng = property(lambda self: self.spec.with_rng, doc="Whether ``loss_fn`` takes a PRNG key.")
    has_state = property(lambda self: self.spec.has_state, doc="Whether ``loss_fn`` carries a model state.")
    track_consensus = property(lambda self: self.spec.track_consensus,
                               doc="Whether every step records the consensus distance.")

    # ------------------------------------------------------------------ rounds and their cost
    def mix_round(self, r: int = 0) -> MixRound:
        """The r-th mixing: its static structure, run-time arguments and whether it moves data."""
        return self.mixer.plan(r)

    def plan(self, r: int = 0):
        """The static structure of the r-th mixing (for a linear W: its
        :class:`~coopsgd.parallel.plan.MixPlan`; compiled once per distinct value)."""
        return self.mix_round(r).static

    def communication(self, param_bytes: float, r: int = 0) -> Communication:
        """What the r-th mixing sends per worker, for a model of ``param_bytes`` bytes: a
        :class:`~coopsgd.core.communication.Communication` ``(kind, bytes_per_worker, messages,
        all_reduces, neighbour_slots, m)``; a runtime model multiplies it by the ``communicated``
        metric of each step.

        Example:
            >>> import optax, coopsgd
            >>> t = coopsgd.CooperativeSGD(coopsgd.local_sgd(8, 4), optax.sgd(0.1), lambda p, b: 0.0)
            >>> t.communication(4000).kind
            'all-reduce'
        """
        return self.mixer.traffic(r, param_bytes)

    # ------------------------------------------------------------------------------- state
    def init(self, params, seed: int = 0, model_state=()) -> EngineState:
        """Every worker starts at ``params`` (and ``model_state``, with ``has_state=True``) with its
        own ``optimizer.init``; the mixer's state from ``mixer.init`` (the linear mixer's auxiliary
        columns start at ``params`` too).

        Raises:
            ValueError: if a leaf of ``params`` is not finite or not an array of floats, a model
                state is given without ``has_state=True``, ``param_specs`` do not fit the params,
                or the mixer breaks the protocol.
        """
        check_params(params)
        if jax.tree.leaves(model_state) and not self.has_state:
            raise ValueError("init got a model_state, but the trainer was built without has_state=True, so the "
                             "loss would never see it; pass has_state=True and loss_fn(params, model_state, batch)")
        be = self.backend
        be.bind(params)
        placed = be.broadcast_workers(params)
        opt_state = be.init_workers(self.optimizer.init, placed)  # None: from the simulate layout's
        raw = _engine.init_state(self.spec, params, seed, self.algorithm.period.init(), model_state, opt_state)
        check_mixer(self.mixer, raw.params, raw.mix_state, self.mixer.plan(0), self.m)
        return EngineState(
            placed, raw.opt_state if opt_state is not None else be.place_workers(raw.opt_state),
            be.place_mix_state(raw.mix_state), be.replicate(raw.step), be.replicate(raw.rounds),
            be.replicate(raw.key), raw.period, be.place_workers(raw.model_state))

    def workers(self, state: EngineState):
        """The m worker models (leading axis m) on any backend."""
        return self.backend.workers(state.params)

    def columns(self, state: EngineState):
        """The n columns ``[x_1 … x_m, z_1 … z_v]`` of Cooperative SGD's X (leading axis n)."""
        workers = self.workers(state)
        if self.mixer.columns is None:
            return workers
        mix_state = state.mix_state._replace(per_worker=self.backend.workers(state.mix_state.per_worker),
                                             shared=self.backend.shared(state.mix_state.shared))
        return self.mixer.columns(workers, mix_state)

    def average(self, state: EngineState):
        """``u_k``: the mean of all n columns, one params pytree (Wang & Joshi, §4, ``X_k 1/n``)."""
        return _engine.column_mean(self.columns(state))

    def consensus(self, state: EngineState):
        """The consensus distance ``(1/m) Σ_i ‖x_i − x̄‖²`` of the workers' models now (a float32
        scalar): what ``track_consensus=True`` records every step, measured once (e.g. in a hook
        at an evaluation)."""
        return _engine.workers_consensus(self.workers(state))

    def with_columns(self, state: EngineState, columns) -> EngineState:
        """``state`` with its models replaced, placed in this backend's layout: ``columns`` are the
        m workers (leaves (m, …)) or, for a mixer with auxiliary columns such as the linear W's,
        the n columns of :meth:`columns` (its ``from_columns`` writes the auxiliary part into the
        mixer's state). Structure, shapes and dtypes must match."""
        def signature(tree):
            return jax.tree.structure(tree), [(tuple(np.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(tree)]

        given, mix_state = signature(columns), state.mix_state
        if given != signature(self.workers(state)):
            if self.mixer.from_columns is None or given != signature(self.columns(state)):
                raise ValueError(f"with_columns needs the m workers' (or the n columns') structure, shapes "
                                 f"and dtypes {signature(self.workers(state))}, got {given}")
            host_state = mix_state._replace(shared=self.backend.shared(mix_state.shared))
            columns, host_state = self.mixer.from_columns(columns, host_state)
            mix_state = self.backend.place_mix_state(host_state._replace(
                per_worker=jax.tree.map(np.asarray, self.backend.workers(host_state.per_worker))))
        return state._replace(params=self.backend.place_workers(jax.tree.map(np.asarray, columns)),
                              mix_state=mix_state)

    def observe(self, state: EngineState, **report) -> EngineState:
        """Feed what the loop measured at a round end (``loss``, ``time``, ``consensus``, …) to an
        adaptive period; the round's ``start``, ``index`` and ``tau`` are filled in."""
        p = state.period
        if p.tau == 0 or int(state.step) != p.end:
            raise ValueError(f"observe is called at a round end; step {int(state.step)} is inside the "
                             f"round that started at {p.start} and ends at {p.end}")
        rule = self.algorithm.period.observe(p.rule, start=p.start, index=int(state.rounds) - 1, tau=p.tau,
                                             **report)
        return state._replace(period=dataclasses.replace(p, rule=rule))

    # --------------------------------------------------------------------- compiled programs
    def _program(self, rounds: int, length: int, mixes: bool, static, sync_some: bool):
        """The program of up to ``rounds`` rounds of this shape: this trainer's, or (built the first
        time) the one every trainer of the same configuration shares."""
        key = (rounds, length, mixes, static, sync_some)
        if key not in self._programs:
            spec_key = _programs.spec_key(self.spec)
            keyed = isinstance(self.backend, _backends.Simulate) and self.program_key  # kept on one device only
            name = _programs.stable_name(keyed, spec_key[1:], self.backend.key, self.donate, key)

            def build():
                local = _engine.round_program(self.spec, self.backend.axis, rounds, length, mixes, static,
                                              sync_some)
                fn = self.backend.compile(local, _engine.summarize, length, mixes, self.donate)
                return fn if name is None else _programs.persisted(fn, name)

            shared = (spec_key, self.backend.key, self.donate, key, name, name and _programs.kept_in())
            self._programs[key] = _programs.program(shared, build)
        return self._programs[key]

    def _round_args(self, mix_rounds: Sequence[MixRound]):
        """The rounds' arguments stacked and placed (cached while the same argument objects repeat,
        as for a static or cyclic W; the cache holds them, so their ids stay unique)."""
        key = tuple(id(mr.args) for mr in mix_rounds)
        if key not in self._args_cache:
            stacked = jax.tree.map(lambda *c: self.backend.replicate(np.stack(c)),
                                   *[mr.args for mr in mix_rounds])
            self._args_cache[key] = ([mr.args for mr in mix_rounds], stacked)
            while len(self._args_cache) > 16:
                self._args_cache.popitem(last=False)
        return self._args_cache[key][1]

    def _placed(self, value):
        """A small host value (the rounds' ``moves`` flags as a tuple, or the number of rounds a
        call runs) as a placed array; few distinct values, cached."""
        if value not in self._placed_cache:
            host = np.array(value, bool) if isinstance(value, tuple) else np.int32(value)
            self._placed_cache[value] = self.backend.replicate(host)
        return self._placed_cache[value]

    def _call(self, state: EngineState, batches, rounds: int, length: int, r0: int, mixes: bool,
              chunk: int = 1):
        """Run ``rounds`` rounds of ``length`` steps starting at round index ``r0`` with the program
        of ``chunk ≥ rounds`` rounds (the batches padded to its length, the rounds past ``rounds``
        not run)."""
        signature = _programs.avals(batches)
        if signature not in self._checked_batches:  # checked once per batch signature
            check_leading(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batches), self.m,
                          self.backend.fed_workers)
            lead = self.backend.layout_axes
            one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), tree)
            check_batch(self.loss_fn, batches, one(state.params), has_aux=self.has_aux, with_rng=self.with_rng,
                        state_spec=one(state.model_state) if self.has_state else None)
            self._checked_batches.add(signature)
        if mixes:
            mix_rounds = [self.mixer.plan(r0 + i) for i in range(rounds)]
            moves = np.array([bool(mr.moves) for mr in mix_rounds])
            static = mix_rounds[0].static
            args = self._round_args(mix_rounds + mix_rounds[-1:] * (chunk - rounds))
        else:
            static, args, moves = None, (), np.zeros(rounds, bool)
        program = self._program(chunk, length, mixes, static, bool(mixes and moves.any()))
        padded = np.zeros(chunk, bool)
        padded[:rounds] = moves
        if rounds < chunk:
            batches = pad_steps(batches, chunk * length)
        params, opt, mix_state, model_state, step, count, s = program(
            state.params, state.opt_state, state.mix_state, state.model_state, state.step, state.rounds, state.key,
            self.backend.place_batches(batches), args, self._placed(tuple(padded.tolist())), self._placed(rounds))
        if rounds < chunk:  # on the host: slicing on the device would compile a program per shape
            s = jax.tree.map(lambda a: np.asarray(a)[: rounds * length], s)
        communicated = np.zeros(rounds * length, bool)
        if mixes:
            communicated[length - 1:: length] = moves
        new = EngineState(params, opt, mix_state, step, count, state.key, state.period, model_state)
        return new, self._metrics(s, communicated)

    def _metrics(self, s, communicated) -> StepMetrics:
        return StepMetrics(losses=s["losses"], loss=s["loss"], communicated=communicated,
                           consensus=s["consensus"], finite=s["finite"],
                           aux=s["aux"] if self.has_aux else None)

    # --------------------------------------------------------------------------- training
    def step(self, state: EngineState, batch) -> tuple[EngineState, StepMetrics]:
        """One iteration: each worker's gradient on its slice of ``batch`` (leaves (m, …)), the
        optimizer update, then the mixing if this step ends a round. Reports non-finite values in
        ``metrics.finite`` without raising."""
        check_leading(batch, self.m, self.backend.fed_workers)
        state, metrics = self.run(state, jax.tree.map(lambda x: x[None], batch), 1, check_finite=False)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def _chunk(self, steps: int, hooks) -> int:
        """Rounds per compiled call for whole rounds of a constant period τ: as many as
        ``steps_per_call``, the run and the hooks' spacing allow; calls with fewer run the same
        program (so a run of any length compiles one program per round shape)."""
        tau = self.algorithm.period.constant_tau
        if tau is None:
            return 1
        chunk = min(self.steps_per_call, steps) // tau
        for h in hooks:
            chunk = min(chunk, 1 if h.every is None else -(-h.every // tau))
        return max(chunk, 1)

    def _fusable(self, r: int, limit: int) -> int:
        """How many rounds from r share round r's mixing structure (at most ``limit``)."""
        first = self.mixer.plan(r).static
        count = 1
        while count < limit and self.mixer.plan(r + count).static == first:
            count += 1
        return count

    def run(self, state: EngineState, batches, steps: int, *, hooks: Sequence = (),
            check_finite: bool = True) -> tuple[EngineState, StepMetrics]:
        """``steps`` iterations, whole rounds fused into compiled ``lax.scan`` calls.

        Args:
            state: from :meth:`init` (or a previous call; a run may start mid-round).
            batches: a pytree whose leaves have shape ``(steps, m, …)`` (or longer; the first
                ``steps`` are used), or an iterator yielding one batch (leaves (m, …)) per step, or a
                callable ``step -> batch`` given the global step index.
            steps: number of iterations.
            hooks: callables ``fn(RoundEnd)`` or :class:`Hook` s, called on the host between rounds.
            check_finite: stop with :class:`NonFiniteError` at the first non-finite loss.

        Returns:
            ``(state, metrics)`` with metrics stacked over the steps run.

        The period is asked for each round's τ when the round begins (an adaptive period sees what
        the hooks observed so far); one program is compiled per distinct (rounds per chunk, τ,
        mixing structure) — a chunk is as many rounds as ``steps_per_call``, the run and the hooks'
        spacing allow, and a call of fewer rounds runs the same program — and shared with every
        trainer of the same configuration (:mod:`coopsgd.parallel.programs`).

        Raises:
            ValueError: bad ``steps``, hooks or batch shapes (before anything compiles).
            NonFiniteError: a NaN or Inf; the message names the step and the worker or the mixer.
        """
        steps = require_int("steps", steps, 0)
        hooks = [h if isinstance(h, Hook) else Hook(h) for h in hooks]
        for h in hooks:
            if not callable(h.fn):
                raise ValueError(f"a hook needs a callable fn(RoundEnd), got {h.fn!r}")
            if h.every is not None:
                require_int("Hook every", h.every, 1)
        k0 = k = int(state.step)
        r = int(state.rounds)
        source = BatchSource(batches, steps, self.m, first_step=k0, fed=self.backend.fed_workers)
        schedule = self.algorithm.period
        chunk = self._chunk(steps, hooks)
        pieces: list[StepMetrics] = []
        marks = [(0, k0) for _ in hooks]  # (pieces index, step) at each hook's previous call
        stop = False
        while k - k0 < steps and not stop:
            p = state.period
            if p.tau == 0 and k > 0 and not schedule.adaptive:  # a state from before rounds were kept
                start = schedule.round_start(schedule.round_index(k))
                p = PeriodState(start, *schedule.begin(p.rule, start, r))
            if k >= p.end:  # the next round begins: its period is decided now
                p = PeriodState(k, *schedule.begin(p.rule, k, r))
            state = state._replace(period=p)
            remaining = steps - (k - k0)
            length = min(p.end - k, remaining, self.steps_per_call)
            mixes = k + length == p.end
            rounds, fused = 1, 1
            tau = schedule.constant_tau
            if mixes and tau is not None and length == tau:
                limit = min(remaining // tau, chunk)
                for h in hooks:
                    limit = min(limit, 1 if h.every is None else -(-((k // h.every + 1) * h.every - k) // tau))
                rounds, fused = self._fusable(r, max(limit, 1)), chunk
            state, metrics = self._call(state, source.take(k - k0, rounds * length), rounds, length, r, mixes,
                                        fused)
            if check_finite:
                raise_if_nonfinite(metrics, k, k == p.start and k > 0, self.mixer.name)
            k += rounds * length
            if mixes:
                r += rounds
                state = state._replace(period=PeriodState(k - length, length, p.rule) if rounds > 1 else p)
            pieces.append(metrics)
            ended = RoundEnd(self, state, None, None, k, r - 1 if mixes else r, mixes)
            state, stop = call_hooks(hooks, marks, pieces, ended, final=k - k0 >= steps)
            if stop:  # the run ends here: every hook not yet called at this step gets its last call
                state, _ = call_hooks(hooks, marks, pieces, ended._replace(state=state), final=True)
        if not pieces:
            empty = StepMetrics(np.zeros((0, self.m)), np.zeros(0), np.zeros(0, bool),
                                np.zeros(0) if self.track_consensus else None, np.zeros(0, bool))
            return state, empty
        return state, concat(pieces)

    def round_fn(self, tau: int, r: int = 0, mix: bool = True) -> Callable:
        """A pure, jittable, vmappable function for one round on the simulate layout.

        ``f(state, batches) -> (state, metrics)`` runs ``tau`` local steps and (if ``mix``) the
        r-th mixing, with its arguments baked in as constants; ``batches`` leaves have shape
        ``(tau, m, …)``. Metrics are :class:`StepMetrics` with a leading axis ``tau``.

        Many seeds at once (the theory harness)::

            f = jax.jit(jax.vmap(trainer.round_fn(tau)))
            states = jax.tree.map(lambda *xs: jnp.stack(xs), *[trainer.init(p, s) for s in seeds])
            states, metrics = f(states, batches)   # batches leaves (seeds, tau, m, …)
        """
        if not isinstance(self.backend, _backends.Simulate):
            raise ValueError(f"round_fn needs backend='simulate', this trainer uses {self.backend.name!r}")
        tau = require_int("tau", tau, 1)
        mix_round = self.mixer.plan(r) if mix else MixRound(None, (), False)
        local = _engine.round_program(self.spec, WorkerAxis(self.m), 1, tau, bool(mix), mix_round.static,
                                      bool(mix and mix_round.moves))
        communicated = np.zeros(tau, bool)
        communicated[-1] = bool(mix and mix_round.moves)
        args, moves = mix_round.args, np.asarray([bool(mix_round.moves)])

        def f(state: EngineState, batches):
            stacked = jax.tree.map(lambda c: jnp.asarray(c)[None], args)
            params, opt, mix_state, model_state, outs = local(
                state.params, state.opt_state, state.mix_state, state.model_state, state.step, state.key, batches,
                stacked, jnp.asarray(moves))
            new = state._replace(params=params, opt_state=opt, mix_state=mix_state, model_state=model_state,
                                 step=state.step + tau, rounds=state.rounds + int(bool(mix)))
            return new, self._metrics(_engine.summarize(outs), jnp.asarray(communicated))

        return f

    def lower_step(self, state: EngineState, batch, mixes: bool = True, r: int = 0):
        """The lowered program of one step (``mixes``: with the r-th mixing), to read its HLO:
        ``trainer.lower_step(state, batch).compile().as_text()``."""
        check_leading(batch, self.m, self.backend.fed_workers)
        be = self.backend
        batches = be.place_batches(jax.tree.map(lambda x: x[None], batch))
        mix_round = self.mixer.plan(r) if mixes else MixRound(None, (), False)
        local = _engine.round_program(self.spec, be.axis, 1, 1, bool(mixes), mix_round.static,
                                      bool(mixes and mix_round.moves))
        args = jax.tree.map(lambda c: np.asarray(c)[None], mix_round.args)
        operands = (state.params, state.opt_state, state.mix_state, state.model_state, state.step, state.key,
                    batches, args, np.asarray([bool(mix_round.moves)]), np.int32(1))
        if isinstance(be, _backends.Pmap):
            return be.mapped(local).lower(operands)
        fn = jax.jit(be.shard_mapped(local)) if isinstance(be, _backends.ShardMap) else jax.jit(local)
        return fn.lower(*operands)
