"""Theory a run can be held to: convergence bounds and step-size conditions, the error–runtime
trade-off, problems with known constants, the exact expected error of quadratics, and the harness
that runs the engine beside the bound."""

from coopsgd.analysis import exact, problems, theory, tradeoff, verify

__all__ = ["exact", "problems", "theory", "tradeoff", "verify"]
