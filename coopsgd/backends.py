"""Layouts of the worker axis: simulated on one device, ``jax.pmap``, or ``jax.shard_map`` on a mesh.

The per-device computation (τ local steps and one mixing) is written once in
:mod:`coopsgd.engine`; a backend decides where the columns live and how the program is launched:

- ``"simulate"``: all ``n = m + v`` columns on one device, a ``vmap`` axis; any m.
- ``"pmap"``: ``jax.pmap`` over the D local devices, ``m/D`` workers per device; each device also
  holds a replica of the v auxiliary columns, updated identically.
- ``"shard_map"``: ``jax.shard_map`` over a 1-D ``Mesh`` with axis ``"workers"``; arrays are global
  ``jax.Array``s placed with ``NamedSharding``; works across processes after
  ``jax.distributed.initialize`` (each process passes the same global batch; see docs/engine.md).

Device layout (pmap and shard_map): device ``d`` holds the block
``[x_{d·m/D} … x_{(d+1)·m/D − 1}, z_1 … z_v]``. With ``v = 0`` the shard_map ``params`` are exactly
the n columns in order; :meth:`Backend.columns` returns the n columns on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["BACKENDS", "AXIS", "Backend", "Simulate", "Pmap", "ShardMap", "make_backend"]

AXIS = "workers"
"""Name of the worker axis inside pmap / shard_map programs."""

BACKENDS = ("simulate", "pmap", "shard_map")


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
    """Where the columns live. Subclasses set ``name``, ``num_devices`` (D) and ``axis``."""

    name = "base"
    num_devices = 1
    axis: str | None = None

    def __init__(self, m: int, v: int):
        self.m, self.v = m, v
        self.m_local = _split_check(m, self.num_devices, f"devices of backend {self.name!r}")

    # --- layout -------------------------------------------------------------------------------
    def to_blocks(self, columns: np.ndarray) -> np.ndarray:
        """(n, …) columns → (D, m/D + v, …) per-device blocks (auxiliary columns replicated)."""
        m, v, ml = self.m, self.v, self.m_local
        work = columns[:m].reshape((self.num_devices, ml) + columns.shape[1:])
        aux = np.broadcast_to(columns[m:], (self.num_devices, v) + columns.shape[1:])
        return np.concatenate([work, aux], axis=1)

    def from_blocks(self, blocks):
        """(D, m/D + v, …) blocks → (n, …) columns (auxiliary columns taken from device 0)."""
        ml = self.m_local
        work = blocks[:, :ml].reshape((self.m,) + blocks.shape[2:])
        return jnp.concatenate([work, blocks[0, ml:]], axis=0)

    def place_params(self, columns):
        raise NotImplementedError

    def place_workers(self, stacked):
        """Per-worker values with leading axis m (optimizer state)."""
        raise NotImplementedError

    def place_batches(self, batches):
        """Batches with leaves (steps, m, …)."""
        raise NotImplementedError

    def replicate(self, x):
        return jnp.asarray(x) if not isinstance(x, jax.Array) else x

    def columns(self, params):
        """The n columns as one pytree with leading axis n."""
        raise NotImplementedError

    def compile(self, local_fn, summarize, steps: int, rounds: int):
        """The launched program ``(params, opt, step, rounds, key, batches, coefs) →
        (params, opt, step + steps, rounds + rounds, summary)`` around the per-device
        ``local_fn(params, opt, step, key, batches, coefs) → (params, opt, outs)``."""
        raise NotImplementedError


class Simulate(Backend):
    """All columns on one device; the worker axis is a vmap axis. Any m."""

    name = "simulate"

    def place_params(self, columns):
        return jax.tree.map(jnp.asarray, columns)

    def place_workers(self, stacked):
        return stacked

    def place_batches(self, batches):
        return batches

    def columns(self, params):
        return params

    def compile(self, local_fn, summarize, steps: int, rounds: int):
        def program(params, opt, step, count, key, batches, coefs):
            params, opt, outs = local_fn(params, opt, step, key, batches, coefs)
            return params, opt, step + steps, count + rounds, summarize(outs)

        return jax.jit(program)


class Pmap(Backend):
    """``jax.pmap`` over the local devices (single process)."""

    name = "pmap"

    def __init__(self, m: int, v: int, devices=None):
        if jax.process_count() > 1:
            raise ValueError(
                f"backend='pmap' runs in one process, but there are {jax.process_count()} "
                "processes; use backend='shard_map' across processes")
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(self.devices)
        self.axis = AXIS
        super().__init__(m, v)

    def place_params(self, columns):
        return jax.tree.map(lambda c: _pmap_put(self.to_blocks(np.asarray(c)), self.devices), columns)

    def place_workers(self, stacked):
        d, ml = self.num_devices, self.m_local
        return jax.tree.map(
            lambda x: _pmap_put(np.asarray(x).reshape((d, ml) + np.shape(x)[1:]), self.devices), stacked
        )

    def place_batches(self, batches):
        d, ml = self.num_devices, self.m_local

        def one(x):
            x = x.reshape((x.shape[0], d, ml) + x.shape[2:])
            return np.swapaxes(x, 0, 1) if isinstance(x, np.ndarray) else jnp.swapaxes(x, 0, 1)

        return jax.tree.map(one, batches)

    def columns(self, params):
        return jax.tree.map(self.from_blocks, params)

    def compile(self, local_fn, summarize, steps: int, rounds: int):
        mapped = pmap_program(local_fn, self.devices)
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

        def program(params, opt, step, count, key, batches, coefs):
            params, opt, outs = mapped(params, opt, step, key, batches, coefs)
            return params, opt, step + steps, count + rounds, finish(outs)

        return program


def pmap_program(local_fn, devices):
    """``jax.pmap`` of ``local_fn(params, opt, step, key, batches, coefs)`` with params, opt and
    batches mapped and the rest broadcast.

    The arguments travel as one tuple: jax 0.10's pmap reads a tuple ``in_axes`` as *flat* when
    the number of leaves happens to equal the number of arguments (e.g. an optimizer state with no
    leaves, like plain SGD's, and one leaf elsewhere), which silently maps a scalar argument.
    """

    def packed(args):
        return local_fn(*args)

    mapped = jax.pmap(packed, axis_name=AXIS, in_axes=((0, 0, None, None, 0, None),),
                      out_axes=0, devices=devices)
    return lambda *args: mapped(args)


def _identity(x):
    return x


def _pmap_put(blocks, devices):
    """Put (D, …) host blocks one per device, as pmap's output would be (an identity pmap)."""
    return jax.pmap(_identity, devices=devices)(blocks)


class ShardMap(Backend):
    """``jax.shard_map`` over a 1-D mesh ``("workers",)``; also across processes."""

    name = "shard_map"

    def __init__(self, m: int, v: int, devices=None, mesh=None):
        if mesh is None:
            devices = list(devices) if devices is not None else jax.devices()
            mesh = jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                                 axis_types=(jax.sharding.AxisType.Auto,))
        if AXIS not in mesh.axis_names:
            raise ValueError(f"the mesh needs an axis named {AXIS!r}, got axes {mesh.axis_names}")
        self.mesh = mesh
        self.num_devices = mesh.shape[AXIS]
        self.axis = AXIS
        self.sharded = NamedSharding(mesh, P(AXIS))
        self.batch_sharding = NamedSharding(mesh, P(None, AXIS))
        self.replicated = NamedSharding(mesh, P())
        super().__init__(m, v)

    def _global(self, host: np.ndarray, sharding):
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def place_params(self, columns):
        def one(c):
            blocks = self.to_blocks(np.asarray(c))
            return self._global(blocks.reshape((-1,) + blocks.shape[2:]), self.sharded)

        return jax.tree.map(one, columns)

    def place_workers(self, stacked):
        return jax.tree.map(lambda x: self._global(np.asarray(x), self.sharded), stacked)

    def place_batches(self, batches):
        def one(x):
            if isinstance(x, jax.Array) and x.sharding == self.batch_sharding:
                return x
            if isinstance(x, jax.Array) and jax.process_count() == 1:
                return jax.device_put(x, self.batch_sharding)
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

    def columns(self, params):
        if self.v == 0:
            if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
                return params
            return jax.jit(lambda p: p, out_shardings=self.replicated)(params)
        width = self.m_local + self.v

        def gather(x):  # the flat (D·(m/D + v), …) layout, back to the n columns
            return self.from_blocks(x.reshape((self.num_devices, width) + x.shape[1:]))

        return jax.jit(lambda p: jax.tree.map(gather, p), out_shardings=self.replicated)(params)

    def compile(self, local_fn, summarize, steps: int, rounds: int):
        mapped = self.shard_mapped(local_fn)
        replicated = self.replicated

        @jax.jit
        def main(params, opt, step, count, key, batches, coefs):
            params, opt, outs = mapped(params, opt, step, key, batches, coefs)
            return params, opt, step + steps, count + rounds, outs

        summary = jax.jit(summarize, out_shardings=replicated)

        def program(params, opt, step, count, key, batches, coefs):
            params, opt, step, count, outs = main(params, opt, step, count, key, batches, coefs)
            return params, opt, step, count, summary(outs)

        return program

    def shard_mapped(self, local_fn):
        """``local_fn`` under ``jax.shard_map``: params, optimizer state and batches split over the
        worker axis, everything else replicated. The mean loss is computed by a separate program
        so that the training step's own collectives are only the mixing's."""
        spec_out = {"losses": P(None, AXIS), "aux": P(None, AXIS), "consensus": P()}
        return jax.shard_map(
            local_fn, mesh=self.mesh,
            in_specs=(P(AXIS), P(AXIS), P(), P(), P(None, AXIS), P()),
            out_specs=(P(AXIS), P(AXIS), spec_out),
            check_vma=False,
        )


def make_backend(name, m: int, v: int, devices=None, mesh=None) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`) for m workers and v auxiliary columns.

    Raises:
        ValueError: for an unknown name, or when m is not a multiple of the device count.
    """
    if isinstance(name, Backend):
        if (name.m, name.v) != (m, v):
            raise ValueError(
                f"backend {name.name!r} was built for m = {name.m}, v = {name.v}, but the algorithm "
                f"has m = {m}, v = {v}"
            )
        return name
    if name == "simulate":
        return Simulate(m, v)
    if name == "pmap":
        return Pmap(m, v, devices=devices)
    if name == "shard_map":
        return ShardMap(m, v, devices=devices, mesh=mesh)
    raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")

