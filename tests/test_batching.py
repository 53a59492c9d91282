"""Adaptive batch sizes: norm and (augmented) inner-product tests, and the controller."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coopsgd.algorithms.batching import (
    BatchSizeController,
    BatchStats,
    augmented_inner_product_test,
    batch_stats,
    inner_product_test,
    norm_test,
    orthogonality_test,
    pool,
)

# Four per-example gradients in R^2 (hand example used throughout):
#   mean g_B = (2, 0), ||g_B||^2 = 4
#   coordinate variances (ddof 1): (1+1+0+0)/3 = 2/3 and (0+0+1+1)/3 = 2/3 -> Var = 4/3
#   <g_i, g_B> = 2, 6, 4, 4 -> mean 4, variance (4+4+0+0)/3 = 8/3
#   residuals g_i - (<g_i,g_B>/4) g_B = (0,0), (0,0), (0,1), (0,-1) -> orthogonal variance 2/3
GRADS = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0], [2.0, -1.0]])


class TestStatistics:
    @pytest.mark.parametrize("use_jit", [False, True])
    def test_hand_values(self, use_jit):
        fn = jax.jit(batch_stats) if use_jit else batch_stats
        s = fn(jnp.asarray(GRADS))
        assert float(s.batch) == 4
        assert float(s.sq_norm) == pytest.approx(4.0)
        assert float(s.variance) == pytest.approx(4 / 3)
        assert float(s.ip_variance) == pytest.approx(8 / 3)
        assert float(s.orth_variance) == pytest.approx(2 / 3)

    def test_pytree_equals_concatenation(self):
        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 2, 2))
        tree = batch_stats({"a": jnp.asarray(a), "b": jnp.asarray(b)})
        flat = batch_stats(jnp.asarray(np.concatenate([a, b.reshape(6, 4)], axis=1)))
        for x, y in zip(tree, flat):
            assert float(x) == pytest.approx(float(y), rel=1e-5)

    def test_against_numpy_definitions(self):
        rng = np.random.default_rng(1)
        g = rng.normal(loc=0.3, size=(16, 5))
        mean = g.mean(0)
        ip = g @ mean
        resid = g - np.outer(ip / (mean @ mean), mean)
        s = batch_stats(jnp.asarray(g))
        assert float(s.variance) == pytest.approx(g.var(0, ddof=1).sum(), rel=1e-5)
        assert float(s.ip_variance) == pytest.approx(ip.var(ddof=1), rel=1e-5)
        assert float(s.orth_variance) == pytest.approx(resid.var(0, ddof=1).sum(), rel=1e-5)

    def test_pool_averages_worker_statistics(self):
        rng = np.random.default_rng(2)
        grads = jnp.asarray(rng.normal(size=(3, 8, 4)))  # 3 workers, b = 8
        per_worker = jax.vmap(batch_stats)(grads)
        pooled = pool(per_worker)
        assert isinstance(pooled, BatchStats)
        for field in BatchStats._fields:
            expected = np.mean([float(getattr(batch_stats(grads[i]), field)) for i in range(3)])
            assert float(getattr(pooled, field)) == pytest.approx(expected, rel=1e-5)
        assert float(pooled.batch) == 8

    def test_needs_two_examples(self):
        with pytest.raises(ValueError, match="at least 2"):
            batch_stats(jnp.ones((1, 3)))


class TestTests:
    def test_norm_test_hand_values(self):
        # passes iff (4/3)/4 <= eta^2 * 4, i.e. eta^2 >= 1/12 = 0.08333
        passing = norm_test(jnp.asarray(GRADS), 0.3)  # 0.09
        assert bool(passing.passed)
        assert float(passing.required) == math.ceil((4 / 3) / (0.09 * 4))  # = 4
        failing = norm_test(jnp.asarray(GRADS), 0.28)  # 0.0784
        assert not bool(failing.passed)
        assert float(failing.required) == 5  # ceil(4.2517)

    def test_inner_product_and_orthogonality_hand_values(self):
        ip = inner_product_test(jnp.asarray(GRADS), 0.5)  # (8/3) / (0.25 * 16) = 0.667
        assert float(ip.required) == 1 and bool(ip.passed)
        orth = orthogonality_test(jnp.asarray(GRADS), 0.1)  # (2/3) / (0.01 * 4) = 16.67
        assert float(orth.required) == 17 and not bool(orth.passed)
        aug = augmented_inner_product_test(jnp.asarray(GRADS), 0.5, 0.1)
        assert float(aug.required) == 17 and not bool(aug.passed)
        aug = augmented_inner_product_test(jnp.asarray(GRADS), 0.2, 1.0)  # (8/3)/(0.04*16) = 4.17
        assert float(aug.required) == 5 and not bool(aug.passed)
        aug = augmented_inner_product_test(jnp.asarray(GRADS), 0.5, 1.0)
        assert bool(aug.passed)

    def test_jittable_and_vmappable(self):
        grads = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 3)))
        out = jax.jit(jax.vmap(lambda g: norm_test(g, 0.5)))(grads)
        assert out.passed.shape == (4,) and out.required.shape == (4,)
        out = jax.jit(lambda g, e: norm_test(g, e))(grads[0], 0.5)  # traced eta
        assert out.required.shape == ()

    def test_zero_mean_gradient(self):
        g = jnp.asarray([[1.0], [-1.0]])
        t = norm_test(g, 0.5)
        assert not bool(t.passed) and math.isinf(float(t.required))
        t = norm_test(jnp.zeros((3, 2)), 0.5)
        assert bool(t.passed) and float(t.required) == 0

    @pytest.mark.parametrize("fn, args", [(norm_test, (0.0,)), (inner_product_test, (-1.0,)), (orthogonality_test, (0.0,))])
    def test_bad_parameters(self, fn, args):
        with pytest.raises(ValueError):
            fn(jnp.asarray(GRADS), *args)


class TestController:
    def test_norm_test_enlarges_exactly_when_variance_condition_fails(self):
        rng = np.random.default_rng(0)
        grew = kept = 0
        for _ in range(60):
            b = int(rng.integers(2, 12))
            g = rng.normal(loc=rng.normal(size=3), scale=rng.uniform(0.1, 3.0), size=(b, 3))
            eta = float(rng.uniform(0.05, 1.0))
            var = g.var(0, ddof=1).sum()
            sq = (g.mean(0) ** 2).sum()
            condition_holds = var / b <= eta**2 * sq
            ctl = BatchSizeController(b, 10**6, buckets="exact")
            new = ctl.update(norm_test(jnp.asarray(g, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32), eta))
            if condition_holds:
                assert new == b
                kept += 1
            else:
                assert new == math.ceil(var / (eta**2 * sq) - 1e-6) or new == math.ceil(var / (eta**2 * sq))
                assert new > b
                grew += 1
        assert grew > 5 and kept > 5  # both branches exercised

    def test_hand_sequence_double_buckets(self):
        ctl = BatchSizeController(32, 512)
        assert ctl.update(33) == 64
        assert ctl.update(10) == 64  # never shrinks
        assert ctl.update(64) == 64
        assert ctl.update(65) == 128
        assert ctl.update(300) == 512
        assert ctl.update(5000) == 512  # capped
        assert ctl.sizes == [32, 64, 128, 512] and ctl.at_maximum
        assert ctl.history == [64, 64, 64, 128, 512, 512]

    def test_pow2_and_exact_and_custom_buckets(self):
        ctl = BatchSizeController(24, 200, buckets="pow2")
        assert ctl.update(25) == 32 and ctl.update(100) == 128 and ctl.update(129) == 200
        ctl = BatchSizeController(24, 200, buckets="exact")
        assert ctl.update(25) == 25 and ctl.update(199) == 199 and ctl.update(1e9) == 200
        ctl = BatchSizeController(10, 100, buckets=[16, 50, 8])
        assert ctl.update(11) == 16 and ctl.update(17) == 50 and ctl.update(51) == 100

    def test_few_recompilations(self):
        ctl = BatchSizeController(8, 4096)
        for required in np.linspace(8, 4096, 500):
            ctl.update(required)
        assert set(ctl.sizes) <= {8 << k for k in range(10)}  # 8, 16, ..., 4096 only
        assert len(ctl.sizes) <= 10 and ctl.batch_size == 4096

    def test_nan_and_inf(self):
        ctl = BatchSizeController(8, 64)
        assert ctl.update(float("nan")) == 8
        assert ctl.update(float("inf")) == 64

    def test_cap_below_initial(self):
        with pytest.raises(ValueError, match="maximum batch size"):
            BatchSizeController(64, 32)

    @pytest.mark.parametrize("kwargs", [dict(initial=0, maximum=8), dict(initial=4, maximum=8, buckets="fib")])
    def test_bad_input(self, kwargs):
        with pytest.raises(ValueError):
            BatchSizeController(**kwargs)


def test_docstring_examples():
    import doctest

    from coopsgd.algorithms import batching

    assert doctest.testmod(batching, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_worker_stats_matches_hand_per_example_gradients():
    from coopsgd.algorithms.batching import worker_stats

    def loss(p, b):  # least squares: per-example gradient 2 (x.p - y) x
        return jnp.mean((b["x"] @ p - b["y"]) ** 2)

    rng = np.random.default_rng(5)
    m, b, d = 3, 6, 4
    params = rng.normal(size=(m, d)).astype(np.float32)
    x = rng.normal(size=(m, b, d)).astype(np.float32)
    y = rng.normal(size=(m, b)).astype(np.float32)
    got = jax.jit(worker_stats(loss))(jnp.asarray(params), {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    for i in range(m):
        grads = 2 * (x[i] @ params[i] - y[i])[:, None] * x[i]
        assert float(got.variance[i]) == pytest.approx(grads.var(0, ddof=1).sum(), rel=1e-4)
        assert float(got.sq_norm[i]) == pytest.approx((grads.mean(0) ** 2).sum(), rel=1e-4)
