"""The engine on the simulate backend, against update rules written out independently in NumPy.

Every reference here is the algorithm's own published rule (mini-batch SGD, local SGD, EASGD,
D-PSGD, decentralized periodic averaging, Overlap Local-SGD) in plain float64 NumPy; none of them
reads coopsgd's W.
"""
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import (
    D_IN,
    INIT,
    LR,
    B,
    RandomMatchings,
    grad_np,
    local_sgd_np,
    loss_fn,
    make_batches,
    run_engine,
)

import coopsgd
from coopsgd import schedules
from coopsgd.parallel import plan as plans


class TestMix:
    def test_hand_values(self):
        # new[j] = Σ_i W[i, j] old[i]: W[0, 1] = 1 sends node 0's value to node 1.
        w = np.array([[0.0, 1.0], [1.0, 0.0]])
        out = coopsgd.mix({"a": jnp.array([1.0, 2.0])}, w)
        assert out["a"].tolist() == [2.0, 1.0]
        w = np.array([[0.5, 0.0], [0.5, 1.0]])  # node 0 averages with node 1, node 1 keeps its own
        assert coopsgd.mix(jnp.array([[2.0], [4.0]]), w).tolist() == [[3.0], [4.0]]

    def test_matches_numpy_on_pytree(self):
        rng = np.random.default_rng(1)
        w = rng.random((5, 5))
        w /= w.sum(axis=0, keepdims=True)
        tree = {"a": rng.normal(size=(5, 2, 3)), "b": [rng.normal(size=(5,))]}
        tree32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
        out = coopsgd.mix(tree32, w)
        expect_a = np.einsum("ij,iab->jab", w, tree["a"])
        np.testing.assert_allclose(out["a"], expect_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["b"][0], w.T @ tree["b"][0], rtol=1e-5, atol=1e-6)
        assert out["a"].dtype == jnp.float32

    def test_jittable_and_rejects_bad_leading_axis(self):
        w = np.full((3, 3), 1 / 3)
        out = jax.jit(coopsgd.mix)(jnp.arange(3.0), w)
        np.testing.assert_allclose(out, [1.0, 1.0, 1.0], rtol=1e-6)
        with pytest.raises(ValueError, match="leading axis n = 3"):
            coopsgd.mix(jnp.zeros((4, 2)), w)


