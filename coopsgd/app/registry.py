"""The one registry of named algorithms: every name ``compare``, ``train``, ``verify`` and the docs
know, each registered once with its factory, the configuration keys it reads (with defaults),
whether it needs a graph, how its period is set, and whether its communication overlaps
computation.

Adding an algorithm to the command line is one :func:`register` call::

    register(Entry("my_algo", "one line for the tables", factory, keys={"tau": None}))

where ``factory(ctx)`` builds the :class:`~coopsgd.core.algorithm.Algorithm` from a
:class:`Context` (the validated configuration, the graph for graph algorithms, the model's size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import networkx as nx

from coopsgd.core.validate import require_choice

__all__ = ["REGISTRY", "Context", "Entry", "build", "get", "hierarchy_levels", "markdown_table", "names",
           "register"]

Period = Literal["one", "tau", "adaptive"]
"""How an algorithm's period is set: fixed to 1, the ``tau`` key, or decided at run time."""


class Context(NamedTuple):
    """What a factory gets: the validated configuration, the topology's graph (graph algorithms
    only; else None) and the bytes of one model (for rules that cost communication)."""

    cfg: Mapping
    graph: nx.Graph | None
    param_bytes: float


class Entry(NamedTuple):
    """One named algorithm.

    Attributes:
        name: the name on the command line and in tables.
        summary: one line for ``--help`` and the docs' table.
        factory: ``factory(ctx: Context) -> Algorithm``.
        keys: the configuration keys the factory reads beyond ``workers``, with the default it
            uses when the key is unset (None: the key's own default in ``config.DEFAULTS``).
        graph: whether it runs on the ``topology`` key's graph (needs m ≥ 2).
        period: :data:`Period`.
        overlap: whether its communication runs behind computation in the runtime model.
        theory: whether ``coopsgd verify`` can run it beside a bound.
    """

    name: str
    summary: str
    factory: Callable[[Context], object]
    keys: Mapping[str, object] = {}
    graph: bool = False
    period: Period = "tau"
    overlap: bool = False
    theory: bool = True


REGISTRY: dict[str, Entry] = {}
"""Name → :class:`Entry`, in registration order (the order of ``compare``'s table)."""


