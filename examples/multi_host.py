"""Cooperative SGD across processes: two local JAX processes × 2 CPU devices, ``jax.distributed``.

Run ``python examples/multi_host.py`` (add ``--quick`` for a few steps). The launcher starts two
copies of this script as workers on 127.0.0.1; each joins the run with
``coopsgd.parallel.cluster.join`` (``jax.distributed`` with a watch channel, so that a port taken,
a process missing or a process dying ends with one line on every process), builds
the same trainer with ``backend="shard_map"`` over the 4 global devices (m = 8 workers, two per
device), and trains on the same global batches (every process passes the whole batch; each device
reads its workers' rows). Then the same on a 2-D mesh ``("workers", "model")``: one row of the mesh
per process, so the workers span the processes while each worker's model (an MLP whose hidden
layer is split over ``"model"``) is sharded over its own process's devices, and every process feeds
only its own workers' batches. Process 0 writes the final columns to a file, and the launcher
checks them against the same runs on the simulate backend.

On real hosts, run the worker part once per host with ``--worker --process-id I --num-processes N
--coordinator HOST0:PORT`` (see docs/engine.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    """A free port whose successor is free too (the coordinator and the watch channel)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def problem(m: int, steps: int):
    """A least-squares problem; the same on every process (deterministic data)."""
    import jax.numpy as jnp
    import networkx as nx
    import numpy as np

    import coopsgd

    rng = np.random.default_rng(0)
    batches = {"x": rng.normal(size=(steps, m, 16, 4)).astype(np.float32),
               "y": rng.normal(size=(steps, m, 16)).astype(np.float32)}

    def loss(params, batch):
        return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)

    algorithms = {
        "local_sgd": coopsgd.local_sgd(m, 2),
        "ring_dpsgd": coopsgd.dpsgd(nx.cycle_graph(m)),
        "easgd": coopsgd.easgd(m, tau=2),
    }
    init = {"w": np.zeros(4, np.float32), "b": np.float32(0.0)}
    return algorithms, loss, init, batches


HIDDEN = 8


def grouped_problem(m: int, steps: int):
    """An MLP 4 → 8 → 1 whose hidden layer is split over the mesh's ``"model"`` axis (the specs),
    local SGD and ring D-PSGD, deterministic data."""
    import jax.numpy as jnp
    import networkx as nx
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import coopsgd

    rng = np.random.default_rng(1)
    batches = {"x": rng.normal(size=(steps, m, 16, 4)).astype(np.float32),
               "y": rng.normal(size=(steps, m, 16)).astype(np.float32)}

    def loss(params, batch):
        hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)

    init = {"w1": (0.5 * rng.normal(size=(4, HIDDEN))).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32), "w2": (0.5 * rng.normal(size=HIDDEN)).astype(np.float32)}
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model")}
    algorithms = {"grouped_local_sgd": coopsgd.local_sgd(m, 2), "grouped_ring_dpsgd": coopsgd.dpsgd(nx.cycle_graph(m))}
    return algorithms, loss, init, batches, specs


def record(trainer, state, metrics) -> dict:
    import numpy as np

    cols = trainer.columns(state)
    return {**{k: np.asarray(v).tolist() for k, v in cols.items()}, "loss": np.asarray(metrics.loss).tolist()}


def worker(args) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    import jax

    import numpy as np
    import optax

    import coopsgd
    from coopsgd.parallel import cluster

    try:  # a port taken or a process missing: one line and exit code 2 on every process that came
        run = cluster.join(args.coordinator, args.num_processes, args.process_id,
                           join_timeout=args.join_timeout, peer_timeout=args.peer_timeout)
    except ValueError as err:
        print(f"coopsgd: {err}", file=sys.stderr, flush=True)
        sys.exit(2)

    algorithms, loss, init, batches = problem(args.m, args.steps)
    out = {"process": jax.process_index(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    with run:  # a peer that dies or stops answering: one line on every survivor, exit code 1
        for name, algo in algorithms.items():
            trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.05), loss, backend="shard_map")
            state, metrics = trainer.run(trainer.init(init), batches, args.steps, hooks=[die_at(args)])
            out[name] = record(trainer, state, metrics)  # the columns are replicated on every process
        # A worker is one process's devices: the mesh's rows are the processes.
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(args.num_processes, -1), ("workers", "model"),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 2)
        algorithms, loss, init, batches, specs = grouped_problem(2 * args.num_processes, args.steps)
        for name, algo in algorithms.items():
            trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.05), loss, backend="shard_map", mesh=mesh,
                                             param_specs=specs)
            mine = trainer.backend.local_workers()  # this process feeds its own workers' batches only
            own = {k: v[:, mine] for k, v in batches.items()}
            state, metrics = trainer.run(trainer.init(init), own, args.steps)
            out[name] = record(trainer, state, metrics)
            out[name + "_fed_workers"] = mine.tolist()
            out[name + "_w1_spec"] = str(state.params["w1"].sharding.spec)
        if jax.process_index() == 0:
            with open(args.out, "w") as f:
                json.dump(out, f)


