"""Running an algorithm: communication plans and their cost, the worker axis and its collectives,
the mixing protocol and the linear mixer, backends (simulate / pmap / shard_map), the engine state,
the pure round functions, the trainer, and the step that wraps a user's own training step."""

from coopsgd.parallel import (
    backends,
    batches,
    collectives,
    engine,
    hlo,
    hooks,
    linear,
    plan,
    programs,
    protocol,
    state,
    step,
    trainer,
)

__all__ = ["backends", "batches", "collectives", "engine", "hlo", "hooks", "linear", "plan", "programs", "protocol", "state", "step",
           "trainer"]
