"""How one linear mixing ``X ← X W`` moves data: the plan chosen from W's structure, its run-time
coefficients, and its cost — the one traffic account every layer reads.

W is split into four blocks — workers → workers ``W_ww`` (m × m), workers → auxiliary ``W_wa``
(m × v), auxiliary → workers ``W_aw`` (v × m), auxiliary → auxiliary ``W_aa`` — and the worker block
picks the communication (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3; design.md, "The
structure of W picks the communication"):

============= ================================================== ==============================
kind          W_ww                                               on devices
============= ================================================== ==============================
``none``      W = I (nothing moves)                              nothing
``diag``      diagonal                                           nothing (local scaling)
``mean``      ``diag(d) + c·11ᵀ`` (J_m is ``d = 0, c = 1/m``)    one ``psum`` (all-reduce)
``groups``    ``diag(d) + c·(I_{m/g} ⊗ 11ᵀ_g)``: a mean within   one ``psum`` per group
              each contiguous group of g workers (2 ≤ g < m)     (``axis_index_groups``);
                                                                 nothing inside one device
``neighbour`` sparse: ``diag(d) + Σ_s diag(c_s) P_s``            one ``ppermute`` per slot
``dense``     anything else                                      ``all_gather`` + contraction
============= ================================================== ==============================

``groups`` is hierarchical averaging's W (group means, torch's ``HierarchicalModelAverager``
subgroups): it is found in O(edges) — the off-diagonal has ``m(g − 1)`` arcs, all inside blocks of
g and of one value c — and costs a ring all-reduce within each group, ``2(g − 1)/g · S`` bytes per
worker, never more than the global all-reduce's ``2(m − 1)/m · S`` (planned as neighbour slots it
would be ``(g − 1) · S``).

A non-zero ``W_wa`` (EASGD's anchor, Overlap Local-SGD's anchor) adds one weighted all-reduce;
auxiliary columns are replicated on every device, so ``W_aw`` and ``W_aa`` are local.

A *slot* gives every worker one incoming model, with a coefficient per destination:
``new[j] += c_s[j] · old[π_s(j)]``. Slots are circulant shifts when W's support is circulant on
the workers (a ring: shifts ±1); otherwise slot s takes, for every worker j, the s-th of its
sources ordered by their offset ``(i − j) mod m`` — Δ_in slots, Δ_in the largest in-degree (as
many as any assignment of one incoming model per worker and slot needs), so that a torus in its
row-major numbering gets one slot per direction away from its seams. Whichever needs fewer slots
is used; both are found by sorting the arcs, O(edges · log edges), with no m × m array.
Coefficients are *arguments* of the compiled program, so a time-varying W over a fixed support (a
random schedule) reuses one program.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import numpy as np
import scipy.sparse as sp

from coopsgd.core.communication import Communication, ring_all_reduce_bytes
from coopsgd.core.operator import MixingMatrix, as_operator
from coopsgd.core.validate import require_number

__all__ = [
    "MixPlan",
    "PlanKind",
    "active_slots",
    "coefficients",
    "communication",
    "mixing_traffic",
    "plan_for_matrix",
    "plan_for_support",
    "tree_bytes",
]

PlanKind = Literal["none", "diag", "mean", "groups", "neighbour", "dense"]
"""How the worker block of one mixing is applied, cheapest first."""

_TOL = 1e-12


class MixPlan(NamedTuple):
    """The static structure of one mixing (what the compiled program does; hashable).

    Attributes:
        m, v: workers and auxiliary columns.
        kind: one of :data:`PlanKind` for the worker block (``"none"`` means all of W is I).
        shifts: for ``"neighbour"``, per slot the circulant offset ``o`` (``π_s(j) = (j + o) mod m``)
            or None for a slot given by its sources.
        sources: per slot the source map (a tuple of length m; ``π_s(j)`` is the worker whose model
            lands on worker ``j``, ``π_s(j) = j`` where slot s brings nothing) for source slots,
            None for shift slots. A source map need not be a permutation.
        worker_to_aux: whether ``W_wa ≠ 0`` (auxiliary columns gather from workers: all-reduce).
        aux_to_worker: whether ``W_aw ≠ 0`` (workers read the replicated auxiliary columns).
        self_weight: whether the worker block has a diagonal term to apply (False for an exact
            average J, where ``new = c · Σ_i x_i`` needs no ``d · x`` pass).
        group: for ``"groups"``, the group size g (workers ``b·g … b·g + g − 1`` form group b).
    """

    m: int
    v: int
    kind: PlanKind
    shifts: tuple = ()
    sources: tuple = ()
    worker_to_aux: bool = False
    aux_to_worker: bool = False
    self_weight: bool = True
    group: int = 0

    @property
    def communicates(self) -> bool:
        """Whether this mixing moves data between workers (any kind but none/diag without W_wa)."""
        return self.kind in ("mean", "groups", "neighbour", "dense") or self.worker_to_aux

    @property
    def slots(self) -> tuple[tuple[int, ...], ...]:
        """Every slot as its source map (shift slots spelled out; O(m) each)."""
        return tuple(src if src is not None else tuple((j + o) % self.m for j in range(self.m))
                     for o, src in zip(self.shifts, self.sources))

    def source_array(self, s: int) -> np.ndarray:
        """``π_s`` as an int array of length m."""
        if self.sources[s] is not None:
            return np.asarray(self.sources[s], dtype=np.int64)
        return (np.arange(self.m) + self.shifts[s]) % self.m


# ----------------------------------------------------------------------------------- planning


def _entry_rows(csr: sp.csr_array) -> np.ndarray:
    """The row of every stored entry of ``csr``, in storage order (int64)."""
    return np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))


def _arcs(off: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Sources i and destinations j of the arcs ``W[i, j] ≠ 0`` (i ≠ j)."""
    csr = off if isinstance(off, sp.csr_array) else sp.csr_array(off)
    keep = np.abs(csr.data) > _TOL
    return _entry_rows(csr)[keep], csr.indices[keep].astype(np.int64)


