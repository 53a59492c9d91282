"""The mixing protocol: a mixer with its own state, written here in the test, runs in the engine on
every backend, is checkpointed with it and appears in the communication account; a mixer that
breaks the protocol is reported by name; hooks, ``with_columns`` and the optimizer-state seam.

The test mixer is global momentum on the average, as SlowMo writes it with a unit outer step
(Wang, Tantia, Ballas & Rabbat, ICLR 2020, Algorithm 1): at every round end
``x̄ = (1/m) Σ_i x_i``, ``u ← β u + (x̄ − a)``, ``a ← a + u``, every worker restarts from ``a``;
each worker also keeps its last deviation ``x_i − x̄`` (per-worker state).
"""
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import INIT, LR, grad_np, loss_fn, make_batches

import coopsgd
from coopsgd.app import checkpoint as ckpt
from coopsgd.parallel.protocol import MixerError

BETA = 0.5


def momentum_mixer(m: int, beta: float = BETA) -> coopsgd.Mixer:
    """The test's own mixer (see the module docstring), written against the protocol only."""

    def init(columns):
        anchor = jax.tree.map(lambda x: jnp.asarray(x[0]), columns)
        return coopsgd.MixerState(
            per_worker=jax.tree.map(jnp.zeros_like, columns),
            shared={"anchor": anchor, "u": jax.tree.map(jnp.zeros_like, anchor)})

    def apply(columns, state, mix_round, axis):
        mean = jax.tree.map(axis.mean, columns)
        deviation = jax.tree.map(lambda x, c: x - c, columns, mean)
        u = jax.tree.map(lambda u, c, a: beta * u + (c - a), state.shared["u"], mean, state.shared["anchor"])
        anchor = jax.tree.map(lambda a, v: a + v, state.shared["anchor"], u)
        out = jax.tree.map(lambda x, a: jnp.broadcast_to(a, x.shape).astype(x.dtype), columns, anchor)
        return out, coopsgd.MixerState(per_worker=deviation, shared={"anchor": anchor, "u": u})

    averaging = coopsgd.mixing.averaging(m)
    return coopsgd.Mixer(init=init, apply=apply, name="test momentum",
                         traffic=lambda r, p: coopsgd.mixing_traffic(averaging, p))


def momentum_np(batches, steps, m, tau, beta=BETA):
    """The rule of the module docstring in float64 NumPy, with plain SGD between round ends."""
    w = np.tile(INIT["w"].astype(np.float64), (m, 1))
    b = np.full(m, float(INIT["b"]))
    anchor_w, anchor_b = w[0].copy(), b[0]
    u_w, u_b = np.zeros_like(anchor_w), 0.0
    dev = (np.zeros_like(w), np.zeros_like(b))
    for t in range(steps):
        for i in range(m):
            gw, gb = grad_np(w[i], b[i], batches["x"][t, i].astype(np.float64), batches["y"][t, i].astype(np.float64))
            w[i] -= LR * gw
            b[i] -= LR * gb
        if (t + 1) % tau == 0:
            mean_w, mean_b = w.mean(0), b.mean()
            dev = (w - mean_w, b - mean_b)
            u_w, u_b = beta * u_w + (mean_w - anchor_w), beta * u_b + (mean_b - anchor_b)
            anchor_w, anchor_b = anchor_w + u_w, anchor_b + u_b
            w, b = np.tile(anchor_w, (m, 1)), np.full(m, anchor_b)
    return w, b, anchor_w, dev