class TestPlans:
    def test_identity_is_none(self):
        plan = plans.plan_for_matrix(np.eye(4), 4)
        assert plan.kind == "none" and not plan.communicates

    def test_averaging_is_mean(self):
        plan = plans.plan_for_matrix(np.full((6, 6), 1 / 6), 6)
        assert plan.kind == "mean"
        coef = plans.coefficients(plan, np.full((6, 6), 1 / 6))
        np.testing.assert_allclose(coef["d"], 0.0, atol=1e-15)
        assert float(coef["c"]) == pytest.approx(1 / 6)

    def test_ring_is_two_shift_slots(self):
        w = coopsgd.mixing.metropolis(nx.cycle_graph(8))
        plan = plans.plan_for_matrix(w, 8)
        assert plan.kind == "neighbour"
        assert sorted(plan.shifts) == [1, 7]
        coef = plans.coefficients(plan, w)
        np.testing.assert_allclose(coef["slots"], 1 / 3)
        np.testing.assert_allclose(coef["d"], 1 / 3)

    def test_sparse_graphs_use_degree_many_slots(self):
        # A star on 8 nodes: the hub has 7 neighbours = m − 1 slots, no cheaper than dense.
        w = coopsgd.mixing.metropolis(nx.star_graph(7))
        assert plans.plan_for_matrix(w, 8).kind == "dense"
        # A 3 x 3 torus is 4-regular but not circulant in its numbering: 4 permutation slots (an
        # undirected matching decomposition would need Δ + 1 = 5, the graph having odd order).
        w = coopsgd.mixing.metropolis(nx.convert_node_labels_to_integers(
            nx.grid_2d_graph(3, 3, periodic=True)))
        plan = plans.plan_for_matrix(w, 9)
        assert plan.kind == "neighbour" and len(plan.slots) == 4 and plan.shifts == (None,) * 4
        # Every arc i → j of W lies in exactly one slot: rebuild W from the coefficients.
        coef = plans.coefficients(plan, w)
        rebuilt = np.diag(coef["d"])
        for s, perm in enumerate(plan.slots):
            for j, i in enumerate(perm):
                if i != j:
                    rebuilt[i, j] += coef["slots"][s, j]
        np.testing.assert_allclose(rebuilt, w, atol=1e-15)

    def test_easgd_is_local_plus_reduce(self):
        algo = coopsgd.easgd(4)
        plan = plans.plan_for_matrix(algo.W, 4, 1)
        assert plan.kind == "diag" and plan.worker_to_aux and plan.aux_to_worker

    def test_costs_hand_derived(self):
        p = 1000.0
        c = plans.communication(plans.plan_for_matrix(np.full((4, 4), 0.25), 4), p)
        assert c == coopsgd.Communication("all-reduce", 2 * 3 / 4 * p, 6, 1, 0, 4)
        ring = coopsgd.mixing.metropolis(nx.cycle_graph(8))
        c = plans.communication(plans.plan_for_matrix(ring, 8), p)
        assert (c.kind, c.bytes_per_worker, c.neighbour_slots, c.all_reduces) == ("neighbour", 2 * p, 2, 0)
        c = plans.communication(plans.plan_for_matrix(np.eye(3), 3), p)
        assert c.kind == "none" and c.bytes_per_worker == 0
        dense = coopsgd.mixing.metropolis(nx.star_graph(7))
        c = plans.communication(plans.plan_for_matrix(dense, 8), p)
        assert (c.kind, c.bytes_per_worker) == ("dense", 7 * p)

    def test_tree_bytes(self):
        params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float64)}
        assert plans.tree_bytes(params) == 3 * 4 * 4 + 2 * 8

    def test_trainer_communication(self):
        t = coopsgd.CooperativeSGD(coopsgd.easgd(4, tau=2), optax.sgd(0.1), loss_fn)
        c = t.communication(400.0)
        assert c.kind == "all-reduce" and c.all_reduces == 1
        assert c.bytes_per_worker == pytest.approx(2 * 3 / 4 * 400)


