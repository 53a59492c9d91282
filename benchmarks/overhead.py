"""Framework overhead: coopsgd against the best hand-written JAX loop for the same math. Prints JSON.

    python benchmarks/overhead.py                 # the figures in docs/benchmarks.md (≈ 10 min)
    python benchmarks/overhead.py --quick         # a smoke run
    python benchmarks/overhead.py --sizes 6k --layouts simulate --repeats 30

For each layout — ``simulate`` (m = 8 workers as a vmap axis on one device) and ``shard_map``
(one worker on each of 8 forced host devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
in a fresh process) — each model size (an MLP of 6,337 or 1,059,049 parameters, 32 samples per
worker per step) and each algorithm, the contenders run side by side: one call each in turn (the
order rotating), ``--repeats`` times, after a warm-up call; every figure is per step. Ratios are
the median over repeats of the per-repeat ratio (both calls made within a second of each other,
so a change of load hits both), beside the ratio of medians.

Contenders (plain SGD, the same batches, the same initial model; final models compared):

- ``coopsgd_lean``: ``CooperativeSGD(..., track_consensus=False)``, ``run`` over the steps;
- ``coopsgd_default``: ``CooperativeSGD(algorithm, optax.sgd(lr), loss)`` with every default;
- ``coopsgd_consensus``: ``track_consensus=True`` (the consensus distance after every step);
- ``hand_written``: one jitted ``lax.scan`` over rounds of τ vmapped SGD steps (simulate) or the
  same under ``jax.shard_map`` (devices), in the fastest formulation found on XLA:CPU: the average
  as the rows added one by one (``x[0] + … + x[7]``; ``jnp.mean(x, 0)`` is 30–80× slower at 1 M
  parameters); the ring as ``(x + roll(x, 1) + roll(x, −1)) / 3`` (simulate); on devices one
  ``lax.psum`` (two ``lax.ppermute``) for all the small leaves packed together and one for each
  leaf of ≥ 65,536 entries;
- ``floor`` (local SGD): the bare per-worker forward and backward pass, vmapped over the 8
  workers, with no optimizer and no mixing (the gradients are carried, so nothing is skipped);
  coopsgd's local SGD at τ = 8 is reported as a ratio to it.

Also per layout: the first call of a trainer (compilation included) and of a second trainer built
the same way (``optax.sgd(lr)`` and the algorithm built anew), with the number of XLA compilations
each triggers, and the programs a 400-step run compiles.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SIZES = {"6k": [32, 64, 64, 1], "1m": [32, 1000, 1024, 1]}
LAYOUTS = ("simulate", "shard_map")
M, LR, SAMPLES = 8, 0.01, 32
STEPS_6K = int(os.environ.get("OVERHEAD_STEPS_6K", 256))
AX = "workers"  # the engine's worker axis name (coopsgd.parallel.collectives.AXIS)


def child(layout: str, sizes: list[str], repeats: int, quick: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import networkx as nx
    import numpy as np
    import optax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import coopsgd

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(secs) if name == "/jax/core/compile/backend_compile_duration" else None)
    backend = "shard_map" if layout == "shard_map" else "simulate"
    mesh = coopsgd.parallel.backends.ShardMap(M).mesh if layout == "shard_map" else None  # the engine's mesh

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import mlp_init  # the same MLP as the engine benchmarks
    from engine import mlp_loss as loss

    grad = jax.vmap(jax.value_and_grad(loss))

    def sgd_step(x, b):
        value, g = grad(x, b)
        return jax.tree.map(lambda p, q: p - LR * q, x, g), value

    def rows_sum(p):  # x[0] + … + x[n-1]: the fastest sum over a short worker axis on XLA:CPU
        return functools.reduce(lambda a, c: a + c, [p[i] for i in range(p.shape[0])])

    def grouped(f):
        """f on the small leaves packed into one buffer and on every large leaf alone: on 8 CPU
        devices one collective per leaf was 2–3× slower at 6 k parameters, packing everything
        1.3× slower at 1 M (the concatenation copies the big matrix)."""
        def apply(x):
            leaves, tree = jax.tree.flatten(x)
            small = [i for i, p in enumerate(leaves) if p[0].size < 1 << 16]
            out = [f(p) if i not in small else None for i, p in enumerate(leaves)]
            if small:
                flat = f(jnp.concatenate([leaves[i].reshape(leaves[i].shape[0], -1) for i in small], 1))
                cuts = np.cumsum([leaves[i][0].size for i in small])[:-1].tolist()
                for i, part in zip(small, jnp.split(flat, cuts, 1)):
                    out[i] = part.reshape(leaves[i].shape)
            return jax.tree.unflatten(tree, out)
        return apply

    def average(x):
        if mesh is not None:
            return grouped(lambda p: lax.psum(p, AX) / M)(x)
        return jax.tree.map(lambda p: jnp.broadcast_to(rows_sum(p) / M, p.shape), x)

    def ring(x):
        if mesh is not None:
            up = [(i, (i + 1) % M) for i in range(M)]
            down = [(i, (i - 1) % M) for i in range(M)]
            return grouped(lambda p: (p + lax.ppermute(p, AX, up) + lax.ppermute(p, AX, down)) / 3)(x)
        return jax.tree.map(lambda p: (p + jnp.roll(p, 1, 0) + jnp.roll(p, -1, 0)) / 3, x)

    def hand_program(tau, mix):
        def run(x, bs):
            def one_round(x, b):
                x, losses = lax.scan(sgd_step, x, b)
                return mix(x), losses

            steps = jax.tree.leaves(bs)[0].shape[0]
            rb = jax.tree.map(lambda a: a.reshape((steps // tau, tau) + a.shape[1:]), bs)
            x, losses = lax.scan(one_round, x, rb)
            return x, losses.reshape((steps,) + losses.shape[2:])

        return launch(run)

    def floor_program():
        def run(x, bs):
            def step(g, b):
                value, g = grad(x, b)
                return g, value

            return lax.scan(step, x, bs)

        return launch(run)

    def launch(run):
        if mesh is None:
            return jax.jit(run)
        return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(AX), P(None, AX)),
                                     out_specs=(P(AX), P(None, AX)), check_vma=False))

    report = {"layout": layout, "devices": jax.device_count(), "groups": []}
    for size in sizes:
        shape = SIZES[size]
        steps = (16 if quick else 32) if size == "1m" else STEPS_6K
        rng = np.random.default_rng(0)
        batches = {"x": rng.normal(size=(steps, M, SAMPLES, shape[0])).astype(np.float32),
                   "y": rng.normal(size=(steps, M, SAMPLES)).astype(np.float32)}
        params = mlp_init(jax.random.key(0), shape)
        count = int(sum(p.size for p in jax.tree.leaves(params)))
        algorithms = {"local_sgd": (lambda tau=4: coopsgd.local_sgd(M, tau), 4, average),
                      "ring_dpsgd": (lambda: coopsgd.dpsgd(nx.cycle_graph(M)), 1, ring)}
        for name, (build, tau, mix) in algorithms.items():
            def trainer(algorithm=None, **kw):
                return coopsgd.CooperativeSGD(algorithm or build(), optax.sgd(LR), loss, backend=backend,
                                              steps_per_call=steps, **kw)

            lean = trainer(track_consensus=False)
            state0 = lean.init(params)
            cols0 = state0.params
            placed = jax.device_put(batches, lean.backend.batch_sharding) if mesh is not None else \
                jax.tree.map(jnp.asarray, batches)
            contenders = {"coopsgd_lean": lean, "coopsgd_default": trainer(),
                          "coopsgd_consensus": trainer(track_consensus=True)}
            fns = {k: (lambda t=t: t.run(state0, placed, steps)[0].params) for k, t in contenders.items()}
            hand = hand_program(tau, mix)
            fns["hand_written"] = lambda: hand(cols0, placed)[0]
            if name == "local_sgd":
                lean8 = trainer(coopsgd.local_sgd(M, 8), track_consensus=False)
                hand8, floor = hand_program(8, mix), floor_program()
                fns["coopsgd_lean_tau8"] = lambda: lean8.run(state0, placed, steps)[0].params
                fns["hand_written_tau8"] = lambda: hand8(cols0, placed)[0]
                fns["floor"] = lambda: floor(cols0, placed)[0]
            mine = jax.tree.leaves(fns["coopsgd_lean"]())
            ref = jax.tree.leaves(fns["hand_written"]())
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(mine, ref))
            load0 = os.getloadavg()
            times = side_by_side(fns, repeats)
            group = {"algorithm": name, "tau": tau, "size": size, "param_count": count, "steps_per_call": steps,
                     "max_abs_diff_lean_vs_hand": diff, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                     "ms_per_step": {k: 1e3 * statistics.median(v) / steps for k, v in times.items()},
                     "ratio_to_hand": {k: paired(times[k], times["hand_written"])
                                       for k in times if k.startswith("coopsgd") and "tau8" not in k},
                     "ratio_of_medians_to_hand": {k: statistics.median(times[k]) / statistics.median(times["hand_written"])
                                                  for k in times if k.startswith("coopsgd") and "tau8" not in k},
                     "default_over_lean": paired(times["coopsgd_default"], times["coopsgd_lean"]),
                     "consensus_over_lean": paired(times["coopsgd_consensus"], times["coopsgd_lean"])}
            if name == "local_sgd":
                group["tau8"] = {"coopsgd_over_floor": paired(times["coopsgd_lean_tau8"], times["floor"]),
                                 "hand_over_floor": paired(times["hand_written_tau8"], times["floor"]),
                                 "coopsgd_over_hand": paired(times["coopsgd_lean_tau8"], times["hand_written_tau8"])}
            report["groups"].append(group)
    report["compile"] = compile_figures(jax, jnp, coopsgd, optax, np, loss, mlp_init, backend, compiles)
    return report


def compile_figures(jax, jnp, coopsgd, optax, np, loss, mlp_init, backend, compiles) -> dict:
    """First calls (compilation included) of two trainers built the same way, and a 400-step run."""
    params = mlp_init(jax.random.key(1), SIZES["6k"])
    rng = np.random.default_rng(1)
    batches = {"x": rng.normal(size=(400, M, SAMPLES, 32)).astype(np.float32),
               "y": rng.normal(size=(400, M, SAMPLES)).astype(np.float32)}
    out = {}
    for which in ("first_trainer", "second_trainer"):
        # a learning rate no group above used: the first trainer compiles, the second should not
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(M, 4), optax.sgd(LR / 2), loss, backend=backend)
        state = t.init(params)
        n0, t0 = len(compiles), time.perf_counter()
        state, _ = t.run(state, batches, 400)
        jax.block_until_ready(state.params)
        out[which] = {"run_400_steps_s": time.perf_counter() - t0, "xla_compilations": len(compiles) - n0,
                      "programs": len(t._programs)}
    return out


def paired(a: list, b: list) -> float:
    """Median of the per-repeat ratios a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def side_by_side(fns: dict, repeats: int) -> dict:
    import jax

    names = list(fns)
    for fn in fns.values():  # warm-up (compilation)
        jax.block_until_ready(fn())
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="6k,1m", help="model sizes (6k, 1m; comma-separated)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="simulate, shard_map (comma-separated)")
    p.add_argument("--repeats", type=int, default=0, help="calls per contender (default 30 at 6k and 10 at 1 M)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    if args.child:
        repeats = args.repeats or (3 if args.quick else (10 if "1m" in sizes else 30))
        print(json.dumps(child(args.child, sizes, repeats, args.quick)))
        return 0
    runs = []
    for layout in args.layouts.split(","):
        for size in sizes:  # one process per (layout, size): each measured in a fresh runtime
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            if layout == "shard_map":
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
            command = [sys.executable, __file__, "--child", layout, "--sizes", size, "--repeats", str(args.repeats)]
            if args.quick:
                command.append("--quick")
            load0 = os.getloadavg()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run.update(size=size, loadavg_start=load0, loadavg_end=os.getloadavg())
            runs.append(run)
    import jax

    print(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
                                  "date": time.strftime("%Y-%m-%d")}, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
