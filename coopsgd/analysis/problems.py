"""Objectives with known constants (L, σ², F_inf) for putting a run beside its bound.

Each problem exposes the smoothness ``L``, the gradient-noise variance ``sigma2`` of Theorem 1 of
Cooperative SGD (Wang & Joshi, arXiv:1808.07576: ``E‖g − ∇F‖² ≤ σ²``), ``f_inf``, a start ``x0``
and ``f_gap = F(x0) − f_inf``, the full objective and gradient, and a stochastic gradient.

The stochastic gradient is drawn from a PRNG key, so the engine's ``loss_fn(params, batch)`` can
carry its noise in the batch: a batch for one worker is ``{"key": uint32[2], "worker": int32}``
(see :meth:`Problem.batch`). Nothing is stored per sample, and vmapping over seeds only vmaps keys.

- :func:`quadratic` — ``F(x) = (1/m) Σ_i ½ (x − x_i*)ᵀ A (x − x_i*)``, ``μ I ⪯ A ⪯ L I``, with
  additive Gaussian noise ``ξ ~ N(0, σ²/d · I)``: every constant is exact. Optional per-worker
  optima; :func:`heterogeneous_quadratic` and :func:`noniid_logistic_regression` (module
  :mod:`coopsgd.analysis.noniid`) add per-worker Hessians and non-IID data.
- :func:`linear_regression` — least squares on generated data, mini-batches sampled with
  replacement; σ² is bounded on the initial sublevel set (stated in the function).
- :func:`logistic_regression` — ℓ2-regularised logistic loss on generated data; σ² is a global
  bound (stated in the function); ``f_inf`` by Newton's method in float64.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HeterogeneousQuadratic",
    "LinearRegression",
    "LogisticRegression",
    "NonIIDLogistic",
    "Problem",
    "Quadratic",
    "heterogeneous_quadratic",
    "linear_regression",
    "logistic_minimum",
    "logistic_regression",
    "noniid_logistic_regression",
    "quadratic",
]


def _require(name: str, value, rule, message: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not (math.isfinite(x) and rule(x)):
        raise ValueError(f"{name} = {value!r} breaks the rule: {message}")
    return x


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name} = {value!r}")
    return int(value)


class Problem:
    """An objective ``F`` with known constants, a full gradient and a key-driven stochastic gradient.

    Attributes:
        name: label for tables.
        d: dimension of the parameter vector.
        L: smoothness constant of F.
        mu: a strong-convexity constant of F (0 if none is known).
        sigma2: σ² with ``E‖g(x) − ∇F(x)‖² ≤ σ²`` (how it is obtained is stated per problem).
        f_inf: ``inf F``.
        x0: the starting point (float64 NumPy vector).
        m: number of workers the problem is built for (``None``: any; the data are identical).
        heterogeneity: ``(1/m) Σ_i ‖∇F_i(x) − ∇F(x)‖²`` where that is constant, else its value at
            the minimiser (0 when identical).
        zeta2, growth: ζ̄² and B with ``(1/m) Σ_i ‖∇F_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²`` for every x,
            the dissimilarity of Koloskova et al. (2020, arXiv:2003.10422); both 0 for identical data.
    """

    name: str
    d: int
    L: float
    mu: float
    sigma2: float
    f_inf: float
    x0: np.ndarray
    m: int | None = None
    heterogeneity: float = 0.0
    zeta2: float = 0.0
    growth: float = 0.0

    @property
    def identical(self) -> bool:
        """Whether every worker has the same objective (ζ̄² = B = 0): Theorem 1's setting."""
        return self.zeta2 == 0.0 and self.growth == 0.0

    # -- to implement -------------------------------------------------------------------------
    def value(self, x):
        """F(x) (jnp; works inside jit)."""
        raise NotImplementedError

    def grad(self, x):
        """∇F(x), the full gradient (jnp; works inside jit)."""
        raise NotImplementedError

    def loss_fn(self, params, batch):
        """A scalar whose gradient in ``params`` is worker ``batch["worker"]``'s stochastic
        gradient drawn from ``batch["key"]``: the ``loss_fn`` to hand to
        :class:`coopsgd.CooperativeSGD`."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def f_gap(self) -> float:
        """``F(x0) − f_inf`` in float64."""
        return float(self.value_np(self.x0)) - self.f_inf

    def value_np(self, x) -> float:
        """F(x) in float64 on the host (NumPy)."""
        raise NotImplementedError

    def grad_norm_sq(self, x):
        """``‖∇F(x)‖²``."""
        g = self.grad(x)
        return jnp.vdot(g, g)

    def stochastic_grad(self, x, key, worker=0):
        """One stochastic gradient of worker ``worker`` at ``x``, drawn from ``key``."""
        return jax.grad(self.loss_fn)(x, {"key": key, "worker": jnp.asarray(worker, jnp.int32)})

    def batch(self, key, m: int):
        """The engine batch for one step: ``{"key": uint32[m, 2], "worker": int32[m]}``, one
        independent key per worker. Pure and vmappable over ``key``."""
        return {"key": jax.random.split(key, m), "worker": jnp.arange(m, dtype=jnp.int32)}

    def batches(self, key, steps: int, m: int):
        """``steps`` batches stacked on a leading axis: leaves of shape ``(steps, m, …)``."""
        keys = jax.random.split(key, steps)
        return jax.vmap(lambda k: self.batch(k, m))(keys)

    def check_workers(self, m: int) -> None:
        """Raise if this problem was built for a different number of workers."""
        if self.m is not None and self.m != m:
            raise ValueError(f"problem {self.name} was built with per-worker data for m = {self.m} workers, "
                             f"but the algorithm has m = {m}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name}: d={self.d}, L={self.L:.4g}, mu={self.mu:.4g}, "
            f"sigma2={self.sigma2:.4g}, f_inf={self.f_inf:.6g}, f_gap={self.f_gap:.4g})"
        )


# ----------------------------------------------------------------------------------------------


class Quadratic(Problem):
    """``F_i(x) = ½ (x − x_i*)ᵀ A (x − x_i*)``, ``F = (1/m) Σ_i F_i``, noise ``N(0, σ²/d · I)``.

    ``A = Q diag(eigenvalues) Qᵀ`` (Q = I unless rotated). Build with :func:`quadratic`.
    With ``x̄* = mean_i x_i*``: ``F(x) = ½ (x − x̄*)ᵀ A (x − x̄*) + f_inf`` and
    ``f_inf = (1/m) Σ_i ½ (x_i* − x̄*)ᵀ A (x_i* − x̄*)`` [derived].
    """

    def __init__(self, eigenvalues, sigma2, optima, x0, rotation=None, name="quadratic"):
        lam = np.asarray(eigenvalues, dtype=np.float64)
        self.eigenvalues = lam
        self.d = len(lam)
        self.L = float(lam.max())
        self.mu = float(lam.min())
        self.sigma2 = float(sigma2)
        self.optima = np.asarray(optima, dtype=np.float64)  # (m or 1, d)
        self.x_star = self.optima.mean(axis=0)
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self.x0 = np.asarray(x0, dtype=np.float64)
        self.m = None if len(self.optima) == 1 else len(self.optima)
        self.name = name
        dev = self._to_eig(self.optima - self.x_star)  # (m, d) in the eigenbasis
        self.f_inf = float(0.5 * np.mean(np.sum(lam * dev**2, axis=1)))
        self.heterogeneity = float(np.mean(np.sum((lam * dev) ** 2, axis=1)))
        self.zeta2 = self.heterogeneity  # ∇F_i − ∇F = A(x̄* − x_i*) is constant [derived]
        self.A = (
            np.diag(lam) if self.rotation is None else self.rotation @ np.diag(lam) @ self.rotation.T
        )

    @property
    def worker_eigenvalues(self) -> np.ndarray:
        """``(m or 1, d)``: the eigenvalues of each worker's Hessian in the shared eigenbasis."""
        return self.eigenvalues[None, :]

    def _to_eig(self, x):
        """Coordinates in A's eigenbasis (NumPy)."""
        return x if self.rotation is None else x @ self.rotation

    def _apply_a(self, x, dtype):
        lam = jnp.asarray(self.eigenvalues, dtype)
        if self.rotation is None:
            return lam * x
        q = jnp.asarray(self.rotation, dtype)
        return q @ (lam * (q.T @ x))

    def value(self, x):
        x = jnp.asarray(x)
        e = x - jnp.asarray(self.x_star, x.dtype)
        return 0.5 * jnp.vdot(e, self._apply_a(e, x.dtype)) + self.f_inf

    def grad(self, x):
        x = jnp.asarray(x)
        return self._apply_a(x - jnp.asarray(self.x_star, x.dtype), x.dtype)

    def value_np(self, x) -> float:
        e = np.asarray(x, dtype=np.float64) - self.x_star
        return float(0.5 * e @ self.A @ e + self.f_inf)

    def loss_fn(self, params, batch):
        """``F_w(x) + ξ·(x − stop_gradient(x))``: its value is ``F_w(x)``, its gradient
        ``A(x − x_w*) + ξ`` with ``ξ = sqrt(σ²/d) · N(0, I)`` drawn from ``batch["key"]``."""
        x = params
        opt = jnp.asarray(self.optima, x.dtype)[jnp.minimum(batch["worker"], len(self.optima) - 1)]
        e = x - opt
        xi = jnp.sqrt(self.sigma2 / self.d) * jax.random.normal(batch["key"], x.shape, x.dtype)
        return 0.5 * jnp.vdot(e, self._apply_a(e, x.dtype)) + jnp.vdot(xi, x - jax.lax.stop_gradient(x))


