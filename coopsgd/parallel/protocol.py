"""The mixing protocol: what the engine calls at the end of every round, as pure functions.

Like optax's ``GradientTransformation``, a :class:`Mixer` is a NamedTuple of functions:

- ``init(columns) -> MixerState``: the mixer's state from the m initial worker models (a pytree
  whose leaves have leading axis m, the global view);
- ``apply(columns, state, round, axis) -> (columns, state)``: one mixing of this device's workers
  (leading axis ``axis.size``), with the round's :class:`MixRound` and the
  :class:`~coopsgd.parallel.collectives.WorkerAxis` for communication; jittable;
- ``plan(r) -> MixRound``: on the host, what round r's mixing is — its static structure (one
  compiled program per distinct value), its run-time arrays, and whether it moves data;
- ``traffic(r, param_bytes) -> Communication``: what round r's mixing sends per worker, the
  mixer's entry in the one communication account;
- ``direction(grads, params, state, axis) -> (direction, state)``, optional: called at every
  local step with the workers' gradients (and the models they were taken at); what it returns is
  given to the optax optimizer instead (gradient tracking's y); jittable;
- ``columns(workers, state)``: the n columns of Cooperative SGD's X that the state stands for
  (the linear mixer appends its auxiliary columns); by default the workers themselves; and
  ``from_columns(columns, state) -> (workers, state)``, its inverse, where there is one.

A mixer's state lives in ``EngineState.mix_state`` and is checkpointed with it. Its
``per_worker`` part is laid out like the models (split over the worker axis on devices); its
``shared`` part is replicated on every device and must be updated identically everywhere.

At the same seam the engine applies an :class:`OptimizerSync` after every mixing that moved data:
what happens to each worker's optimizer state (``keep``, ``average``, ``reset``, or your own).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopsgd.core.communication import Communication
from coopsgd.parallel import programs
from coopsgd.parallel.collectives import WorkerAxis

__all__ = [
    "STATE_POLICIES",
    "SYNC_POLICIES",
    "MixRound",
    "Mixer",
    "MixerError",
    "MixerState",
    "OptimizerSync",
    "SyncPolicy",
    "check_mixer",
    "optimizer_sync",
    "state_sync",
]


class MixerState(NamedTuple):
    """A mixer's state: ``per_worker`` leaves have a leading worker axis (laid out like the
    models), ``shared`` leaves are replicated on every device."""

    per_worker: Any = ()
    shared: Any = ()


class MixRound(NamedTuple):
    """One round's mixing: ``static`` (hashable, compiled into the program), ``args`` (a pytree of
    arrays, run-time arguments) and ``moves`` (whether the mixing moves data between workers). On
    the host ``args`` are NumPy arrays and ``moves`` a bool; inside ``apply`` they are traced, and
    ``step`` is the number of local steps taken so far (an int32 scalar: what a learning-rate
    schedule of the mixing reads; None on the host)."""

    static: Hashable = None
    args: Any = ()
    moves: Any = True
    step: Any = None


def _no_plan(r: int) -> MixRound:
    return MixRound()


class Mixer(NamedTuple):
    """A mixing at round ends as pure functions (see the module docstring).

    Example — a mixer that averages the workers and counts its mixings in its shared state::

        def init(columns):
            return MixerState(shared=jnp.zeros((), jnp.int32))

        def apply(columns, state, round, axis):
            mean = jax.tree.map(lambda x: axis.mean(x, keepdims=True), columns)
            out = jax.tree.map(lambda x, c: jnp.broadcast_to(c, x.shape), columns, mean)
            return out, MixerState(shared=state.shared + 1)

        counting = Mixer(init, apply, traffic=lambda r, p: coopsgd.mixing_traffic(J, p), name="counting")
    """

    init: Callable[[Any], MixerState]
    apply: Callable[[Any, MixerState, MixRound, WorkerAxis], tuple[Any, MixerState]]
    traffic: Callable[[int, float], Communication]
    plan: Callable[[int], MixRound] = _no_plan
    columns: Callable[[Any, MixerState], Any] | None = None
    from_columns: Callable[[Any, MixerState], tuple[Any, MixerState]] | None = None
    name: str = "mixer"
    direction: Callable[[Any, Any, MixerState, WorkerAxis], tuple[Any, MixerState]] | None = None


SyncPolicy = Literal["keep", "average", "reset"]
"""Named optimizer-state policies at a mixing."""

SYNC_POLICIES: tuple[str, ...] = ("keep", "average", "reset")
"""What happens to each worker's optimizer state when the models mix:

