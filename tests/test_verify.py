"""coopsgd.verify: the exact recursion against hand formulas and sampling, the harness on the engine."""

import json
import math
import os
import subprocess
import sys
import warnings

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.analysis import problems, theory, verify
from coopsgd.analysis.exact import exact_error_curve, exact_expected_error
from coopsgd.app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_monte_carlo(algo, p, eta, K, S=3000, seed=0):
    """(X − ηG) W_k written out in NumPy, independent of the engine and of the recursion."""
    rng = np.random.default_rng(seed)
    n, m, d = algo.n, algo.m, p.d
    X = np.broadcast_to(p.x0, (S, n, d)).copy()
    opt = p.optima if len(p.optima) == m else np.repeat(p.optima, m, 0)
    out = np.zeros((S, K))
    for k in range(K):
        out[:, k] = (((X.mean(1) - p.x_star) @ p.A) ** 2).sum(1)
        G = np.zeros_like(X)
        G[:, :m] = (X[:, :m] - opt) @ p.A + rng.normal(size=(S, m, d)) * math.sqrt(p.sigma2 / d)
        X = np.einsum("ij,sid->sjd", algo.mixing_at(k), X - eta * G)
    return out  # (S, K)


class TestExactRecursion:
    def test_single_worker_by_hand(self):
        # d = 1, m = 1, A = λ: u_k − x* = (1 − ηλ)^k (x0 − x*) + noise with variance
        # η²σ² Σ_{i<k} (1 − ηλ)^{2i};  E|∇F(u_k)|² = λ² (mean² + variance)
        lam, eta, s2, K = 2.0, 0.1, 0.5, 20
        p = problems.Quadratic([lam], sigma2=s2, optima=[[1.5]], x0=[0.0])
        q = 1 - eta * lam
        hand = [lam**2 * (q ** (2 * k) * 1.5**2 + eta**2 * s2 * sum(q ** (2 * i) for i in range(k)))
                for k in range(K)]
        assert np.allclose(exact_error_curve(coopsgd.fully_sync(1), p, eta, K), hand, rtol=1e-12)

    @pytest.mark.parametrize(
        "algo",
        [
            coopsgd.local_sgd(4, 3),
            coopsgd.easgd(4, 2),
            coopsgd.dpsgd(nx.cycle_graph(5)),
            coopsgd.Algorithm(schedules.cyclic([mixing.metropolis(nx.cycle_graph(4)), mixing.averaging(4)]), 2),
        ],
        ids=["local_sgd", "easgd", "dpsgd_ring", "cyclic"],
    )
    def test_against_numpy_monte_carlo(self, algo):
        p = problems.quadratic(5, L=1.0, mu=0.1, sigma2=2.0, seed=1, rotate=True)
        exact = exact_error_curve(algo, p, 0.2, 25)
        runs = numpy_monte_carlo(algo, p, 0.2, 25, S=4000)
        mc, se = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs))
        assert np.all(np.abs(mc - exact) <= 4.5 * se + 1e-9 * exact)  # every step, a few s.e.
        avg = runs.mean(1)
        assert abs(avg.mean() - exact.mean()) < 4 * avg.std(ddof=1) / math.sqrt(len(avg))

    def test_heterogeneous(self):
        algo = coopsgd.local_sgd(3, 4)
        p = problems.quadratic(4, sigma2=0.5, m=3, heterogeneity=3.0, seed=2)
        exact = exact_expected_error(algo, p, 0.3, 30)
        runs = numpy_monte_carlo(algo, p, 0.3, 30, S=4000).mean(1)
        assert abs(runs.mean() - exact) < 4 * runs.std(ddof=1) / math.sqrt(len(runs))

    def test_average_of_a_quadratic_ignores_the_network(self):
        # [derived] v = 0 and linear gradients: u_{k+1} = u_k − η A (u_k − x̄*) − η ξ̄ for every W
        p = problems.quadratic(6, seed=3)
        base = exact_error_curve(coopsgd.fully_sync(4), p, 0.2, 40)
        for algo in (coopsgd.local_sgd(4, 8), coopsgd.dpsgd(nx.path_graph(4))):
            assert np.allclose(exact_error_curve(algo, p, 0.2, 40), base, rtol=1e-10)

    def test_refuses_other_problems(self):
        with pytest.raises(ValueError, match="quadratic"):
            exact_expected_error(coopsgd.fully_sync(2), problems.linear_regression(), 0.1, 10)


