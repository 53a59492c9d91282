"""The wall-clock runtime model: simulated time of every iteration of a run."""

from coopsgd.sim import runtime

__all__ = ["runtime"]
