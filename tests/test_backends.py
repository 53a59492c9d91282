"""simulate = pmap = shard_map on 8 forced host devices, and the communication in the compiled HLO.

``tests/conftest.py`` forces 8 CPU devices before jax is imported.
"""
import re

import jax
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import INIT, RandomMatchings, loss_fn, make_batches

import coopsgd
from coopsgd import schedules
from coopsgd.parallel import backends
from coopsgd.parallel import plan as plans
from coopsgd.parallel.collectives import exchange_tables

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")

DEVICE_BACKENDS = ["pmap", "shard_map"]


def collectives(text: str) -> dict[str, int]:
    """Count collective ops in compiled HLO text (sync and async '-start' forms)."""
    names = ["all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"]
    return {k: len(re.findall(rf"\b{k}(-start)?\(", text)) for k in names}


def run_on(backend, algo, batches, steps, optimizer=None, **kw):
    t = coopsgd.CooperativeSGD(algo, optimizer or optax.sgd(0.1), loss_fn, backend=backend, **kw)
    state, metrics = t.run(t.init(INIT, seed=3), batches, steps)
    cols = t.columns(state)
    return t, state, metrics, jax.tree.map(np.asarray, cols)


ALGOS = {
    "local_sgd_m16": lambda: coopsgd.local_sgd(16, 2),  # two workers per device
    "easgd_m8": lambda: coopsgd.easgd(8, tau=2),  # anchor replicated on every device
    "ring_dpsgd_m16": lambda: coopsgd.dpsgd(nx.cycle_graph(16)),
    "ring_dpsgd_m8": lambda: coopsgd.dpsgd(nx.cycle_graph(8)),  # one worker per device: bare ppermutes
    "overlap_m16": lambda: coopsgd.overlap_local_sgd(16, 2, 0.5),
    "cyclic_exponential_m16": lambda: coopsgd.Algorithm(schedules.one_peer_exponential(16), tau=2),
    "random_matchings_m16": lambda: coopsgd.Algorithm(RandomMatchings(16, seed=1), tau=1),
    "dense_star_m8": lambda: coopsgd.dpsgd(nx.star_graph(7)),
    # Non-circulant sparse W: permutation slots whose exchange tables differ from device to device.
    "torus_dpsgd_m16": lambda: coopsgd.dpsgd(nx.grid_2d_graph(4, 4, periodic=True)),
    # Mixers beyond linear gossip, two workers per device.
    "choco_top_k_torus_m16": lambda: coopsgd.choco_sgd(nx.grid_2d_graph(4, 4, periodic=True), 0.5,
                                                       coopsgd.compression.top_k(0.34)),
    "choco_random_k_ring_m16": lambda: coopsgd.choco_sgd(nx.cycle_graph(16), 0.7, coopsgd.compression.random_k(0.5)),
    "choco_qsgd_star_m8": lambda: coopsgd.choco_sgd(nx.star_graph(7), 0.5, coopsgd.compression.qsgd(4)),
    "push_sum_exponential_m16": lambda: coopsgd.push_sum(coopsgd.topology.one_peer_exponential_digraphs(16)),
    "gradient_tracking_ring_m16": lambda: coopsgd.gradient_tracking(nx.cycle_graph(16)),
    "diloco_m16": lambda: coopsgd.diloco(16, 2),
    "streaming_diloco_m16": lambda: coopsgd.streaming_diloco(16, 4, fragments=2, alpha=0.25),
}


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_backends_agree(name):
    algo = ALGOS[name]()
    steps = 5
    batches = make_batches(steps, algo.m, seed=21)
    _, s_ref, m_ref, c_ref = run_on("simulate", algo, batches, steps, track_consensus=True)
    for backend in DEVICE_BACKENDS:
        t, s, met, cols = run_on(backend, algo, batches, steps, track_consensus=True)
        for key in ("w", "b"):
            np.testing.assert_allclose(cols[key], c_ref[key], rtol=2e-5, atol=2e-6, err_msg=backend)
        np.testing.assert_allclose(met.losses, m_ref.losses, rtol=2e-5, atol=2e-6, err_msg=backend)
        np.testing.assert_allclose(met.consensus, m_ref.consensus, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(met.communicated, m_ref.communicated)
        np.testing.assert_allclose(t.average(s)["w"], c_ref["w"].mean(0), rtol=2e-5, atol=2e-6)
        assert int(s.step) == steps


@pytest.mark.parametrize("sync", ["average", "reset"])  # "keep", the default, is tested above
def test_backends_agree_with_adam(sync):
    algo = coopsgd.local_sgd(16, 2)
    steps = 4
    batches = make_batches(steps, algo.m, seed=22)
    opt = optax.adam(0.05)
    _, _, _, ref = run_on("simulate", algo, batches, steps, opt, sync_optimizer_state=sync)
    for backend in DEVICE_BACKENDS:
        _, _, _, cols = run_on(backend, algo, batches, steps, opt, sync_optimizer_state=sync)
        np.testing.assert_allclose(cols["w"], ref["w"], rtol=2e-5, atol=2e-6, err_msg=backend)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_step_by_step_equals_simulate(backend):
    algo = coopsgd.easgd(8, tau=2)
    batches = make_batches(3, 8, seed=23)
    ref = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss_fn)
    dev = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss_fn, backend=backend)
    s_ref, s_dev = ref.init(INIT), dev.init(INIT)
    for k in range(3):
        batch = jax.tree.map(lambda x: x[k], batches)
        s_ref, m_ref = ref.step(s_ref, batch)
        s_dev, m_dev = dev.step(s_dev, batch)
        assert bool(m_ref.communicated) == bool(m_dev.communicated) == (k == 1)
    np.testing.assert_allclose(dev.columns(s_dev)["w"], ref.columns(s_ref)["w"], rtol=2e-5, atol=2e-6)