class TestEquivalences:
    def test_local_sgd_tau1_is_minibatch_sgd(self):
        m, steps = 4, 6
        batches = make_batches(steps, m)
        _, _, metrics, w, b = run_engine(coopsgd.local_sgd(m, 1), batches, steps, track_consensus=True)
        # Mini-batch SGD on the union of the workers' batches (m·B samples), by hand.
        ww, bb = INIT["w"].astype(np.float64), float(INIT["b"])
        for t in range(steps):
            x = batches["x"][t].reshape(m * B, D_IN).astype(np.float64)
            y = batches["y"][t].reshape(m * B).astype(np.float64)
            gw, gb = grad_np(ww, bb, x, y)
            ww, bb = ww - LR * gw, bb - LR * gb
        np.testing.assert_allclose(w, np.tile(ww, (m, 1)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, bb, rtol=1e-5, atol=1e-5)
        assert np.asarray(metrics.communicated).all()
        np.testing.assert_allclose(metrics.consensus, 0.0, atol=1e-10)

    def test_local_sgd_tau(self):
        m, tau, steps = 4, 3, 7
        batches = make_batches(steps, m, seed=2)
        _, state, metrics, w, b = run_engine(coopsgd.local_sgd(m, tau), batches, steps, track_consensus=True)

        def mix_np(t, w, b):  # after every τ-th step all workers take the average
            if (t + 1) % tau == 0:
                return np.tile(w.mean(0), (m, 1)), np.full(m, b.mean())
            return w, b

        ew, eb = local_sgd_np(batches, steps, m, 0, mix_np)
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)
        assert np.asarray(metrics.communicated).tolist() == [False, False, True] * 2 + [False]
        # Between syncs the workers differ; right after one they agree exactly.
        cons = np.asarray(metrics.consensus)
        assert cons[2] == 0.0 and cons[5] == 0.0 and cons[6] > 0.0 and cons[0] > 0.0
        assert int(state.step) == 7 and int(state.rounds) == 2

    def test_consensus_metric_by_hand(self):
        m = 3
        batches = make_batches(1, m, seed=3)
        _, _, metrics, w, b = run_engine(coopsgd.local_sgd(m, 5), batches, 1, track_consensus=True)
        cols = np.concatenate([w, b[:, None]], axis=1)
        expect = np.mean(np.sum((cols - cols.mean(0)) ** 2, axis=1))
        assert float(metrics.consensus[0]) == pytest.approx(expect, rel=1e-4)
        # Per-worker losses are at the pre-update model (all equal to INIT).
        for i in range(m):
            r = batches["x"][0, i] @ INIT["w"] + INIT["b"] - batches["y"][0, i]
            assert float(metrics.losses[0, i]) == pytest.approx(float(np.mean(r**2)), rel=1e-5)

    @pytest.mark.parametrize("tau", [1, 2])
    def test_easgd(self, tau):
        m, steps, alpha = 4, 6, 0.3
        batches = make_batches(steps, m, seed=4)
        _, _, _, w, b = run_engine(coopsgd.easgd(m, tau=tau, alpha=alpha), batches, steps)

        def mix_np(t, w, b):  # Zhang et al.: x_i ← x_i − α(x_i − z), z ← z + α Σ_i (x_i − z)
            if (t + 1) % tau:
                return w, b
            out_w, out_b = w.copy(), b.copy()
            out_w[:m] = w[:m] - alpha * (w[:m] - w[m])
            out_b[:m] = b[:m] - alpha * (b[:m] - b[m])
            out_w[m] = w[m] + alpha * np.sum(w[:m] - w[m], axis=0)
            out_b[m] = b[m] + alpha * np.sum(b[:m] - b[m])
            return out_w, out_b

        ew, eb = local_sgd_np(batches, steps, m, 1, mix_np)
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("tau", [1, 3])
    def test_ring_dpsgd_and_decentralized_periodic(self, tau):
        m, steps = 6, 6
        batches = make_batches(steps, m, seed=5)
        graph = nx.cycle_graph(m)
        algo = coopsgd.dpsgd(graph) if tau == 1 else coopsgd.decentralized_periodic(graph, tau)
        _, _, _, w, b = run_engine(algo, batches, steps)

        def mix_np(t, w, b):  # Lian et al.: average with both ring neighbours, weights 1/3
            if (t + 1) % tau:
                return w, b
            avg = lambda a: (np.roll(a, 1, axis=0) + a + np.roll(a, -1, axis=0)) / 3
            return avg(w), avg(b)

        ew, eb = local_sgd_np(batches, steps, m, 0, mix_np)
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)

    def test_overlap_local_sgd(self):
        m, tau, steps, alpha = 4, 2, 6, 0.4
        batches = make_batches(steps, m, seed=6)
        _, _, _, w, b = run_engine(coopsgd.overlap_local_sgd(m, tau, alpha), batches, steps)

        def mix_np(t, w, b):  # Wang, Liang & Joshi, Alg. 1: pull toward z, then z ← mean of pulled
            if (t + 1) % tau:
                return w, b
            out_w, out_b = w.copy(), b.copy()
            out_w[:m] = (1 - alpha) * w[:m] + alpha * w[m]
            out_b[:m] = (1 - alpha) * b[:m] + alpha * b[m]
            out_w[m], out_b[m] = out_w[:m].mean(0), out_b[:m].mean()
            return out_w, out_b

        ew, eb = local_sgd_np(batches, steps, m, 1, mix_np)
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)

    def test_dense_w(self):
        # A dense, non-uniform column-stochastic W: the general contraction.
        m, steps = 4, 3
        rng = np.random.default_rng(7)
        wm = rng.random((m, m)) + 0.1
        wm /= wm.sum(axis=0, keepdims=True)
        algo = coopsgd.Algorithm(wm, tau=1)
        batches = make_batches(steps, m, seed=7)
        t, _, _, w, b = run_engine(algo, batches, steps)
        assert t.plan().kind == "dense"
        ew, eb = local_sgd_np(batches, steps, m, 0, lambda _, w, b: (wm.T @ w, wm.T @ b))
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)


