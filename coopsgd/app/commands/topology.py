"""``coopsgd topology NAME --nodes N [--weights RULE] [--draw out.png]``: inspect a mixing matrix.

Prints the graph's size and degrees, W's entries, ζ (the second-largest eigenvalue modulus, Wang &
Joshi, Cooperative SGD, Assumption 4) and the spectral gap 1 − ζ; optionally draws the graph.
"""

from __future__ import annotations

import json
import math

import numpy as np

from coopsgd.app.commands import COMMANDS, CommandError, check_png_path
from coopsgd.core import mixing, spectral, topology
from coopsgd.core.operator import DENSE_LIMIT
from coopsgd.core.validate import INT32_MAX, format_bytes, require_int, require_memory

__all__ = ["DRAW_EDGES", "DRAW_NODES", "MAX_EDGES", "edge_count", "register", "run", "summary"]

GRAPH_BYTES = 400
"""Bytes per node and per edge of the graph and its W while they are built (networkx dictionaries,
the sparse W and its temporaries; measured on rings, exponential and complete graphs)."""

MAX_EDGES = 5_000_000
"""Most edges the command builds (networkx and the weight rules take a few µs per edge)."""

DRAW_NODES, DRAW_EDGES = 2000, 20000
"""Most nodes and edges ``--draw`` takes: one matplotlib artist each (about 10 s at the limit),
and the drawing reads W densely; beyond, the picture is unreadable anyway."""


def register(subparsers) -> None:
    """Add the ``topology`` parser to ``subparsers``."""
    p = subparsers.add_parser(
        "topology",
        help=COMMANDS["topology"],
        description="Build the named topology on N nodes, weight it by RULE and print W's summary, "
        "zeta and the spectral gap.",
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(topology.TOPOLOGIES)}")
    p.add_argument("--nodes", "-n", type=int, metavar="N",
                   help="number of nodes (>= 1; required unless --shape; a torus on N nodes is the most "
                   "nearly square rows x cols = N, e.g. 12 -> 3x4)")
    p.add_argument("--shape", metavar="RxC", help="torus only: its rows x cols, e.g. 3x4 (sets --nodes)")
    rules = [*mixing.WEIGHT_RULES, *(f"lazy_{r}" for r in mixing.WEIGHT_RULES)]
    p.add_argument("--weights", default="metropolis", metavar="RULE",
                   help=f"weight rule (default metropolis): {', '.join(rules)}")
    p.add_argument("--draw", metavar="PNG", help="save a drawing of the graph (edge width ~ weight; default: none)")
    p.add_argument("--matrix", action="store_true", help="also print W itself (default: off)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (default: a table)")


