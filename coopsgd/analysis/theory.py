"""Convergence bounds and step-size conditions, in plain NumPy.

Everything here is host-side float64 arithmetic on the constants of a problem (L, σ², F(u_1) − F_inf)
and of an algorithm A(τ, W, v) (m, τ, v, ζ); nothing touches JAX.

Sources, and how sure we are of each formula (see ``docs/theory.md`` and the project's
``reference/math.md``):

- :func:`cooperative_bound` — Theorem 1 of Wang & Joshi, "Cooperative SGD: A unified framework for
  the design and analysis of local-update SGD algorithms", JMLR 22(213), 2021, arXiv:1808.07576.
  The form is **[recalled]**: its constants were not re-read in the paper; the project's numerical
  verification (:mod:`coopsgd.analysis.verify`) is the judge.
- :func:`lr_condition` — the local-SGD condition ``ηL + η²L²τ(τ−1) ≤ 1`` is the paper's
  **[recalled, confident]**; the extension to ζ > 0 is **ours [open]** (see its docstring).
- the error–runtime trade-off of local SGD (AdaComm's runtime bound and τ*) is in
  :mod:`coopsgd.analysis.tradeoff`.
- :func:`contraction`, :func:`matching_contraction` — ``‖E[WᵀW] − J‖₂``, the quantity that replaces
  ζ² for time-varying W (Cooperative SGD §5; Wang et al., "MATCHA", arXiv:1905.09435, Theorem 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from coopsgd.algorithms import matcha as _matcha
from coopsgd.core import schedules
from coopsgd.core.operator import as_operator
from coopsgd.core.validate import require_int as _integer
from coopsgd.core.validate import require_number

__all__ = [
    "Bound",
    "LRCondition",
    "OptimalLR",
    "StepSizeWarning",
    "bound_for",
    "contraction",
    "cooperative_bound",
    "effective_zeta",
    "linear_speedup_lr",
    "lr_condition",
    "matching_contraction",
    "network_factor",
    "optimal_lr",
]


class StepSizeWarning(UserWarning):
    """η lies outside the step-size condition under which the bound is claimed."""


class Bound(NamedTuple):
    """The three terms of Theorem 1 of Cooperative SGD and their sum (a bound on
    ``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²``)."""

    optimization: float
    """``2 [F(u_1) − F_inf] / (η_eff K)``."""
    noise: float
    """``η_eff L σ² / m``: the mini-batch noise floor."""
    network: float
    """``η² L² σ² ((1 + ζ²)/(1 − ζ²) · τ − 1)``: the price of local steps and sparse mixing."""
    total: float


class LRCondition(NamedTuple):
    """Whether η satisfies the step-size condition, its left-hand side, and the largest η that does."""

    ok: bool
    value: float
    """``η_eff L + η² L² Γ(τ, ζ)``; the condition is ``value ≤ 1``."""
    eta_max: float


class OptimalLR(NamedTuple):
    """The η minimising the bound (within the step-size condition) and the bound there."""

    eta: float
    rate: float
    """``bound.total`` at ``eta``."""
    bound: Bound
    constrained: bool
    """True when the unconstrained minimiser broke the step-size condition and ``eta = eta_max``."""


# ----------------------------------------------------------------------------------------------
# validation


def _positive(name: str, value, *, allow_zero: bool = False, why: str = "") -> float:
    return require_number(name, value, positive=not allow_zero, rule=why.strip(" ()"))


def _zeta(zeta) -> float:
    z = _positive("zeta", zeta, allow_zero=True)
    if z >= 1.0:
        raise ValueError(
            f"Theorem 1 of Cooperative SGD needs zeta < 1 (the mixing reaches consensus), got "
            f"zeta = {zeta!r}: a disconnected graph or a bipartite graph with zero self-weights "
            "has zeta = 1 and no finite bound"
        )
    return z


def network_factor(tau: int, zeta: float) -> float:
    """``(1 + ζ²)/(1 − ζ²) · τ − 1``, the factor of ``η²L²σ²`` in the network-error term.

    Equals ``τ − 1`` for exact averaging (ζ = 0) and ``2ζ²/(1 − ζ²)`` for τ = 1 (D-PSGD).
    Source: Theorem 1 of Wang & Joshi, Cooperative SGD, arXiv:1808.07576 [recalled].
    """
    tau = _integer("tau", tau, 1)
    z2 = _zeta(zeta) ** 2
    return (tau - 1.0) + tau * 2.0 * z2 / (1.0 - z2)  # the same, without cancellation at small ζ


# ----------------------------------------------------------------------------------------------
# the main bound


def cooperative_bound(*, L, sigma2, f_gap, eta, m, tau, zeta, K, v=0, warn: bool = True) -> Bound:
    """Theorem 1 of Cooperative SGD: a bound on the average squared gradient norm of the averaged model.

    For A(τ, W, v) with m workers, all columns started at the same point u_1, and
    u_k = X_k 1 / (m + v)::

        (1/K) Σ_{k=1..K} E‖∇F(u_k)‖²
            ≤ 2 [F(u_1) − F_inf] / (η_eff K)           (optimization)
            + η_eff L σ² / m                             (noise)
            + η² L² σ² ((1 + ζ²)/(1 − ζ²) · τ − 1)       (network)

    with ``η_eff = m η / (m + v)`` (the averaged model's effective step, [derived]).

    Assumptions: F is L-smooth and bounded below by F_inf; stochastic gradients are unbiased with
    ``E‖g − ∇F‖² ≤ σ²`` (identically distributed data across workers); W is symmetric and doubly
    stochastic with ζ < 1 (for a time-varying W, ζ² is replaced by ``‖E[WᵀW] − J‖₂``, see
    :func:`contraction`); η satisfies :func:`lr_condition` (outside it this function warns with
    :class:`StepSizeWarning` and still returns the formula's value).

    Args:
        L: smoothness constant, > 0.
        sigma2: gradient-noise variance σ² per worker, ≥ 0.
        f_gap: ``F(u_1) − F_inf``, ≥ 0.
        eta: learning rate η, > 0.
        m: number of workers, ≥ 1.
        tau: communication period τ, ≥ 1.
        zeta: ζ of W (or ``sqrt(‖E[WᵀW] − J‖₂)`` for a time-varying W), in [0, 1).
        K: number of iterations, ≥ 1.
        v: number of auxiliary variables, ≥ 0.
        warn: whether to warn when η breaks the step-size condition.

    Returns:
        A :class:`Bound` with the three terms and their total.

    Raises:
        ValueError: naming the constant that breaks an assumption (ζ ≥ 1, L ≤ 0, η ≤ 0, …).

    Example:
        >>> b = cooperative_bound(L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, m=4, tau=3, zeta=0.0, K=100)
        >>> round(b.optimization, 6), round(b.noise, 6), round(b.network, 6)
        (0.2, 0.025, 0.02)

    References:
        Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1
        [recalled: the constants were not re-read in the paper; the limits ζ = 0, τ = 1 and W = J
        reduce to the mini-batch SGD, local SGD and D-PSGD bounds].
    """
    L = _positive("L", L, why=" (F must be L-smooth)")
    sigma2 = _positive("sigma2", sigma2, allow_zero=True, why=" (a variance)")
    f_gap = _positive("f_gap", f_gap, allow_zero=True, why=" (F(u_1) - F_inf with F_inf a lower bound)")
    eta = _positive("eta", eta, why=" (a learning rate)")
    m = _integer("m", m, 1)
    v = _integer("v", v, 0)
    K = _integer("K", K, 1)
    factor = network_factor(tau, zeta)
    eta_eff = m * eta / (m + v)
    if warn:
        cond = lr_condition(L=L, eta=eta, m=m, tau=tau, zeta=zeta, v=v)
        if not cond.ok:
            warnings.warn(
                f"eta = {eta:.6g} breaks the step-size condition eta_eff*L + eta^2*L^2*Gamma(tau, zeta) "
                f"<= 1 (value {cond.value:.4g}; largest eta that satisfies it: {cond.eta_max:.6g}); "
                "the bound is not claimed there",
                StepSizeWarning,
                stacklevel=2,
            )
    optimization = 2.0 * f_gap / (eta_eff * K)
    noise = eta_eff * L * sigma2 / m
    network = eta**2 * L**2 * sigma2 * factor
    return Bound(optimization, noise, network, optimization + noise + network)


def _algorithm_constants(algorithm) -> tuple[int, int, int, float]:
    """(m, τ, v, ζ) of an Algorithm, refusing those outside Theorem 1."""
    if not algorithm.symmetric:
        raise ValueError(
            f"Theorem 1 of Cooperative SGD assumes a symmetric doubly stochastic W, but "
            f"{algorithm.name}'s W is only column-stochastic (not symmetric); no bound applies"
        )
    tau = algorithm.tau
    if not isinstance(tau, int):
        raise ValueError(
            f"Theorem 1 of Cooperative SGD assumes a constant period, but {algorithm.name} has "
            f"tau = {tau!r}"
        )
    try:
        zeta = algorithm.zeta
    except NotImplementedError as err:
        raise ValueError(
            f"the bound needs E[W^T W] in closed form for {algorithm.name}'s mixing schedule: {err}"
        ) from None
    if zeta >= 1.0 - 1e-12:
        raise ValueError(
            f"Theorem 1 of Cooperative SGD needs zeta < 1, but {algorithm.name} has "
            f"zeta = {zeta:.6g}: its mixing never reaches consensus"
        )
    return algorithm.m, tau, algorithm.v, zeta


def bound_for(algorithm, *, L, sigma2, f_gap, eta, K, warn: bool = True) -> Bound:
    """:func:`cooperative_bound` with m, τ, v and ζ read from a :class:`coopsgd.Algorithm`.

    For a time-varying W, ζ is ``sqrt(‖E[WᵀW] − J‖₂)`` (:attr:`coopsgd.Algorithm.zeta`).

    Raises:
        ValueError: when the theorem does not apply: a W that is not symmetric (Overlap Local-SGD),
            a period that varies, ζ ≥ 1, or non-positive constants.

    Example:
        >>> import coopsgd
        >>> b = bound_for(coopsgd.local_sgd(4, tau=3), L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, K=100)
        >>> round(b.total, 6)
        0.245
    """
    m, tau, v, zeta = _algorithm_constants(algorithm)
    return cooperative_bound(
        L=L, sigma2=sigma2, f_gap=f_gap, eta=eta, m=m, tau=tau, zeta=zeta, K=K, v=v, warn=warn
    )


# ----------------------------------------------------------------------------------------------
# step sizes


def _gamma(tau: int, zeta: float) -> float:
    """Γ(τ, ζ) = τ²/(1 − ζ)² − τ: the project's choice [open], equal to τ(τ − 1) at ζ = 0."""
    return tau**2 / (1.0 - zeta) ** 2 - tau


def lr_condition(*, L, eta, m=1, tau=1, zeta=0.0, v=0) -> LRCondition:
    """The step-size condition ``η_eff L + η² L² Γ(τ, ζ) ≤ 1`` and the largest η meeting it.

    With ``Γ(τ, ζ) = τ² / (1 − ζ)² − τ`` and ``η_eff = mη/(m + v)``.

    - For local SGD (ζ = 0, v = 0) this is exactly the condition of Cooperative SGD,
      ``ηL + η²L²τ(τ − 1) ≤ 1`` (Wang & Joshi, arXiv:1808.07576, Theorem 1) [recalled, confident].
    - For ζ > 0 the paper's exact condition is **[open]**; Γ above is the project's choice: it
      reduces to ``τ(τ − 1)`` at ζ = 0 and grows like ``τ²/(1 − ζ)²``, the scaling of the
      consensus error over a period. With v > 0 the linear term uses η_eff (the step of the
      averaged model); this too is ours.

    Outside the condition the bound is not claimed; :func:`cooperative_bound` warns, nothing fails.

    Returns:
        :class:`LRCondition` ``(ok, value, eta_max)``; ``eta_max`` solves the condition with equality.

    Example:
        >>> c = lr_condition(L=1.0, eta=0.5, tau=2)       # 0.5 + 0.25 * 2 = 1.0
        >>> c.ok, c.value, round(c.eta_max, 12)
        (True, 1.0, 0.5)
    """
    L = _positive("L", L, why=" (F must be L-smooth)")
    eta = _positive("eta", eta, why=" (a learning rate)")
    m = _integer("m", m, 1)
    v = _integer("v", v, 0)
    tau = _integer("tau", tau, 1)
    zeta = _zeta(zeta)
    gamma = _gamma(tau, zeta)
    b = L * m / (m + v)
    a = L**2 * gamma
    value = b * eta + a * eta**2
    if a <= 0.0:
        eta_max = 1.0 / b
    else:  # positive root of a x² + b x − 1 = 0, written to avoid cancellation
        eta_max = 2.0 / (b + math.sqrt(b * b + 4.0 * a))
    return LRCondition(bool(value <= 1.0 + 1e-12), float(value), float(eta_max))


def optimal_lr(*, L, sigma2, f_gap, m, tau, zeta, K, v=0) -> OptimalLR:
    """The η that minimises :func:`cooperative_bound`, kept within :func:`lr_condition`.

    The bound is ``a/η + bη + cη²`` with ``a = 2 f_gap (m + v)/(mK)``, ``b = Lσ²/(m + v)``,
    ``c = L²σ² ((1+ζ²)/(1−ζ²) τ − 1)``; its minimiser is the positive root of
    ``2cη³ + bη² − a = 0`` [derived from Theorem 1 of Cooperative SGD, arXiv:1808.07576]. If that η
    breaks the step-size condition, ``eta_max`` is returned instead (the bound is convex in η, so it
    is the constrained minimiser).

    Raises:
        ValueError: if ``f_gap = 0`` (the optimum is η → 0) or the bound does not apply.
    """
    f_gap = _positive("f_gap", f_gap, why=" (with F(u_1) = F_inf the best step is 0)")
    L = _positive("L", L, why=" (F must be L-smooth)")
    sigma2 = _positive("sigma2", sigma2, allow_zero=True, why=" (a variance)")
    m, v, K = _integer("m", m, 1), _integer("v", v, 0), _integer("K", K, 1)
    a = 2.0 * f_gap * (m + v) / (m * K)
    b = L * sigma2 / (m + v)
    c = L**2 * sigma2 * network_factor(tau, zeta)
    eta_max = lr_condition(L=L, eta=1.0, m=m, tau=tau, zeta=zeta, v=v).eta_max
    if b == 0.0 and c == 0.0:
        eta = math.inf
    elif c == 0.0:
        eta = math.sqrt(a / b)
    else:
        roots = np.roots([2.0 * c, b, 0.0, -a])
        eta = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * (1 + abs(r)) and r.real > 0))
    constrained = eta > eta_max
    eta = min(eta, eta_max)
    bound = cooperative_bound(
        L=L, sigma2=sigma2, f_gap=f_gap, eta=eta, m=m, tau=tau, zeta=zeta, K=K, v=v, warn=False
    )
    return OptimalLR(float(eta), bound.total, bound, bool(constrained))