class TestTimeVarying:
    def test_cyclic_schedule(self):
        m, steps, tau = 8, 6, 2
        w1 = coopsgd.mixing.metropolis(nx.cycle_graph(m))
        w2 = np.full((m, m), 1 / m)
        algo = coopsgd.Algorithm(schedules.cyclic([w1, w2]), tau=tau)
        batches = make_batches(steps, m, seed=8)
        t, _, metrics, w, b = run_engine(algo, batches, steps)
        assert [t.plan(r).kind for r in range(2)] == ["neighbour", "mean"]

        def mix_np(step, w, b):
            if (step + 1) % tau:
                return w, b
            r = (step + 1) // tau - 1
            if r % 2 == 0:
                avg = lambda a: (np.roll(a, 1, axis=0) + a + np.roll(a, -1, axis=0)) / 3
            else:
                avg = lambda a: np.broadcast_to(a.mean(0), a.shape).copy()
            return avg(w), avg(b)

        ew, eb = local_sgd_np(batches, steps, m, 0, mix_np)
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)

    def test_random_schedule_without_cycle(self):
        m, steps = 8, 6
        sched = RandomMatchings(m, seed=3)
        algo = coopsgd.Algorithm(sched, tau=1)
        assert algo.mixing.cycle is None
        batches = make_batches(steps, m, seed=9)
        t, _, metrics, w, b = run_engine(algo, batches, steps)
        plan = t.plan()
        assert plan.kind == "neighbour" and len(plan.slots) == 2  # the schedule's own matchings
        assert all(p[p[j]] == j for p in plan.slots for j in range(m))
        ew, eb = local_sgd_np(batches, steps, m, 0, lambda s, w, b: (sched.at(s).T @ w, sched.at(s).T @ b))
        # A round whose draw activates no matching has W = I: it does not communicate.
        expect = [not np.allclose(sched.at(s), np.eye(m)) for s in range(steps)]
        assert np.asarray(metrics.communicated).tolist() == expect
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)

    def test_adaptive_period_is_asked_round_by_round(self):
        m, steps = 2, 10
        asked = []
        current = {"tau": 3}

        def tau_fn(start):
            asked.append(start)
            return current["tau"]

        algo = coopsgd.Algorithm(np.full((m, m), 0.5), tau=tau_fn)
        trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn)
        state = trainer.init(INIT)
        batches = make_batches(steps, m, seed=10)
        state, metrics = trainer.run(state, batches, 3)
        assert asked == [0]  # nothing precomputed beyond the current round
        current["tau"] = 2  # e.g. AdaComm lowering τ after seeing the loss
        state, metrics2 = trainer.run(state, jax.tree.map(lambda x: x[3:], batches), 7)
        assert asked == [0, 3, 5, 7, 9]
        comm = np.concatenate([metrics.communicated, metrics2.communicated]).tolist()
        assert comm == [False, False, True, False, True, False, True, False, True, False]
        assert int(state.step) == 10 and int(state.rounds) == 4
        # One program per distinct (rounds per call, τ, plan), compiled once and reused.
        assert sorted(k[:2] for k in trainer._programs) == [(1, 1), (1, 2), (1, 3)]


