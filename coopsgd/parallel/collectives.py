"""The worker axis as a round sees it: this device's workers, and collectives over all m of them.

Every per-worker computation and every mixer is written once against :class:`WorkerAxis`. On the
simulate backend all workers are local and the collectives are plain array operations; under
``pmap`` / ``shard_map`` the named mesh axis ``"workers"`` carries them (``psum``, ``ppermute``,
``all_gather``). Device ``d`` holds the workers ``d·m/D … (d+1)·m/D − 1``.

Example (inside a mixer's ``apply``)::

    mean = jax.tree.map(axis.mean, columns)           # (1/m) Σ_i x_i, on every backend
    left = jax.tree.map(lambda x: axis.shift(x, 1), columns)   # worker j receives x_{j+1}
"""

from __future__ import annotations

from functools import lru_cache, reduce

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["AXIS", "WorkerAxis", "exchange_tables", "leading_sum"]

AXIS = "workers"
"""Name of the worker axis inside pmap / shard_map programs."""


UNROLL = 16
"""Up to this many rows, :func:`leading_sum` adds the rows one by one (one fused pass)."""


def leading_sum(x, keepdims: bool = False):
    """``Σ_i x[i]`` over the leading axis, in the fastest form XLA:CPU offers for the shape.

    ``jnp.sum(x, 0)`` over a short leading axis with long rows is a column reduction that XLA:CPU
    runs 30–80× slower than the same sum as a matvec (8 × 1 M float32: 139 ms against 2.0 ms;
    ``docs/benchmarks.md``, Overhead). Measured on a 2-core CPU, the fastest forms are: up to
    :data:`UNROLL` rows, the rows added one by one (8 × 1 M: 1.6 ms; one elementwise pass, which
    fuses with what consumes the sum); longer rows (≥ 4,096 entries), ``1ᵀX`` as a matvec; many
    short rows (m ≥ 1,024 workers of d = 1,000), pairwise halving (65,536 × 1,000: 14.8 ms
    against 19.6 ms for ``jnp.sum`` and 32.6 ms for the matvec). Non-floating leaves use
    ``jnp.sum``. Equal to ``jnp.sum(x, 0)`` to float32 rounding (``tests/test_engine.py``).
    """
    x = jnp.asarray(x)
    n = x.shape[0]
    if not jnp.issubdtype(x.dtype, jnp.floating) or n == 0:
        out = jnp.sum(x, axis=0)
    elif n <= UNROLL:
        out = reduce(lambda a, b: a + b, [x[i] for i in range(n)])
    elif x.size // n >= 4096:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        flat = x.reshape(n, -1)
        out = jnp.dot(jnp.ones((n,), flat.dtype), flat, preferred_element_type=acc)
        out = out.astype(x.dtype).reshape(x.shape[1:])
    else:
        rest = None
        while x.shape[0] > 1:
            h = x.shape[0] // 2
            if x.shape[0] % 2:
                rest = x[-1] if rest is None else rest + x[-1]
            x = x[:h] + x[h: 2 * h]
        out = x[0] if rest is None else x[0] + rest
    return out[None] if keepdims else out


@lru_cache(maxsize=256)
def exchange_tables(perm: tuple, num_devices: int, m_local: int):
    """How to build the shifted copy ``y[j] = x[π(j)]`` when device ``d`` holds workers
    ``d·m_local … (d+1)·m_local − 1``.

    Returns a list of ``(delta, send, recv)``: for each device offset ``delta`` that carries data,
    device ``e`` sends its local rows ``send[e]`` to device ``(e − delta) mod D``, which writes them
    to its local rows ``recv[d]`` (padding rows point at the dummy row ``m_local``). ``delta = 0``
    is a local gather; every other delta is one ``ppermute``.
    """
    d_count, ml = num_devices, m_local
    perm = np.asarray(perm, dtype=np.int64).reshape(d_count, ml)
    owner, row = np.divmod(perm, ml)  # the device and local row of each source
    deltas = (owner - np.arange(d_count)[:, None]) % d_count
    out = []
    for delta in range(d_count):
        hit = deltas == delta
        k = int(hit.sum(axis=1).max())
        if k == 0:
            continue
        send = np.zeros((d_count, k), dtype=np.int32)
        recv = np.full((d_count, k), ml, dtype=np.int32)
        for d in range(d_count):
            local = np.flatnonzero(hit[d])
            e = (d + delta) % d_count
            send[e, : len(local)] = row[d, local]
            recv[d, : len(local)] = local
        out.append((delta, send, recv))
    return out