def test_shard_map_state_is_sharded_over_workers():
    algo = coopsgd.local_sgd(16, 2)
    t = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss_fn, backend="shard_map")
    state = t.init(INIT)
    w = state.params["w"]
    assert w.shape == (16, 3)  # the m workers, in order
    assert len(w.addressable_shards) == 8
    assert {s.data.shape for s in w.addressable_shards} == {(2, 3)}


def test_m_not_multiple_of_devices():
    with pytest.raises(ValueError, match=r"m = 12 .* 8 devices.*m = 8, 16"):
        coopsgd.CooperativeSGD(coopsgd.local_sgd(12, 2), optax.sgd(0.1), loss_fn, backend="pmap")
    with pytest.raises(ValueError, match=r"m = 4 .* 8 devices.*m = 8"):
        coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(0.1), loss_fn, backend="shard_map")


def test_exchange_tables_ring_two_per_device():
    # Shift by +1 over 16 workers, 2 per device: one local row (delta 0) and one row from the
    # next device (delta 1, i.e. one ppermute).
    perm = [(j + 1) % 16 for j in range(16)]
    tables = exchange_tables(tuple(perm), 8, 2)
    assert [t[0] for t in tables] == [0, 1]
    delta0, delta1 = tables
    assert delta0[1].tolist() == [[1]] * 8 and delta0[2].tolist() == [[0]] * 8
    assert delta1[1].tolist() == [[0]] * 8 and delta1[2].tolist() == [[1]] * 8


