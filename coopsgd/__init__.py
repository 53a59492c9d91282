"""coopsgd: Cooperative SGD on JAX.

Every local-update SGD algorithm — fully synchronous SGD, local SGD, EASGD, D-PSGD, decentralized
periodic averaging, Overlap Local-SGD, time-varying topologies — is one value A(τ, W, v), run by
one update ``X ← (X + U) W_k`` (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576).
"""

from coopsgd import mixing, schedules, topology
from coopsgd.algorithms import (
    Algorithm,
    decentralized_periodic,
    dpsgd,
    easgd,
    fully_sync,
    local_sgd,
    overlap_local_sgd,
)

from coopsgd.matcha import MatchaSchedule, matcha  # rebinds coopsgd.matcha to the function

__version__ = "0.1.0"

__all__ = [
    "MatchaSchedule",
    "matcha",
    "Algorithm",
    "decentralized_periodic",
    "dpsgd",
    "easgd",
    "fully_sync",
    "local_sgd",
    "mixing",
    "overlap_local_sgd",
    "schedules",
    "topology",
]

# The engine (issue 3): the one update, its state and metrics, the layouts of the worker axis.
from coopsgd import backends, communication  # noqa: E402
from coopsgd.communication import mix  # noqa: E402
from coopsgd.engine import CooperativeSGD, EngineState, NonFiniteError, StepMetrics  # noqa: E402

__all__ += ["CooperativeSGD", "EngineState", "NonFiniteError", "StepMetrics", "backends",
            "communication", "mix"]

# Adaptive and overlapping algorithms (issue 5): adaptive periods, outer updates at syncs, batch sizes.
from coopsgd import adaptive, batching, outer  # noqa: E402
from coopsgd.outer import local_sgd_global_momentum, overlap_local_sgd_momentum  # noqa: E402

__all__ += ["adaptive", "batching", "outer", "local_sgd_global_momentum", "overlap_local_sgd_momentum"]

# Theory and its numerical verification (issue 4): bounds, problems with known constants, the harness.
from coopsgd import problems, theory, verify  # noqa: E402
from coopsgd.theory import bound_for, cooperative_bound  # noqa: E402
from coopsgd.verify import check_bound, exact_expected_error  # noqa: E402

__all__ += ["problems", "theory", "verify", "bound_for", "cooperative_bound", "check_bound",
            "exact_expected_error"]