def register(entry: Entry) -> Entry:
    """Add ``entry`` (its name must be new)."""
    if entry.name in REGISTRY:
        raise ValueError(f"algorithm {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


def names(*, theory: bool | None = None) -> list[str]:
    """Registered names (those ``verify`` can run, with ``theory=True``)."""
    return [n for n, e in REGISTRY.items() if theory is None or e.theory == theory]


def get(name: str) -> Entry:
    """The entry called ``name``; ValueError listing the valid names otherwise."""
    return REGISTRY[require_choice("algorithm", name, REGISTRY, "algorithms")]


def build(cfg: Mapping, param_bytes: float = 0.0):
    """``(Algorithm, entry)`` for the configuration's ``algorithm``.

    Raises:
        ValueError: an unknown name, a graph algorithm with fewer than 2 workers, or a τ schedule
            for an algorithm whose period is not the ``tau`` key.
    """
    from coopsgd.core import topology

    entry = get(cfg["algorithm"])
    if isinstance(cfg.get("tau"), list) and entry.period != "tau":
        raise ValueError(f"a tau schedule does not apply to {entry.name} (its period is fixed or adaptive)")
    graph = None
    if entry.graph:
        m = cfg["workers"]
        if m < 2:
            raise ValueError(f"{entry.name} needs workers >= 2 to have a graph, got workers = {m} "
                             "(pick other algorithms with --algorithms)")
        graph = topology.by_name(cfg["topology"], m)
    resolved = dict(cfg)
    for key, default in entry.keys.items():
        if resolved.get(key) is None and default is not None:
            resolved[key] = default
    return entry.factory(Context(resolved, graph, float(param_bytes))), entry


def markdown_table() -> str:
    """The registry as the Markdown table of ``docs/algorithms.md`` (name, what it is, keys)."""
    lines = ["| name | algorithm | graph | period | keys (default) |", "|---|---|---|---|---|"]
    for e in REGISTRY.values():
        keys = ", ".join(f"`{k}`" + (f" ({v})" if v is not None else "") for k, v in e.keys.items()) or "—"
        period = {"one": "τ = 1", "tau": "`tau`", "adaptive": "adaptive"}[e.period]
        lines.append(f"| `{e.name}` | {e.summary} | {'yes' if e.graph else 'no'} | {period} | {keys} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the algorithms


def _tau(ctx: Context):
    from coopsgd.core import schedules

    tau = ctx.cfg["tau"]
    return schedules.piecewise([tuple(p) for p in tau]) if isinstance(tau, list) else tau


def _fully_sync(ctx):
    from coopsgd.algorithms.averaging import fully_sync

    return fully_sync(ctx.cfg["workers"])


def _local_sgd(ctx):
    from coopsgd.algorithms.averaging import local_sgd

    return local_sgd(ctx.cfg["workers"], _tau(ctx))


def hierarchy_levels(m: int, tau: int) -> dict[int, int]:
    """The registry's hierarchy for m workers and the ``tau`` key: groups of g = m / q workers (q
    the smallest prime factor of m: two halves for an even m) average every τ steps, and all m
    every 4τ — e.g. ``{2: 4, 8: 8}`` for m = 8, τ = 2 (a group of size 1 for a prime m is local
    steps only; one level for m = 1)."""
    if m == 1:
        return {tau: 1}
    q = next(p for p in range(2, m + 1) if m % p == 0)
    return {tau: m // q, 4 * tau: m}


def _hierarchical(ctx):
    from coopsgd.algorithms.averaging import hierarchical

    levels = ctx.cfg.get("hierarchy")
    if levels is None:
        if isinstance(ctx.cfg["tau"], list):
            raise ValueError(f"hierarchical takes its periods from a constant tau or from the hierarchy key, got the "
                             f"tau schedule {ctx.cfg['tau']!r}; set hierarchy = [[period, group_size], ...] instead")
        return hierarchical(ctx.cfg["workers"], hierarchy_levels(ctx.cfg["workers"], ctx.cfg["tau"]))
    return hierarchical(ctx.cfg["workers"], [tuple(pair) for pair in levels])


def _easgd(ctx):
    from coopsgd.algorithms.easgd import easgd

    return easgd(ctx.cfg["workers"], _tau(ctx), ctx.cfg["mixing_alpha"])


def _dpsgd(ctx):
    from coopsgd.algorithms.decentralized import dpsgd

    return dpsgd(ctx.graph, ctx.cfg["weights"])


def _decentralized_periodic(ctx):
    from coopsgd.algorithms.decentralized import decentralized_periodic

    return decentralized_periodic(ctx.graph, _tau(ctx), ctx.cfg["weights"])


def _overlap(ctx):
    from coopsgd.algorithms.overlap import overlap_local_sgd

    return overlap_local_sgd(ctx.cfg["workers"], _tau(ctx), ctx.cfg["mixing_alpha"])


def _matcha(ctx):
    from coopsgd.algorithms.matcha import matcha

    return matcha(ctx.graph, ctx.cfg["budget"], seed=ctx.cfg["seed"])


def _dpsgd_lian(ctx):
    from coopsgd.algorithms.decentralized import dpsgd

    return dpsgd(ctx.graph, ctx.cfg["weights"], form="lian")


def _easgd_zhang(ctx):
    from coopsgd.algorithms.easgd import easgd

    return easgd(ctx.cfg["workers"], _tau(ctx), ctx.cfg["mixing_alpha"], form="zhang")


def _choco(ctx):
    from coopsgd.algorithms import compression
    from coopsgd.algorithms.choco import choco_sgd

    return choco_sgd(ctx.graph, ctx.cfg["consensus_step"], compression.by_name(ctx.cfg["compressor"]),
                     weights=ctx.cfg["weights"], seed=ctx.cfg["seed"])


def _push_sum(ctx):
    from coopsgd.algorithms.push_sum import push_sum
    from coopsgd.core import topology

    return push_sum(topology.one_peer_exponential_digraphs(ctx.cfg["workers"]))


def _tracking(ctx):
    from coopsgd.algorithms.tracking import gradient_tracking

    return gradient_tracking(ctx.graph, ctx.cfg["weights"])


def _outer_optimizer(cfg):
    from coopsgd.algorithms.outer import outer_momentum

    return outer_momentum(cfg["outer.lr"], cfg["outer.momentum"], nesterov=True)


def _diloco(ctx):
    from coopsgd.algorithms.diloco import diloco

    return diloco(ctx.cfg["workers"], _tau(ctx), _outer_optimizer(ctx.cfg))


def _streaming_diloco(ctx):
    from coopsgd.algorithms.diloco import streaming_diloco

    return streaming_diloco(ctx.cfg["workers"], ctx.cfg["tau"], _outer_optimizer(ctx.cfg),
                            fragments=ctx.cfg["fragments"], delay=ctx.cfg["fragment_delay"])


def _adacomm(ctx):
    from coopsgd.algorithms.adaptive import adacomm
    from coopsgd.app import config
    from coopsgd.core.algorithm import Algorithm
    from coopsgd.core.operator import averaging
    from coopsgd.parallel.plan import mixing_traffic

    cfg, m = ctx.cfg, ctx.cfg["workers"]
    tau0 = cfg["adacomm_tau0"] or 2 * cfg["tau"]
    interval = cfg["adacomm_interval"]
    if interval is None:  # a tenth of the run's expected simulated time
        mean = config.build_runtime(cfg).compute.mean or cfg["runtime.compute_time"]
        d = config.expected_delay(cfg, mixing_traffic(averaging(m), ctx.param_bytes))
        interval = cfg["steps"] * (mean + d / tau0) / 10.0
    schedule = adacomm(tau0, interval, lr_schedule=config.build_lr_schedule(cfg))
    return Algorithm(averaging(m), tau=schedule, name="adacomm")


for _entry in (
    Entry("fully_sync", "fully synchronous SGD (tau = 1, W = J)", _fully_sync, period="one"),
    Entry("local_sgd", "local SGD / periodic averaging (tau steps, then W = J)", _local_sgd, {"tau": None}),
    Entry("easgd", "elastic averaging SGD with an anchor (v = 1), tau local steps", _easgd,
          {"tau": None, "mixing_alpha": None}),
    Entry("dpsgd", "D-PSGD: neighbour averaging on the topology after every step", _dpsgd,
          {"topology": None, "weights": None}, graph=True, period="one"),
    Entry("decentralized_periodic", "tau local steps, then one neighbour averaging", _decentralized_periodic,
          {"tau": None, "topology": None, "weights": None}, graph=True),
    Entry("overlap_local_sgd", "Overlap Local-SGD: anchor pull-back, communication hidden behind compute",
          _overlap, {"tau": None, "mixing_alpha": 0.5}, overlap=True),
    Entry("matcha", "MATCHA: random matchings of the topology under a communication budget", _matcha,
          {"topology": None, "budget": None, "seed": None}, graph=True, period="one"),
    Entry("adacomm", "AdaComm: local SGD whose tau shrinks with the training loss (wall-clock intervals)",
          _adacomm, {"tau": None, "adacomm_tau0": None, "adacomm_interval": None}, period="adaptive",
          theory=False),
    Entry("dpsgd_lian", "D-PSGD as Lian et al. write it: x <- Wx - eta g(x) (the gradient step unmixed)",
          _dpsgd_lian, {"topology": None, "weights": None}, graph=True, period="one", theory=False),
    Entry("easgd_zhang", "synchronous EASGD as Zhang et al. write it: pull and gradient at the same x_t",
          _easgd_zhang, {"tau": None, "mixing_alpha": None}, theory=False),
    Entry("choco_sgd", "CHOCO-SGD: gossip of compressed differences to public copies (Koloskova et al.)",
          _choco, {"topology": None, "weights": None, "compressor": None, "consensus_step": None, "seed": None},
          graph=True, period="one", theory=False),
    Entry("push_sum", "Stochastic Gradient Push on the one-peer directed exponential graph (Assran et al.)",
          _push_sum, period="one", theory=False),
    Entry("gradient_tracking", "gradient tracking (DSGT): gossip of models and average-gradient trackers",
          _tracking, {"topology": None, "weights": None}, graph=True, period="one", theory=False),
    Entry("diloco", "DiLoCo: tau inner steps, then Nesterov outer SGD on the averaged pseudo-gradient",
          _diloco, {"tau": None, "outer.lr": None, "outer.momentum": None}, theory=False),
    Entry("streaming_diloco", "Streaming DiLoCo: fragments synchronised in turn, H = tau steps apart each",
          _streaming_diloco, {"tau": None, "fragments": None, "fragment_delay": None, "outer.lr": None,
                              "outer.momentum": None},
          theory=False),
    Entry("hierarchical", "hierarchical averaging: groups (halves for even m) average every tau steps, all "
          "workers every 4 tau (or the hierarchy key's levels)", _hierarchical, {"tau": None, "hierarchy": None},
          theory=False),
):
    register(_entry)
