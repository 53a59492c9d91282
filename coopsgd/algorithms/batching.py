"""Adaptive batch sizes for local gradient methods: the norm test, the (augmented) inner-product
test, and a host-side controller that grows, caps and buckets the batch size.

Every test compares the sample variance of per-example gradients with the squared norm of their
mean ``g_B`` on a batch ``B`` of size ``b`` and returns the smallest batch size that would pass
(Lau, Li, Xu, Liu & Kolar, "Communication-Efficient Adaptive Batch Size Strategies for
Distributed Local Gradient Methods", arXiv:2406.13936; the tests go back to Byrd, Chin, Nocedal
& Wu 2012 (norm test) and Bollapragada, Byrd & Nocedal 2018 (inner-product and orthogonality
tests)):

- **norm test** (η): passes iff ``Var̂/b ≤ η² ‖g_B‖²``; otherwise ``b ← ⌈Var̂ / (η² ‖g_B‖²)⌉``;
- **inner-product test** (θ): ``b ← ⌈Var̂_i(⟨∇f_i, g_B⟩) / (θ² ‖g_B‖⁴)⌉`` when larger;
- **orthogonality test** (ν): ``b ← ⌈Σ_coords Var̂_i(∇f_i − (⟨∇f_i, g_B⟩/‖g_B‖²) g_B) / (ν² ‖g_B‖²)⌉``;
  the **augmented inner-product test** takes the larger of the θ and ν requirements.

``Var̂`` is the per-coordinate sample variance (ddof = 1) of the per-example gradients, summed over
coordinates (all leaves of the gradient pytree).

**Where the tests run (coopsgd's choice).** At each synchronisation, on the per-example gradients
of each worker's last local mini-batch. Each worker reduces them to the few scalars of
:class:`BatchStats` (:func:`batch_stats`, jittable, ``vmap``-able over the worker axis); the
scalars are averaged across workers (:func:`pool`) alongside the model averaging, so no extra
communication round is needed; the test is evaluated once on the pooled statistics and the
:class:`BatchSizeController` sets one common per-worker batch size on the host, so every worker keeps
the same shapes. The pass condition uses the per-worker batch ``b`` (each local step's noise is
that of ``b`` examples); pooling only sharpens the estimates of ``Var̂`` and ``‖∇F‖²``. Running the
test per worker without pooling is the same code without :func:`pool`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from coopsgd.core.validate import require_int

__all__ = [
    "BatchSizeController",
    "BatchStats",
    "BatchTest",
    "augmented_inner_product_test",
    "batch_stats",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
    "pool",
    "worker_stats",
]


class BatchStats(NamedTuple):
    """Scalar summaries of one batch's per-example gradients (all with the same leading shape).

    Attributes:
        batch: b, the number of examples.
        sq_norm: ``‖g_B‖²``.
        variance: ``Var̂ = Σ_coords Var̂_i(∇f_i)``.
        ip_variance: ``Var̂_i(⟨∇f_i, g_B⟩)``.
        orth_variance: ``Σ_coords Var̂_i(∇f_i − (⟨∇f_i, g_B⟩/‖g_B‖²) g_B)``.
    """

    batch: jax.Array
    sq_norm: jax.Array
    variance: jax.Array
    ip_variance: jax.Array
    orth_variance: jax.Array


class BatchTest(NamedTuple):
    """``passed``: whether the current batch passes; ``required``: the smallest batch size that
    would pass (float; ``inf`` if ``g_B = 0`` with non-zero variance, ``0`` if both vanish)."""

    passed: jax.Array
    required: jax.Array


def batch_stats(per_example_grads) -> BatchStats:
    """Reduce per-example gradients (a pytree, leaves with leading batch axis b ≥ 2) to
    :class:`BatchStats`. Pure and jittable."""
    leaves = [jnp.reshape(x, (x.shape[0], -1)).astype(jnp.result_type(float)) for x in jax.tree.leaves(per_example_grads)]
    if not leaves:
        raise ValueError("per-example gradients are empty (no leaves)")
    b = leaves[0].shape[0]
    if any(x.shape[0] != b for x in leaves):
        raise ValueError(f"per-example gradient leaves disagree on the batch axis: {[x.shape[0] for x in leaves]}")
    if b < 2:
        raise ValueError(f"a batch-size test needs at least 2 examples for a sample variance, got b = {b}")
    means = [jnp.mean(x, axis=0) for x in leaves]
    sq_norm = sum(jnp.sum(g**2) for g in means)
    variance = sum(jnp.sum(jnp.var(x, axis=0, ddof=1)) for x in leaves)
    ips = sum(x @ g for x, g in zip(leaves, means))  # (b,) inner products <grad_i, g_B>
    ip_variance = jnp.var(ips, ddof=1)
    coef = jnp.where(sq_norm > 0, ips / jnp.where(sq_norm > 0, sq_norm, 1.0), 0.0)
    orth_variance = sum(jnp.sum(jnp.var(x - coef[:, None] * g[None, :], axis=0, ddof=1)) for x, g in zip(leaves, means))
    return BatchStats(jnp.asarray(b, dtype=sq_norm.dtype), sq_norm, variance, ip_variance, orth_variance)


def worker_stats(loss_fn):
    """``(workers, batch) -> BatchStats`` with a leading worker axis, jittable.

    ``loss_fn(params, batch)`` is the engine's per-worker loss on a mini-batch; ``workers`` are
    the stacked worker models (leading axis m) and ``batch`` a pytree with leaves ``(m, b, …)``.
    Per-example gradients come from ``jax.vmap`` over the examples of ``loss_fn`` on batches of
    one, then :func:`batch_stats` per worker; feed the result to :func:`pool`.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = lambda p, b: jnp.mean((b["x"] @ p - b["y"]) ** 2)
        >>> stats = worker_stats(loss)(jnp.zeros((2, 3)), {"x": jnp.ones((2, 4, 3)), "y": jnp.ones((2, 4))})
        >>> stats.variance.shape, float(stats.variance[0])     # every example has gradient (-2,-2,-2)
        ((2,), 0.0)
    """

    def one_worker(params, batch):
        def example_grad(example):
            return jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[None], example))

        return batch_stats(jax.vmap(example_grad)(batch))

    return jax.vmap(one_worker)


def pool(stats: BatchStats) -> BatchStats:
    """Average per-worker :class:`BatchStats` over their leading worker axis (the pooled estimate)."""
    return BatchStats(*(jnp.mean(s, axis=0) for s in stats))


def _stats(grads_or_stats) -> BatchStats:
    return grads_or_stats if isinstance(grads_or_stats, BatchStats) else batch_stats(grads_or_stats)


def _check_param(name: str, value, test: str) -> None:
    if isinstance(value, numbers.Real) and not float(value) > 0:
        raise ValueError(f"{test} parameter {name} must be > 0, got {name} = {value!r}")


def _required(numer, denom, batch) -> BatchTest:
    """``⌈numer / denom⌉`` with ``x/0 = inf`` for ``x > 0`` and ``0/0 = 0``; passes iff ≤ batch."""
    safe = jnp.where(denom > 0, denom, 1.0)
    required = jnp.where(denom > 0, jnp.ceil(numer / safe), jnp.where(numer > 0, jnp.inf, 0.0))
    # passes iff numer / denom <= batch, i.e. ⌈numer/denom⌉ <= batch for integer batch
    return BatchTest(passed=required <= batch, required=required)


def norm_test(grads_or_stats, eta) -> BatchTest:
    """Norm test: passes iff ``Var̂ / b ≤ η² ‖g_B‖²``; ``required = ⌈Var̂ / (η² ‖g_B‖²)⌉``
    (Byrd, Chin, Nocedal & Wu, Math. Program. 2012; Lau et al., arXiv:2406.13936).

    Args:
        grads_or_stats: per-example gradients (pytree, batch axis first) or :class:`BatchStats`.
        eta: η > 0 (typically 0.1–0.5).
    """
    _check_param("eta", eta, "norm test")
    s = _stats(grads_or_stats)
    return _required(s.variance, eta**2 * s.sq_norm, s.batch)


def inner_product_test(grads_or_stats, theta) -> BatchTest:
    """Inner-product test: ``required = ⌈Var̂_i(⟨∇f_i, g_B⟩) / (θ² ‖g_B‖⁴)⌉``
    (Bollapragada, Byrd & Nocedal, ICML 2018; Lau et al., arXiv:2406.13936)."""
    _check_param("theta", theta, "inner-product test")
    s = _stats(grads_or_stats)
    return _required(s.ip_variance, theta**2 * s.sq_norm**2, s.batch)


def orthogonality_test(grads_or_stats, nu) -> BatchTest:
    """Orthogonality test: ``required = ⌈Σ Var̂_i(∇f_i − (⟨∇f_i, g_B⟩/‖g_B‖²) g_B) / (ν² ‖g_B‖²)⌉``
    (Bollapragada, Byrd & Nocedal, ICML 2018)."""
    _check_param("nu", nu, "orthogonality test")
    s = _stats(grads_or_stats)
    return _required(s.orth_variance, nu**2 * s.sq_norm, s.batch)


def augmented_inner_product_test(grads_or_stats, theta, nu) -> BatchTest:
    """Augmented inner-product test: the larger of the inner-product (θ) and orthogonality (ν)
    requirements; passes iff both pass (Bollapragada, Byrd & Nocedal, ICML 2018; Lau et al.)."""
    s = _stats(grads_or_stats)
    ip, orth = inner_product_test(s, theta), orthogonality_test(s, nu)
    return BatchTest(passed=ip.passed & orth.passed, required=jnp.maximum(ip.required, orth.required))


class BatchSizeController:
    """Host-side batch-size state: grows (never shrinks), capped at ``maximum``, bucketed.

    ``update(required)`` takes the requirement of a test (a :class:`BatchTest`, or a number) and sets
    ``batch_size = bucket(max(batch_size, required))``, capped at ``maximum``. Buckets keep the set of
    sizes — hence of compiled shapes — small:

    - ``"double"`` (default): ``initial · 2^k`` (powers of two when ``initial`` is one);
    - ``"pow2"``: the next power of two (the initial size is used as given);
    - ``"exact"``: no bucketing (a recompilation per distinct size);
    - a sequence of allowed sizes: the smallest one that is large enough.

    ``maximum`` is always the last bucket. NaN requirements are ignored; ``inf`` jumps to
    ``maximum``.

    Args:
        initial: the starting per-worker batch size (≥ 1).
        maximum: the cap (≥ ``initial``).
        buckets: see above.

    Attributes:
        sizes: the distinct batch sizes used so far, in order (one compilation each).
        history: the batch size after every update.

    Example:
        >>> ctl = BatchSizeController(32, 512)
        >>> ctl.update(70), ctl.update(10), ctl.update(1e9)
        (128, 128, 512)
    """

    def __init__(self, initial: int, maximum: int, *, buckets: str | Sequence[int] = "double"):
        self.initial = require_int("initial batch size", initial, 1)
        maximum = require_int("maximum batch size", maximum, 1)
        if maximum < self.initial:
            raise ValueError(
                f"maximum batch size must be >= the initial batch size {self.initial}, got maximum = {maximum}"
            )
        self.maximum = maximum
        if isinstance(buckets, str):
            if buckets not in ("double", "pow2", "exact"):
                raise ValueError(f"buckets must be 'double', 'pow2', 'exact' or a sequence of sizes, got {buckets!r}")
            self._allowed = None
        else:
            allowed = sorted({require_int("bucket size", s, 1) for s in buckets})
            self._allowed = [s for s in allowed if self.initial < s < self.maximum] + [self.maximum]
        self.buckets = buckets
        self.batch_size = self.initial
        self.sizes = [self.initial]
        self.history: list[int] = []

    def bucket(self, target: int) -> int:
        """The smallest allowed size ≥ ``target`` (at most ``maximum``; never below the current)."""
        target = max(int(target), self.batch_size)
        if target >= self.maximum:
            return self.maximum
        if target == self.batch_size:
            return target
        if self._allowed is not None:
            size = next(s for s in self._allowed if s >= target)
        elif self.buckets == "exact":
            size = target
        elif self.buckets == "pow2":
            size = 1 << (target - 1).bit_length()
        else:  # double
            size = self.initial << max(0, math.ceil(math.log2(target / self.initial) - 1e-12))
            while size < target:
                size *= 2
        return min(size, self.maximum)

    def update(self, required) -> int:
        """Grow the batch to at least ``required`` (bucketed, capped); return the new size."""
        if isinstance(required, BatchTest):
            required = required.required
        value = float(required)
        if math.isnan(value):
            self.history.append(self.batch_size)
            return self.batch_size
        target = self.maximum if math.isinf(value) or value >= self.maximum else math.ceil(value)
        new = self.bucket(target)
        if new != self.batch_size:
            self.batch_size = new
            self.sizes.append(new)
        self.history.append(self.batch_size)
        return self.batch_size

    @property
    def at_maximum(self) -> bool:
        return self.batch_size >= self.maximum

    def __repr__(self) -> str:
        return f"BatchSizeController(batch_size={self.batch_size}, maximum={self.maximum}, buckets={self.buckets!r})"
