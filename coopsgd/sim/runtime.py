"""A wall-clock runtime model: simulated time of every iteration of a cooperative-SGD run.

Worker ``i`` spends ``Y[k, i]`` on local step ``k`` (a seeded draw: constant, exponential, shifted
exponential or any user distribution, optionally with injected stragglers); a mixing costs ``D``
(constant, random, or from the bytes that W's pattern sends over a network of given latency and
bandwidth). From these the model times each iteration (Wang & Joshi, "Adaptive communication
strategies to achieve the best error-runtime trade-off in local-update SGD" (AdaComm), SysML 2019,
arXiv:1810.08313, §3):

- **synchronous mixing** (τ = 1): every iteration costs ``max_i Y[k, i] + D``;
- **local updates with period τ**: a round costs the slowest worker's τ-step sum
  ``max_i Σ_k Y[k, i]`` plus one ``D``, so stragglers are smoothed over τ steps;
- **overlapped communication** (Overlap Local-SGD, Wang, Liang & Joshi, ICASSP 2020,
  arXiv:2002.09539): round r's communication starts when its compute ends and runs behind round
  r+1's local steps; round r+1's mixing waits only for whatever of it is left.

Within a round, step ``k`` is stamped with the time the slowest worker finishes it. Every random
draw is a pure function of ``(seed, step)`` or ``(seed, round)``, so a :class:`Clock` resumes from
its two floats exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from coopsgd.core.communication import Communication
from coopsgd.core.validate import require_memory, require_number

__all__ = [
    "COMPUTE_MODELS",
    "Clock",
    "CommDelay",
    "ComputeTime",
    "RuntimeModel",
    "constant",
    "constant_delay",
    "custom",
    "exponential",
    "network",
    "random_delay",
    "shifted_exponential",
    "with_stragglers",
]


def _positive(name: str, value, allow_zero: bool = False) -> float:
    return require_number(name, value, positive=not allow_zero)


# ---------------------------------------------------------------------------------------------
# Compute time per local step


class ComputeTime:
    """Per-step compute times: ``sample(rng, shape)`` → non-negative array of ``shape``."""

    def __init__(self, sampler: Callable[[np.random.Generator, tuple], np.ndarray], mean: float | None,
                 description: str):
        self._sampler = sampler
        self.mean = mean
        self.description = description

    def sample(self, rng: np.random.Generator, shape) -> np.ndarray:
        """Per-step compute times of the given ``shape`` (steps × workers), drawn from ``rng``."""
        y = np.asarray(self._sampler(rng, tuple(shape)), dtype=np.float64)
        if y.shape != tuple(shape):
            raise ValueError(f"compute-time sampler returned shape {y.shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(y)) or np.any(y < 0):
            raise ValueError(f"compute times must be finite and >= 0, got min {y.min()!r}")
        return y

    def __repr__(self) -> str:
        return f"ComputeTime({self.description})"


def constant(seconds: float = 1.0) -> ComputeTime:
    """Every local step takes ``seconds`` on every worker."""
    s = _positive("compute time", seconds)
    return ComputeTime(lambda rng, shape: np.full(shape, s), s, f"constant {s:g}")


def exponential(mean: float = 1.0) -> ComputeTime:
    """``Y ~ Exp`` with the given mean (AdaComm's analysis, arXiv:1810.08313, §3.2)."""
    mu = _positive("mean compute time", mean)
    return ComputeTime(lambda rng, shape: rng.exponential(mu, shape), mu, f"exponential mean {mu:g}")


def shifted_exponential(shift: float = 1.0, mean_extra: float = 0.25) -> ComputeTime:
    """``Y = shift + Exp(mean_extra)``: a fixed minimum plus an exponential tail (the usual model
    of straggling workers, e.g. Dutta et al., "Slow and stale gradients can win the race",
    AISTATS 2018)."""
    s = _positive("compute-time shift", shift)
    mu = _positive("compute-time mean_extra", mean_extra, allow_zero=True)
    return ComputeTime(
        lambda rng, shape: s + (rng.exponential(mu, shape) if mu > 0 else np.zeros(shape)),
        s + mu,
        f"shifted exponential {s:g} + Exp({mu:g})",
    )


def custom(sampler: Callable[[np.random.Generator, tuple], np.ndarray], mean: float | None = None) -> ComputeTime:
    """A user distribution: ``sampler(rng, shape)`` returns non-negative times of ``shape``."""
    if not callable(sampler):
        raise ValueError(f"custom compute time needs a callable (rng, shape) -> array, got {sampler!r}")
    return ComputeTime(sampler, mean, "custom")


def with_stragglers(base: ComputeTime, prob: float, slowdown: float) -> ComputeTime:
    """Inject stragglers: each (step, worker) draw is, with probability ``prob``, ``slowdown`` times
    slower."""
    prob = float(prob)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"straggler probability must lie in [0, 1], got {prob!r}")
    slowdown = _positive("straggler slowdown", slowdown)
    if slowdown < 1.0:
        raise ValueError(f"straggler slowdown must be >= 1 (a straggler is slower), got {slowdown!r}")

    def sample(rng, shape):
        y = base.sample(rng, shape)
        return np.where(rng.random(shape) < prob, y * slowdown, y)

    mean = None if base.mean is None else base.mean * (1.0 + prob * (slowdown - 1.0))
    return ComputeTime(sample, mean, f"{base.description} with stragglers p={prob:g} x{slowdown:g}")


