"""docs/scaling.md: time per step and speed-up over fully synchronous SGD, predicted for 8 to
4 096 accelerators, 10 / 100 / 400 Gbps and models of 10 M, 1 B and 10 B parameters, from the
runtime model's arithmetic (coopsgd.sim.scaling) and the engine's account of each mixing
(coopsgd.mixing_traffic on W built by its structure: O(m) for averaging, O(edges) for a ring)."""

from __future__ import annotations

import functools
import math
import os

import coopsgd
from coopsgd import mixing, topology
from coopsgd.core import operator
from coopsgd.sim import scaling

from .experiments import EXPERIMENTS, table

__all__ = ["ALGORITHMS", "MODELS", "NETWORKS", "SIZES", "algorithms_at", "exp_scaling", "H100_FLOPS",
           "TOKENS", "UTILIZATION"]

H100_FLOPS = 989e12
"""Dense BF16 peak of one NVIDIA H100 SXM, FLOP/s (NVIDIA's data sheet; recalled)."""
UTILIZATION = 0.4
"""Sustained share of peak (model FLOPs utilisation): assumed, a typical large-run figure."""
TOKENS = 8 * 2048
"""Tokens per accelerator per step: assumed, 8 sequences of 2 048 tokens."""
MODELS = {"10 M": 10e6, "1 B": 1e9, "10 B": 10e9}
"""Parameters; models are sent in float32 (4 bytes a parameter, as the engine keeps them)."""
NETWORKS = {"10 Gbps": (10, 50e-6), "100 Gbps": (100, 5e-6), "400 Gbps": (400, 2e-6)}
"""Per-accelerator link rate (Gbps) and latency per message: 50 us Ethernet, 5 us / 2 us
InfiniBand-class (assumed)."""
SIZES = (8, 64, 512, 4096)
"""Accelerators (workers)."""
ALGORITHMS = ("sync SGD (τ = 1)", "local SGD τ = 4", "local SGD τ = 16", "EASGD τ = 4, overlapped",
              "D-PSGD, ring", "decentralized periodic, ring, τ = 4", "Overlap Local-SGD τ = 2")
"""The algorithms predicted, by the names the Cooperative SGD comparison uses."""


@functools.lru_cache(maxsize=None)
def algorithms_at(m: int) -> dict:
    """``name -> (W, v, tau, overlapped)`` at m workers, W in its structured form."""
    ring = mixing.metropolis(topology.by_name("ring", m))
    easgd, ov = coopsgd.easgd(m, 4), coopsgd.overlap_local_sgd(m, 2, 0.6)
    return {"sync SGD (τ = 1)": (operator.averaging(m), 0, 1, False),
            "local SGD τ = 4": (operator.averaging(m), 0, 4, False),
            "local SGD τ = 16": (operator.averaging(m), 0, 16, False),
            "EASGD τ = 4, overlapped": (easgd.mixing.at(0), easgd.v, 4, True),
            "D-PSGD, ring": (ring, 0, 1, False),
            "decentralized periodic, ring, τ = 4": (ring, 0, 4, False),
            "Overlap Local-SGD τ = 2": (ov.mixing.at(0), ov.v, 2, True)}


@functools.lru_cache(maxsize=None)
def _traffic(m: int, name: str, param_bytes: float):
    w, v, _, _ = algorithms_at(m)[name]
    return coopsgd.mixing_traffic(w, param_bytes, v)


def predictions(params: float, m: int, gbps: float, latency: float, steps: dict | None = None) -> dict:
    """``name -> coopsgd.sim.scaling.Prediction`` for one model, cluster size and network."""
    y = scaling.transformer_step_seconds(params, TOKENS, H100_FLOPS, UTILIZATION)
    out = {}
    for name, (w, v, tau, ov) in algorithms_at(m).items():
        traffic = _traffic(m, name, 4 * params)
        out[name] = scaling.predict(traffic, tau, y, latency=latency, bandwidth=gbps * scaling.GBPS, overlap=ov,
                                    steps_to_target=None if steps is None else steps.get(name))
    return out


def _ms(x):
    return f"{x:.3g} s" if x >= 1 else f"{1e3 * x:.3g} ms"


def exp_scaling(cfg, out: str, results: dict) -> dict:
    """The tables and plot of docs/scaling.md."""
    coop = results.get("coop") or EXPERIMENTS["coop"](cfg, out)
    steps = coop["steps_to_target"]
    cols = [(m, g) for m in (8, 512, 4096) for g in NETWORKS]
    header = ["algorithm", *[f"m={m}, {g}" for m, g in cols]]
    tables = {}
    for label, n in MODELS.items():
        rows = []
        preds = {(m, g): predictions(n, m, *NETWORKS[g], steps) for m, g in cols}
        for name in ALGORITHMS:
            rows.append([name, *[_ms(preds[c][name].step_seconds) for c in cols]])
        key = "scaling_" + label.replace(" ", "").lower()
        tables[key] = table(header, rows)
        srows = []
        for name in ALGORITHMS:
            cells = []
            for c in cols:
                p, s = preds[c][name], preds[c]["sync SGD (τ = 1)"]
                cells.append("—" if p.seconds_to_target is None or s.seconds_to_target is None
                             else f"{s.seconds_to_target / p.seconds_to_target:.2f}×")
            srows.append([name, *cells])
        tables[key + "_speedup"] = table(header, srows)
    y = {k: scaling.transformer_step_seconds(n, TOKENS, H100_FLOPS, UTILIZATION) for k, n in MODELS.items()}
    tables["scaling_compute"] = table(["model", "bytes (float32)", "compute per step Y"],
                                      [[k, f"{4 * n / 1e9:g} GB", _ms(y[k])] for k, n in MODELS.items()])
    tables["scaling_steps"] = table(["algorithm", "steps to sync SGD's final loss (digits, m = 8)"],
                                    [[n, steps.get(n) or "—"] for n in ALGORITHMS])
    _plot(os.path.join(out, "scaling_1b.png"))
    return {"experiment": "scaling", "steps_to_target": steps,
            "step_seconds": {k: round(v, 6) for k, v in y.items()}, "tables": tables}


def _two_five(value: float, _pos=None) -> str:
    """A minor log tick's label: only at 2 and 5 × 10^k (plain numbers), so labels never crowd."""
    digit = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if digit in (2, 5) else ""


def _plot(path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    n = MODELS["1 B"]
    y = scaling.transformer_step_seconds(n, TOKENS, H100_FLOPS, UTILIZATION)
    for ax, (g, (gbps, lat)) in zip(axes, NETWORKS.items()):
        per = {m: predictions(n, m, gbps, lat) for m in SIZES}
        for name in ALGORITHMS:
            ax.plot(SIZES, [per[m][name].step_seconds for m in SIZES], marker="o", label=name)
        ax.axhline(y, color="k", ls=":", lw=1, label="compute only (Y)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_five))
        ax.set_title(f"1 B parameters, {g}", fontsize=9)
        ax.set_xlabel("accelerators m")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("predicted seconds per local step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