def linear_speedup_lr(*, L, sigma2, f_gap, m, tau, zeta, K) -> OptimalLR:
    """η = (1/L)·sqrt(m/K) (v = 0) and the bound there.

    There the bound reads ``[2L(F(u_1) − F_inf) + σ²]/sqrt(mK) + (m/K)·σ²·((1+ζ²)/(1−ζ²)·τ − 1)``:
    linear speed-up O(1/sqrt(mK)) while the network term is dominated (for local SGD, τ = O(K^½ /
    m^{3/2})) [derived from Theorem 1 of Cooperative SGD, arXiv:1808.07576, Corollary 1 as recalled].
    ``constrained`` reports whether this η breaks the step-size condition (it is kept regardless).
    """
    L = _positive("L", L, why=" (F must be L-smooth)")
    m, K = _integer("m", m, 1), _integer("K", K, 1)
    eta = math.sqrt(m / K) / L
    bound = cooperative_bound(
        L=L, sigma2=sigma2, f_gap=f_gap, eta=eta, m=m, tau=tau, zeta=zeta, K=K, warn=False
    )
    ok = lr_condition(L=L, eta=eta, m=m, tau=tau, zeta=zeta).ok
    return OptimalLR(eta, bound.total, bound, not ok)


# ----------------------------------------------------------------------------------------------
# time-varying mixing