COMPUTE_MODELS: dict[str, Callable[..., ComputeTime]] = {
    "constant": constant,
    "exponential": exponential,
    "shifted_exponential": shifted_exponential,
}
"""Compute-time models by name (for configuration files)."""


# ---------------------------------------------------------------------------------------------
# What one mixing sends, and how long it takes


class CommDelay:
    """Time of one mixing: ``delay(traffic, rng)`` → seconds (0 for no traffic), where ``traffic`` is
    the engine's :class:`~coopsgd.core.communication.Communication` of that mixing."""

    def __init__(self, fn: Callable[[Communication, np.random.Generator], float], description: str):
        self._fn = fn
        self.description = description

    def delay(self, traffic: Communication, rng: np.random.Generator) -> float:
        """Seconds one mixing with this ``traffic`` takes (drawn from ``rng`` if random)."""
        if traffic.kind == "none":
            return 0.0
        d = float(self._fn(traffic, rng))
        if not (np.isfinite(d) and d >= 0):
            raise ValueError(f"a mixing sending {traffic.bytes_per_worker:g} bytes per worker takes {d!r} s "
                             f"under {self.description}; a delay must be finite and >= 0")
        return d

    def __repr__(self) -> str:
        return f"CommDelay({self.description})"


def constant_delay(seconds: float) -> CommDelay:
    """Every mixing that communicates takes ``seconds``."""
    s = _positive("communication delay", seconds, allow_zero=True)
    return CommDelay(lambda traffic, rng: s, f"constant {s:g}")


def random_delay(mean: float) -> CommDelay:
    """Every mixing that communicates takes an exponential time with the given mean."""
    mu = _positive("mean communication delay", mean)
    return CommDelay(lambda traffic, rng: rng.exponential(mu), f"exponential mean {mu:g}")


def network(latency: float, bandwidth: float) -> CommDelay:
    """From W's pattern: ``messages · latency + bytes_per_worker / bandwidth`` (the α–β model;
    Hockney, "The communication challenge for MPP", Parallel Computing 20(3), 1994).

    ``latency`` in seconds per message, ``bandwidth`` in bytes per second.
    """
    a = _positive("latency", latency, allow_zero=True)
    b = _positive("bandwidth", bandwidth)
    if not np.isfinite(1.0 / b):
        raise ValueError(f"bandwidth must be large enough for a byte to take a finite time, got "
                         f"{bandwidth!r} B/s")
    return CommDelay(
        lambda t, rng: t.messages * a + t.bytes_per_worker / b,
        f"network latency {a:g} s, bandwidth {b:g} B/s",
    )


# ---------------------------------------------------------------------------------------------
# The clock