def quadratic(
    d: int,
    L: float = 1.0,
    mu: float = 0.01,
    sigma2: float = 1.0,
    seed: int = 0,
    *,
    m: int | None = None,
    heterogeneity: float = 0.0,
    rotate: bool = False,
    x0_distance: float = 1.0,
) -> Quadratic:
    """A d-dimensional quadratic with eigenvalues evenly spaced in [μ, L] and exact constants.

    Noise is additive Gaussian, ``ξ ~ N(0, σ²/d · I)``, so ``E‖g − ∇F_i‖² = σ²`` exactly and the
    gradient is unbiased (β = 0 in Cooperative SGD's assumption). The optimum x̄* is drawn from
    ``N(0, x0_distance²/d · I)`` and the start is ``x0 = 0``.

    Args:
        d: dimension, ≥ 1.
        L, mu: largest and smallest eigenvalue of A, ``0 ≤ μ ≤ L``, ``L > 0``.
        sigma2: noise variance σ², ≥ 0.
        seed: seed of the optima (and of the rotation).
        m: number of workers, needed only with ``heterogeneity > 0``.
        heterogeneity: spread of the per-worker optima: ``x_i* = x̄* + heterogeneity · δ_i`` with
            centred ``δ_i ~ N(0, I/d)``; ζ̄² = ``heterogeneity`` attribute, exact (Koloskova et al.'s bound).
        rotate: use ``A = Q diag(λ) Qᵀ`` with a random orthogonal Q instead of a diagonal A.
        x0_distance: scale of ``‖x0 − x̄*‖``.

    Example:
        >>> p = quadratic(4, L=2.0, mu=0.5, sigma2=0.3)
        >>> p.L, p.mu, p.sigma2, p.f_inf
        (2.0, 0.5, 0.3, 0.0)
    """
    d = _int("d", d, 1)
    L = _require("L", L, lambda x: x > 0, "L > 0 (F must be L-smooth with a positive constant)")
    mu = _require("mu", mu, lambda x: 0 <= x <= L, f"0 <= mu <= L = {L}")
    sigma2 = _require("sigma2", sigma2, lambda x: x >= 0, "sigma2 >= 0 (a variance)")
    heterogeneity = _require("heterogeneity", heterogeneity, lambda x: x >= 0, "heterogeneity >= 0")
    x0_distance = _require("x0_distance", x0_distance, lambda x: x >= 0, "x0_distance >= 0")
    if heterogeneity > 0 and m is None:
        raise ValueError("heterogeneity > 0 needs m, the number of workers, for the per-worker optima")
    if m is not None:
        m = _int("m", m, 1)
    rng = np.random.default_rng(seed)
    lam = np.linspace(mu, L, d) if d > 1 else np.array([L])
    x_star = rng.normal(size=d) * x0_distance / math.sqrt(d)
    if heterogeneity > 0:
        delta = rng.normal(size=(m, d)) / math.sqrt(d)
        delta -= delta.mean(axis=0)
        optima = x_star + heterogeneity * delta
    else:
        optima = x_star[None]
    rotation = None
    if rotate:
        q, r = np.linalg.qr(rng.normal(size=(d, d)))
        rotation = q * np.sign(np.diag(r))
        optima = optima @ rotation.T  # the same optima, expressed in the rotated basis
    name = f"quadratic(d={d}" + (f", m={m}, optima {heterogeneity:g})" if heterogeneity > 0 else ")")
    return Quadratic(lam, sigma2, optima, np.zeros(d), rotation, name=name)