def contraction(w) -> float:
    """``‖E[W_kᵀ W_k] − J‖₂``: the quantity that replaces ζ² in the bound for time-varying W.

    Accepts a matrix (static W: ``‖WᵀW − J‖₂``, equal to ζ² when W is symmetric), a
    :class:`coopsgd.schedules.MixingSchedule` (E over its cycle, uniform), or an Algorithm.

    References:
        Wang & Joshi, Cooperative SGD, §5; Wang et al., MATCHA, arXiv:1905.09435, Theorem 1.

    Example:
        >>> import numpy as np
        >>> round(contraction(np.array([[0.75, 0.25], [0.25, 0.75]])), 12)  # ζ = 0.5
        0.25
    """
    schedule = getattr(w, "mixing", None) or w
    if hasattr(schedule, "contraction"):
        try:
            return float(schedule.contraction())
        except NotImplementedError as err:
            raise ValueError(f"E[W^T W] is not known in closed form for {schedule!r}: {err}") from None
    return float(schedules.static(as_operator(w)).contraction())


def matching_contraction(laplacians: Sequence[np.ndarray], probabilities, alpha) -> float:
    """``‖E[WᵀW] − J‖₂`` for MATCHA's ``W = I − α Σ_j B_j L_j`` with independent ``B_j ~ Bernoulli(p_j)``.

    Exact: W is symmetric, so ``E[WᵀW] = I − 2α E[L] + α² E[L²]`` with ``E[L] = Σ p_j L_j`` and
    ``E[L²] = E[L]² + Σ_j p_j (1 − p_j) L_j² = E[L]² + 2 Σ p_j(1 − p_j) L_j`` (matchings:
    ``L_j² = 2 L_j``) — :func:`coopsgd.algorithms.matcha.contraction`, the one implementation.

    References:
        Wang, Sahu, Yang, Joshi & Kar, "MATCHA", arXiv:1905.09435, §3 and Theorem 1 [code].
    """
    laps = [np.asarray(x, dtype=np.float64) for x in laplacians]
    if not laps:
        raise ValueError("matching_contraction needs at least one Laplacian")
    n = laps[0].shape[0]
    for j, lap in enumerate(laps):
        if lap.shape != (n, n) or not np.allclose(lap, lap.T) or not np.allclose(lap.sum(axis=0), 0):
            raise ValueError(f"laplacians[{j}] must be a symmetric {n} x {n} Laplacian (columns sum to 0)")
        if not np.allclose(lap @ lap, 2.0 * lap):
            raise ValueError(f"laplacians[{j}] must be a matching's Laplacian (L² = 2L: no node in two edges)")
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (len(laps),) or np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"probabilities must be {len(laps)} numbers in [0, 1], got {probabilities!r}")
    return _matcha.contraction(float(alpha), *_matcha.expected_laplacian_moments(np.stack(laps), p))


def effective_zeta(w) -> float:
    """``sqrt(contraction(w))``: a ζ-equivalent for time-varying W (ζ itself for static symmetric W)."""
    return math.sqrt(contraction(w))
