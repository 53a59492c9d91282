"""The consensus constants both bounds share: the expected consensus rate of A(τ, W, v) and the two
factors the descent-lemma derivation produces (docs/theory.md §2, every step written out).

Notation: ρ = 1 − p is the expected contraction of one mixing, ``E‖Z(W − J)‖²_F ≤ ρ‖Z(I − J)‖²_F``;
q = √ρ (ζ itself for a static symmetric W). Mixing happens once per window of τ steps, at its end
(Cooperative SGD's period), so p is Koloskova et al.'s expected consensus rate over τ-step windows.

- :func:`noise_factor` ``N(τ, ρ) = τ(1 + ρ)/(1 − ρ) − 1``: the factor of ``η²L²σ²`` in the network
  term (Theorem 1 of Wang & Joshi, arXiv:1808.07576 [recalled], re-derived in docs/theory.md §2.3).
- :func:`gamma` ``Γ(τ, q) = τ(τ − 1)(1 + 2q)/(1 − q) + 2τ²q²/(1 − q)²``: the constant of the
  step-size condition, **[derived]** in docs/theory.md §2.5 (it is ``τ(τ − 1)`` at q = 0, the
  paper's local-SGD condition, and ``2q²/(1 − q)²`` at τ = 1).
- :func:`consensus_rate`: p of an Algorithm — static W: ``1 − ζ²``; i.i.d. random W (MATCHA):
  ``1 − ‖E[WᵀW] − J‖₂`` (Koloskova, Loizou, Boreiri, Jaggi & Stich, ICML 2020, arXiv:2003.10422,
  Assumption 4 [recalled]); a deterministic cycle: the worst mixing, ``1 − max_r ζ(W^(r))²``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from coopsgd.core import spectral
from coopsgd.core.validate import require_int, require_number

__all__ = [
    "THEOREMS",
    "Bound",
    "ConsensusRate",
    "LRCondition",
    "StepSizeWarning",
    "consensus_rate",
    "gamma",
    "noise_factor",
]

THEOREMS = {
    "cooperative": "Wang & Joshi 2021 (arXiv:1808.07576), Theorem 1: identical data; constants and "
                   "step-size condition derived in docs/theory.md §2",
    "koloskova": "Koloskova et al. 2020 (arXiv:2003.10422), Theorem 2 (non-convex): heterogeneous data, "
                 "expected consensus rate p; constants and step-size condition derived in docs/theory.md §3",
}
"""Short key of a bound → what it is and where its constants come from."""


class StepSizeWarning(UserWarning):
    """η lies outside the step-size condition under which the bound is claimed."""


class Bound(NamedTuple):
    """A bound on ``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²``: its terms, their sum and which theorem it is.

    ``total = optimization + noise + network``; ``dissimilarity`` is the part of ``network`` due to
    heterogeneous data (ζ̄²), 0 under Theorem 1.
    """

    optimization: float
    """``2 [F(u_1) − F_inf] / (η_eff K)`` (divided by ``1 − θ`` under Koloskova et al.)."""
    noise: float
    """``η_eff L σ² / m``: the mini-batch noise floor."""
    network: float
    """The consensus error: ``η² L² σ² N(τ, ρ)`` (Theorem 1), plus the ζ̄² part (Koloskova et al.)."""
    total: float
    dissimilarity: float = 0.0
    """The ζ̄² part of ``network`` (heterogeneous data)."""
    theorem: str = "cooperative"
    """A key of :data:`THEOREMS`."""


class LRCondition(NamedTuple):
    """Whether η satisfies the step-size condition, its left-hand side, and the largest η that does."""

    ok: bool
    value: float
    """The left-hand side; the condition is ``value ≤ 1``."""
    eta_max: float
    theorem: str = "cooperative"


class ConsensusRate(NamedTuple):
    """The expected consensus rate of an A(τ, W, v) over its τ-step windows (one mixing each)."""

    p: float
    """``1 − ρ``."""
    rho: float
    """The expected contraction of one mixing, ``ρ ≥ sup E‖Z(W − J)‖² / ‖Z(I − J)‖²``."""
    tau: int
    kind: str
    """``"static"``, ``"random"`` (i.i.d. W^(r), from E[WᵀW]) or ``"cycle"`` (worst W^(r))."""

    @property
    def q(self) -> float:
        """``√ρ``: ζ for a static W."""
        return math.sqrt(self.rho)


def _rho(rho) -> float:
    r = require_number("rho", rho, rule="a contraction 1 - p")
    if r >= 1.0:
        raise ValueError(f"the mixing must contract (rho = 1 - p < 1, i.e. zeta < 1), got rho = {rho!r}: a "
                         "disconnected graph or a bipartite graph with zero self-weights never reaches consensus")
    return r


def noise_factor(tau, rho) -> float:
    """``N(τ, ρ) = τ(1 + ρ)/(1 − ρ) − 1 = (τ − 1) + 2τρ/(1 − ρ)``.

    With ρ = ζ² it is the factor ``(1 + ζ²)/(1 − ζ²) · τ − 1`` of ``η²L²σ²`` in Theorem 1 of Wang &
    Joshi (arXiv:1808.07576) [recalled]; docs/theory.md §2.3 derives it: ``(2/K) Σ_k Σ_{s<k} ρ^{c(s,k)}``
    with c(s, k) the mixings between steps s and k, at most ``(τ − 1)/2 + τρ/(1 − ρ)`` per step.
    """
    tau = require_int("tau", tau, 1)
    r = _rho(rho)
    return (tau - 1.0) + 2.0 * tau * r / (1.0 - r)  # no cancellation at small ρ


def gamma(tau, q) -> float:
    """``Γ(τ, q) = τ(τ − 1)(1 + 2q)/(1 − q) + 2τ²q²/(1 − q)²``, q = √ρ (= ζ for a static W).

    The step-size constant **[derived]** in docs/theory.md §2.5: ``Γ = 2 max_s Σ_{k>s} A_k q^{c(s,k)}``
    with ``A_k = j_k + τq/(1 − q)`` (j_k steps since the last mixing), the coefficient that weighted
    Cauchy–Schwarz puts on ``‖∇F(X_s)‖²`` in the consensus error. ``Γ(τ, 0) = τ(τ − 1)`` is the
    local-SGD condition of Wang & Joshi (arXiv:1808.07576, Theorem 1) [recalled, confident];
    ``Γ(1, ζ) = 2ζ²/(1 − ζ)²``. It replaces the former guess ``τ²/(1 − ζ)² − τ``, which is smaller
    (0.50–0.79 of Γ for τ ≥ 2, ζ ≥ 0.6) and so was not proved.

    Example:
        >>> gamma(3, 0.0), round(gamma(1, 0.5), 12)
        (6.0, 2.0)
    """
    tau = require_int("tau", tau, 1)
    q = require_number("q", q, rule="sqrt of a contraction")
    if q >= 1.0:
        raise ValueError(f"q = sqrt(1 - p) must be < 1 (the mixing contracts), got q = {q!r}")
    return tau * (tau - 1.0) * (1.0 + 2.0 * q) / (1.0 - q) + 2.0 * tau**2 * q**2 / (1.0 - q) ** 2


def consensus_rate(algorithm) -> ConsensusRate:
    """p = 1 − ρ of an Algorithm's mixing, per τ-step window, for the bounds of this package.

    - static symmetric W: ``ρ = ζ(W)²`` (exact: ``‖Z(W − J)‖ ≤ ζ‖Z(I − J)‖``);
    - i.i.d. random symmetric W^(r) (MATCHA): ``ρ = ‖E[WᵀW] − J‖₂``, since
      ``E‖Z(W − J)‖²_F = tr(Z(E[WᵀW] − J)Zᵀ) ≤ ρ‖Z(I − J)‖²_F`` (Koloskova et al. 2020,
      arXiv:2003.10422, Assumption 4, with τ-step windows);
    - a deterministic cycle: ``ρ = max_r ζ(W^(r))²`` — the cycle average of WᵀW is not a rate for
      every window, so the worst mixing is used (a cycle with a non-contracting W^(r) is refused).

    Raises:
        ValueError: W not symmetric (Overlap Local-SGD), a varying period, or ρ ≥ 1.
    """
    if not algorithm.symmetric:
        raise ValueError(
            f"the bounds assume a symmetric doubly stochastic W, but {algorithm.name}'s W is only "
            "column-stochastic (not symmetric); no bound applies")
    tau = algorithm.tau
    if not isinstance(tau, int):
        raise ValueError(f"the bounds assume a constant period, but {algorithm.name} has tau = {tau!r}")
    schedule = algorithm.mixing
    cycle = schedule.cycle
    if cycle is not None and len(cycle) == 1:
        rho, kind = spectral.zeta(cycle[0]) ** 2, "static"
    elif cycle is not None:
        rho, kind = max(spectral.zeta(w) ** 2 for w in cycle), "cycle"
    else:
        try:
            rho, kind = float(schedule.contraction()), "random"
        except NotImplementedError as err:
            raise ValueError(
                f"the bounds need E[W^T W] in closed form for {algorithm.name}'s mixing schedule: {err}") from None
    if rho >= 1.0 - 1e-12:
        what = "one of its mixings W^(r) has zeta = 1" if kind == "cycle" else "its mixing never reaches consensus"
        raise ValueError(f"the bounds need an expected consensus rate p = 1 - rho > 0, but {algorithm.name} "
                         f"has rho = {rho:.6g}: {what}")
    return ConsensusRate(1.0 - rho, max(rho, 0.0), tau, kind)