@pytest.mark.parametrize("backend", ["simulate", "pmap", "shard_map"])
def test_mixer_with_state_runs_the_rule_on_every_backend(backend):
    m, tau, steps = 8, 3, 9
    if jax.device_count() < 8 and backend != "simulate":
        pytest.skip("needs 8 (forced) devices")
    algo = coopsgd.local_sgd(m, tau)  # its period; the mixer replaces its W
    batches = make_batches(steps, m, seed=31)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, backend=backend, mixer=momentum_mixer(m))
    state, metrics = trainer.run(trainer.init(INIT), batches, steps)
    ew, eb, anchor, dev = momentum_np(batches, steps, m, tau)
    workers = trainer.workers(state)
    np.testing.assert_allclose(workers["w"], ew, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(workers["b"], eb, rtol=1e-5, atol=1e-5)
    shared = trainer.backend.shared(state.mix_state.shared)
    np.testing.assert_allclose(shared["anchor"]["w"], anchor, rtol=1e-5, atol=1e-5)
    per_worker = trainer.backend.workers(state.mix_state.per_worker)
    np.testing.assert_allclose(per_worker["w"], dev[0], rtol=1e-4, atol=1e-5)
    assert np.asarray(metrics.communicated).tolist() == [(k + 1) % tau == 0 for k in range(steps)]
    # the mixer's own account of its traffic: one all-reduce of the model per round
    assert trainer.communication(1000.0).kind == "all-reduce"
    assert trainer.communication(1000.0).bytes_per_worker == pytest.approx(2 * 7 / 8 * 1000)


def test_mixer_state_is_checkpointed_with_the_engine_state(tmp_path):
    m, tau = 4, 2
    algo = coopsgd.local_sgd(m, tau)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, mixer=momentum_mixer(m))
    batches = make_batches(8, m, seed=32)
    full, _ = trainer.run(trainer.init(INIT), batches, 8)
    half, _ = trainer.run(trainer.init(INIT), batches, 4)
    saver = ckpt.Checkpointer(tmp_path / "ck")
    saver.save(4, half, {})
    back, _ = saver.restore(trainer.init(INIT))
    saver.close()
    for a, b in zip(jax.tree.leaves(half.mix_state), jax.tree.leaves(back.mix_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed, _ = trainer.run(back, jax.tree.map(lambda x: x[4:], batches), 4)
    for a, b in zip(jax.tree.leaves((full.params, full.mix_state)), jax.tree.leaves((resumed.params, resumed.mix_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _broken(m, apply):
    averaging = coopsgd.mixing.averaging(m)
    return coopsgd.Mixer(init=lambda columns: coopsgd.MixerState(), apply=apply, name="broken one",
                         traffic=lambda r, p: coopsgd.mixing_traffic(averaging, p))


def test_mixer_that_changes_shapes_is_refused_naming_it():
    def drops_a_worker(columns, state, mix_round, axis):
        return jax.tree.map(lambda x: x[1:], columns), state

    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), loss_fn, mixer=_broken(4, drops_a_worker))
    with pytest.raises(MixerError, match=r"mixer 'broken one' returned columns\['b'\] with shape \(3,\)"):
        trainer.init(INIT)

    def wrong_return(columns, state, mix_round, axis):
        return columns

    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), loss_fn, mixer=_broken(4, wrong_return))
    with pytest.raises(ValueError, match="'broken one'.*must return \\(columns, MixerState\\)"):
        trainer.init(INIT)


def test_a_mixer_is_checked_once_per_configuration():
    traced = []

    def averages(columns, state, mix_round, axis):  # a correct mixer: every worker gets the mean
        traced.append(1)
        return jax.tree.map(lambda x: jnp.broadcast_to(axis.mean(x), x.shape), columns), state

    for expected in (1, 0):  # init traces the mixer for its check once; an identical trainer does not
        trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), loss_fn, mixer=_broken(4, averages))
        traced.clear()
        trainer.init(INIT)
        assert len(traced) == expected
    other = coopsgd.CooperativeSGD(coopsgd.local_sgd(8, 2), optax.sgd(LR), loss_fn, mixer=_broken(8, averages))
    other.init(INIT)  # another m: checked again
    assert len(traced) == 1


@pytest.mark.parametrize("track", [True, False])
def test_nonfinite_mixer_output_names_the_mixer(track):
    def poisons(columns, state, mix_round, axis):
        return jax.tree.map(lambda x: x * jnp.nan, columns), state

    m, tau = 4, 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(LR), loss_fn,
                                     mixer=_broken(m, poisons), track_consensus=track)
    with pytest.raises(coopsgd.NonFiniteError, match="mixing by 'broken one'") as err:
        trainer.run(trainer.init(INIT), make_batches(6, m), 6)
    assert err.value.step == (1 if track else 2)  # at the mixing, or the first step after it


