"""Models: shapes, parameter counts derived by hand, the loss at init, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coopsgd.app import models


class TestModels:
    def test_mlp_param_count_by_hand(self):
        m = models.make("mlp", (8, 8, 1), 10, hidden=(32,))
        params = m.init(jax.random.key(0))
        # 64*32 + 32 + 32*10 + 10
        assert models.param_count(params) == 64 * 32 + 32 + 32 * 10 + 10

    def test_cnn_param_count_by_hand_and_logits(self):
        m = models.make("cnn", (8, 8, 1), 10, features=(8, 16))
        params = m.init(jax.random.key(0))
        assert models.param_count(params) == (9 * 1 * 8 + 8) + (9 * 8 * 16 + 16) + (16 * 10 + 10)
        assert m.apply(params, jnp.zeros((5, 8, 8, 1))).shape == (5, 10)

    def test_loss_is_cross_entropy(self):
        m = models.make("mlp", (3,), 4, hidden=())
        params = jax.tree.map(jnp.zeros_like, m.init(jax.random.key(0)))
        # All-zero weights: uniform softmax, so the loss is log(4) for any labels.
        loss = models.loss_fn(m)(params, {"x": jnp.ones((6, 3)), "y": jnp.arange(6) % 4})
        assert float(loss) == pytest.approx(np.log(4.0), rel=1e-6)

    def test_training_reduces_loss_and_accuracy_in_range(self):
        m = models.make("mlp", (2,), 2, hidden=(8,))
        x = np.array([[0, 0], [1, 1], [0, 1], [1, 0]] * 8, np.float32)
        y = (x[:, 0] > 0.5).astype(np.int32)
        loss = models.loss_fn(m)
        params = m.init(jax.random.key(1))
        tx = optax.sgd(0.5)
        state = tx.init(params)
        first = float(loss(params, {"x": x, "y": y}))
        @jax.jit
        def step(params, state):
            g = jax.grad(loss)(params, {"x": x, "y": y})
            upd, state = tx.update(g, state)
            return optax.apply_updates(params, upd), state

        for _ in range(100):
            params, state = step(params, state)
        assert float(loss(params, {"x": x, "y": y})) < 0.5 * first
        assert models.accuracy(m, params, x, y, chunk=5) == 1.0

    def test_errors(self):
        with pytest.raises(ValueError, match="valid models: mlp, cnn"):
            models.make("resnet", (8, 8), 10)
        with pytest.raises(ValueError, match="image inputs"):
            models.make("cnn", (64,), 10)
        with pytest.raises(ValueError, match="num_classes"):
            models.make("mlp", (64,), 1)