# ----------------------------------------------------------------------------------------------


class _SampledProblem(Problem):
    """Finite-sum objectives ``F = (1/N) Σ_j f_j``: a stochastic gradient averages ``batch_size``
    examples drawn uniformly with replacement, from the key."""

    features: np.ndarray
    targets: np.ndarray
    batch_size: int

    def _example_loss(self, x, a, y):
        raise NotImplementedError

    def _reg(self, x):
        return 0.0

    def value(self, x):
        x = jnp.asarray(x)
        a = jnp.asarray(self.features, x.dtype)
        y = jnp.asarray(self.targets, x.dtype)
        return jnp.mean(self._example_loss(x, a, y)) + self._reg(x)

    def grad(self, x):
        return jax.grad(self.value)(jnp.asarray(x))

    def value_np(self, x) -> float:
        x = np.asarray(x, dtype=np.float64)
        return float(np.mean(self._example_loss_np(x)) + 0.5 * self._reg_np() * x @ x)

    def _reg_np(self) -> float:
        return 0.0

    def loss_fn(self, params, batch):
        """Mean loss over ``batch_size`` examples sampled with replacement using ``batch["key"]``."""
        x = params
        idx = jax.random.randint(batch["key"], (self.batch_size,), 0, len(self.targets))
        a = jnp.asarray(self.features, x.dtype)[idx]
        y = jnp.asarray(self.targets, x.dtype)[idx]
        return jnp.mean(self._example_loss(x, a, y)) + self._reg(x)


