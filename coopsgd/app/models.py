"""Small Flax classifiers for the command line, as parameter pytrees and pure functions.

A model here is a :class:`Model`: ``init(key)`` returns a parameter pytree and
``apply(params, x)`` the logits, so :func:`loss_fn` gives the ``loss_fn(params, batch)`` that
:class:`coopsgd.CooperativeSGD` takes. Any other Flax model works the same way: pass its
``variables["params"]`` and a loss over ``module.apply``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["CNN", "MLP", "MODELS", "Model", "accuracy", "loss_fn", "make", "param_count"]

def _lecun_normal(key, shape, dtype=jnp.float32):
    """LeCun normal initialisation, ``N(0, 1/fan_in)`` (LeCun et al., "Efficient BackProp", 1998;
    the scale of Flax's default, not truncated).

    Drawn on the host by NumPy from the bits of the JAX ``key`` (the same key gives the same
    values): ``jax.random.normal`` costs seconds of XLA compilation per new shape on a CPU, a large
    share of a short command-line run. Under tracing (a jitted ``init``) it falls back to
    ``jax.random.normal``.
    """
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    std = 1.0 / np.sqrt(max(fan_in, 1))
    try:
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel().tolist()
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return (std * jax.random.normal(key, shape)).astype(dtype)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * std, dtype)


_INIT = _lecun_normal


class MLP(nn.Module):
    """Flatten, ``len(hidden)`` ReLU layers, then a linear layer to the logits."""

    hidden: Sequence[int] = (32,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=_INIT)(x))
        return nn.Dense(self.num_classes, kernel_init=_INIT)(x)


class CNN(nn.Module):
    """3×3 convolutions with ReLU (the second and later with stride 2), global average pool, linear."""

    features: Sequence[int] = (8, 16)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        if x.ndim == 3:
            x = x[..., None]
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(1, 1) if i == 0 else (2, 2), kernel_init=_INIT)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=_INIT)(x)


class Model(NamedTuple):
    """A module bound to an input shape: ``init(key) -> params``, ``apply(params, x) -> logits``."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]

    def init(self, key) -> Any:
        """The model's parameters, initialised from the PRNG ``key``."""
        return self.module.init(key, jnp.zeros((1, *self.input_shape), jnp.float32))["params"]

    def apply(self, params, x):
        """The logits of the inputs ``x`` under ``params``."""
        return self.module.apply({"params": params}, x)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN}
"""Model constructors by name."""


def make(name: str, input_shape, num_classes: int, **options) -> Model:
    """The named model for inputs of ``input_shape`` (one example) and ``num_classes`` classes.

    ``options`` go to the module (``hidden=(64,)`` for the MLP, ``features=(8, 16)`` for the CNN).
    The CNN needs image inputs ``(H, W)`` or ``(H, W, C)``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    input_shape = tuple(int(s) for s in input_shape)
    if name == "cnn" and len(input_shape) not in (2, 3):
        raise ValueError(
            f"the cnn model needs image inputs of shape (H, W) or (H, W, C), got {input_shape}; "
            "use the mlp model for vectors"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    key = (name, input_shape, int(num_classes), tuple(sorted(options.items())))
    try:
        return _made(key)
    except TypeError:  # an unhashable option (a list): a model of its own
        return _made.__wrapped__(key)


@functools.lru_cache(maxsize=16)
def _made(key) -> Model:
    """One :class:`Model` per distinct ``make`` call: Flax modules are immutable, and trainers whose
    loss closes over the same module share their compiled programs (a run repeated in one process
    compiles nothing)."""
    name, input_shape, num_classes, options = key
    return Model(name, MODELS[name](num_classes=num_classes, **dict(options)), input_shape)


def loss_fn(model: Model) -> Callable[[Any, dict], jax.Array]:
    """Mean softmax cross-entropy ``loss(params, {"x": …, "y": …})`` of ``model``."""

    def loss(params, batch):
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss


def accuracy(model: Model, params, x, y, chunk: int = 4096) -> float:
    """Fraction of ``x`` whose arg-max logit equals ``y`` (evaluated in chunks)."""
    correct = 0
    for s in range(0, len(y), chunk):
        logits = model.apply(params, jnp.asarray(x[s : s + chunk]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y[s : s + chunk])))
    return correct / max(len(y), 1)


def param_count(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