def _slots_from_support(src: np.ndarray, dst: np.ndarray, m: int) -> tuple[tuple, tuple]:
    """(shifts, sources) with the fewest slots: circulant shifts (a ``roll`` each) when there are no
    more offsets than Δ_in, the largest in-degree; otherwise Δ_in source slots, slot s bringing
    each worker the s-th of its sources ordered by offset (see the module docstring)."""
    offsets = (src - dst) % m
    unique = np.unique(offsets)
    indegree = np.bincount(dst, minlength=m)
    if len(unique) <= indegree.max():
        return tuple(int(o) for o in unique), (None,) * len(unique)
    order = np.lexsort((offsets, dst))  # by destination, then offset
    dst, src = dst[order], src[order]
    rank = np.arange(len(dst)) - np.concatenate([[0], np.cumsum(indegree)])[dst]
    maps = np.tile(np.arange(m), (int(indegree.max()), 1))
    maps[rank, dst] = src
    return (None,) * len(maps), tuple(tuple(int(i) for i in row) for row in maps)


def _constant_offdiagonal(w: MixingMatrix) -> float | None:
    """c when every off-diagonal entry of W_ww equals one non-zero c (within the tolerance)."""
    m = w.m
    if m < 2:
        return None
    if w.form == "mean":
        return w.c if abs(w.c) > _TOL else None
    off = w.worker_offdiagonal()
    if off.nnz != m * (m - 1):
        return None
    vals = off.data
    return float(vals[0]) if abs(vals[0]) > _TOL and np.all(np.abs(vals - vals[0]) <= _TOL) else None


