"""Small CPU reproductions of the headline comparisons of the mixers beyond linear gossip.

Every run trains the bundled 8x8 digits (1 438 training examples) with a 64-32-10 MLP on m
simulated workers with coopsgd's engine, in chunks of ``trainer.run`` calls, and records after each
chunk the full training loss of the workers' averaged model, the mean of the individual workers'
full training losses, the consensus distance and the bytes each worker has sent so far (the sum of
``trainer.communication(param_bytes, r).bytes_per_worker`` over the mixings that moved data). Four
comparisons:

- choco:    CHOCO-SGD with top-k 1 % (a grid of consensus steps γ) vs D-PSGD on a ring of 8,
            loss vs bytes sent per worker (Koloskova, Stich & Jaggi, "Decentralized stochastic
            optimization and gossip algorithms with compressed communication", ICML 2019)
- push_sum: push-sum / SGP on the one-peer time-varying directed exponential graph vs D-PSGD on the
            undirected ring, 16 workers, loss vs steps and vs bytes (Assran, Loizou, Ballas &
            Rabbat, "Stochastic gradient push for distributed deep learning", ICML 2019)
- tracking: gradient tracking (DSGT) vs D-PSGD on a ring of 16 with Dirichlet(0.1) non-IID shards
            and a constant learning rate, the error floor of both (Pu & Nedić, "Distributed
            stochastic gradient tracking methods", Math. Programming 187, 2021)
- diloco:   DiLoCo (inner AdamW, outer Nesterov 0.7 / 0.9) vs local SGD (same inner AdamW, plain
            averaging) vs fully synchronous AdamW at the same number of synchronisations (the same
            bytes), 8 workers (Douillard et al., "DiLoCo: Distributed low-communication training of
            language models", arXiv:2311.08105, 2023)

Usage::

    python examples/beyond_linear_reproductions.py --out docs/img [--only choco,push_sum,tracking,diloco]

Prints one JSON object per comparison (the tables in docs/reproductions.md) and writes
``beyond_<name>.png`` into ``--out``. About 2–3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import operator
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopsgd
from coopsgd import CooperativeSGD, NonFiniteError
from coopsgd.app import data, models

BATCH = 16
LR = 0.05


class Task:
    """Digits shards (IID or Dirichlet non-IID), a small MLP, an optional L2 term in the training
    loss, and full-training-set losses of the averaged model and of every worker."""

    def __init__(self, m: int, seed: int = 0, *, alpha: float | None = None, l2: float = 0.0):
        self.ds = data.load_digits(seed=seed)
        self.m = m
        y = self.ds.y_train
        self.shards = data.split_iid(len(y), m, seed) if alpha is None else data.split_dirichlet(y, m, alpha, seed)
        self.model = models.make("mlp", self.ds.input_shape, self.ds.num_classes, hidden=(32,))
        self.params0 = self.model.init(jax.random.key(seed))
        ce = models.loss_fn(self.model)
        if l2:
            def loss(p, batch):
                return ce(p, batch) + 0.5 * l2 * sum(jnp.sum(a * a) for a in jax.tree.leaves(p))
        else:
            loss = ce
        self.loss = loss
        self.param_bytes = float(sum(np.size(x) * 4 for x in jax.tree.leaves(self.params0)))
        x, y = jnp.asarray(self.ds.x_train), jnp.asarray(self.ds.y_train)
        self.full_loss = jax.jit(lambda p: loss(p, {"x": x, "y": y}))
        self.worker_losses = jax.jit(jax.vmap(lambda p: loss(p, {"x": x, "y": y})))

    def sampler(self, batch: int = BATCH, seed: int = 0) -> data.WorkerSampler:
        return data.WorkerSampler(self.ds.x_train, self.ds.y_train, self.shards, batch, seed)


def train(task: Task, algo, optimizer, steps: int, every: int, *, batch: int = BATCH,
          diverge_at: float | None = None) -> dict:
    """``steps`` steps in ``trainer.run`` chunks of ``every``; after each chunk the averaged
    model's loss, the mean of the workers' losses, the consensus distance and the bytes sent per
    worker so far. Stops early (``hist["diverged"]``) at a non-finite value or once the consensus
    distance exceeds ``diverge_at``."""
    trainer = CooperativeSGD(algo, optimizer, task.loss, track_consensus=True)
    state = trainer.init(task.params0)
    sampler = task.sampler(batch)
    tau = algo.period.constant_tau
    per_round: dict[int, float] = {}

    def round_bytes(r: int) -> float:
        if r not in per_round:
            per_round[r] = float(trainer.communication(task.param_bytes, r).bytes_per_worker)
        return per_round[r]

    def record(hist, state, k, sent, syncs, cons):
        hist["step"].append(k)
        hist["loss"].append(float(task.full_loss(trainer.average(state))))
        hist["worker_loss"].append(float(jnp.mean(task.worker_losses(trainer.workers(state)))))
        hist["bytes"].append(sent)
        hist["syncs"].append(syncs)
        hist["consensus"].append(cons)

    hist = {"step": [], "loss": [], "worker_loss": [], "bytes": [], "syncs": [], "consensus": [],
            "diverged": False, "bytes_per_mixing": round_bytes(0)}
    record(hist, state, 0, 0.0, 0, 0.0)
    sent, syncs, k = 0.0, 0, 0
    t0 = time.perf_counter()
    while k < steps:
        n = min(every, steps - k)
        try:
            state, metrics = trainer.run(state, sampler.batches(k, n), n)
        except NonFiniteError:
            hist["diverged"] = True
            break
        moved = np.flatnonzero(np.asarray(metrics.communicated))
        sent += sum(round_bytes((k + int(i) + 1) // tau - 1) for i in moved)
        syncs += len(moved)
        k += n
        cons = float(np.asarray(metrics.consensus)[-1])
        record(hist, state, k, sent, syncs, cons)
        if not math.isfinite(cons) or (diverge_at is not None and cons > diverge_at):
            hist["diverged"] = True
            break
    hist["seconds"] = round(time.perf_counter() - t0, 1)
    return hist


def first_reach(hist: dict, target: float, key: str = "bytes", loss: str = "loss"):
    """``hist[key]`` at the first record whose ``hist[loss]`` (the averaged model's by default) is
    at most ``target``."""
    for value, reached in zip(hist[key], hist[loss]):
        if reached <= target:
            return value
    return None


def window_mean(hist: dict, key: str, after: int, until: int) -> float:
    """The mean of ``hist[key]`` over the records at steps in (after, until]."""
    return float(np.mean([v for s, v in zip(hist["step"], hist[key]) if after < s <= until]))


def tail_mean(hist: dict, key: str, after: int) -> float:
    return window_mean(hist, key, after, hist["step"][-1])


def figure(ncols: int, width: float = 5.2, height: float = 4.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, list(axes[0])


def finish(plt, fig, axes, path: str, title: str, ncol: int = 3):
    """Grid on every panel, one legend (the first panel's curves) below them, the title above."""
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(labels) // ncol)
    height = fig.get_size_inches()[1]
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, (0.1 + 0.2 * rows) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def r4(x):
    return None if x is None else round(float(x), 4)


# ---------------------------------------------------------------------------------- experiments

def exp_choco(out: str) -> dict:
    """CHOCO-SGD (top-k 1 %, γ grid) vs D-PSGD, ring of 8, lr 0.05, batch 16. Target: D-PSGD's
    loss after 1 000 steps; CHOCO gets 1 500 steps to reach it."""
    m, steps, every = 8, 1000, 25
    task = Task(m)
    ring = coopsgd.topology.by_name("ring", m)
    dpsgd = train(task, coopsgd.dpsgd(ring), optax.sgd(LR), steps, every)
    target, workers_target = dpsgd["loss"][-1], dpsgd["worker_loss"][-1]
    runs = {"D-PSGD": dpsgd}
    grid = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    for gamma in grid:
        algo = coopsgd.choco_sgd(ring, gamma, coopsgd.compression.top_k(0.01))
        runs[f"CHOCO top-1% gamma={gamma:g}"] = train(task, algo, optax.sgd(LR), int(1.5 * steps), every,
                                                      diverge_at=1e3)
    table = {}
    for name, h in runs.items():
        table[name] = {"steps": h["step"][-1], "final_loss": r4(h["loss"][-1]),
                       "final_worker_loss": r4(h["worker_loss"][-1]), "final_consensus": r4(h["consensus"][-1]),
                       "diverged": h["diverged"], "bytes_per_step": h["bytes_per_mixing"],
                       "bytes_to_target": first_reach(h, target), "steps_to_target": first_reach(h, target, "step"),
                       "workers_bytes_to_workers_target": first_reach(h, workers_target, loss="worker_loss")}
    reached = [n for n in table if n != "D-PSGD" and table[n]["bytes_to_target"] is not None]
    best = min(reached, key=lambda n: table[n]["bytes_to_target"]) if reached else None
    b_d = table["D-PSGD"]["bytes_to_target"]
    ratio = None if best is None else round(b_d / table[best]["bytes_to_target"], 1)
    w_d = table["D-PSGD"]["workers_bytes_to_workers_target"]
    w_c = None if best is None else table[best]["workers_bytes_to_workers_target"]
    workers_ratio = None if not (w_d and w_c) else round(w_d / w_c, 1)

    plt, fig, (ax1, ax2) = figure(2)
    for name, h in runs.items():
        if h["diverged"] and name != best:
            continue
        style = {"color": "k", "lw": 2} if name == "D-PSGD" else {"lw": 2.2 if name == best else 1.0}
        ax1.plot(h["bytes"][1:], h["loss"][1:], label=name, **style)
        ax2.plot(h["bytes"][1:], h["worker_loss"][1:], label=name, **style)
    for ax, line in ((ax1, target), (ax2, workers_target)):
        ax.axhline(line, color="grey", ls=":", lw=1, label=f"target: D-PSGD's loss after {steps} steps")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker")
    ax1.set_ylabel("training loss of the averaged model")
    ax2.set_ylabel("mean of the workers' own training losses")
    diverged = ", ".join(f"{g:g}" for g in grid if runs[f"CHOCO top-1% gamma={g:g}"]["diverged"])
    finish(plt, fig, [ax1, ax2], os.path.join(out, "beyond_choco.png"),
           f"CHOCO-SGD (top-k 1%) vs D-PSGD, ring of {m}" + (f"  (gamma {diverged}: diverged, not shown)" if diverged else ""))
    return {"experiment": "choco", "m": m, "lr": LR, "batch": BATCH, "gamma_grid": list(grid),
            "target_loss": r4(target), "best": best, "bytes_ratio_dpsgd_over_choco": ratio,
            "workers_target_loss": r4(workers_target), "workers_bytes_ratio_dpsgd_over_choco": workers_ratio,
            "param_bytes": task.param_bytes, "runs": table}


def exp_push_sum(out: str) -> dict:
    """Push-sum on the one-peer directed exponential graph vs D-PSGD on the ring, 16 workers."""
    m, steps, every = 16, 1000, 25
    task = Task(m)
    runs = {
        "D-PSGD, undirected ring": train(task, coopsgd.dpsgd(coopsgd.topology.by_name("ring", m)),
                                         optax.sgd(LR), steps, every),
        "push-sum, one-peer directed exponential": train(
            task, coopsgd.push_sum(coopsgd.topology.one_peer_exponential_digraphs(m)), optax.sgd(LR), steps, every),
    }
    table = {name: {"final_loss": r4(h["loss"][-1]), "final_worker_loss": r4(h["worker_loss"][-1]),
                    "consensus_last_250_steps": r4(tail_mean(h, "consensus", steps - 250)),
                    "bytes_per_step": h["bytes_per_mixing"], "bytes_total": h["bytes"][-1]}
             for name, h in runs.items()}
    plt, fig, (ax1, ax2, ax3) = figure(3, width=4.6)
    for name, h in runs.items():
        ax1.plot(h["step"], h["loss"], label=name)
        ax2.plot(h["bytes"][1:], h["loss"][1:], label=name)
        ax3.plot(h["step"][1:], h["consensus"][1:], label=name)
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_ylabel("training loss of the averaged model")
    ax1.set_xlabel("steps")
    ax2.set_xlabel("bytes sent per worker")
    ax3.set_yscale("log")
    ax3.set_xlabel("steps")
    ax3.set_ylabel(r"consensus distance $\frac{1}{m}\sum_i \|x_i - \bar{x}\|^2$")
    finish(plt, fig, [ax1, ax2, ax3], os.path.join(out, "beyond_push_sum.png"),
           f"Push-sum (directed, time-varying) vs D-PSGD (ring), {m} workers")
    return {"experiment": "push_sum", "m": m, "lr": LR, "batch": BATCH, "steps": steps, "runs": table}


def exp_tracking(out: str) -> dict:
    """Gradient tracking vs D-PSGD, ring of 16, Dirichlet(0.1) shards, constant lr 0.3; plain
    cross-entropy and cross-entropy + λ/2 ‖x‖² (λ = 3e-3). Floor: the mean over the last third."""
    m, steps, every, lr, alpha = 16, 3000, 50, 0.3, 0.1
    after = steps - steps // 3
    ring = coopsgd.topology.by_name("ring", m)
    settings = {"cross-entropy": 0.0, "cross-entropy + L2 (3e-3)": 3e-3}
    result = {"experiment": "tracking", "m": m, "lr": lr, "batch": BATCH, "alpha": alpha, "steps": steps,
              "floor_over_steps": [after, steps], "settings": {}}
    plt, fig, axes = figure(len(settings))
    for ax, (label, l2) in zip(axes, settings.items()):
        task = Task(m, alpha=alpha, l2=l2)
        result["shard_sizes"] = [len(s) for s in task.shards]
        runs = {"D-PSGD": train(task, coopsgd.dpsgd(ring), optax.sgd(lr), steps, every),
                "gradient tracking": train(task, coopsgd.gradient_tracking(ring), optax.sgd(lr), steps, every)}
        result["settings"][label] = {
            "l2": l2,
            "runs": {name: {"floor_worker_loss": r4(tail_mean(h, "worker_loss", after)),
                            "floor_averaged_loss": r4(tail_mean(h, "loss", after)),
                            "previous_third_averaged_loss": r4(window_mean(h, "loss", steps // 3, after)),
                            f"averaged_loss_at_step_{steps // 2}": r4(h["loss"][h["step"].index(steps // 2)]),
                            "final_worker_loss": r4(h["worker_loss"][-1]), "final_loss": r4(h["loss"][-1]),
                            "bytes_per_step": h["bytes_per_mixing"]} for name, h in runs.items()}}
        for (name, h), color in zip(runs.items(), ("C0", "C3")):
            ax.plot(h["step"], h["worker_loss"], color=color, ls="--", lw=1, label=f"{name}: mean of workers' losses")
            ax.plot(h["step"], h["loss"], color=color, label=f"{name}: averaged model")
        ax.axvspan(after, steps, color="grey", alpha=0.12, label="floor window")
        ax.set_yscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel("full training loss" + (" (incl. L2 term)" if l2 else ""))
        ax.set_title(label, fontsize=10)
    finish(plt, fig, axes, os.path.join(out, "beyond_tracking.png"),
           f"Gradient tracking vs D-PSGD, ring of {m}, Dirichlet(alpha = {alpha}) shards, lr {lr}", ncol=2)
    return result


def data_parallel(task: Task, optimizer, steps: int, sampler, every: int = 1) -> list[float]:
    """Exactly synchronous data parallelism: one model, the mean of the m workers' gradients per
    step (what a gradient all-reduce computes), one optimizer state. Loss every ``every`` steps."""
    def mean_loss(p, batch):
        return jnp.mean(jax.vmap(lambda b: task.loss(p, b))(batch))

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(mean_loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = task.params0, optimizer.init(task.params0)
    losses = [float(task.full_loss(params))]
    batches = sampler.batches(0, steps)
    for k in range(steps):
        params, opt_state = step(params, opt_state, jax.tree.map(operator.itemgetter(k), batches))
        if (k + 1) % every == 0:
            losses.append(float(task.full_loss(params)))
    return losses


def exp_diloco(out: str) -> dict:
    """DiLoCo vs local SGD vs fully synchronous AdamW at 40 synchronisations each, 8 workers,
    IID shards, inner AdamW (weight decay 0.1) at three learning rates."""
    m, syncs, h = 8, 40, 25
    task = Task(m)
    lrs = (1e-3, 3e-3, 1e-2)
    result = {"experiment": "diloco", "m": m, "batch": BATCH, "syncs": syncs, "H": h, "inner": "adamw, weight_decay 0.1",
              "outer": "Nesterov lr 0.7 momentum 0.9", "by_inner_lr": {}}
    plt, fig, axes = figure(len(lrs), width=4.6)
    for ax, lr in zip(axes, lrs):
        inner = functools.partial(optax.adamw, lr, weight_decay=0.1)
        runs = {
            f"DiLoCo (H = {h})": train(task, coopsgd.diloco(m, h), inner(), syncs * h, h),
            f"local SGD (H = {h})": train(task, coopsgd.local_sgd(m, h), inner(), syncs * h, h),
            "fully sync (coopsgd.fully_sync, AdamW per worker)": train(task, coopsgd.fully_sync(m), inner(), syncs, 1),
        }
        dp = data_parallel(task, inner(), syncs, task.sampler())
        dp_long = data_parallel(task, inner(), syncs * h, task.sampler(), every=syncs * h)
        table = {name: {"final_loss": r4(hh["loss"][-1]), "lowest_loss": r4(min(hh["loss"])), "syncs": hh["syncs"][-1],
                        "bytes_per_worker": hh["bytes"][-1]} for name, hh in runs.items()}
        allreduce = runs["fully sync (coopsgd.fully_sync, AdamW per worker)"]["bytes_per_mixing"]
        table["data-parallel AdamW (mean gradient)"] = {"final_loss": r4(dp[-1]), "lowest_loss": r4(min(dp)), "syncs": syncs,
                                                        "bytes_per_worker": syncs * allreduce}
        table[f"data-parallel AdamW, {syncs * h} steps (same compute)"] = {
            "final_loss": r4(dp_long[-1]), "syncs": syncs * h, "bytes_per_worker": syncs * h * allreduce}
        result["by_inner_lr"][f"{lr:g}"] = table
        for name, hh in runs.items():
            ax.plot(hh["syncs"], hh["loss"], label=name)
        ax.plot(range(syncs + 1), dp, label="data-parallel AdamW (mean gradient)")
        ax.set_yscale("log")
        ax.set_xlabel(f"synchronisations (x {allreduce:.0f} bytes per worker)")
        ax.set_ylabel("training loss of the averaged model")
        ax.set_title(f"inner AdamW lr {lr:g}", fontsize=10)
    finish(plt, fig, axes, os.path.join(out, "beyond_diloco.png"),
           f"DiLoCo vs local SGD vs synchronous AdamW at {syncs} synchronisations, {m} workers", ncol=2)
    return result


EXPERIMENTS = {"choco": exp_choco, "push_sum": exp_push_sum, "tracking": exp_tracking, "diloco": exp_diloco}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--only", default=",".join(EXPERIMENTS))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only.split(","):
        if name not in EXPERIMENTS:
            parser.error(f"unknown comparison {name!r}; valid: {', '.join(EXPERIMENTS)}")
    for name in args.only.split(","):
        t0 = time.perf_counter()
        result = EXPERIMENTS[name](args.out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result, default=lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)), flush=True)


if __name__ == "__main__":
    main()