def _rows(table: np.ndarray, device):
    """Row ``device`` of a per-device index table: static when every device uses the same row."""
    if np.all(table == table[0]):
        return table[0]
    return jnp.asarray(table)[device]


class WorkerAxis:
    """The m workers, of which this device holds ``size = m / devices``.

    Args:
        m: the number of workers.
        name: the mapped axis name (``"workers"`` under pmap / shard_map), or None when every
            worker is local (the simulate backend, a user's own vmap).
        devices: D, the size of the named axis.
    """

    def __init__(self, m: int, name: str | None = None, devices: int = 1):
        self.m, self.name, self.devices = int(m), name, int(devices)
        self.size = self.m // self.devices

    @property
    def index(self):
        """This device's index along the axis (0 when simulating; traced under pmap / shard_map)."""
        return 0 if self.name is None else lax.axis_index(self.name)

    def ids(self):
        """Global indices of this device's workers, shape (size,)."""
        return self.index * self.size + jnp.arange(self.size)

    def local(self, values, axis: int = 0):
        """This device's slice of a per-worker array whose ``axis`` has length m."""
        values = jnp.asarray(values)
        if self.name is None:
            return values
        return lax.dynamic_slice_in_dim(values, self.index * self.size, self.size, axis=axis)

    def psum(self, x):
        """Sum of a per-device value over the devices (identity when simulating)."""
        return x if self.name is None else lax.psum(x, self.name)

    def sum(self, x, keepdims: bool = False):
        """``Σ_i x_i`` over all m workers of a leaf with leading (local) worker axis."""
        return self.psum(leading_sum(x, keepdims))

    def mean(self, x, keepdims: bool = False):
        """``(1/m) Σ_i x_i`` over all m workers."""
        return self.sum(x, keepdims) / self.m

    def gather(self, x):
        """Every worker's value, leading axis m (an all-gather on devices)."""
        return x if self.name is None else lax.all_gather(x, self.name, tiled=True)

    def permute(self, x, perm: tuple):
        """``y[j] = x[perm[j]]`` for a static source map of the m workers (not necessarily a
        permutation: one ``ppermute`` per device offset that carries data)."""
        if self.name is None:
            return x[np.asarray(perm)]
        tables = exchange_tables(tuple(int(p) for p in perm), self.devices, self.size)
        whole = np.arange(self.size)
        y = jnp.zeros((self.size + 1,) + x.shape[1:], x.dtype)
        device = self.index
        for delta, send, recv in tables:
            rows = _rows(send, device)
            # Every device sends all its rows in order: no gather (at 1 M parameters per worker the
            # copies cost a ring mixing on 8 CPU devices 15 %).
            buf = x if isinstance(rows, np.ndarray) and np.array_equal(rows, whole) else x[rows]
            if delta:
                buf = lax.ppermute(buf, self.name, [(e, (e - delta) % self.devices)
                                                    for e in range(self.devices)])
            into = _rows(recv, device)
            if len(tables) == 1 and isinstance(into, np.ndarray) and np.array_equal(into, whole):
                return buf  # … and every row is received in order: no scatter either
            y = y.at[into].set(buf)
        return y[: self.size]

    def shift(self, x, offset: int):
        """``y[j] = x[(j + offset) mod m]``: a circulant shift (``jnp.roll`` when simulating)."""
        if self.name is None:
            return jnp.roll(x, -offset, axis=0)
        return self.permute(x, tuple((j + offset) % self.m for j in range(self.m)))

    def __repr__(self) -> str:
        return f"WorkerAxis(m={self.m}, name={self.name!r}, devices={self.devices})"
