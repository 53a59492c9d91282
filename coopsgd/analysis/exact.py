"""The exact expected error of a run on a quadratic: the dynamics are linear, so the mean and
covariance of every column follow exact recursions (math.md §1, last bullet; [derived]). It is the
reference the Monte-Carlo harness (:mod:`coopsgd.analysis.verify`) is tested against, and the value
that decides whether a bound holds where it exists.

Covered: identical or per-worker Hessians sharing an eigenbasis (:class:`~coopsgd.analysis.problems.Quadratic`,
:class:`~coopsgd.analysis.noniid.HeterogeneousQuadratic`), any deterministic W_k (static, periodic,
cyclic, a seeded draw), and the expectation over i.i.d. random W_k through ``E[W]`` and
``E[W ⊗ W]`` (MATCHA, :mod:`coopsgd.analysis.moments`).

References:
    Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1 [recalled];
    Koloskova et al., ICML 2020, arXiv:2003.10422 (random W, heterogeneous data) [recalled].
"""

from __future__ import annotations

import math

import numpy as np

from coopsgd.analysis import moments as _moments
from coopsgd.analysis import problems as _problems

__all__ = ["check_run_args", "exact_error_curve", "exact_expected_error", "is_random"]


def check_run_args(algorithm, eta, K):
    """``(eta, K)`` as a float > 0 and an int ≥ 1, and ``algorithm`` an Algorithm; ValueError naming the bad one."""
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


def is_random(algorithm) -> bool:
    """Whether the algorithm's W^(r) are random draws (no finite cycle: MATCHA)."""
    return algorithm.mixing.cycle is None


def exact_error_curve(algorithm, problem, eta, K, *, over_w: str = "auto") -> np.ndarray:
    """``E‖∇F(u_k)‖²`` for ``k = 1..K`` (array of length K), exactly, for a quadratic problem.

    With ``A_i = Q diag(λ_i) Qᵀ`` (a shared eigenbasis) each eigen-coordinate ``j`` evolves on its
    own: the row ``y ∈ Rⁿ`` of coordinate ``j`` across the n columns follows (math.md §1, [derived])::

        y_{k+1} = (y_k D_j + η (Λ_j y_j*) P + η ξ_k P) W_k,   ξ_k ~ N(0, σ²/d · I_n)

    with ``Λ_j = diag(λ_1j … λ_mj, 0_v)``, ``D_j = I − ηΛ_j`` and ``P = diag(1_m, 0_v)``. Hence the
    mean ``μ`` and covariance ``Σ`` of y obey, for a known ``W_k``::

        μ_{k+1} = (μ_k D_j + ηΛ_j y_j*) W_k,   Σ_{k+1} = W_kᵀ (D_j Σ_k D_j + η²σ²/d · P) W_k

    and, for a random ``W_k`` independent of the past (``m̄ = μ_k D_j + ηΛ_j y_j*``, ``S = D_jΣ_kD_j +
    η²σ²/d · P``)::

        μ_{k+1} = m̄ E[W],   Σ_{k+1} = E[W]ᵀ S E[W] + E[(W − E W)ᵀ (S + m̄ᵀm̄) (W − E W)]

    the second moment ``E[Wᵀ M W]`` being ``E[W ⊗ W]`` applied to M. Finally ``E‖∇F(u_k)‖² =
    Σ_j λ̄_j² [(μ_k 1/n − x̄*_j)² + 1ᵀΣ_k 1 / n²]`` with ``u_k = X_k 1/n`` and λ̄_j the eigenvalues
    of ``Ā = mean_i A_i``. All columns start at ``problem.x0``.

    Args:
        over_w: ``"expected"`` averages over random W_k (the quantity the bounds bound);
            ``"realised"`` uses the seeded draws ``algorithm.mixing_at(k)`` (what one engine run
            sees); ``"auto"``: expected for a random schedule, realised otherwise.
    """
    if not isinstance(problem, _problems.Quadratic):
        raise ValueError(
            f"the exact recursion needs a quadratic problem (linear dynamics), got {type(problem).__name__}"
        )
    eta, K = check_run_args(algorithm, eta, K)
    problem.check_workers(algorithm.m)
    if over_w not in ("auto", "expected", "realised"):
        raise ValueError(f"over_w must be 'auto', 'expected' or 'realised', got {over_w!r}")
    expected = is_random(algorithm) if over_w == "auto" else over_w == "expected"
    mom = _moments.mixing_moments(algorithm) if expected else None
    n, m, d = algorithm.n, algorithm.m, problem.d
    lam_w = problem.worker_eigenvalues  # (m or 1, d)
    lam_w = np.broadcast_to(lam_w, (m, d))
    opt = np.broadcast_to(problem._to_eig(problem.optima), (m, d))
    xbar = problem._to_eig(problem.x_star)  # (d,)
    lam_bar = problem.eigenvalues  # (d,): Ā
    p = np.zeros(n)
    p[:m] = 1.0
    mu = np.repeat(problem._to_eig(problem.x0)[:, None], n, axis=1)  # (d, n)
    cov = np.zeros((d, n, n))
    dvec = np.ones((d, n))
    dvec[:, :m] = 1.0 - eta * lam_w.T  # diagonal of D_j
    drive = np.zeros((d, n))
    drive[:, :m] = eta * (lam_w * opt).T
    noise = eta**2 * problem.sigma2 / d * np.diag(p)
    ddouter = dvec[:, :, None] * dvec[:, None, :]
    pw_cache: dict[bytes, tuple[np.ndarray | None, np.ndarray]] = {}
    out = np.empty(K)
    for k in range(K):
        u = mu.mean(axis=1)
        out[k] = float(np.sum(lam_bar**2 * ((u - xbar) ** 2 + cov.sum(axis=(1, 2)) / n**2)))
        mbar = mu * dvec + drive
        cov = cov * ddouter + noise
        if mom is not None:
            if algorithm.communicates(k):
                cov = mom.mean.T @ cov @ mom.mean + mom.centred(cov + mbar[:, :, None] * mbar[:, None, :])
                mu = mbar @ mom.mean
            else:
                mu = mbar
            continue
        w = np.asarray(algorithm.mixing_at(k))
        key = w.tobytes()
        if key not in pw_cache:
            pw_cache[key] = None if np.array_equal(w, np.eye(n)) else w
        wk = pw_cache[key]
        mu = mbar if wk is None else mbar @ wk
        if wk is not None:
            cov = wk.T @ cov @ wk
    return out


def exact_expected_error(algorithm, problem, eta, K, *, over_w: str = "auto") -> float:
    """``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²`` for a quadratic, without sampling (:func:`exact_error_curve`)."""
    return float(exact_error_curve(algorithm, problem, eta, K, over_w=over_w).mean())
