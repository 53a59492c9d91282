"""Layouts of the worker axis: simulated on one device, ``jax.pmap``, or ``jax.shard_map`` on a mesh.

The per-device computation (τ local steps and one mixing) is written once in
:mod:`coopsgd.parallel.engine`; a backend decides where the state lives and how the program is
launched:

- ``"simulate"``: all m workers on one device, a ``vmap`` axis; any m.
- ``"pmap"``: ``jax.pmap`` over the D local devices, ``m/D`` workers per device; shared state
  (the mixer's replicated part, e.g. an anchor) has a leading device axis, one identical copy each.
- ``"shard_map"``: ``jax.shard_map`` over a ``Mesh`` with an axis ``"workers"``; arrays are global
  ``jax.Array``s placed with ``NamedSharding`` (workers split over ``"workers"``, shared state
  replicated); works across processes after ``jax.distributed.initialize`` (each process passes
  the same global batch; see docs/engine.md).

Device ``d`` holds workers ``d·m/D … (d+1)·m/D − 1``. :meth:`Backend.workers` returns the m
workers (leading axis m) on every backend.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from coopsgd.core.validate import require_choice
from coopsgd.parallel import programs as _programs
from coopsgd.parallel.collectives import AXIS, WorkerAxis
from coopsgd.parallel.protocol import MixerState

__all__ = ["BACKENDS", "Backend", "BackendName", "Pmap", "ShardMap", "Simulate", "make_backend"]

BackendName = Literal["simulate", "pmap", "shard_map"]
"""The name of a layout of the worker axis."""
BACKENDS: tuple[str, ...] = ("simulate", "pmap", "shard_map")
"""Every backend, by name."""


DONATED = (0, 1, 2, 3)
"""The arguments a donating program consumes: models, optimizer, mixer and model states."""


def _split_check(m: int, count: int, what: str) -> int:
    if m % count:
        lo, hi = (m // count) * count, (m // count + 1) * count
        options = ", ".join(str(x) for x in (lo, hi) if x > 0)
        raise ValueError(
            f"m = {m} workers cannot be split evenly over the {count} {what}: m must be a multiple "
            f"of {count} (e.g. m = {options}); or use backend='simulate', or fewer devices"
        )
    return m // count


class Backend:
    """Where the state lives. Subclasses set ``name``, ``num_devices`` (D) and ``axis_name``."""

    name = "base"
    num_devices = 1
    axis_name: str | None = None
    layout_axes = 1
    """Leading axes of a placed per-worker value: (m, …), or (D, m/D, …) on pmap."""

    def __init__(self, m: int):
        self.m = m
        self.m_local = _split_check(m, self.num_devices, f"devices of backend {self.name!r}")

    @property
    def axis(self) -> WorkerAxis:
        """The worker axis the per-device program sees."""
        return WorkerAxis(self.m, self.axis_name, self.num_devices)

    def bind(self, params) -> None:
        """Check what this layout needs of the model ``params`` (one worker's pytree) before it is
        placed; a layout that splits each model over devices records how (:class:`ShardMap`)."""

    def local_workers(self) -> np.ndarray:
        """The workers whose devices this process holds, in order (all m in one process)."""
        return np.arange(self.m)

    @property
    def fed_workers(self) -> int:
        """How many workers' batches a batch leaf may hold on this process: all m, or (on shard_map
        across processes) only this process's own, :meth:`local_workers`."""
        return len(self.local_workers())

    def place_workers(self, stacked):
        """Per-worker values with leading axis m (models, optimizer and per-worker mixer state)."""
        raise NotImplementedError

    def place_shared(self, tree):
        """Values every device holds a copy of (the mixer's shared state)."""
        raise NotImplementedError

    def broadcast_workers(self, params):
        """m copies of ``params`` (one model), placed like :meth:`place_workers` (each device's
        shards cut from a read-only broadcast view: no host copy of the m models)."""
        return self.place_workers(jax.tree.map(lambda p: np.broadcast_to(np.asarray(p), (self.m,) + np.shape(p)),
                                               params))

    def init_workers(self, fn, placed):
        """``fn`` (e.g. ``optimizer.init``) of every worker's placed model, laid out like per-worker
        values; None where the layout has no better way than the simulate layout's."""
        return None

    def place_mix_state(self, state: MixerState) -> MixerState:
        """The mixer's state placed: per-worker parts like the workers, shared parts like shared state."""
        return MixerState(self.place_workers(state.per_worker), self.place_shared(state.shared))

    def place_batches(self, batches):
        """Batches with leaves (steps, m, …)."""
        raise NotImplementedError

    def replicate(self, x):
        """``x`` as one array replicated on every device of the layout."""
        return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))  # no compile, unlike jnp.asarray

    def workers(self, placed):
        """Per-worker values back to leading axis m."""
        raise NotImplementedError

    def shared(self, placed):
        """Shared values back to one copy."""
        raise NotImplementedError

    @property
    def key(self):
        """What of this layout a compiled program depends on (hashable; equal layouts share
        programs, :mod:`coopsgd.parallel.programs`)."""
        return self.name, self.m

    def compile(self, local_fn, summarize, length: int, mixes: bool, donate: bool = False):
        """The launched program ``(params, opt, mix_state, model_state, step, rounds, key, batches,
        args, moves, todo) → (params, opt, mix_state, model_state, step + todo·length, rounds +
        todo·mixes, summary)`` around the per-device ``local_fn(params, opt, mix_state,
        model_state, step, key, batches, args, moves, todo) → (params, opt, mix_state,
        model_state, outs)``, ``todo`` the rounds to run (a replicated int32 scalar); with
        ``donate`` the first four arguments' buffers are reused for the results (the state passed
        in is consumed)."""
        raise NotImplementedError


