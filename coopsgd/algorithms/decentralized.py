"""Decentralized SGD on a graph: D-PSGD (neighbour averaging after every step) and decentralized
periodic averaging (τ local steps, then one neighbour averaging).

References:
    Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS 2017;
    Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.3–3.4.
"""

from __future__ import annotations

from typing import Literal

import networkx as nx

from coopsgd.core import mixing, spectral, topology
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix
from coopsgd.core.validate import require_choice
from coopsgd.parallel.linear import linear_unmixed

FORMS = ("cooperative", "lian")
"""D-PSGD's two update orders (see :func:`dpsgd`)."""

__all__ = ["FORMS", "consensus_matrix", "decentralized_periodic", "dpsgd"]


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


def dpsgd(graph_or_W, weights="metropolis", form: Literal["cooperative", "lian"] = "cooperative") -> Algorithm:
    """Decentralized parallel SGD: after every step each worker averages with its neighbours by W
    (a symmetric doubly stochastic W on a connected graph, τ = 1, v = 0). Pass a networkx graph
    (weighted by the ``weights`` rule) or W itself.

    Two forms, which differ by ``η(G − GW)`` per step:

    - ``"cooperative"`` (default; adapt, then combine): ``x_i ← Σ_j W_ij (x_j − η g_j(x_j))``,
      Cooperative SGD's ``X ← (X − ηG)W``, whose analysis (Wang & Joshi, §3.3) covers it;
    - ``"lian"``: ``x_i ← Σ_j W_ij x_j − η g_i(x_i)`` (Lian et al., Algorithm 1): the gradient
      step is not mixed. It keeps one more copy of the models (x_t, where the gradient was taken).

    With an optax optimizer, ``−η g`` is the optimizer's update.

    References:
        Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS
        2017, Algorithm 1; Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.3.
    """
    form = require_choice("form", form, FORMS, "D-PSGD forms")
    w = consensus_matrix(graph_or_W, weights, "D-PSGD")
    if form == "lian":
        return Algorithm(w, tau=1, name="dpsgd_lian", mixer=linear_unmixed)
    return Algorithm(w, tau=1, name="dpsgd")


def decentralized_periodic(graph_or_W, tau, weights="metropolis") -> Algorithm:
    """Decentralized periodic averaging: τ local steps, then one neighbour averaging by W.

    References:
        Wang & Joshi, "Cooperative SGD", §3.4.
    """
    w = consensus_matrix(graph_or_W, weights, "decentralized periodic averaging")
    return Algorithm(w, tau=tau, name="decentralized_periodic")
