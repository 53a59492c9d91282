"""Heterogeneous problems, where the network reaches the averaged model: per-worker Hessians and
optima (quadratics, exact constants) and a non-IID logistic regression (proven global constants).

With identical Hessians the averaged model of a quadratic ignores W and τ (docs/theory.md §7, finding 3);
with per-worker Hessians ``A_i`` it does not, because ``(1/m) Σ_i A_i x^(i) ≠ Ā u``. The
dissimilarity is that of Koloskova et al. (ICML 2020, arXiv:2003.10422, Assumption 3b, recalled):
``(1/m) Σ_i ‖∇f_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²`` for every x (``zeta2`` = ζ̄², ``growth`` = B).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.analysis.problems import (
    LogisticRegression,
    Quadratic,
    _data,
    _int,
    _require,
    logistic_minimum,
)

__all__ = ["HeterogeneousQuadratic", "NonIIDLogistic", "heterogeneous_quadratic", "noniid_logistic_regression"]


class HeterogeneousQuadratic(Quadratic):
    """``f_i(x) = ½ (x − x_i*)ᵀ A_i (x − x_i*)`` with ``A_i = Q diag(λ_i) Qᵀ`` (a shared eigenbasis),
    ``F = (1/m) Σ_i f_i``, noise ``N(0, σ²/d · I)`` per worker. Build with :func:`heterogeneous_quadratic`.

    Constants, all exact [derived]: ``L = max_{i,j} λ_ij`` (every f_i is L-smooth), ``Ā = mean_i A_i``
    (``eigenvalues`` are λ̄_j, ``A`` is Ā), the minimiser ``x̄*_j = Σ_i λ_ij x*_ij / Σ_i λ_ij`` in the
    eigenbasis, ``F(x) = ½ (x − x̄*)ᵀ Ā (x − x̄*) + f_inf``. Per eigen-coordinate j, with
    ``e = x_j − x̄*_j``, ``δ_ij = λ_ij − λ̄_j`` and ``c_ij = λ_ij (x̄*_j − x*_ij)``, the dissimilarity is
    ``Σ_j (M_j e² + 2 r_j e + z_j)`` (``M_j, r_j, z_j`` the worker means of ``δ², δc, c²``), so for any
    ``B > B₀ = max_j M_j/λ̄_j²`` the smallest valid ζ̄² is ``Σ_j [z_j + r_j²/(Bλ̄_j² − M_j)]`` (the
    supremum over e of a concave quadratic). ``growth`` B defaults to ``2 B₀`` [ours].
    """

    def __init__(self, worker_eigenvalues, sigma2, optima, x0, rotation=None, name="heterogeneous_quadratic",
                 growth=None):
        lam = np.asarray(worker_eigenvalues, dtype=np.float64)
        opt = np.asarray(optima, dtype=np.float64)
        if lam.ndim != 2 or opt.shape != lam.shape or np.any(lam < 0) or not np.all(np.isfinite(lam)):
            raise ValueError(f"worker_eigenvalues must be a finite (m, d) array >= 0 and optima the same shape, got "
                             f"{lam.shape} and {opt.shape}")
        self._worker_eig = lam
        self.m, self.d = lam.shape
        self.eigenvalues = lam.mean(axis=0)
        self.L, self.mu = float(lam.max()), float(self.eigenvalues.min())
        if self.L <= 0:
            raise ValueError("heterogeneous_quadratic needs a positive eigenvalue (L > 0)")
        self.sigma2 = float(sigma2)
        self.optima = opt
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self.x0 = np.asarray(x0, dtype=np.float64)
        self.name = name
        e_opt = self._to_eig(opt)
        weight = lam.sum(axis=0)
        xbar = np.where(weight > 0, (lam * e_opt).sum(axis=0) / np.where(weight > 0, weight, 1.0), e_opt.mean(axis=0))
        self.x_star = xbar if self.rotation is None else self.rotation @ xbar
        dev = e_opt - xbar
        self.f_inf = float(0.5 * np.mean(np.sum(lam * dev**2, axis=1)))
        self.A = np.diag(self.eigenvalues) if self.rotation is None else \
            self.rotation @ np.diag(self.eigenvalues) @ self.rotation.T
        delta, c = lam - self.eigenvalues, -lam * dev
        self._mrz = ((delta**2).mean(axis=0), (delta * c).mean(axis=0), (c**2).mean(axis=0))
        moving = self.eigenvalues > 0
        self.growth_min = float(np.max(self._mrz[0][moving] / self.eigenvalues[moving] ** 2)) if moving.any() else 0.0
        self.heterogeneity = float(self._mrz[2].sum())  # the dissimilarity at the minimiser
        self.growth = float(2.0 * self.growth_min if growth is None else growth)
        self.zeta2 = self.dissimilarity(self.growth)

    @property
    def worker_eigenvalues(self) -> np.ndarray:
        return self._worker_eig

    def dissimilarity(self, growth) -> float:
        """The smallest ζ̄² with ``(1/m) Σ_i ‖∇f_i(x) − ∇F(x)‖² ≤ ζ̄² + B‖∇F(x)‖²`` for all x, B = ``growth``."""
        mm, r, z = self._mrz
        b = float(growth)
        gap = b * self.eigenvalues**2 - mm
        need = (np.abs(r) > 0) | (mm > 0)
        if np.any(need & (gap <= 0)):
            raise ValueError(f"growth B = {growth!r} must exceed B0 = {self.growth_min:.6g} (the Hessians differ, so "
                             "the dissimilarity grows like B0 |grad F|^2)")
        return float(z.sum() + np.sum(np.where(need & (gap > 0), r**2 / np.where(gap > 0, gap, 1.0), 0.0)))

    def worker_grad_np(self, x) -> np.ndarray:
        """``(m, d)``: every ``∇f_i(x)`` in float64 (NumPy)."""
        e = self._to_eig(np.asarray(x, dtype=np.float64)[None, :] - self.optima)
        g = self._worker_eig * e
        return g if self.rotation is None else g @ self.rotation.T

    def loss_fn(self, params, batch):
        """``f_w(x) + ξ·(x − stop_gradient(x))``: its gradient is ``A_w(x − x_w*) + ξ``."""
        x = params
        w = batch["worker"]
        e = x - jnp.asarray(self.optima, x.dtype)[w]
        lam = jnp.asarray(self._worker_eig, x.dtype)[w]
        if self.rotation is None:
            ae = lam * e
        else:
            q = jnp.asarray(self.rotation, x.dtype)
            ae = q @ (lam * (q.T @ e))
        xi = jnp.sqrt(self.sigma2 / self.d) * jax.random.normal(batch["key"], x.shape, x.dtype)
        return 0.5 * jnp.vdot(e, ae) + jnp.vdot(xi, x - jax.lax.stop_gradient(x))


def heterogeneous_quadratic(d: int, m: int, L: float = 1.0, mu: float = 0.01, sigma2: float = 1.0, seed: int = 0, *,
                            optima_spread: float = 1.0, hessian_spread: float = 0.5, rotate: bool = False,
                            x0_distance: float = 1.0, growth=None) -> HeterogeneousQuadratic:
    """Per-worker Hessians and optima with exact constants.

    Worker i's eigenvalues are ``λ_ij = s · λ_j (1 + hessian_spread · r_ij)`` with λ_j evenly spaced in
    [μ, L], ``r_ij ∈ [−1, 1]`` uniform and centred over the workers (so Ā has eigenvalues ``s·λ_j``)
    and ``s`` chosen so that ``max_ij λ_ij = L`` exactly. Optima ``x_i* = x̄ + optima_spread · δ_i``
    with centred ``δ_i ~ N(0, I/d)``, ``x̄ ~ N(0, x0_distance²/d · I)``, start ``x0 = 0``.

    Args:
        d, m: dimension and number of workers. L: the smoothness of every f_i (the largest λ_ij).
        mu: smallest base eigenvalue (before the scaling s). sigma2: noise variance, ≥ 0.
        optima_spread: ≥ 0. hessian_spread: in [0, 1) (keeps every λ_ij ≥ 0).
        rotate: a random shared eigenbasis Q instead of the coordinate axes.
        growth: B of the dissimilarity (default ``2 B₀``, see :class:`HeterogeneousQuadratic`).

    Example:
        >>> p = heterogeneous_quadratic(3, 4, seed=0)
        >>> p.L, p.m, p.zeta2 > p.heterogeneity > 0, p.growth > 0
        (1.0, 4, True, True)
    """
    d, m = _int("d", d, 1), _int("m", m, 1)
    L = _require("L", L, lambda x: x > 0, "L > 0 (every f_i must be L-smooth with a positive constant)")
    mu = _require("mu", mu, lambda x: 0 <= x <= L, f"0 <= mu <= L = {L}")
    sigma2 = _require("sigma2", sigma2, lambda x: x >= 0, "sigma2 >= 0 (a variance)")
    spread = _require("optima_spread", optima_spread, lambda x: x >= 0, "optima_spread >= 0")
    hs = _require("hessian_spread", hessian_spread, lambda x: 0 <= x < 1, "0 <= hessian_spread < 1 (Hessians stay PSD)")
    rng = np.random.default_rng(seed)
    base = np.linspace(mu, L, d) if d > 1 else np.array([L])
    r = rng.uniform(-1.0, 1.0, size=(m, d))
    r -= r.mean(axis=0)
    r /= max(1.0, float(np.abs(r).max()))
    lam = base * (1.0 + hs * r)
    lam *= L / lam.max()
    x_bar = rng.normal(size=d) * x0_distance / math.sqrt(d)
    delta = rng.normal(size=(m, d)) / math.sqrt(d)
    delta -= delta.mean(axis=0)
    optima = x_bar + spread * delta
    rotation = None
    if rotate:
        q, rr = np.linalg.qr(rng.normal(size=(d, d)))
        rotation = q * np.sign(np.diag(rr))
        optima = optima @ rotation.T
    name = f"heterogeneous_quadratic(d={d}, m={m}, optima {spread:g}, Hessians ±{hs:g})"
    return HeterogeneousQuadratic(lam, sigma2, optima, np.zeros(d), rotation, name=name, growth=growth)


class NonIIDLogistic(LogisticRegression):
    """ℓ2-regularised logistic regression, worker i sampling only its own examples (non-IID).

    ``features``/``targets`` hold every worker's examples (F averages them all, each worker holding
    the same number); ``worker_features`` (m, N, d) and ``worker_targets`` (m, N) hold each worker's.
    Build with :func:`noniid_logistic_regression`.
    """

    worker_features: np.ndarray
    worker_targets: np.ndarray

    def loss_fn(self, params, batch):
        """Worker ``batch["worker"]``'s mean loss over ``batch_size`` of its own examples (with replacement)."""
        x = params
        n = self.worker_targets.shape[1]
        idx = jax.random.randint(batch["key"], (self.batch_size,), 0, n)
        a = jnp.asarray(self.worker_features, x.dtype)[batch["worker"]][idx]
        y = jnp.asarray(self.worker_targets, x.dtype)[batch["worker"]][idx]
        return jnp.mean(self._example_loss(x, a, y)) + self._reg(x)

    def worker_grad_np(self, x) -> np.ndarray:
        """``(m, d)``: every ``∇f_i(x)`` in float64 (NumPy)."""
        from scipy.special import expit  # a tenth of a second to import: only when asked for

        x = np.asarray(x, dtype=np.float64)
        a, y = self.worker_features, self.worker_targets
        s = -y * expit(-y * (a @ x))  # (m, N): d/dz softplus(−y z)
        return np.einsum("mn,mnd->md", s, a) / y.shape[1] + self.reg * x


