"""Global (outer) momentum and Overlap-M, against hand-derived values and hand-written updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coopsgd.algorithms.outer import (
    average_workers,
    broadcast_workers,
    outer_momentum,
    outer_optimizer,
    pseudo_gradient,
)
from coopsgd.algorithms.overlap import (
    OverlapMState,
    overlap_m,
    overlap_m_sync,
    overlap_matrix,
)

JIT = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


class TestOuterMomentum:
    def test_pseudo_gradient(self):
        got = pseudo_gradient({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([0.5, 3.0])})
        np.testing.assert_allclose(got["a"], [0.5, -1.0])

    @JIT
    def test_heavy_ball_hand_values(self, use_jit):
        # gamma = 0.5, beta = 0.9, anchor 1.0.
        # sync 1: averaged 0.8 -> delta 0.2, u = 0.2, x = 1.0 - 0.5*0.2 = 0.9
        # sync 2: averaged 0.7 -> delta 0.2, u = 0.9*0.2 + 0.2 = 0.38, x = 0.9 - 0.19 = 0.71
        # sync 3: averaged 0.71 -> delta 0, u = 0.342, x = 0.71 - 0.171 = 0.539
        outer = outer_optimizer(outer_momentum(0.5, 0.9))
        sync = _maybe_jit(outer.sync, use_jit)
        state = outer.init(jnp.asarray(1.0))
        new, state = sync(state, jnp.asarray(0.8))
        assert float(new) == pytest.approx(0.9)
        new, state = sync(state, jnp.asarray(0.7))
        assert float(new) == pytest.approx(0.71)
        new, state = sync(state, jnp.asarray(0.71))
        assert float(new) == pytest.approx(0.539)
        assert float(state.anchor) == pytest.approx(0.539)

    @JIT
    def test_nesterov_hand_values(self, use_jit):
        # trace: f_t = delta + beta f_{t-1}; nesterov update = -(gamma)(delta + beta f_t).
        # sync 1: delta 0.2, f = 0.2, step 0.2 + 0.18 = 0.38, x = 1 - 0.19 = 0.81
        # sync 2: averaged 0.61 -> delta 0.2, f = 0.38, step 0.2 + 0.342 = 0.542, x = 0.81 - 0.271
        outer = outer_optimizer(learning_rate=0.5, momentum=0.9, nesterov=True)
        sync = _maybe_jit(outer.sync, use_jit)
        state = outer.init(jnp.asarray(1.0))
        new, state = sync(state, jnp.asarray(0.8))
        assert float(new) == pytest.approx(0.81)
        new, state = sync(state, jnp.asarray(0.61))
        assert float(new) == pytest.approx(0.539)

    def test_no_momentum_unit_step_is_local_sgd(self):
        outer = outer_optimizer(outer_momentum(1.0, 0.0))
        params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
        state = outer.init(params)
        rng = np.random.default_rng(0)
        for _ in range(3):
            averaged = jax.tree.map(lambda x: x + rng.normal(size=x.shape), state.anchor)
            new, state = outer.sync(state, averaged)
            for k in params:
                np.testing.assert_allclose(new[k], averaged[k], rtol=1e-6)

    def test_matches_authors_global_momentum_form(self):
        # Local SGD with global momentum (Wang et al.'s code): u <- beta u + (anchor - avg)/lr,
        # anchor <- anchor - lr u. With constant lr this is outer_momentum(1, beta).
        beta, lr = 0.6, 0.1
        outer = outer_optimizer(outer_momentum(1.0, beta))
        state = outer.init(jnp.zeros(3))
        anchor, u = np.zeros(3), np.zeros(3)
        rng = np.random.default_rng(1)
        for _ in range(4):
            averaged = anchor + rng.normal(size=3)
            u = beta * u + (anchor - averaged) / lr
            anchor = anchor - lr * u
            new, state = outer.sync(state, jnp.asarray(averaged))
            np.testing.assert_allclose(new, anchor, rtol=1e-5, atol=1e-6)

    def test_any_optax_transformation(self):
        outer = outer_optimizer(optax.sgd(0.1))
        new, _ = outer.sync(outer.init(jnp.asarray(1.0)), jnp.asarray(0.0))
        assert float(new) == pytest.approx(0.9)

    @pytest.mark.parametrize("kwargs", [dict(momentum=1.0), dict(momentum=-0.1), dict(learning_rate=0.0)])
    def test_bad_input(self, kwargs):
        with pytest.raises(ValueError):
            outer_momentum(**kwargs)

    def test_tx_and_keywords_exclusive(self):
        with pytest.raises(ValueError):
            outer_optimizer(optax.sgd(1.0), momentum=0.5)

    def test_worker_helpers(self):
        stacked = {"w": jnp.arange(6.0).reshape(3, 2)}
        np.testing.assert_allclose(average_workers(stacked)["w"], [2.0, 3.0])
        np.testing.assert_allclose(average_workers(stacked, 2)["w"], [1.0, 2.0])
        assert broadcast_workers({"w": jnp.ones(2)}, 4)["w"].shape == (4, 2)


def _overlap_m_by_hand(x, z, u, alpha, beta, lr):
    """Overlap-M's synchronisation written out worker by worker in NumPy."""
    m = len(x)
    pulled = [(1 - alpha) * x[i] + alpha * z for i in range(m)]
    xbar = sum(pulled) / m
    u_new = beta * u + (z - xbar) / lr
    z_new = z - lr * u_new
    return np.array(pulled), z_new, u_new


