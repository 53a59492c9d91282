"""The engine's fast paths keep its numbers: the worker-axis sum in every form it picks, the
consensus distance, programs shared by trainers of one configuration, and one program per round
shape for a run of any length (the last, shorter call padded). Nothing here measures time."""

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import INIT, LR, loss_fn, make_batches

import coopsgd
from coopsgd.parallel import collectives, programs
from coopsgd.parallel.collectives import WorkerAxis, leading_sum

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """The XLA compilations since the fixture was set up (a list that grows)."""
    seen = []

    def listener(name, secs, **kw):
        if name == COMPILE_EVENT:
            seen.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


# ------------------------------------------------------------------------------ leading_sum

# Every branch: rows one by one (n ≤ 16), a matvec (long rows), pairwise halving (odd sizes too).
SHAPES = [(1, 5), (3, 2, 3), (8, 33), (16, 7), (17, 4096), (40, 3, 2048), (33, 10), (64, 3), (1000, 3), (257, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_leading_sum_equals_numpy(shape):
    x = np.random.default_rng(len(shape) + shape[0]).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(leading_sum)(x))
    assert got.shape == shape[1:] and got.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5 * np.sqrt(shape[0]))
    kept = np.asarray(leading_sum(x, keepdims=True))
    assert kept.shape == (1,) + shape[1:]
    axis = WorkerAxis(shape[0])
    np.testing.assert_allclose(np.asarray(axis.mean(x)), np.asarray(jnp.mean(x, axis=0)), rtol=1e-5, atol=1e-6)


def test_leading_sum_other_dtypes():
    ints = np.arange(24, dtype=np.int32).reshape(4, 6)
    assert np.asarray(leading_sum(ints)).tolist() == ints.sum(0).tolist()
    half = jnp.asarray(np.linspace(-1, 1, 20 * 4096).reshape(20, 4096), jnp.bfloat16)
    got = leading_sum(half)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(half, np.float32).sum(0), atol=0.05)
    assert collectives.UNROLL >= 8  # the benchmarks' m = 8 adds its rows one by one


def test_consensus_equals_numpy_and_on_demand():
    m, steps = 5, 3
    batches = make_batches(steps, m, seed=7)
    t = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 4), optax.sgd(LR), loss_fn, track_consensus=True)
    state, metrics = t.run(t.init(INIT), batches, steps)
    w, b = np.asarray(state.params["w"], np.float64), np.asarray(state.params["b"], np.float64)
    cols = np.concatenate([w, b[:, None]], axis=1)
    expect = np.mean(np.sum((cols - cols.mean(0)) ** 2, axis=1))
    assert float(metrics.consensus[-1]) == pytest.approx(expect, rel=1e-5)
    assert float(t.consensus(state)) == pytest.approx(expect, rel=1e-5)
    np.testing.assert_allclose(np.asarray(t.average(state)["w"]), w.mean(0), rtol=1e-6)


def test_default_trainer_is_lean():
    t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), loss_fn)
    assert t.track_consensus is False
    _, metrics = t.run(t.init(INIT), make_batches(4, 4), 4)
    assert metrics.consensus is None


# ------------------------------------------------------------------------- shared programs


def test_fingerprint_is_by_value():
    f = programs.fingerprint
    assert f(optax.sgd(0.1)) == f(optax.sgd(0.1)) and hash(f(optax.sgd(0.1))) == hash(f(optax.sgd(0.1)))
    assert f(optax.adam(1e-3)) == f(optax.adam(1e-3))
    assert f(optax.sgd(0.1)) != f(optax.sgd(0.2))
    assert f(optax.sgd(0.1)) != f(optax.sgd(0.1, momentum=0.9))
    a, b = np.zeros(3), np.zeros(3)  # arrays count by identity: never wrongly equal
    assert f(lambda x: x + a) != f(lambda x: x + b)


SCALE = 1.0


def _scaled_loss(params, batch):  # reads the global SCALE at trace time
    return SCALE * loss_fn(params, batch)


def test_a_loss_whose_global_was_rebound_is_another_program(monkeypatch):
    batches = make_batches(4, 4, seed=2)

    def train():
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), _scaled_loss)
        return np.asarray(t.run(t.init(INIT), batches, 4)[0].params["w"])

    trained = train()
    assert not np.allclose(trained, INIT["w"])
    monkeypatch.setitem(globals(), "SCALE", 0.0)  # a zero loss: no gradient, nothing moves
    np.testing.assert_array_equal(train(), np.broadcast_to(INIT["w"], trained.shape))


def test_identical_trainers_check_their_loss_once():
    traces = []

    def counted(params, batch):
        traces.append(1)
        return loss_fn(params, batch)

    batches = make_batches(4, 4, seed=4)
    for expected in (2, 0):  # the check and the round's trace; then neither: both passed before
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), counted)
        traces.clear()
        t.run(t.init(INIT), batches, 4)
        assert len(traces) == expected


