"""Local SGD with each worker's model sharded over its own devices: a 2-D mesh ("workers", "model").

Forces 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is
imported; on 8 GPUs drop that line) and lays them out as 4 workers × 2 model shards. Each worker
trains an MLP on the bundled 8×8 digits whose layers are split Megatron-style over ``"model"``:
the first layer by its output columns, the second by its input rows, so that a worker's forward
pass needs one all-reduce inside its group — GSPMD partitions it from the ``param_specs``. The
mixing (an exact average every τ steps) communicates along ``"workers"`` only. The script prints
as JSON each device's shard of the weights, the collectives of the compiled mixing step by the
mesh axis they run along, the loss, the averaged model's test accuracy, and how far the run is
from the same run simulated on one device.

    python examples/sharded_model.py           # 300 steps, Adam, tau = 4
    python examples/sharded_model.py --quick   # 16 steps
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import coopsgd  # noqa: E402
from coopsgd.app import data  # noqa: E402
from coopsgd.parallel import hlo  # noqa: E402

SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
"""Megatron-style tensor parallelism: layer 1 split by output columns, layer 2 by input rows."""


def init_params(hidden: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w1": (rng.normal(size=(64, hidden)) / 8).astype(np.float32), "b1": np.zeros(hidden, np.float32),
            "w2": (rng.normal(size=(hidden, 10)) / np.sqrt(hidden)).astype(np.float32),
            "b2": np.zeros(10, np.float32)}


def logits(params, x):
    hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def loss_fn(params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, batch["x"]), batch["y"]).mean()


def collectives_by_axis(text: str, mesh) -> dict:
    """The compiled program's collectives counted by the mesh axes they run along."""
    counts: dict = {}
    for kind, axes in hlo.collectives(text, dict(mesh.shape)):
        along = counts.setdefault("+".join(axes) or "none", {})
        along[kind] = along.get(kind, 0) + 1
    return counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 steps")
    parser.add_argument("--steps", type=int, default=300, help="steps of the full run (default 300)")
    parser.add_argument("--tau", type=int, default=4, help="local steps between averagings (default 4)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units, split over the model axis (default 64)")
    args = parser.parse_args(argv)
    steps, workers, model = (16 if args.quick else args.steps), 4, 2
    if jax.device_count() < workers * model:
        raise SystemExit(f"needs {workers * model} devices, found {jax.device_count()}")

    ds = data.load_digits(test_fraction=0.2, seed=0)
    sampler = data.WorkerSampler(ds.x_train, ds.y_train, data.split_iid(len(ds.y_train), workers, seed=0),
                                 batch_size=32, seed=0)
    batches = jax.tree.map(lambda *b: np.stack(b), *[sampler.batch(k) for k in range(steps)])
    params = init_params(args.hidden)
    mesh = jax.make_mesh((workers, model), ("workers", "model"), devices=jax.devices()[: workers * model],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    algo = coopsgd.local_sgd(workers, args.tau)
    sharded = coopsgd.CooperativeSGD(algo, optax.adam(3e-3), loss_fn, backend="shard_map", mesh=mesh,
                                     param_specs=SPECS)
    state, metrics = sharded.run(sharded.init(params), batches, steps)
    simulated = coopsgd.CooperativeSGD(algo, optax.adam(3e-3), loss_fn)
    reference, _ = simulated.run(simulated.init(params), batches, steps)

    average = sharded.average(state)
    accuracy = float(np.mean(np.argmax(np.asarray(logits(average, jnp.asarray(ds.x_test))), -1) == ds.y_test))
    program = sharded.lower_step(state, jax.tree.map(lambda b: b[0], batches), mixes=True).compile().as_text()
    loss = np.asarray(metrics.loss)
    report = {
        "mesh": dict(mesh.shape), "steps": steps, "tau": args.tau,
        "w1_global": list(state.params["w1"].shape),
        "w1_per_device": list(state.params["w1"].addressable_shards[0].data.shape),
        "w2_per_device": list(state.params["w2"].addressable_shards[0].data.shape),
        "w1_spec": str(state.params["w1"].sharding.spec),
        "mixing_step_collectives": collectives_by_axis(program, mesh),
        "first_loss": float(loss[:4].mean()), "last_loss": float(loss[-4:].mean()),
        "test_accuracy": accuracy,
        "max_abs_diff_vs_simulate": max(float(np.max(np.abs(np.asarray(state.params[k]) - np.asarray(v))))
                                        for k, v in reference.params.items()),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