class LinearRegression(_SampledProblem):
    """``F(x) = (1/2N) ‖Ax − y‖²``. Build with :func:`linear_regression`."""

    def _example_loss(self, x, a, y):
        return 0.5 * (a @ x - y) ** 2

    def _example_loss_np(self, x):
        return 0.5 * (self.features @ x - self.targets) ** 2


class LogisticRegression(_SampledProblem):
    """``F(x) = (1/N) Σ_j log(1 + exp(−y_j a_jᵀx)) + (λ/2)‖x‖²``, ``y_j ∈ {−1, +1}``.
    Build with :func:`logistic_regression`."""

    reg: float

    def _example_loss(self, x, a, y):
        return jax.nn.softplus(-y * (a @ x))

    def _reg(self, x):
        return 0.5 * self.reg * jnp.vdot(x, x)

    def _example_loss_np(self, x):
        return np.logaddexp(0.0, -self.targets * (self.features @ x))

    def _reg_np(self) -> float:
        return self.reg


def _data(n_samples, d, seed, batch_size):
    n_samples = _int("n_samples", n_samples, 1)
    d = _int("d", d, 1)
    batch_size = _int("batch_size", batch_size, 1)
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 0.3, d)  # unequal feature scales: a spread of curvatures
    a = rng.normal(size=(n_samples, d)) * scales
    return rng, a, n_samples, d, batch_size


def linear_regression(
    n_samples: int = 512,
    d: int = 10,
    *,
    noise: float = 0.5,
    batch_size: int = 1,
    seed: int = 0,
) -> LinearRegression:
    """Least squares on generated data: ``a_j ~ N(0, diag(s)²)``, ``y_j = a_jᵀw + noise·ε_j``.

    Constants: ``L = λ_max(AᵀA/N)``, ``μ = λ_min(AᵀA/N)``, ``f_inf = F(x*)`` with x* by least squares
    (float64), ``x0 = 0``.

    σ², by the stated method (sampling noise is not uniformly bounded for least squares, so Theorem
    1's assumption holds only on a bounded set): for x in the initial sublevel set
    ``S = {F(x) ≤ F(x0)}``, with ``e = x − x*``, ``g_j(x) = a_j a_jᵀ e + g_j(x*)``, so by
    Minkowski's inequality and ``eᵀ H e ≤ 2 f_gap`` (H = AᵀA/N)::

        E‖g − ∇F‖² ≤ (1/b) E_j‖g_j(x)‖² ≤ (1/b) (sqrt(2 f_gap λ_max(H^{-½} M H^{-½})) + sqrt(s₀))²

    with ``M = E_j[‖a_j‖² a_j a_jᵀ]`` and ``s₀ = E_j‖g_j(x*)‖²`` [derived]. The bound is valid while
    the iterates stay in S (typical for small η, not guaranteed).

    Args:
        n_samples: N, number of examples.
        d: dimension.
        noise: standard deviation of the label noise.
        batch_size: b, examples per stochastic gradient.
        seed: data seed.
    """
    rng, a, n_samples, d, batch_size = _data(n_samples, d, seed, batch_size)
    noise = _require("noise", noise, lambda x: x >= 0, "noise >= 0 (a standard deviation)")
    w = rng.normal(size=d)
    y = a @ w + noise * rng.normal(size=n_samples)
    p = LinearRegression()
    p.name, p.d, p.features, p.targets, p.batch_size = "linear_regression", d, a, y, batch_size
    h = a.T @ a / n_samples
    eig = np.linalg.eigvalsh(h)
    if eig[0] <= 1e-12:
        raise ValueError(
            f"linear_regression needs n_samples >= d for a unique minimiser; AᵀA/N is singular "
            f"(n_samples = {n_samples}, d = {d})"
        )
    p.L, p.mu = float(eig[-1]), float(eig[0])
    x_star = np.linalg.lstsq(a, y, rcond=None)[0]
    resid = a @ x_star - y
    p.f_inf = float(0.5 * np.mean(resid**2))
    p.x0 = np.zeros(d)
    p.x_star = x_star
    f_gap = float(0.5 * np.mean((a @ p.x0 - y) ** 2)) - p.f_inf
    mm = (a * (a**2).sum(axis=1, keepdims=True)).T @ a / n_samples
    hi = np.linalg.inv(np.linalg.cholesky(h))
    lam_m = float(np.linalg.eigvalsh(hi @ mm @ hi.T)[-1])
    s0 = float(np.mean((resid**2) * (a**2).sum(axis=1)))
    p.sigma2 = (math.sqrt(2.0 * max(f_gap, 0.0) * lam_m) + math.sqrt(s0)) ** 2 / batch_size
    return p


