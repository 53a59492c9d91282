"""Benchmark of the verification harness: one bound check at m = 16, d = 100, K = 1000, 100 seeds.

    python benchmarks/verify.py [--repeats 3]

Prints JSON: wall-clock seconds of ``coopsgd.analysis.verify.check_bound`` end to end (engine
build, compile, the vmapped run of all seeds, the exact recursion), of the Monte-Carlo part alone,
and of the exact recursion alone, for local SGD (τ = 4) and D-PSGD on a ring (identical quadratic,
Theorem 1), and for MATCHA on a 4×4 torus on a heterogeneous quadratic (per-worker Hessians,
Koloskova et al.'s bound, the exact recursion in expectation over the random W through E[W ⊗ W]).
Target: ≤ 10 s per check on a 2-core CPU. Timings are reported, never asserted in tests.
"""

import argparse
import json
import os
import platform
import time

import jax
import networkx as nx

import coopsgd
from coopsgd.analysis import problems, verify
from coopsgd.analysis.exact import exact_expected_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    m, d, K, seeds, eta = 16, 100, 1000, 100, 0.04
    problem = problems.quadratic(d, L=1.0, mu=0.01, sigma2=1.0, seed=0)
    heterogeneous = problems.heterogeneous_quadratic(d, m, 1.0, 0.01, 1.0, 0, optima_spread=10.0, hessian_spread=0.9)
    configs = {
        "local_sgd_tau4": (coopsgd.local_sgd(m, 4), problem),
        "dpsgd_ring": (coopsgd.dpsgd(nx.cycle_graph(m)), problem),
        "matcha_torus_heterogeneous": (coopsgd.matcha(nx.convert_node_labels_to_integers(nx.grid_2d_graph(4, 4, periodic=True)), 0.5),
                                       heterogeneous),
    }
    results = {}
    for name, (algo, problem) in configs.items():
        total, mc, exact = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            report = verify.check_bound(algo, problem, eta, K, seeds)
            total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify.gradient_norms(algo, problem, eta, K, seeds)
            mc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            exact_expected_error(algo, problem, eta, K)
            exact.append(time.perf_counter() - t0)
        results[name] = {
            "check_bound_s": round(min(total), 3),
            "check_bound_s_all": [round(t, 3) for t in total],
            "monte_carlo_s": round(min(mc), 3),
            "exact_recursion_s": round(min(exact), 3),
            "empirical": report.empirical,
            "stderr": report.stderr,
            "exact": report.exact,
            "bound": report.bound.total,
            "holds": report.holds,
            "decided_by": report.decided_by,
            "theorem": report.theorem,
        }
    print(json.dumps({
        "benchmark": "verify",
        "config": {"m": m, "d": d, "K": K, "seeds": seeds, "eta": eta,
                   "problems": sorted({p.name for _, p in configs.values()})},
        "target_s": 10.0,
        "results": results,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
