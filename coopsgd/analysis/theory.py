"""Convergence bounds and step-size conditions, in plain NumPy.

Everything here is host-side float64 arithmetic on the constants of a problem (L, σ², ζ̄²,
F(u_1) − F_inf) and of an algorithm A(τ, W, v) (m, τ, v, and the consensus rate p = 1 − ζ²);
nothing touches JAX. Every constant is derived step by step in ``docs/theory.md``.

Sources, and how sure we are of each formula:

- :func:`cooperative_bound` — Theorem 1 of Wang & Joshi, "Cooperative SGD: A unified framework for
  the design and analysis of local-update SGD algorithms", JMLR 22(213), 2021, arXiv:1808.07576
  (identical data). The three-term form is the paper's **[recalled]**, and docs/theory.md §2
  re-derives it by the descent lemma with the same constants.
- :func:`lr_condition` — ``η_eff L + η² L² Γ(τ, ζ) ≤ 1`` with Γ from
  :func:`coopsgd.analysis.consensus.gamma`, **[derived]** in docs/theory.md §2.5; at ζ = 0, v = 0 it
  is the paper's local-SGD condition ``ηL + η²L²τ(τ − 1) ≤ 1`` **[recalled, confident]**.
- :func:`bound_for` — picks Theorem 1 (identical data) or Koloskova et al. 2020's non-convex bound
  (heterogeneous data, :mod:`coopsgd.analysis.koloskova`) and says which in ``Bound.theorem``.
- the error–runtime trade-off of local SGD (AdaComm's runtime bound and τ*) is in
  :mod:`coopsgd.analysis.tradeoff`.
- :func:`contraction`, :func:`matching_contraction` — ``‖E[WᵀW] − J‖₂``, the ρ = 1 − p of i.i.d.
  random W (Koloskova et al. 2020, arXiv:2003.10422, Assumption 4; Wang et al., "MATCHA",
  arXiv:1905.09435, Theorem 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from coopsgd.algorithms import matcha as _matcha
from coopsgd.analysis import koloskova
from coopsgd.analysis.consensus import (
    THEOREMS,
    Bound,
    LRCondition,
    StepSizeWarning,
    consensus_rate,
    gamma,
    noise_factor,
)
from coopsgd.core import schedules
from coopsgd.core.operator import as_operator
from coopsgd.core.validate import require_int as _integer
from coopsgd.core.validate import require_number

__all__ = [
    "THEOREMS",
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
    "step_size_for",
    "which_theorem",
]


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
    Source: Theorem 1 of Wang & Joshi, Cooperative SGD, arXiv:1808.07576 [recalled]; derived in
    docs/theory.md §2.3 (:func:`coopsgd.analysis.consensus.noise_factor` with ρ = ζ²).
    """
    tau = _integer("tau", tau, 1)
    return noise_factor(tau, _zeta(zeta) ** 2)


# ----------------------------------------------------------------------------------------------
# the main bound