class TestTrainer:
    def test_run_equals_steps(self):
        m, steps = 4, 7
        algo = coopsgd.decentralized_periodic(nx.cycle_graph(m), 3)
        batches = make_batches(steps, m, seed=11)
        trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR, momentum=0.9), loss_fn)
        s1 = trainer.init(INIT)
        s1, m1 = trainer.run(s1, batches, steps)
        s2 = trainer.init(INIT)
        losses = []
        for t in range(steps):
            s2, met = trainer.step(s2, jax.tree.map(lambda x: x[t], batches))
            losses.append(np.asarray(met.losses))
        np.testing.assert_allclose(s1.params["w"], s2.params["w"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m1.losses, np.stack(losses), rtol=1e-6, atol=1e-6)

    def test_run_accepts_iterator_and_callable(self):
        m, steps = 2, 5
        batches = make_batches(steps, m, seed=12)
        algo = coopsgd.local_sgd(m, 2)
        t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn)
        ref, _ = t.run(t.init(INIT), batches, steps)
        per_step = [jax.tree.map(lambda x: x[i], batches) for i in range(steps)]
        s_it, _ = t.run(t.init(INIT), iter(per_step), steps)
        s_fn, _ = t.run(t.init(INIT), lambda k: per_step[k], steps)
        for s in (s_it, s_fn):
            np.testing.assert_allclose(s.params["w"], ref.params["w"], rtol=1e-6)

    def test_fused_chunks_equal_single_rounds(self):
        m, steps = 4, 12
        batches = make_batches(steps, m, seed=13)
        algo = coopsgd.dpsgd(nx.cycle_graph(m))
        a = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, steps_per_call=5, track_consensus=True)
        b = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, steps_per_call=1, track_consensus=True)
        sa, ma = a.run(a.init(INIT), batches, steps)
        sb, mb = b.run(b.init(INIT), batches, steps)
        np.testing.assert_allclose(sa.params["w"], sb.params["w"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ma.consensus, mb.consensus, rtol=1e-5, atol=1e-9)
        # 5 + 5 + 2 rounds: the last, shorter call runs the same 5-round program (no remainder program)
        assert {k[:2] for k in a._programs} == {(5, 1)}

    def test_average_is_mean_of_all_columns(self):
        m = 3
        algo = coopsgd.easgd(m, tau=1)
        trainer, state, _, w, b = run_engine(algo, make_batches(2, m), 2)
        avg = trainer.average(state)
        np.testing.assert_allclose(avg["w"], w.mean(0), rtol=1e-6)
        assert avg["w"].shape == (D_IN,) and np.shape(avg["b"]) == ()

    def test_effective_learning_rate_of_average(self):
        # u_{k+1} = u_k − (mη/(m+v)) (1/m) Σ g_i  (math.md §1), here for EASGD (v = 1).
        m = 4
        algo = coopsgd.easgd(m, tau=1)
        batches = make_batches(1, m, seed=14)
        trainer, state, _, w, b = run_engine(algo, batches, 1)
        g = np.mean([grad_np(INIT["w"], INIT["b"], batches["x"][0, i], batches["y"][0, i])[0]
                     for i in range(m)], axis=0)
        np.testing.assert_allclose(w.mean(0), INIT["w"] - (m * LR / (m + 1)) * g, rtol=1e-5, atol=1e-6)

    def test_init_state(self):
        algo = coopsgd.easgd(3)
        t = coopsgd.CooperativeSGD(algo, optax.adam(1e-3), loss_fn)
        state = t.init(INIT, seed=5)
        assert isinstance(state, coopsgd.EngineState)
        assert state.params["w"].shape == (3, D_IN)  # the m workers' models
        assert state.mix_state.shared["w"].shape == (1, D_IN)  # the anchor: the linear mixer's state
        np.testing.assert_array_equal(t.columns(state)["w"], np.tile(INIT["w"], (4, 1)))
        assert jax.tree.leaves(state.opt_state)[0].shape[0] == 3  # one optimizer state per worker
        assert int(state.step) == 0 and int(state.rounds) == 0

    @pytest.mark.parametrize("sync", ["keep", "average", "reset"])
    def test_sync_optimizer_state(self, sync):
        m, tau, steps = 3, 2, 2
        batches = make_batches(steps, m, seed=15)
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), optax.sgd(LR, momentum=0.5), loss_fn,
                                   sync_optimizer_state=sync)
        state, _ = t.run(t.init(INIT), batches, steps)
        trace = np.asarray(state.opt_state[0].trace["w"])
        # Momentum buffers by hand: μ_1 = g_0, μ_2 = 0.5 μ_1 + g_1 for each worker.
        w = np.tile(INIT["w"].astype(np.float64), (m, 1))
        b = np.full(m, float(INIT["b"]))
        mu = np.zeros((m, D_IN))
        mub = np.zeros(m)
        for s in range(steps):
            for i in range(m):
                gw, gb = grad_np(w[i], b[i], batches["x"][s, i], batches["y"][s, i])
                mu[i] = 0.5 * mu[i] + gw
                mub[i] = 0.5 * mub[i] + gb
                w[i] -= LR * mu[i]
                b[i] -= LR * mub[i]
        expect = {"keep": mu, "average": np.tile(mu.mean(0), (m, 1)), "reset": np.zeros_like(mu)}[sync]
        np.testing.assert_allclose(trace, expect, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("inject", [False, True])
    def test_reset_keeps_the_learning_rate_schedule_counting(self, inject):
        """Warmup-cosine over the whole run: "reset" zeroes Adam's moments (its bias correction
        restarts) at every mixing, but the schedule reads the global step, as written here."""
        m, tau, steps = 2, 3, 9
        lr = optax.warmup_cosine_decay_schedule(0.0, 0.2, 4, steps)
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr) if inject else optax.adam(lr)
        batches = make_batches(steps, m, seed=16)
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, tau), tx, loss_fn, sync_optimizer_state="reset")
        state, _ = t.run(t.init(INIT), batches, steps)
        w = np.tile(INIT["w"].astype(np.float64), (m, 1))
        b = np.full(m, float(INIT["b"]))
        for start in range(0, steps, tau):
            mom = [(np.zeros(D_IN + 1), np.zeros(D_IN + 1)) for _ in range(m)]
            for k in range(tau):
                s = start + k
                for i in range(m):
                    gw, gb = grad_np(w[i], b[i], batches["x"][s, i].astype(np.float64),
                                     batches["y"][s, i].astype(np.float64))
                    g = np.append(gw, gb)
                    mu, nu = 0.9 * mom[i][0] + 0.1 * g, 0.999 * mom[i][1] + 0.001 * g**2
                    mom[i] = (mu, nu)
                    step = (mu / (1 - 0.9 ** (k + 1))) / (np.sqrt(nu / (1 - 0.999 ** (k + 1))) + 1e-8)
                    w[i] -= float(lr(s)) * step[:D_IN]
                    b[i] -= float(lr(s)) * step[D_IN]
            w[:], b[:] = w.mean(0), b.mean()
        np.testing.assert_allclose(np.asarray(t.workers(state)["w"]), w, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(t.workers(state)["b"]), b, rtol=2e-5, atol=2e-6)

    @pytest.mark.parametrize("make", [lambda: coopsgd.fully_sync(1), lambda: coopsgd.local_sgd(1, 4)])
    def test_one_worker_is_plain_sgd(self, make):
        batches = make_batches(5, 1, seed=17)
        t = coopsgd.CooperativeSGD(make(), optax.sgd(LR), loss_fn)
        state, _ = t.run(t.init(INIT), batches, 5)
        w, b = INIT["w"].astype(np.float64), float(INIT["b"])
        for s in range(5):
            gw, gb = grad_np(w, b, batches["x"][s, 0].astype(np.float64), batches["y"][s, 0].astype(np.float64))
            w, b = w - LR * gw, b - LR * gb
        np.testing.assert_allclose(np.asarray(t.workers(state)["w"])[0], w, rtol=2e-5, atol=2e-6)

    def test_has_aux_and_rng(self):
        m = 2

        def noisy(params, batch, key):
            noise = jax.random.normal(key, params["w"].shape)
            loss = jnp.sum((params["w"] - batch) ** 2) + jnp.sum(noise * params["w"])
            return loss, {"noise0": noise[0]}

        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 1), optax.sgd(0.1), noisy, has_aux=True,
                                   with_rng=True)
        state = t.init({"w": jnp.zeros(3)}, seed=7)
        state, met = t.run(state, np.zeros((3, m, 3), np.float32), 3)
        assert met.aux["noise0"].shape == (3, m)
        key = jax.random.key(7)
        for k in range(3):
            for i in range(m):
                ref = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, k), i), (3,))
                assert float(met.aux["noise0"][k, i]) == pytest.approx(float(ref[0]), rel=1e-6)

    def test_round_fn_vmaps_over_seeds(self):
        m, tau = 4, 3
        algo = coopsgd.local_sgd(m, tau)

        def noisy(params, key):  # the harness's style: the batch is a PRNG key per worker
            return jnp.sum(params["w"] ** 2) + jnp.dot(jax.random.normal(key, (D_IN,)), params["w"])

        t = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), noisy)
        seeds = [0, 1, 2]
        keys = jax.random.split(jax.random.key(0), len(seeds) * tau * m).reshape(len(seeds), tau, m)
        states = jax.tree.map(lambda *xs: jnp.stack(xs),
                              *[t.init({"w": jnp.ones(D_IN)}, seed=s) for s in seeds])
        f = t.round_fn(tau)
        out, met = jax.jit(jax.vmap(f))(states, keys)
        assert met.loss.shape == (3, tau) and met.communicated.shape == (3, tau)
        for i, s in enumerate(seeds):
            single, m1 = t.run(t.init({"w": jnp.ones(D_IN)}, seed=s), keys[i], tau)
            np.testing.assert_allclose(out.params["w"][i], single.params["w"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(met.loss[i], m1.loss, rtol=1e-5)
        # Without jit too (optax style).
        o2, _ = f(jax.tree.map(lambda x: x[0], states), keys[0])
        np.testing.assert_allclose(o2.params["w"], out.params["w"][0], rtol=1e-5, atol=1e-6)
        assert int(out.step[0]) == tau and int(out.rounds[0]) == 1

    def test_flax_linen_params(self):
        flax = pytest.importorskip("flax.linen")
        model = flax.Dense(2)
        params = model.init(jax.random.key(0), jnp.zeros((1, D_IN)))

        def loss(p, batch):
            return jnp.mean((model.apply(p, batch["x"]) - batch["y"][..., None]) ** 2)

        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.adam(1e-2), loss)
        state, met = t.run(t.init(params), make_batches(4, 2), 4)
        assert met.loss.shape == (4,) and np.all(np.isfinite(met.loss))
        assert t.average(state)["params"]["kernel"].shape == (D_IN, 2)


class TestBadInput:
    def test_batch_leading_axis(self):
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), loss_fn)
        state = t.init(INIT)
        bad = jax.tree.map(lambda x: x[0, :3], make_batches(1, 4))
        with pytest.raises(ValueError, match=r"leading axis 3 .* m = 4"):
            t.step(state, bad)
        with pytest.raises(ValueError, match=r"m = 4"):
            t.run(state, make_batches(5, 3), 5)
        with pytest.raises(ValueError, match=r"steps >= 6"):
            t.run(state, make_batches(5, 4), 6)
        assert t._programs == {}  # nothing compiled

    def test_nonfinite_params(self):
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(LR), loss_fn)
        with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
            t.init({"w": np.array([1.0, np.nan, 0.0], np.float32), "b": np.float32(0)})

    def test_loss_not_scalar(self):
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(LR),
                                   lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2)
        state = t.init(INIT)
        with pytest.raises(ValueError, match=r"scalar.*shape \(4,\)"):
            t.run(state, make_batches(2, 2), 2)
        assert t._programs == {}

    def test_optimizer_not_optax(self):
        with pytest.raises(ValueError, match="optax GradientTransformation.*0.1"):
            coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), 0.1, loss_fn)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="'sometimes'"):
            coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(LR), loss_fn,
                                   sync_optimizer_state="sometimes")
        with pytest.raises(ValueError, match="'gpu_cluster'"):
            coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(LR), loss_fn, backend="gpu_cluster")

    def test_nan_stops_run_naming_the_step(self):
        m, steps = 2, 8
        batches = make_batches(steps, m, seed=16)
        batches["y"][5, 1, 0] = np.nan  # worker 1's data at step 5
        t = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 2), optax.sgd(LR), loss_fn)
        with pytest.raises(coopsgd.NonFiniteError, match="step 5") as err:
            t.run(t.init(INIT), batches, steps)
        assert err.value.step == 5 and err.value.worker == 1
        assert "worker 1" in str(err.value)
        # step() reports it in the metrics instead.
        state = t.init(INIT)
        for k in range(6):
            state, met = t.step(state, jax.tree.map(lambda x: x[k], batches))
        assert not bool(met.finite) and bool(jnp.isnan(met.losses[1]))