def test_mixer_argument_is_checked():
    with pytest.raises(ValueError, match="mixer must be a coopsgd Mixer"):
        coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 1), optax.sgd(LR), loss_fn, mixer=lambda x: x)


# ------------------------------------------------------------------------------------ hooks


def test_hooks_run_between_rounds_and_can_stop():
    m, tau = 4, 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(LR), loss_fn)
    seen, every4 = [], []

    def each_round(end: coopsgd.RoundEnd):
        seen.append((end.start, end.step, end.round, end.mixed, len(end.metrics.loss)))

    def every_four(end):
        every4.append((end.start, end.step))
        return coopsgd.Stop() if end.step >= 8 else None

    state, metrics = trainer.run(trainer.init(INIT), make_batches(12, m), 12,
                                 hooks=[each_round, coopsgd.Hook(every_four, every=4)])
    assert seen == [(0, 2, 0, True, 2), (2, 4, 1, True, 2), (4, 6, 2, True, 2), (6, 8, 3, True, 2)]
    assert every4 == [(0, 4), (4, 8)]
    assert int(state.step) == 8 and len(metrics.loss) == 8  # stopped after the round ending at 8


def test_hooks_let_whole_rounds_fuse_between_calls():
    m, tau = 4, 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(LR), loss_fn)
    calls = []
    trainer.run(trainer.init(INIT), make_batches(13, m), 13, hooks=[coopsgd.Hook(lambda e: calls.append(e.step), 6)])
    assert calls == [6, 12, 13]  # at the first round end past each multiple of 6, and at the end
    assert {k[:2] for k in trainer._programs} == {(3, 2), (1, 1)}  # 3 rounds per call, then 1 step


def test_hook_returning_a_state_replaces_it_and_bad_returns_are_refused():
    m = 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 1), optax.sgd(LR), loss_fn)
    state0 = trainer.init(INIT)

    def reset(end):  # a hook that writes models back: every worker returns to INIT
        return trainer.with_columns(end.state, trainer.workers(state0))

    state, _ = trainer.run(state0, make_batches(3, m), 3, hooks=[reset])
    np.testing.assert_array_equal(np.asarray(trainer.workers(state)["w"]), np.tile(INIT["w"], (m, 1)))
    assert int(state.step) == 3
    with pytest.raises(ValueError, match="a hook returns None, an EngineState or Stop"):
        trainer.run(state0, make_batches(1, m), 1, hooks=[lambda end: 42])
    with pytest.raises(ValueError, match="Hook every must be an integer >= 1"):
        trainer.run(state0, make_batches(1, m), 1, hooks=[coopsgd.Hook(print, every=0)])


@pytest.mark.parametrize("backend", ["simulate", "pmap", "shard_map"])
def test_with_columns_in_every_layout(backend):
    if jax.device_count() < 8 and backend != "simulate":
        pytest.skip("needs 8 (forced) devices")
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(8, 2), optax.sgd(LR), loss_fn, backend=backend)
    state = trainer.init(INIT)
    new = {"w": np.arange(24, dtype=np.float32).reshape(8, 3), "b": np.arange(8, dtype=np.float32)}
    state = trainer.with_columns(state, new)
    np.testing.assert_array_equal(np.asarray(trainer.workers(state)["w"]), new["w"])
    state, _ = trainer.run(state, make_batches(1, 8), 1)  # and training goes on from them
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        trainer.with_columns(state, {"w": new["w"][:4], "b": new["b"][:4]})


def test_callable_batches_get_the_global_step():
    m = 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 2), optax.sgd(LR), loss_fn)
    asked = []
    batches = make_batches(6, m)

    def source(k):
        asked.append(k)
        return jax.tree.map(lambda x: x[k], batches)

    state = trainer.init(INIT)
    for _ in range(3):
        state, _ = trainer.run(state, source, 2)
    assert asked == [0, 1, 2, 3, 4, 5]  # a loop of runs keeps drawing new batches
    ref, _ = trainer.run(trainer.init(INIT), batches, 6)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(ref.params["w"]))


