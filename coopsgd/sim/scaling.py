"""Time per round and time to a target loss, on paper, from the runtime model's own arithmetic.

The same α–β cost the runtime model charges a mixing (:func:`coopsgd.sim.runtime.network`:
``messages · latency + bytes_per_worker / bandwidth``; Hockney, "The communication challenge for
MPP", Parallel Computing 20(3), 1994) and the same round rules as its :class:`~coopsgd.sim.runtime.Clock`
(AdaComm, Wang & Joshi, arXiv:1810.08313, §3: a round of τ local steps and one mixing costs
``τ·Y + D``; overlapped, Overlap Local-SGD, Wang, Liang & Joshi, arXiv:2002.09539: ``max(τ·Y, D)``
once the first round has started the pipeline) predict what a run costs on a cluster this
machine cannot hold. What a mixing sends is **not** re-derived here: pass the engine's account,
a :class:`~coopsgd.core.communication.Communication` from ``trainer.communication(param_bytes)``
or ``coopsgd.mixing_traffic(W, param_bytes, v)`` (both plan W by its structure, so m = 4 096 costs
O(edges), never an m × m array).

Compute time per step for a transformer follows the usual ``6·N·T`` FLOPs per training step for
N parameters and T tokens (Kaplan et al., "Scaling laws for neural language models",
arXiv:2001.08361, §2.1), divided by the accelerator's sustained rate.

Example:
    >>> from coopsgd.core.communication import Communication
    >>> ring = Communication("all-reduce", 1.75e6, 14, 1, 0, 8)   # 1 MB model, m = 8
    >>> round(comm_seconds(ring, latency=1e-5, bandwidth=1e9), 6)  # 14e-5 + 1.75e-3
    0.00189
    >>> round(round_seconds(ring, 4, 0.01, latency=1e-5, bandwidth=1e9), 6)
    0.04189
"""

from __future__ import annotations

import math
from typing import NamedTuple

from coopsgd.core.communication import Communication
from coopsgd.core.validate import require_number
from coopsgd.sim import runtime

__all__ = [
    "GBPS",
    "Prediction",
    "comm_seconds",
    "predict",
    "round_seconds",
    "run_seconds",
    "transformer_step_seconds",
]

GBPS = 1e9 / 8.0
"""Bytes per second of one gigabit per second (a link's rate is quoted in bits)."""


def _traffic(traffic) -> Communication:
    if not isinstance(traffic, Communication):
        raise ValueError(f"traffic must be a coopsgd Communication (trainer.communication(...) or "
                         f"coopsgd.mixing_traffic(...)), got {traffic!r}")
    return traffic


def comm_seconds(traffic: Communication, latency: float, bandwidth: float) -> float:
    """Seconds one mixing takes: ``messages · latency + bytes_per_worker / bandwidth`` (the α–β
    model that :func:`coopsgd.sim.runtime.network` charges), 0 when nothing moves.

    Args:
        traffic: the engine's account of one mixing.
        latency: seconds per message (α).
        bandwidth: bytes per second of one worker's link (1/β); see :data:`GBPS`.
    """
    return runtime.network(latency, bandwidth).delay(_traffic(traffic), None)


def round_seconds(traffic: Communication | None, tau: int, step_seconds: float, *, latency: float,
                  bandwidth: float, overlap: bool = False) -> float:
    """Steady-state seconds of one round: τ local steps of ``step_seconds`` and one mixing.

    Synchronous: ``τ·Y + D``. Overlapped (the mixing runs behind the next round's steps):
    ``max(τ·Y, D)``. ``traffic=None`` (a round that does not mix) costs ``τ·Y``.

    Raises:
        ValueError: if ``tau`` is not a positive integer or ``step_seconds`` is not positive.
    """
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (local steps per round), got {tau!r}")
    y = require_number("step_seconds", step_seconds, positive=True)
    compute = tau * y
    if traffic is None:
        return compute
    d = comm_seconds(traffic, latency, bandwidth)
    return max(compute, d) if overlap else compute + d


def run_seconds(rounds: int, traffic: Communication | None, tau: int, step_seconds: float, *,
                latency: float, bandwidth: float, overlap: bool = False) -> float:
    """Seconds of ``rounds`` whole rounds from time 0, exactly as the runtime model's
    :class:`~coopsgd.sim.runtime.Clock` counts them with constant compute times: ``rounds`` times
    :func:`round_seconds`, except that an overlapped run's first round has no communication in
    flight to wait for (it costs ``τ·Y``)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if rounds == 0:
        return 0.0
    per = round_seconds(traffic, tau, step_seconds, latency=latency, bandwidth=bandwidth, overlap=overlap)
    if overlap and traffic is not None:
        return tau * float(step_seconds) + (rounds - 1) * per
    return rounds * per


def transformer_step_seconds(params: float, tokens: float, flops_per_second: float,
                             utilization: float = 0.4) -> float:
    """Seconds of one training step of an N-parameter transformer on T tokens per worker:
    ``6·N·T / (flops_per_second · utilization)`` (Kaplan et al. 2020, §2.1: ≈ 6N FLOPs per token
    for the forward and backward pass).

    Raises:
        ValueError: if a size or rate is not positive or ``utilization`` is outside (0, 1].
    """
    n = require_number("params", params, positive=True)
    t = require_number("tokens", tokens, positive=True)
    f = require_number("flops_per_second", flops_per_second, positive=True)
    u = float(utilization)
    if not 0.0 < u <= 1.0:
        raise ValueError(f"utilization must lie in (0, 1] (a fraction of peak FLOP/s), got {utilization!r}")
    return 6.0 * n * t / (f * u)


class Prediction(NamedTuple):
    """What :func:`predict` returns for one algorithm on one cluster.

    Attributes:
        round_seconds: steady-state seconds per round (:func:`round_seconds`).
        step_seconds: ``round_seconds / tau``, seconds per local step.
        comm_seconds: seconds of the round's mixing (0 when none), hidden or not.
        comm_fraction: the share of a round spent waiting for communication.
        seconds_to_target: ``steps_to_target`` steps at this cost (``None`` if never reached).
    """

    round_seconds: float
    step_seconds: float
    comm_seconds: float
    comm_fraction: float
    seconds_to_target: float | None


def predict(traffic: Communication | None, tau: int, step_seconds: float, *, latency: float,
            bandwidth: float, overlap: bool = False, steps_to_target: int | None = None) -> Prediction:
    """Time per round and to a target for an algorithm whose one mixing sends ``traffic``.

    ``steps_to_target`` is the number of local steps the algorithm needs to reach the target
    loss (measured in a simulated run; ``None``: never reached); the time to it is
    :func:`run_seconds` of ``ceil(steps / τ)`` rounds.
    """
    per = round_seconds(traffic, tau, step_seconds, latency=latency, bandwidth=bandwidth, overlap=overlap)
    d = 0.0 if traffic is None else comm_seconds(traffic, latency, bandwidth)
    waiting = per - tau * float(step_seconds)
    to_target = None
    if steps_to_target is not None:
        rounds = math.ceil(int(steps_to_target) / tau)
        to_target = run_seconds(rounds, traffic, tau, step_seconds, latency=latency, bandwidth=bandwidth,
                                overlap=overlap)
    return Prediction(per, per / tau, d, waiting / per if per > 0 else 0.0, to_target)