def logistic_regression(
    n_samples: int = 512,
    d: int = 10,
    *,
    reg: float = 1e-2,
    label_noise: float = 0.1,
    batch_size: int = 1,
    seed: int = 0,
) -> LogisticRegression:
    """ℓ2-regularised logistic regression on generated, non-separable data.

    Labels ``y_j = sign(a_jᵀw)`` flipped with probability ``label_noise``. Constants:
    ``L = λ_max(AᵀA/N)/4 + λ`` (the logistic loss has curvature ≤ ¼), ``μ = λ``,
    ``f_inf`` by Newton's method in float64 (the objective is λ-strongly convex), ``x0 = 0``.

    σ², by the stated method (a global bound): ``g_j(x) − ∇F(x) = a_j s_j − E_j[a_j s_j]`` with
    ``|s_j| ≤ 1``, so ``E‖g − ∇F‖² ≤ (1/b) E_j‖a_j‖²`` [derived].

    Args:
        n_samples: N. d: dimension. reg: λ > 0. label_noise: flip probability in [0, ½].
        batch_size: b. seed: data seed.
    """
    rng, a, n_samples, d, batch_size = _data(n_samples, d, seed, batch_size)
    reg = _require("reg", reg, lambda x: x > 0, "reg > 0 (it makes F strongly convex, so F_inf is attained)")
    label_noise = _require("label_noise", label_noise, lambda x: 0 <= x <= 0.5, "0 <= label_noise <= 0.5")
    w = rng.normal(size=d)
    y = np.sign(a @ w)
    y[y == 0] = 1.0
    y[rng.random(n_samples) < label_noise] *= -1.0
    p = LogisticRegression()
    p.name, p.d, p.features, p.targets, p.batch_size, p.reg = "logistic_regression", d, a, y, batch_size, reg
    p.L = float(np.linalg.eigvalsh(a.T @ a / n_samples)[-1] / 4.0 + reg)
    p.mu = reg
    x = logistic_minimum(a, y, reg)
    p.f_inf = float(np.mean(np.logaddexp(0.0, -y * (a @ x))) + 0.5 * reg * x @ x)
    p.x_star = x
    p.x0 = np.zeros(d)
    p.sigma2 = float(np.mean((a**2).sum(axis=1))) / batch_size
    return p


def logistic_minimum(a, y, reg) -> np.ndarray:
    """The minimiser of ``mean_j log(1 + exp(−y_j a_jᵀx)) + (λ/2)‖x‖²`` by damped Newton in float64
    (the objective is λ-strongly convex, so the minimiser is unique)."""
    d = a.shape[1]

    def f(x):
        return float(np.mean(np.logaddexp(0.0, -y * (a @ x))) + 0.5 * reg * x @ x)

    x = np.zeros(d)
    for _ in range(100):
        s = 1.0 / (1.0 + np.exp(y * (a @ x)))  # sigmoid(−y aᵀx)
        g = -(a * (y * s)[:, None]).mean(axis=0) + reg * x
        hess = (a * (s * (1 - s))[:, None]).T @ a / len(y) + reg * np.eye(d)
        step = np.linalg.solve(hess, g)
        t = 1.0
        while f(x - t * step) > f(x) - 0.25 * t * g @ step and t > 1e-10:
            t *= 0.5
        x = x - t * step
        if np.linalg.norm(g) < 1e-13:
            break
    return x


# the heterogeneous problems build on the classes above (coopsgd.analysis.noniid)
from coopsgd.analysis.noniid import (
    HeterogeneousQuadratic,
    NonIIDLogistic,
    heterogeneous_quadratic,
    noniid_logistic_regression,
)
