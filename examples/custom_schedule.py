"""A custom schedule: a period that grows, a topology that alternates, and a Flax nnx model.

Runs decentralized training of a small Flax nnx MLP on a synthetic regression task with

- a period τ that doubles every 40 steps (any callable ``start_step -> τ`` works; the engine asks
  it round by round, at run time), and
- a mixing schedule that alternates a ring (one ``ppermute`` per neighbour on devices) with exact
  averaging (one all-reduce), via ``coopsgd.schedules.cyclic``.

It prints, as JSON, the loss at the start and end, how many steps communicated, and what each
mixing sends per worker (``trainer.communication``), the figures a runtime model needs.

    python examples/custom_schedule.py            # 160 steps
    python examples/custom_schedule.py --quick    # 12 steps
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
from flax import nnx

import coopsgd
from coopsgd import mixing, schedules


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))[..., 0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    m, steps = args.workers, (12 if args.quick else 160)

    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)  # the parameter pytree is all coopsgd needs

    def loss_fn(p, batch):
        return jnp.mean((nnx.merge(graphdef, p)(batch["x"]) - batch["y"]) ** 2)

    ring = mixing.metropolis(nx.cycle_graph(m))
    algorithm = coopsgd.Algorithm(
        W=schedules.cyclic([ring, mixing.averaging(m)]),
        tau=lambda start: 2 ** min(start // 40, 3),  # 1, 2, 4, 8, then stays at 8
        name="growing_tau_ring_then_average",
    )
    trainer = coopsgd.CooperativeSGD(algorithm, optax.adam(3e-3), loss_fn, track_consensus=True)

    rng = np.random.default_rng(0)
    teacher = rng.normal(size=8)
    x = rng.normal(size=(steps, m, 16, 8)).astype(np.float32)
    y = (np.tanh(x @ teacher) + 0.1 * rng.normal(size=(steps, m, 16))).astype(np.float32)

    state = trainer.init(params)
    state, metrics = trainer.run(state, {"x": x, "y": y}, steps)
    nnx.update(model, trainer.average(state))  # evaluate the averaged model u_k

    param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    report = {
        "algorithm": repr(algorithm),
        "steps": steps,
        "first_loss": float(metrics.loss[0]),
        "last_loss": float(metrics.loss[-1]),
        "communicating_steps": int(np.sum(metrics.communicated)),
        "final_consensus_distance": float(metrics.consensus[-1]),
        "mixings": int(state.rounds),
        "per_mixing": [trainer.communication(param_bytes, r)._asdict() for r in range(2)],
        "averaged_model_loss": float(loss_fn(nnx.state(model, nnx.Param),
                                             {"x": x[-1].reshape(-1, 8), "y": y[-1].reshape(-1)})),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
