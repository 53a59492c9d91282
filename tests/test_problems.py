"""coopsgd.problems: constants checked by hand and stochastic gradients checked by sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coopsgd.analysis import problems

N_DRAWS = 20_000


def _draws(problem, x, worker=0, n=N_DRAWS):
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    x = jnp.asarray(x, jnp.float32)
    return np.asarray(jax.jit(jax.vmap(lambda k: problem.stochastic_grad(x, k, worker)))(keys), np.float64)


class TestQuadratic:
    def test_constants_by_hand(self):
        # d = 1, A = 2, optima +1 and -1 (m = 2): x̄* = 0, F(x) = x² + 1, f_inf = ½·2·1 = 1
        p = problems.Quadratic([2.0], sigma2=0.5, optima=[[1.0], [-1.0]], x0=[3.0])
        assert p.L == 2.0 and p.m == 2
        assert p.f_inf == pytest.approx(1.0)
        assert p.f_gap == pytest.approx(9.0)
        assert p.heterogeneity == pytest.approx(4.0)  # (1/2)(|2·1|² + |2·(−1)|²)
        assert float(p.value(jnp.array([3.0]))) == pytest.approx(10.0)
        assert float(p.grad(jnp.array([3.0]))[0]) == pytest.approx(6.0)

    def test_factory_constants(self):
        p = problems.quadratic(5, L=2.0, mu=0.5, sigma2=0.3, seed=3)
        assert np.allclose(p.eigenvalues, [0.5, 0.875, 1.25, 1.625, 2.0])
        assert p.f_inf == 0.0 and p.heterogeneity == 0.0 and p.m is None
        hand = 0.5 * np.sum(p.eigenvalues * p.x_star**2)  # x0 = 0
        assert p.f_gap == pytest.approx(hand)

    @pytest.mark.parametrize("rotate", [False, True])
    def test_stochastic_gradient_mean_and_variance(self, rotate):
        p = problems.quadratic(4, sigma2=0.8, seed=0, m=3, heterogeneity=2.0, rotate=rotate)
        x = np.array([0.3, -1.0, 2.0, 0.5])
        g = _draws(p, x, worker=1)
        want = p.A @ (x - p.optima[1])  # worker 1's gradient, not ∇F
        se = np.sqrt(0.8 / 4 / N_DRAWS)
        assert np.all(np.abs(g.mean(0) - want) < 5 * se)
        var = ((g - want) ** 2).sum(1)
        assert var.mean() == pytest.approx(0.8, abs=5 * var.std() / np.sqrt(N_DRAWS))

    def test_loss_value_is_the_worker_objective(self):
        p = problems.quadratic(3, seed=1)
        x = jnp.array([1.0, 2.0, 3.0])
        batch = {"key": jax.random.PRNGKey(5), "worker": jnp.int32(0)}
        assert float(p.loss_fn(x, batch)) == pytest.approx(float(p.value(x)), rel=1e-6)

    def test_rotated_grad_is_a_times_offset(self):
        p = problems.quadratic(6, seed=2, rotate=True)
        x = np.linspace(-1, 1, 6)
        assert np.allclose(np.asarray(p.grad(jnp.asarray(x, jnp.float32))), p.A @ (x - p.x_star), atol=1e-5)
        assert np.allclose(np.linalg.eigvalsh(p.A), p.eigenvalues)

    def test_batches_shape(self):
        p = problems.quadratic(3)
        b = p.batches(jax.random.PRNGKey(0), 7, 4)
        assert b["key"].shape == (7, 4, 2) and b["worker"].shape == (7, 4)
        assert len({tuple(k) for k in np.asarray(b["key"]).reshape(-1, 2)}) == 28

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(d=0), "d must be"),
            (dict(d=3, L=0.0), "L"),
            (dict(d=3, L=1.0, mu=2.0), "mu"),
            (dict(d=3, sigma2=-1.0), "sigma2"),
            (dict(d=3, heterogeneity=1.0), "needs m"),
        ],
    )
    def test_bad_input(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            problems.quadratic(**kwargs)

    def test_wrong_worker_count(self):
        p = problems.quadratic(3, m=4, heterogeneity=1.0)
        with pytest.raises(ValueError, match="m = 4"):
            p.check_workers(8)


def _exact_sampling_variance(p, x):
    """(1/b)(E_j‖g_j(x)‖² − ‖∇F(x)‖²), per-example gradients in float64."""
    a, y = p.features, p.targets
    if isinstance(p, problems.LinearRegression):
        per = a * (a @ x - y)[:, None]
    else:
        s = -y / (1.0 + np.exp(y * (a @ x)))
        per = a * s[:, None] + p.reg * x
    full = per.mean(0)
    return ((per - full) ** 2).sum(1).mean() / p.batch_size, full


class TestRegression:
    def test_linear_constants(self):
        p = problems.linear_regression(200, 5, batch_size=4, seed=1)
        a, y = p.features, p.targets
        x_star = np.linalg.solve(a.T @ a, a.T @ y)
        assert p.f_inf == pytest.approx(0.5 * np.mean((a @ x_star - y) ** 2))
        assert p.L == pytest.approx(np.linalg.eigvalsh(a.T @ a / 200).max())
        assert p.f_gap == pytest.approx(0.5 * np.mean(y**2) - p.f_inf)

    def test_linear_sigma2_holds_on_the_sublevel_set(self):
        p = problems.linear_regression(200, 5, batch_size=2, seed=1)
        rng = np.random.default_rng(0)
        h = p.features.T @ p.features / 200
        f0 = p.f_gap
        worst = 0.0
        for _ in range(300):  # points on the boundary {F = F(x0)} and inside
            e = rng.normal(size=5)
            level = 2 * f0 * rng.uniform() ** 0.2  # eᵀHe = level <= 2 f_gap, mostly near the boundary
            e *= np.sqrt(level / (e @ h @ e))
            worst = max(worst, _exact_sampling_variance(p, p.x_star + e)[0])
        assert worst <= p.sigma2
        assert worst >= 0.2 * p.sigma2  # and it is not vacuous

    @pytest.mark.parametrize("factory", [problems.linear_regression, problems.logistic_regression])
    def test_stochastic_gradient_is_unbiased_with_the_exact_variance(self, factory):
        p = factory(100, 4, batch_size=3, seed=2)
        x = np.array([0.5, -0.5, 1.0, 0.2])
        var, full = _exact_sampling_variance(p, x)
        assert np.allclose(np.asarray(p.grad(jnp.asarray(x, jnp.float32))), full, atol=1e-5)
        g = _draws(p, x)
        assert np.all(np.abs(g.mean(0) - full) < 5 * np.sqrt(var / N_DRAWS) + 1e-5)
        assert ((g - full) ** 2).sum(1).mean() == pytest.approx(var, rel=0.1)
        assert var <= p.sigma2

    def test_logistic_minimum(self):
        p = problems.logistic_regression(300, 6, reg=0.05, seed=4)
        _, g = _exact_sampling_variance(p, p.x_star)
        assert np.linalg.norm(g) < 1e-9
        rng = np.random.default_rng(0)
        assert all(p.value_np(p.x_star + 0.1 * rng.normal(size=6)) > p.f_inf for _ in range(20))
        # L bounds the curvature: Hessian ⪯ AᵀA/(4N) + λ I
        assert p.L == pytest.approx(np.linalg.eigvalsh(p.features.T @ p.features / 300).max() / 4 + 0.05)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="reg"):
            problems.logistic_regression(reg=0.0)
        with pytest.raises(ValueError, match="n_samples >= d"):
            problems.linear_regression(3, 5)
        with pytest.raises(ValueError, match="batch_size"):
            problems.linear_regression(batch_size=0)


def _dissimilarity(worker_grads):
    """(1/m) Σ_i ‖∇f_i − ∇F‖² from the (m, d) worker gradients."""
    g = np.asarray(worker_grads)
    return float(np.mean(np.sum((g - g.mean(0)) ** 2, axis=1)))


class TestHeterogeneousQuadratic:
    def test_constants_by_hand(self):
        # d = 1, m = 2: f_1 = ½·1·(x − 2)², f_2 = ½·3·(x + 2)²; F = ½·2·(x − x̄*)² + f_inf with
        # x̄* = (1·2 + 3·(−2))/4 = −1, f_inf = ½[½·1·9 + ½·3·1] = 3; L = 3
        p = problems.HeterogeneousQuadratic([[1.0], [3.0]], 0.5, [[2.0], [-2.0]], [1.0], growth=1.0)
        assert p.L == 3.0 and p.eigenvalues[0] == 2.0 and p.x_star[0] == pytest.approx(-1.0)
        assert p.f_inf == pytest.approx(3.0) and p.f_gap == pytest.approx(0.5 * 2 * 4)
        # ∇f_i − ∇F at x = −1 + e: worker 1: (e − 3) − 2e = −e − 3, worker 2: 3(e + 1) − 2e = e + 3
        # → mean of squares (e + 3)²; with ∇F = 2e and B = 1: sup_e (e + 3)² − 4e² = 12 at e = 1
        assert p.growth_min == pytest.approx(0.25) and p.zeta2 == pytest.approx(12.0)
        assert p.heterogeneity == pytest.approx(9.0)  # at the minimiser, e = 0

    @pytest.mark.parametrize("rotate", [False, True])
    def test_dissimilarity_bound_holds_and_is_tight(self, rotate):
        p = problems.heterogeneous_quadratic(4, 5, sigma2=0.3, optima_spread=2.0, hessian_spread=0.8, seed=1,
                                             rotate=rotate)
        rng = np.random.default_rng(0)
        worst = 0.0
        for scale in (0.1, 1.0, 10.0, 100.0):
            for _ in range(200):
                x = p.x_star + scale * rng.normal(size=4)
                g = p.A @ (x - p.x_star)
                lhs = _dissimilarity(p.worker_grad_np(x))
                assert lhs <= p.zeta2 + p.growth * g @ g + 1e-9
                worst = max(worst, lhs - p.growth * g @ g)
        assert worst >= 0.5 * p.zeta2  # random points get near the supremum: ζ̄² is not vacuous
        assert _dissimilarity(p.worker_grad_np(p.x_star)) == pytest.approx(p.heterogeneity)

    def test_worker_gradients_are_the_hessians_applied(self):
        p = problems.heterogeneous_quadratic(3, 4, seed=2, rotate=True)
        x = np.array([0.3, -1.0, 2.0])
        lam = p.worker_eigenvalues
        q = p.rotation
        for i in range(4):
            a_i = q @ np.diag(lam[i]) @ q.T
            assert np.allclose(p.worker_grad_np(x)[i], a_i @ (x - p.optima[i]))
        assert np.allclose(p.worker_grad_np(x).mean(0), p.A @ (x - p.x_star))  # ∇F = Ā(x − x̄*)
        assert p.L == pytest.approx(max(np.linalg.eigvalsh(q @ np.diag(l) @ q.T).max() for l in lam))

    def test_stochastic_gradient_mean_and_variance(self):
        p = problems.heterogeneous_quadratic(4, 3, sigma2=0.8, seed=0, hessian_spread=0.9)
        x = np.array([0.3, -1.0, 2.0, 0.5])
        g = _draws(p, x, worker=2)
        want = p.worker_grad_np(x)[2]
        se = np.sqrt(0.8 / 4 / N_DRAWS)
        assert np.all(np.abs(g.mean(0) - want) < 5 * se + 1e-5)
        var = ((g - want) ** 2).sum(1)
        assert var.mean() == pytest.approx(0.8, abs=5 * var.std() / np.sqrt(N_DRAWS))

    def test_identical_hessians_reduce_to_the_quadratic(self):
        p = problems.heterogeneous_quadratic(3, 4, hessian_spread=0.0, optima_spread=2.0, seed=5)
        assert p.growth == 0.0 and p.zeta2 == pytest.approx(p.heterogeneity) and not p.identical
        assert problems.quadratic(3).identical

    @pytest.mark.parametrize("kwargs, match", [(dict(hessian_spread=1.0), "hessian_spread"),
                                               (dict(optima_spread=-1.0), "optima_spread"), (dict(m=0), "m must")])
    def test_bad_input(self, kwargs, match):
        args = dict(d=3, m=4)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            problems.heterogeneous_quadratic(**args)

    def test_growth_below_the_minimum_is_refused(self):
        p = problems.heterogeneous_quadratic(3, 4, seed=0)
        with pytest.raises(ValueError, match="must exceed B0"):
            p.dissimilarity(0.5 * p.growth_min)


class TestNonIIDLogistic:
    P = problems.noniid_logistic_regression(4, 64, 5, heterogeneity=1.5, batch_size=2, seed=3)

    def test_constants(self):
        p = self.P
        a = p.worker_features
        assert p.L == pytest.approx(max(np.linalg.eigvalsh(a[i].T @ a[i] / 64).max() for i in range(4)) / 4 + p.reg)
        assert p.sigma2 == pytest.approx(np.mean((a**2).sum(2)) / 2)
        g = p.worker_grad_np(p.x_star).mean(0)
        assert np.linalg.norm(g) < 1e-9  # the minimiser of F
        assert 0 < p.heterogeneity <= p.zeta2 and p.growth == 0.0

    def test_dissimilarity_bound_holds_everywhere(self):
        p = self.P
        rng = np.random.default_rng(1)
        for scale in (0.1, 1.0, 10.0, 1000.0):
            for _ in range(50):
                x = scale * rng.normal(size=5)
                assert _dissimilarity(p.worker_grad_np(x)) <= p.zeta2

    def test_each_worker_samples_only_its_own_data(self):
        p = self.P
        x = np.array([0.5, -0.5, 1.0, 0.2, 0.0])
        for worker in (0, 3):
            g = _draws(p, x, worker=worker, n=4000)
            want = p.worker_grad_np(x)[worker]
            a, y = p.worker_features[worker], p.worker_targets[worker]
            per = a * (-y / (1.0 + np.exp(y * (a @ x))))[:, None] + p.reg * x
            var = ((per - want) ** 2).sum(1).mean() / 2
            assert np.all(np.abs(g.mean(0) - want) < 5 * np.sqrt(var / 4000) + 1e-5)
            assert var <= p.sigma2
        # the global gradient averages the workers'
        assert np.allclose(np.asarray(p.grad(jnp.asarray(x, jnp.float32))), p.worker_grad_np(x).mean(0), atol=1e-5)