def _groups(w: MixingMatrix) -> tuple[int, float] | None:
    """``(g, c)`` when ``W_ww = diag(d) + c·(I_{m/g} ⊗ 11ᵀ_g)`` off the diagonal with 2 ≤ g < m: every
    off-diagonal entry inside the contiguous blocks of g equal to one non-zero c, none outside.
    O(edges): the off-diagonal's arc count fixes g = arcs/m + 1."""
    m = w.m
    if w.form == "mean" or m < 4:
        return None
    coo = sp.coo_array(w.worker_offdiagonal())
    keep = np.abs(coo.data) > _TOL
    arcs = int(np.count_nonzero(keep))
    if not arcs or arcs % m:
        return None
    g = arcs // m + 1
    if g >= m or m % g:
        return None
    rows, cols, vals = coo.row[keep], coo.col[keep], coo.data[keep]
    if not np.all(rows // g == cols // g):  # m(g − 1) distinct arcs inside the blocks: all of them
        return None
    c = float(vals[0])
    return (g, c) if np.all(np.abs(vals - c) <= _TOL) else None


def _plan(w: MixingMatrix, values: bool) -> MixPlan:
    m, v = w.m, w.v
    to_aux, from_aux = bool(np.any(np.abs(w.wa) > _TOL)), bool(np.any(np.abs(w.aw) > _TOL))
    if values and w.is_identity(atol=_TOL):
        return MixPlan(m, v, "none")
    c = _constant_offdiagonal(w) if values else None
    if c is not None:
        self_weight = bool(np.any(np.abs(w.worker_diagonal() - c) > _TOL))
        return MixPlan(m, v, "mean", worker_to_aux=to_aux, aux_to_worker=from_aux, self_weight=self_weight)
    grouped = _groups(w) if values else None
    if grouped is not None:
        g, c = grouped
        self_weight = bool(np.any(np.abs(w.worker_diagonal() - c) > _TOL))
        return MixPlan(m, v, "groups", worker_to_aux=to_aux, aux_to_worker=from_aux, self_weight=self_weight,
                       group=g)
    if w.form == "mean":
        if not values and abs(w.c) > _TOL:  # a full support: any W in it needs the general plan
            return MixPlan(m, v, "dense", worker_to_aux=to_aux, aux_to_worker=from_aux)
        return MixPlan(m, v, "diag", worker_to_aux=to_aux, aux_to_worker=from_aux)
    src, dst = _arcs(w.worker_offdiagonal())
    if not len(src):
        return MixPlan(m, v, "diag", worker_to_aux=to_aux, aux_to_worker=from_aux)
    shifts, sources = _slots_from_support(src, dst, m)
    if len(shifts) < m - 1:
        return MixPlan(m, v, "neighbour", shifts, sources, to_aux, from_aux)
    return MixPlan(m, v, "dense", worker_to_aux=to_aux, aux_to_worker=from_aux)


def _operator(w, m: int, v: int) -> MixingMatrix:
    w = as_operator(w, v=v)
    if w.n != m + v:
        raise ValueError(f"W is {w.n} x {w.n} but m + v = {m} + {v} = {m + v}")
    return w


def plan_for_matrix(w, m: int, v: int = 0) -> MixPlan:
    """The cheapest plan that applies this exact W (its values decide ``none``, ``mean`` and
    ``groups``).

    Example:
        >>> import numpy as np
        >>> plan_for_matrix(np.full((4, 4), 0.25), 4).kind
        'mean'
        >>> plan_for_matrix(np.eye(4), 4).kind
        'none'
        >>> pairs = plan_for_matrix(np.kron(np.eye(2), np.full((2, 2), 0.5)), 4)
        >>> pairs.kind, pairs.group, pairs.self_weight
        ('groups', 2, False)
    """
    return _plan(_operator(w, m, v), values=True)


def plan_for_support(support, m: int, v: int = 0, matchings=None) -> MixPlan:
    """A plan that applies *any* W whose non-zeros lie in ``support`` (for random schedules,
    whose W changes every round: the values arrive as coefficients at run time).

    ``matchings`` (lists of worker pairs ``(a, b)``, disjoint within each list, e.g. MATCHA's
    decomposition) become the slots when they cover the support's worker edges and are fewer than
    m − 1: then a slot is inactive exactly when its matching is (see :func:`active_slots`).
    """
    plan = _plan(_operator(support, m, v), values=False)
    if matchings is None or plan.kind != "neighbour":
        return plan
    perms, covered = [], set()
    for edges in matchings:
        perm = list(range(m))
        for a, b in edges:
            a, b = int(a), int(b)
            if (not (0 <= a < m and 0 <= b < m) or a == b or perm[a] != a or perm[b] != b
                    or (a, b) in covered):
                return plan  # not disjoint matchings on the workers: ignore the hint
            perm[a], perm[b] = b, a
            covered.update(((a, b), (b, a)))
        perms.append(tuple(perm))
    src, dst = _arcs(_operator(support, m, v).worker_offdiagonal())
    if any((int(i), int(j)) not in covered for i, j in zip(src, dst)) or not perms or len(perms) >= m - 1:
        return plan
    return plan._replace(shifts=(None,) * len(perms), sources=tuple(perms))


def _lookup(csr: sp.csr_array, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``csr[rows[k], cols[k]]`` for every k (0 where it has no entry) of a canonical CSR (as
    :meth:`~coopsgd.core.operator.MixingMatrix.worker_offdiagonal` gives), as a float array: a
    binary search of the entries' ``row · n + column`` keys, which it holds in increasing order
    (SciPy's own fancy indexing costs a tenth of a millisecond a call, and a random schedule looks
    up every round's W)."""
    if not len(rows):
        return np.zeros(0)
    n = csr.shape[1]
    keys = _entry_rows(csr) * n + csr.indices
    wanted = np.asarray(rows, np.int64) * n + np.asarray(cols, np.int64)
    if not len(keys):
        return np.zeros(len(wanted))
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[at] == wanted, csr.data[at], 0.0).astype(np.float64)


def _slot_coefficients(plan: MixPlan, w: MixingMatrix) -> np.ndarray:
    """``coef[s, j] = W[π_s(j), j]`` for ``π_s(j) ≠ j``, shape (S, m)."""
    m = plan.m
    if not plan.shifts:
        return np.zeros((0, m))
    src = np.stack([plan.source_array(s) for s in range(len(plan.shifts))])
    dst = np.broadcast_to(np.arange(m), src.shape)
    moved = src != dst
    coef = np.zeros(src.shape)
    coef[moved] = w.c if w.form == "mean" else _lookup(w.worker_offdiagonal(), src[moved], dst[moved])
    return coef


def active_slots(plan: MixPlan, w) -> MixPlan:
    """``plan`` keeping only the neighbour slots that carry a non-zero weight in ``w`` (a random
    schedule's active matchings); ``diag`` when none does."""
    if plan.kind != "neighbour":
        return plan
    w = _operator(w, plan.m, plan.v)
    plan = plan._replace(worker_to_aux=bool(np.any(np.abs(w.wa) > _TOL)),
                         aux_to_worker=bool(np.any(np.abs(w.aw) > _TOL)))
    coef = _slot_coefficients(plan, w)
    keep = [s for s in range(len(plan.shifts)) if np.any(np.abs(coef[s]) > _TOL)]
    if not keep:
        return plan._replace(kind="diag", shifts=(), sources=())
    return plan._replace(shifts=tuple(plan.shifts[s] for s in keep), sources=tuple(plan.sources[s] for s in keep))


def coefficients(plan: MixPlan, w) -> dict[str, np.ndarray]:
    """The run-time arguments of ``plan`` for the matrix ``w`` (float64 NumPy arrays).

    Keys: ``d`` (m,) diagonal of W_ww (minus ``c`` for ``mean`` and ``groups``), ``c`` () the
    constant off-diagonal for ``mean`` (within the groups for ``groups``), ``slots`` (S, m) with
    ``slots[s, j] = W[π_s(j), j]``, ``dense`` (m, m) = W_ww, ``wa`` (m, v), ``aw`` (v, m), ``aa``
    (v, v).

    Raises:
        ValueError: if ``w`` has a non-zero outside what the plan can apply.
    """
    m, v = plan.m, plan.v
    w = _operator(w, m, v)
    out: dict[str, np.ndarray] = {}
    if plan.kind == "none":
        if not w.is_identity(atol=_TOL):
            raise ValueError("this mixing was planned as the identity but W is not I")
        return out
    diag = w.worker_diagonal().copy()
    if plan.kind == "mean":
        c = _constant_offdiagonal(w)
        if c is None:
            raise ValueError("this mixing was planned as a mean but W_ww's off-diagonal is not constant")
        out["c"] = np.asarray(c)
        out["d"] = diag - c
    elif plan.kind == "groups":
        grouped = _groups(w)
        if grouped is None or grouped[0] != plan.group:
            raise ValueError(f"this mixing was planned as averages within groups of {plan.group} workers, "
                             "but W_ww is not one constant within those groups and zero outside them")
        out["c"] = np.asarray(grouped[1])
        out["d"] = diag - grouped[1]
    elif plan.kind == "dense":
        out["dense"] = np.asarray(w)[:m, :m].copy()
    else:
        out["d"] = diag
        covered = None
        if plan.kind == "neighbour":
            out["slots"] = _slot_coefficients(plan, w)
            rows = np.concatenate([plan.source_array(s) for s in range(len(plan.shifts))])
            covered = rows.astype(np.int64) * m + np.tile(np.arange(m), len(plan.shifts))  # (i, j) keys
        if w.form == "mean":
            if abs(w.c) > _TOL:
                raise ValueError("W's worker block is full but was planned as sparse")
        else:
            src, dst = _arcs(w.worker_offdiagonal())
            inside = np.zeros(len(src), bool) if covered is None else np.isin(src * m + dst, covered)
            if not np.all(inside):
                k = int(np.argmin(inside))
                i, j = int(src[k]), int(dst[k])
                raise ValueError(
                    f"W[{i}, {j}] = {w[i, j]:.6g} lies outside the support this mixing was planned for")
    if v:
        for name, block, flag in (("wa", w.wa, plan.worker_to_aux), ("aw", w.aw, plan.aux_to_worker)):
            if not flag and np.any(np.abs(block) > _TOL):
                raise ValueError(f"W's {name} block is non-zero but was planned as zero")
            if flag:
                out[name] = block.copy()
        out["aa"] = w.aa.copy()
    return out


def communication(plan: MixPlan, param_bytes: float, w=None) -> Communication:
    """What one mixing under ``plan`` sends per worker for a model of ``param_bytes`` bytes.

    With ``w`` given, neighbour slots whose coefficients are all zero in ``w`` are not counted
    (a random schedule's inactive matchings). Counts follow the usual ring all-reduce model:
    ``2(m − 1)/m · P`` bytes and ``2(m − 1)`` messages per worker per reduced vector; ``groups``
    is one ring all-reduce within each group of g, ``2(g − 1)/g · P`` bytes and ``2(g − 1)``
    messages. As for every kind, each worker is counted as its own node (workers that share a
    device are charged as if they did not: the account is the algorithm's, not the layout's).

    Example:
        >>> import numpy as np
        >>> c = communication(plan_for_matrix(np.full((4, 4), 0.25), 4), 1000)
        >>> c.kind, c.bytes_per_worker, c.all_reduces
        ('all-reduce', 1500.0, 1)
        >>> pairs = plan_for_matrix(np.kron(np.eye(2), np.full((2, 2), 0.5)), 4)
        >>> communication(pairs, 1000).bytes_per_worker
        1000.0
    """
    m, p = plan.m, float(param_bytes)
    reduces = int(plan.kind == "mean") + (plan.v if plan.worker_to_aux else 0)
    if m == 1:
        reduces = 0
    ring = ring_all_reduce_bytes(m, p)
    if plan.kind == "none" or (plan.kind == "diag" and not reduces):
        return Communication("none", 0.0, 0, 0, 0, m)
    if plan.kind == "groups":
        g = plan.group
        return Communication("all-reduce", ring_all_reduce_bytes(g, p) + reduces * ring,
                             2 * (g - 1) + reduces * 2 * (m - 1), 1 + reduces, 0, m)
    if plan.kind == "dense":
        return Communication("dense", (m - 1) * p + reduces * ring, (m - 1) + reduces * 2 * (m - 1),
                             reduces, 0, m)
    if plan.kind == "neighbour":
        active = len(plan.shifts)
        if w is not None:
            coef = _slot_coefficients(plan, _operator(w, m, plan.v))
            active = int(np.sum(np.any(np.abs(coef) > _TOL, axis=1)))
        return Communication("neighbour", active * p + reduces * ring,
                             active + reduces * 2 * (m - 1), reduces, active, m)
    return Communication("all-reduce", reduces * ring, reduces * 2 * (m - 1), reduces, 0, m)


def mixing_traffic(w, param_bytes: float, v: int = 0) -> Communication:
    """What one mixing ``X ← X W`` (``v`` auxiliary columns last) sends per worker for models of
    ``param_bytes`` bytes: the plan W's structure picks and its cost (:func:`communication`).

    Example:
        >>> t = mixing_traffic(np.full((4, 4), 0.25), 100.0)
        >>> t.kind, t.messages, t.bytes_per_worker, t.total_bytes
        ('all-reduce', 6, 150.0, 600.0)
    """
    p = require_number("param_bytes", param_bytes)
    w = as_operator(w, v=v)
    return communication(_plan(w, values=True), p)


def tree_bytes(params) -> int:
    """Bytes of one model (one column): Σ over leaves of size × itemsize — the ``param_bytes`` of
    :func:`communication`."""
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))
