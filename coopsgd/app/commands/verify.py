"""``coopsgd verify``: run an algorithm beside Cooperative SGD's convergence bound.

Example::

    coopsgd verify --algorithm local_sgd --workers 8 --tau 1 4 16 --lr 0.2 --steps 200 --seeds 100

Every combination of ``--workers``, ``--tau``, ``--topology`` and ``--lr`` is one row: the engine
runs plain SGD on a problem with known constants for ``--seeds`` seeds (vmapped), and the row
reports the measured ``(1/K) Σ E‖∇F(u_k)‖²``, its standard error, the exact value (quadratics),
the bound's three terms (Wang & Joshi, arXiv:1808.07576, Theorem 1 [recalled]) and whether it holds.

Exit codes: 0 when every row holds; 1 when some row does not (the output says whether it broke the
bound where the theorem's assumptions hold — a finding, reported, never hidden — or only outside
them, e.g. η beyond the step-size condition); 2 on bad input (one line on stderr).
"""

from __future__ import annotations

import sys
import warnings

from coopsgd.app import registry
from coopsgd.app.commands import CommandError, check_png_path
from coopsgd.app.files import to_json

__all__ = ["PROBLEMS", "make_algorithm", "make_problem", "register", "run"]

PROBLEMS = ("quadratic", "linear_regression", "logistic_regression")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="run an algorithm beside its convergence bound",
        description="Run the engine on a problem with known constants for many seeds and compare "
        "(1/K) sum E|grad F(u_k)|^2 with Theorem 1 of Cooperative SGD. Lists of values sweep.",
    )
    p.add_argument("--algorithm", "-a", required=True, metavar="NAME",
                   help=f"one of: {', '.join(registry.names(theory=True))}")
    p.add_argument("--workers", "-m", type=int, nargs="+", default=[8], metavar="M", help="m (default 8)")
    p.add_argument("--tau", type=int, nargs="+", default=None, metavar="TAU",
                   help="period(s) (default 1; fully_sync and dpsgd need 1)")
    p.add_argument("--lr", type=float, nargs="+", default=[0.1], metavar="ETA", help="learning rate(s)")
    p.add_argument("--steps", "-K", type=int, default=200, metavar="K", help="iterations (default 200)")
    p.add_argument("--seeds", type=int, default=100, metavar="S", help="seeds, vmapped (default 100)")
    p.add_argument("--topology", nargs="+", default=None, metavar="NAME",
                   help="graph(s) for dpsgd / decentralized_periodic / matcha (default ring)")
    p.add_argument("--weights", metavar="RULE", help=f"weight rule (default {_default('weights')})")
    p.add_argument("--alpha", type=float, default=None,
                   help="EASGD / Overlap alpha (EASGD default 2/(m+2), Overlap Local-SGD 0.5)")
    p.add_argument("--budget", type=float, help=f"MATCHA communication budget (default {_default('budget')})")
    p.add_argument("--problem", default="quadratic", metavar="NAME", help=f"one of: {', '.join(PROBLEMS)}")
    p.add_argument("--dim", "-d", type=int, default=10, help="problem dimension (default 10)")
    p.add_argument("--L", type=float, default=1.0, dest="smoothness", help="quadratic: L (default 1)")
    p.add_argument("--mu", type=float, default=0.01, help="quadratic: mu (default 0.01)")
    p.add_argument("--sigma2", type=float, default=1.0, help="quadratic: noise variance (default 1)")
    p.add_argument("--heterogeneity", type=float, default=0.0,
                   help="quadratic: spread of per-worker optima (outside the theorem when > 0)")
    p.add_argument("--batch-size", type=int, default=1, help="regressions: examples per gradient")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and of the runs")
    p.add_argument("--no-exact", action="store_true", help="skip the exact recursion (quadratics)")
    p.add_argument("--plot", metavar="PNG", help="save empirical vs bound against the row index")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


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


def make_problem(name: str, *, d: int, L: float, mu: float, sigma2: float, heterogeneity: float,
                 m: int, batch_size: int, seed: int):
    """The named problem (see :mod:`coopsgd.analysis.problems`)."""
    from coopsgd.analysis import problems

    _valid("problem", name, PROBLEMS)
    if name == "quadratic":
        return problems.quadratic(d, L, mu, sigma2, seed, m=m if heterogeneity > 0 else None,
                                  heterogeneity=heterogeneity)
    factory = problems.linear_regression if name == "linear_regression" else problems.logistic_regression
    return factory(max(512, 4 * d), d, batch_size=batch_size, seed=seed)


def run(args) -> int:
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
    if args.heterogeneity > 0 and len(args.workers) > 1:
        raise CommandError("--heterogeneity needs a single --workers value (the optima are per worker)")
    if args.plot:
        check_png_path("--plot", args.plot)
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

    rows = []
    for m in args.workers:
        try:
            problem = make_problem(args.problem, d=args.dim, L=args.smoothness, mu=args.mu,
                                   sigma2=args.sigma2, heterogeneity=args.heterogeneity, m=m,
                                   batch_size=args.batch_size, seed=args.seed)
        except ValueError as err:
            raise CommandError(str(err)) from None
        for topo_name in topologies:
            for tau in taus:
                try:
                    algo = make_algorithm(args.algorithm, m, tau, topology=topo_name, weights=args.weights,
                                          alpha=args.alpha, budget=args.budget, seed=args.seed,
                                          steps=args.steps)
                except ValueError as err:
                    raise CommandError(str(err)) from None
                label = args.algorithm + (f"/{topo_name}" if topo_name else "")
                for eta in args.lr:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", theory.StepSizeWarning)
                        try:
                            row = verify.check_bound(algo, problem, eta, args.steps, args.seeds,
                                                     key=args.seed, exact=False if args.no_exact else None,
                                                     label=label)
                        except ValueError as err:
                            raise CommandError(str(err)) from None
                    notes += [f"note: m={m} tau={tau} eta={eta:g}: {w.message}" for w in caught]
                    rows.append(row)
    violations = [r for r in rows if r.violated]
    if args.plot:
        verify.plot({f"{args.algorithm} on {args.problem}": ("row", list(range(1, len(rows) + 1)), rows)},
                    args.plot)
    if args.json:
        print(to_json({"rows": [r.as_dict() for r in rows], "holds": all(r.holds for r in rows),
                          "violations": len(violations)}, indent=2))
    else:
        print(verify.format_table(rows))
        outside = [r for r in rows if not r.holds and not r.applies]
        print(f"\n{sum(r.holds for r in rows)} of {len(rows)} rows hold")
        if violations:
            print(f"{len(violations)} rows VIOLATE the bound where its assumptions hold "
                  "(a finding: see docs/theory.md)")
        if outside:
            print(f"{len(outside)} rows exceed the bound outside its assumptions (not claimed there)")
    for line in notes:
        print(line, file=sys.stderr)
    return 0 if all(r.holds for r in rows) else 1