def noniid_logistic_regression(m: int, n_per_worker: int = 128, d: int = 10, *, heterogeneity: float = 1.0,
                               reg: float = 1e-2, label_noise: float = 0.1, batch_size: int = 1,
                               seed: int = 0) -> NonIIDLogistic:
    """Non-IID logistic regression: worker i's features ``a ~ N(heterogeneity·c_i, diag(s)²)`` and labels
    ``sign(aᵀ w_i)`` with ``w_i = w + heterogeneity·δ_i`` (flipped with probability ``label_noise``).

    Constants, by the stated method (global bounds, [derived]); ``s_ij = −y_ij σ(−y_ij a_ijᵀx) ∈ (−1, 1)``:

    - ``L = max_i λ_max(A_iᵀA_i/N)/4 + λ``: every f_i is L-smooth (logistic curvature ≤ ¼).
    - ``σ² = (1/m) Σ_i (1/b) mean_j ‖a_ij‖²``: a per-example gradient minus its mean is
      ``a_j s_j − E[a s]``, of second moment ≤ ``E‖a‖²`` (the bounds use the workers' average σ²).
    - ``ζ̄²`` with B = 0: ``∇f_i − ∇F = v_i − v̄`` with ``v_i = A_iᵀ s_i / N``, so
      ``(1/m)Σ_i‖v_i − v̄‖² ≤ min(λ_max((C⊗I) diag_i(A_iᵀA_i/N) (C⊗I)), (1/m)Σ_i (mean_j ‖a_ij‖)²)`` with
      ``C = I − J_m`` (``‖s‖² ≤ mN`` for the first, ``(1/m)Σ‖v_i − v̄‖² ≤ (1/m)Σ‖v_i‖²`` for the second).
      ``heterogeneity`` records the dissimilarity at the minimiser, a lower bound on any valid ζ̄².
    - ``f_inf`` by damped Newton on all the examples (F is λ-strongly convex).
    """
    m = _int("m", m, 1)
    rng, _, n, d, batch_size = _data(n_per_worker, d, seed, batch_size)
    h = _require("heterogeneity", heterogeneity, lambda x: x >= 0, "heterogeneity >= 0")
    reg = _require("reg", reg, lambda x: x > 0, "reg > 0 (it makes F strongly convex, so F_inf is attained)")
    label_noise = _require("label_noise", label_noise, lambda x: 0 <= x <= 0.5, "0 <= label_noise <= 0.5")
    scales = np.linspace(1.0, 0.3, d)
    w = rng.normal(size=d)
    feats = (h * rng.normal(size=(m, 1, d)) / math.sqrt(d)) + rng.normal(size=(m, n, d)) * scales
    w_i = w + h * rng.normal(size=(m, d))
    y = np.sign(np.einsum("mnd,md->mn", feats, w_i))
    y[y == 0] = 1.0
    y[rng.random((m, n)) < label_noise] *= -1.0
    p = NonIIDLogistic()
    p.name = f"noniid_logistic(m={m}, N={n} each, d={d}, heterogeneity {h:g})"
    p.d, p.m, p.batch_size, p.reg = d, m, batch_size, reg
    p.worker_features, p.worker_targets = feats, y
    p.features, p.targets = feats.reshape(m * n, d), y.reshape(m * n)
    grams = np.einsum("mnd,mne->mde", feats, feats) / n
    p.L = float(np.linalg.eigvalsh(grams).max() / 4.0 + reg)
    p.mu = reg
    x = logistic_minimum(p.features, p.targets, reg)
    p.x_star, p.x0 = x, np.zeros(d)
    p.f_inf = float(np.mean(np.logaddexp(0.0, -p.targets * (p.features @ x))) + 0.5 * reg * x @ x)
    norms2 = (feats**2).sum(axis=2)  # (m, n)
    p.sigma2 = float(norms2.mean()) / batch_size
    c = np.eye(m) - 1.0 / m
    big = np.zeros((m * d, m * d))
    for i in range(m):
        big[i * d:(i + 1) * d, i * d:(i + 1) * d] = grams[i]
    proj = np.kron(c, np.eye(d))
    spectral_bound = float(np.linalg.eigvalsh(proj @ big @ proj).max())
    p.zeta2 = min(spectral_bound, float(np.mean(np.sqrt(norms2).mean(axis=1) ** 2)))
    p.growth = 0.0
    g = p.worker_grad_np(x)
    p.heterogeneity = float(np.mean(np.sum((g - g.mean(axis=0)) ** 2, axis=1)))
    return p