def die_at(args):
    """A round hook that kills this process at step ``--die-at`` (fault injection), and paces the
    run by ``--round-sleep`` seconds a round so that a peer's death lands mid-run."""
    def hook(end):
        if args.die_at is not None and end.step >= args.die_at:
            os._exit(9)
        time.sleep(args.round_sleep)

    return hook


def launch(steps: int, m: int = 8, num_processes: int = 2, local_devices: int = 2,
           timeout: float = 240.0) -> dict:
    """Start ``num_processes`` workers on 127.0.0.1 and return process 0's results."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", "--process-id", str(i),
                 "--num-processes", str(num_processes), "--coordinator", f"127.0.0.1:{port}",
                 "--local-devices", str(local_devices), "--m", str(m), "--steps", str(steps),
                 "--out", out],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)
        ]
        deadline = time.time() + timeout
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError("multi-host workers timed out:\n" + "\n".join(logs))
        if any(p.returncode for p in procs):
            raise RuntimeError("a worker failed:\n" + "\n---\n".join(logs))
        with open(out) as f:
            return json.load(f)


def simulate(steps: int, m: int = 8, num_processes: int = 2) -> dict:
    import optax

    import coopsgd

    algorithms, loss, init, batches = problem(m, steps)
    grouped, grouped_loss, grouped_init, grouped_batches, _ = grouped_problem(2 * num_processes, steps)
    out = {}
    for runs, fn, start, data in ((algorithms, loss, init, batches),
                                  (grouped, grouped_loss, grouped_init, grouped_batches)):
        for name, algo in runs.items():
            trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.05), fn)
            state, metrics = trainer.run(trainer.init(start), data, steps)
            out[name] = record(trainer, state, metrics)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--worker", action="store_true",
                        help="run as one process of a multi-host run (what --quick launches for each process)")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default="127.0.0.1:12345")
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="multi_host_result.json")
    parser.add_argument("--join-timeout", type=float, default=60.0,
                        help="seconds to wait for every process to arrive (default 60)")
    parser.add_argument("--peer-timeout", type=float, default=10.0,
                        help="seconds without a heartbeat before a process counts as lost (default 10)")
    parser.add_argument("--die-at", type=int, default=None,
                        help="fault injection: this process kills itself at this step (default: never)")
    parser.add_argument("--round-sleep", type=float, default=0.0,
                        help="seconds to sleep after each round (default 0), to pace a fault-injection run")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 40)
    if args.worker:
        args.steps = steps
        worker(args)
        return {}
    import numpy as np

    multi = launch(steps, m=args.m, num_processes=args.num_processes,
                   local_devices=args.local_devices)
    ref = simulate(steps, m=args.m, num_processes=args.num_processes)
    report = {"processes": args.num_processes, "global_devices": multi["devices"], "m": args.m,
              "steps": steps}
    for name in ref:
        diff = max(float(np.max(np.abs(np.asarray(multi[name][k]) - np.asarray(ref[name][k]))))
                   for k in ref[name] if k != "loss")
        report[name] = {"max_abs_diff_vs_simulate": diff, "final_loss": multi[name]["loss"][-1]}
        if name + "_fed_workers" in multi:
            report[name]["workers_fed_by_process_0"] = multi[name + "_fed_workers"]
            report[name]["w1_spec"] = multi[name + "_w1_spec"]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
