"""A Flax CNN on the bundled 8×8 digits, trained by local SGD across 8 simulated workers.

Uses the library directly (no command line): the bundled data split across workers, a Flax
``linen`` CNN whose parameter pytree the engine stacks once per worker, ``optax.sgd``, and
:class:`coopsgd.CooperativeSGD` running τ local steps between exact averagings
(Wang & Joshi, Cooperative SGD, arXiv:1808.07576). Any Flax model works the same way: pass its
``variables["params"]`` and a ``loss_fn(params, batch)``.

Run:  python examples/flax_cnn.py            (about 20 s on 2 CPU cores)
      python examples/flax_cnn.py --quick    (a few seconds; what the tests run)
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import coopsgd
from coopsgd import CooperativeSGD
from coopsgd.app import data, models


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    steps = 48 if args.quick else args.steps

    ds = data.load_digits(test_fraction=0.2, seed=0)
    shards = data.split_iid(len(ds.y_train), args.workers, seed=0)
    sampler = data.WorkerSampler(ds.x_train, ds.y_train, shards, batch_size=16, seed=0)

    model = models.make("cnn", ds.input_shape, ds.num_classes, features=(8, 16))
    params = model.init(jax.random.key(0))
    trainer = CooperativeSGD(coopsgd.local_sgd(args.workers, args.tau), optax.sgd(0.2, momentum=0.9),
                             models.loss_fn(model))
    state = trainer.init(params, seed=0)

    # Feed the engine a callable step -> per-worker batch (leaves (m, B, ...)); it fuses whole
    # rounds of tau local steps into one compiled call.
    state, metrics = trainer.run(state, lambda k: sampler.batch(k), steps)

    average = trainer.average(state)
    acc = models.accuracy(model, average, ds.x_test, ds.y_test)
    loss = np.asarray(metrics.loss)
    rounds = int(np.sum(np.asarray(metrics.communicated)))
    print(f"CNN ({models.param_count(params)} parameters) on digits, m = {args.workers}, tau = {args.tau}")
    print(f"steps {steps}: mini-batch loss {loss[:8].mean():.3f} -> {loss[-8:].mean():.3f}, "
          f"{rounds} averagings, test accuracy of the averaged model {acc:.3f}")
    return {"first_loss": float(loss[:8].mean()), "last_loss": float(loss[-8:].mean()),
            "accuracy": acc, "rounds": rounds, "steps": steps}


if __name__ == "__main__":
    main()
