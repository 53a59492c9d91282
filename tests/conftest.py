"""Test setup: JAX on the CPU with 8 forced host devices, so pmap / shard_map paths run anywhere;
and the helpers several test files share (a least-squares loss, its gradient by hand, batches,
the plain NumPy local-SGD reference, a random matching schedule).

The flags must be set before jax is imported anywhere in the test session.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


def traffic_of(algorithm, param_bytes):
    """Round index -> what that round's mixing sends (the engine's account), for timelines."""
    import coopsgd

    return lambda r: coopsgd.mixing_traffic(algorithm.mixing.at(r), param_bytes, algorithm.v)


# ---------------------------------------------------------------------------- shared helpers
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

import coopsgd
from coopsgd import schedules

D_IN, B = 3, 4  # model size, samples per worker per step
LR = 0.1


def loss_fn(params, batch):
    """Least squares on one worker's batch: mean((x w + b − y)²)."""
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def grad_np(w, b, x, y):
    """∇ of mean((x w + b − y)²), by hand."""
    r = x @ w + b - y
    return 2.0 * x.T @ r / len(y), 2.0 * np.mean(r)


def make_batches(steps, m, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, m, B, D_IN)).astype(np.float32)
    y = rng.normal(size=(steps, m, B)).astype(np.float32)
    return {"x": x, "y": y}


INIT = {"w": np.array([0.5, -0.25, 1.0], np.float32), "b": np.float32(0.1)}


def local_sgd_np(batches, steps, m, v, mix_np):
    """Each worker: x ← x − η g (auxiliary columns: no gradient); then ``mix_np(t, W, Bias)``."""
    w = np.tile(INIT["w"].astype(np.float64), (m + v, 1))
    b = np.full(m + v, float(INIT["b"]))
    for t in range(steps):
        for i in range(m):
            gw, gb = grad_np(w[i], b[i], batches["x"][t, i].astype(np.float64),
                             batches["y"][t, i].astype(np.float64))
            w[i] -= LR * gw
            b[i] -= LR * gb
        w, b = mix_np(t, w, b)
    return w, b


def run_engine(algo, batches, steps, **kw):
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, **kw)
    state = trainer.init(INIT)
    state, metrics = trainer.run(state, batches, steps)
    cols = trainer.columns(state)
    return trainer, state, metrics, np.asarray(cols["w"]), np.asarray(cols["b"])


def matching_laplacian(m, matching):
    lap = np.zeros((m, m))
    for a, c in matching:
        lap[a, a] += 1
        lap[c, c] += 1
        lap[a, c] = lap[c, a] = -1
    return lap


class RandomMatchings(schedules.MixingSchedule):
    """A random schedule (cycle None), MATCHA-style: round r activates each of the ring's two
    matchings with probability 1/2 and uses W = I − (1/3) Σ_active L_j, from a seed and r only."""

    def __init__(self, m, seed=0):
        self.n, self.seed = m, seed
        self.matchings = [[(i, i + 1) for i in range(0, m, 2)],
                          [(i, (i + 1) % m) for i in range(1, m, 2)]]
        self.support = np.eye(m, dtype=bool) | (coopsgd.mixing.metropolis(nx.cycle_graph(m)) > 0)

    def at(self, r):
        rng = np.random.default_rng([self.seed, r])
        lap = sum(matching_laplacian(self.n, mt) for mt in self.matchings if rng.random() < 0.5)
        return np.eye(self.n) - lap / 3.0


