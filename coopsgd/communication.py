"""How one mixing ``X ← X W`` moves data: the plan chosen from W's structure, and its cost.

Columns are stored first (a stacked pytree with leading axis ``n = m + v``), so one mixing is
``new[j] = Σ_i W[i, j] · old[i]`` (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3;
``docs/engine.md``). W is split into four blocks — workers → workers ``W_ww`` (m × m), workers →
auxiliary ``W_wa`` (m × v), auxiliary → workers ``W_aw`` (v × m), auxiliary → auxiliary ``W_aa`` —
and the worker block picks the communication (design.md, "The structure of W picks the
communication"):

============ ================================================== ==============================
kind         W_ww                                               on devices
============ ================================================== ==============================
``none``     W = I (nothing moves)                              nothing
``diag``     diagonal                                           nothing (local scaling)
``mean``     ``diag(d) + c·11ᵀ`` (J_m is ``d = 0, c = 1/m``)    one ``psum`` (all-reduce)
``neighbour`` sparse: ``diag(d) + Σ_s diag(c_s) P_s``           one ``ppermute`` per slot
``dense``    anything else                                      ``all_gather`` + contraction
============ ================================================== ==============================

A non-zero ``W_wa`` (EASGD's anchor, Overlap Local-SGD's anchor) adds one weighted all-reduce;
auxiliary columns are replicated on every device, so ``W_aw`` and ``W_aa`` are local.

A *slot* is a permutation ``π_s`` of the workers with a coefficient per destination:
``new[j] += c_s[j] · old[π_s(j)]``. Slots are circulant shifts when W is circulant on the workers
(a ring: shifts ±1, i.e. ``jnp.roll``), otherwise the partial permutations of an edge colouring
of the directed support (Δ of them, Δ the largest degree; König's theorem), whichever needs fewer. Coefficients are *arguments* of the
compiled program, so a time-varying W over a fixed support (a random schedule) reuses one program.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from coopsgd import topology as _topology

__all__ = [
    "MixPlan",
    "Communication",
    "KINDS",
    "plan_for_matrix",
    "plan_for_support",
    "active_slots",
    "coefficients",
    "communication",
    "tree_bytes",
    "mix",
]

KINDS = ("none", "diag", "mean", "neighbour", "dense")
"""Worker-block kinds, cheapest first."""

_TOL = 1e-12


class MixPlan(NamedTuple):
    """The static structure of one mixing (what the compiled program does).

    Attributes:
        m, v: workers and auxiliary columns.
        kind: one of :data:`KINDS` for the worker block (``"none"`` means all of W is I).
        slots: for ``"neighbour"``, a tuple of permutations (tuples of length m; ``π_s(j)`` is the
            worker whose model lands on worker ``j`` in slot ``s``); empty otherwise.
        shifts: for each slot, the circulant offset ``o`` (``π_s(j) = (j + o) mod m``) or None.
        worker_to_aux: whether ``W_wa ≠ 0`` (auxiliary columns gather from workers: all-reduce).
        aux_to_worker: whether ``W_aw ≠ 0`` (workers read the replicated auxiliary columns).
        self_weight: whether the worker block has a diagonal term to apply (False for an exact
            average J, where ``new = c · Σ_i x_i`` needs no ``d · x`` pass).
    """

    m: int
    v: int
    kind: str
    slots: tuple = ()
    shifts: tuple = ()
    worker_to_aux: bool = False
    aux_to_worker: bool = False
    self_weight: bool = True

    @property
    def communicates(self) -> bool:
        """Whether this mixing moves data between workers (any kind but none/diag without W_wa)."""
        return self.kind in ("mean", "neighbour", "dense") or self.worker_to_aux


class Communication(NamedTuple):
    """What one mixing sends, per worker, for a model of ``param_bytes`` bytes.

    Attributes:
        kind: ``"none"``, ``"all-reduce"``, ``"neighbour"`` or ``"dense"`` (all-gather).
        bytes_per_worker: bytes each worker sends in one mixing (ring all-reduce: ``2(m−1)/m · P``
            per reduced vector; neighbour exchange: ``P`` per neighbour slot it takes part in;
            dense: ``(m − 1) · P``, an all-gather).
        messages: point-to-point messages per worker (all-reduce counted as ``2(m − 1)`` ring
            steps per reduced vector).
        all_reduces: number of all-reduced model-sized vectors.
        neighbour_slots: number of shifted copies (ppermutes) per mixing.
    """

    kind: str
    bytes_per_worker: float
    messages: int
    all_reduces: int
    neighbour_slots: int


# ----------------------------------------------------------------------------------- planning


def _blocks(w: np.ndarray, m: int):
    return w[:m, :m], w[:m, m:], w[m:, :m], w[m:, m:]


def _shift_slots(offdiag: np.ndarray):
    """Circulant offsets covering the off-diagonal support (``new[j] ← old[(j + o) mod m]``)."""
    m = len(offdiag)
    src, dst = np.nonzero(offdiag)
    return sorted({int((i - j) % m) for i, j in zip(src, dst)})


def _permutation_slots(offdiag: np.ndarray):
    """Split the arcs ``i → j`` (``W[i, j] ≠ 0``, i ≠ j) into Δ partial permutations, Δ the largest
    in- or out-degree, by edge-colouring the bipartite graph destinations × sources (König's
    theorem, :func:`coopsgd.topology.bipartite_edge_colouring`). A d-regular graph needs d slots."""
    m = len(offdiag)
    src, dst = np.nonzero(offdiag)
    arcs = sorted(zip(dst.tolist(), src.tolist()))  # (destination j, source i)
    colours = _topology.bipartite_edge_colouring(arcs)
    slots = [list(range(m)) for _ in range(max(colours, default=-1) + 1)]
    for (j, i), c in zip(arcs, colours):
        slots[c][j] = i
    return tuple(tuple(slot) for slot in slots)


def _slots_from_support(offdiag: np.ndarray):
    """(slots, shifts) with the fewest slots: circulant shifts (a ``roll`` each) when they are
    no more than the permutations of a bipartite edge colouring."""
    m = len(offdiag)
    offsets = _shift_slots(offdiag)
    perms = _permutation_slots(offdiag)
    if offsets and len(offsets) <= len(perms):
        slots = tuple(tuple(int((j + o) % m) for j in range(m)) for o in offsets)
        return slots, tuple(offsets)
    return perms, (None,) * len(perms)


def _plan(support: np.ndarray, m: int, v: int, values: np.ndarray | None) -> MixPlan:
    n = m + v
    if support.shape != (n, n):
        raise ValueError(f"W is {support.shape[0]} x {support.shape[1]} but m + v = {m} + {v} = {n}")
    s_ww, s_wa, s_aw, _ = _blocks(support, m)
    to_aux, from_aux = bool(s_wa.any()), bool(s_aw.any())
    offdiag = s_ww & ~np.eye(m, dtype=bool)
    if values is not None and np.allclose(values, np.eye(n), atol=_TOL, rtol=0):
        return MixPlan(m, v, "none")
    if not offdiag.any():
        return MixPlan(m, v, "diag", worker_to_aux=to_aux, aux_to_worker=from_aux)
    if values is not None and m > 1:
        off_vals = values[:m, :m][~np.eye(m, dtype=bool)]
        if np.all(np.abs(off_vals - off_vals[0]) <= _TOL) and abs(off_vals[0]) > _TOL:
            self_weight = bool(np.any(np.abs(np.diag(values[:m, :m]) - off_vals[0]) > _TOL))
            return MixPlan(m, v, "mean", worker_to_aux=to_aux, aux_to_worker=from_aux,
                           self_weight=self_weight)
    slots, shifts = _slots_from_support(offdiag)
    if len(slots) < m - 1:
        return MixPlan(m, v, "neighbour", slots, shifts, to_aux, from_aux)
    return MixPlan(m, v, "dense", worker_to_aux=to_aux, aux_to_worker=from_aux)


def plan_for_matrix(w, m: int, v: int = 0) -> MixPlan:
    """The cheapest plan that applies this exact W (its values decide ``none`` and ``mean``).

    Example:
        >>> import numpy as np
        >>> plan_for_matrix(np.full((4, 4), 0.25), 4).kind
        'mean'
        >>> plan_for_matrix(np.eye(4), 4).kind
        'none'
    """
    w = np.asarray(w, dtype=np.float64)
    return _plan(np.abs(w) > _TOL, m, v, w)


def plan_for_support(support, m: int, v: int = 0, matchings=None) -> MixPlan:
    """A plan that applies *any* W whose non-zeros lie in ``support`` (for random schedules,
    whose W changes every round: the values arrive as coefficients at run time).

    ``matchings`` (lists of worker pairs ``(a, b)``, disjoint within each list, e.g. MATCHA's
    decomposition) become the slots when they cover the support's worker edges and are fewer than
    m − 1: then a slot is inactive exactly when its matching is (see :func:`active_slots`).
    """
    support = np.asarray(support, dtype=bool) | np.eye(m + v, dtype=bool)
    plan = _plan(support, m, v, None)
    if matchings is None or plan.kind != "neighbour":
        return plan
    slots, covered = [], np.eye(m, dtype=bool)
    for edges in matchings:
        perm = list(range(m))
        for a, b in edges:
            a, b = int(a), int(b)
            if (not (0 <= a < m and 0 <= b < m) or a == b or perm[a] != a or perm[b] != b
                    or covered[a, b]):
                return plan  # not disjoint matchings on the workers: ignore the hint
            perm[a], perm[b] = b, a
            covered[a, b] = covered[b, a] = True
        slots.append(tuple(perm))
    if np.any(support[:m, :m] & ~covered) or not slots or len(slots) >= m - 1:
        return plan
    return plan._replace(slots=tuple(slots), shifts=(None,) * len(slots))


def active_slots(plan: MixPlan, w) -> MixPlan:
    """``plan`` keeping only the neighbour slots that carry a non-zero weight in ``w`` (a random
    schedule's active matchings); ``diag`` when none does."""
    if plan.kind != "neighbour":
        return plan
    _, wa, aw, _ = _blocks(np.asarray(w, dtype=np.float64), plan.m)
    plan = plan._replace(worker_to_aux=bool(np.any(np.abs(wa) > _TOL)),
                         aux_to_worker=bool(np.any(np.abs(aw) > _TOL)))
    coef = coefficients(plan, w)["slots"]
    keep = [s for s in range(len(plan.slots)) if np.any(np.abs(coef[s]) > _TOL)]
    if not keep:
        return plan._replace(kind="diag", slots=(), shifts=())
    return plan._replace(slots=tuple(plan.slots[s] for s in keep),
                         shifts=tuple(plan.shifts[s] for s in keep))


def coefficients(plan: MixPlan, w) -> dict[str, np.ndarray]:
    """The run-time arguments of ``plan`` for the matrix ``w`` (float64 NumPy arrays).

    Keys: ``d`` (m,) diagonal of W_ww (minus ``c`` for ``mean``), ``c`` () the constant
    off-diagonal for ``mean``, ``slots`` (S, m) with ``slots[s, j] = W[π_s(j), j]``, ``dense`` (m, m)
    = W_ww, ``wa`` (m, v), ``aw`` (v, m), ``aa`` (v, v).

    Raises:
        ValueError: if ``w`` has a non-zero outside what the plan can apply.
    """
    w = np.asarray(w, dtype=np.float64)
    m, v = plan.m, plan.v
    if w.shape != (m + v, m + v):
        raise ValueError(f"W must be {m + v} x {m + v} for this plan, got shape {w.shape}")
    ww, wa, aw, aa = _blocks(w, m)
    out: dict[str, np.ndarray] = {}
    covered = np.eye(m, dtype=bool)
    if plan.kind == "none":
        if not np.allclose(w, np.eye(m + v), atol=_TOL, rtol=0):
            raise ValueError("this mixing was planned as the identity but W is not I")
        return out
    diag = np.diag(ww).copy()
    if plan.kind == "mean":
        c = ww[0, 1]
        out["c"] = np.asarray(c)
        out["d"] = diag - c
        covered = np.ones((m, m), dtype=bool)
    elif plan.kind == "dense":
        out["dense"] = ww.copy()
        covered = np.ones((m, m), dtype=bool)
    else:
        out["d"] = diag
        if plan.kind == "neighbour":
            coef = np.zeros((len(plan.slots), m))
            for s, perm in enumerate(plan.slots):
                for j, i in enumerate(perm):
                    if i != j:
                        coef[s, j] = ww[i, j]
                        covered[i, j] = True
            out["slots"] = coef
    if plan.kind != "mean":
        outside = (np.abs(ww) > _TOL) & ~covered
        if outside.any():
            i, j = (int(k) for k in np.argwhere(outside)[0])
            raise ValueError(
                f"W[{i}, {j}] = {ww[i, j]:.6g} lies outside the support this mixing was planned for"
            )
    elif not np.allclose(ww - np.diag(np.diag(ww)), out["c"] * (1 - np.eye(m)), atol=_TOL, rtol=0):
        raise ValueError("this mixing was planned as a mean but W_ww's off-diagonal is not constant")
    if v:
        for name, block, flag in (("wa", wa, plan.worker_to_aux), ("aw", aw, plan.aux_to_worker)):
            if not flag and np.any(np.abs(block) > _TOL):
                raise ValueError(f"W's {name} block is non-zero but was planned as zero")
            if flag:
                out[name] = block.copy()
        out["aa"] = aa.copy()
    return out


def communication(plan: MixPlan, param_bytes: float, w=None) -> Communication:
    """What one mixing under ``plan`` sends per worker for a model of ``param_bytes`` bytes.

    With ``w`` given, neighbour slots whose coefficients are all zero in ``w`` are not counted
    (a random schedule's inactive matchings). Counts follow the usual ring all-reduce model:
    ``2(m − 1)/m · P`` bytes and ``2(m − 1)`` messages per worker per reduced vector.

    Example:
        >>> import numpy as np
        >>> c = communication(plan_for_matrix(np.full((4, 4), 0.25), 4), 1000)
        >>> c.kind, c.bytes_per_worker, c.all_reduces
        ('all-reduce', 1500.0, 1)
    """
    m, p = plan.m, float(param_bytes)
    reduces = int(plan.kind == "mean") + (plan.v if plan.worker_to_aux else 0)
    if m == 1:
        reduces = 0
    ring = 2.0 * (m - 1) / m * p if m > 1 else 0.0
    if plan.kind == "none" or (plan.kind == "diag" and not reduces):
        return Communication("none", 0.0, 0, 0, 0)
    if plan.kind == "dense":
        return Communication("dense", (m - 1) * p + reduces * ring, (m - 1) + reduces * 2 * (m - 1),
                             reduces, 0)
    if plan.kind == "neighbour":
        active = len(plan.slots)
        if w is not None:
            coef = coefficients(plan, w)["slots"]
            active = int(np.sum(np.any(np.abs(coef) > _TOL, axis=1)))
        return Communication("neighbour", active * p + reduces * ring,
                             active + reduces * 2 * (m - 1), reduces, active)
    return Communication("all-reduce", reduces * ring, reduces * 2 * (m - 1), reduces, 0)


def tree_bytes(params) -> int:
    """Bytes of one model (one column): Σ over leaves of size × itemsize — the ``param_bytes`` of
    :func:`communication`."""
    import jax

    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------- the kernel


def mix(stacked, w):
    """One mixing of stacked columns: ``new[j] = Σ_i W[i, j] · old[i]`` for every leaf.

    This is the reference kernel (a dense contraction, jittable); the trainer applies the same
    map with the communication its plan picks.

    Args:
        stacked: a pytree whose leaves have leading axis ``n``.
        w: an ``n × n`` matrix (NumPy or JAX).

    Returns:
        The mixed pytree, same structure, shapes and dtypes.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> mix(jnp.array([[0.0], [2.0]]), np.full((2, 2), 0.5)).tolist()
        [[1.0], [1.0]]

    References:
        Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3: X_{k+1} = (X_k − ηG_k) W_k.
    """
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(w)
    n = w.shape[0]
    if w.ndim != 2 or w.shape != (n, n):
        raise ValueError(f"W must be a square matrix, got shape {tuple(w.shape)}")

    def one(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] != n:
            raise ValueError(f"every leaf needs leading axis n = {n}, got shape {tuple(x.shape)}")
        out = jnp.tensordot(w.astype(x.dtype).T, x, axes=1)
        return out.astype(x.dtype)

    return jax.tree.map(one, stacked)


# ------------------------------------------------------------------- the per-device mixing


def exchange_tables(perm, num_devices: int, m_local: int):
    """How to build the shifted copy ``y[j] = x[π(j)]`` when device ``d`` holds workers
    ``d·m_local … (d+1)·m_local − 1``.

    Returns a list of ``(delta, send, recv)``: for each device offset ``delta`` that carries data,
    device ``e`` sends its local rows ``send[e]`` to device ``(e − delta) mod D``, which writes them
    to its local rows ``recv[d]`` (padding rows point at the dummy row ``m_local``). ``delta = 0``
    is a local gather; every other delta is one ``ppermute``.
    """
    d_count, ml = num_devices, m_local
    out = []
    for delta in range(d_count):
        pairs = [[] for _ in range(d_count)]
        for d in range(d_count):
            for local in range(ml):
                e, src = divmod(int(perm[d * ml + local]), ml)
                if (e - d) % d_count == delta:
                    pairs[d].append((local, src))
        k = max(len(p) for p in pairs)
        if k == 0:
            continue
        send = np.zeros((d_count, k), dtype=np.int32)
        recv = np.full((d_count, k), ml, dtype=np.int32)
        for d in range(d_count):
            e = (d + delta) % d_count
            for i, (local, src) in enumerate(pairs[d]):
                send[e, i], recv[d, i] = src, local
        out.append((delta, send, recv))
    return out


def _rows(table: np.ndarray, device):
    """Row ``device`` of a per-device index table: static when every device uses the same row."""
    import jax.numpy as jnp

    if np.all(table == table[0]):
        return table[0]
    return jnp.asarray(table)[device]


def _local_slice(x, device, m_local: int, axis: int = 0):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if isinstance(device, int):
        return jax.lax.slice_in_dim(x, device * m_local, (device + 1) * m_local, axis=axis)
    return jax.lax.dynamic_slice_in_dim(x, device * m_local, m_local, axis=axis)


def _bcast(coef, x):
    """Coefficient vector (k,) against a stacked leaf (k, …)."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def mix_local(plan: MixPlan, workers, aux, coef, axis=None, num_devices: int = 1, device=0):
    """Apply one planned mixing to this device's columns.

    Args:
        plan: the :class:`MixPlan`.
        workers: pytree of this device's worker columns, leaves (m/D, …).
        aux: pytree of the (replicated) auxiliary columns, leaves (v, …).
        coef: the plan's coefficients (:func:`coefficients`) as arrays.
        axis: the named worker axis (pmap / shard_map) or None when all workers are here.
        num_devices: D, the size of ``axis``.
        device: this device's index along ``axis`` (``lax.axis_index``), 0 when simulating.

    Returns:
        ``(workers, aux)`` after ``new[j] = Σ_i W[i, j] old[i]`` (Wang & Joshi, Cooperative SGD,
        arXiv:1808.07576, §3).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    if plan.kind == "none":
        return workers, aux
    leaves, treedef = jax.tree.flatten(workers)
    if axis is not None and len(leaves) > 1 and len({x.dtype for x in leaves}) == 1:
        # On devices, exchange one buffer per worker (all leaves concatenated), not one per leaf:
        # one ppermute per slot, one all-reduce per reduction.
        sizes = [int(np.prod(x.shape[1:])) for x in leaves]
        flat_w = jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
        aux_leaves = jax.tree.leaves(aux)
        flat_a = (jnp.concatenate([z.reshape(z.shape[0], -1) for z in aux_leaves], axis=1)
                  if plan.v else jnp.zeros((0, flat_w.shape[1]), flat_w.dtype))
        new_w, new_a = mix_local(plan, flat_w, flat_a, coef, axis, num_devices, device)
        cuts = np.cumsum(sizes)[:-1].tolist()
        out_w = [p.reshape(x.shape) for p, x in zip(jnp.split(new_w, cuts, axis=1), leaves)]
        out_a = aux
        if plan.v:
            out_a = jax.tree.unflatten(jax.tree.structure(aux), [
                p.reshape(z.shape) for p, z in zip(jnp.split(new_a, cuts, axis=1), aux_leaves)])
        return jax.tree.unflatten(treedef, out_w), out_a
    m, v = plan.m, plan.v
    ml = m // num_devices

    def psum(x):
        return x if axis is None else lax.psum(x, axis)

    tables = None
    if plan.kind == "neighbour" and num_devices > 1:
        tables = [exchange_tables(p, num_devices, ml) for p in plan.slots]

    def shifted(x, s):
        if num_devices == 1:
            shift = plan.shifts[s]
            if shift is not None:
                return jnp.roll(x, -shift, axis=0)
            return x[np.asarray(plan.slots[s])]
        y = jnp.zeros((ml + 1,) + x.shape[1:], x.dtype)
        for delta, send, recv in tables[s]:
            buf = x[_rows(send, device)]
            if delta:
                buf = lax.ppermute(buf, axis, [(e, (e - delta) % num_devices)
                                               for e in range(num_devices)])
            y = y.at[_rows(recv, device)].set(buf)
        return y[:ml]

    def mix_workers(x):
        if plan.kind == "dense":
            full = x if axis is None else lax.all_gather(x, axis, tiled=True)
            cols = _local_slice(coef["dense"], device, ml, axis=1)
            return jnp.tensordot(cols.T.astype(x.dtype), full, axes=1)
        if plan.kind == "mean":
            total = coef["c"].astype(x.dtype) * psum(jnp.sum(x, axis=0, keepdims=True))
            if not plan.self_weight:  # exact averaging: every worker takes c · Σ_i x_i
                return jnp.broadcast_to(total, x.shape)
            return _bcast(_local_slice(coef["d"], device, ml), x) * x + total
        out = _bcast(_local_slice(coef["d"], device, ml), x) * x
        if plan.kind == "neighbour":
            slot_coef = _local_slice(coef["slots"], device, ml, axis=1)
            for s in range(len(plan.slots)):
                out = out + _bcast(slot_coef[s], x) * shifted(x, s)
        return out

    new_workers = jax.tree.map(mix_workers, workers)
    if v:
        if plan.aux_to_worker:
            aw = _local_slice(coef["aw"], device, ml, axis=1)  # (v, m/D)
            new_workers = jax.tree.map(
                lambda nw, z: nw + jnp.tensordot(aw.T.astype(z.dtype), z, axes=1), new_workers, aux)

        def mix_aux(x, z):
            out = jnp.tensordot(coef["aa"].T.astype(z.dtype), z, axes=1)
            if plan.worker_to_aux:
                wa = _local_slice(coef["wa"], device, ml, axis=0)  # (m/D, v)
                out = out + psum(jnp.tensordot(wa.T.astype(x.dtype), x, axes=1))
            return out

        aux = jax.tree.map(mix_aux, workers, aux)
    return new_workers, aux
