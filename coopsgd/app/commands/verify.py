"""``coopsgd verify``: run an algorithm beside the convergence bound its run meets.

Example::

    coopsgd verify --algorithm local_sgd --workers 8 --tau 1 4 16 --lr 0.2 --steps 200 --seeds 100

Every combination of ``--workers``, ``--tau``, ``--topology`` and ``--lr`` is one row: the engine
runs plain SGD on a problem with known constants for ``--seeds`` seeds (vmapped), and the row
reports the measured ``(1/K) Σ ‖∇F(u_k)‖²`` of the averaged model, its standard error, the exact
expectation (quadratics), the bound's terms and whether it holds. Identical data are held to
Theorem 1 of Wang & Joshi (arXiv:1808.07576); heterogeneous data (``--heterogeneity``,
``--hessian-spread``, ``--problem noniid_logistic``) to the non-convex bound of Koloskova et al.
(arXiv:2003.10422); constants derived in docs/theory.md. A row's verdict is decided by the exact
value where it exists, else by a one-sided ``--confidence`` bound on the Monte-Carlo mean.

Exit codes: 0 when every row holds; 1 when some row does not (the output says whether it broke the
bound where its assumptions hold — a finding, reported, never hidden — or only outside them, e.g. η
beyond the step-size condition); 2 on bad input (one line on stderr).
"""

from __future__ import annotations

import itertools
import sys
import warnings

from coopsgd.app import registry
from coopsgd.app.commands import CommandError, check_png_path, renamed_option
from coopsgd.app.files import to_json

__all__ = ["PROBLEMS", "make_algorithm", "make_problem", "register", "run"]

PROBLEMS = ("quadratic", "linear_regression", "logistic_regression", "noniid_logistic")
"""The ``--problem`` names (:mod:`coopsgd.analysis.problems`)."""
HESSIAN_SPREAD = 0.8
"""``--hessian-spread`` when ``--heterogeneity > 0`` and it is not given."""


