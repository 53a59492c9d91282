"""Spectral quantities of mixing matrices: ζ, the spectral gap, the stationary combination, and the
contraction ``‖E[WᵀW] − J‖₂`` of a time-varying W.

Up to :data:`DENSE_EIG_LIMIT` columns the eigenvalues come from a dense solver (exact to
round-off). Beyond it W's structure decides: closed forms for exact averaging and for workers that
are exchangeable (``W_ww = a·I + c·(11ᵀ − I)``, as in EASGD and Overlap Local-SGD), the discrete
Fourier transform for a circulant W (a ring, an exponential graph), and ``scipy.sparse.linalg``'s
Lanczos / Arnoldi solvers (``eigsh`` / ``eigs``) otherwise — never a dense n × n array.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse.linalg as spla

from coopsgd.core.mixing import ATOL, check
from coopsgd.core.operator import MixingMatrix

__all__ = [
    "DENSE_EIG_LIMIT",
    "cycle_contraction",
    "norm_minus_averaging",
    "spectral_gap",
    "stationary",
    "zeta",
]

DENSE_EIG_LIMIT = 2048
"""Largest n whose eigenvalues are computed densely (O(n³), about a second at the limit)."""


def _exchangeable(w: MixingMatrix):
    """``(a, c)`` if ``W_ww = a·I + c·(11ᵀ − I)`` and the auxiliary blocks treat every worker alike
    (rows of W_wa equal, columns of W_aw equal); else None."""
    diag = w.worker_diagonal()
    if not np.all(diag == diag[0]):
        return None
    if w.form == "mean":
        c = w.c
    elif w.worker_offdiagonal().nnz == 0:
        c = 0.0
    else:
        return None
    if w.v and not (np.all(w.wa == w.wa[:1]) and np.all(w.aw == w.aw[:, :1])):
        return None
    return float(diag[0]), c


def _reduced(w: MixingMatrix, a: float, c: float) -> np.ndarray:
    """W restricted to span{(1_m, 0), (0, e_k)}: the (1 + v) × (1 + v) matrix whose eigenvalues are
    W's besides ``a − c`` (which has multiplicity m − 1, on worker vectors summing to 0)."""
    r = np.zeros((1 + w.v, 1 + w.v))
    r[0, 0] = a + c * (w.m - 1)
    if w.v:
        r[0, 1:] = w.wa[0]
        r[1:, 0] = w.m * w.aw[:, 0]
        r[1:, 1:] = w.aa
    return r


def _drop_one(eig: np.ndarray) -> float:
    """The largest modulus after removing one copy of the eigenvalue closest to 1."""
    eig = np.delete(eig, np.argmin(np.abs(eig - 1.0)))
    return float(np.max(np.abs(eig))) if eig.size else 0.0


def _lanczos_minus_averaging(csr) -> float:
    """``‖G − J‖₂`` for a symmetric sparse G, with ``G − J`` applied matrix-free (Lanczos)."""
    n = csr.shape[0]
    op = spla.LinearOperator((n, n), matvec=lambda x: csr @ x - x.mean(), dtype=np.float64)
    return float(np.abs(spla.eigsh(op, k=1, which="LM", return_eigenvectors=False, tol=1e-12)[0]))


def _zeta_structured(w: MixingMatrix) -> float:
    ex = _exchangeable(w)
    if ex is not None:
        a, c = ex
        eig = np.concatenate([np.linalg.eigvals(_reduced(w, a, c)), [a - c] if w.m > 1 else []])
        return _drop_one(eig)
    offsets = w.circulant_offsets()
    if offsets is not None:  # λ_k = Σ_o w_o e^{±2πi k o / m}: the DFT of the first column
        column = np.zeros(w.m)
        for o, value in offsets.items():
            column[o] = value
        return _drop_one(np.fft.fft(column))
    if w.n <= 8:  # too small for ARPACK's k < n − 1: the dense solver is exact here anyway
        return _drop_one(np.linalg.eigvals(w.toarray()))
    csr = w.tocsr()
    if w.is_symmetric(ATOL):  # W − J has the eigenvalues of W but the 1, which becomes 0
        return _lanczos_minus_averaging(csr)
    return _drop_one(spla.eigs(csr, k=3, which="LM", return_eigenvectors=False, tol=1e-12))


Method = Literal["auto", "dense", "structure"]


