"""One algorithm, three layouts: simulate, pmap and shard_map on 8 (forced) host devices.

Forces 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is
imported; on a machine with 8 GPUs/TPUs drop that line), trains m = 16 workers (two per device)
with local SGD, ring D-PSGD and EASGD on each backend, and prints as JSON how far the backends
are from the simulation and which collectives the compiled mixing step contains.

    python examples/multi_device.py           # 50 steps
    python examples/multi_device.py --quick   # 4 steps
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import coopsgd  # noqa: E402
from coopsgd.parallel import hlo  # noqa: E402


def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def collectives(text: str) -> dict:
    """The compiled program's all-reduces, all-gathers and collective-permutes, counted."""
    found = hlo.counts(text)
    return {k: found[k] for k in ("all-reduce", "all-gather", "collective-permute")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--algorithms", default="local_sgd,ring_dpsgd,easgd",
                        help="comma-separated subset of local_sgd, ring_dpsgd, easgd")
    args = parser.parse_args(argv)
    m, steps = args.workers, (4 if args.quick else 50)
    if m % jax.device_count():
        raise SystemExit(f"--workers must be a multiple of the {jax.device_count()} devices")

    rng = np.random.default_rng(0)
    batches = {"x": rng.normal(size=(steps, m, 32, 10)).astype(np.float32),
               "y": rng.normal(size=(steps, m, 32)).astype(np.float32)}
    init = {"w": np.zeros(10, np.float32), "b": np.float32(0.0)}
    algorithms = {"local_sgd": coopsgd.local_sgd(m, 4),
                  "ring_dpsgd": coopsgd.dpsgd(nx.cycle_graph(m)),
                  "easgd": coopsgd.easgd(m, tau=4)}
    report = {"devices": jax.device_count(), "workers": m, "steps": steps}
    for name in args.algorithms.split(","):
        algo = algorithms[name]
        entry = {}
        reference = None
        for backend in ("simulate", "pmap", "shard_map"):
            trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.05), loss_fn, backend=backend,
                                             track_consensus=False)
            state, metrics = trainer.run(trainer.init(init), batches, steps)
            cols = np.asarray(trainer.columns(state)["w"])
            if reference is None:
                reference = cols
            batch = jax.tree.map(lambda x: x[0], batches)
            program = trainer.lower_step(trainer.init(init), batch).compile().as_text()
            entry[backend] = {"final_loss": float(metrics.loss[-1]),
                              "max_abs_diff_vs_simulate": float(np.max(np.abs(cols - reference))),
                              "mixing_step_collectives": collectives(program)}
        entry["plan"] = trainer.plan().kind
        report[name] = entry
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
