"""Engine benchmarks: framework overhead, mixing cost against m, fused rounds. Prints JSON.

    python benchmarks/engine.py            # the figures in docs/benchmarks.md
    python benchmarks/engine.py --quick    # small sizes, a smoke run

Every comparison is measured side by side: the two contenders alternate call by call, so a
machine whose load changes during the run slows both alike; figures are medians over repeats.

1. ``overhead``: coopsgd local SGD (m = 8, a small MLP, τ = 4, ``run`` over 64 steps) against a
   hand-written JAX program doing the same math (a jitted ``lax.scan`` over rounds of τ vmapped
   SGD steps and a mean). Target: ratio ≤ 1.05.
2. ``mixing``: one ring D-PSGD mixing of m simulated workers with d = 1e5 parameters (two
   shifted copies, :mod:`coopsgd.parallel.linear`), against one memory pass of the local update
   ``x − ηg`` on the same arrays, and against the dense contraction ``Wᵀ X`` (up to m = 256).
   Timed standalone (one call, fresh output) and inside a ``fori_loop`` (buffers reused).
   Targets: t(1024)/t(256) ≤ 5 (linear in m) and mixing ≤ 1.5 × the update pass.
3. ``fused``: per-step time of ``run`` (τ = 8, rounds fused with ``lax.scan``) against ``step``
   called from Python once per step.
4. ``planning``: the host's work for each round of a random schedule (MATCHA on a ring of 8 and
   on a random 4-regular graph of 64: drawing W, its coefficients for the compiled round, and its
   traffic), in ms per round; ``--only planning`` with ``PYTHONPATH`` set to another checkout
   measures that one, for a before-and-after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

import coopsgd
from coopsgd import WorkerAxis, mixing
from coopsgd.parallel.linear import mix_local
from coopsgd.parallel.plan import coefficients, plan_for_matrix


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def side_by_side(fns: dict, repeats: int, best: dict | None = None) -> dict:
    """Call each fn once per repeat, alternating; return the median seconds of each (and, in
    ``best`` if given, the minimum: the figure least disturbed by other jobs on the machine)."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm up (compile)
        block(fn())
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t0)
    if best is not None:
        best.update({k: min(v) for k, v in times.items()})
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------- overhead


def mlp_init(key, sizes):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    return params


def mlp_loss(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    out = (h @ params[-1]["w"] + params[-1]["b"])[..., 0]
    return jnp.mean((out - batch["y"]) ** 2)


def overhead(quick: bool) -> dict:
    m, tau, steps, lr = 8, 4, 64, 0.05
    sizes = [32, 64, 64, 1]
    rng = np.random.default_rng(0)
    batches = {"x": rng.normal(size=(steps, m, 32, sizes[0])).astype(np.float32),
               "y": rng.normal(size=(steps, m, 32)).astype(np.float32)}
    params = mlp_init(jax.random.key(0), sizes)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(lr), mlp_loss,
                                     track_consensus=False, steps_per_call=steps)
    state0 = trainer.init(params)
    dev_batches = jax.tree.map(jnp.asarray, batches)

    @jax.jit
    def hand_loop(cols, batches):
        """The same math by hand: τ vmapped SGD steps per round, then the mean."""
        grad = jax.vmap(jax.value_and_grad(mlp_loss))

        def local(x, b):
            loss, g = grad(x, b)
            return jax.tree.map(lambda p, q: p - lr * q, x, g), loss

        def round_(x, b):
            x, losses = jax.lax.scan(local, x, b)
            x = jax.tree.map(lambda p: jnp.broadcast_to(p.mean(0), p.shape), x)
            return x, losses

        rb = jax.tree.map(lambda a: a.reshape((steps // tau, tau) + a.shape[1:]), batches)
        x, losses = jax.lax.scan(round_, cols, rb)
        return x, losses.reshape(steps, m).mean(1)

    cols0 = state0.params
    # Same result first (the comparison is only fair if the math is the same).
    s, met = trainer.run(state0, dev_batches, steps)
    x, loss = hand_loop(cols0, dev_batches)
    max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s.params),
                                                                    jax.tree.leaves(x)))
    best = {}
    t = side_by_side({"coopsgd_run": lambda: trainer.run(state0, dev_batches, steps)[0].params,
                      "hand_written": lambda: hand_loop(cols0, dev_batches)[0]},
                     repeats=5 if quick else 40, best=best)
    return {"m": m, "tau": tau, "steps_per_call": steps, "mlp": sizes,
            "param_count": int(sum(p.size for p in jax.tree.leaves(params))),
            "max_abs_diff": max_diff,
            "coopsgd_s_per_step": t["coopsgd_run"] / steps,
            "hand_written_s_per_step": t["hand_written"] / steps,
            "ratio_coopsgd_over_hand": t["coopsgd_run"] / t["hand_written"],
            "min_ratio_coopsgd_over_hand": best["coopsgd_run"] / best["hand_written"]}


# ------------------------------------------------------------------------------------ mixing