class TestOverlapM:
    @JIT
    def test_against_equations_written_out(self, use_jit):
        alpha, beta = 0.6, 0.7
        algo = overlap_m(alpha, beta)
        sync = _maybe_jit(algo.sync, use_jit)
        rng = np.random.default_rng(0)
        m, d = 4, 3
        z = rng.normal(size=d)
        x = np.tile(z, (m, 1))
        u = np.zeros(d)
        state = algo.init(jnp.asarray(z))
        workers = jnp.asarray(x)
        for step, lr in enumerate([0.1, 0.1, 0.05]):
            noise = rng.normal(size=(m, d))
            x = x - lr * noise  # some local steps
            workers = workers - lr * jnp.asarray(noise)
            x, z, u = _overlap_m_by_hand(x, z, u, alpha, beta, lr)
            workers, state = sync(workers, state, lr)
            np.testing.assert_allclose(workers, x, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.anchor, z, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.momentum, u, rtol=1e-5, atol=1e-5)

    def test_hand_values_scalar(self):
        # m = 2 scalars x = (1, 3), z = 0, u = 0.5, alpha = 0.5, beta = 0.5, lr = 0.1:
        # pulled = (0.5, 1.5), xbar = 1.0, u = 0.25 + (0 - 1)/0.1 = -9.75, z = 0 + 0.975 = 0.975
        workers, state = overlap_m_sync(
            jnp.array([1.0, 3.0]), OverlapMState(jnp.asarray(0.0), jnp.asarray(0.5)),
            alpha=0.5, beta=0.5, lr=0.1,
        )
        np.testing.assert_allclose(workers, [0.5, 1.5])
        assert float(state.momentum) == pytest.approx(-9.75)
        assert float(state.anchor) == pytest.approx(0.975)

    def test_no_momentum_is_w_ov(self):
        # beta = 0: [x_1 .. x_m, z] <- [x_1 .. x_m, z] W_ov (columns are models).
        alpha, m, d = 0.3, 5, 2
        rng = np.random.default_rng(2)
        x, z = rng.normal(size=(m, d)), rng.normal(size=d)
        stacked = np.vstack([x, z[None]])  # worker axis first
        expected = overlap_matrix(m, alpha).T @ stacked  # new[j] = sum_i W[i, j] old[i]
        workers, state = overlap_m(alpha, 0.0).sync(jnp.asarray(x), OverlapMState(jnp.asarray(z), jnp.zeros(d)), 0.37)
        np.testing.assert_allclose(workers, expected[:m], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.anchor, expected[m], rtol=1e-5, atol=1e-6)

    def test_pytree_params(self):
        algo = overlap_m(0.5, 0.5)
        params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
        state = algo.init(params)
        workers = broadcast_workers(params, 3)
        workers, state = algo.sync(workers, state, 0.1)
        assert workers["w"].shape == (3, 2, 2) and state.anchor["b"].shape == (2,)

    @pytest.mark.parametrize("alpha, beta", [(1.0, 0.5), (-0.1, 0.5), (0.5, 1.0), (0.5, -0.2)])
    def test_bad_input(self, alpha, beta):
        with pytest.raises(ValueError):
            overlap_m(alpha, beta)

    def test_bad_lr(self):
        with pytest.raises(ValueError, match="lr"):
            overlap_m_sync(jnp.zeros((2, 1)), OverlapMState(jnp.zeros(1), jnp.zeros(1)), alpha=0.5, beta=0.5, lr=0.0)


