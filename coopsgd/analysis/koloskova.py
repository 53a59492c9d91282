"""Heterogeneous data and random topologies: the non-convex bound of Koloskova et al. (2020) for A(τ, W, v).

Koloskova, Loizou, Boreiri, Jaggi & Stich, "A Unified Theory of Decentralized SGD with Changing
Topology and Local Updates", ICML 2020, arXiv:2003.10422, Theorem 2 (non-convex case) [recalled]:
with each f_i L-smooth, noise ``E‖g_i − ∇f_i‖² ≤ σ²`` (σ² the workers' average), dissimilarity
``(1/m) Σ_i ‖∇f_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²`` and an expected consensus rate p over windows
of τ steps, for ``η ≤ c·p/(τL)``::

    (1/K) Σ_k E‖∇F(u_k)‖² = O( r₀/(ηK) + ηLσ²/m + η²L² (τ/p)(σ² + (τ/p) ζ̄²) ).

The paper states the rate up to constants. This module implements the **same form with explicit
constants derived here** along the descent-lemma route of Theorem 1 (docs/theory.md §3, every step;
the paper's own numerical constants were not re-read, so they are not used). With
``a = η²L²Γ(τ, q)``, ``q = √(1 − p)``, ``N = N(τ, 1 − p)`` (:mod:`coopsgd.analysis.consensus`),
``D = 1 − 2a`` and ``θ = 2aB/D``::

    (1/K) Σ_k E‖∇F(u_k)‖² ≤ [ 2Δ/(η_eff K) + η_eff Lσ²/m + (η²L²σ² N + 2a ζ̄²)/D ] / (1 − θ)

under the step-size condition ``2a(1 + B) < 1`` and ``Lη_eff + (v/n)·a/D ≤ 1`` [derived]. The ζ̄²
part grows like ``η²L² ζ̄² τ²/p²`` and the σ² part like ``η²L² σ² τ/p``: the paper's form.
"""

from __future__ import annotations

import math
import warnings

from coopsgd.analysis.consensus import (
    Bound,
    LRCondition,
    StepSizeWarning,
    gamma,
    noise_factor,
)
from coopsgd.core.validate import require_int, require_number

__all__ = ["koloskova_bound", "koloskova_lr_condition"]


def _p(p) -> float:
    p = require_number("p", p, rule="an expected consensus rate 1 - rho")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"the expected consensus rate p must lie in (0, 1] (p = 1 - zeta^2 for a static W), got p = {p!r}")
    return p


def _constants(L, eta, m, tau, p, v, growth):
    L = require_number("L", L, positive=True, rule="each f_i must be L-smooth")
    eta = require_number("eta", eta, positive=True, rule="a learning rate")
    m, v, tau = require_int("m", m, 1), require_int("v", v, 0), require_int("tau", tau, 1)
    p = _p(p)
    growth = require_number("growth", growth, rule="B in zeta2 + B |grad F|^2")
    a = eta**2 * L**2 * gamma(tau, math.sqrt(max(1.0 - p, 0.0)))
    return L, eta, m, tau, p, v, growth, a


def _value(L, eta, m, v, growth, a) -> tuple[float, float]:
    """(the linear constraint ``Lη_eff + (v/n) a/D``, the quadratic one ``2a(1 + B)``)."""
    n = m + v
    d = 1.0 - 2.0 * a
    first = L * eta * m / n + (v / n) * a / d if d > 0 else math.inf
    return first, 2.0 * a * (1.0 + growth)


def koloskova_lr_condition(*, L, eta, m=1, tau=1, p=1.0, v=0, growth=0.0) -> LRCondition:
    """The step-size condition of :func:`koloskova_bound`: ``2a(1 + B) < 1`` and ``Lη_eff + (v/n)·a/(1 − 2a) ≤ 1``.

    ``a = η²L²Γ(τ, √(1 − p))`` [derived, docs/theory.md §3.2–3.3]. With v = 0 it reads ``ηL ≤ 1`` and
    ``η < 1/(L √(2(1 + B) Γ))``, i.e. ``η ≲ p/(4τL√(1 + B))`` for p → 0: the form ``η ≤ c·p/(τL)``
    of Koloskova et al. (2020, arXiv:2003.10422, Theorem 2) with our constant. ``value`` is the
    larger of the two left-hand sides (the condition is ``value ≤ 1``, the second strictly).

    Example:
        >>> c = koloskova_lr_condition(L=1.0, eta=0.1, tau=2)   # local SGD: Γ = 2, a = 0.02
        >>> c.ok, round(c.value, 12), round(c.eta_max, 12)
        (True, 0.1, 0.5)
    """
    L, eta, m, tau, p, v, growth, a = _constants(L, eta, m, tau, p, v, growth)
    first, second = _value(L, eta, m, v, growth, a)
    ok = first <= 1.0 + 1e-12 and second < 1.0
    unit = a / eta**2  # a = unit · η²

    def worst(x):
        return max(_value(L, x, m, v, growth, unit * x * x))

    hi = (m + v) / (m * L)  # Lη_eff ≤ 1 is necessary
    if unit > 0:
        hi = min(hi, 1.0 / math.sqrt(2.0 * (1.0 + growth) * unit))
    if worst(hi) > 1.0:  # the linear constraint (v > 0) binds first: bisect
        lo = 0.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if worst(mid) <= 1.0 else (lo, mid)
        hi = lo
    return LRCondition(bool(ok), float(max(first, second)), float(hi), "koloskova")


