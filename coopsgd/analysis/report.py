"""Tables and figures of :class:`coopsgd.analysis.verify.BoundCheck` rows.

The table names the problem and its constants (L, σ², F(u₁) − F_inf, ζ̄²), the bound used
(:data:`coopsgd.analysis.consensus.THEOREMS`), what "empirical" is, and which rule decided each
verdict. The figure puts the swept parameter (η, τ, ζ or m) on the x-axis; its legend lists only
what is drawn, and a zero network term is kept visible by a symmetric-log axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from coopsgd.analysis.consensus import THEOREMS

__all__ = ["EMPIRICAL", "describe_problem", "draw", "format_table", "plot"]

EMPIRICAL = ("empirical = (1/K) Σ_k ‖∇F(u_k)‖² of the averaged model u_k = X_k 1/n, mean over seeds ± standard "
             "error; exact = its expectation by the mean–covariance recursion (quadratics)")
"""What the table's "empirical" and "exact" columns are (printed above every table)."""

_SHORT = {"cooperative": "Thm 1 (W&J)", "koloskova": "Koloskova"}


def describe_problem(name: str, c: dict | None) -> str:
    """``name — L = …, σ² = …, F(u₁) − F_inf = …, ζ̄² = …`` (the constants a bound reads)."""
    if not c:
        return name
    text = (f"{name} — L = {c['L']:.4g}, σ² = {c['sigma2']:.4g}, F(u₁) − F_inf = {c['f_gap']:.4g}, "
            f"ζ̄² = {c['zeta2']:.4g}")
    if c.get("growth"):
        text += f" (+ {c['growth']:.3g}‖∇F‖²)"
    return text + (" (identical data)" if not c["zeta2"] and not c.get("growth") else "")


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def format_table(rows: Sequence, *, preamble: bool = True) -> str:
    """A Markdown table, one line per run, with the bound's terms and the verdict and its rule.

    With ``preamble`` it is preceded by the problems and their constants, the bounds used, and
    what "empirical" means (each line starting with ``> ``).
    """
    lines = []
    if preamble:
        for text in dict.fromkeys(describe_problem(r.problem, r.constants) for r in rows):
            lines.append(f"> problem: {text}")
        for key in dict.fromkeys(r.bound.theorem for r in rows):
            lines.append(f"> bound: {THEOREMS.get(key, key)}")
        lines.append(f"> {EMPIRICAL}")
        lines.append("")
    head = ("| run | m | τ | v | ζ | p | η | K | seeds | empirical ± s.e. | exact | optimization | noise | "
            "network | bound | ratio | bound by | decided by | holds |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        verdict = "yes" if r.holds else ("**NO**" if r.applies else "no (n/a)")
        if r.bound.total == math.inf:
            verdict = "— (no finite bound)"
        if r.note:
            verdict += f" ({r.note})"
        lines.append(
            f"| {r.label} | {r.m} | {r.tau} | {r.v} | {r.zeta:.4f} | {getattr(r, 'p', 1.0):.4g} | {r.eta:g} | {r.K} | "
            f"{r.seeds} | {r.empirical:.4g} ± {r.stderr:.2g} | {_fmt(r.exact)} | {r.bound.optimization:.4g} | "
            f"{r.bound.noise:.4g} | {r.bound.network:.4g} | {r.bound.total:.4g} | "
            f"{'—' if r.bound.total == math.inf else f'{r.ratio:.3f}'} | "
            f"{_SHORT.get(r.bound.theorem, r.bound.theorem)} | {getattr(r, 'decided_by', '') or '—'} | {verdict} |"
        )
    return "\n".join(lines)


def _positions(xs):
    xs = np.asarray(xs, dtype=float)
    if len(set(np.round(xs, 6).tolist())) < len(xs):  # repeated values (two graphs with the same ζ): a slot each
        return np.arange(len(xs), dtype=float), True
    return xs, False


def plot(panels: dict, path, *, title: str = "", ncols: int = 3):
    """Empirical (±2 s.e. bars, the exact value where known) against the bound, over the swept parameter.

    Each panel draws the bound's total (filled markers where its assumptions hold, hollow where η is
    beyond its step-size condition), its network term (dotted) and the heterogeneity part of it
    where non-zero, the measured value, the exact value and the workers' own models
    (:attr:`BoundCheck.local_models`, not bounded). The legend of a panel lists only what that
    panel draws. When a drawn value is 0 (no network term at τ = 1 on the complete graph) the
    y-axis is symmetric-log, so the zero stays on the figure.

    Args:
        panels: ``{panel title: (x-axis label, x values, rows[, tick labels])}``; one subplot each.
            The x values are the swept parameter (η, τ, ζ or m), one per row; repeated values (two
            graphs with the same ζ) get a slot each.
        path: where to save the PNG.
        title: a figure title (say m and the topology there when they are fixed).
        ncols: panels per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(panels, title=title, ncols=ncols)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(panels: dict, *, title: str = "", ncols: int = 3):
    """The figure of :func:`plot` (a matplotlib Figure, not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 5.4 * nrows), squeeze=False)
    for ax, (name, panel) in zip(axes.flat, panels.items()):
        xlabel, xs, rows = panel[:3]
        ticks = panel[3] if len(panel) > 3 else [f"{x:.3g}" for x in np.asarray(xs, dtype=float)]
        pos, categorical = _positions(xs)
        drawn = []
        total = np.array([r.bound.total for r in rows])
        fin = np.isfinite(total)
        ok = np.array([r.applies for r in rows]) & fin
        out = ~np.array([r.applies for r in rows]) & fin
        ax.plot(pos[fin], total[fin], "-", color="tab:red", alpha=0.7)
        if ok.any():
            ax.plot(pos[ok], total[ok], "o", color="tab:red", label="bound (assumptions hold)")
        if out.any():
            ax.plot(pos[out], total[out], "o", mfc="none", color="tab:red", label="bound, η beyond its step-size condition")
        if (~fin).any():
            where = ", ".join(t.replace("\n", " ") for t, f in zip(ticks, fin) if not f)
            ax.text(0.02, 0.96, f"no finite bound at {where} (η beyond its step-size condition)",
                    transform=ax.transAxes, fontsize=7, color="tab:red", va="top")
        net = np.array([r.bound.network for r in rows])
        if fin.any():
            ax.plot(pos[fin], net[fin], ":", marker=".", color="tab:red", alpha=0.7, label="network term of the bound")
        het = np.array([getattr(r.bound, "dissimilarity", 0.0) for r in rows])
        if np.any(het[fin] > 0):
            ax.plot(pos[fin], het[fin], "-.", color="tab:orange", alpha=0.8, label="its ζ̄² part")
            drawn.append(het[fin])
        total, net = total[fin], net[fin]
        emp = np.array([r.empirical for r in rows])
        se = np.array([r.stderr for r in rows])
        ax.errorbar(pos, emp, yerr=2 * se, fmt="s-", color="tab:blue", capsize=3, ms=4,
                    label="empirical (1/K)Σ‖∇F(u_k)‖², ±2 s.e.")
        if any(r.exact is not None for r in rows):
            ex = np.array([np.nan if r.exact is None else r.exact for r in rows])
            ax.plot(pos, ex, "x", color="k", ms=8, label="exact (recursion)")
            drawn.append(ex)
        loc = np.array([r.local_models for r in rows])
        ax.plot(pos, loc, "^--", color="tab:green", ms=4, alpha=0.8, label="workers' own models (not bounded)")
        values = np.concatenate([total, net, emp, loc] + drawn)
        values = values[np.isfinite(values)]
        positive = values[values > 0]
        if np.any(values <= 0) and len(positive):
            ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(positive.min())))
            ax.text(0.02, 0.02, "symlog axis: 0 is drawn", transform=ax.transAxes, fontsize=7, color="0.4")
        elif len(positive):
            ax.set_yscale("log")
        if not categorical and np.all(pos > 0) and pos.max() / pos.min() > 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(pos)
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_xlabel("\n".join(textwrap.wrap(xlabel, 60)))
        ax.set_ylabel("(1/K) Σ_k E‖∇F(·)‖²")
        ax.set_title("\n".join(textwrap.wrap(name, 55)), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, int(60 * ncols))), fontsize=11)
    fig.tight_layout()
    return fig