@functools.partial(jax.jit, static_argnums=1)
def _broadcast(params, m: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), params)


class Simulate(Backend):
    """All workers on one device; the worker axis is a vmap axis. Any m."""

    name = "simulate"

    def place_workers(self, stacked):
        return jax.tree.map(jnp.asarray, stacked)

    def place_shared(self, tree):
        return jax.tree.map(jnp.asarray, tree)

    def broadcast_workers(self, params):
        return _broadcast(jax.tree.map(jnp.asarray, params), self.m)  # on the device: no host copy of m models

    def place_batches(self, batches):
        return batches

    def workers(self, placed):
        return placed

    def shared(self, placed):
        return placed

    def compile(self, local_fn, summarize, length: int, mixes: bool, donate: bool = False):
        def program(params, opt, mix_state, ms, step, count, key, batches, args, moves, todo):
            *state, outs = local_fn(params, opt, mix_state, ms, step, key, batches, args, moves, todo)
            return *state, step + todo * length, count + todo * mixes, summarize(outs)

        return jax.jit(program, donate_argnums=DONATED if donate else ())


def _identity(x):
    return x


class Pmap(Backend):
    """``jax.pmap`` over the local devices (single process)."""

    name = "pmap"
    layout_axes = 2

    def __init__(self, m: int, devices=None):
        if jax.process_count() > 1:
            raise ValueError(
                f"backend='pmap' runs in one process, but there are {jax.process_count()} "
                "processes; use backend='shard_map' across processes")
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(self.devices)
        self.axis_name = AXIS
        super().__init__(m)

    def _put(self, blocks):
        """Put (D, …) host blocks one per device, as pmap's output would be (an identity pmap)."""
        return jax.pmap(_identity, devices=self.devices)(blocks)

    def place_workers(self, stacked):
        d, ml = self.num_devices, self.m_local
        return jax.tree.map(lambda x: self._put(np.asarray(x).reshape((d, ml) + np.shape(x)[1:])), stacked)

    def place_shared(self, tree):
        d = self.num_devices
        return jax.tree.map(lambda x: self._put(np.broadcast_to(np.asarray(x), (d,) + np.shape(x))), tree)

    def place_batches(self, batches):
        d, ml = self.num_devices, self.m_local

        def one(x):
            x = x.reshape((x.shape[0], d, ml) + x.shape[2:])
            return np.swapaxes(x, 0, 1) if isinstance(x, np.ndarray) else jnp.swapaxes(x, 0, 1)

        return jax.tree.map(one, batches)

    def workers(self, placed):
        return jax.tree.map(lambda x: x.reshape((self.m,) + x.shape[2:]), placed)

    def shared(self, placed):
        return jax.tree.map(lambda x: x[0], placed)

    @property
    def key(self):
        return self.name, self.m, tuple(d.id for d in self.devices)

    def compile(self, local_fn, summarize, length: int, mixes: bool, donate: bool = False):
        # The arguments travel as one tuple (see :meth:`mapped`), so nothing is donated on pmap.
        mapped = self.mapped(local_fn)
        m = self.m

        @jax.jit
        def finish(outs):
            # (D, RL, m/D, …) → (RL, m, …); consensus is identical on every device.
            def merge(x):
                x = jnp.moveaxis(x, 0, 1)
                return x.reshape((x.shape[0], m) + x.shape[3:])

            outs = {"losses": merge(outs["losses"]),
                    "aux": jax.tree.map(merge, outs["aux"]),
                    "consensus": None if outs["consensus"] is None else outs["consensus"][0]}
            return summarize(outs)

        def program(params, opt, mix_state, ms, step, count, key, batches, args, moves, todo):
            *state, outs = mapped((params, opt, mix_state, ms, step, key, batches, args, moves, todo))
            return *state, step + todo * length, count + todo * mixes, finish(outs)

        return program

    def mapped(self, local_fn):
        """``local_fn`` under this backend's pmap, called with its arguments as one tuple: jax
        0.10's pmap reads a tuple ``in_axes`` as *flat* when the number of leaves happens to equal
        the number of arguments (e.g. an optimizer state with no leaves, like plain SGD's), which
        silently maps a scalar argument."""
        return jax.pmap(lambda args: local_fn(*args), axis_name=AXIS,
                        in_axes=((0, 0, 0, 0, None, None, 0, None, None, None),), out_axes=0, devices=self.devices)


