"""Put a run beside its bound: the numerical verification harness of Cooperative SGD's Theorem 1.

:func:`check_bound` runs the engine users run (:class:`coopsgd.CooperativeSGD` with plain SGD,
never a second implementation of the algorithms) on a problem with known constants
(:mod:`coopsgd.analysis.problems`), for many seeds at once (vmapped), and compares the measured
``(1/K) Σ_{k=1..K} E‖∇F(u_k)‖²`` of the averaged model ``u_k = X_k 1/n`` with
:func:`coopsgd.analysis.theory.bound_for`.

:func:`coopsgd.analysis.exact.exact_expected_error` computes the same expectation without sampling
for a quadratic; it is the reference the Monte-Carlo harness is tested against.

:func:`sweep` runs grids over τ, topology (ζ), η and m; :func:`format_table` and :func:`plot`
turn the reports into a Markdown table and a log-scale figure.

References:
    Wang & Joshi, "Cooperative SGD", JMLR 22(213), 2021, arXiv:1808.07576, Theorem 1 [recalled].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from coopsgd.analysis import problems as _problems
from coopsgd.analysis import theory
from coopsgd.analysis.exact import check_run_args, exact_expected_error
from coopsgd.core.validate import require_memory

__all__ = [
    "EXACT_FLOPS",
    "BoundCheck",
    "check_bound",
    "format_table",
    "gradient_norms",
    "plot",
    "sweep",
]


class BoundCheck(NamedTuple):
    """One run beside its bound.

    ``holds`` is ``empirical <= bound.total`` (and ``exact <= bound.total`` where the exact value is
    known), with no allowance for sampling error. ``applies`` says whether the theorem's
    assumptions hold for this run (identical data across workers and η within
    :func:`coopsgd.analysis.theory.lr_condition`); a row that does not hold where it applies is a violation
    (:attr:`violated`), i.e. a finding.
    """

    algorithm: str
    problem: str
    m: int
    tau: int
    v: int
    zeta: float
    eta: float
    K: int
    seeds: int
    empirical: float
    stderr: float
    exact: float | None
    local_models: float
    """``(1/K) Σ_k E (1/m) Σ_i ‖∇F(x_k^(i))‖²``: the workers' own models (not bounded by Thm 1;
    it shows the consensus error, which on a quadratic never reaches the averaged model)."""
    bound: theory.Bound
    ratio: float
    holds: bool
    applies: bool
    lr_ok: bool
    eta_max: float
    note: str
    label: str = ""

    @property
    def violated(self) -> bool:
        return self.applies and not self.holds

    def as_dict(self) -> dict:
        d = self._asdict()
        d["bound"] = self.bound._asdict()
        d["violated"] = self.violated
        return d


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
        flops = 4.0 * d * n**3 * max(1, K // tau)  # W_kᵀ Σ W_k per coordinate and mixing
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
                label: str = "") -> BoundCheck:
    """Run ``algorithm`` on ``problem`` for ``K`` steps and ``seeds`` seeds; compare with the bound.

    Args:
        algorithm: a :class:`coopsgd.Algorithm` within Theorem 1 (symmetric W, constant τ, ζ < 1).
        problem: a :class:`coopsgd.analysis.problems.Problem`.
        eta: learning rate of plain SGD on every worker.
        K: number of iterations.
        seeds: number of seeds (≥ 2), or a list of integer seeds; vmapped.
        key: base PRNG seed when ``seeds`` is a count.
        exact: also compute :func:`exact_expected_error` (default: for quadratics).
        label: a name for the row (defaults to the algorithm's).

    Returns:
        :class:`BoundCheck` with ``empirical`` (mean over seeds of ``(1/K)Σ‖∇F(u_k)‖²``), its
        ``stderr``, the ``bound``, ``ratio = empirical / bound.total`` and ``holds``.

    Raises:
        ValueError: if the theorem does not apply to the algorithm (non-symmetric W, varying τ,
            ζ ≥ 1) or an argument is bad.

    Example:
        >>> import coopsgd
        >>> from coopsgd.analysis import problems, verify
        >>> r = verify.check_bound(coopsgd.local_sgd(4, tau=4), problems.quadratic(10), 0.1, 100, 20)
        >>> r.holds
        True
    """
    eta, K = check_run_args(algorithm, eta, K)
    problem.check_workers(algorithm.m)
    exact = bool(exact or (exact is None and isinstance(problem, _problems.Quadratic)))
    _require_fits(algorithm, problem, K, seeds, exact)
    bound = theory.bound_for(
        algorithm, L=problem.L, sigma2=problem.sigma2, f_gap=problem.f_gap, eta=eta, K=K, warn=False
    )
    m, tau, v = algorithm.m, algorithm.tau, algorithm.v
    zeta = float(algorithm.zeta)
    cond = theory.lr_condition(L=problem.L, eta=eta, m=m, tau=tau, zeta=zeta, v=v)
    notes = []
    if not cond.ok:
        warnings.warn(
            f"eta = {eta:g} is outside the step-size condition (largest eta: {cond.eta_max:.4g}); "
            "the bound is not claimed there",
            theory.StepSizeWarning,
            stacklevel=2,
        )
        notes.append(f"eta > eta_max = {cond.eta_max:.4g}")
    if problem.heterogeneity > 0:
        notes.append("per-worker optima: gradients biased for grad F, outside Theorem 1")
    g2, g2w = gradient_norms(algorithm, problem, eta, K, seeds, key=key)
    per_seed = g2.mean(axis=1)
    empirical = float(per_seed.mean())
    stderr = float(per_seed.std(ddof=1) / math.sqrt(len(per_seed)))
    exact_value = exact_expected_error(algorithm, problem, eta, K) if exact else None
    finite = math.isfinite(empirical)
    holds = finite and empirical <= bound.total and (exact_value is None or exact_value <= bound.total)
    if not finite:
        notes.append("the run diverged (non-finite gradient norms)")
    return BoundCheck(
        algorithm=algorithm.name,
        problem=problem.name,
        m=m,
        tau=tau,
        v=v,
        zeta=zeta,
        eta=eta,
        K=K,
        seeds=len(per_seed),
        empirical=empirical,
        stderr=stderr,
        exact=exact_value,
        local_models=float(g2w.mean()),
        bound=bound,
        ratio=empirical / bound.total if bound.total > 0 else math.inf,
        holds=bool(holds),
        applies=bool(cond.ok and problem.heterogeneity == 0),
        lr_ok=cond.ok,
        eta_max=cond.eta_max,
        note="; ".join(notes),
        label=label or algorithm.name,
    )


# ----------------------------------------------------------------------------------------------
# sweeps, tables and plots


def sweep(runs: Iterable[tuple[str, object, float]], problem, K, seeds=100, *, key: int = 0,
          exact: bool | None = None) -> list[BoundCheck]:
    """:func:`check_bound` for each ``(label, algorithm, eta)`` in ``runs`` on one problem."""
    return [
        check_bound(algo, problem, eta, K, seeds, key=key, exact=exact, label=label)
        for label, algo, eta in runs
    ]


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def format_table(rows: Sequence[BoundCheck]) -> str:
    """A Markdown table: one line per run, with the bound's three terms and the verdict."""
    head = (
        "| run | m | τ | v | ζ | η | K | seeds | empirical ± s.e. | exact | optimization | noise | "
        "network | bound | ratio | holds |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        verdict = "yes" if r.holds else ("**NO**" if r.applies else "no (n/a)")
        if r.note:
            verdict += f" ({r.note})"
        lines.append(
            f"| {r.label} | {r.m} | {r.tau} | {r.v} | {r.zeta:.4f} | {r.eta:g} | {r.K} | {r.seeds} | "
            f"{r.empirical:.4g} ± {r.stderr:.2g} | {_fmt(r.exact)} | {r.bound.optimization:.4g} | "
            f"{r.bound.noise:.4g} | {r.bound.network:.4g} | {r.bound.total:.4g} | {r.ratio:.3f} | {verdict} |"
        )
    return "\n".join(lines)


def plot(panels: dict[str, tuple[str, Sequence[float], Sequence[BoundCheck]]], path, *, title: str = "",
         ncols: int = 3):
    """Empirical (with ±2 s.e. bars and the exact value where known) against the bound, log scale.

    Each panel also shows the bound's network term and the workers' own models
    (:attr:`BoundCheck.local_models`, not bounded by the theorem). Bound markers are hollow where
    the theorem's assumptions do not hold (η beyond the step-size condition, heterogeneous data).

    Args:
        panels: ``{panel title: (x-axis label, x values, rows)}``; one subplot each.
        path: where to save the PNG.
        title: a figure title.
        ncols: panels per row.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.7 * nrows), squeeze=False)
    for ax, (name, (xlabel, xs, rows)) in zip(axes.flat, panels.items()):
        xs = np.asarray(xs, dtype=float)
        pos = np.arange(len(xs)) if len(set(xs)) < len(xs) or not np.all(xs > 0) else xs
        categorical = pos is not xs
        total = np.array([r.bound.total for r in rows])
        ax.plot(pos, total, "-", color="tab:red", label="bound (Thm 1)")
        ok = np.array([r.applies for r in rows])
        ax.plot(pos[ok], total[ok], "o", color="tab:red")
        ax.plot(pos[~ok], total[~ok], "o", mfc="none", color="tab:red", label="bound, outside assumptions")
        net = np.array([r.bound.network for r in rows])
        ax.plot(pos[net > 0], net[net > 0], ":", color="tab:red", alpha=0.6, label="network term")
        emp = np.array([r.empirical for r in rows])
        se = np.array([r.stderr for r in rows])
        ax.errorbar(pos, emp, yerr=2 * se, fmt="s-", color="tab:blue", capsize=3, label="E‖∇F(u_k)‖² ±2 s.e.")
        if all(r.exact is not None for r in rows):
            ax.plot(pos, [r.exact for r in rows], "x", color="k", ms=8, label="exact (recursion)")
        ax.plot(pos, [r.local_models for r in rows], "^--", color="tab:green", ms=4, alpha=0.8,
                label="workers' own models")
        ax.set_yscale("log")
        if not categorical and xs.max() / xs.min() > 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("(1/K) Σ_k E‖∇F(·)‖²")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat[1: len(panels)]:  # collect legend entries that only some panels have
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if len(panels) < nrows * ncols:
        axes.flat[len(panels)].legend(handles, labels, loc="center", fontsize=9)
    else:
        axes[0][0].legend(handles, labels, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