class RuntimeModel:
    """Compute-time and communication models with a seed; ``clock(m)`` starts a run's clock.

    Args:
        compute: a :class:`ComputeTime` (default: constant 1).
        comm: a :class:`CommDelay` (default: constant 0, i.e. free communication).
        seed: seeds every draw; the draw of step ``k`` depends on ``(seed, k)`` only.
    """

    def __init__(self, compute: ComputeTime | None = None, comm: CommDelay | None = None, seed: int = 0):
        self.compute = compute if compute is not None else constant(1.0)
        self.comm = comm if comm is not None else constant_delay(0.0)
        if not isinstance(self.compute, ComputeTime):
            raise ValueError(f"compute must be a runtime.ComputeTime, got {self.compute!r}")
        if not isinstance(self.comm, CommDelay):
            raise ValueError(f"comm must be a runtime.CommDelay, got {self.comm!r}")
        self.seed = int(seed)

    def step_times(self, start: int, count: int, m: int) -> np.ndarray:
        """``Y`` for steps ``start … start+count−1``: shape ``(count, m)``.

        Raises:
            ValueError: if the draws (and the clock's sums over them) would not fit in memory.
        """
        require_memory(f"timing {count} steps on {m} workers", 3.0 * 8.0 * count * m,
                       "use a shorter period tau (a round is timed whole) or fewer workers")
        return np.stack(
            [self.compute.sample(np.random.default_rng([self.seed, 0, start + k]), (m,)) for k in range(count)]
        ) if count else np.zeros((0, m))

    def comm_time(self, round_index: int, traffic: Communication) -> float:
        """``D`` of the mixing that ends round ``round_index``."""
        return self.comm.delay(traffic, np.random.default_rng([self.seed, 1, round_index]))

    def clock(self, m: int) -> Clock:
        """A :class:`Clock` for ``m`` workers under this model, at time 0."""
        return Clock(self, m)

    def timeline(self, algorithm, steps: int, traffic: Callable[[int], Communication],
                 overlap: bool = False) -> np.ndarray:
        """Simulated time at the end of each of ``steps`` iterations of ``algorithm`` (a
        :class:`coopsgd.Algorithm` with a static period), where ``traffic(r)`` is what the mixing
        of round r sends (e.g. ``trainer.communication`` for a model of P bytes, or
        ``lambda r: coopsgd.mixing_traffic(algorithm.mixing.at(r), P, algorithm.v)``)."""
        clock = self.clock(algorithm.m)
        out, k = [], 0
        period = algorithm.period
        while k < steps:
            r = period.round_index(k)
            end = min(period.round_start(r + 1), steps)
            mixes = algorithm.communicates(end - 1)
            out.append(clock.round(k, end - k, traffic(r) if mixes else None, overlap=overlap, round_index=r))
            k = end
        return np.concatenate(out) if out else np.zeros(0)


class Clock:
    """The simulated time of one run. State: ``time`` (when the last round's workers may start
    the next) and ``pending`` (when an overlapped communication in flight completes)."""

    def __init__(self, model: RuntimeModel, m: int, time: float = 0.0, pending: float = 0.0):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"the clock needs m >= 1 workers, got {m!r}")
        self.model, self.m = model, int(m)
        self.time, self.pending = float(time), float(pending)

    def state(self) -> dict:
        """The clock's state as JSON-able data (the time, and the communication still pending behind the
        compute), for checkpoints."""
        return {"time": self.time, "pending": self.pending}

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`state` taken earlier."""
        self.time, self.pending = float(state["time"]), float(state["pending"])

    def round(self, start: int, steps: int, traffic: Communication | None, *, overlap: bool = False,
              round_index: int | None = None) -> np.ndarray:
        """Advance through ``steps`` local steps from step ``start``; if ``traffic`` is given the
        last one ends with a mixing of that traffic. Returns each step's finishing time.

        Synchronous mixing: the round ends ``D`` after its slowest worker. Overlapped: the mixing's
        ``D`` starts when this round's compute ends and runs behind the next round; this round ends
        when its compute is done and the previous round's communication has arrived.
        """
        if steps < 1:
            raise ValueError(f"a round needs at least one step, got {steps}")
        y = self.model.step_times(start, steps, self.m)
        with np.errstate(over="ignore"):  # an overflow is refused below
            stamps = self.time + np.max(np.cumsum(y, axis=0), axis=1)
        compute_end = stamps[-1]
        d = 0.0 if traffic is None else self.model.comm_time(
            start if round_index is None else round_index, traffic)
        if not np.isfinite(max(compute_end, self.pending) + d):
            raise ValueError(f"the simulated time overflows (inf) by step {start + steps - 1}: the times of "
                             f"{self.model.compute.description} and {self.model.comm.description} are too "
                             "large to add up")
        if traffic is None:
            self.time = compute_end
        elif overlap:
            end = max(compute_end, self.pending)
            stamps[-1] = end
            self.pending = end + d
            self.time = end
        else:
            stamps[-1] = compute_end + d
            self.time = stamps[-1]
        return stamps
