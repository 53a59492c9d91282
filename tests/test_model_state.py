"""Model state carried per worker (BatchNorm statistics): updated by the loss, never
differentiated, and averaged (or kept local) at the mixings — checked against running statistics
computed by hand in NumPy, and for a flax nnx CNN against its BatchNorm rule applied to feature
maps computed outside the trainer."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopsgd

MOMENTUM = 0.9
ROOT = pathlib.Path(__file__).resolve().parents[1]


def bn_loss(params, stats, batch):
    """Batch normalisation of the inputs (the statistics depend on the data only), then a linear
    least-squares head; the running mean and variance follow ``r ← 0.9 r + 0.1 batch value``."""
    x = batch["x"]
    mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
    new = {"mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
           "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var}
    y = (x - mean) / jnp.sqrt(var + 1e-5) * params["scale"] @ params["w"]
    return jnp.mean((y - batch["y"]) ** 2), new


def data(steps, m, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=np.arange(3), scale=1 + np.arange(3), size=(steps, m, 6, 3)).astype(np.float32)
    return {"x": x, "y": rng.normal(size=(steps, m, 6)).astype(np.float32)}


PARAMS = {"scale": np.ones(3, np.float32), "w": np.array([0.5, -0.2, 0.1], np.float32)}
STATS = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}


def expected_stats(batches, steps, m, tau, average):
    """The running statistics by hand: per worker r ← 0.9 r + 0.1 (batch mean, biased variance);
    at every round end (steps tau, 2 tau, …) the mean over the workers when ``average``."""
    mean, var = np.zeros((m, 3)), np.ones((m, 3))
    for k in range(steps):
        x = batches["x"][k].astype(np.float64)
        mean = MOMENTUM * mean + (1 - MOMENTUM) * x.mean(axis=1)
        var = MOMENTUM * var + (1 - MOMENTUM) * x.var(axis=1)
        if average and (k + 1) % tau == 0:
            mean, var = np.broadcast_to(mean.mean(0), mean.shape), np.broadcast_to(var.mean(0), var.shape)
    return mean, var


@pytest.mark.parametrize("policy", ["average", "local"])
def test_running_statistics_match_the_hand_computation(policy):
    m, tau, steps = 4, 2, 5
    batches = data(steps, m)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(0.1), bn_loss, has_state=True,
                                     state_sync=policy)
    state, metrics = trainer.run(trainer.init(PARAMS, model_state=STATS), batches, steps)
    mean, var = expected_stats(batches, steps, m, tau, average=policy == "average")
    np.testing.assert_allclose(np.asarray(state.model_state["mean"]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.model_state["var"]), var, rtol=1e-5)
    assert np.abs(mean).min() > 0.01  # non-zero statistics: the inputs' means are 0, 1, 2
    if policy == "local":  # kept per worker: they differ after the last mixing too
        assert np.ptp(np.asarray(state.model_state["mean"]), axis=0).max() > 1e-3


def test_model_state_is_the_same_on_every_layout():
    m, tau, steps = 4, 2, 4
    batches = data(steps, m, seed=1)
    states = {}
    for backend in ("simulate", "pmap", "shard_map"):  # the last step mixes
        trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(0.1), bn_loss, backend,
                                         has_state=True, devices=None if backend == "simulate" else jax.devices()[:4])
        state, _ = trainer.run(trainer.init(PARAMS, model_state=STATS), batches, steps)
        states[backend] = np.asarray(trainer.backend.workers(state.model_state)["mean"])
    mean, _ = expected_stats(batches, steps, m, tau, average=True)
    for backend, got in states.items():
        np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6, err_msg=backend)


def _example():
    spec = importlib.util.spec_from_file_location("nnx_batchnorm", ROOT / "examples" / "nnx_batchnorm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_batchnorm_statistics_follow_flax_rule():
    """An nnx CNN (Conv → BatchNorm → …) through the documented split/merge recipe: each worker's
    running mean and variance equal flax's BatchNorm rule, r ← 0.99 r + 0.01 · (batch statistic
    of the conv features), with the features computed by flax's Conv from that worker's
    parameters read back before each step, and the workers' statistics averaged at the mixing."""
    from flax import nnx

    example = _example()
    m, tau, steps = 2, 2, 3
    graphdef, params, stats = example.split(example.CNN(4, 10, nnx.Rngs(0)))
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(0.2), example.make_loss(graphdef),
                                     has_state=True)
    state = trainer.init(params, model_state=stats)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(steps, m, 5, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(steps, m, 5))
    mean, var = np.zeros((m, 4)), np.ones((m, 4))
    for k in range(steps):
        workers = trainer.workers(state)
        for i in range(m):
            conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=nnx.Rngs(1))
            conv.kernel[...] = np.asarray(workers["conv"]["kernel"][i])
            conv.bias[...] = np.asarray(workers["conv"]["bias"][i])
            features = np.asarray(conv(jnp.asarray(x[k, i])), np.float64).reshape(-1, 4)
            mean[i] = 0.99 * mean[i] + 0.01 * features.mean(0)
            var[i] = 0.99 * var[i] + 0.01 * features.var(0)
        if (k + 1) % tau == 0:
            mean[:], var[:] = mean.mean(0), var.mean(0)
        state, _ = trainer.step(state, {"x": x[k], "y": y[k]})
    got = state.model_state["norm"]
    np.testing.assert_allclose(np.asarray(got["mean"][...]), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["var"][...]), var, rtol=1e-4, atol=1e-6)
    assert np.abs(mean).max() > 1e-3


# ----------------------------------------------------------------------------------- bad input
def test_a_state_that_changes_shape_is_refused_before_compiling():
    def growing(params, stats, batch):
        loss, new = bn_loss(params, stats, batch)
        return loss, {"mean": jnp.concatenate([new["mean"], new["mean"]]), "var": new["var"]}

    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), growing, has_state=True)
    with pytest.raises(ValueError, match=r"model_state\['mean'\] with shape \(6,\).*given shape \(3,\)"):
        trainer.run(trainer.init(PARAMS, model_state=STATS), data(2, 2), 2)

    def renamed(params, stats, batch):
        loss, new = bn_loss(params, stats, batch)
        return loss, {"avg": new["mean"], "var": new["var"]}

    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), renamed, has_state=True)
    with pytest.raises(ValueError, match="must keep its structure across steps"):
        trainer.run(trainer.init(PARAMS, model_state=STATS), data(2, 2), 2)


def test_state_options_are_checked():
    plain = lambda p, b: jnp.mean(b["x"] @ p["w"])
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), plain)
    with pytest.raises(ValueError, match="without has_state=True"):
        trainer.init(PARAMS, model_state=STATS)
    with pytest.raises(ValueError, match=r"state_sync must be one of \('average', 'local'\)"):
        coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), bn_loss, has_state=True, state_sync="mean")
    no_state = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), lambda p, s, b: 0.0 * p["w"].sum(),
                                      has_state=True)
    with pytest.raises(ValueError, match=r"must return \(loss, new_model_state\)"):
        no_state.run(no_state.init(PARAMS, model_state=STATS), data(2, 2), 2)