class TestBoundOnQuadratics:
    def test_exact_error_never_exceeds_the_bound_within_its_assumptions(self):
        """The recalled Theorem 1 against the exact expectation on a random grid of quadratics,
        algorithms and step sizes inside the step-size condition (a failure here is a finding)."""
        rng = np.random.default_rng(0)
        worst = 0.0
        for i in range(60):
            d, m = int(rng.choice([1, 3, 6])), int(rng.choice([2, 3, 5]))
            L = float(rng.choice([0.5, 1.0, 4.0]))
            p = problems.quadratic(d, L=L, mu=L * float(rng.choice([0.01, 0.5, 1.0])),
                                   sigma2=float(rng.choice([0.01, 1.0])), seed=i, rotate=bool(i % 2))
            kind = i % 3
            if kind == 0:
                algo = coopsgd.local_sgd(m, int(rng.choice([1, 2, 5])))
            elif kind == 1:
                algo = coopsgd.easgd(m, int(rng.choice([1, 3])), float(rng.uniform(0.05, 0.95)) * 2 / (m + 1))
            else:
                algo = coopsgd.decentralized_periodic(nx.cycle_graph(max(m, 3)), int(rng.choice([1, 3])))
            cond = theory.lr_condition(L=L, eta=1.0, m=algo.m, tau=algo.tau, zeta=algo.zeta, v=algo.v)
            eta = float(rng.uniform(0.2, 1.0)) * cond.eta_max
            K = int(rng.choice([10, 100]))
            exact = exact_expected_error(algo, p, eta, K)
            bound = theory.bound_for(algo, L=L, sigma2=p.sigma2, f_gap=p.f_gap, eta=eta, K=K)
            assert exact <= bound.total, (algo, p, eta, K, exact, bound)
            worst = max(worst, exact / bound.total)
        assert worst > 0.5  # the grid reaches where the bound is tight, so the test has teeth


QUAD = problems.quadratic(10, L=1.0, mu=0.05, sigma2=1.0, seed=0)
HARNESS = [
    ("fully_sync", coopsgd.fully_sync(4), 0.2),
    ("local_sgd", coopsgd.local_sgd(4, 4), 0.1),
    ("dpsgd_ring", coopsgd.dpsgd(nx.cycle_graph(6)), 0.1),
    ("easgd_alpha_star", coopsgd.easgd(4, 2), 0.1),
]


class TestHarness:
    @pytest.mark.parametrize("name, algo, eta", HARNESS, ids=[h[0] for h in HARNESS])
    def test_bound_holds_and_matches_exact(self, name, algo, eta):
        with warnings.catch_warnings():
            warnings.simplefilter("error", theory.StepSizeWarning)  # inside the condition
            r = verify.check_bound(algo, QUAD, eta, 100, 64)
        assert r.applies and r.holds and not r.violated
        assert 0 < r.ratio < 1
        assert r.bound == theory.bound_for(algo, L=1.0, sigma2=1.0, f_gap=QUAD.f_gap, eta=eta, K=100)
        assert abs(r.empirical - r.exact) < 4 * r.stderr  # Monte Carlo on the engine vs exact
        assert r.seeds == 64 and r.local_models >= r.empirical * 0.999

    def test_overlap_is_refused(self):
        with pytest.raises(ValueError, match="symmetric"):
            verify.check_bound(coopsgd.overlap_local_sgd(4, 2, 0.5), QUAD, 0.1, 10, 4)

    def test_heterogeneous_problem_is_outside_the_theorem(self):
        p = problems.quadratic(5, m=4, heterogeneity=2.0)
        r = verify.check_bound(coopsgd.local_sgd(4, 2), p, 0.1, 20, 4)
        assert not r.applies and "per-worker optima" in r.note

    def test_step_size_outside_the_condition_warns(self):
        with pytest.warns(theory.StepSizeWarning):
            r = verify.check_bound(coopsgd.local_sgd(4, 8), QUAD, 0.3, 20, 4)
        assert not r.applies and not r.lr_ok

    def test_bad_seeds(self):
        with pytest.raises(ValueError, match="seeds"):
            verify.check_bound(coopsgd.fully_sync(2), QUAD, 0.1, 10, 1)
        with pytest.raises(ValueError, match="eta"):
            verify.check_bound(coopsgd.fully_sync(2), QUAD, -0.1, 10, 4)


class TestErrorFloor:
    """The network term needs a non-linear gradient to reach the averaged model, so the floor is
    measured on logistic regression, with the same seeds in both runs (paired differences)."""

    LOGISTIC = problems.logistic_regression(256, 8, seed=0)
    K, SEEDS = 300, 128
    _baseline = {}

    def _per_seed(self, algo, eta):
        return verify.gradient_norms(algo, self.LOGISTIC, eta, self.K, self.SEEDS)[0].mean(1)

    def _paired(self, other, eta):
        # the baseline, W = J after every step (sync SGD = local SGD τ = 1 = D-PSGD on the complete
        # graph), is shared by both tests; same seeds in both runs
        if eta not in self._baseline:
            self._baseline[eta] = self._per_seed(coopsgd.local_sgd(8, 1), eta)
        diff = self._per_seed(other, eta) - self._baseline[eta]
        return diff.mean(), diff.std(ddof=1) / math.sqrt(self.SEEDS)

    def test_floor_rises_with_tau(self):
        mean, se = self._paired(coopsgd.local_sgd(8, 32), eta=1.0)
        assert mean > 3 * se

    def test_floor_rises_with_zeta(self):
        ring = coopsgd.dpsgd(nx.cycle_graph(8))  # ζ ≈ 0.80 against ζ = 0 for the baseline
        assert ring.zeta > 0.75
        assert np.allclose(coopsgd.dpsgd(nx.complete_graph(8)).W, coopsgd.local_sgd(8, 1).W)  # the baseline
        mean, se = self._paired(ring, eta=1.0)
        assert mean > 3 * se


