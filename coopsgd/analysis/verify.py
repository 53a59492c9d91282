"""Put a run beside its bound: the numerical verification harness.

:func:`check_bound` runs the engine users run (:class:`coopsgd.CooperativeSGD` with plain SGD,
never a second implementation of the algorithms) on a problem with known constants
(:mod:`coopsgd.analysis.problems`), for many seeds at once (vmapped), and compares the measured
``(1/K) Σ_{k=1..K} ‖∇F(u_k)‖²`` of the averaged model ``u_k = X_k 1/n`` with the bound whose
assumptions the run meets (:func:`coopsgd.analysis.theory.bound_for`: Theorem 1 of Wang & Joshi for
identical data, Koloskova et al. 2020's non-convex bound for heterogeneous data).

The verdict (``holds``) is decided by the exact expectation
(:func:`coopsgd.analysis.exact.exact_expected_error`) where the recursion exists (quadratics), and
otherwise by a one-sided Student-t confidence bound on the Monte-Carlo mean: a row is declared
above its bound only when ``mean − t_{c, S−1} · s.e.`` exceeds it (c = ``confidence``, 99.9 % by
default), so sampling error alone breaks a true bound with probability at most 0.1 %.

:func:`sweep` runs grids over τ, topology (ζ), η and m; :func:`format_table` and :func:`plot`
(:mod:`coopsgd.analysis.report`) turn the reports into a Markdown table and a figure.

References:
    Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1 [recalled];
    Koloskova et al., ICML 2020, arXiv:2003.10422, Theorem 2 [recalled]; constants derived in
    docs/theory.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from coopsgd.analysis import problems as _problems
from coopsgd.analysis import theory
from coopsgd.analysis.consensus import consensus_rate
from coopsgd.analysis.exact import check_run_args, exact_expected_error, is_random
from coopsgd.analysis.report import format_table, plot
from coopsgd.core.validate import require_memory

__all__ = [
    "CONFIDENCE",
    "EXACT_FLOPS",
    "BoundCheck",
    "check_bound",
    "format_table",
    "gradient_norms",
    "plot",
    "sweep",
    "verdict",
]

CONFIDENCE = 0.999
"""Default level of the one-sided confidence bound that decides rows without an exact value."""


class BoundCheck(NamedTuple):
    """One run beside its bound.

    ``holds``: ``exact <= bound.total`` where the exact value is known (``decided_by = "exact"``),
    else ``lower <= bound.total`` with ``lower = empirical − t · stderr`` the one-sided lower
    confidence bound of the Monte-Carlo mean (``decided_by = "MC 99.9% one-sided"``). ``applies``
    says whether the bound's assumptions hold for this run (η within the step-size condition of
    the chosen ``theorem``); a row that does not hold where it applies is a violation
    (:attr:`violated`), i.e. a finding.
    """

    algorithm: str
    problem: str
    m: int
    tau: int
    v: int
    zeta: float
    """√ρ: ζ of a static W, ``sqrt(‖E[WᵀW] − J‖₂)`` of a random one."""
    eta: float
    K: int
    seeds: int
    empirical: float
    """The mean over seeds of ``(1/K) Σ_k ‖∇F(u_k)‖²``, u_k the averaged model."""
    stderr: float
    exact: float | None
    local_models: float
    """``(1/K) Σ_k E (1/m) Σ_i ‖∇F(x_k^(i))‖²``: the workers' own models (not bounded)."""
    bound: theory.Bound
    ratio: float
    """``exact / bound.total`` where the exact value is known, else ``empirical / bound.total``."""
    holds: bool
    applies: bool
    lr_ok: bool
    eta_max: float
    note: str
    label: str = ""
    decided_by: str = ""
    lower: float = math.nan
    """The one-sided lower confidence bound of the Monte-Carlo mean."""
    p: float = 1.0
    """The expected consensus rate 1 − ρ per τ-step window."""
    constants: dict | None = None
    """The problem's ``L``, ``sigma2``, ``f_gap``, ``zeta2``, ``growth``."""

    @property
    def theorem(self) -> str:
        return self.bound.theorem

    @property
    def violated(self) -> bool:
        return self.applies and not self.holds

    def as_dict(self) -> dict:
        """The row as plain data (JSON-ready): the bound as a dict, plus ``violated`` and ``theorem``."""
        d = self._asdict()
        d["bound"] = self.bound._asdict()
        d["violated"] = self.violated
        d["theorem"] = self.theorem
        return d