class TestRoundsThatMoveNothing:
    """A round whose W is I moves no data: no optimizer-state sync, no anchor traffic."""

    def test_reset_only_where_models_mixed(self):
        m, steps, mu = 8, 8, 0.9
        sched = RandomMatchings(m, seed=5)
        algo = coopsgd.Algorithm(sched, tau=1)
        moves = [not np.allclose(sched.at(s), np.eye(m)) for s in range(steps)]
        assert moves[:-1].count(False) >= 2  # W = I rounds before the end, where a reset would show
        batches = make_batches(steps, m, seed=11)
        trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR, momentum=mu), loss_fn,
                                         sync_optimizer_state="reset")
        state, metrics = trainer.run(trainer.init(INIT), batches, steps)
        # Heavy ball by hand (optax.trace: t ← g + μ t, x ← x − η t); the trace restarts at 0
        # after a mixing that moved data, and is kept after a W = I round.
        w = np.tile(INIT["w"].astype(np.float64), (m, 1))
        b = np.full(m, float(INIT["b"]))
        tw, tb = np.zeros_like(w), np.zeros_like(b)
        for s in range(steps):
            for i in range(m):
                gw, gb = grad_np(w[i], b[i], batches["x"][s, i].astype(np.float64),
                                 batches["y"][s, i].astype(np.float64))
                tw[i], tb[i] = gw + mu * tw[i], gb + mu * tb[i]
                w[i] -= LR * tw[i]
                b[i] -= LR * tb[i]
            w, b = sched.at(s).T @ w, sched.at(s).T @ b
            if moves[s]:
                tw, tb = np.zeros_like(tw), np.zeros_like(tb)
        cols = trainer.columns(state)
        np.testing.assert_allclose(np.asarray(cols["w"]), w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(cols["b"]), b, rtol=1e-4, atol=1e-5)
        assert np.asarray(metrics.communicated).tolist() == moves

    def test_anchor_round_with_identity_w_does_not_communicate(self):
        # workers 0..3 on a ring plus an anchor column 4: the support has anchor traffic, but a
        # round with W = I sends nothing at all.
        m = 4
        support = np.ones((m + 1, m + 1), bool)
        support[:m, :m] = coopsgd.mixing.metropolis(nx.cycle_graph(m)) > 0
        plan = plans.plan_for_support(support, m, 1)
        assert plan.kind == "neighbour" and plan.worker_to_aux and plan.aux_to_worker
        idle = plans.active_slots(plan, np.eye(m + 1))
        assert idle.kind == "diag" and not idle.communicates
        assert plans.communication(idle, 1000.0).bytes_per_worker == 0

    def test_overlapping_matchings_hint_is_not_double_counted(self):
        m, steps = 8, 4
        ring = coopsgd.mixing.metropolis(nx.cycle_graph(m))

        class Hinted(schedules.MixingSchedule):
            n, cycle, support = m, None, ring > 0
            matchings = [[(i, i + 1) for i in range(0, m, 2)],
                         [(i, (i + 1) % m) for i in range(1, m, 2)],
                         [(0, 1)]]  # repeats an edge of the first matching

            def at(self, r):
                return ring

        algo = coopsgd.Algorithm(Hinted(), tau=1)
        batches = make_batches(steps, m, seed=12)
        _, _, _, w, b = run_engine(algo, batches, steps)
        ew, eb = local_sgd_np(batches, steps, m, 0, lambda s, w, b: (ring.T @ w, ring.T @ b))
        np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)