def _row(label, tau, empirical, applies=True):
    bound = theory.cooperative_bound(L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, m=4, tau=tau, zeta=0.0, K=100)
    return verify.BoundCheck(
        algorithm="local_sgd", problem="quadratic", m=4, tau=tau, v=0, zeta=0.0, eta=0.1, K=100, seeds=8,
        empirical=empirical, stderr=0.001, exact=empirical * 1.01, local_models=empirical * 1.2, bound=bound,
        ratio=empirical / bound.total, holds=empirical <= bound.total, applies=applies, lr_ok=applies,
        eta_max=0.5, note="" if applies else "eta > eta_max = 0.5", label=label)


class TestOutput:
    def test_table(self):
        rows = [_row("a", 1, 0.1), _row("b", 4, 0.3), _row("c", 8, 9.0, applies=False)]
        table = verify.format_table(rows).splitlines()
        assert len(table) == 5 and table[2].startswith("| a | 4 | 1 |") and table[3].startswith("| b | 4 | 4 |")
        assert table[2].endswith("| yes |") and "no (n/a) (eta > eta_max = 0.5)" in table[4]
        bad = _row("d", 1, 9.0)
        assert bad.violated and "**NO**" in verify.format_table([bad])

    def test_plot(self, tmp_path):
        rows = [_row("a", 1, 0.1), _row("b", 4, 0.3), _row("c", 8, 9.0, applies=False)]
        path = verify.plot({"τ": ("τ", [1, 4, 8], rows), "ζ": ("ζ", [0, 0.5, 0.9], rows)}, tmp_path / "x.png")
        assert os.path.getsize(path) > 1000

    def test_as_dict_is_json(self):
        d = _row("a", 2, 0.1).as_dict()
        json.dumps(d)
        assert set(d["bound"]) == {"optimization", "noise", "network", "total"} and d["violated"] is False


class TestCLI:
    def test_table_exit_zero(self, capsys):
        code = main(["verify", "--algorithm", "local_sgd", "--workers", "4", "--tau", "1", "4",
                     "--lr", "0.1", "--steps", "40", "--seeds", "8", "--topology", "ring"])
        captured = capsys.readouterr()
        assert code == 0 and "2 of 2 rows hold" in captured.out
        assert captured.out.count("| local_sgd | 4 |") == 2
        assert "--topology is ignored for local_sgd" in captured.err

    def test_json(self, capsys):
        code = main(["verify", "--algorithm", "dpsgd", "--workers", "6", "--topology", "ring",
                     "--lr", "0.1", "--steps", "30", "--seeds", "4", "--json"])
        data = json.loads(capsys.readouterr().out)
        assert code == 0 and data["holds"] and data["violations"] == 0
        row = data["rows"][0]
        assert {"empirical", "stderr", "bound", "ratio", "holds"} <= set(row)

    def test_exit_one_when_a_row_does_not_hold(self, capsys):
        code = main(["verify", "--algorithm", "fully_sync", "--workers", "2", "--lr", "3.0",
                     "--steps", "30", "--seeds", "4"])
        captured = capsys.readouterr()
        assert code == 1 and "exceed the bound outside its assumptions" in captured.out

    @pytest.mark.parametrize(
        "argv, match",
        [
            (["--algorithm", "sgdd"], "valid algorithm names: fully_sync, local_sgd"),
            (["--algorithm", "dpsgd", "--topology", "moebius"], "valid topology names: ring"),
            (["--algorithm", "overlap_local_sgd", "--alpha", "0.5", "--tau", "2"], "symmetric"),
            (["--algorithm", "dpsgd", "--tau", "4"], "decentralized_periodic"),
            (["--algorithm", "local_sgd", "--seeds", "1"], "--seeds"),
            (["--algorithm", "local_sgd", "--lr", "-1"], "--lr"),
            (["--algorithm", "local_sgd", "--steps", "x"], "invalid int"),
            (["--algorithm", "easgd", "--alpha", "5"], "alpha"),
            (["--algorithm", "local_sgd", "--dim", "0"], "d must be"),
            (["--algorithm", "local_sgd", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
            (["--algorithm", "local_sgd", "--problem", "mnist"], "valid problem names: quadratic"),
        ],
    )
    def test_bad_input_exit_two(self, argv, match, capsys):
        code = main(["verify", *argv])
        err = capsys.readouterr().err
        assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err


def test_example_quick_mode(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "verify_bound.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "holds" in out.stdout
    assert (tmp_path / "verify_bound.png").exists()