def verdict(total: float, *, exact=None, per_seed=None, confidence: float = CONFIDENCE) -> tuple[bool, str, float]:
    """``(holds, decided_by, lower)`` for a bound ``total``: by the exact value if given, else by the
    one-sided Student-t lower confidence bound ``mean − t_{confidence, S−1} · s.e.`` of ``per_seed``.

    Example:
        >>> verdict(1.0, exact=0.9967)[:2]
        (True, 'exact')
        >>> verdict(1.0, per_seed=[1.01, 0.99, 1.02, 1.0])[:2]   # mean 1.005 but s.e. 0.0065
        (True, 'MC 99.9% one-sided')
    """
    from scipy import stats

    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must lie in [0.5, 1) (a one-sided level), got {confidence!r}")
    x = np.asarray([] if per_seed is None else per_seed, dtype=np.float64)
    lower = math.nan
    if len(x) >= 2:
        with np.errstate(invalid="ignore", over="ignore"):
            se = float(x.std(ddof=1) / math.sqrt(len(x)))
            lower = float(x.mean() - stats.t.ppf(confidence, len(x) - 1) * se)
    if exact is not None and math.isfinite(exact):
        return bool(exact <= total * (1 + 1e-12)), "exact", lower
    if len(x) < 2:
        raise ValueError("a verdict needs the exact value or at least two per-seed values")
    ok = bool(np.all(np.isfinite(x)) and lower <= total)
    return ok, f"MC {confidence * 100:g}% one-sided", lower


# ----------------------------------------------------------------------------------------------
# the Monte-Carlo harness on the real engine


def _seed_keys(seeds, key):
    import jax

    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 2:
            raise ValueError(f"seeds must be >= 2 to estimate a standard error, got seeds = {seeds}")
        return jax.random.split(jax.random.PRNGKey(key), int(seeds))
    arr = np.asarray(list(seeds) if not isinstance(seeds, np.ndarray) else seeds)
    if arr.ndim != 1 or len(arr) < 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"seeds must be a count >= 2 or a list of >= 2 integer seeds, got {seeds!r}")
    return jax.vmap(jax.random.PRNGKey)(arr)


EXACT_FLOPS = 1e12
"""Most floating-point operations :func:`check_bound` lets the exact recursion take (a minute or so
on a few cores)."""