class TestCompiledCommunication:
    """The compiled program shows the communication W's structure picks (design.md)."""

    def hlo(self, backend, algo, mixes=True):
        t = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss_fn, backend=backend,
                                   track_consensus=False)
        state = t.init(INIT)
        batch = jax.tree.map(lambda x: x[0], make_batches(1, algo.m))
        return collectives(t.lower_step(state, batch, mixes=mixes).compile().as_text())

    @pytest.mark.parametrize("backend", DEVICE_BACKENDS)
    def test_local_sgd_sync_is_one_all_reduce(self, backend):
        ops = self.hlo(backend, coopsgd.local_sgd(8, 4))
        assert ops["all-reduce"] == 1 and ops["all-gather"] == 0 and ops["collective-permute"] == 0

    @pytest.mark.parametrize("backend", DEVICE_BACKENDS)
    def test_local_step_communicates_nothing(self, backend):
        ops = self.hlo(backend, coopsgd.local_sgd(8, 4), mixes=False)
        assert sum(ops.values()) == 0

    @pytest.mark.parametrize("backend", DEVICE_BACKENDS)
    @pytest.mark.parametrize("m", [8, 16])
    def test_ring_dpsgd_is_collective_permutes(self, backend, m):
        ops = self.hlo(backend, coopsgd.dpsgd(nx.cycle_graph(m)))
        assert ops["collective-permute"] == 2  # one per neighbour slot (left, right)
        assert ops["all-reduce"] == 0 and ops["all-gather"] == 0

    def test_torus_is_collective_permutes_only(self):
        algo = coopsgd.dpsgd(nx.grid_2d_graph(4, 4, periodic=True))
        ops = self.hlo("shard_map", algo)
        plan = plans.plan_for_matrix(algo.W, 16)
        # One ppermute per (slot, non-zero device offset some worker receives from): worker j
        # lives on device j // 2 and takes slot s's model from worker perm[j].
        expected = sum(len({(perm[j] // 2 - j // 2) % 8 for j in range(16)} - {0}) for perm in plan.slots)
        assert ops["collective-permute"] == expected >= 4
        assert ops["all-reduce"] == 0 and ops["all-gather"] == 0

    def test_dense_w_is_all_gather(self):
        ops = self.hlo("shard_map", coopsgd.dpsgd(nx.star_graph(7)))
        assert ops["all-gather"] == 1 and ops["collective-permute"] == 0

    def test_easgd_is_one_all_reduce(self):
        ops = self.hlo("shard_map", coopsgd.easgd(8))
        assert ops["all-reduce"] == 1 and ops["all-gather"] == 0

    def test_simulate_has_no_collectives(self):
        ops = self.hlo("simulate", coopsgd.dpsgd(nx.cycle_graph(8)))
        assert sum(ops.values()) == 0

    def test_consensus_metric_costs_all_reduces(self):
        t = coopsgd.CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(8)), optax.sgd(0.1), loss_fn,
                                   backend="shard_map", track_consensus=True)
        batch = jax.tree.map(lambda x: x[0], make_batches(1, 8))
        ops = collectives(t.lower_step(t.init(INIT), batch).compile().as_text())
        assert ops["all-reduce"] >= 1 and ops["collective-permute"] == 2


def test_make_backend_names():
    assert backends.make_backend("simulate", 4).num_devices == 1
    assert backends.make_backend("shard_map", 16).m_local == 2
    with pytest.raises(ValueError, match="'tpu'"):
        backends.make_backend("tpu", 4)


def test_rng_and_aux_agree_across_backends():
    # Per-worker keys are fold_in(fold_in(key, step), global worker index) on every layout, so a
    # loss that draws gradient noise gives the same run everywhere.
    def noisy(params, batch, key):
        noise = jax.random.normal(key, params["w"].shape)
        return loss_fn(params, batch) + 0.1 * noise @ params["w"], {"n0": noise[0]}

    algo = coopsgd.dpsgd(nx.cycle_graph(16))
    batches = make_batches(3, 16, seed=24)
    out = {}
    for backend in ["simulate", *DEVICE_BACKENDS]:
        t = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), noisy, backend=backend, has_aux=True,
                                   with_rng=True)
        state, met = t.run(t.init(INIT, seed=9), batches, 3)
        out[backend] = (np.asarray(t.columns(state)["w"]), np.asarray(met.aux["n0"]))
    for backend in DEVICE_BACKENDS:
        np.testing.assert_allclose(out[backend][0], out["simulate"][0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(out[backend][1], out["simulate"][1], rtol=1e-6)
    assert out["simulate"][1].shape == (3, 16)


def test_random_schedule_sends_only_active_matchings():
    # A random schedule that names its matchings (as MATCHA does) gets them as slots; on devices
    # each round's program carries only the active ones (cached per activation pattern).
    sched = RandomMatchings(16, seed=5)
    algo = coopsgd.Algorithm(sched, tau=1)
    t = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss_fn, backend="shard_map",
                               track_consensus=False)
    batch = jax.tree.map(lambda x: x[0], make_batches(1, 16))
    state = t.init(INIT)
    seen = {}
    for r in range(40):
        key = len(t.plan(r).slots)
        if key not in seen:
            seen[key] = r
    assert set(seen) == {0, 1, 2}
    for count, r in seen.items():
        plan = t.plan(r)
        ops = collectives(t.lower_step(state, batch, r=r).compile().as_text())
        # Two workers per device: matching {(0,1), (2,3), …} stays inside the devices (no
        # ppermute); matching {(1,2), …, (15,0)} crosses to both neighbouring devices (two).
        expected = 2 if any(perm[1] == 2 for perm in plan.slots) else 0
        assert ops["collective-permute"] == expected and ops["all-reduce"] == 0
        assert t.mix_round(r).moves == (count > 0)
        assert t.communication(100.0, r).neighbour_slots == count


@pytest.mark.parametrize("name", ["ring_dpsgd_m8", "ring_dpsgd_m16", "easgd_m8", "torus_dpsgd_m16"])
def test_large_leaves_travel_alone(name, monkeypatch):
    """Leaves of PACK_BELOW entries or more are exchanged one by one, the rest packed: with the
    limit at 2, ``w`` (3 entries) travels alone and ``b`` packed; the numbers agree with simulate."""
    from coopsgd.parallel import linear, programs

    algo = ALGOS[name]()
    steps = 4
    batches = make_batches(steps, algo.m, seed=22)
    _, _, m_ref, c_ref = run_on("simulate", algo, batches, steps)
    monkeypatch.setattr(linear, "PACK_BELOW", 2)
    programs.clear()  # programs compiled with the default limit must not be reused
    try:
        for backend in DEVICE_BACKENDS:
            _, _, met, cols = run_on(backend, algo, batches, steps)
            for key in ("w", "b"):
                np.testing.assert_allclose(cols[key], c_ref[key], rtol=2e-5, atol=2e-6, err_msg=backend)
            np.testing.assert_allclose(met.losses, m_ref.losses, rtol=2e-5, atol=2e-6, err_msg=backend)
    finally:
        programs.clear()