def register(subparsers) -> None:
    """Add the ``verify`` parser (every option's help states its default)."""
    p = subparsers.add_parser(
        "verify",
        help="run an algorithm beside its convergence bound",
        description="Run the engine on a problem with known constants for many seeds and compare "
        "(1/K) sum |grad F(u_k)|^2 of the averaged model with the bound whose assumptions the run meets "
        "(Theorem 1 of Cooperative SGD for identical data, Koloskova et al. 2020 for heterogeneous data). "
        "Lists of values sweep.",
    )
    p.add_argument("--algorithm", "-a", required=True, metavar="NAME",
                   help=f"one of: {', '.join(registry.names(theory=True))} (required)")
    p.add_argument("--workers", "-m", type=int, nargs="+", default=[8], metavar="M", help="m, one or more (default 8)")
    p.add_argument("--tau", type=int, nargs="+", default=None, metavar="TAU",
                   help="period(s) (default 1; fully_sync and dpsgd need 1)")
    p.add_argument("--lr", type=float, nargs="+", default=[0.1], metavar="ETA", help="learning rate(s) (default 0.1)")
    p.add_argument("--steps", "-K", type=int, default=200, metavar="K", help="iterations (default 200)")
    p.add_argument("--seeds", type=int, default=100, metavar="S", help="seeds, vmapped (default 100)")
    p.add_argument("--topology", nargs="+", default=None, metavar="NAME",
                   help="graph(s) for dpsgd / decentralized_periodic / matcha (default ring)")
    p.add_argument("--weights", metavar="RULE", help=f"weight rule (default {_default('weights')})")
    p.add_argument("--easgd-alpha", type=float, default=None, dest="alpha", metavar="A",
                   help="EASGD / Overlap Local-SGD alpha (default 2/(m+2) for EASGD, 0.5 for Overlap)")
    renamed_option(p, "--alpha", "--easgd-alpha")
    p.add_argument("--budget", type=float, help=f"MATCHA communication budget (default {_default('budget')})")
    p.add_argument("--problem", default="quadratic", metavar="NAME",
                   help=f"one of: {', '.join(PROBLEMS)} (default quadratic)")
    p.add_argument("--dim", "-d", type=int, default=10, help="problem dimension (default 10)")
    p.add_argument("--L", type=float, default=1.0, dest="smoothness",
                   help="quadratics: L, the smoothness of every worker's objective (default 1)")
    p.add_argument("--mu", type=float, default=0.01, help="quadratics: smallest eigenvalue mu (default 0.01)")
    p.add_argument("--sigma2", type=float, default=1.0, help="quadratics: noise variance sigma^2 (default 1)")
    p.add_argument("--heterogeneity", type=float, default=None, metavar="H",
                   help="spread of the per-worker data: quadratics, of the optima (default 0: identical data); "
                        "noniid_logistic, of the feature means and label vectors (default 1)")
    p.add_argument("--hessian-spread", type=float, default=None, metavar="S",
                   help=f"quadratics: per-worker Hessians, eigenvalues scaled by 1 +- S, S in [0, 1) "
                        f"(default {HESSIAN_SPREAD:g} when --heterogeneity > 0, else 0)")
    p.add_argument("--batch-size", type=int, default=1, help="regressions: examples per gradient (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and of the runs (default 0)")
    p.add_argument("--confidence", type=float, default=0.999, metavar="C",
                   help="level of the one-sided bound on the Monte-Carlo mean that decides rows without an "
                        "exact value (default 0.999)")
    p.add_argument("--no-exact", action="store_true",
                   help="skip the exact recursion (quadratics); verdicts then use the Monte Carlo (default: off)")
    p.add_argument("--plot", metavar="PNG",
                   help="save a figure with the swept parameter on the x-axis (tau, eta, zeta of the "
                        "topologies, or m; further swept lists get a panel each): empirical +-2 s.e., exact, "
                        "the bound and its network term (default: no figure)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")


def _default(key: str):
    from coopsgd.app import config

    return config.DEFAULTS[key]


def _valid(kind: str, name: str, valid) -> str:
    if name not in valid:
        raise CommandError(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(valid)}")
    return name


def _topology_names():
    from coopsgd.core import topology

    return tuple(topology.TOPOLOGIES)


def make_algorithm(name: str, m: int, tau: int, *, topology: str | None = None,
                   weights: str | None = None, alpha: float | None = None, budget: float | None = None,
                   seed: int = 0, steps: int | None = None):
    """The named algorithm from the registry with m workers and period τ (at most ``steps``, when
    given); the keys left None take the configuration's defaults (``coopsgd.app.config.DEFAULTS``),
    as in compare and train."""
    from coopsgd.app import config

    _valid("algorithm", name, registry.names(theory=True))
    if topology is not None:
        _valid("topology", topology, _topology_names())  # a bad name is still bad input
    config.require_tau_applies(name, tau, registry.names(theory=True))
    given = {"topology": topology, "weights": weights, "mixing_alpha": alpha, "budget": budget, "steps": steps}
    cfg = config.make_config({"algorithm": name, "workers": m, "tau": tau, "seed": seed},
                             {k: v for k, v in given.items() if v is not None})
    return registry.build(cfg)[0]


