"""The error–runtime trade-off of local SGD: expected time per iteration, the speed-up over fully
synchronous SGD, AdaComm's error–runtime bound and its optimal period τ*, in plain NumPy.

References:
    Wang & Joshi, "Adaptive communication strategies to achieve the best error-runtime trade-off in
    local-update SGD" (AdaComm), SysML 2019, arXiv:1810.08313, §3–4 (**[recalled]**; the speed-up
    is **[derived]**).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from coopsgd.core.validate import require_int as _integer
from coopsgd.core.validate import require_number

__all__ = ["iteration_time", "local_sgd_speedup", "optimal_tau", "runtime_bound"]


def iteration_time(
    tau,
    *,
    comm_time,
    step_time: float | Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] = 1.0,
    m: int = 1,
    samples: int = 10_000,
    seed: int = 0,
) -> float:
    """Expected wall-clock time per iteration of local SGD with period τ: ``E[max_i Ȳ_i] + D/τ``.

    Ȳ_i averages τ i.i.d. local-step times of worker i; D is the time of one averaging. With a
    constant step time Y this is ``Y + D/τ``; τ = 1 gives fully synchronous SGD, ``E[max_i Y_i] + D``.
    A random step time is given as a sampler ``(rng, shape) -> array`` (or an object with such a
    ``sample`` method, like :class:`coopsgd.sim.runtime.ComputeTime`) and the expectation is taken by
    Monte Carlo over ``samples`` draws.

    References:
        Wang & Joshi, AdaComm, SysML 2019, arXiv:1810.08313, §3 (runtime model) [recalled].

    Example:
        >>> iteration_time(4, comm_time=2.0, step_time=1.0)
        1.5
    """
    tau = _integer("tau", tau, 1)
    comm_time = require_number("comm_time", comm_time, rule="a duration")
    m = _integer("m", m, 1)
    if hasattr(step_time, "sample"):  # e.g. a coopsgd.sim.runtime.ComputeTime
        step_time = step_time.sample
    if callable(step_time):
        rng = np.random.default_rng(seed)
        draws = np.asarray(step_time(rng, (_integer("samples", samples, 1), m, tau)), dtype=float)
        if draws.shape != (samples, m, tau) or np.any(~np.isfinite(draws)) or np.any(draws < 0):
            raise ValueError(
                f"step_time sampler must return finite non-negative times of shape "
                f"{(samples, m, tau)}, got shape {draws.shape}"
            )
        compute = float(draws.mean(axis=2).max(axis=1).mean())
    else:
        compute = require_number("step_time", step_time, rule="a duration")
    return compute + comm_time / tau


def local_sgd_speedup(tau, comm_ratio) -> float:
    """Speed-up per iteration of local SGD with period τ over fully synchronous SGD: ``(1 + r)/(1 + r/τ)``.

    ``r = D / Y`` is the ratio of one averaging's time to one local step's time (constant step
    times). Tends to ``1 + r`` as τ → ∞.

    References:
        Wang & Joshi, AdaComm, arXiv:1810.08313, §3 [derived from its runtime model].

    Example:
        >>> local_sgd_speedup(4, 2.0)
        2.0
    """
    tau = _integer("tau", tau, 1)
    r = require_number("comm_ratio", comm_ratio, rule="D / Y, a ratio of durations")
    return (1.0 + r) / (1.0 + r / tau)


def runtime_bound(*, L, sigma2, f_gap, eta, m, tau, wall_time, step_time, comm_time) -> float:
    """AdaComm's error–runtime bound for local SGD after wall-clock time T (constant step time)::

        2 [F(x_1) − F_inf] (E[Y] + D/τ) / (η T) + η L σ² / m + η² L² σ² (τ − 1)

    References:
        Wang & Joshi, AdaComm, arXiv:1810.08313, Theorem 1 [recalled].
    """
    L = require_number("L", L, positive=True)
    sigma2 = require_number("sigma2", sigma2)
    f_gap = require_number("f_gap", f_gap)
    eta = require_number("eta", eta, positive=True)
    m = _integer("m", m, 1)
    tau = _integer("tau", tau, 1)
    T = require_number("wall_time", wall_time, positive=True)
    per_iter = iteration_time(tau, comm_time=comm_time, step_time=step_time)
    return 2.0 * f_gap * per_iter / (eta * T) + eta * L * sigma2 / m + eta**2 * L**2 * sigma2 * (tau - 1)


def optimal_tau(*, L, sigma2, f_gap, eta, comm_time, wall_time) -> float:
    """AdaComm's τ* = sqrt(2 [F(x_1) − F_inf] D / (η³ L² σ² T)), the minimiser of :func:`runtime_bound`.

    A real number; round it (up, as AdaComm's rule does) for an integer period.

    References:
        Wang & Joshi, AdaComm, arXiv:1810.08313, §4 [recalled; checked here as the stationary
        point of the runtime bound].

    Example:
        >>> optimal_tau(L=1.0, sigma2=1.0, f_gap=2.0, eta=0.5, comm_time=1.0, wall_time=8.0)
        2.0
    """
    L = require_number("L", L, positive=True)
    sigma2 = require_number("sigma2", sigma2, positive=True,
                            rule="with no noise local steps cost nothing: tau* = inf")
    f_gap = require_number("f_gap", f_gap)
    eta = require_number("eta", eta, positive=True)
    D = require_number("comm_time", comm_time)
    T = require_number("wall_time", wall_time, positive=True)
    return math.sqrt(2.0 * f_gap * D / (eta**3 * L**2 * sigma2 * T))