def test_optimizer_sync_is_a_seam():
    # A user policy at the same seam: zero each worker's momentum after every mixing that moved data.
    zero = coopsgd.OptimizerSync(lambda opt, columns, axis: jax.tree.map(jnp.zeros_like, opt), "zero")
    m, tau, steps = 2, 2, 4
    batches = make_batches(steps, m, seed=33)
    opt = optax.sgd(LR, momentum=0.9)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), opt, loss_fn, sync_optimizer_state=zero)
    state, _ = trainer.run(trainer.init(INIT), batches, steps)
    # by hand: heavy ball on each worker, models averaged and momentum zeroed every tau steps
    w = np.tile(INIT["w"].astype(np.float64), (m, 1))
    b = np.full(m, float(INIT["b"]))
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for t in range(steps):
        for i in range(m):
            gw, gb = grad_np(w[i], b[i], batches["x"][t, i].astype(np.float64), batches["y"][t, i].astype(np.float64))
            vw[i], vb[i] = 0.9 * vw[i] + gw, 0.9 * vb[i] + gb
            w[i] -= LR * vw[i]
            b[i] -= LR * vb[i]
        if (t + 1) % tau == 0:
            w, b = np.tile(w.mean(0), (m, 1)), np.full(m, b.mean())
            vw, vb = np.zeros_like(vw), np.zeros_like(vb)
    np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-5)


def test_pure_round_functions_inside_your_own_jit():
    # The pieces the trainer compiles, called from a user's own jitted step, give its numbers.
    from coopsgd.parallel import engine

    m, tau, steps = 4, 2, 6
    algo = coopsgd.decentralized_periodic(nx.cycle_graph(m), tau)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR, momentum=0.9), loss_fn)
    batches = make_batches(steps, m, seed=34)
    ref, _ = trainer.run(trainer.init(INIT), batches, steps)
    spec, axis, mixing = trainer.spec, coopsgd.WorkerAxis(m), trainer.mix_round(0)

    @jax.jit
    def my_step(x, o, s, k, key, batch, mixes):
        x, o, s, _, _, _ = engine.local_step(spec, axis, x, o, s, (), k, key, batch)
        mixed = engine.round_end(spec, axis, x, o, s, coopsgd.MixRound(mixing.static, mixing.args, mixing.moves),
                                 True)[:3]
        return jax.tree.map(lambda a, b: jnp.where(mixes, a, b), mixed, (x, o, s))

    state = trainer.init(INIT)
    x, o, s = state.params, state.opt_state, state.mix_state
    for k in range(steps):
        x, o, s = my_step(x, o, s, k, state.key, jax.tree.map(lambda b: b[k], batches), (k + 1) % tau == 0)
    np.testing.assert_allclose(np.asarray(x["w"]), np.asarray(ref.params["w"]), rtol=1e-6, atol=1e-7)


def test_a_stopped_run_still_gives_every_hook_its_last_call():
    m = 2
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 1), optax.sgd(LR), loss_fn)
    calls = []
    hooks = [coopsgd.Hook(lambda end: calls.append(("every 100", end.step)), every=100),
             lambda end: coopsgd.Stop() if end.step == 3 else None,
             coopsgd.Hook(lambda end: calls.append(("every 50", end.step)), every=50)]
    state, _ = trainer.run(trainer.init(INIT), make_batches(10, m), 10, hooks=hooks)
    assert int(state.step) == 3 and calls == [("every 100", 3), ("every 50", 3)]  # in their order


def test_with_columns_takes_the_n_columns_of_a_linear_w_with_an_anchor():
    trainer = coopsgd.CooperativeSGD(coopsgd.easgd(4), optax.sgd(LR), loss_fn)
    state = trainer.init(INIT)
    cols = {"w": np.arange(15, dtype=np.float32).reshape(5, 3), "b": np.arange(5, dtype=np.float32)}
    state = trainer.with_columns(state, cols)
    np.testing.assert_array_equal(np.asarray(trainer.columns(state)["w"]), cols["w"])
    np.testing.assert_array_equal(np.asarray(state.mix_state.shared["w"]), cols["w"][4:])  # the anchor
