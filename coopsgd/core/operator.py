"""W as an operator: a mixing matrix stored by its structure, never as a dense n × n array at scale.

Columns of ``X = [x_1 … x_m, z_1 … z_v]`` are the m workers' models and v auxiliary variables;
one mixing is ``X ← X W`` (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3), so
``W[i, j]`` is what column j takes from column i and the columns of W sum to 1. W is kept in four
blocks::

    W = [[W_ww, W_wa],      W_ww: m × m, workers → workers, in one of three forms
         [W_aw, W_aa]]      W_wa: m × v, W_aw: v × m, W_aa: v × v (small, dense)

- ``"mean"``: ``W_ww = c·11ᵀ + diag(δ)`` (exact averaging ``J_m`` is c = 1/m, δ = 0), stored as
  its diagonal and c — O(m) memory whatever m is;
- ``"sparse"``: a ``scipy.sparse`` CSR matrix — identity, diagonal, circulant and graph weights,
  O(edges) memory;
- ``"dense"``: a NumPy array, for small m and user-supplied matrices.

A :class:`MixingMatrix` behaves like a read-only float64 NumPy array: ``np.asarray(W)``,
``W[i, j]``, ``W.T``, ``W.sum(axis)``, NumPy functions and ufuncs work on its dense form, which is
built only when asked for (and refused beyond :data:`DENSE_LIMIT` columns, naming the size);
``X @ W`` and ``W @ X`` use the structure at any size.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import scipy.sparse as sp

__all__ = ["DENSE_LIMIT", "Form", "MixingMatrix", "as_operator", "averaging", "identity"]

DENSE_LIMIT = 8192
"""Largest n for which a dense n × n array (n² float64, 512 MiB at the limit) is built on request."""

Form = Literal["mean", "sparse", "dense"]
"""Storage forms of the worker block."""


def _real(x, name: str):
    """``x`` (an array, a ``scipy.sparse`` matrix or a number) unless it is complex, which would
    lose its imaginary part in float64."""
    dtype = x.dtype if sp.issparse(x) else np.asarray(x).dtype
    if dtype.kind == "c":
        raise ValueError(f"{name} must be real, got dtype {dtype} (the imaginary part would be lost)")
    return x


def _dense_block(x, shape: tuple[int, int], name: str) -> np.ndarray:
    if x is None:
        return np.zeros(shape)
    if sp.issparse(x):
        x = x.toarray()
    arr = np.asarray(_real(x, name), dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


class MixingMatrix:
    """A column-stochastic mixing matrix W stored by structure (see the module docstring).

    Build one with :func:`as_operator` (from a NumPy array, a ``scipy.sparse`` matrix or another
    MixingMatrix), :func:`averaging`, :func:`identity`, or directly from blocks::

        MixingMatrix.mean(diag, c, wa=None, aw=None, aa=None)
        MixingMatrix.from_blocks(ww, wa=None, aw=None, aa=None)   # ww sparse or dense

    Attributes:
        m, v, n: workers, auxiliary columns, ``m + v``.
        form: the worker block's storage, one of :data:`Form`.

    Example:
        >>> import numpy as np
        >>> w = averaging(4)
        >>> w.form, w.shape, float(w[0, 1])
        ('mean', (4, 4), 0.25)
        >>> (np.ones((1, 4)) @ w).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """NumPy ufuncs see the dense array (small n); ``x @ W`` uses the structure at any n."""
        if ufunc is np.matmul and method == "__call__" and len(inputs) == 2 and not kwargs:
            a, b = inputs
            if isinstance(a, MixingMatrix) and not isinstance(b, MixingMatrix):
                return a.matmul(b)
            if isinstance(b, MixingMatrix) and not isinstance(a, MixingMatrix):
                return b.__rmatmul__(a)
        dense = [x.toarray() if isinstance(x, MixingMatrix) else x for x in inputs]
        return getattr(ufunc, method)(*dense, **kwargs)

    def __init__(self, form: Form, m: int, *, diag=None, c: float = 0.0, ww=None, wa=None, aw=None,
                 aa=None, v: int = 0):
        self.form, self.m, self.v = form, int(m), int(v)
        self._diag = None if diag is None else np.asarray(diag, dtype=np.float64)
        self._c = float(c)
        self._ww = ww
        self.wa = _dense_block(wa, (self.m, self.v), "W_wa")
        self.aw = _dense_block(aw, (self.v, self.m), "W_aw")
        self.aa = _dense_block(aa, (self.v, self.v), "W_aa") if aa is not None else np.eye(self.v)
        for arr in (self._diag, self.wa, self.aw, self.aa):
            if arr is not None:
                arr.setflags(write=False)

    # ------------------------------------------------------------------------- constructors
    @classmethod
    def mean(cls, diag, c: float, wa=None, aw=None, aa=None) -> MixingMatrix:
        """``W_ww = c·11ᵀ`` off the diagonal and ``diag`` on it (the auxiliary blocks as given; one
        worker has no off-diagonal, so its c is 0)."""
        diag = np.asarray(_real(diag, "the diagonal of W"), dtype=np.float64).reshape(-1)
        v = 0 if wa is None else np.shape(wa)[1]
        c = 0.0 if len(diag) == 1 else _real(c, "c")
        return cls("mean", len(diag), diag=diag, c=c, wa=wa, aw=aw, aa=aa, v=v)

    @classmethod
    def from_blocks(cls, ww, wa=None, aw=None, aa=None) -> MixingMatrix:
        """A sparse (``scipy.sparse``) or dense (NumPy) worker block with the auxiliary blocks."""
        v = 0 if wa is None else np.shape(wa)[1]
        ww = _real(ww, "W")
        if sp.issparse(ww):
            ww = sp.csr_array(ww, dtype=np.float64, copy=True)
            ww.eliminate_zeros()
            ww.sort_indices()
            for arr in (ww.data, ww.indices, ww.indptr):
                arr.setflags(write=False)
            return cls("sparse", ww.shape[0], ww=ww, wa=wa, aw=aw, aa=aa, v=v)
        ww = np.array(ww, dtype=np.float64)
        if ww.ndim != 2 or ww.shape[0] != ww.shape[1]:
            raise ValueError(f"W must be a square matrix, got shape {ww.shape}")
        ww.setflags(write=False)
        return cls("dense", len(ww), ww=ww, wa=wa, aw=aw, aa=aa, v=v)

    # --------------------------------------------------------------------------- structure
    @property
    def n(self) -> int:
        return self.m + self.v

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    ndim = 2
    dtype = np.dtype(np.float64)

    @property
    def c(self) -> float:
        """The constant off-diagonal of a ``"mean"`` worker block (0 for the other forms)."""
        return self._c if self.form == "mean" else 0.0

    def worker_diagonal(self) -> np.ndarray:
        """The diagonal of ``W_ww``, shape (m,)."""
        if self.form == "mean":
            return self._diag
        return np.asarray(self._ww.diagonal(), dtype=np.float64)

    def diagonal(self) -> np.ndarray:
        """The diagonal of W, shape (n,)."""
        return np.concatenate([self.worker_diagonal(), np.diag(self.aa)])

    def worker_offdiagonal(self) -> sp.csr_array:
        """The off-diagonal of a sparse or dense ``W_ww`` as canonical CSR (a ``"mean"`` one is full)."""
        if self.form == "mean":
            raise ValueError("the off-diagonal of a mean-form worker block is c·11ᵀ, not sparse")
        if "_offdiag" not in self.__dict__:
            ww = sp.csr_array(self._ww, dtype=np.float64)
            ww = ww if ww.has_canonical_format else ww.copy()  # W is read-only: made canonical on a copy
            ww.sum_duplicates()  # sorted columns, one entry each
            rows = np.repeat(np.arange(ww.shape[0]), np.diff(ww.indptr))
            keep = (rows != ww.indices) & (ww.data != 0)  # the diagonal and stored zeros: no SciPy arithmetic
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=ww.shape[0]))])
            self.__dict__["_offdiag"] = sp.csr_array((ww.data[keep], ww.indices[keep], indptr), shape=ww.shape)
        return self.__dict__["_offdiag"]

    def worker_block(self):
        """``W_ww`` as stored: ``(diag, c)`` for ``"mean"``, CSR for ``"sparse"``, an array for ``"dense"``."""
        return (self._diag, self._c) if self.form == "mean" else self._ww

    @cached_property
    def worker_column_sums(self) -> np.ndarray:
        if self.form == "mean":
            return self._diag + self._c * (self.m - 1)
        return np.asarray(self._ww.sum(axis=0), dtype=np.float64).reshape(-1)

    def sum(self, axis: int | None = None):
        """Column sums (``axis=0``, ``1ᵀW``), row sums (``axis=1``) or the total, as for an array."""
        if axis is None:
            return float(self.column_sums().sum())
        if axis in (0, -2):
            return self.column_sums()
        if axis in (1, -1):
            return self.row_sums()
        raise ValueError(f"axis must be 0, 1 or None for a 2-D W, got {axis!r}")

    def trace(self) -> float:
        """tr W, the sum of the diagonal."""
        return float(self.diagonal().sum())

    def column_sums(self) -> np.ndarray:
        """``1ᵀW``, shape (n,)."""
        return np.concatenate([self.worker_column_sums + self.aw.sum(axis=0),
                               self.wa.sum(axis=0) + self.aa.sum(axis=0)])

    def row_sums(self) -> np.ndarray:
        """``W1``, shape (n,)."""
        if self.form == "mean":
            rows = self._diag + self._c * (self.m - 1)
        else:
            rows = np.asarray(self._ww.sum(axis=1), dtype=np.float64).reshape(-1)
        return np.concatenate([rows + self.wa.sum(axis=1), self.aw.sum(axis=1) + self.aa.sum(axis=1)])

    def is_finite(self) -> bool:
        """Whether every stored entry is finite (no NaN or Inf)."""
        if self.form == "mean":
            ok = np.all(np.isfinite(self._diag)) and np.isfinite(self._c)
        elif self.form == "sparse":
            ok = np.all(np.isfinite(self._ww.data))
        else:
            ok = np.all(np.isfinite(self._ww))
        return bool(ok and all(np.all(np.isfinite(a)) for a in (self.wa, self.aw, self.aa)))

    def asymmetry(self) -> float:
        """``max |W − Wᵀ|`` (0 for a symmetric W)."""
        if self.form == "mean":
            worker = 0.0
        elif self.form == "sparse":
            diff = self._ww - self._ww.T
            worker = float(np.max(np.abs(diff.data))) if diff.nnz else 0.0
        else:
            worker = float(np.max(np.abs(self._ww - self._ww.T))) if self.m else 0.0
        aux = max([0.0] + [float(np.max(np.abs(a))) for a in (self.wa - self.aw.T, self.aa - self.aa.T)
                           if a.size])
        return max(worker, aux)

    def is_symmetric(self, atol: float = 1e-8) -> bool:
        """Whether W = Wᵀ within ``atol``."""
        return self.asymmetry() <= atol

    @property
    def nnz(self) -> int:
        """Stored non-zeros (a mean-form worker block counts all m² entries when c ≠ 0)."""
        if self.form == "mean":
            worker = self.m * self.m if self._c != 0 else int(np.count_nonzero(self._diag))
        elif self.form == "sparse":
            worker = int(self._ww.nnz)
        else:
            worker = int(np.count_nonzero(self._ww))
        return worker + sum(int(np.count_nonzero(a)) for a in (self.wa, self.aw, self.aa))

    def is_identity(self, atol: float = 0.0) -> bool:
        """Whether W = I within ``atol`` (the mixing leaves every model as it is)."""
        off = self.worker_offdiagonal() if self.form != "mean" else None
        worker = (abs(self._c) <= atol if off is None else not off.nnz or np.max(np.abs(off.data)) <= atol) \
            and np.all(np.abs(self.worker_diagonal() - 1.0) <= atol)
        return bool(worker and np.all(np.abs(self.wa) <= atol) and np.all(np.abs(self.aw) <= atol)
                    and np.all(np.abs(self.aa - np.eye(self.v)) <= atol))

    def circulant_offsets(self, atol: float = 0.0) -> dict[int, float] | None:
        """For a worker block that is circulant with v = 0 — ``W[(j + o) mod m, j] = w_o`` for every
        j — the map ``o → w_o`` (o = 0 the self-weight); else None. O(non-zeros)."""
        if self.v or self.m < 2 or self.form == "dense" and self.m > DENSE_LIMIT:
            return None
        if self.form == "mean":
            if not np.all(self._diag == self._diag[0]) or (self._c and self.m > DENSE_LIMIT):
                return None
            return {0: float(self._diag[0]), **({o: self._c for o in range(1, self.m)} if self._c else {})}
        ww = sp.coo_array(sp.csr_array(self._ww))
        keep = np.abs(ww.data) > atol
        rows, cols, vals = ww.row[keep], ww.col[keep], ww.data[keep]
        offsets = (rows - cols) % self.m
        out: dict[int, float] = {}
        diag = self.worker_diagonal()
        if not np.all(diag == diag[0]):
            return None
        if diag[0]:
            out[0] = float(diag[0])
        for o in np.unique(offsets):
            if o == 0:
                continue
            sel = offsets == o
            if np.count_nonzero(sel) != self.m or not np.all(vals[sel] == vals[sel][0]):
                return None
            out[int(o)] = float(vals[sel][0])
        return out

    # ------------------------------------------------------------------------- conversions
    def _require_dense_size(self, what: str) -> None:
        if self.n > DENSE_LIMIT:
            gib = self.n * self.n * 8 / 2**30
            raise ValueError(
                f"{what} of this W needs a dense {self.n} x {self.n} array ({gib:.1f} GiB), more than "
                f"the {DENSE_LIMIT} x {DENSE_LIMIT} limit; use its structure instead (W.tocsr(), "
                "W @ X, coopsgd.zeta(W))")

    def toarray(self) -> np.ndarray:
        """The dense n × n float64 array (read-only); refused beyond :data:`DENSE_LIMIT`."""
        if "_dense" not in self.__dict__:
            self._require_dense_size("the dense form")
            out = np.zeros(self.shape)
            if self.form == "mean":
                out[: self.m, : self.m] = self._c
                out[np.arange(self.m), np.arange(self.m)] = self._diag
            elif self.form == "sparse":
                out[: self.m, : self.m] = self._ww.toarray()
            else:
                out[: self.m, : self.m] = self._ww
            out[: self.m, self.m:] = self.wa
            out[self.m:, : self.m] = self.aw
            out[self.m:, self.m:] = self.aa
            out.setflags(write=False)
            self.__dict__["_dense"] = out
        return self.__dict__["_dense"]

    def tocsr(self) -> sp.csr_array:
        """W as a ``scipy.sparse`` CSR array (refused for a large mean-form block, which is full)."""
        if self.form == "mean":
            if self._c != 0:
                self._require_dense_size("the sparse form (a mean-form block is full)")
            ww = sp.csr_array(self.toarray()[: self.m, : self.m])
        else:
            ww = sp.csr_array(self._ww, dtype=np.float64)
        out = sp.block_array([[ww, sp.csr_array(self.wa)], [sp.csr_array(self.aw), sp.csr_array(self.aa)]],
                             format="csr") if self.v else ww.copy()
        out.eliminate_zeros()
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self.toarray()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    @property
    def T(self) -> MixingMatrix:
        """Wᵀ (what the rows would be if columns were models)."""
        if self.form == "mean":
            return MixingMatrix("mean", self.m, diag=self._diag, c=self._c, wa=self.aw.T, aw=self.wa.T,
                                aa=self.aa.T, v=self.v)
        ww = sp.csr_array(self._ww.T) if self.form == "sparse" else self._ww.T
        return MixingMatrix(self.form, self.m, ww=ww, wa=self.aw.T, aw=self.wa.T, aa=self.aa.T, v=self.v)

    def with_auxiliary(self, v: int) -> MixingMatrix:
        """The same matrix with its last ``v`` columns read as auxiliary (re-split into blocks)."""
        if v == self.v:
            return self
        if not 0 <= v < self.n:
            raise ValueError(f"v = {v} auxiliary columns do not fit a {self.n} x {self.n} W")
        if self.form == "mean" and self.v == 0 and np.all(self._diag == self._diag[0]) and (
                np.all(self._diag[self.n - v:] == self._diag[0])):
            m = self.n - v
            col = np.full((m, v), self._c)
            aa = np.full((v, v), self._c) + np.diag(self._diag[m:] - self._c)
            return MixingMatrix("mean", m, diag=self._diag[:m], c=self._c, wa=col, aw=col.T, aa=aa, v=v)
        return as_operator(self.tocsr() if self.n > DENSE_LIMIT else self.toarray(), v=v)

    # --------------------------------------------------------------------------- products
    def _worker_matmul(self, xw: np.ndarray) -> np.ndarray:
        """``W_ww @ xw`` for xw of shape (m, k)."""
        if self.form == "mean":
            return (self._diag - self._c)[:, None] * xw + self._c * xw.sum(axis=0, keepdims=True)
        return np.asarray(self._ww @ xw)

    def matmul(self, x) -> np.ndarray:
        """``W @ x`` for x of shape (n,) or (n, k)."""
        x = np.asarray(x, dtype=np.float64)
        vec = x.ndim == 1
        x = x[:, None] if vec else x
        if x.shape[0] != self.n:
            raise ValueError(f"W is {self.n} x {self.n} but the operand has {x.shape[0]} rows")
        xw, xa = x[: self.m], x[self.m:]
        top = self._worker_matmul(xw) + self.wa @ xa
        out = np.concatenate([top, self.aw @ xw + self.aa @ xa]) if self.v else top
        return out[:, 0] if vec else out

    def __matmul__(self, other):
        if isinstance(other, MixingMatrix):
            v = self.v if self.v == other.v else 0
            product = (self.toarray() @ other.toarray() if max(self.n, other.n) <= DENSE_LIMIT
                       else self.tocsr() @ other.tocsr())
            return as_operator(product, v=v)
        return self.matmul(other)

    def __rmatmul__(self, other):
        """``x @ W`` for x of shape (n,) or (k, n): ``(Wᵀ xᵀ)ᵀ``."""
        x = np.asarray(other, dtype=np.float64)
        return self.T.matmul(x.T).T

    # ----------------------------------------------------------------------------- access
    def __getitem__(self, index):
        if self.n <= DENSE_LIMIT:
            return self.toarray()[index]
        if not (isinstance(index, tuple) and len(index) == 2 and all(isinstance(i, (int, np.integer))
                                                                    for i in index)):
            raise ValueError(f"a {self.n} x {self.n} W supports only W[i, j] with two integers")
        i, j = (int(k) for k in index)
        if not (-self.n <= i < self.n and -self.n <= j < self.n):
            raise IndexError(f"index ({i}, {j}) is out of bounds for a {self.n} x {self.n} W")
        i, j = i % self.n, j % self.n
        m = self.m
        if i >= m or j >= m:
            block, a, b = ((self.wa, i, j - m) if i < m else (self.aw, i - m, j) if j < m
                           else (self.aa, i - m, j - m))
            return float(block[a, b])
        if self.form == "mean":
            return float(self._diag[i] if i == j else self._c)
        return float(self._ww[i, j])

    def _compare(self, other, op):
        return op(self.toarray(), other.toarray() if isinstance(other, MixingMatrix) else other)

    def __eq__(self, other):
        return self._compare(other, np.equal)

    def __ne__(self, other):
        return self._compare(other, np.not_equal)

    def __lt__(self, other):
        return self._compare(other, np.less)

    def __le__(self, other):
        return self._compare(other, np.less_equal)

    def __gt__(self, other):
        return self._compare(other, np.greater)

    def __ge__(self, other):
        return self._compare(other, np.greater_equal)

    __hash__ = None  # compares elementwise, like an array

    def __setitem__(self, index, value):
        raise ValueError("assignment destination is read-only: a MixingMatrix cannot be changed; "
                         "build a new one")

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"MixingMatrix({self.n}x{self.n}, worker block {self.form}, v={self.v}, nnz={self.nnz})"