def _is_spec(x) -> bool:
    return x is None or isinstance(x, P)


class ShardMap(Backend):
    """``jax.shard_map`` over a mesh with an axis ``"workers"``; also across processes.

    A mesh may have more axes beside ``"workers"`` (e.g. ``("workers", "model")``): then a worker is
    the group of devices along them, and ``param_specs`` — a pytree of ``PartitionSpec`` s over
    those axes, one per parameter leaf — says how each worker's model is sharded over its group
    (FSDP or tensor-parallel layouts). The program is manual over ``"workers"`` only
    (``shard_map(..., axis_names={"workers"})``): inside a group the local steps are partitioned
    by GSPMD from the parameters' shardings, and the mixing's collectives run over ``"workers"``
    alone. A leaf of the optimizer, mixer or model state that mirrors a parameter (same trailing
    path and shape, e.g. Adam's ``mu``) is sharded like it; every other per-worker leaf is split
    over the workers and replicated within the group. Every program returns the state in the
    layout it was given, so nothing is silently replicated.
    """

    name = "shard_map"

    def __init__(self, m: int, devices=None, mesh=None, param_specs=None):
        if mesh is None:
            devices = list(devices) if devices is not None else jax.devices()
            mesh = jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                                 axis_types=(jax.sharding.AxisType.Auto,))
        if not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if AXIS not in mesh.axis_names:
            raise ValueError(f"the mesh needs an axis named {AXIS!r} (the worker axis), got axes {mesh.axis_names}; "
                             f"e.g. jax.make_mesh((4, 2), ({AXIS!r}, 'model'))")
        self.mesh = mesh
        self.group_axes = tuple(a for a in mesh.axis_names if a != AXIS)
        self.group_size = int(np.prod([mesh.shape[a] for a in self.group_axes], dtype=int))
        if param_specs is not None and not self.group_axes:
            raise ValueError(f"param_specs shard each worker's model over the mesh's axes beside {AXIS!r}, but "
                             f"the mesh has no other axis ({mesh.axis_names}); add one, e.g. ({AXIS!r}, 'model')")
        if param_specs is None and self.group_size > 1:
            raise ValueError(f"the mesh has axes {self.group_axes} beside {AXIS!r} (a worker is a group of "
                             f"{self.group_size} devices) but no param_specs say how a model is sharded over them; "
                             f"pass param_specs, a PartitionSpec per parameter leaf (P() replicates a leaf)")
        self.param_specs = param_specs
        self._layouts: list[tuple[tuple, tuple, P]] = []  # (path, shape, spec) per parameter leaf
        self.num_devices = mesh.shape[AXIS]
        self.axis_name = AXIS
        self.sharded = NamedSharding(mesh, P(AXIS))
        self.batch_sharding = NamedSharding(mesh, P(None, AXIS))
        self.replicated = NamedSharding(mesh, P())
        super().__init__(m)

    def bind(self, params) -> None:
        """Check ``param_specs`` against one worker's ``params`` and the mesh, and record each
        leaf's layout.

        Raises:
            ValueError: naming the leaf whose spec is missing, not a PartitionSpec, longer than
                the leaf's rank, names an axis the mesh lacks (or ``"workers"``, or one axis
                twice), or splits a dimension the axis sizes do not divide.
        """
        if self.param_specs is None:
            return
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        try:
            specs = jax.tree.structure(params).flatten_up_to(
                jax.tree.map(lambda x: x, self.param_specs, is_leaf=_is_spec))
        except (ValueError, TypeError) as err:
            raise ValueError(f"param_specs must have the structure of the params, one PartitionSpec per leaf "
                             f"{jax.tree.structure(params)}; got {jax.tree.structure(self.param_specs, is_leaf=_is_spec)}"
                             f" ({err})") from None
        layouts = []
        for (path, leaf), spec in zip(leaves, specs):
            name, shape = f"params{jax.tree_util.keystr(path)}", tuple(np.shape(leaf))
            spec = P() if spec is None else spec
            if not isinstance(spec, P):
                raise ValueError(f"param_specs for {name} must be a PartitionSpec, got {spec!r}")
            if len(spec) > len(shape):
                raise ValueError(f"param_specs for {name} is {spec}, {len(spec)} entries for a leaf of shape {shape}")
            used: list[str] = []
            for dim, entry in enumerate(spec):
                names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
                for a in names:
                    if a == AXIS or a not in self.group_axes:
                        raise ValueError(f"param_specs for {name} names mesh axis {a!r}, but a model can be "
                                         f"sharded only over the axes beside {AXIS!r}: {self.group_axes}")
                    if a in used:
                        raise ValueError(f"param_specs for {name} is {spec}: axis {a!r} is used twice")
                    used.append(a)
                size = int(np.prod([self.mesh.shape[a] for a in names], dtype=int))
                if shape[dim] % size:
                    raise ValueError(f"param_specs for {name} is {spec}: dimension {dim} of shape {shape} has "
                                     f"{shape[dim]} entries, not a multiple of the {size} devices of {names}")
            layouts.append((tuple(path), shape, spec))
        self._layouts = layouts

    def _sharding(self, path: tuple, shape: tuple) -> NamedSharding:
        """A per-worker leaf's layout: that of the parameter it mirrors (a parameter path that
        ends its path, same shape past the worker axis), else split over the workers only."""
        for p, s, spec in self._layouts:
            if shape[1:] == s and tuple(path[len(path) - len(p):]) == p:
                return NamedSharding(self.mesh, P(AXIS, *spec))
        return self.sharded

    def _global(self, host: np.ndarray, sharding):
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def init_workers(self, fn, placed):
        """On the mesh, each device computing its own shards (for a model sharded over its group,
        no device ever holds a whole worker's optimizer state)."""
        if not self._layouts:
            return None
        shapes = jax.eval_shape(jax.vmap(fn), placed)
        layout = jax.tree_util.tree_map_with_path(lambda path, s: self._sharding(tuple(path), s.shape), shapes)
        return jax.jit(jax.vmap(fn), out_shardings=layout)(placed)

    def place_workers(self, stacked):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self._global(np.asarray(x), self._sharding(tuple(path), np.shape(x))), stacked)

    def place_shared(self, tree):
        return jax.tree.map(self.replicate, tree)

    @functools.cached_property
    def _local(self) -> np.ndarray:
        if jax.process_count() == 1:
            return np.arange(self.m)
        rows = self.batch_sharding.addressable_devices_indices_map((1, self.m)).values()
        ids = np.unique(np.concatenate([np.arange(self.m)[r[1]] for r in rows]))
        if ids.size and ids[-1] - ids[0] + 1 != ids.size:
            raise ValueError(f"this process holds the devices of workers {ids.tolist()}, not a contiguous range, so "
                             f"it cannot feed only its own workers' batches; order the mesh's devices by process")
        return ids

    def local_workers(self) -> np.ndarray:
        return self._local

    def place_batches(self, batches):
        """Batches with leaves (steps, m, …) — the same on every process — or, in a multi-process
        run, (steps, k, …) holding only this process's k :meth:`local_workers` (assembled with
        ``jax.make_array_from_process_local_data``, nothing crosses processes)."""
        def one(x):
            if isinstance(x, jax.Array) and x.sharding == self.batch_sharding:
                return x
            if isinstance(x, jax.Array) and jax.process_count() == 1:
                return jax.device_put(x, self.batch_sharding)
            if x.shape[1] != self.m:  # this process's workers only
                global_shape = (x.shape[0], self.m) + tuple(x.shape[2:])
                return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x), global_shape)
            return self._global(np.asarray(x), self.batch_sharding)

        return jax.tree.map(one, batches)

    def replicate(self, x):
        if isinstance(x, jax.Array) and x.sharding == self.replicated:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, self.replicated)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(self._global(data, self.replicated), impl=impl)
        return self._global(np.asarray(x), self.replicated)

    def workers(self, placed):
        if all(x.is_fully_addressable for x in jax.tree.leaves(placed)):
            return placed
        return jax.jit(lambda p: p, out_shardings=self.replicated)(placed)

    def shared(self, placed):
        return placed

    @property
    def key(self):
        return self.name, self.m, self.mesh

    def compile(self, local_fn, summarize, length: int, mixes: bool, donate: bool = False):
        mapped = self.shard_mapped(local_fn)
        replicated = self.replicated

        def main_fn(params, opt, mix_state, ms, step, count, key, batches, args, moves, todo):
            *state, outs = mapped(params, opt, mix_state, ms, step, key, batches, args, moves, todo)
            return *state, step + todo * length, count + todo * mixes, outs

        mains: dict = {}  # one per layout of the state: its results pinned to the layout given

        def main(*args):
            layout, signature = _programs.layout(args[: len(DONATED)])
            if signature not in mains:
                mains[signature] = jax.jit(main_fn, donate_argnums=DONATED if donate else (),
                                           out_shardings=(*layout, replicated, replicated, None))
            return mains[signature](*args)

        summary = jax.jit(summarize, out_shardings=replicated)

        def program(*args):
            *state, outs = main(*args)
            return *state, summary(outs)

        return program

    def shard_mapped(self, local_fn):
        """``local_fn`` under ``jax.shard_map``: params, optimizer state, per-worker mixer state and
        batches split over the worker axis, everything else replicated. The mean loss is computed
        by a separate program so that the training step's own collectives are only the mixing's."""
        spec_out = {"losses": P(None, AXIS), "aux": P(None, AXIS), "consensus": P()}
        mix_spec = MixerState(per_worker=P(AXIS), shared=P())
        return jax.shard_map(
            local_fn, mesh=self.mesh,
            in_specs=(P(AXIS), P(AXIS), mix_spec, P(AXIS), P(), P(), P(None, AXIS), P(), P(), P()),
            out_specs=(P(AXIS), P(AXIS), mix_spec, P(AXIS), spec_out),
            axis_names={AXIS}, check_vma=False,
        )


def make_backend(name, m: int, devices=None, mesh=None, param_specs=None) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`) for m workers; ``mesh`` and
    ``param_specs`` are the shard_map backend's (see :class:`ShardMap`).

    Raises:
        ValueError: for an unknown name, options the backend does not take, or when m is not a
            multiple of the device count.
    """
    if name != "shard_map" and (mesh is not None or param_specs is not None):
        given = "mesh" if mesh is not None else "param_specs"
        raise ValueError(f"{given} is an option of backend='shard_map', got backend={getattr(name, 'name', name)!r}")
    if isinstance(name, Backend):
        if name.m != m:
            raise ValueError(f"backend {name.name!r} was built for m = {name.m}, but the algorithm has m = {m}")
        return name
    if name == "simulate":
        return Simulate(m)
    if name == "pmap":
        return Pmap(m, devices=devices)
    require_choice("backend", name, BACKENDS, "backends")
    return ShardMap(m, devices=devices, mesh=mesh, param_specs=param_specs)
