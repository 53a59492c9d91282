"""Engine benchmarks: framework overhead, mixing cost against m, fused rounds. Prints JSON.

    python benchmarks/engine.py            # the figures in docs/benchmarks.md
    python benchmarks/engine.py --quick    # small sizes, a smoke run

Every comparison is measured side by side: the two contenders alternate call by call, so a
machine whose load changes during the run slows both alike; figures are medians over repeats.

1. ``overhead``: coopsgd local SGD (m = 8, a small MLP, τ = 4, ``run`` over 64 steps) against a
   hand-written JAX program doing the same math (a jitted ``lax.scan`` over rounds of τ vmapped
   SGD steps and a mean). Target: ratio ≤ 1.05.
2. ``mixing``: one ring D-PSGD mixing of m simulated workers with d = 1e5 parameters (two
   shifted copies, :mod:`coopsgd.communication`), against one memory pass of the local update
   ``x − ηg`` on the same arrays, and against the dense contraction ``Wᵀ X`` (up to m = 256).
   Targets: t(1024)/t(256) ≤ 5 (linear in m) and mixing ≤ 1.5 × the update pass.
3. ``fused``: per-step time of ``run`` (τ = 8, rounds fused with ``lax.scan``) against ``step``
   called from Python once per step.
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
from coopsgd import communication, mixing


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def side_by_side(fns: dict, repeats: int) -> dict:
    """Call each fn once per repeat, alternating; return the median seconds of each."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm up (compile)
        block(fn())
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t0)
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
    t = side_by_side({"coopsgd_run": lambda: trainer.run(state0, dev_batches, steps)[0].params,
                      "hand_written": lambda: hand_loop(cols0, dev_batches)[0]},
                     repeats=5 if quick else 30)
    return {"m": m, "tau": tau, "steps_per_call": steps, "mlp": sizes,
            "param_count": int(sum(p.size for p in jax.tree.leaves(params))),
            "max_abs_diff": max_diff,
            "coopsgd_s_per_step": t["coopsgd_run"] / steps,
            "hand_written_s_per_step": t["hand_written"] / steps,
            "ratio_coopsgd_over_hand": t["coopsgd_run"] / t["hand_written"]}


# ------------------------------------------------------------------------------------ mixing


def mixing_cost(quick: bool) -> dict:
    d = 10_000 if quick else 100_000
    ms = [16, 64] if quick else [16, 64, 256, 1024]
    out = {"d": d, "rows": []}
    for m in ms:
        w = mixing.metropolis(nx.cycle_graph(m))
        plan = communication.plan_for_matrix(w, m)
        coef = jax.tree.map(jnp.asarray, communication.coefficients(plan, w))
        key = jax.random.key(m)
        x = jax.random.normal(key, (m, d))
        g = jax.random.normal(jax.random.fold_in(key, 1), (m, d))
        empty = jnp.zeros((0, d))
        mix = jax.jit(lambda x: communication.mix_local(plan, x, empty, coef)[0])
        update = jax.jit(lambda x, g: x - 0.1 * g)
        np.testing.assert_allclose(np.asarray(mix(x))[:4],
                                   (w.T @ np.asarray(x, np.float64))[:4], rtol=1e-4, atol=1e-4)
        fns = {"ring_mixing": lambda: mix(x), "local_update": lambda: update(x, g)}
        if m <= 256:
            wj = jnp.asarray(w, jnp.float32)
            dense = jax.jit(lambda x: wj.T @ x)
            fns["dense_contraction"] = lambda: dense(x)
        reps = 5 if m >= 256 else 15
        t = side_by_side(fns, repeats=3 if quick else reps)
        row = {"m": m, "ring_mixing_s": t["ring_mixing"], "local_update_s": t["local_update"],
               "mixing_over_update": t["ring_mixing"] / t["local_update"]}
        if "dense_contraction" in t:
            row["dense_contraction_s"] = t["dense_contraction"]
            row["dense_over_ring"] = t["dense_contraction"] / t["ring_mixing"]
        out["rows"].append(row)
        del x, g
    by_m = {r["m"]: r for r in out["rows"]}
    if 1024 in by_m and 256 in by_m:
        out["t1024_over_t256"] = by_m[1024]["ring_mixing_s"] / by_m[256]["ring_mixing_s"]
    out["max_mixing_over_update"] = max(r["mixing_over_update"] for r in out["rows"])
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["overhead", "mixing", "fused"], default=None)
    args = parser.parse_args(argv)
    report = {"environment": {
        "jax": jax.__version__, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick}}
    for name, fn in (("overhead", overhead), ("mixing", mixing_cost), ("fused", fused)):
        if args.only in (None, name):
            report[name] = fn(args.quick)
    if hasattr(os, "getloadavg"):
        report["environment"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
