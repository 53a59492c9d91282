"""PNG plots of runs and topologies, drawn with matplotlib's Agg canvas (no display, no pyplot state).

A *history* is a mapping with equal-length lists ``"step"``, ``"time"`` (simulated wall-clock),
``"loss"`` (worker-averaged training loss) and optionally ``"consensus"`` (consensus distance
(1/m) Σ_i ‖x_i − x̄‖²); plots take ``{label: history}``.
"""

from __future__ import annotations

import os

import matplotlib
import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from coopsgd.app.files import atomic_write

__all__ = ["RUN_FIGURES", "plot_curves", "plot_run_figures", "plot_topology"]

RUN_FIGURES = {
    "loss_vs_step.png": ("step", "loss", "iteration", "training loss (worker average)"),
    "loss_vs_time.png": ("time", "loss", "simulated wall-clock time (s)", "training loss (worker average)"),
    "consensus.png": ("step", "consensus", "iteration", "consensus distance (1/m) Σ‖x_i − x̄‖²"),
}
"""File name → (x key, y key, x label, y label) of the figures every results folder gets."""


_STYLES = ("-", "--", "-.", ":")


def _save(fig: Figure, path) -> str:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_curves(histories: dict, x: str, y: str, path, *, xlabel: str | None = None,
                ylabel: str | None = None, title: str | None = None, logy: bool = True) -> str:
    """One line per history, ``y`` against ``x``; log scale on y when all values are positive."""
    fig = Figure(figsize=(6.4, 4.2) if len(histories) <= 8 else (7.2, 5.0))
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
                color=colours[i % len(colours)])
    if logy and positive and values:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        narrow = max(values) < 10 * min(values)  # label the minor ticks only within one decade
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g") if narrow else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if histories:
        ax.legend(fontsize=8, ncol=2 if len(histories) > 8 else 1)
    fig.tight_layout()
    return _save(fig, path)


def plot_run_figures(histories: dict, folder, title: str = "") -> list[str]:
    """The three figures of a results folder (:data:`RUN_FIGURES`); returns their paths."""
    out = []
    for name, (x, y, xl, yl) in RUN_FIGURES.items():
        out.append(plot_curves(histories, x, y, os.path.join(folder, name), xlabel=xl, ylabel=yl,
                               title=title or None))
    return out


def plot_topology(graph: nx.Graph, W, path, title: str = "") -> str:
    """Draw ``graph`` (circular layout) with edge widths proportional to the weights ``W[i, j]``."""
    W = np.asarray(W)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    pos = nx.circular_layout(graph) if graph.number_of_nodes() > 1 else {0: np.zeros(2)}
    for i, j in graph.edges:
        (x0, y0), (x1, y1) = pos[i], pos[j]
        ax.plot([x0, x1], [y0, y1], color="tab:gray", lw=0.5 + 6.0 * abs(W[i, j]), zorder=1)
    xy = np.array([pos[i] for i in sorted(graph.nodes)])
    ax.scatter(xy[:, 0], xy[:, 1], s=300, color="tab:blue", zorder=2)
    for i in graph.nodes:
        ax.annotate(str(i), pos[i], ha="center", va="center", color="white", fontsize=8, zorder=3)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
