"""The exact expected error of a run on a quadratic: the dynamics are linear, so the mean and
covariance of every column follow exact recursions (math.md §1, last bullet; [derived]). It is the
reference the Monte-Carlo harness (:mod:`coopsgd.analysis.verify`) is tested against.

References:
    Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1 [recalled].
"""

from __future__ import annotations

import math

import numpy as np

from coopsgd.analysis import problems as _problems

__all__ = ["check_run_args", "exact_error_curve", "exact_expected_error"]


def check_run_args(algorithm, eta, K):
    try:
        eta_f = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a real number, got {eta!r}") from None
    if not (math.isfinite(eta_f) and eta_f > 0):
        raise ValueError(f"eta must be finite and > 0 (a learning rate), got eta = {eta!r}")
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f"K (number of steps) must be an integer >= 1, got {K!r}")
    if not hasattr(algorithm, "mixing_at"):
        raise ValueError(f"expected a coopsgd.Algorithm, got {type(algorithm).__name__}")
    return eta_f, int(K)




def exact_error_curve(algorithm, problem, eta, K) -> np.ndarray:
    """``E‖∇F(u_k)‖²`` for ``k = 1..K`` (array of length K), exactly, for a quadratic problem.

    With ``A = Q Λ Qᵀ`` each eigen-coordinate ``j`` evolves on its own: the row ``y ∈ Rⁿ`` of
    coordinate ``j`` across the n columns follows (math.md §1, [derived])::

        y_{k+1} = (y_k − η (λ_j (y_k − y_j*) + ξ_k) P) W_k,   ξ_k ~ N(0, σ²/d · I_n)

    with ``P = diag(1_m, 0_v)`` (auxiliary columns get no gradient). Hence, with
    ``D_j = I − ηλ_j P``, the mean ``μ`` and covariance ``Σ`` of y obey::

        μ_{k+1} = (μ_k D_j + ηλ_j y_j* P) W_k
        Σ_{k+1} = W_kᵀ D_j Σ_k D_j W_k + η² σ²/d · W_kᵀ P W_k

    and ``E‖∇F(u_k)‖² = Σ_j λ_j² [(μ_k 1/n − x̄*_j)² + 1ᵀΣ_k 1 / n²]`` with ``u_k = X_k 1/n``.
    W_k comes from ``algorithm.mixing_at(k)``, so any period and any deterministic (static, cyclic,
    or seeded) schedule is exact; a seeded random schedule (MATCHA) gives the expectation given its
    realised W_k. All columns start at ``problem.x0``.
    """
    if not isinstance(problem, _problems.Quadratic):
        raise ValueError(
            f"the exact recursion needs a quadratic problem (linear dynamics), got {type(problem).__name__}"
        )
    eta, K = check_run_args(algorithm, eta, K)
    problem.check_workers(algorithm.m)
    n, m, d = algorithm.n, algorithm.m, problem.d
    lam = problem.eigenvalues  # (d,)
    p = np.zeros(n)
    p[:m] = 1.0
    opt = problem._to_eig(problem.optima)  # (m or 1, d)
    ystar = np.zeros((d, n))
    ystar[:, :m] = opt.T if len(opt) == m else opt[0][:, None]
    xbar = opt.mean(axis=0)  # (d,)
    mu = np.repeat(problem._to_eig(problem.x0)[:, None], n, axis=1)  # (d, n)
    cov = np.zeros((d, n, n))
    dvec = 1.0 - eta * lam[:, None] * p[None, :]  # (d, n): diagonal of D_j
    drive = eta * lam[:, None] * ystar * p[None, :]  # (d, n)
    noise = eta**2 * problem.sigma2 / d
    ddouter = dvec[:, :, None] * dvec[:, None, :]
    pw_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    out = np.empty(K)
    for k in range(K):
        u = mu.mean(axis=1)
        out[k] = float(np.sum(lam**2 * ((u - xbar) ** 2 + cov.sum(axis=(1, 2)) / n**2)))
        w = np.asarray(algorithm.mixing_at(k))
        mu = mu * dvec + drive
        cov = cov * ddouter
        key = w.tobytes()
        if key not in pw_cache:
            pw_cache[key] = (None if np.array_equal(w, np.eye(n)) else w, w.T @ (p[:, None] * w))
        wk, wpw = pw_cache[key]
        if wk is not None:
            mu = mu @ wk
            cov = wk.T @ cov @ wk
        cov = cov + noise * wpw
    return out


def exact_expected_error(algorithm, problem, eta, K) -> float:
    """``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²`` for a quadratic, without sampling (:func:`exact_error_curve`)."""
    return float(exact_error_curve(algorithm, problem, eta, K).mean())