- ``"keep"`` (default): nothing; every worker keeps its own moments (e.g. momentum buffers), which
  now belong to a model that has moved. This is what most local-SGD papers do.
- ``"average"``: every floating-point leaf becomes the mean over the m workers at each mixing (one
  extra all-reduce of the optimizer state); integer leaves (step counts) are kept.
- ``"reset"``: re-initialise the optimizer state from the mixed model (``optimizer.init``), as if
  training restarted from it (moments zeroed, Adam's bias correction starts again) — except the
  learning-rate schedules' step counts (``optax.ScaleByScheduleState`` and the counts and
  hyperparameters of ``optax.inject_hyperparams``), which keep counting, so a warmup-cosine
  schedule runs once over the whole run and does not warm up again after every mixing.
"""

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_schedule_state(node) -> bool:
    return isinstance(node, (optax.ScaleByScheduleState, *_INJECTED))


def keep_schedule_counts(fresh, old):
    """``fresh`` (a re-initialised optax state) with the schedule states of ``old``: every
    ``ScaleByScheduleState`` kept whole; an injected-hyperparameter state keeps its count,
    hyperparameters and schedule states while its inner state is reset the same way."""
    def pick(new, before):
        if isinstance(new, optax.ScaleByScheduleState):
            return before
        if isinstance(new, _INJECTED):
            return new._replace(count=before.count, hyperparams=before.hyperparams,
                                hyperparams_states=before.hyperparams_states,
                                inner_state=keep_schedule_counts(new.inner_state, before.inner_state))
        return new

    return jax.tree.map(pick, fresh, old, is_leaf=_is_schedule_state)


class OptimizerSync(NamedTuple):
    """The optimizer-state policy at a mixing: ``apply(opt_state, columns, axis) -> opt_state``
    (this device's workers), called after every mixing that moved data. ``identity`` marks a
    policy that changes nothing, so the engine can leave it out of the program."""

    apply: Callable[[Any, Any, WorkerAxis], Any]
    name: str = "custom"
    identity: bool = False


def optimizer_sync(policy, optimizer) -> OptimizerSync:
    """The :class:`OptimizerSync` named ``policy`` (one of :data:`SYNC_POLICIES`) for ``optimizer``,
    or ``policy`` itself if it already is one.

    Raises:
        ValueError: for an unknown name.
    """
    def reset(opt, columns, axis):
        return keep_schedule_counts(jax.vmap(optimizer.init)(columns), opt)

    return _named("sync_optimizer_state", policy, {"keep": _unchanged("keep"), "average": _AVERAGE,
                                                   "reset": OptimizerSync(reset, "reset")})


def _named(what: str, policy, policies: dict[str, OptimizerSync]) -> OptimizerSync:
    """``policy`` itself if it is an :class:`OptimizerSync`, else the one of ``policies`` it names."""
    if isinstance(policy, OptimizerSync):
        return policy
    if not isinstance(policy, str) or policy not in policies:
        raise ValueError(f"{what} must be one of {tuple(policies)} or an OptimizerSync, got {policy!r}")
    return policies[policy]


def _unchanged(name: str) -> OptimizerSync:
    return OptimizerSync(lambda tree, columns, axis: tree, name, identity=True)


def _average(tree, columns, axis: WorkerAxis):
    """Every floating leaf of a per-worker ``tree`` replaced by its mean over the m workers (one
    all-reduce); integer leaves (counts) kept."""
    def one(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jnp.broadcast_to(axis.mean(a, keepdims=True), a.shape).astype(a.dtype)

    return jax.tree.map(one, tree)


_AVERAGE = OptimizerSync(_average, "average")

StatePolicy = Literal["average", "local"]
"""Named model-state policies at a mixing."""

STATE_POLICIES: tuple[str, ...] = ("average", "local")
"""What happens to each worker's model state (BatchNorm statistics, any non-``Param`` variable)
when the models mix:

- ``"average"`` (default): every floating leaf becomes the mean over the m workers at each mixing
  that moves data, so the statistics follow the models they belong to (one all-reduce of the
  state; for a gossip W the models mix with their neighbours while the statistics average over
  all workers);
- ``"local"``: every worker keeps its own statistics (as FedBN keeps BatchNorm local; Li et al.,
  "FedBN", ICLR 2021).
"""


def state_sync(policy) -> OptimizerSync:
    """The model-state policy named ``policy`` (one of :data:`STATE_POLICIES`), as an
    :class:`OptimizerSync` applied to the model state, or ``policy`` itself if it already is one.

    Raises:
        ValueError: for an unknown name.
    """
    return _named("state_sync", policy, {"average": _AVERAGE, "local": _unchanged("local")})


class MixerError(ValueError):
    """A mixer broke the protocol (wrong structure, shapes or dtypes, or non-finite output)."""


def _signature(tree) -> list:
    return [(jax.tree_util.keystr(path), tuple(np.shape(x)), str(getattr(x, "dtype", type(x))))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_mixer(mixer: Mixer, columns, state: MixerState, round0: MixRound, m: int) -> None:
    """Trace one mixing on the simulate layout (``jax.eval_shape``, nothing runs) and check that it
    returns columns and a state of exactly the structure, shapes and dtypes it was given.

    Raises:
        MixerError: naming the mixer and the first leaf that differs.
    """
    if not isinstance(state, MixerState):
        raise MixerError(f"mixer {mixer.name!r}: init must return a MixerState, got {type(state).__name__}")
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), (columns, state))
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), round0.args)
    key = ("mixer", programs.fingerprint((mixer.apply, mixer.direction)), programs.avals((spec, args)),
           round0.static, bool(round0.moves), m)
    programs.check_once(key, lambda: _check_traced(mixer, spec, args, round0, m))


def _check_traced(mixer: Mixer, spec, args, round0: MixRound, m: int) -> None:
    def one(cols, st, a):
        return mixer.apply(cols, st, MixRound(round0.static, a, jnp.asarray(bool(round0.moves)),
                                              jnp.asarray(1, jnp.int32)), WorkerAxis(m))

    pairs = []
    for what, fn, operands in (("apply", one, (spec[0], spec[1], args)),
                               ("direction", mixer.direction and (
                                   lambda g, x, st: mixer.direction(g, x, st, WorkerAxis(m))),
                                (spec[0], spec[0], spec[1]))):
        if fn is None:
            continue
        try:
            out = jax.eval_shape(fn, *operands)
        except Exception as err:  # the user's mixer failed while tracing
            raise MixerError(f"mixer {mixer.name!r} failed in {what} on the workers' columns: "
                             f"{type(err).__name__}: {err}") from err
        name = "columns" if what == "apply" else "direction"
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], MixerState)):
            raise MixerError(f"mixer {mixer.name!r}: {what} must return ({name}, MixerState), got {out!r}")
        pairs += [(name, spec[0], out[0]), (f"state after {what}", spec[1], out[1])]
    for what, given, got in pairs:
        a, b = _signature(given), _signature(got)
        if jax.tree.structure(given) != jax.tree.structure(got):
            raise MixerError(f"mixer {mixer.name!r} changed the structure of its {what}: "
                             f"{jax.tree.structure(given)} -> {jax.tree.structure(got)}")
        for (path, shape, dtype), (_, shape2, dtype2) in zip(a, b):
            if (shape, dtype) != (shape2, dtype2):
                raise MixerError(f"mixer {mixer.name!r} returned {what}{path} with shape {shape2} and "
                                 f"dtype {dtype2}, but was given shape {shape} and dtype {dtype}")
