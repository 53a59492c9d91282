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

from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["AXIS", "WorkerAxis", "exchange_tables"]

AXIS = "workers"
"""Name of the worker axis inside pmap / shard_map programs."""


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
        return self.psum(jnp.sum(x, axis=0, keepdims=keepdims))

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
        y = jnp.zeros((self.size + 1,) + x.shape[1:], x.dtype)
        device = self.index
        for delta, send, recv in exchange_tables(tuple(int(p) for p in perm), self.devices, self.size):
            buf = x[_rows(send, device)]
            if delta:
                buf = lax.ppermute(buf, self.name, [(e, (e - delta) % self.devices)
                                                    for e in range(self.devices)])
            y = y.at[_rows(recv, device)].set(buf)
        return y[: self.size]

    def shift(self, x, offset: int):
        """``y[j] = x[(j + offset) mod m]``: a circulant shift (``jnp.roll`` when simulating)."""
        if self.name is None:
            return jnp.roll(x, -offset, axis=0)
        return self.permute(x, tuple((j + offset) % self.m for j in range(self.m)))

    def __repr__(self) -> str:
        return f"WorkerAxis(m={self.m}, name={self.name!r}, devices={self.devices})"
