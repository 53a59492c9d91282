"""Exact averaging: fully synchronous SGD and local SGD (periodic averaging), W = J_m.

References:
    Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.1; Stich, "Local SGD converges fast and
    communicates little", ICLR 2019.
"""

from __future__ import annotations

from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import averaging
from coopsgd.core.validate import require_int

__all__ = ["fully_sync", "local_sgd"]


def fully_sync(m: int) -> Algorithm:
    """Fully synchronous (mini-batch) SGD: τ = 1, W = J_m, v = 0, ζ = 0."""
    m = require_int("m", m, 1)
    return Algorithm(averaging(m), tau=1, name="fully_sync")


def local_sgd(m: int, tau) -> Algorithm:
    """Local SGD / periodic averaging (PASGD): τ local steps, then exact averaging W = J_m.

    References:
        Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.1; Stich, "Local SGD converges fast
        and communicates little", ICLR 2019.
    """
    m = require_int("m", m, 1)
    return Algorithm(averaging(m), tau=tau, name="local_sgd")
