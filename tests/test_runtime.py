"""Runtime model: per-iteration times derived by hand for sync, periodic and overlapped mixing."""

import networkx as nx
import numpy as np
import pytest
from conftest import traffic_of

import coopsgd
from coopsgd.sim import runtime as rt


def _fixed(table):
    """Compute times read from a table: step k, worker i -> table[k][i]."""
    table = np.asarray(table, float)
    calls = []

    def sampler(rng, shape):
        k = len(calls)
        calls.append(k)
        return table[k % len(table)]

    return rt.custom(sampler)


class TestTimes:
    def test_sync_waits_for_slowest_then_communicates(self):
        model = rt.RuntimeModel(rt.constant(1.0), rt.constant_delay(2.0))
        # tau = 1: every iteration costs max_i Y + D = 1 + 2.
        sync = coopsgd.fully_sync(4)
        np.testing.assert_allclose(model.timeline(sync, 3, traffic_of(sync, 100)), [3, 6, 9])

    def test_local_sgd_period(self):
        model = rt.RuntimeModel(rt.constant(1.0), rt.constant_delay(2.0))
        # tau = 3: steps 1, 2, then 3 + D = 5; next round 6, 7, 10; a last partial round ends at 11.
        local = coopsgd.local_sgd(4, 3)
        np.testing.assert_allclose(model.timeline(local, 7, traffic_of(local, 100)), [1, 2, 5, 6, 7, 10, 11])

    def test_slowest_tau_step_sum_smooths_stragglers(self):
        # Worker 0 is slow at step 0, worker 1 at step 1: sync pays 3 + 3, tau = 2 pays max(4, 4) = 4.
        table = [[3.0, 1.0], [1.0, 3.0]]
        sync = rt.RuntimeModel(_fixed(table), rt.constant_delay(0.0))
        algo = coopsgd.fully_sync(2)
        assert sync.timeline(algo, 2, traffic_of(algo, 1))[-1] == pytest.approx(6.0)
        local = rt.RuntimeModel(_fixed(table), rt.constant_delay(0.0))
        algo = coopsgd.local_sgd(2, 2)
        np.testing.assert_allclose(local.timeline(algo, 2, traffic_of(algo, 1)), [3.0, 4.0])

    def test_overlap_hides_communication(self):
        model = rt.RuntimeModel(rt.constant(1.0), rt.constant_delay(2.0))
        algo = coopsgd.overlap_local_sgd(4, 2, 0.5)
        # D = 2 equals a round's compute (tau = 2): fully hidden.
        np.testing.assert_allclose(model.timeline(algo, 6, traffic_of(algo, 100), overlap=True), [1, 2, 3, 4, 5, 6])
        # D = 3: round 1 waits for round 0's message (2 + 3 = 5), round 2 for round 1's (5 + 3 = 8).
        slow = rt.RuntimeModel(rt.constant(1.0), rt.constant_delay(3.0))
        np.testing.assert_allclose(slow.timeline(algo, 6, traffic_of(algo, 100), overlap=True), [1, 2, 3, 5, 6, 8])

    def test_speedup_formula(self):
        # Constant Y, ratio r = D/Y: local SGD over sync is (1 + r)/(1 + r/tau) (AdaComm, §3).
        r, tau, steps = 4.0, 8, 64
        model = rt.RuntimeModel(rt.constant(1.0), rt.constant_delay(r))
        sync, local = coopsgd.fully_sync(4), coopsgd.local_sgd(4, tau)
        t_sync = model.timeline(sync, steps, traffic_of(sync, 1))[-1]
        t_local = model.timeline(local, steps, traffic_of(local, 1))[-1]
        assert t_sync / t_local == pytest.approx((1 + r) / (1 + r / tau))

    def test_resumed_clock_matches(self):
        model = rt.RuntimeModel(rt.shifted_exponential(1.0, 0.5), rt.random_delay(2.0), seed=7)
        algo = coopsgd.local_sgd(3, 2)
        full = model.timeline(algo, 8, traffic_of(algo, 10))
        clock = model.clock(3)
        first = [clock.round(k, 2, coopsgd.mixing_traffic(algo.W, 10), round_index=k // 2) for k in (0, 2)]
        state = clock.state()
        again = model.clock(3)
        again.restore(state)
        rest = [again.round(k, 2, coopsgd.mixing_traffic(algo.W, 10), round_index=k // 2) for k in (4, 6)]
        np.testing.assert_array_equal(np.concatenate(first + rest), full)

    def test_distributions_are_seeded(self):
        a = rt.RuntimeModel(rt.exponential(2.0), seed=1).step_times(0, 5, 3)
        b = rt.RuntimeModel(rt.exponential(2.0), seed=1).step_times(0, 5, 3)
        c = rt.RuntimeModel(rt.exponential(2.0), seed=2).step_times(0, 5, 3)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        big = rt.RuntimeModel(rt.shifted_exponential(1.0, 0.5), seed=0).step_times(0, 4000, 2)
        assert big.min() >= 1.0 and big.mean() == pytest.approx(1.5, rel=0.05)

    def test_stragglers(self):
        y = rt.RuntimeModel(rt.with_stragglers(rt.constant(1.0), 0.25, 10.0)).step_times(0, 4000, 2)
        assert set(np.unique(y)) == {1.0, 10.0}
        assert np.mean(y == 10.0) == pytest.approx(0.25, abs=0.03)


class TestTraffic:
    def test_allreduce_ring(self):
        t = coopsgd.mixing_traffic(np.full((8, 8), 1 / 8), 1000.0)
        assert t.kind == "all-reduce" and t.messages == 14
        assert t.bytes_per_worker == pytest.approx(2 * 7 / 8 * 1000) and t.total_bytes == 14000

    def test_easgd_anchor_is_one_all_reduce_over_the_workers(self):
        # the anchor gathers Σ x_i: one ring all-reduce among the m = 8 workers (not n = 9 nodes),
        # the same account the engine gives for the run
        t = coopsgd.mixing_traffic(coopsgd.easgd(8).W, 100.0, v=1)
        assert (t.kind, t.messages) == ("all-reduce", 14)
        assert t.bytes_per_worker == pytest.approx(2 * 7 / 8 * 100) and t.total_bytes == pytest.approx(1400)

    def test_neighbour_ring_and_identity(self):
        w = coopsgd.dpsgd(nx.cycle_graph(8)).W
        t = coopsgd.mixing_traffic(w, 10.0)
        assert (t.kind, t.messages, t.bytes_per_worker, t.total_bytes) == ("neighbour", 2, 20.0, 160.0)
        assert coopsgd.mixing_traffic(np.eye(5), 10.0).kind == "none"

    def test_network_delay_alpha_beta(self):
        w = np.full((4, 4), 0.25)
        model = rt.RuntimeModel(rt.constant(1.0), rt.network(latency=0.5, bandwidth=100.0))
        # 2(n-1) = 6 messages * 0.5 + 2*3/4*200 bytes / 100 B/s = 3 + 3 = 6.
        assert model.comm_time(0, coopsgd.mixing_traffic(w, 200.0)) == pytest.approx(6.0)


class TestEngineTraffic:
    def test_traffic_from_engine_communication(self):
        import optax

        from coopsgd import CooperativeSGD

        tr = CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(0.1), lambda p, b: 0.0)
        t = tr.communication(1000.0)
        # Ring all-reduce: 2 (m-1)/m P per worker, 2 (m-1) messages, 2 (m-1) P in all.
        assert (t.kind, t.messages, t.bytes_per_worker, t.total_bytes) == ("all-reduce", 6, 1500.0, 6000.0)
        ring = CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(6)), optax.sgd(0.1), lambda p, b: 0.0)
        t = ring.communication(10.0)
        assert (t.kind, t.messages, t.bytes_per_worker, t.total_bytes) == ("neighbour", 2, 20.0, 120.0)


class TestErrors:
    @pytest.mark.parametrize(
        "make, match",
        [
            (lambda: rt.constant(0.0), "compute time must be finite and > 0"),
            (lambda: rt.exponential(-1), "mean compute time"),
            (lambda: rt.with_stragglers(rt.constant(1.0), 1.5, 2.0), "probability"),
            (lambda: rt.with_stragglers(rt.constant(1.0), 0.1, 0.5), "slowdown must be >= 1"),
            (lambda: rt.network(0.1, 0.0), "bandwidth"),
            (lambda: rt.constant_delay(-1.0), "communication delay"),
        ],
    )
    def test_bad_values(self, make, match):
        with pytest.raises(ValueError, match=match):
            make()


def test_docstring_examples():
    import doctest

    from coopsgd.app import data

    for module in (rt, data):
        assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


class TestScaling:
    """coopsgd.sim.scaling: the runtime model's arithmetic on paper, against a real simulated run."""

    def test_by_hand(self):
        from coopsgd.core.communication import Communication
        from coopsgd.sim import scaling

        ring = Communication("all-reduce", 1.75e6, 14, 1, 0, 8)
        assert scaling.comm_seconds(ring, 1e-5, 1e9) == pytest.approx(14e-5 + 1.75e-3)
        assert scaling.round_seconds(ring, 4, 0.01, latency=1e-5, bandwidth=1e9) == pytest.approx(0.04 + 0.00189)
        # overlapped: max(tau Y, D); D = 0.00189 < 0.04 is hidden, a slow link is not
        assert scaling.round_seconds(ring, 4, 0.01, latency=1e-5, bandwidth=1e9, overlap=True) == pytest.approx(0.04)
        assert scaling.round_seconds(ring, 1, 0.001, latency=0, bandwidth=1e8, overlap=True) == pytest.approx(0.0175)
        assert scaling.run_seconds(3, ring, 4, 0.01, latency=0, bandwidth=1e8, overlap=True) == pytest.approx(
            0.04 + 2 * 0.04)
        # 6 N T / (F u): 1e9 params, 16 384 tokens, 989 TFLOP/s at 40 %
        assert scaling.transformer_step_seconds(1e9, 16384, 989e12, 0.4) == pytest.approx(
            6 * 1e9 * 16384 / (989e12 * 0.4))
        p = scaling.predict(ring, 4, 0.01, latency=1e-5, bandwidth=1e9, steps_to_target=10)
        assert p.seconds_to_target == pytest.approx(3 * (0.04 + 0.00189))  # ceil(10 / 4) rounds

    def test_bad_input(self):
        from coopsgd.core.communication import NONE
        from coopsgd.sim import scaling

        with pytest.raises(ValueError, match="tau"):
            scaling.round_seconds(NONE, 0, 1.0, latency=0, bandwidth=1)
        with pytest.raises(ValueError, match="bandwidth"):
            scaling.comm_seconds(NONE, 0.0, 0.0)
        with pytest.raises(ValueError, match="utilization"):
            scaling.transformer_step_seconds(1e6, 1, 1e12, 1.5)
        with pytest.raises(ValueError, match="Communication"):
            scaling.comm_seconds({"bytes": 1}, 0.0, 1.0)

    @pytest.mark.parametrize("m,algo,overlap", [
        (8, "local", False), (16, "ring", False), (8, "overlap", True), (16, "sync", False)])
    def test_prediction_is_the_clock_of_a_real_run(self, m, algo, overlap):
        import jax.numpy as jnp
        import optax

        from coopsgd import topology
        from coopsgd.sim import scaling

        algos = {"local": coopsgd.local_sgd(m, 4), "sync": coopsgd.fully_sync(m),
                 "ring": coopsgd.decentralized_periodic(topology.by_name("ring", m), 2),
                 "overlap": coopsgd.overlap_local_sgd(m, 2, 0.6)}
        a = algos[algo]
        tau = {"local": 4, "sync": 1, "ring": 2, "overlap": 2}[algo]
        steps, param_bytes, y, lat, bw = 16, 4e6, 0.05, 2e-5, 1e9
        trainer = coopsgd.CooperativeSGD(a, optax.sgd(0.1), lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2))
        clock = rt.RuntimeModel(rt.constant(y), rt.network(lat, bw)).clock(m)

        def hook(end):
            traffic = end.trainer.communication(param_bytes, end.round) if end.mixed else None
            clock.round(end.start, end.step - end.start, traffic, overlap=overlap, round_index=end.round)

        batches = {"x": np.ones((steps, m, 2, 3), np.float32)}
        trainer.run(trainer.init({"w": jnp.zeros(3)}), batches, steps, hooks=[hook])
        predicted = scaling.run_seconds(steps // tau, trainer.communication(param_bytes), tau, y, latency=lat,
                                        bandwidth=bw, overlap=overlap)
        assert clock.time == pytest.approx(predicted, rel=1e-12)
        if overlap:  # D = 2·7/8·4e6/1e9 + 14·2e-5 = 7.3 ms, hidden behind 2 steps of 50 ms
            assert predicted == pytest.approx(steps * y)
        else:  # the mixings cost something
            assert predicted > steps * y