def test_a_failed_check_is_made_again():
    def vector_loss(params, batch):
        return batch["x"] @ params["w"] + params["b"]  # one value per example, not a scalar

    for _ in range(2):
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), vector_loss)
        with pytest.raises(ValueError, match="scalar loss"):
            t.run(t.init(INIT), make_batches(2, 4), 2)


def _fresh_loss(params, batch):  # a loss no other test uses: its programs are compiled here first
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean(jnp.abs(pred - batch["y"]) ** 2)


def test_identical_trainers_compile_once(compiles):
    m, steps = 4, 8
    batches = make_batches(steps, m, seed=5)
    results = []
    for _ in range(2):  # the algorithm and the optimizer built anew: an identical configuration
        t = coopsgd.CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(m)), optax.sgd(LR), _fresh_loss)
        before = len(compiles)
        state, _ = t.run(t.init(INIT), batches, steps)  # init compiles nothing new either
        results.append((len(compiles) - before, np.asarray(state.params["w"]), t))
    assert results[0][0] >= 1 and results[1][0] == 0
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert list(results[0][2]._programs.values()) == list(results[1][2]._programs.values())
    # Another learning rate is another program, with its own numbers.
    other = coopsgd.CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(m)), optax.sgd(2 * LR), _fresh_loss)
    before = len(compiles)
    s, _ = other.run(other.init(INIT), batches, steps)
    assert len(compiles) - before >= 1
    assert not np.allclose(np.asarray(s.params["w"]), results[0][1])


def _reference(algo, batches, steps, **kw):
    """The same run one round per compiled call (steps_per_call = τ)."""
    t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, steps_per_call=algo.period.constant_tau, **kw)
    return t.run(t.init(INIT), batches, steps)


@pytest.mark.parametrize("steps", [400, 102], ids=["400 steps", "102 steps"])
def test_a_run_of_any_length_uses_one_program_per_round_shape(steps, compiles):
    m, tau = 4, 4
    algo = coopsgd.local_sgd(m, tau)
    batches = make_batches(steps, m, seed=11)
    t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), _fresh_loss, steps_per_call=256)
    state = t.init(INIT)
    before = len(compiles)
    state, metrics = t.run(state, batches, steps)
    shapes = {k[:3] for k in t._programs}
    # 400 = 64 + 36 rounds: both calls run the 64-round program. 102 = 25 rounds + 2 steps.
    assert shapes == ({(64, 4, True)} if steps == 400 else {(25, 4, True), (1, 2, False)})
    assert len(compiles) - before == len(shapes)
    ref_t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), _fresh_loss, steps_per_call=tau)
    ref_state, ref = ref_t.run(ref_t.init(INIT), batches, steps)
    np.testing.assert_allclose(np.asarray(state.params["w"]), np.asarray(ref_state.params["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.losses), np.asarray(ref.losses), rtol=1e-6)
    assert np.asarray(metrics.loss).shape == (steps,)
    np.testing.assert_array_equal(np.asarray(metrics.communicated), np.asarray(ref.communicated))
    assert int(state.step) == steps and int(state.rounds) == steps // tau


def test_hook_spacing_sets_one_chunk(compiles):
    """Hooks every 10 steps at τ = 4: calls of 3, 2, 3, … rounds all run one 3-round program."""
    m, tau, steps = 4, 4, 60
    algo = coopsgd.local_sgd(m, tau)
    batches = make_batches(steps, m, seed=12)
    seen = []
    t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, track_consensus=True)
    state, metrics = t.run(t.init(INIT), batches, steps,
                           hooks=[coopsgd.Hook(lambda end: seen.append((end.start, end.step)), every=10)])
    assert {k[:3] for k in t._programs} == {(3, 4, True)}
    assert seen == [(0, 12), (12, 20), (20, 32), (32, 40), (40, 52), (52, 60)]
    ref_state, ref = _reference(algo, batches, steps, track_consensus=True)
    np.testing.assert_allclose(np.asarray(state.params["w"]), np.asarray(ref_state.params["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.consensus), np.asarray(ref.consensus), rtol=1e-5, atol=1e-9)


def test_padded_call_with_auxiliary_columns_and_sync():
    """EASGD (an auxiliary anchor) with Adam and sync "average": a 7-round run in a 4-round
    program (4 + 3, the second call padded) equals one round per call."""
    m, tau, steps = 4, 2, 14
    algo = coopsgd.easgd(m, tau=tau)
    batches = make_batches(steps, m, seed=13)
    a = coopsgd.CooperativeSGD(algo, optax.adam(0.05), loss_fn, sync_optimizer_state="average", steps_per_call=8)
    b = coopsgd.CooperativeSGD(algo, optax.adam(0.05), loss_fn, sync_optimizer_state="average", steps_per_call=2)
    sa, ma = a.run(a.init(INIT), batches, steps)
    sb, mb = b.run(b.init(INIT), batches, steps)
    assert {k[:3] for k in a._programs} == {(4, 2, True)}
    for x, y in zip(jax.tree.leaves(a.columns(sa)), jax.tree.leaves(b.columns(sb))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ma.losses), np.asarray(mb.losses), rtol=1e-6)
    assert int(sa.rounds) == 7 and int(sa.step) == steps