def make_problem(name: str, *, d: int, L: float, mu: float, sigma2: float, heterogeneity: float | None,
                 m: int, batch_size: int, seed: int, hessian_spread: float | None = None):
    """The named problem (see :mod:`coopsgd.analysis.problems`); per-worker Hessians when
    ``hessian_spread`` (default :data:`HESSIAN_SPREAD` with ``heterogeneity > 0``) is positive."""
    from coopsgd.analysis import problems

    _valid("problem", name, PROBLEMS)
    if name == "quadratic":
        h = heterogeneity or 0.0
        spread = (HESSIAN_SPREAD if h > 0 else 0.0) if hessian_spread is None else hessian_spread
        if spread > 0:
            return problems.heterogeneous_quadratic(d, m, L, mu, sigma2, seed, optima_spread=h, hessian_spread=spread)
        return problems.quadratic(d, L, mu, sigma2, seed, m=m if h > 0 else None, heterogeneity=h)
    if name == "noniid_logistic":
        return problems.noniid_logistic_regression(m, max(128, 4 * d), d, batch_size=batch_size, seed=seed,
                                                   heterogeneity=1.0 if heterogeneity is None else heterogeneity)
    factory = problems.linear_regression if name == "linear_regression" else problems.logistic_regression
    return factory(max(512, 4 * d), d, batch_size=batch_size, seed=seed)


def _check(args) -> None:
    _valid("algorithm", args.algorithm, registry.names(theory=True))
    _valid("problem", args.problem, PROBLEMS)
    for flag, values, low in (("--workers", args.workers, 1), ("--tau", args.tau or [1], 1)):
        for x in values:
            if x < low:
                raise CommandError(f"{flag} must be >= {low}, got {x}")
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.seeds < 2:
        raise CommandError(f"--seeds must be >= 2 (a standard error needs two), got {args.seeds}")
    for eta in args.lr:
        if not eta > 0:
            raise CommandError(f"--lr must be > 0, got {eta}")
    if not 0.5 <= args.confidence < 1:
        raise CommandError(f"--confidence must lie in [0.5, 1) (a one-sided level), got {args.confidence}")
    if args.heterogeneity is not None and not args.heterogeneity >= 0:
        raise CommandError(f"--heterogeneity must be >= 0, got {args.heterogeneity}")
    if args.hessian_spread is not None:
        if args.problem != "quadratic":
            raise CommandError(f"--hessian-spread {args.hessian_spread:g} applies to --problem quadratic only, "
                               f"not {args.problem}")
        if not 0 <= args.hessian_spread < 1:
            raise CommandError(f"--hessian-spread must lie in [0, 1) (every Hessian stays PSD), got {args.hessian_spread}")
    if args.heterogeneity and args.problem in ("linear_regression", "logistic_regression"):
        raise CommandError(f"--heterogeneity applies to quadratic and noniid_logistic, not {args.problem} "
                           "(identical data)")
    per_worker = args.problem == "noniid_logistic" or bool(args.heterogeneity) or bool(args.hessian_spread)
    if per_worker and len(args.workers) > 1:
        raise CommandError("per-worker data (--heterogeneity, --hessian-spread, noniid_logistic) need a single "
                           f"--workers value, got {len(args.workers)}")
    if args.plot:
        check_png_path("--plot", args.plot)