def koloskova_bound(*, L, sigma2, zeta2, f_gap, eta, m, tau, p, K, v=0, growth=0.0, warn: bool = True) -> Bound:
    """A bound on ``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²`` for heterogeneous data and an expected consensus rate p.

    The non-convex bound of Koloskova et al. (ICML 2020, arXiv:2003.10422, Theorem 2) for
    A(τ, W, v), with constants derived in docs/theory.md §3 (see the module docstring)::

        [ 2Δ/(η_eff K) + η_eff Lσ²/m + (η²L²σ² N(τ, 1−p) + 2a ζ̄²)/(1 − 2a) ] / (1 − θ)

    ``a = η²L²Γ(τ, √(1−p))``, ``θ = 2aB/(1 − 2a)``, ``η_eff = mη/(m + v)``. Each returned term carries
    the factor ``1/(1 − θ)``; ``network`` holds both the σ² and the ζ̄² parts, ``dissimilarity`` the
    latter. Outside :func:`koloskova_lr_condition` it warns (:class:`StepSizeWarning`) and returns
    ``inf`` where the formula has no finite value.

    Assumptions: each f_i L-smooth, F bounded below by F_inf; unbiased gradients with the workers'
    average noise ``(1/m)Σ_i E‖g_i − ∇f_i‖² ≤ σ²``, independent across workers and steps;
    ``(1/m) Σ_i ‖∇f_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²`` for every x; symmetric W^(r), independent of
    the past, with ``E‖Z(W − J)‖² ≤ (1 − p)‖Z(I − J)‖²``, mixing once per τ steps; all columns start
    at u_1.

    Args:
        L, sigma2, f_gap, eta, m, tau, K, v: as in :func:`coopsgd.analysis.theory.cooperative_bound`.
        zeta2: ζ̄², ≥ 0.
        p: the expected consensus rate per τ-step window, in (0, 1] (``1 − ζ²`` for a static W).
        growth: B, ≥ 0.
        warn: warn outside the step-size condition.

    Example:
        >>> b = koloskova_bound(L=1.0, sigma2=0.0, zeta2=1.0, f_gap=0.0, eta=0.1, m=4, tau=2, p=1.0, K=10)
        >>> round(b.network, 12), b.theorem        # 2a ζ̄²/(1 − 2a), a = 0.01 · 2
        (0.041666666667, 'koloskova')
    """
    L, eta, m, tau, p, v, growth, a = _constants(L, eta, m, tau, p, v, growth)
    sigma2 = require_number("sigma2", sigma2, rule="a variance")
    zeta2 = require_number("zeta2", zeta2, rule="a dissimilarity")
    f_gap = require_number("f_gap", f_gap, rule="F(u_1) - F_inf with F_inf a lower bound")
    K = require_int("K", K, 1)
    cond = koloskova_lr_condition(L=L, eta=eta, m=m, tau=tau, p=p, v=v, growth=growth)
    if warn and not cond.ok:
        warnings.warn(
            f"eta = {eta:.6g} breaks the step-size condition of the heterogeneous bound (value {cond.value:.4g}; "
            f"largest eta: {cond.eta_max:.6g}); the bound is not claimed there", StepSizeWarning, stacklevel=2)
    eta_eff = m * eta / (m + v)
    d = 1.0 - 2.0 * a
    theta = 2.0 * a * growth / d if d > 0 else math.inf
    if not (d > 0 and theta < 1):
        inf = math.inf
        return Bound(inf, inf, inf, inf, inf, "koloskova")
    scale = 1.0 / (1.0 - theta)
    optimization = scale * 2.0 * f_gap / (eta_eff * K)
    noise = scale * eta_eff * L * sigma2 / m
    dissimilarity = scale * 2.0 * a * zeta2 / d
    network = scale * eta**2 * L**2 * sigma2 * noise_factor(tau, 1.0 - p) / d + dissimilarity
    return Bound(optimization, noise, network, optimization + noise + network, dissimilarity, "koloskova")
