"""PNG plots of runs and topologies, drawn with matplotlib's Agg canvas (no display, no pyplot state).

A *history* is a mapping with equal-length lists ``"step"``, ``"time"`` (simulated wall-clock),
``"loss"`` (worker-averaged training loss) and optionally ``"consensus"`` (consensus distance
(1/m) Σ_i ‖x_i − x̄‖²); plots take ``{label: history}``.
"""

from __future__ import annotations

import matplotlib
import networkx as nx
import numpy as np
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, NullFormatter

from coopsgd.app.files import atomic_write
from coopsgd.core import topology

__all__ = ["plot_curves", "plot_topology", "topology_layout"]

_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")


def _save(fig: Figure, path) -> str:
    fig.set_layout_engine(None)  # tight_layout leaves a placeholder engine: savefig would draw twice
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _minor_label(value: float, _pos=None) -> str:
    """Minor log ticks labelled at 2, 3 and 5 × 10^k only: never beside a decade's own label."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
    return f"{value:.2g}" if mantissa in (2.0, 3.0, 5.0) else ""


def plot_curves(histories: dict, x: str, y: str, path, *, xlabel: str | None = None,
                ylabel: str | None = None, title: str | None = None, logy: bool = True) -> str:
    """One line per history, ``y`` against ``x``; log scale on y when all values are positive."""
    many = len(histories) > 8
    fig = Figure(figsize=(6.4, 4.2) if not many else (8.6, 4.6))
    ax = fig.add_subplot()
    positive, values = True, []
    colours = matplotlib.colormaps["tab20"].colors if len(histories) > 10 else [None] * len(histories)
    for i, (label, hist) in enumerate(histories.items()):
        if y not in hist or not len(hist[y]):
            continue
        xs, ys = np.asarray(hist[x], float), np.asarray(hist[y], float)
        keep = np.isfinite(ys)
        positive &= bool(np.all(ys[keep] > 0))
        values.extend(ys[keep])
        ax.plot(xs[keep], ys[keep], label=label, lw=1.6, ls=_STYLES[(i // 10 + i) % len(_STYLES)],
                color=colours[i % len(colours)], marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                markevery=(i % 5, max(1, int(keep.sum()) // 6)))  # staggered: markers do not pile up
    if logy and positive and values:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        narrow = max(values) < 10 * min(values)  # label the minor ticks only within one decade
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label) if narrow else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if histories and many:  # beside the axes: a long legend must not cover the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    elif histories:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def topology_layout(graph: nx.Graph, name: str = "", shape: tuple[int, int] | None = None) -> dict:
    """Node positions that show a named topology's structure (nodes ``0..n-1`` as
    :func:`coopsgd.core.topology.by_name` numbers them): ``torus`` on its rows × cols grid (``shape``,
    default :func:`~coopsgd.core.topology.torus_shape`), ``path`` on a
    line, ``star`` with its hub (node 0) in the centre, ``hypercube`` as the projection of the
    d-cube (node i at Σ_b bit_b(i)·(cos πb/d, sin πb/d)); anything else on a circle."""
    n = graph.number_of_nodes()
    nodes = sorted(graph.nodes)
    if n <= 1:
        return {v: np.zeros(2) for v in nodes}
    if name == "torus":
        _, cols = shape if shape is not None else topology.torus_shape(n)
        return {v: np.array([v % cols, -(v // cols)], float) for v in nodes}
    if name == "path":
        return {v: np.array([v, 0.0]) for v in nodes}
    if name == "star":
        pos = nx.circular_layout(graph.subgraph(nodes[1:]))
        pos[nodes[0]] = np.zeros(2)
        return pos
    if name == "hypercube" and n & (n - 1) == 0:
        d = n.bit_length() - 1
        angles = np.pi * np.arange(d) / d
        axes = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return {v: ((v >> np.arange(d)) & 1) @ axes for v in nodes}
    return nx.circular_layout(graph)


def plot_topology(graph: nx.Graph, W, path, title: str = "", name: str = "",
                  shape: tuple[int, int] | None = None) -> str:
    """Draw ``graph`` in :func:`topology_layout` for ``name``: edge widths proportional to the weights
    ``W[i, j]`` (explained in the legend), nodes coloured by their self-weights ``W[i, i]``. On a
    torus the wrap-around edges are dashed arcs."""
    csr = W.tocsr() if hasattr(W, "tocsr") else sp.csr_array(np.asarray(W))  # never a dense n × n copy
    fig = Figure(figsize=(6.0, 5.2))
    ax = fig.add_subplot()
    pos = topology_layout(graph, name, shape)
    weights = [abs(float(csr[i, j])) for i, j in graph.edges]

    def width(w):  # points; the same scale on every drawing
        return 0.4 + 10.0 * w

    side = name == "torus"
    for (i, j), w in zip(graph.edges, weights):
        (x0, y0), (x1, y1) = pos[i], pos[j]
        wraps = side and (abs(x1 - x0) > 1 or abs(y1 - y0) > 1)
        if wraps:
            bend = 0.35 if abs(x1 - x0) > 1 else -0.35
            mid = (np.array([x0 + x1, y0 + y1]) / 2) + bend * np.array([0.0, 1.0] if abs(x1 - x0) > 1 else [1.0, 0.0])
            ax.plot([x0, mid[0], x1], [y0, mid[1], y1], color="tab:gray", lw=width(w), ls=":", alpha=0.6, zorder=1)
        else:
            ax.plot([x0, x1], [y0, y1], color="tab:gray", lw=width(w), zorder=1)
    order = sorted(graph.nodes)
    xy = np.array([pos[i] for i in order])
    diag = np.asarray(csr.diagonal())[order]
    vmax = max(1e-12, float(diag.max()))
    dots = ax.scatter(xy[:, 0], xy[:, 1], s=320, c=diag, cmap="Blues", vmin=0.0, vmax=vmax,
                      edgecolors="black", linewidths=0.5, zorder=2)
    for i, d in zip(order, diag):
        ax.annotate(str(i), pos[i], ha="center", va="center", fontsize=7, zorder=3,
                    color="white" if d > 0.6 * vmax else "black")
    fig.colorbar(dots, ax=ax, shrink=0.7, label="self-weight $W_{ii}$")
    if weights:
        shown = sorted({round(min(weights), 4), round(max(weights), 4)})
        handles = [ax.plot([], [], color="tab:gray", lw=width(w))[0] for w in shown]
        labels = [f"$W_{{ij}}$ = {w:.4g}" for w in shown]
        if side:
            handles.append(ax.plot([], [], color="tab:gray", ls=":", lw=1.5)[0])
            labels.append("wrap-around edge")
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(labels),
                  fontsize=8, frameon=False, title="edge width ∝ weight", title_fontsize=8)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
