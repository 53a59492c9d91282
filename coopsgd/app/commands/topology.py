"""``coopsgd topology NAME --nodes N [--weights RULE] [--draw out.png]``: inspect a mixing matrix.

Prints the graph's size and degrees, W's entries, ζ (the second-largest eigenvalue modulus, Wang &
Joshi, Cooperative SGD, Assumption 4) and the spectral gap 1 − ζ; optionally draws the graph.
"""

from __future__ import annotations

import json

import numpy as np

from coopsgd.app.commands import CommandError, check_png_path
from coopsgd.core import mixing, spectral, topology

__all__ = ["register", "run", "summary"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "topology",
        help="a named graph's mixing matrix W: summary, zeta, spectral gap, optional drawing",
        description="Build the named topology on N nodes, weight it by RULE and print W's summary, "
        "zeta and the spectral gap.",
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(topology.TOPOLOGIES)}")
    p.add_argument("--nodes", "-n", type=int, required=True, metavar="N", help="number of nodes (>= 1)")
    rules = [*mixing.WEIGHT_RULES, *(f"lazy_{r}" for r in mixing.WEIGHT_RULES)]
    p.add_argument("--weights", default="metropolis", metavar="RULE",
                   help=f"weight rule (default metropolis): {', '.join(rules)}")
    p.add_argument("--draw", metavar="PNG", help="save a drawing of the graph (edge width ~ weight)")
    p.add_argument("--matrix", action="store_true", help="also print W itself")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def summary(name: str, nodes: int, weights: str = "metropolis"):
    """``(graph, W, facts)`` for the named topology; ``facts`` is a JSON-ready dict."""
    graph = topology.by_name(name, nodes)
    w = mixing.from_graph(graph, weights)
    degrees = [d for _, d in graph.degree]
    edges = w.worker_offdiagonal().data if w.form != "mean" else np.full(1, w.c)
    edges = edges[edges != 0]
    diag = w.diagonal()
    z = spectral.zeta(w)
    facts = {
        "topology": name,
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
    if args.nodes < 1:
        raise CommandError(f"--nodes must be >= 1, got {args.nodes}")
    if args.draw:
        check_png_path("--draw", args.draw)
    graph, w, facts = summary(args.name, args.nodes, args.weights)
    if args.draw:
        from coopsgd.app.plotting import plot_topology

        plot_topology(graph, w, args.draw,
                      title=f"{args.name}, n = {args.nodes}, {args.weights}: ζ = {facts['zeta']:.4f}")
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