def mixing_cost(quick: bool) -> dict:
    """Ring mixing vs one local-update pass, measured two ways.

    ``standalone``: one jitted call each, every call writing a fresh m × d output (what a single
    ``step`` pays). ``in_loop``: 8 iterations inside one ``fori_loop`` (buffers allocated once, as
    inside ``run``); there the update ``x − ηg`` runs in place, while a mixing, which reads its
    neighbours' rows, cannot, and XLA adds a copy back into the loop carry.
    """
    d = 10_000 if quick else 100_000
    ms = [16, 64] if quick else [16, 64, 256, 1024]
    iters = 8
    out = {"d": d, "iters_in_loop": iters, "rows": []}
    for m in ms:
        w = mixing.metropolis(nx.cycle_graph(m))
        plan = plan_for_matrix(w, m)
        coef = jax.tree.map(jnp.asarray, coefficients(plan, w))
        axis = WorkerAxis(m)
        key = jax.random.key(m)
        x = jax.random.normal(key, (m, d))
        g = jax.random.normal(jax.random.fold_in(key, 1), (m, d))
        empty = jnp.zeros((0, d))

        def mix_once(x):
            return mix_local(plan, x, empty, coef, axis)[0]

        np.testing.assert_allclose(np.asarray(jax.jit(mix_once)(x))[:4],
                                   (w.T @ np.asarray(x, np.float64))[:4], rtol=1e-4, atol=1e-4)
        mix = jax.jit(mix_once)
        update = jax.jit(lambda x, g: x - 0.1 * g)
        mix_loop = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda _, x: mix_once(x), x))
        update_loop = jax.jit(lambda x, g: jax.lax.fori_loop(0, iters, lambda _, x: x - 0.1 * g, x))
        fns = {"mix": lambda: mix(x), "update": lambda: update(x, g),
               "mix_loop": lambda: mix_loop(x), "update_loop": lambda: update_loop(x, g)}
        if m <= 256:
            wj = jnp.asarray(w, jnp.float32)
            dense = jax.jit(lambda x: wj.T @ x)
            fns["dense"] = lambda: dense(x)
        reps = 5 if m >= 256 else 15
        t = side_by_side(fns, repeats=3 if quick else reps)
        row = {"m": m,
               "standalone": {"ring_mixing_s": t["mix"], "local_update_s": t["update"],
                              "mixing_over_update": t["mix"] / t["update"]},
               "in_loop": {"ring_mixing_s": t["mix_loop"] / iters,
                           "local_update_s": t["update_loop"] / iters,
                           "mixing_over_update": t["mix_loop"] / t["update_loop"]}}
        if "dense" in t:
            row["standalone"]["dense_contraction_s"] = t["dense"]
            row["standalone"]["dense_over_ring"] = t["dense"] / t["mix"]
        out["rows"].append(row)
        del x, g
    by_m = {r["m"]: r for r in out["rows"]}
    for how in ("standalone", "in_loop"):
        summary = {"max_mixing_over_update": max(r[how]["mixing_over_update"] for r in out["rows"])}
        if 1024 in by_m and 256 in by_m:
            summary["t1024_over_t256_mixing"] = (by_m[1024][how]["ring_mixing_s"]
                                                 / by_m[256][how]["ring_mixing_s"])
            summary["t1024_over_t256_update"] = (by_m[1024][how]["local_update_s"]
                                                 / by_m[256][how]["local_update_s"])
        out[how] = summary
    return out


# ------------------------------------------------------------------------------------- fused


def fused(quick: bool) -> dict:
    m, tau, steps = 8, 8, 64
    sizes = [32, 64, 1]
    rng = np.random.default_rng(1)
    batches = {"x": rng.normal(size=(steps, m, 16, sizes[0])).astype(np.float32),
               "y": rng.normal(size=(steps, m, 16)).astype(np.float32)}
    dev_batches = jax.tree.map(jnp.asarray, batches)
    per_step = [jax.tree.map(lambda a: a[k], dev_batches) for k in range(steps)]
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(0.05), mlp_loss,
                                     track_consensus=False, steps_per_call=tau)
    state0 = trainer.init(mlp_init(jax.random.key(1), sizes))

    def stepwise():
        s = state0
        for b in per_step:
            s, _ = trainer.step(s, b)
        return s.params

    a = jax.tree.leaves(trainer.run(state0, dev_batches, steps)[0].params)
    b = jax.tree.leaves(stepwise())
    max_diff = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(a, b))
    t = side_by_side({"run": lambda: trainer.run(state0, dev_batches, steps)[0].params,
                      "step": stepwise}, repeats=3 if quick else 10)
    return {"m": m, "tau": tau, "steps": steps, "max_abs_diff": max_diff,
            "run_s_per_step": t["run"] / steps, "step_s_per_step": t["step"] / steps,
            "step_over_run": t["step"] / t["run"]}


def planning(quick: bool) -> dict:
    from coopsgd.parallel.linear import LinearRounds

    rounds_per_graph = 100 if quick else 400
    out = {}
    for name, graph in (("ring_8", nx.cycle_graph(8)), ("regular4_64", nx.random_regular_graph(4, 64, seed=1))):
        times = []
        for repeat in range(3 if quick else 7):
            rounds = LinearRounds(coopsgd.matcha(graph, budget=0.5, seed=repeat), prune=False)
            t0 = time.perf_counter()
            for r in range(rounds_per_graph):
                rounds.round(r)
                rounds.traffic(r, 4.0e4)
            times.append((time.perf_counter() - t0) / rounds_per_graph)
        out[name] = {"ms_per_round": 1e3 * statistics.median(times), "rounds": rounds_per_graph}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["overhead", "mixing", "fused", "planning"], default=None)
    args = parser.parse_args(argv)
    report = {"environment": {
        "jax": jax.__version__, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick}}
    for name, fn in (("overhead", overhead), ("mixing", mixing_cost), ("fused", fused), ("planning", planning)):
        if args.only in (None, name):
            report[name] = fn(args.quick)
    if hasattr(os, "getloadavg"):
        report["environment"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
