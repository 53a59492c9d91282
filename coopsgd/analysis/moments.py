"""First and second moments of a random mixing matrix, for the exact recursion over random W.

For MATCHA's ``W = I − α Σ_j B_j L_j`` with independent ``B_j ~ Bernoulli(p_j)`` (Wang, Sahu, Yang,
Joshi & Kar, arXiv:1905.09435, §3 [code]) the moments are in closed form [derived]:

- ``E[W] = I − α Σ_j p_j L_j``;
- ``E[W ⊗ W] = E[W] ⊗ E[W] + α² Σ_j p_j (1 − p_j) L_j ⊗ L_j`` (the B_j are independent, so only the
  ``j = l`` terms of ``E[B_j B_l] − p_j p_l`` survive);
- equivalently ``E[Wᵀ M W] = E[W]ᵀ M E[W] + α² Σ_j p_j (1 − p_j) L_j M L_j`` for any n × n M, which is
  how the recursion applies it (no n⁴ array).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from coopsgd.algorithms.matcha import MatchaSchedule

__all__ = ["MixingMoments", "expected_kron", "mixing_moments"]


class MixingMoments(NamedTuple):
    """``mean = E[W]`` (n × n) and the centred second moment ``M ↦ E[(W − E W)ᵀ M (W − E W)]``."""

    mean: np.ndarray
    weights: np.ndarray
    """``α² p_j (1 − p_j)``, one per matching."""
    laplacians: np.ndarray
    """``(M, n, n)``."""

    def centred(self, m: np.ndarray) -> np.ndarray:
        """``E[(W − E W)ᵀ M (W − E W)] = Σ_j α² p_j (1 − p_j) L_j M L_j`` for M of shape ``(…, n, n)``."""
        out = np.zeros_like(m)
        for c, lap in zip(self.weights, self.laplacians):
            if c > 0:
                out += c * (lap @ m @ lap)
        return out

    def second(self, m: np.ndarray) -> np.ndarray:
        """``E[Wᵀ M W]``."""
        return self.mean.T @ m @ self.mean + self.centred(m)


def mixing_moments(schedule) -> MixingMoments:
    """The moments of a random schedule's ``W^(r)`` (i.i.d. over r). Only MATCHA's is random here.

    Raises:
        ValueError: for a deterministic schedule (its W^(r) are known: no expectation is needed)
            or a random one without closed-form moments.
    """
    schedule = getattr(schedule, "mixing", schedule)
    if not isinstance(schedule, MatchaSchedule):
        raise ValueError(f"E[W] and E[W (x) W] are known in closed form for MATCHA's random matchings only, not "
                         f"for {schedule!r}")
    p = np.asarray(schedule.probabilities, dtype=np.float64)
    laps = np.asarray(schedule.laplacians, dtype=np.float64)
    alpha = float(schedule.alpha)
    mean = np.eye(schedule.n) - alpha * np.tensordot(p, laps, axes=1)
    return MixingMoments(mean, alpha**2 * p * (1.0 - p), laps)


def expected_kron(schedule) -> np.ndarray:
    """``E[W ⊗ W]`` as an ``(n², n²)`` array (``np.kron`` order): ``E[W_ia W_jb]`` at row ``i·n + j``,
    column ``a·n + b`` (small n; for checking the closed form against enumeration)."""
    mom = mixing_moments(schedule)
    out = np.kron(mom.mean, mom.mean)
    for c, lap in zip(mom.weights, mom.laplacians):
        out += c * np.kron(lap, lap)
    return out
