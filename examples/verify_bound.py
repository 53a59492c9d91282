"""Sweep τ, topology (ζ), η and m, put every run beside Cooperative SGD's bound, and plot it.

    python examples/verify_bound.py --out docs/img   # the full sweeps (a few minutes on 2 CPU cores)
    python examples/verify_bound.py --quick          # two panels of one run, a few seconds
    python examples/verify_bound.py --scan           # exact values on a grid of 1488 quadratics (no engine)

Every run is the real engine (coopsgd.CooperativeSGD with optax.sgd) with the seeds vmapped. On the
quadratic the exact expected value (mean–covariance recursion) is printed beside the Monte-Carlo
estimate; the last panel uses logistic regression, whose non-linear gradient lets the network
error reach the averaged model. Writes verify_bound.png; exit status 1 if a bound is violated
where its assumptions hold.
"""

import argparse
import os
import sys

import networkx as nx

import coopsgd
from coopsgd import topology
from coopsgd.analysis import exact, problems, theory, verify


def scan() -> int:
    """The exact expected error against the bound on a grid of quadratics, algorithms and step sizes
    inside the step-size condition; prints the count and the largest ratios."""
    ratios = []
    for d, mu, L in [(10, 0.01, 1.0), (5, 1.0, 1.0), (10, 0.5, 1.0), (1, 1.0, 1.0)]:
        for sigma2 in (1.0, 0.01):
            p = problems.quadratic(d, L=L, mu=mu, sigma2=sigma2, seed=0)
            for m in (2, 4, 8):
                algos = [coopsgd.local_sgd(m, t) for t in (1, 2, 8)]
                algos += [coopsgd.easgd(m, t, a) for t in (1, 4) for a in (0.5 / (m + 1), 2 / (m + 2), 1.9 / (m + 1))]
                if m >= 3:
                    algos += [coopsgd.decentralized_periodic(nx.cycle_graph(m), t) for t in (1, 4)]
                for algo in algos:
                    eta_max = theory.lr_condition(L=L, eta=1.0, m=m, tau=algo.tau, zeta=algo.zeta, v=algo.v).eta_max
                    for K in (20, 200):
                        for frac in (0.25, 0.6, 1.0):
                            eta = frac * eta_max
                            value = exact.exact_expected_error(algo, p, eta, K)
                            bound = theory.bound_for(algo, L=L, sigma2=sigma2, f_gap=p.f_gap, eta=eta, K=K)
                            ratios.append((value / bound.total, algo.name, m, algo.tau, round(algo.zeta, 3),
                                           d, mu, sigma2, K, round(eta, 4)))
    ratios.sort(reverse=True)
    print(f"{len(ratios)} configurations; {sum(r[0] > 1 for r in ratios)} above the bound; largest ratios:")
    for r in ratios[:5]:
        print("  ratio {:.4f}: {} m={} tau={} zeta={} d={} mu={} sigma2={} K={} eta={}".format(*r))
    return 1 if ratios[0][0] > 1 else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small runs (for tests)")
    parser.add_argument("--out", default=".", help="folder for verify_bound.png")
    parser.add_argument("--scan", action="store_true", help="only the exact grid scan (no engine, no plot)")
    args = parser.parse_args(argv)
    if args.scan:
        return scan()

    if args.quick:
        K, seeds, d = 40, 4, 10
        taus, graphs, etas, ms = [4], ["ring"], [0.05], [4]
    else:
        K, seeds, d = 500, 100, 10
        taus, graphs, etas, ms = [1, 2, 4, 8, 16], ["complete", "exponential", "torus", "ring"], \
            [0.0125, 0.025, 0.05, 0.1, 0.2], [2, 4, 8, 16, 32]
    quad = problems.quadratic(d, L=1.0, mu=0.01, sigma2=1.0, seed=0)
    logistic = problems.logistic_regression(512, d, seed=0)
    m0, eta0 = 16 if not args.quick else 4, 0.05
    panels = {}

    def panel(name, xlabel, xs, runs, problem):
        rows = verify.sweep(runs, problem, K, seeds)
        panels[name] = (xlabel, xs, rows)
        print(f"\n### {name}\n")
        print(verify.format_table(rows))

    panel(f"local SGD, m = {m0}, quadratic", "τ", taus,
          [(f"local_sgd τ={t}", coopsgd.local_sgd(m0, t), eta0) for t in taus], quad)
    if args.quick:  # two panels: a few seconds of compilation
        graphs, etas, ms = [], [], []
    algos = [coopsgd.decentralized_periodic(topology.by_name(g, m0), 2) for g in graphs]
    if algos:
        panel(f"decentralized τ = 2, m = {m0}: ζ", "ζ", [round(a.zeta, 3) for a in algos],
              [(f"{g} τ=2", a, eta0) for g, a in zip(graphs, algos)], quad)
    if etas:
        panel(f"local SGD τ = 4, m = {m0}: η", "η", etas,
              [(f"local_sgd η={e}", coopsgd.local_sgd(m0, 4), e) for e in etas], quad)
    if ms:
        panel("EASGD α* = 2/(m+2), τ = 4: m", "m", ms,
              [(f"easgd m={m}", coopsgd.easgd(m, 4), eta0) for m in ms], quad)
    panel(f"local SGD, m = {m0}, logistic regression", "τ", taus,
          [(f"local_sgd τ={t}", coopsgd.local_sgd(m0, t), 0.5) for t in taus], logistic)

    path = verify.plot(panels, os.path.join(args.out, "verify_bound.png"),
                       title=f"Cooperative SGD Theorem 1 beside the engine: K = {K}, {seeds} seeds, d = {d}")
    rows = [r for _, _, rs in panels.values() for r in rs]
    print(f"\n{sum(r.holds for r in rows)} of {len(rows)} runs: the bound holds; "
          f"{sum(r.violated for r in rows)} violations where it applies; plot: {path}")
    return 1 if any(r.violated for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
