"""Decentralized SGD on a graph: D-PSGD (neighbour averaging after every step) and decentralized
periodic averaging (τ local steps, then one neighbour averaging).

References:
    Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS 2017;
    Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.3–3.4.
"""

from __future__ import annotations

import networkx as nx

from coopsgd.core import mixing, spectral, topology
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix

__all__ = ["dpsgd", "decentralized_periodic", "consensus_matrix"]


def consensus_matrix(graph_or_w, weights="metropolis", purpose: str = "consensus") -> MixingMatrix:
    """A symmetric doubly stochastic W on a connected graph with ζ < 1: from a networkx graph
    (weighted by the ``weights`` rule) or checked as given. O(edges) for sparse W.

    Raises:
        ValueError: naming the components of a disconnected graph, an asymmetric W, or ζ = 1.
    """
    if isinstance(graph_or_w, nx.Graph):
        graph = mixing.require_connected(topology.canonical(graph_or_w), purpose)
        w = mixing.from_graph(graph, weights)
    else:
        w = mixing.check(graph_or_w, symmetric=True)
        mixing.require_connected(w, purpose)
    z = spectral.zeta(w)
    if z >= 1.0 - 1e-12:
        raise ValueError(
            f"{purpose} needs zeta < 1, but this W has zeta = {z:.6g} (a bipartite graph with "
            "zero self-weights has an eigenvalue -1; use mixing.lazy(W) or a 'lazy_' rule)"
        )
    return w


def dpsgd(graph_or_W, weights="metropolis") -> Algorithm:
    """Decentralized parallel SGD: after every step each worker averages with its neighbours by W.

    ``x_j ← Σ_i W[i, j] (x_i − η g_i)`` with a symmetric doubly stochastic W on a connected graph
    (τ = 1, v = 0). Pass a networkx graph (weighted by the ``weights`` rule) or W itself.

    References:
        Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS
        2017; Wang & Joshi, "Cooperative SGD", §3.3.
    """
    return Algorithm(consensus_matrix(graph_or_W, weights, "D-PSGD"), tau=1, name="dpsgd")


def decentralized_periodic(graph_or_W, tau, weights="metropolis") -> Algorithm:
    """Decentralized periodic averaging: τ local steps, then one neighbour averaging by W.

    References:
        Wang & Joshi, "Cooperative SGD", §3.4.
    """
    w = consensus_matrix(graph_or_W, weights, "decentralized periodic averaging")
    return Algorithm(w, tau=tau, name="decentralized_periodic")
