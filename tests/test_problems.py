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
