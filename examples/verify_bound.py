"""Put runs of several algorithms beside Cooperative SGD's bound on a quadratic, and plot them.

    python examples/verify_bound.py            # the full sweep (about a minute on 2 CPU cores)
    python examples/verify_bound.py --quick    # a few seconds: small K, few seeds

Every run is the real engine (coopsgd.CooperativeSGD with optax.sgd) on coopsgd.problems.quadratic,
100 seeds vmapped; the exact expected value from the mean–covariance recursion is printed beside
the Monte-Carlo estimate. Exit status 1 if any bound is violated where its assumptions hold.
"""

import argparse
import os
import sys

import networkx as nx

import coopsgd
from coopsgd import problems, verify


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small K and few seeds (for tests)")
    parser.add_argument("--out", default=".", help="folder for verify_bound.png")
    args = parser.parse_args(argv)

    m, K, seeds, eta = (4, 40, 4, 0.05) if args.quick else (8, 400, 100, 0.05)
    problem = problems.quadratic(10, L=1.0, mu=0.01, sigma2=1.0, seed=0)
    taus = [1, 4] if args.quick else [1, 2, 4, 8, 16]
    ring = nx.cycle_graph(m)
    runs = [(f"local_sgd τ={t}", coopsgd.local_sgd(m, t), eta) for t in taus]
    runs += [(f"ring τ={t}", coopsgd.decentralized_periodic(ring, t), eta) for t in taus]
    runs += [(f"easgd α* τ={t}", coopsgd.easgd(m, t), eta) for t in taus]
    rows = verify.sweep(runs, problem, K, seeds)
    print(verify.format_table(rows))
    k = len(taus)
    path = verify.plot(
        {
            "local SGD (W = J)": ("τ", taus, rows[:k]),
            "decentralized periodic, ring": ("τ", taus, rows[k : 2 * k]),
            "EASGD, α* = 2/(m+2)": ("τ", taus, rows[2 * k :]),
        },
        os.path.join(args.out, "verify_bound.png"),
        title=f"{problem.name}, d = {problem.d}, m = {m}, η = {eta}, K = {K}, {seeds} seeds",
    )
    held = sum(r.holds for r in rows)
    print(f"\n{held} of {len(rows)} runs: the bound holds; plot: {path}")
    return 1 if any(r.violated for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