def zeta(w, *, method: Method = "auto") -> float:
    """Second-largest eigenvalue modulus ζ of a mixing matrix.

    For symmetric W this is ``max(|λ_2|, |λ_n|)`` with ``1 = λ_1 ≥ λ_2 ≥ … ≥ λ_n`` (Wang & Joshi,
    Cooperative SGD, Assumption 4). For a column-stochastic W that is not symmetric (Overlap
    Local-SGD's ``W_ov``) it is the largest modulus among the eigenvalues other than the one at 1
    (one copy of the eigenvalue closest to 1 is removed). ζ < 1 means repeated mixing reaches
    consensus; a disconnected graph or a bipartite graph with zero self-weights gives ζ = 1.

    Args:
        w: an array, a ``scipy.sparse`` matrix or a MixingMatrix.
        method: ``"auto"`` (dense up to :data:`DENSE_EIG_LIMIT` columns, structure beyond),
            ``"dense"`` or ``"structure"`` (closed forms, DFT, sparse solvers at any size).

    Example:
        >>> import numpy as np
        >>> round(zeta(np.full((4, 4), 0.25)), 12)
        0.0
    """
    w = check(w) if not isinstance(w, MixingMatrix) else w
    if w.n == 1:
        return 0.0
    if method == "dense" or (method == "auto" and w.n <= DENSE_EIG_LIMIT):
        dense = w.toarray()
        if np.allclose(dense, dense.T, atol=ATOL):
            eig = np.linalg.eigvalsh((dense + dense.T) / 2.0)
        else:
            eig = np.linalg.eigvals(dense)
        z = _drop_one(eig)
    elif method in ("auto", "structure"):
        z = _zeta_structured(w)
    else:
        raise ValueError(f"unknown method {method!r}; valid: auto, dense, structure")
    return 0.0 if z < 1e-12 else z  # exact averaging: round-off, not a real eigenvalue


def spectral_gap(w) -> float:
    """Spectral gap ``1 − ζ``: the consensus rate per mixing; larger is faster."""
    return 1.0 - zeta(w)


def stationary(w, *, method: Method = "auto") -> np.ndarray:
    """The weights π (π ≥ 0, Σπ = 1) with ``W π = π``: the combination ``X π`` of the columns that
    mixing leaves unchanged, which every column approaches when ζ < 1.

    Uniform ``1/n`` for a doubly stochastic W; for Overlap Local-SGD's ``W_ov`` it is
    ``(1−α)/m`` per worker and ``α`` for the anchor, so ``X π = (1−α) x̄ + α z`` (Wang, Liang &
    Joshi, arXiv:2002.09539, §3). Raises ValueError when ζ = 1 (no unique such combination).

    Example:
        >>> stationary(np.full((3, 3), 1 / 3)).round(6).tolist()
        [0.333333, 0.333333, 0.333333]
    """
    w = check(w) if not isinstance(w, MixingMatrix) else w
    if np.allclose(w.row_sums(), 1.0, atol=ATOL):
        return np.full(w.n, 1.0 / w.n)
    if zeta(w, method=method) >= 1.0 - 1e-12:
        raise ValueError("W has zeta = 1: no unique combination of the columns is left unchanged")
    if method == "dense" or (method == "auto" and w.n <= DENSE_EIG_LIMIT):
        eig, vec = np.linalg.eig(w.toarray())
        pi = np.real(vec[:, np.argmin(np.abs(eig - 1.0))])
        return pi / pi.sum()
    ex = _exchangeable(w)
    if ex is not None:
        eig, vec = np.linalg.eig(_reduced(w, *ex))
        red = np.real(vec[:, np.argmin(np.abs(eig - 1.0))])
        pi = np.concatenate([np.full(w.m, red[0]), red[1:]])
    elif w.n <= 8:
        eig, vec = np.linalg.eig(w.toarray())
        pi = np.real(vec[:, np.argmin(np.abs(eig - 1.0))])
    else:
        eig, vec = spla.eigs(w.tocsr(), k=1, sigma=1.0 + 1e-9)
        pi = np.real(vec[:, 0])
    return pi / pi.sum()


def norm_minus_averaging(gram, *, symmetric: bool = False) -> float:
    """``‖G − J‖₂`` for an n × n G (e.g. ``E[WᵀW]``): dense up to :data:`DENSE_EIG_LIMIT` (the
    largest eigenvalue modulus when ``symmetric``, else the largest singular value), else the
    Lanczos solver on ``G − J`` applied matrix-free (G symmetric)."""
    if isinstance(gram, MixingMatrix):
        if gram.n > DENSE_EIG_LIMIT:
            return _lanczos_minus_averaging(gram.tocsr())
        gram = gram.toarray()
    gram = np.asarray(gram, dtype=np.float64)
    n = len(gram)
    centred = gram - np.full((n, n), 1.0 / n)
    if symmetric:
        return float(np.max(np.abs(np.linalg.eigvalsh(centred))))
    return float(np.linalg.norm(centred, 2))


def cycle_contraction(cycle) -> float | None:
    """``‖(1/L) Σ_r W_rᵀ W_r − J‖₂`` in closed form when every W_r (v = 0) is circulant — the
    eigenvalues of ``W_rᵀ W_r`` are ``|λ_k^(r)|²`` with λ^(r) the DFT of W_r's first column, so
    the norm is ``max_{k ≠ 0} (1/L) Σ_r |λ_k^(r)|²`` — or exchangeable (``aI + c(11ᵀ − I)``:
    ``(1/L) Σ_r (a_r − c_r)²``); None otherwise."""
    if any(w.v for w in cycle):
        return None
    exchangeable = [_exchangeable(w) for w in cycle]
    if all(e is not None for e in exchangeable):
        return float(np.mean([(a - c) ** 2 for a, c in exchangeable]))
    power = np.zeros(cycle[0].m)
    for w in cycle:
        offsets = w.circulant_offsets()
        if offsets is None:
            return None
        column = np.zeros(w.m)
        for o, value in offsets.items():
            column[o] = value
        power += np.abs(np.fft.fft(column)) ** 2
    return float(np.max(power[1:]) / len(cycle))