def as_operator(w, v: int = 0, name: str = "W") -> MixingMatrix:
    """W as a :class:`MixingMatrix` with its last ``v`` columns auxiliary.

    A NumPy array is split into blocks; its worker block is stored as ``"mean"`` when its
    off-diagonal is one non-zero constant, ``"sparse"`` when at most a quarter of it is non-zero,
    and ``"dense"`` otherwise. A ``scipy.sparse`` matrix keeps a sparse worker block. Values are
    stored exactly (``np.asarray(as_operator(w))`` equals ``w``).

    Raises:
        ValueError: for a non-numeric, non-square or complex input.
    """
    if isinstance(w, MixingMatrix):
        return w.with_auxiliary(v)
    shape = w.shape if sp.issparse(w) else np.shape(w)
    if len(shape) == 2 and shape[0] == shape[1] and not 0 <= v < shape[0]:
        raise ValueError(f"v = {v} auxiliary columns do not fit a {shape[0]} x {shape[0]} {name} "
                         "(0 <= v < n: at least one worker)")
    if sp.issparse(w):
        if np.iscomplexobj(w.data):
            raise ValueError(f"{name} must be real, got a complex sparse matrix")
        w = sp.csr_array(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {w.shape}")
        m = w.shape[0] - v
        if v:
            return MixingMatrix.from_blocks(w[:m, :m], w[:m, m:].toarray(), w[m:, :m].toarray(),
                                            w[m:, m:].toarray())
        return MixingMatrix.from_blocks(w)
    if np.iscomplexobj(w):
        raise ValueError(f"{name} must be real, got a complex matrix")
    try:
        w = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric matrix: {err}") from None
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {w.shape}")
    m = w.shape[0] - v
    ww = w[:m, :m]
    blocks = (w[:m, m:], w[m:, :m], w[m:, m:]) if v else (None, None, None)
    if m > 1:
        off = ww[~np.eye(m, dtype=bool)]
        if off[0] != 0 and np.all(off == off[0]):
            return MixingMatrix.mean(np.diag(ww).copy(), float(off[0]), *blocks)
        if np.count_nonzero(off) <= off.size // 4:
            return MixingMatrix.from_blocks(sp.csr_array(ww), *blocks)
    return MixingMatrix.from_blocks(ww, *blocks)


@lru_cache(maxsize=64)
def identity(n: int, v: int = 0) -> MixingMatrix:
    """I_n (the last ``v`` columns auxiliary): nothing moves."""
    m = n - v
    aux = (np.zeros((m, v)), np.zeros((v, m)), np.eye(v)) if v else (None, None, None)
    return MixingMatrix.from_blocks(sp.identity(m, format="csr"), *aux)


def averaging(n: int) -> MixingMatrix:
    """Exact averaging ``J_n = 11ᵀ/n`` (ζ = 0), in O(n) memory."""
    return MixingMatrix.mean(np.full(n, 1.0 / n), 1.0 / n)
