"""Small CPU reproductions of the adaptive algorithms' headline comparisons (docs/adaptive.md).

Every run trains the bundled 8x8 digits MLP on m simulated workers with coopsgd's engine, times
each round with coopsgd.sim.runtime, and records the full training loss of the workers' averaged
model after every round. Five comparisons:

- adacomm:  AdaComm vs fully synchronous SGD vs fixed-tau local SGD, loss vs simulated time
- adpsgd:   ADPSGD vs a constant period with the same number of averagings
- overlap:  Overlap Local-SGD (and Overlap-M) vs local SGD vs EASGD, loss vs simulated time
- matcha:   MATCHA at budget 0.5 vs D-PSGD, loss vs simulated time
- batch:    adaptive (norm test) vs fixed batch size local SGD, loss vs communication rounds

Usage::

    python examples/adaptive_reproductions.py --out docs/img [--only adacomm,matcha]

Prints one JSON object per comparison (the tables in docs/adaptive.md) and writes
``adaptive_<name>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

import coopsgd
from coopsgd import CooperativeSGD, Stop, mixing
from coopsgd.algorithms import adaptive, batching
from coopsgd.app import data, models
from coopsgd.sim import runtime

M = 8
BATCH = 16
LR = 0.05


class Task:
    """Digits, IID shards, a small MLP, and the full-training-set loss of an averaged model."""

    def __init__(self, m: int, seed: int = 0):
        self.ds = data.load_digits(seed=seed)
        self.m = m
        self.shards = data.split_iid(len(self.ds.y_train), m, seed)
        self.model = models.make("mlp", self.ds.input_shape, self.ds.num_classes, hidden=(32,))
        self.params0 = self.model.init(jax.random.key(seed))
        self.loss = models.loss_fn(self.model)
        self.param_bytes = float(sum(np.size(x) * 4 for x in jax.tree.leaves(self.params0)))
        x, y = jnp.asarray(self.ds.x_train), jnp.asarray(self.ds.y_train)
        self.full_loss = jax.jit(lambda p: self.loss(p, {"x": x, "y": y}))

    def sampler(self, batch: int, seed: int = 0) -> data.WorkerSampler:
        return data.WorkerSampler(self.ds.x_train, self.ds.y_train, self.shards, batch, seed)

    def averaged_loss(self, trainer, state) -> float:
        workers = trainer.workers(state)
        return float(self.full_loss(jax.tree.map(lambda w: jnp.mean(w, axis=0), workers)))


def train(task: Task, algo, *, runtime_model, steps=None, until=None, overlap=False, lr=LR,
          sampler=None, observe=None):
    """Round by round (a hook after every round): time the round, record the averaged model's loss.

    ``observe(end, stamps)`` is called after each round with the hook's ``RoundEnd`` and the
    round's time stamps; it returns the state whose period has seen the round
    (``trainer.observe``, the rule's ``observe`` on ``EngineState.period``). Stops after ``steps``
    steps or once simulated time reaches ``until``. ``hist["rule"]`` is the period's final state.
    """
    trainer = CooperativeSGD(algo, optax.sgd(lr), task.loss, track_consensus=True)
    state = trainer.init(task.params0)
    clock = runtime_model.clock(algo.m)
    sampler = sampler or task.sampler(BATCH)
    hist = {"step": [0], "time": [0.0], "loss": [task.averaged_loss(trainer, state)], "comms": [0]}
    comms = 0

    def on_round(end):
        nonlocal comms
        traffic = None
        if end.mixed:
            traffic = coopsgd.mixing_traffic(algo.mixing.at(end.round), task.param_bytes, algo.v)
        stamps = clock.round(end.start, end.step - end.start, traffic, overlap=overlap, round_index=end.round)
        comms += int(traffic is not None and traffic.kind != "none")
        hist["step"].append(end.step)
        hist["time"].append(float(stamps[-1]))
        hist["loss"].append(task.averaged_loss(trainer, end.state))
        hist["comms"].append(comms)
        state = end.state if observe is None else observe(end, stamps)
        return Stop(state) if until is not None and clock.time >= until else state

    state, _ = trainer.run(state, sampler.batch, steps if steps is not None else 2**31 - 1, hooks=[on_round])
    hist["rule"] = state.period.rule
    return hist


def time_to(hist, target: float) -> float | None:
    for t, loss in zip(hist["time"], hist["loss"]):
        if loss <= target:
            return t
    return None


def plot(curves: dict, x: str, path: str, title: str, xlabel: str, logy: bool = True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in curves.items():
        ax.plot(hist[x], hist["loss"], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss of the averaged model")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- experiments

def exp_adacomm(task: Task, out: str) -> dict:
    """AdaComm vs sync SGD vs local SGD at communication/computation ratio D/E[Y] = 2."""
    rt = runtime.RuntimeModel(runtime.shifted_exponential(1.0, 0.25), runtime.constant_delay(2.5), seed=0)
    horizon = 1500.0
    curves = {}
    curves["sync SGD (tau=1)"] = train(task, coopsgd.fully_sync(M), runtime_model=rt, until=horizon)
    curves["local SGD tau=4"] = train(task, coopsgd.local_sgd(M, 4), runtime_model=rt, until=horizon)
    curves["local SGD tau=16"] = train(task, coopsgd.local_sgd(M, 16), runtime_model=rt, until=horizon)
    rule = adaptive.adacomm(16, interval=horizon / 10)
    algo = coopsgd.Algorithm(mixing.averaging(M), tau=rule, name="adacomm")

    def observe(end, stamps):
        loss = task.averaged_loss(end.trainer, end.state)
        return end.trainer.observe(end.state, loss=loss, time=float(stamps[-1]))

    curves["AdaComm tau0=16"] = train(task, algo, runtime_model=rt, until=horizon, observe=observe)
    final_sync = curves["sync SGD (tau=1)"]["loss"][-1]
    target = final_sync
    table = {name: {"final_loss": round(h["loss"][-1], 4), "time_to_sync_final_loss": time_to(h, target),
                    "steps": h["step"][-1], "averagings": h["comms"][-1]} for name, h in curves.items()}
    t_sync, t_ada = table["sync SGD (tau=1)"]["time_to_sync_final_loss"], table["AdaComm tau0=16"]["time_to_sync_final_loss"]
    result = {"experiment": "adacomm", "target_loss": round(target, 4), "runs": table,
              "adacomm_taus": [h.tau for h in curves["AdaComm tau0=16"]["rule"].history],
              "speedup_vs_sync": None if not t_ada else round(t_sync / t_ada, 2)}
    plot(curves, "time", os.path.join(out, "adaptive_adacomm.png"),
         "AdaComm vs sync / local SGD (D = 2.5, E[Y] = 1.25)", "simulated wall-clock time")
    return result


def exp_adpsgd(task: Task, out: str) -> dict:
    """ADPSGD vs a constant period with the same budget (60 averagings in 600 steps); both with a
    step-decay learning rate 0.1 -> 0.01 at step 300."""
    rt = runtime.RuntimeModel(runtime.constant(1.0), runtime.constant_delay(1.0))
    steps, budget = 600, 60
    lr = optax.piecewise_constant_schedule(0.1, {300: 0.1})
    curves = {f"constant tau={steps // budget}": train(task, coopsgd.local_sgd(M, steps // budget),
                                                         runtime_model=rt, steps=steps, lr=lr)}
    rule = adaptive.adpsgd(5, steps, budget, max_growth=1.25)
    algo = coopsgd.Algorithm(mixing.averaging(M), tau=rule, name="adpsgd")

    def observe(end, stamps):
        cons = np.asarray(end.metrics.consensus)
        if len(cons) < 2:
            return end.state
        # the value before the round's last step, i.e. before the averaging
        return end.trainer.observe(end.state, consensus=float(cons[-2]), steps=len(cons) - 1)

    curves["ADPSGD tau0=5"] = train(task, algo, runtime_model=rt, steps=steps, lr=lr, observe=observe)
    table = {name: {"final_loss": round(h["loss"][-1], 4), "averagings": h["comms"][-1],
                    "mean_loss_last_100_steps": round(float(np.mean([l for s, l in zip(h["step"], h["loss"]) if s > steps - 100])), 4)}
             for name, h in curves.items()}
    result = {"experiment": "adpsgd", "steps": steps, "budget": budget, "runs": table,
              "adpsgd_taus": [h.tau for h in curves["ADPSGD tau0=5"]["rule"].history]}
    plot(curves, "step", os.path.join(out, "adaptive_adpsgd.png"),
         f"ADPSGD vs constant period (budget {budget} averagings, {steps} steps)", "local steps")
    plot(curves, "comms", os.path.join(out, "adaptive_adpsgd_comms.png"),
         "ADPSGD vs constant period: loss vs averagings", "averagings so far")
    return result


def exp_overlap(task: Task, out: str) -> dict:
    """Overlap Local-SGD (and Overlap-M) vs local SGD vs EASGD, tau = 2, D = 1 per averaging."""
    rt = runtime.RuntimeModel(runtime.shifted_exponential(1.0, 0.25), runtime.constant_delay(1.0), seed=1)
    horizon = 800.0
    curves = {
        "local SGD tau=2": train(task, coopsgd.local_sgd(M, 2), runtime_model=rt, until=horizon),
        "EASGD tau=2": train(task, coopsgd.easgd(M, 2), runtime_model=rt, until=horizon),
        "Overlap Local-SGD tau=2, a=0.6": train(task, coopsgd.overlap_local_sgd(M, 2, 0.6), runtime_model=rt,
                                                until=horizon, overlap=True),
        "Overlap Local-SGD, lr / (1 - a)": train(task, coopsgd.overlap_local_sgd(M, 2, 0.6), runtime_model=rt,
                                                 until=horizon, overlap=True, lr=LR / 0.4),
        "Overlap-M tau=2, a=0.6, b=0.7": train(task, coopsgd.overlap_local_sgd_momentum(M, 2, 0.6, 0.7),
                                               runtime_model=rt, until=horizon, overlap=True),
    }
    target = curves["local SGD tau=2"]["loss"][-1]
    table = {name: {"final_loss": round(h["loss"][-1], 4), "steps": h["step"][-1],
                    "time_to_local_sgd_final_loss": time_to(h, target)} for name, h in curves.items()}
    plot(curves, "time", os.path.join(out, "adaptive_overlap.png"),
         "Overlap Local-SGD vs local SGD vs EASGD (D = 1, E[Y] = 1.25)", "simulated wall-clock time")
    return {"experiment": "overlap", "target_loss": round(target, 4), "runs": table}


def exp_matcha(task16: Task, out: str) -> dict:
    """MATCHA (budget 0.5) vs D-PSGD on a 16-node random graph; a mixing costs 0.25 per message."""
    graph = nx.erdos_renyi_graph(16, 0.4, seed=1)
    rt = runtime.RuntimeModel(runtime.constant(1.0), runtime.network(latency=0.25, bandwidth=1e12))
    horizon = 1500.0
    dpsgd = coopsgd.dpsgd(graph, "best_constant")
    algo = coopsgd.matcha(graph, 0.5, seed=0)
    curves = {
        "D-PSGD (best constant W)": train(task16, dpsgd, runtime_model=rt, until=horizon),
        "MATCHA budget 0.5": train(task16, algo, runtime_model=rt, until=horizon),
    }
    target = curves["D-PSGD (best constant W)"]["loss"][-1]
    table = {name: {"final_loss": round(h["loss"][-1], 4), "steps": h["step"][-1],
                    "time_to_dpsgd_final_loss": time_to(h, target)} for name, h in curves.items()}
    t_d = table["D-PSGD (best constant W)"]["time_to_dpsgd_final_loss"]
    t_m = table["MATCHA budget 0.5"]["time_to_dpsgd_final_loss"]
    plot(curves, "time", os.path.join(out, "adaptive_matcha.png"),
         "MATCHA (C_b = 0.5) vs D-PSGD, 16 workers", "simulated wall-clock time")
    return {"experiment": "matcha", "target_loss": round(target, 4), "runs": table,
            "zeta": {"dpsgd": round(dpsgd.zeta, 4), "matcha": round(algo.zeta, 4)},
            "matchings": algo.mixing.num_matchings, "max_degree": max(d for _, d in graph.degree),
            "speedup": None if not t_m else round(t_d / t_m, 2)}


def exp_batch(task: Task, out: str, *, eta: float = 0.8, lr: float = 0.2) -> dict:
    """Local SGD (tau = 8): fixed batch 16 vs adaptive batch (norm test, pooled at syncs)."""
    rounds, tau, cap = 60, 8, 256
    rt = runtime.RuntimeModel(runtime.constant(1.0), runtime.constant_delay(1.0))
    fixed = train(task, coopsgd.local_sgd(M, tau), runtime_model=rt, steps=rounds * tau, lr=lr)

    # Adaptive: one engine per batch size bucket; the controller decides at each synchronisation.
    ctl = batching.BatchSizeController(BATCH, cap)
    per_example = jax.jit(batching.worker_stats(task.loss))  # per-worker BatchStats
    trainer = CooperativeSGD(coopsgd.local_sgd(M, tau), optax.sgd(lr), task.loss)
    state = trainer.init(task.params0)
    hist = {"step": [0], "loss": [task.averaged_loss(trainer, state)], "comms": [0], "batch": [BATCH], "examples": [0]}
    examples = 0
    for r in range(rounds):
        sampler = task.sampler(ctl.batch_size, seed=0)
        batches = sampler.batches(r * tau, tau)
        state, _ = trainer.run(state, batches, tau)
        examples += tau * ctl.batch_size * M
        last = jax.tree.map(lambda x: x[-1], batches)  # each worker's last local mini-batch
        stats = batching.pool(per_example(trainer.workers(state), last))
        ctl.update(batching.norm_test(stats, eta))
        hist["step"].append((r + 1) * tau)
        hist["loss"].append(task.averaged_loss(trainer, state))
        hist["comms"].append(r + 1)
        hist["batch"].append(ctl.batch_size)
        hist["examples"].append(examples)
    curves = {f"fixed batch {BATCH}": fixed, f"adaptive batch (norm test eta={eta}, cap {cap})": hist}
    plot(curves, "comms", os.path.join(out, "adaptive_batch.png"),
         "Local SGD (tau = 8): adaptive vs fixed batch size", "communication rounds")
    return {"experiment": "batch", "rounds": rounds, "tau": tau,
            "fixed": {"final_loss": round(fixed["loss"][-1], 4), "examples": rounds * tau * BATCH * M},
            "adaptive": {"final_loss": round(hist["loss"][-1], 4), "examples": examples,
                         "batch_sizes": ctl.sizes, "batch_by_round": hist["batch"][1::6]}}


EXPERIMENTS = {"adacomm": exp_adacomm, "adpsgd": exp_adpsgd, "overlap": exp_overlap,
               "matcha": exp_matcha, "batch": exp_batch}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--only", default=",".join(EXPERIMENTS))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    task = Task(M)
    task16 = None
    for name in args.only.split(","):
        t0 = time.perf_counter()
        if name == "matcha":
            task16 = task16 or Task(16)
            result = EXPERIMENTS[name](task16, args.out)
        else:
            result = EXPERIMENTS[name](task, args.out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result, default=lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)), flush=True)


if __name__ == "__main__":
    main()