def edge_count(name: str, n: int) -> int:
    """Edges of the named topology on ``n`` nodes (an upper bound for ``exponential``), without
    building it."""
    log = max(1, math.ceil(math.log2(n))) if n > 1 else 0
    return {"ring": n if n >= 3 else n - 1, "path": n - 1, "torus": 2 * n, "hypercube": n * log // 2,
            "star": n - 1, "complete": n * (n - 1) // 2, "exponential": n * log}[name]


def _shape(args) -> tuple[int, int] | None:
    """``--shape RxC`` parsed (a torus only), with ``--nodes`` set to R·C or checked against it."""
    if args.shape is None:
        if args.nodes is None:
            raise CommandError("topology needs --nodes N (or --shape RxC for a torus)")
        return None
    if args.name != "torus":
        raise CommandError(f"--shape {args.shape!r} is for the torus only, not {args.name!r}")
    parts = args.shape.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CommandError(f"--shape {args.shape!r} must be ROWSxCOLS, e.g. 3x4")
    rows, cols = (int(p) for p in parts)
    if min(rows, cols) < 3:
        raise CommandError(f"--shape {args.shape!r}: torus sides must be >= 3")
    if args.nodes is not None and args.nodes != rows * cols:
        raise CommandError(f"--nodes {args.nodes} disagrees with --shape {args.shape} ({rows * cols} nodes)")
    args.nodes = rows * cols
    return rows, cols


def _check_size(args) -> None:
    """The graph, ``--matrix`` and ``--draw`` must fit in memory and finish, checked before any work."""
    if args.nodes < 1:
        raise CommandError(f"--nodes must be >= 1, got {args.nodes}")
    n = require_int("--nodes", args.nodes, 1, INT32_MAX, rule="node numbers are int32")
    if args.name not in topology.TOPOLOGIES:
        raise CommandError(f"unknown topology {args.name!r}; valid names: {', '.join(topology.TOPOLOGIES)}")
    edges = edge_count(args.name, n)
    what = f"topology {args.name} --nodes {n}"
    if edges > MAX_EDGES:
        raise CommandError(f"{what} has {edges} edges, more than the {MAX_EDGES} this command builds (networkx "
                           "takes a few microseconds and about 400 bytes per edge); use fewer nodes")
    require_memory(f"{what} ({edges} edges)", GRAPH_BYTES * (n + edges), "use fewer nodes")
    dense = f"a dense {n} x {n} W ({format_bytes(8.0 * n * n)})"
    if args.draw and (n > DRAW_NODES or edges > DRAW_EDGES):
        raise CommandError(f"{what} --draw would need {dense} and one line for each of {edges} edges; --draw "
                           f"takes at most {DRAW_NODES} nodes and {DRAW_EDGES} edges")
    if args.matrix:
        if n > DENSE_LIMIT:
            raise CommandError(f"{what} --matrix would print {dense}; --matrix takes at most {DENSE_LIMIT} nodes")
        require_memory(f"{what} --matrix ({dense}{', as JSON text' if args.json else ''})",
                       (64.0 if args.json else 16.0) * n * n, "use fewer nodes or leave out --matrix")


def summary(name: str, nodes: int, weights: str = "metropolis", shape: tuple[int, int] | None = None):
    """``(graph, W, facts)`` for the named topology (a torus of ``shape`` if given); ``facts`` is a
    JSON-ready dict."""
    graph = topology.torus(*shape) if shape is not None else topology.by_name(name, nodes)
    w = mixing.from_graph(graph, weights)
    degrees = [d for _, d in graph.degree]
    edges = w.worker_offdiagonal().data if w.form != "mean" else np.full(1, w.c)
    edges = edges[edges != 0]
    diag = w.diagonal()
    z = spectral.zeta(w)
    facts = {
        "topology": name if name != "torus" else f"torus {'x'.join(map(str, shape or topology.torus_shape(nodes)))}",
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "degree_min": int(min(degrees)),
        "degree_max": int(max(degrees)),
        "weights": weights,
        "symmetric": w.is_symmetric(mixing.ATOL),
        "doubly_stochastic": bool(np.allclose(w.column_sums(), 1) and np.allclose(w.row_sums(), 1)),
        "self_weight_min": float(diag.min()),
        "self_weight_max": float(diag.max()),
        "edge_weight_min": float(edges.min()) if edges.size else 0.0,
        "edge_weight_max": float(edges.max()) if edges.size else 0.0,
        "nonzeros": int(w.nnz),
        "zeta": z,
        "spectral_gap": 1.0 - z,
    }
    return graph, w, facts


def run(args) -> int:
    """Run ``coopsgd topology`` with the parsed ``args``; return the exit code."""
    shape = _shape(args)
    _check_size(args)
    if args.draw:
        check_png_path("--draw", args.draw)
    graph, w, facts = summary(args.name, args.nodes, args.weights, shape)
    if args.draw:
        from coopsgd.app.plotting import plot_topology

        plot_topology(graph, w, args.draw, name=args.name, shape=shape,
                      title=f"{facts['topology']}, n = {args.nodes}, {args.weights}: ζ = {facts['zeta']:.4f}")
        facts["drawing"] = args.draw
    if args.json:
        out = dict(facts)
        if args.matrix:
            out["W"] = np.asarray(w).tolist()
        print(json.dumps(out, indent=2))
        return 0
    print(f"topology      {facts['topology']} on {facts['nodes']} nodes, {facts['edges']} edges, "
          f"degree {facts['degree_min']}..{facts['degree_max']}")
    print(f"weights       {facts['weights']}: self {facts['self_weight_min']:.4g}..{facts['self_weight_max']:.4g}, "
          f"edges {facts['edge_weight_min']:.4g}..{facts['edge_weight_max']:.4g}, "
          f"{facts['nonzeros']} non-zeros")
    print(f"W             {facts['nodes']}x{facts['nodes']}, symmetric={facts['symmetric']}, "
          f"doubly stochastic={facts['doubly_stochastic']}")
    print(f"zeta          {facts['zeta']:.6f}")
    print(f"spectral gap  {facts['spectral_gap']:.6f}")
    if args.matrix:
        with np.printoptions(precision=4, suppress=True, linewidth=160):
            print(np.asarray(w))
    if args.draw:
        print(f"drawing       {args.draw}")
    return 0