def test_docstring_examples():
    import doctest

    from coopsgd.algorithms import outer

    assert doctest.testmod(outer, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


class TestAsMixingMatrices:
    """The heavy-ball outer momentum and Overlap-M as A(tau, W, v=2) on [x_1..x_m, p, q=p-u]."""

    def test_global_momentum_matrix_against_equations(self):
        from coopsgd.algorithms.outer import global_momentum_matrix

        m, d, gamma, beta = 4, 3, 0.7, 0.8
        rng = np.random.default_rng(0)
        x, p, u = rng.normal(size=(m, d)), rng.normal(size=d), rng.normal(size=d)
        cols = np.vstack([x, p, p - u])
        new = global_momentum_matrix(m, gamma, beta).T @ cols
        a = x.mean(0)
        u_new = beta * u + (p - a)
        p_new = p - gamma * u_new
        np.testing.assert_allclose(new[:m], np.tile(p_new, (m, 1)), atol=1e-12)
        np.testing.assert_allclose(new[m], p_new, atol=1e-12)
        np.testing.assert_allclose(new[m + 1], p_new - u_new, atol=1e-12)
        np.testing.assert_allclose(global_momentum_matrix(m, gamma, beta).sum(0), 1.0)

    def test_overlap_m_matrix_against_equations(self):
        from coopsgd.algorithms.overlap import overlap_m_matrix

        m, d, alpha, beta, lr = 3, 2, 0.6, 0.7, 0.05
        rng = np.random.default_rng(1)
        x, z, u = rng.normal(size=(m, d)), rng.normal(size=d), rng.normal(size=d)
        new = overlap_m_matrix(m, alpha, beta).T @ np.vstack([x, z, z - lr * u])
        x_h, z_h, u_h = _overlap_m_by_hand(x, z, u, alpha, beta, lr)
        np.testing.assert_allclose(new[:m], x_h, atol=1e-12)
        np.testing.assert_allclose(new[m], z_h, atol=1e-12)
        np.testing.assert_allclose(new[m + 1], z_h - lr * u_h, atol=1e-12)
        # beta = 0 is W_ov on the first m + 1 columns
        w0 = overlap_m_matrix(m, alpha, 0.0)
        np.testing.assert_allclose(w0[: m + 1, : m + 1], overlap_matrix(m, alpha))

    def test_plain_local_sgd_limit(self):
        from coopsgd.algorithms.outer import global_momentum_matrix

        w = global_momentum_matrix(3, 1.0, 0.0)
        x = np.random.default_rng(2).normal(size=(3, 2))
        new = w.T @ np.vstack([x, np.zeros(2), np.zeros(2)])
        np.testing.assert_allclose(new[:3], np.tile(x.mean(0), (3, 1)), atol=1e-12)

    @pytest.mark.parametrize("which", ["global_momentum", "overlap_m"])
    def test_on_the_engine(self, which):
        engine = pytest.importorskip("coopsgd.parallel.trainer")
        from coopsgd import local_sgd_global_momentum, overlap_local_sgd_momentum

        m, d, tau, rounds, eta = 4, 2, 3, 4, 0.1
        targets = np.random.default_rng(3).normal(size=(m, d)).astype(np.float32)

        def loss(p, batch):  # 0.5 ||w - c_i||^2: gradient w - c_i
            return 0.5 * jnp.sum((p["w"] - batch["c"]) ** 2)

        if which == "global_momentum":
            algo = local_sgd_global_momentum(m, tau, lr=0.7, momentum=0.8)
        else:
            algo = overlap_local_sgd_momentum(m, tau, alpha=0.6, beta=0.7)
        trainer = engine.CooperativeSGD(algo, optax.sgd(eta), loss)
        state = trainer.init({"w": jnp.zeros(d)})
        batches = {"c": np.broadcast_to(targets, (tau * rounds, m, d)).copy()}
        state, _ = trainer.run(state, batches, tau * rounds)

        x = np.zeros((m, d))
        if which == "global_momentum":
            outer = outer_optimizer(outer_momentum(0.7, 0.8))
            ostate = outer.init(jnp.zeros(d))
        else:
            om = overlap_m(0.6, 0.7)
            ostate = om.init(jnp.zeros(d))
        for _ in range(rounds):
            for _ in range(tau):
                x = x - eta * (x - targets)
            if which == "global_momentum":
                new, ostate = outer.sync(ostate, jnp.asarray(x.mean(0)))
                x = np.tile(np.asarray(new), (m, 1))
            else:
                xs, ostate = om.sync(jnp.asarray(x), ostate, eta)
                x = np.asarray(xs)
        np.testing.assert_allclose(np.asarray(trainer.workers(state)["w"]), x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(trainer.columns(state)["w"])[m], np.asarray(ostate.anchor),
                                   rtol=1e-4, atol=1e-5)
