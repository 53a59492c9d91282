"""The task, training with a record of every round, re-timing a record under a system model, and
plots.

Loss against steps does not depend on the clock for any algorithm whose period is fixed, so each
such run is trained once and its record (every round's first step, length, index and whether it
mixed, and the averaged model's full training loss after it) is timed afterwards under as many
system models as needed, with the runtime model's own :class:`coopsgd.sim.runtime.Clock` and the
engine's account of each mixing (``coopsgd.mixing_traffic``). AdaComm, whose τ depends on the
time, is timed while it trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopsgd
from coopsgd import CooperativeSGD, Stop
from coopsgd.app import data, models

__all__ = ["Task", "record", "retime", "time_to", "steps_to", "plot_curves", "plot_speedups"]


class Task:
    """Digits (1 437 training examples), IID or Dirichlet shards, a 64-32-10 MLP, plain SGD."""

    def __init__(self, m: int, *, dirichlet: float | None = None, seed: int = 0):
        self.ds = data.load_digits(seed=seed)
        self.m = m
        self.shards = (data.split_iid(len(self.ds.y_train), m, seed) if dirichlet is None
                       else data.split_dirichlet(self.ds.y_train, m, dirichlet, seed))
        self.model = models.make("mlp", self.ds.input_shape, self.ds.num_classes, hidden=(32,))
        self.params0 = self.model.init(jax.random.key(seed))
        self.loss = models.loss_fn(self.model)
        x, y = jnp.asarray(self.ds.x_train), jnp.asarray(self.ds.y_train)
        self.full_loss = jax.jit(lambda p: self.loss(p, {"x": x, "y": y}))

    def sampler(self, batch: int, seed: int = 0) -> data.WorkerSampler:
        """Each worker draws ``batch`` examples of its own shard per step."""
        return data.WorkerSampler(self.ds.x_train, self.ds.y_train, self.shards, batch, seed)

    def averaged_loss(self, trainer, state) -> float:
        """Full training loss of the workers' averaged model."""
        workers = trainer.workers(state)
        return float(self.full_loss(jax.tree.map(lambda w: jnp.mean(w, axis=0), workers)))


def record(task: Task, algo, *, steps: int, lr=0.05, batch: int = 16, observe=None, clock=None,
           param_bytes: float | None = None, overlap: bool = False) -> dict:
    """Train ``steps`` steps; after every round record (start, length, index, mixed, loss).

    With ``clock`` (and ``param_bytes``) the round is also timed as it ends, and
    ``observe(end, time)`` may feed the period's rule (AdaComm); otherwise ``observe(end)``.
    """
    trainer = CooperativeSGD(algo, optax.sgd(lr), task.loss, track_consensus=observe is not None)
    state = trainer.init(task.params0)
    rec = {"rounds": [], "step": [0], "loss": [task.averaged_loss(trainer, state)], "time": [0.0], "comms": [0]}

    def on_round(end):
        rec["rounds"].append((end.start, end.step - end.start, end.round, bool(end.mixed)))
        rec["step"].append(end.step)
        rec["loss"].append(task.averaged_loss(trainer, end.state))
        rec["comms"].append(rec["comms"][-1] + int(end.mixed))
        if clock is not None:
            traffic = coopsgd.mixing_traffic(algo.mixing.at(end.round), param_bytes, algo.v) if end.mixed else None
            stamps = clock.round(end.start, end.step - end.start, traffic, overlap=overlap, round_index=end.round)
            rec["time"].append(float(stamps[-1]))
        if observe is None:
            return end.state
        return observe(end, clock.time) if clock is not None else observe(end)

    state, _ = trainer.run(state, task.sampler(batch).batch, steps, hooks=[on_round])
    rec["rule"] = state.period.rule
    return rec


def retime(rec: dict, algo, model, param_bytes: float, *, overlap: bool = False) -> list[float]:
    """Simulated time after every recorded round under the runtime ``model``, the mixings charged
    by the engine's account of ``algo``'s W at each round."""
    clock = model.clock(algo.m)
    times = [0.0]
    for start, length, r, mixed in rec["rounds"]:
        traffic = coopsgd.mixing_traffic(algo.mixing.at(r), param_bytes, algo.v) if mixed else None
        times.append(float(clock.round(start, length, traffic, overlap=overlap, round_index=r)[-1]))
    return times


def time_to(times, losses, target: float) -> float | None:
    """The first recorded time at which the loss is at or below ``target``."""
    for t, loss in zip(times, losses):
        if loss <= target:
            return t
    return None


def steps_to(rec: dict, target: float) -> int | None:
    """The first recorded step at which the loss is at or below ``target``."""
    return time_to(rec["step"], rec["loss"], target)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(panels: list, path: str, *, xlabel: str, suptitle: str = ""):
    """One panel per ``(title, {name: (x, loss)}, target)``: training loss (log) against x."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), squeeze=False)
    for ax, (title, curves, target) in zip(axes[0], panels):
        for name, (x, y) in curves.items():
            ax.plot(x, y, label=name)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.4f}")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss of the averaged model")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speedups(curves: dict, path: str, *, paper_ratio: float, claim: float | tuple, title: str,
                  ylabel: str, xlabel: str = "communication / computation ratio D / E[Y] (one all-reduce over one step)"):
    """Speed-up against the communication/computation ratio; the paper's ratio and claim marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (ratios, speedups) in curves.items():
        ax.plot(ratios, [np.nan if s is None else s for s in speedups], marker="o", label=name)
    ax.axvline(paper_ratio, color="k", ls="--", lw=1, label=f"paper's setting (D/Y = {paper_ratio:.2g})")
    lo, hi = (claim, claim) if np.isscalar(claim) else claim
    ax.axhspan(lo * 0.98, hi * 1.02, color="tab:red", alpha=0.15, label=f"paper's claim ({lo:g}" +
               ("" if lo == hi else f"-{hi:g}") + "x)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
