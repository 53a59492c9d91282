"""A Flax ``nnx`` CNN with BatchNorm on the bundled 8×8 digits, trained by local SGD on 8 simulated
workers, each carrying its own BatchNorm statistics.

The two-line recipe for any ``nnx.Module``: split it into its parameters and the rest of its
state, and let the loss merge them back and return the state the forward pass left behind::

    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params, stats, batch):
        model = nnx.merge(graphdef, params, stats)  # training mode: batch statistics, running ones updated
        loss = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()
        return loss, nnx.state(model, nnx.BatchStat)

``CooperativeSGD(..., has_state=True)`` carries the statistics per worker (never differentiated)
and averages them with the models at every mixing (``state_sync="average"``; ``"local"`` keeps
them per worker). The averaged model is evaluated with the averaged running statistics.

Run:  python examples/nnx_batchnorm.py            (about 15 s on 2 CPU cores)
      python examples/nnx_batchnorm.py --quick    (a few seconds)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import coopsgd
from coopsgd.app import data


class CNN(nnx.Module):
    """Conv 3×3 (same padding) → BatchNorm → ReLU → flatten → Linear, for images of ``pixels``
    = height × width (64 for the 8×8 digits) with one channel."""

    def __init__(self, features: int, classes: int, rngs: nnx.Rngs, *, pixels: int = 64):
        self.conv = nnx.Conv(1, features, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(features, rngs=rngs)
        self.head = nnx.Linear(features * pixels, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


def split(model: nnx.Module):
    """``(graphdef, params, batch_stats)`` of an nnx model."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


def make_loss(graphdef):
    """The loss with model state: ``loss(params, stats, batch) -> (loss, new_stats)``."""
    def loss_fn(params, stats, batch):
        model = nnx.merge(graphdef, params, stats)
        loss = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    return loss_fn


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (24 steps)")
    parser.add_argument("--workers", type=int, default=8, help="simulated workers (default 8)")
    parser.add_argument("--tau", type=int, default=4, help="local steps between averagings (default 4)")
    parser.add_argument("--steps", type=int, default=400, help="steps of the full run (default 400)")
    parser.add_argument("--state-sync", choices=coopsgd.STATE_POLICIES, default="average",
                        help="the BatchNorm statistics at a mixing (default average)")
    args = parser.parse_args(argv)
    steps = 24 if args.quick else args.steps

    ds = data.load_digits(test_fraction=0.2, seed=0)
    shards = data.split_iid(len(ds.y_train), args.workers, seed=0)
    sampler = data.WorkerSampler(ds.x_train, ds.y_train, shards, batch_size=16, seed=0)

    graphdef, params, stats = split(CNN(8, ds.num_classes, nnx.Rngs(0)))
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(args.workers, args.tau), optax.sgd(0.1, momentum=0.9),
                                     make_loss(graphdef), has_state=True, state_sync=args.state_sync)
    state = trainer.init(params, model_state=stats)
    state, metrics = trainer.run(state, sampler.batch, steps)

    # The averaged model with the workers' averaged running statistics, in evaluation mode.
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
    model = nnx.merge(graphdef, trainer.average(state), mean(state.model_state))
    model.eval()
    accuracy = float(np.mean(np.argmax(np.asarray(model(jnp.asarray(ds.x_test))), -1) == ds.y_test))
    running_mean = np.asarray(state.model_state["norm"]["mean"][...])
    loss = np.asarray(metrics.loss)
    print(f"nnx CNN with BatchNorm on digits, m = {args.workers}, tau = {args.tau}, statistics {args.state_sync}")
    spread = float(np.ptp(running_mean, axis=0).max())  # 0 when the statistics were averaged at the last mixing
    print(f"steps {steps}: mini-batch loss {loss[:4].mean():.3f} -> {loss[-4:].mean():.3f}; running mean of "
          f"the BatchNorm inputs |mean| {np.abs(running_mean).mean():.4f}, spread over the workers {spread:.2e}; "
          f"test accuracy {accuracy:.3f}")
    return {"first_loss": float(loss[:4].mean()), "last_loss": float(loss[-4:].mean()), "accuracy": accuracy,
            "running_mean_abs": float(np.abs(running_mean).mean()), "worker_spread": spread, "steps": steps}


if __name__ == "__main__":
    main()
