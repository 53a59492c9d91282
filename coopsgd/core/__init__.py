"""The mathematical core: graphs, W as an operator, weight rules, spectral tools, schedules and the
``Algorithm`` value A(τ, W, v). Plain NumPy, SciPy and networkx in float64; nothing here knows of
devices or JAX."""

from coopsgd.core import mixing, operator, schedules, spectral, topology, validate
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix, as_operator

__all__ = ["Algorithm", "MixingMatrix", "as_operator", "mixing", "operator", "schedules", "spectral",
           "topology", "validate"]