def _require_fits(algorithm, problem, K: int, seeds, exact: bool) -> None:
    """The harness's arrays must fit in memory, checked before anything is allocated: per seed its
    key, the (K,) gradient norms twice (float32 on the device, float64 on the host) and about 16
    model-sized arrays of the vmapped round (n columns of d numbers); the exact recursion holds
    about five (d, n, n) float64 covariances."""
    count = seeds if isinstance(seeds, (int, np.integer)) else len(seeds) if hasattr(seeds, "__len__") else 0
    n, d = algorithm.n, int(np.size(problem.x0))
    require_memory(f"verify with {count} seeds x {K} steps (n = {n}, d = {d})",
                   count * (8.0 + 24.0 * K + 64.0 * n * d), "use fewer seeds or steps")
    if exact:
        skip = "use fewer workers or dimensions, or skip it (exact=False, --no-exact)"
        require_memory(f"the exact recursion on n = {n} columns in d = {d} dimensions", 40.0 * d * n * n, skip)
        tau = algorithm.tau if isinstance(algorithm.tau, int) else 1
        draws = len(getattr(algorithm.mixing, "matchings", ())) if is_random(algorithm) else 0
        flops = 4.0 * d * n**3 * (1 + draws) * max(1, K // tau)  # W_kᵀ Σ W_k (and L_j Σ L_j) per mixing
        if flops > EXACT_FLOPS:
            raise ValueError(f"the exact recursion on n = {n} columns in d = {d} dimensions over {K} steps would "
                             f"take about {flops:.2g} floating-point operations (minutes to hours, more than "
                             f"{EXACT_FLOPS:.0e}); {skip}")


def _mixing_index(algorithm, K: int, max_distinct: int = 32):
    """For each step k < K: -1 if it ends without mixing, else the index of its W_k in a list of
    the distinct matrices used; and a representative round index for each of them."""
    index = np.full(K, -1, dtype=np.int32)
    seen: dict[bytes, int] = {}
    rounds: list[int] = []
    for k in range(K):
        if not algorithm.communicates(k):
            continue
        r = algorithm.period.round_index(k)
        w = np.ascontiguousarray(algorithm.mixing.at(r))
        key = w.tobytes()
        if key not in seen:
            if len(seen) == max_distinct:
                raise ValueError(
                    f"{algorithm.name} uses more than {max_distinct} distinct mixing matrices in "
                    f"{K} steps; the harness compiles one mixing per distinct W_k"
                )
            seen[key] = len(rounds)
            rounds.append(r)
        index[k] = seen[key]
    return index, rounds


def gradient_norms(algorithm, problem, eta, K, seeds=100, *, key: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``‖∇F(u_k)‖²`` and ``(1/m) Σ_i ‖∇F(x_k^(i))‖²`` for every seed and step ``k = 1..K``: two
    arrays of shape ``(seeds, K)`` (the averaged model, which the theorem bounds, and the workers'
    own models).

    The engine (:class:`coopsgd.CooperativeSGD`, simulate backend, ``optax.sgd(eta)`` on every
    worker) runs ``algorithm`` on ``problem`` from ``problem.x0``; each step is one of the engine's
    pure per-round functions (``round_fn(1, r, mix)``: a local step, or a local step followed by the
    mixing with ``W^(r)``), chosen by ``lax.switch`` inside one ``lax.scan`` over the K steps, and
    the seeds are vmapped, so the whole sweep is one compiled call. Worker i's noise at step k comes
    from ``fold_in(fold_in(seed_key, k), ·)`` carried in its batch (:meth:`Problem.batch`).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from coopsgd.parallel.trainer import CooperativeSGD

    eta, K = check_run_args(algorithm, eta, K)
    problem.check_workers(algorithm.m)
    _require_fits(algorithm, problem, K, seeds, exact=False)
    keys = _seed_keys(seeds, key)
    mix_index, mix_rounds = _mixing_index(algorithm, K)
    engine = CooperativeSGD(algorithm, optax.sgd(eta), problem.loss_fn, track_consensus=False)
    state0 = engine.init(jnp.asarray(problem.x0, jnp.float32))
    branches = [engine.round_fn(1, r, mix=True) for r in mix_rounds]
    if np.any(mix_index < 0):  # some steps end without mixing: a local-only branch, last
        branches.append(engine.round_fn(1, 0, mix=False))
        mix_index = np.where(mix_index < 0, len(branches) - 1, mix_index)
    m = algorithm.m

    def one_seed(seed_key):
        def body(state, xs):
            k, which = xs
            g2 = problem.grad_norm_sq(engine.average(state))
            g2w = jnp.mean(jax.vmap(problem.grad_norm_sq)(engine.workers(state)))
            batch = jax.tree.map(lambda x: x[None], problem.batch(jax.random.fold_in(seed_key, k), m))
            if len(branches) == 1:
                state, _ = branches[0](state, batch)
            else:
                state = jax.lax.switch(which, [lambda s, b, f=f: f(s, b)[0] for f in branches], state, batch)
            return state, (g2, g2w)

        _, out = jax.lax.scan(body, state0, (jnp.arange(K), jnp.asarray(mix_index)))
        return out

    g2, g2w = jax.jit(jax.vmap(one_seed))(keys)
    return np.asarray(g2, dtype=np.float64), np.asarray(g2w, dtype=np.float64)


def check_bound(algorithm, problem, eta, K, seeds=100, *, key: int = 0, exact: bool | None = None,
                label: str = "", theorem: str = "auto", confidence: float = CONFIDENCE) -> BoundCheck:
    """Run ``algorithm`` on ``problem`` for ``K`` steps and ``seeds`` seeds; compare with the bound.

    Args:
        algorithm: a :class:`coopsgd.Algorithm` with a symmetric W, a constant τ and p > 0.
        problem: a :class:`coopsgd.analysis.problems.Problem`; its ``zeta2``/``growth`` (ζ̄², B) pick
            the bound (Theorem 1 when both are 0, Koloskova et al.'s otherwise).
        eta: learning rate of plain SGD on every worker.
        K: number of iterations.
        seeds: number of seeds (≥ 2), or a list of integer seeds; vmapped.
        key: base PRNG seed when ``seeds`` is a count.
        exact: also compute :func:`exact_expected_error` (default: for quadratics). For a random
            schedule it averages over W_k, while the engine's runs share one seeded draw of them.
        label: a name for the row (defaults to the algorithm's).
        theorem: ``"auto"``, ``"cooperative"`` or ``"koloskova"`` (:func:`theory.bound_for`).
        confidence: level of the one-sided bound that decides rows without an exact value.

    Returns:
        :class:`BoundCheck` with ``empirical`` (mean over seeds of ``(1/K)Σ‖∇F(u_k)‖²``), its
        ``stderr``, the ``bound``, ``ratio``, ``holds`` and the rule that ``decided_by`` it.

    Raises:
        ValueError: if no bound applies to the algorithm (non-symmetric W, varying τ, ρ ≥ 1) or an
            argument is bad.

    Example:
        >>> import coopsgd
        >>> from coopsgd.analysis import problems, verify
        >>> r = verify.check_bound(coopsgd.local_sgd(4, tau=4), problems.quadratic(10), 0.1, 100, 20)
        >>> r.holds, r.decided_by, r.theorem
        (True, 'exact', 'cooperative')
    """
    eta, K = check_run_args(algorithm, eta, K)
    problem.check_workers(algorithm.m)
    exact = bool(exact or (exact is None and isinstance(problem, _problems.Quadratic)))
    _require_fits(algorithm, problem, K, seeds, exact)
    rate = consensus_rate(algorithm)
    consts = {"L": problem.L, "sigma2": problem.sigma2, "f_gap": problem.f_gap, "zeta2": problem.zeta2,
              "growth": problem.growth}
    het = {"zeta2": problem.zeta2, "growth": problem.growth, "theorem": theorem}
    bound = theory.bound_for(algorithm, L=problem.L, sigma2=problem.sigma2, f_gap=problem.f_gap, eta=eta, K=K,
                             warn=False, **het)
    cond = theory.step_size_for(algorithm, L=problem.L, eta=eta, **het)
    notes = []
    if not cond.ok:
        warnings.warn(
            f"eta = {eta:g} is outside the step-size condition (largest eta: {cond.eta_max:.4g}); "
            "the bound is not claimed there",
            theory.StepSizeWarning,
            stacklevel=2,
        )
        notes.append(f"eta > eta_max = {cond.eta_max:.4g}")
    g2, g2w = gradient_norms(algorithm, problem, eta, K, seeds, key=key)
    per_seed = g2.mean(axis=1)
    empirical = float(per_seed.mean())
    stderr = float(per_seed.std(ddof=1) / math.sqrt(len(per_seed)))
    exact_value = exact_expected_error(algorithm, problem, eta, K) if exact else None
    if exact and is_random(algorithm):
        notes.append("exact averages over W_k; the runs share one seeded draw")
    holds, decided_by, lower = verdict(bound.total, exact=exact_value, per_seed=per_seed, confidence=confidence)
    if not math.isfinite(empirical):
        notes.append("the run diverged (non-finite gradient norms)")
    value = exact_value if exact_value is not None else empirical
    return BoundCheck(
        algorithm=algorithm.name, problem=problem.name, m=algorithm.m, tau=rate.tau, v=algorithm.v,
        zeta=rate.q, eta=eta, K=K, seeds=len(per_seed), empirical=empirical, stderr=stderr, exact=exact_value,
        local_models=float(g2w.mean()), bound=bound,
        ratio=value / bound.total if 0 < bound.total < math.inf else (0.0 if bound.total == math.inf else math.inf),
        holds=bool(holds), applies=bool(cond.ok), lr_ok=bool(cond.ok), eta_max=cond.eta_max,
        note="; ".join(notes), label=label or algorithm.name, decided_by=decided_by, lower=lower, p=rate.p,
        constants=consts,
    )


def sweep(runs: Iterable[tuple[str, object, float]], problem, K, seeds=100, *, key: int = 0,
          exact: bool | None = None, theorem: str = "auto", confidence: float = CONFIDENCE) -> list[BoundCheck]:
    """:func:`check_bound` for each ``(label, algorithm, eta)`` in ``runs`` on one problem."""
    return [check_bound(algo, problem, eta, K, seeds, key=key, exact=exact, label=label, theorem=theorem,
                        confidence=confidence) for label, algo, eta in runs]
