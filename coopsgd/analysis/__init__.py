"""Theory a run can be held to: convergence bounds and step-size conditions (Theorem 1 of Cooperative
SGD for identical data, Koloskova et al. 2020 for heterogeneous data and random topologies), the
error–runtime trade-off, problems with known constants, the exact expected error of quadratics, and
the harness that runs the engine beside the bound."""

from coopsgd.analysis import (
    consensus,
    exact,
    koloskova,
    moments,
    noniid,
    problems,
    report,
    theory,
    tradeoff,
    verify,
)

__all__ = ["consensus", "exact", "koloskova", "moments", "noniid", "problems", "report", "theory", "tradeoff",
           "verify"]
