"""Host callbacks between rounds: what a hook sees (:class:`RoundEnd`), how it is scheduled
(:class:`Hook`), how it ends a run (:class:`Stop`), and the calling rule the trainer applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from coopsgd.parallel.state import EngineState, StepMetrics

__all__ = ["Hook", "RoundEnd", "Stop", "call_hooks"]


class RoundEnd(NamedTuple):
    """What a hook sees: the state after a round end (or the end of ``run``), the metrics of the
    steps ``start … step − 1`` since the hook's previous call, the index of the round step
    ``step − 1`` belongs to, and whether that round just ended with its mixing (False only at the
    end of a run mid-round)."""

    trainer: Any
    state: EngineState
    metrics: StepMetrics
    start: int
    step: int
    round: int
    mixed: bool


class Stop(NamedTuple):
    """Returned by a hook: end the run here (with ``state`` instead of the current one, if given)."""

    state: EngineState | None = None


class Hook(NamedTuple):
    """A host callback ``fn(RoundEnd) -> EngineState | Stop | None`` for :meth:`CooperativeSGD.run`.

    ``every=None`` calls it after every round; ``every=N`` after the first round end at or past
    each multiple of N steps (so whole rounds between calls still fuse into one compiled program).
    Both are also called once at the end of the run, including a run a hook stopped. Returning an
    ``EngineState`` replaces the state (e.g. :meth:`CooperativeSGD.observe` for an adaptive
    period), ``Stop()`` ends the run.
    """

    fn: Callable[[RoundEnd], Any]
    every: int | None = None


def concat(pieces: list[StepMetrics]) -> StepMetrics:
    """Metrics of consecutive compiled calls as one (stacked over their steps)."""
    import jax
    import numpy as np

    if len(pieces) == 1:
        return pieces[0]
    # NumPy on the host (the metrics are small): a device concatenate compiles a program per shape
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *pieces)


def call_hooks(hooks, marks: list, pieces: list, ended: RoundEnd, final: bool):
    """Call the hooks due at ``ended.step`` (every hook not yet called there when ``final``);
    ``marks[i]`` is ``(pieces index, step)`` at hook i's previous call. Each hook gets the metrics
    since its own previous call. Returns the state and whether a hook asked to stop."""
    state, k, stop = ended.state, ended.step, False
    for i, h in enumerate(hooks):
        start_index, start_step = marks[i]
        due = final or (ended.mixed and (h.every is None or k // h.every > start_step // h.every))
        if start_index == len(pieces) or not due:  # already called after the latest steps
            continue
        result = h.fn(ended._replace(state=state, metrics=concat(pieces[start_index:]), start=start_step))
        marks[i] = (len(pieces), k)
        if isinstance(result, Stop):
            stop, state = True, result.state if result.state is not None else state
        elif isinstance(result, EngineState):
            state = result
        elif result is not None:
            raise ValueError(f"a hook returns None, an EngineState or Stop(), got {type(result).__name__}")
    return state, stop
