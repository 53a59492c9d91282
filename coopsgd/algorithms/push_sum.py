"""Push-sum on directed graphs: Stochastic Gradient Push (Assran, Loizou, Ballas & Rabbat,
"Stochastic gradient push for distributed deep learning", ICML 2019, Algorithm 1).

On a directed graph a node only knows how many it sends to, so the weights are column-stochastic
(``P[i, j] = 1/(1 + outdeg j)`` on j's out-neighbours and itself, :func:`coopsgd.core.mixing.
push_weights`) and plain gossip would drift toward a skewed average. Push-sum mixes a numerator x_i
and a weight w_i (w⁰ = 1) with the same P and trains the de-biased ``z_i = x_i / w_i``:

    x_i ← Σ_j P_ij (x_j − η ∇f_j(z_j)),      w_i ← Σ_j P_ij w_j,      z_i = x_i / w_i

The engine's models are the z_i (``trainer.workers(state)`` returns them; gradients are taken at
them); the state per worker is w_i and the z_i the round started from, so that the round's updates
``U`` land on the numerator, ``x^{t+½} = w z_start + U``. With τ > 1 local steps between pushes
the updates accumulate on z and are pushed together. Each push sends the numerator and the weight
in one message per out-neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np

from coopsgd.core import mixing, schedules, topology
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.communication import Communication
from coopsgd.core.operator import MixingMatrix, as_operator
from coopsgd.parallel.collectives import WorkerAxis
from coopsgd.parallel.linear import LinearRounds, mix_local
from coopsgd.parallel.protocol import Mixer, MixerState, MixRound

__all__ = ["PushSchedule", "check_push_matrix", "push_sum", "push_sum_mixer"]


def check_push_matrix(p, name: str = "P") -> MixingMatrix:
    """``p`` as a MixingMatrix if it is a valid push-sum matrix: square, finite, non-negative,
    every column summing to 1 (what a node sends adds up to what it had), a positive diagonal.

    Raises:
        ValueError: naming the first rule broken and where.
    """
    p = as_operator(p, name=name)
    if not p.is_finite():
        raise ValueError(f"{name} must be finite")
    csr = p.tocsr()
    if csr.nnz and csr.data.min() < 0:
        raise ValueError(f"{name} must be non-negative (shares of what a node sends), got a minimum of "
                         f"{csr.data.min():.6g}")
    sums = np.asarray(csr.sum(axis=0)).ravel()
    bad = np.abs(sums - 1.0) > mixing.ATOL
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{name} must be column-stochastic (each node sends shares summing to 1), but "
                         f"column {j} sums to {sums[j]:.12g}")
    diag = p.worker_diagonal()
    if np.any(diag <= 0):
        raise ValueError(f"{name} needs a positive diagonal (every node keeps a share), but {name}[{int(np.argmin(diag))}, "
                         f"{int(np.argmin(diag))}] = {diag.min():.6g}")
    return p


def _require_strongly_connected(ps: Sequence[MixingMatrix]) -> None:
    """The union of the graphs (j → i where P_ij > 0) must be strongly connected."""
    union = nx.DiGraph()
    union.add_nodes_from(range(ps[0].n))
    for p in ps:
        coo = p.tocsr().tocoo()
        union.add_edges_from((int(j), int(i)) for i, j in zip(coo.row, coo.col) if i != j)
    if not nx.is_strongly_connected(union):
        parts = sorted((sorted(c) for c in nx.strongly_connected_components(union)), key=len, reverse=True)
        shown = "; ".join(str(c if len(c) <= 8 else c[:8] + ["..."]) for c in parts[:4])
        raise ValueError(f"push-sum needs a strongly connected directed graph (every node reaching every other), "
                         f"but it has {len(parts)} strongly connected components: {shown}")


class PushSchedule(schedules.MixingSchedule):
    """Push-sum's matrices in the engine's convention ``X ← X W``: ``W^(r) = (P^(r))ᵀ``, whose rows
    (not columns) sum to 1; cycled over the list."""

    def __init__(self, ps: Sequence[MixingMatrix], description: str = "push-sum"):
        self.cycle = tuple(p.T for p in ps)
        self.n, self.v, self.description = ps[0].n, 0, description

    def at(self, r: int) -> MixingMatrix:
        """The column-stochastic push matrix of round ``r``."""
        return self.cycle[r % len(self.cycle)]

    def __repr__(self) -> str:
        return f"{self.description}(n={self.n}, length={len(self.cycle)})"


def push_sum_mixer(algorithm: Algorithm, devices: bool = False) -> Mixer:
    """Push-sum's mixing over ``algorithm``'s W = Pᵀ: the state per worker is the weight w (1 at
    the start) and the z the round started from."""
    rounds = LinearRounds(algorithm, prune=devices)

    def init(columns) -> MixerState:
        m = jax.tree.leaves(columns)[0].shape[0]
        dtype = jnp.result_type(jax.tree.leaves(columns)[0])
        return MixerState(per_worker={"weight": jnp.ones((m,), dtype),
                                      "start": jax.tree.map(jnp.asarray, columns)})

    def apply(columns, state: MixerState, mix_round: MixRound, axis: WorkerAxis):
        w, start = state.per_worker["weight"], state.per_worker["start"]

        def numerator(z, z0):
            return w.reshape(w.shape + (1,) * (z.ndim - 1)).astype(z.dtype) * z0 + (z - z0)

        x = jax.tree.map(numerator, columns, start)
        (x, w), _ = mix_local(mix_round.static, (x, w), (), mix_round.args, axis)
        z = jax.tree.map(lambda a: a / w.reshape(w.shape + (1,) * (a.ndim - 1)).astype(a.dtype), x)
        return z, MixerState(per_worker={"weight": w, "start": z})

    def traffic(r: int, param_bytes: float) -> Communication:
        return rounds.traffic(r, float(param_bytes) + 4.0)  # the numerator and its weight

    return Mixer(init=init, apply=apply, traffic=traffic, plan=rounds.round,
                 name=f"push-sum over {algorithm.mixing!r}")


def push_sum(digraphs, tau=1) -> Algorithm:
    """Stochastic Gradient Push (Assran et al., ICML 2019, Algorithm 1) on a directed graph.

    Args:
        digraphs: a strongly connected ``networkx.DiGraph`` (weights :func:`coopsgd.core.mixing.
            push_weights`), a column-stochastic P (``P[i, j]`` the share j sends to i), or a list
            of either, used in turn (a time-varying graph such as
            :func:`coopsgd.core.topology.one_peer_exponential_digraphs`; their union must be
            strongly connected).
        tau: local steps between pushes (1 in the paper).

    Raises:
        ValueError: a graph that is not strongly connected (naming its components), a P that is not
            column-stochastic, non-negative and with a positive diagonal, or sizes that differ.

    Example:
        >>> import coopsgd
        >>> algo = coopsgd.push_sum(coopsgd.topology.one_peer_exponential_digraphs(8))
        >>> algo.m, algo.name
        (8, 'push_sum')
    """
    items = list(digraphs) if isinstance(digraphs, (list, tuple)) else [digraphs]
    if not items:
        raise ValueError("push_sum needs at least one directed graph or matrix P")
    ps = []
    for k, item in enumerate(items):
        name = "P" if len(items) == 1 else f"P[{k}]"
        if isinstance(item, nx.Graph):
            if not item.is_directed():
                raise ValueError(f"push_sum needs a networkx.DiGraph; {name} is an undirected {type(item).__name__} "
                                 "(use item.to_directed() to send both ways, or dpsgd for undirected graphs)")
            ps.append(mixing.push_weights(topology.canonical_digraph(item)))
        else:
            ps.append(check_push_matrix(item, name))
    if len({p.n for p in ps}) > 1:
        raise ValueError(f"every graph needs the same number of nodes, got {[p.n for p in ps]}")
    _require_strongly_connected(ps)
    return Algorithm(PushSchedule(ps), tau=tau, name="push_sum", mixer=push_sum_mixer)