class TestInitAndBackendChecks:
    def test_bfloat16_params_are_accepted(self):
        trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 1), optax.sgd(LR), loss_fn)
        state = trainer.init({"w": jnp.ones(3, jnp.bfloat16), "b": jnp.zeros((), jnp.bfloat16)})
        assert state.params["w"].dtype == jnp.bfloat16 and state.params["w"].shape == (2, 3)

    def test_non_finite_bfloat16_is_named(self):
        trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 1), optax.sgd(LR), loss_fn)
        with pytest.raises(ValueError, match=r"params\['w'\] has 1 non-finite"):
            trainer.init({"w": jnp.array([1.0, jnp.nan, 0.0], jnp.bfloat16), "b": jnp.zeros(())})

    def test_backend_object_built_for_other_sizes(self):
        from coopsgd.parallel import backends

        with pytest.raises(ValueError, match=r"built for m = 3.*m = 4"):
            coopsgd.CooperativeSGD(coopsgd.easgd(4), optax.sgd(LR), loss_fn,
                                   backend=backends.Simulate(3))


@pytest.mark.parametrize("algo", [coopsgd.local_sgd(4, 3), coopsgd.easgd(4, tau=2)], ids=["local_sgd", "easgd"])
def test_lean_program_without_consensus_tracking(algo):
    """track_consensus=False compiles a different (leaner) round: same numbers as the update rule."""
    steps = 6
    batches = make_batches(steps, algo.m, seed=13)
    _, _, metrics, w, b = run_engine(algo, batches, steps, track_consensus=False)

    def mix_np(step, w, b):
        wk = algo.mixing_at(step)
        return wk.T @ w, wk.T @ b

    ew, eb = local_sgd_np(batches, steps, algo.m, algo.v, mix_np)
    np.testing.assert_allclose(w, ew, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, eb, rtol=1e-5, atol=1e-5)
    assert metrics.consensus is None