def cooperative_bound(*, L, sigma2, f_gap, eta, m, tau, zeta, K, v=0, warn: bool = True) -> Bound:
    """Theorem 1 of Cooperative SGD: a bound on the average squared gradient norm of the averaged model.

    For A(τ, W, v) with m workers on identical data, all columns started at the same point u_1,
    and u_k = X_k 1 / (m + v)::

        (1/K) Σ_{k=1..K} E‖∇F(u_k)‖²
            ≤ 2 [F(u_1) − F_inf] / (η_eff K)           (optimization)
            + η_eff L σ² / m                             (noise)
            + η² L² σ² ((1 + ζ²)/(1 − ζ²) · τ − 1)       (network)

    with ``η_eff = m η / (m + v)`` (the averaged model's effective step, [derived]).

    Assumptions: F is L-smooth and bounded below by F_inf; stochastic gradients are unbiased with
    ``E‖g − ∇F‖² ≤ σ²`` (identically distributed data across workers); W is symmetric and doubly
    stochastic with ζ < 1 (for i.i.d. random W, ζ² is replaced by ``ρ = ‖E[WᵀW] − J‖₂``, see
    :func:`coopsgd.analysis.consensus.consensus_rate`); η satisfies :func:`lr_condition` (outside it
    this function warns with :class:`StepSizeWarning` and still returns the formula's value).

    Args:
        L: smoothness constant, > 0.
        sigma2: gradient-noise variance σ² per worker (the workers' average), ≥ 0.
        f_gap: ``F(u_1) − F_inf``, ≥ 0.
        eta: learning rate η, > 0.
        m: number of workers, ≥ 1.
        tau: communication period τ, ≥ 1.
        zeta: ζ of W (or ``sqrt(ρ)`` for a random W), in [0, 1).
        K: number of iterations, ≥ 1.
        v: number of auxiliary variables, ≥ 0.
        warn: whether to warn when η breaks the step-size condition.

    Returns:
        A :class:`Bound` with the three terms and their total (``theorem = "cooperative"``).

    Raises:
        ValueError: naming the constant that breaks an assumption (ζ ≥ 1, L ≤ 0, η ≤ 0, …).

    Example:
        >>> b = cooperative_bound(L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, m=4, tau=3, zeta=0.0, K=100)
        >>> round(b.optimization, 6), round(b.noise, 6), round(b.network, 6)
        (0.2, 0.025, 0.02)

    References:
        Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1
        [recalled; re-derived with the same constants in docs/theory.md §2].
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
    return Bound(optimization, noise, network, optimization + noise + network, 0.0, "cooperative")


def which_theorem(zeta2=0.0, growth=0.0, theorem: str = "auto") -> str:
    """``"cooperative"`` (Theorem 1) for identical data (ζ̄² = 0 and no growth term B), else
    ``"koloskova"``; ``theorem`` forces one (Theorem 1 is refused for heterogeneous data)."""
    heterogeneous = require_number("zeta2", zeta2) > 0 or require_number("growth", growth) > 0
    if theorem == "auto":
        return "koloskova" if heterogeneous else "cooperative"
    if theorem not in THEOREMS:
        raise ValueError(f"unknown theorem {theorem!r}; valid: auto, {', '.join(THEOREMS)}")
    if theorem == "cooperative" and heterogeneous:
        raise ValueError("Theorem 1 of Cooperative SGD assumes identical data across workers, but zeta2 = "
                         f"{zeta2:g}, growth = {growth:g} describe heterogeneous data; use theorem='koloskova'")
    return theorem


def bound_for(algorithm, *, L, sigma2, f_gap, eta, K, warn: bool = True, zeta2=0.0, growth=0.0,
              theorem: str = "auto") -> Bound:
    """The bound whose assumptions the run meets, with m, τ, v and p read from a :class:`coopsgd.Algorithm`.

    Identical data (``zeta2 = growth = 0``): :func:`cooperative_bound` (Theorem 1 of Cooperative SGD)
    with ζ = √ρ; heterogeneous data, ``(1/m) Σ_i ‖∇f_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²``:
    :func:`coopsgd.analysis.koloskova.koloskova_bound` (Koloskova et al. 2020, arXiv:2003.10422,
    Theorem 2, constants derived in docs/theory.md §3). ``Bound.theorem`` says which.
    ρ = 1 − p is :func:`coopsgd.analysis.consensus.consensus_rate` (ζ² for a static W).

    Raises:
        ValueError: when no bound applies: a W that is not symmetric (Overlap Local-SGD), a period
            that varies, ρ ≥ 1, or non-positive constants.

    Example:
        >>> import coopsgd
        >>> b = bound_for(coopsgd.local_sgd(4, tau=3), L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, K=100)
        >>> round(b.total, 6), b.theorem
        (0.245, 'cooperative')
    """
    rate = consensus_rate(algorithm)
    kind = which_theorem(zeta2, growth, theorem)
    if kind == "cooperative":
        return cooperative_bound(L=L, sigma2=sigma2, f_gap=f_gap, eta=eta, m=algorithm.m, tau=rate.tau,
                                 zeta=rate.q, K=K, v=algorithm.v, warn=warn)
    return koloskova.koloskova_bound(L=L, sigma2=sigma2, zeta2=zeta2, growth=growth, f_gap=f_gap, eta=eta,
                                     m=algorithm.m, tau=rate.tau, p=rate.p, K=K, v=algorithm.v, warn=warn)


def step_size_for(algorithm, *, L, eta, zeta2=0.0, growth=0.0, theorem: str = "auto") -> LRCondition:
    """The step-size condition of the bound :func:`bound_for` picks for the same arguments."""
    rate = consensus_rate(algorithm)
    if which_theorem(zeta2, growth, theorem) == "cooperative":
        return lr_condition(L=L, eta=eta, m=algorithm.m, tau=rate.tau, zeta=rate.q, v=algorithm.v)
    return koloskova.koloskova_lr_condition(L=L, eta=eta, m=algorithm.m, tau=rate.tau, p=rate.p,
                                            v=algorithm.v, growth=growth)


# ----------------------------------------------------------------------------------------------
# step sizes


def lr_condition(*, L, eta, m=1, tau=1, zeta=0.0, v=0) -> LRCondition:
    """Theorem 1's step-size condition ``η_eff L + η² L² Γ(τ, ζ) ≤ 1`` and the largest η meeting it.

    ``Γ(τ, ζ) = τ(τ − 1)(1 + 2ζ)/(1 − ζ) + 2τ²ζ²/(1 − ζ)²`` and ``η_eff = mη/(m + v)``
    (:func:`coopsgd.analysis.consensus.gamma`), **[derived]** in docs/theory.md §2.5: under it the
    gradient part of the consensus error is absorbed by the descent lemma's negative term
    ``−(1 − Lη_eff)(1/m)Σ_i‖∇F(x^(i))‖²``, for any v (the quadratic term keeps η, the linear η_eff).

    - For local SGD (ζ = 0, v = 0) this is exactly the condition of Cooperative SGD,
      ``ηL + η²L²τ(τ − 1) ≤ 1`` (Wang & Joshi, arXiv:1808.07576, Theorem 1) [recalled, confident].
    - For ζ > 0 it replaces the former ``Γ = τ²/(1 − ζ)² − τ``, a guess that was up to 2× too
      small (η_max up to √2 too large).

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
    b = L * m / (m + v)
    a = L**2 * gamma(tau, zeta)
    value = b * eta + a * eta**2
    if a <= 0.0:
        eta_max = 1.0 / b
    else:  # positive root of a x² + b x − 1 = 0, written to avoid cancellation
        eta_max = 2.0 / (b + math.sqrt(b * b + 4.0 * a))
    return LRCondition(bool(value <= 1.0 + 1e-12), float(value), float(eta_max), "cooperative")


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
    """``‖E[W_kᵀ W_k] − J‖₂``: ρ = 1 − p of an i.i.d. random W (it replaces ζ² in the bounds).

    Accepts a matrix (static W: ``‖WᵀW − J‖₂``, equal to ζ² when W is symmetric), a
    :class:`coopsgd.schedules.MixingSchedule` (E over its cycle, uniform), or an Algorithm. For a
    deterministic cycle the uniform average is not a rate for every window, so the bounds use
    :func:`coopsgd.analysis.consensus.consensus_rate` (the worst W^(r)) instead (docs/theory.md §2.4).

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
