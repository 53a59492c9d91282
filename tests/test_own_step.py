"""``cooperative_step``: Cooperative SGD inside the user's own per-worker training step.

Checked against the NumPy local-SGD reference (the paper's rule by hand), and as an equivalence
with :class:`coopsgd.CooperativeSGD` running the same optimizer for mixings of every kind (a
global mean, a ring, an auxiliary anchor, a time-varying W); an ``nnx.Optimizer`` loop as the
documentation shows it."""
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import INIT, LR, local_sgd_np, loss_fn, make_batches

import coopsgd

TX = optax.sgd(LR)


def train_step(ws, batch):
    params, opt = ws
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt = TX.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), {"loss": loss}


def wrap(algo, **kw):
    return coopsgd.cooperative_step(algo, train_step, params=lambda ws: ws[0],
                                    with_params=lambda ws, p: (p, ws[1]), **kw)


def run(algo, batches, steps, **kw):
    init, step = wrap(algo, **kw)
    state = init((INIT, TX.init(INIT)))
    communicated = []
    for k in range(steps):
        state, metrics = step(state, jax.tree.map(lambda b: b[k], batches))
        communicated.append(metrics["communicated"])
    return state, communicated


def test_local_sgd_equals_the_rule_by_hand():
    m, tau, steps = 4, 3, 7
    batches = make_batches(steps, m, seed=5)
    state, communicated = run(coopsgd.local_sgd(m, tau), batches, steps, donate=True)

    def average_every_tau(t, w, b):  # the exact average after steps tau, 2 tau, ...
        if (t + 1) % tau == 0:
            w[:], b[:] = w.mean(0), b.mean()
        return w, b

    w, b = local_sgd_np(batches, steps, m, 0, average_every_tau)
    np.testing.assert_allclose(np.asarray(state.workers[0]["w"]), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.workers[0]["b"]), b, rtol=1e-5, atol=1e-6)
    assert communicated == [(t + 1) % tau == 0 for t in range(steps)]
    assert int(state.step) == steps


@pytest.mark.parametrize("name", ["dpsgd", "easgd", "matcha"])
def test_every_mixing_equals_the_trainer(name):
    m, steps = 4, 6
    algo = {"dpsgd": coopsgd.dpsgd(nx.cycle_graph(m)), "easgd": coopsgd.easgd(m, tau=2),
            "matcha": coopsgd.matcha(nx.cycle_graph(m), budget=0.5, seed=1)}[name]
    batches = make_batches(steps, m, seed=6)
    state, communicated = run(algo, batches, steps)
    trainer = coopsgd.CooperativeSGD(algo, TX, loss_fn)
    expected, metrics = trainer.run(trainer.init(INIT), batches, steps)
    np.testing.assert_allclose(np.asarray(state.workers[0]["w"]), np.asarray(expected.params["w"]), rtol=1e-5)
    assert communicated == list(np.asarray(metrics.communicated))
    if name == "easgd":  # the anchor, the auxiliary column, is the mixer's state
        np.testing.assert_allclose(np.asarray(state.mix_state.shared["w"]),
                                   np.asarray(expected.mix_state.shared["w"]), rtol=1e-5)


def test_an_nnx_optimizer_loop():
    from flax import nnx

    m, tau, steps = 4, 2, 4
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    graphdef, params, rest = nnx.split((model, optimizer), nnx.Param, ...)

    def nnx_step(ws, batch):
        model, optimizer = nnx.merge(graphdef, *ws)
        loss, grads = nnx.value_and_grad(lambda mdl: jnp.mean((mdl(batch["x"])[:, 0] - batch["y"]) ** 2))(model)
        optimizer.update(model, grads)
        _, params, rest = nnx.split((model, optimizer), nnx.Param, ...)
        return (params, rest), {"loss": loss}

    init, step = coopsgd.cooperative_step(coopsgd.local_sgd(m, tau), nnx_step, params=lambda ws: ws[0],
                                          with_params=lambda ws, p: (p, ws[1]))
    state = init((params, rest))
    batches = make_batches(steps, m, seed=7)
    for k in range(steps):
        state, metrics = step(state, jax.tree.map(lambda b: b[k], batches))
    # the same model and optimizer through the trainer, on the split parameters
    w0, b0 = np.asarray(model.kernel[...]), np.asarray(model.bias[...])
    loss = lambda p, batch: jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(0.1, momentum=0.9), loss)
    expected, _ = trainer.run(trainer.init({"w": w0[:, 0], "b": b0[0]}), batches, steps)
    got = state.workers[0][0]  # the workers' nnx Params (the first of each pair), of the model (graph node 0)
    np.testing.assert_allclose(np.asarray(got["kernel"][...])[:, :, 0], np.asarray(expected.params["w"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["bias"][...])[:, 0], np.asarray(expected.params["b"]),
                               rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused():
    batches = make_batches(1, 4)
    with pytest.raises(ValueError, match="adaptive period"):
        wrap(coopsgd.Algorithm(coopsgd.mixing.averaging(4), tau=coopsgd.adacomm(4, interval=10.0)))
    with pytest.raises(ValueError, match="changes the gradients"):
        wrap(coopsgd.gradient_tracking(nx.cycle_graph(4)))
    with pytest.raises(ValueError, match="train_step must be callable"):
        coopsgd.cooperative_step(coopsgd.local_sgd(4, 2), "step")
    init, step = wrap(coopsgd.local_sgd(4, 2))
    state = init((INIT, TX.init(INIT)))
    with pytest.raises(ValueError, match=r"batch\['x'\] has leading axis 3 but there are m = 4 workers"):
        step(state, {"x": batches["x"][0, :3], "y": batches["y"][0, :3]})
    bare = coopsgd.cooperative_step(coopsgd.local_sgd(4, 2), train_step)  # default getter: .params
    with pytest.raises(ValueError, match="params= and with_params="):
        bare.init((INIT, TX.init(INIT)))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (forced) devices")
@pytest.mark.parametrize("name", ["local_sgd", "dpsgd"])
def test_workers_placed_on_a_mesh_stay_there(name):
    """Workers placed over a 4-device "workers" axis: the same models as on one device, and the
    layout kept after mixings (an average that GSPMD would otherwise leave replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec

    m, steps = 4, 4
    algo = coopsgd.local_sgd(m, 2) if name == "local_sgd" else coopsgd.dpsgd(nx.cycle_graph(m))
    mesh = jax.make_mesh((m,), ("workers",), devices=jax.devices()[:m], axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, PartitionSpec("workers"))
    init, step = wrap(algo)
    plain = init((INIT, TX.init(INIT)))
    placed = plain._replace(workers=jax.device_put(plain.workers, split))
    batches = make_batches(steps, m, seed=8)
    for k in range(steps):
        batch = jax.tree.map(lambda b: b[k], batches)
        plain, _ = step(plain, batch)
        placed, _ = step(placed, jax.device_put(batch, split))
    assert placed.workers[0]["w"].sharding.spec == PartitionSpec("workers")
    np.testing.assert_allclose(np.asarray(placed.workers[0]["w"]), np.asarray(plain.workers[0]["w"]), rtol=1e-6)