def run(args) -> int:
    """Run every row, print the table (or JSON), save the figure; return the exit code (0 all hold, 1 not)."""
    _check(args)
    taus = args.tau or [1]
    topologies = args.topology or [None]
    notes = []
    graph_names = [n for n in registry.names(theory=True) if registry.get(n).graph]
    if args.topology and not registry.get(args.algorithm).graph:
        for name in args.topology:
            _valid("topology", name, _topology_names())
        notes.append(f"note: --topology is ignored for {args.algorithm} (its W does not come from a graph; "
                     f"it applies to {', '.join(graph_names)})")
        topologies = [None]

    from coopsgd.analysis import theory, verify

    rows, keys = [], []
    for m in args.workers:
        try:
            problem = make_problem(args.problem, d=args.dim, L=args.smoothness, mu=args.mu, sigma2=args.sigma2,
                                   heterogeneity=args.heterogeneity, m=m, batch_size=args.batch_size,
                                   seed=args.seed, hessian_spread=args.hessian_spread)
        except ValueError as err:
            raise CommandError(str(err)) from None
        for topo_name, tau in itertools.product(topologies, taus):
            try:
                algo = make_algorithm(args.algorithm, m, tau, topology=topo_name, weights=args.weights,
                                      alpha=args.alpha, budget=args.budget, seed=args.seed, steps=args.steps)
            except ValueError as err:
                raise CommandError(str(err)) from None
            label = args.algorithm + (f"/{topo_name}" if topo_name else "")
            for eta in args.lr:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", theory.StepSizeWarning)
                    try:
                        row = verify.check_bound(algo, problem, eta, args.steps, args.seeds, key=args.seed,
                                                 exact=False if args.no_exact else None, label=label,
                                                 confidence=args.confidence)
                    except ValueError as err:
                        raise CommandError(str(err)) from None
                notes += [f"note: m={m} tau={tau} eta={eta:g}: {w.message}" for w in caught]
                rows.append(row)
                keys.append((m, topo_name, tau, eta))
    violations = [r for r in rows if r.violated]
    if args.plot:
        _plot(args, rows, keys, topologies)
    if args.json:
        print(to_json({"rows": [r.as_dict() for r in rows], "holds": all(r.holds for r in rows),
                       "violations": len(violations)}, indent=2))
    else:
        print(verify.format_table(rows))
        outside = [r for r in rows if not r.holds and not r.applies]
        infinite = [r for r in rows if r.bound.total == float("inf")]
        print(f"\n{sum(r.holds for r in rows) - len(infinite)} of {len(rows)} rows hold")
        if infinite:
            print(f"{len(infinite)} rows have no finite bound (eta beyond its step-size condition)")
        if violations:
            print(f"{len(violations)} rows VIOLATE the bound where its assumptions hold "
                  "(a finding: see docs/theory.md)")
        if outside:
            print(f"{len(outside)} rows exceed the bound outside its assumptions (not claimed there)")
    for line in notes:
        print(line, file=sys.stderr)
    return 0 if all(r.holds for r in rows) else 1


def _plot(args, rows, keys, topologies) -> None:
    """One panel per combination of the swept values not on the x-axis; x = the first swept of τ, η,
    topology (as ζ), m (η when nothing is swept)."""
    from coopsgd.analysis import verify

    lists = {"tau": args.tau or [1], "eta": args.lr, "topology": topologies, "m": args.workers}
    index = {"m": 0, "topology": 1, "tau": 2, "eta": 3}
    swept = [k for k in ("tau", "eta", "topology", "m") if len(lists[k]) > 1]
    x = swept[0] if swept else "eta"
    others = [k for k in swept if k != x]
    fixed = [f"m = {args.workers[0]}"] if "m" not in swept else []
    if topologies != [None] and "topology" not in swept:
        fixed.append(f"topology {topologies[0]}")
    if "tau" not in swept:
        fixed.append(f"τ = {lists['tau'][0]}")
    panels = {}
    for combo in itertools.product(*(lists[k] for k in others)):
        chosen = [(r, key) for r, key in zip(rows, keys) if all(key[index[k]] == v for k, v in zip(others, combo))]
        sub = [r for r, _ in chosen]
        if x == "topology":
            xs, xlabel = [r.zeta for r in sub], "ζ of the topology (√ρ, ρ = 1 − p)"
            ticks = [f"{key[1]}\n{r.zeta:.3g}" for r, key in chosen]
        else:
            xs = [key[index[x]] for _, key in chosen]
            xlabel = {"tau": "τ (period)", "eta": "η (learning rate)", "m": "m (workers)"}[x]
            ticks = [f"{v:g}" for v in xs]
        symbol = {"tau": "τ", "eta": "η", "topology": "topology", "m": "m"}
        name = ", ".join(f"{symbol[k]} = {v}" for k, v in zip(others, combo)) or f"{args.algorithm}: sweep over {xlabel.split()[0]}"
        panels[name] = (xlabel, xs, sub, ticks)
    title = f"{args.algorithm} on {rows[0].problem}" + (": " + ", ".join(fixed) if fixed else "")
    verify.plot(panels, args.plot, title=title)
