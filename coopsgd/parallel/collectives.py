"""The worker axis as a round sees it: this device's workers, and collectives over all m of them.

Every per-worker computation and every mixer is written once against :class:`WorkerAxis`. On the
simulate backend all workers are local and the collectives are plain array operations; under
``pmap`` / ``shard_map`` the named mesh axis ``"workers"`` carries them (``psum``, ``ppermute``,
``all_gather``). Device ``d`` holds the workers ``d·m/D … (d+1)·m/D − 1``.

Sums within contiguous groups of workers (:meth:`WorkerAxis.group_sum`) use ``lax.psum`` with
``axis_index_groups`` when a group is a run of whole devices: in JAX 0.10 it compiles to one
all-reduce with ``replica_groups`` under ``jax.pmap`` and under ``jax.shard_map`` with
``check_vma=False`` (what the backends use; with ``check_vma=True`` shard_map raises
NotImplementedError for it).

Example (inside a mixer's ``apply``)::

    mean = jax.tree.map(axis.mean, columns)           # (1/m) Σ_i x_i, on every backend
    left = jax.tree.map(lambda x: axis.shift(x, 1), columns)   # worker j receives x_{j+1}
"""

from __future__ import annotations

from functools import lru_cache, reduce

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["AXIS", "WorkerAxis", "block_sum", "exchange_tables", "leading_sum"]

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


def block_sum(x, g: int):
    """``y[j] = Σ_{i : i // g = j // g} x[i]``: the sum over each contiguous block of ``g`` rows of
    the leading axis (whose length g divides), broadcast back to every row of the block.

    The sum is written as elementwise adds in a fixed order — up to :data:`UNROLL` rows per block
    the rows one by one, beyond that pairwise halving — so it is the same bit for bit in every
    compiled program that contains it (a run resumed mid-round equals an uninterrupted one);
    ``jnp.sum`` over the block axis is not (its reduction is split differently from one program
    to another: a 1-ulp difference broke that equality). Measured on a 2-core CPU (float32), the
    adds are also fast where blocks are few and rows long (8 × 1 M in blocks of 4: 31 ms against
    161 ms for ``jnp.sum``; 16 × 262 k in pairs: 2.8 ms against 4.6 ms); for many short rows
    ``jnp.sum`` is faster (1,024 × 1,000 in blocks of 32: 2.9 ms halving against 0.8 ms).

    Example:
        >>> import jax.numpy as jnp
        >>> block_sum(jnp.array([1.0, 2.0, 3.0, 4.0]), 2).tolist()
        [3.0, 3.0, 7.0, 7.0]
    """
    x = jnp.asarray(x)
    g = int(g)
    n = x.shape[0]
    if g == 1:
        return x
    if g < 1 or n % g:
        raise ValueError(f"block size g = {g} must divide the leading axis length {n}")
    blocks = x.reshape((n // g, g) + x.shape[1:])
    if g <= UNROLL:
        total = reduce(lambda a, b: a + b, [blocks[:, i: i + 1] for i in range(g)])
    else:
        total, rest = blocks, None
        while total.shape[1] > 1:
            h = total.shape[1] // 2
            if total.shape[1] % 2:
                rest = total[:, -1:] if rest is None else rest + total[:, -1:]
            total = total[:, :h] + total[:, h: 2 * h]
        total = total if rest is None else total + rest
    return jnp.broadcast_to(total, blocks.shape).reshape(x.shape)


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

    def group_sum(self, x, g: int):
        """``Σ_i x_i`` over each worker's group, the m workers split into contiguous groups of
        ``g`` (g divides m): for every local worker j the sum over workers
        ``(j // g)·g … (j // g)·g + g − 1``, same shape as ``x``.

        A group inside one device (simulating, or g dividing m/D) is a local reshape-sum
        (:func:`block_sum`): nothing is sent. A group of whole devices (m/D dividing g) is the
        device's partial sum, then one ``psum`` over that group's devices (``axis_index_groups``:
        one all-reduce of the device's model-sized buffer among g·D/m devices). Otherwise
        (groups that split a device's workers unevenly) the g − 1 rotations within each group
        are exchanged (:meth:`permute`).
        """
        g = int(g)
        if g == 1:
            return x
        if self.name is None or self.size % g == 0:
            return block_sum(x, g)
        if g % self.size == 0:
            k = g // self.size  # devices per group
            part = leading_sum(x, keepdims=True)
            if k == self.devices:
                total = lax.psum(part, self.name)
            else:
                groups = [list(range(b * k, (b + 1) * k)) for b in range(self.devices // k)]
                total = lax.psum(part, self.name, axis_index_groups=groups)
            return jnp.broadcast_to(total, x.shape)
        out = x
        for o in range(1, g):
            out = out + self.permute(x, tuple(j - j % g + (j % g + o) % g for j in range(self.m)))
        return out

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
