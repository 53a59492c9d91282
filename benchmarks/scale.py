"""Scale: ring D-PSGD and local SGD from 256 to 65,536 simulated workers, d = 1,000 parameters each.

For every (algorithm, m) a fresh process builds the algorithm, the trainer and the initial state,
compiles, and times ``--repeats`` calls of ``--steps`` steps (by default about 2^20 worker-steps
per call, so that small m are not timer noise); it reports the build time, the
state's bytes, the peak resident memory (``ru_maxrss``, the whole process: interpreter, JAX
runtime and compiler included) beside the resident memory after the imports, the median time per
worker per step, and for the ring ζ against its closed form ``1/3 + (2/3) cos(2π/m)``. The same
math written by hand as one ``lax.scan`` (donated buffers; the ring as per-worker coefficient
vectors times ``jnp.roll``, the average as a ones-vector matvec: the fastest forms found) runs in
its own process right after, so the two are measured side by side.

The engine runs as a user at scale would configure it: plain SGD, ``track_consensus=False``,
``donate=True``. The loss is ``½‖x_i − b_i‖²`` with one scalar target per worker and step, so the
batch is tiny and the step is the engine's own work.

By default XLA runs on one thread pinned to one core (``--threads 1``): per-worker cost is then
comparable across sizes (with two threads XLA parallelises large fusions only). ``--threads 0``
keeps XLA's default.

Prints one JSON document. Example::

    python benchmarks/scale.py                       # all sizes, both algorithms (≈ 4 min)
    python benchmarks/scale.py --sizes 256,65536 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ALGORITHMS = ("dpsgd_ring", "local_sgd")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(contender: str, algorithm: str, m: int, d: int, steps: int, repeats: int) -> dict:
    """One measurement in this process (called in a fresh subprocess)."""
    import jax
    import jax.numpy as jnp
    import networkx as nx
    import numpy as np
    import optax
    from jax import lax

    import coopsgd

    after_imports = _rss_mb()
    targets = np.ones((steps, m), np.float32)
    out = {"contender": contender, "algorithm": algorithm, "m": m, "d": d, "steps_per_call": steps}
    t0 = time.perf_counter()
    if contender == "coopsgd":
        algo = coopsgd.dpsgd(nx.cycle_graph(m)) if algorithm == "dpsgd_ring" else coopsgd.local_sgd(m, 4)

        def loss(p, b):
            return 0.5 * jnp.sum((p["w"] - b) ** 2)

        trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss, track_consensus=False,
                                         steps_per_call=steps, donate=True)
        state = trainer.init({"w": jnp.zeros(d, jnp.float32)})
        jax.block_until_ready(state.params)
        out["build_s"] = time.perf_counter() - t0
        out["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state,
                                                                          state.mix_state))))
        if algorithm == "dpsgd_ring":
            out["zeta"] = algo.zeta
            out["zeta_closed_form"] = 1.0 / 3.0 + 2.0 / 3.0 * float(np.cos(2 * np.pi / m))

        def call(state):
            state, _ = trainer.run(state, targets, steps)
            jax.block_until_ready(state.params)
            return state
    else:
        ones = jnp.ones((m,), jnp.float32) / m

        def body(x, b):
            g = x - b[:, None]
            return x - 0.1 * g, jnp.sum(g * g, axis=1)

        if algorithm == "dpsgd_ring":
            # the fastest form found on XLA:CPU: one coefficient per worker and shift (2268 against
            # 3014-3060 ns per worker-step for (x + roll + roll)/3 and its variants, m = 16,384)
            third = jnp.full((m, 1), 1.0 / 3.0, jnp.float32)

            def program(x, bs):
                def step(x, b):
                    x, loss = body(x, b)
                    return third * x + third * jnp.roll(x, -1, 0) + third * jnp.roll(x, 1, 0), loss
                return lax.scan(step, x, bs)
        else:
            def program(x, bs):
                def one_round(x, b4):
                    x, loss = lax.scan(body, x, b4)
                    return jnp.broadcast_to(ones @ x, x.shape), loss
                x, loss = lax.scan(one_round, x, bs.reshape((steps // 4, 4, m)))
                return x, loss.reshape((steps, m))

        compiled = jax.jit(program, donate_argnums=0)
        state = jnp.zeros((m, d), jnp.float32)
        jax.block_until_ready(state)
        out["build_s"] = time.perf_counter() - t0
        out["state_bytes"] = int(state.nbytes)

        def call(state):
            state, _ = compiled(state, targets)
            jax.block_until_ready(state)
            return state

    t1 = time.perf_counter()
    state = call(state)
    out["first_call_s"] = time.perf_counter() - t1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state = call(state)
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    out["step_s"] = median / steps
    out["worker_step_ns"] = median / steps / m * 1e9
    out["rss_after_imports_mb"] = after_imports
    out["peak_rss_mb"] = _peak_mb()
    return out


def _steps(args, m: int) -> int:
    """Steps per timed call: the given ``--steps``, or about 2^20 worker-steps (16 to 256)."""
    if args.steps:
        return args.steps
    return min(256, max(16, 4 * -(-(2**20) // (4 * m))))


def _run_child(args, contender: str, algorithm: str, m: int) -> dict:
    env = dict(os.environ)
    command = [sys.executable, __file__, "--child", contender, algorithm, str(m), "--d", str(args.d),
               "--steps", str(_steps(args, m)), "--repeats", str(args.repeats)]
    if args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
        command = ["taskset", "-c", "0", *command]
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024,4096,16384,65536", help="worker counts m (comma-separated)")
    p.add_argument("--d", type=int, default=1000, help="parameters per worker (default 1000)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per timed call, a multiple of 4 (default: about 2^20 worker-steps per call, 16 to 256)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per size; the median is kept")
    p.add_argument("--threads", type=int, default=1, choices=(0, 1), help="1: one XLA thread on one core; 0: default")
    p.add_argument("--child", nargs=3, metavar=("CONTENDER", "ALGORITHM", "M"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        contender, algorithm, m = args.child
        print(json.dumps(child(contender, algorithm, int(m), args.d, args.steps, args.repeats)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for algorithm in ALGORITHMS:
        for m in sizes:
            for contender in ("coopsgd", "hand-written"):  # side by side, one size at a time
                rows.append(_run_child(args, contender, algorithm, m))
    summary = {}
    for algorithm in ALGORITHMS:
        mine = [r for r in rows if r["algorithm"] == algorithm and r["contender"] == "coopsgd"]
        hand = [r for r in rows if r["algorithm"] == algorithm and r["contender"] == "hand-written"]
        per_worker = [r["worker_step_ns"] for r in mine]
        big = max(mine, key=lambda r: r["m"])
        summary[algorithm] = {
            "worker_step_ns_min": min(per_worker), "worker_step_ns_max": max(per_worker),
            "max_over_min": max(per_worker) / min(per_worker),
            "engine_over_hand": {r["m"]: r["worker_step_ns"] / h["worker_step_ns"] for r, h in zip(mine, hand)},
            "largest_m": big["m"], "build_s": big["build_s"],
            "peak_rss_mb": big["peak_rss_mb"], "state_mb": big["state_bytes"] / 2**20,
            "memory_target_mb": 1.5 * big["state_bytes"] / 2**20 + 400,
            "peak_over_imports_mb": big["peak_rss_mb"] - big["rss_after_imports_mb"],
            "hand_peak_rss_mb": max(hand, key=lambda r: r["m"])["peak_rss_mb"],
        }
    load = os.getloadavg()
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "load_1_5_15": load, "python": platform.python_version(),
                                  "xla_threads": "1 (pinned to core 0)" if args.threads == 1 else "default"},
                      "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
