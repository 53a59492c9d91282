"""coopsgd: Cooperative SGD on JAX.

Every local-update SGD algorithm — fully synchronous SGD, local SGD, EASGD, D-PSGD, decentralized
periodic averaging, Overlap Local-SGD, time-varying topologies — is one value A(τ, W, v), run by
one update ``X ← (X + U) W_k`` (Wang & Joshi, "Cooperative SGD", arXiv:1808.07576); what mixes
otherwise (compressed gossip, push-sum, gradient tracking, DiLoCo's outer optimizer) plugs into the
same round as a mixer.

The package is layered (``docs/architecture.md``): :mod:`coopsgd.core` (graphs, W as an operator,
spectral tools, schedules, the Algorithm value), :mod:`coopsgd.algorithms` (the named families),
:mod:`coopsgd.parallel` (plans, mixers, backends, the trainer), :mod:`coopsgd.analysis` (bounds
and their verification), :mod:`coopsgd.sim` (the runtime model) and :mod:`coopsgd.app` (the
command line and what it needs). This module only re-exports the public API.
"""

from coopsgd import algorithms, analysis, core, parallel, sim
from coopsgd.algorithms import compression
from coopsgd.algorithms.adaptive import ADPSGD, AdaComm, adacomm, adacomm_period, adpsgd
from coopsgd.algorithms.averaging import fully_sync, hierarchical, local_sgd
from coopsgd.algorithms.choco import choco_sgd
from coopsgd.algorithms.decentralized import decentralized_periodic, dpsgd
from coopsgd.algorithms.diloco import diloco, streaming_diloco
from coopsgd.algorithms.easgd import easgd
from coopsgd.algorithms.matcha import MatchaSchedule, matcha
from coopsgd.algorithms.outer import local_sgd_global_momentum
from coopsgd.algorithms.overlap import overlap_local_sgd, overlap_local_sgd_momentum
from coopsgd.algorithms.push_sum import push_sum
from coopsgd.algorithms.tracking import gradient_tracking
from coopsgd.analysis.exact import exact_expected_error
from coopsgd.analysis.theory import bound_for, cooperative_bound
from coopsgd.analysis.verify import check_bound
from coopsgd.core import mixing, schedules, topology
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.communication import Communication
from coopsgd.core.operator import MixingMatrix, as_operator
from coopsgd.core.spectral import spectral_gap, stationary, zeta
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.hooks import Hook, RoundEnd, Stop
from coopsgd.parallel.linear import linear, mix
from coopsgd.parallel.plan import mixing_traffic, tree_bytes
from coopsgd.parallel.protocol import STATE_POLICIES, SYNC_POLICIES, Mixer, MixerState, MixRound, OptimizerSync
from coopsgd.parallel.state import EngineState, NonFiniteError, PeriodState, StepMetrics
from coopsgd.parallel.step import cooperative_step
from coopsgd.parallel.trainer import CooperativeSGD

__version__ = "0.2.0"

__all__ = [
    "ADPSGD",
    "AdaComm",
    "STATE_POLICIES",
    "SYNC_POLICIES",
    "Algorithm",
    "Communication",
    "CooperativeSGD",
    "EngineState",
    "Hook",
    "MatchaSchedule",
    "MixRound",
    "Mixer",
    "MixerState",
    "MixingMatrix",
    "NonFiniteError",
    "OptimizerSync",
    "PeriodState",
    "RoundEnd",
    "StepMetrics",
    "Stop",
    "WorkerAxis",
    "adacomm",
    "adacomm_period",
    "adpsgd",
    "algorithms",
    "analysis",
    "as_operator",
    "bound_for",
    "check_bound",
    "choco_sgd",
    "compression",
    "cooperative_bound",
    "cooperative_step",
    "core",
    "decentralized_periodic",
    "diloco",
    "dpsgd",
    "easgd",
    "exact_expected_error",
    "fully_sync",
    "gradient_tracking",
    "hierarchical",
    "linear",
    "local_sgd",
    "local_sgd_global_momentum",
    "matcha",
    "mix",
    "mixing",
    "mixing_traffic",
    "overlap_local_sgd",
    "overlap_local_sgd_momentum",
    "parallel",
    "push_sum",
    "schedules",
    "sim",
    "spectral_gap",
    "stationary",
    "streaming_diloco",
    "topology",
    "tree_bytes",
    "zeta",
]
