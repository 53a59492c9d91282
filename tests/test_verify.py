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


def _hessians(p, m):
    """Each worker's A_i as a d × d matrix (one shared A for an identical quadratic)."""
    lam = np.broadcast_to(p.worker_eigenvalues, (m, p.d))
    q = np.eye(p.d) if p.rotation is None else p.rotation
    return np.stack([q @ np.diag(lam[i]) @ q.T for i in range(m)])


def _random_w(sched, rng, S):
    """S independent MATCHA draws W = I − α Σ_j B_j L_j, B_j ~ Bernoulli(p_j) (MATCHA, §3)."""
    active = rng.random((S, len(sched.probabilities))) < sched.probabilities
    return np.eye(sched.n) - sched.alpha * np.einsum("sj,jab->sab", active.astype(float), sched.laplacians)


def numpy_monte_carlo(algo, p, eta, K, S=3000, seed=0, random_w=False):
    """(X − ηG) W_k written out in NumPy, independent of the engine and of the recursion; with
    ``random_w`` every sample path draws its own MATCHA W_k."""
    rng = np.random.default_rng(seed)
    n, m, d = algo.n, algo.m, p.d
    X = np.broadcast_to(p.x0, (S, n, d)).copy()
    opt = p.optima if len(p.optima) == m else np.repeat(p.optima, m, 0)
    hess = _hessians(p, m)
    abar = hess.mean(0)
    xstar = np.linalg.solve(abar, np.einsum("iab,ib->a", hess, opt) / m)  # argmin of F, by hand
    out = np.zeros((S, K))
    for k in range(K):
        out[:, k] = (((X.mean(1) - xstar) @ abar) ** 2).sum(1)
        G = np.zeros_like(X)
        G[:, :m] = np.einsum("sib,iab->sia", X[:, :m] - opt, hess) + rng.normal(size=(S, m, d)) * math.sqrt(p.sigma2 / d)
        if random_w and algo.communicates(k):
            X = np.einsum("sij,sid->sjd", _random_w(algo.mixing, rng, S), X - eta * G)
        else:
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

    @pytest.mark.parametrize("algo", [coopsgd.local_sgd(4, 3), coopsgd.easgd(4, 2),
                                      coopsgd.decentralized_periodic(nx.cycle_graph(4), 2)],
                             ids=["local_sgd", "easgd", "ring"])
    def test_per_worker_hessians(self, algo):
        p = problems.heterogeneous_quadratic(3, 4, sigma2=0.5, optima_spread=3.0, hessian_spread=0.9, seed=4,
                                             rotate=True)
        exact = exact_error_curve(algo, p, 0.3, 20)
        runs = numpy_monte_carlo(algo, p, 0.3, 20, S=4000)
        mc, se = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs))
        assert np.all(np.abs(mc - exact) <= 4.5 * se + 1e-9 * exact)

    def test_random_w_in_expectation(self):
        # MATCHA: the recursion through E[W] and E[W ⊗ W] against paths that each draw their own W_k
        algo = coopsgd.matcha(nx.cycle_graph(5), 0.5, seed=3, tau=2)
        p = problems.heterogeneous_quadratic(2, 5, sigma2=0.2, optima_spread=5.0, hessian_spread=0.9, seed=1)
        expected = exact_error_curve(algo, p, 0.3, 20)
        runs = numpy_monte_carlo(algo, p, 0.3, 20, S=6000, random_w=True)
        mc, se = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs))
        assert np.all(np.abs(mc - expected) <= 4.5 * se + 1e-9 * expected)
        realised = exact_error_curve(algo, p, 0.3, 20, over_w="realised")  # one seeded draw: another value
        assert np.max(np.abs(realised / expected - 1)) > 1e-4

    def test_heterogeneous_hessians_make_the_network_show(self):
        # [derived] (1/m)Σ A_i x^(i) ≠ Ā u: the averaged model now depends on τ and on ζ (monotonically here)
        p = problems.heterogeneous_quadratic(10, 8, mu=0.1, sigma2=1.0, optima_spread=10.0, hessian_spread=0.9)
        taus = [exact_expected_error(coopsgd.local_sgd(8, t), p, 0.05, 400) for t in (1, 2, 4, 8, 16)]
        assert all(b > a * 1.005 for a, b in zip(taus, taus[1:]))
        assert taus[-1] > 1.15 * taus[0]
        graphs = [nx.complete_graph(8), nx.hypercube_graph(3), nx.cycle_graph(8)]  # ζ = 0, 0.5, 0.80
        zetas = [exact_expected_error(coopsgd.dpsgd(nx.convert_node_labels_to_integers(g)), p, 0.05, 400)
                 for g in graphs]
        assert zetas[0] < zetas[1] < zetas[2]

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

    def test_heterogeneous_problem_is_held_to_koloskova(self):
        p = problems.quadratic(5, m=4, heterogeneity=2.0)
        r = verify.check_bound(coopsgd.local_sgd(4, 2), p, 0.1, 20, 4)
        assert r.applies and r.holds and r.theorem == "koloskova" and r.decided_by == "exact"
        assert r.bound.dissimilarity > 0 and r.constants["zeta2"] == pytest.approx(p.heterogeneity)

    def test_the_exact_value_decides_the_edge_case(self):
        # the Monte-Carlo mean of this run is above the bound by about half a standard error, the
        # exact value below it: the verdict is the exact one
        algo = coopsgd.easgd(1, 1, 0.5)
        p = problems.quadratic(1, 1.0, 1.0, 1.0, 0)
        r = verify.check_bound(algo, p, 2.0, 300, 100)
        assert r.exact < r.bound.total < r.empirical and r.holds and r.decided_by == "exact"
        assert r.lower < r.bound.total  # the Monte Carlo alone would not have called it either

    def test_step_size_outside_the_condition_warns(self):
        with pytest.warns(theory.StepSizeWarning):
            r = verify.check_bound(coopsgd.local_sgd(4, 8), QUAD, 0.3, 20, 4)
        assert not r.applies and not r.lr_ok

    def test_bad_seeds(self):
        with pytest.raises(ValueError, match="seeds"):
            verify.check_bound(coopsgd.fully_sync(2), QUAD, 0.1, 10, 1)
        with pytest.raises(ValueError, match="eta"):
            verify.check_bound(coopsgd.fully_sync(2), QUAD, -0.1, 10, 4)


class TestVerdict:
    def test_exact_decides(self):
        assert verify.verdict(1.0, exact=0.99, per_seed=[5.0, 6.0])[:2] == (True, "exact")
        assert verify.verdict(1.0, exact=1.01)[:2] == (False, "exact")

    def test_one_sided_t_bound_by_hand(self):
        # 100 values, mean 1.01, sample sd 0.05 -> s.e. 0.005; t_{0.999, 99} = 3.1746 (tables)
        x = np.r_[np.full(50, 1.01 - 0.05 * math.sqrt(99 / 100)), np.full(50, 1.01 + 0.05 * math.sqrt(99 / 100))]
        assert x.std(ddof=1) == pytest.approx(0.05)
        holds, rule, lower = verify.verdict(1.0, per_seed=x)
        assert lower == pytest.approx(1.01 - 3.1746 * 0.005, abs=1e-4) and holds and rule == "MC 99.9% one-sided"
        assert not verify.verdict(0.99, per_seed=x)[0]  # 0.9941 > 0.99: declared above
        assert not verify.verdict(1.0, per_seed=x, confidence=0.5)[0]  # at 50 %: the mean itself decides

    def test_diverged_runs_do_not_hold(self):
        assert not verify.verdict(1.0, per_seed=[0.1, np.inf])[0]


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


CONSTS = dict(L=1.0, sigma2=1.0, f_gap=1.0, zeta2=0.0, growth=0.0)


def _row(label, tau, empirical, applies=True, exact=True):
    bound = theory.cooperative_bound(L=1.0, sigma2=1.0, f_gap=1.0, eta=0.1, m=4, tau=tau, zeta=0.0, K=100)
    return verify.BoundCheck(
        algorithm="local_sgd", problem="quadratic(d=3)", m=4, tau=tau, v=0, zeta=0.0, eta=0.1, K=100, seeds=8,
        empirical=empirical, stderr=0.001, exact=empirical * 1.01 if exact else None, local_models=empirical * 1.2,
        bound=bound, ratio=empirical / bound.total, holds=empirical <= bound.total, applies=applies, lr_ok=applies,
        eta_max=0.5, note="" if applies else "eta > eta_max = 0.5", label=label,
        decided_by="exact" if exact else "MC 99.9% one-sided", constants=CONSTS)


def _legend(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


class TestOutput:
    def test_table(self):
        rows = [_row("a", 1, 0.1), _row("b", 4, 0.3), _row("c", 8, 9.0, applies=False, exact=False)]
        lines = verify.format_table(rows).splitlines()
        assert lines[0] == "> problem: quadratic(d=3) — L = 1, σ² = 1, F(u₁) − F_inf = 1, ζ̄² = 0 (identical data)"
        assert lines[1].startswith("> bound: Wang & Joshi 2021") and "averaged model" in lines[2]
        table = [line for line in lines if line.startswith("|")]
        assert len(table) == 5 and table[2].startswith("| a | 4 | 1 |") and table[3].startswith("| b | 4 | 4 |")
        assert table[2].endswith("| Thm 1 (W&J) | exact | yes |")
        assert "| MC 99.9% one-sided | no (n/a) (eta > eta_max = 0.5) |" in table[4]
        bad = _row("d", 1, 9.0)
        assert bad.violated and "**NO**" in verify.format_table([bad])

    def test_plot_draws_the_swept_parameter_and_only_what_is_drawn(self):
        from coopsgd.analysis import report

        rows = [_row("a", 1, 0.1), _row("b", 4, 0.3), _row("c", 8, 0.5)]
        fig = report.draw({"τ": ("τ (period)", [1, 4, 8], rows)}, title="local_sgd: m = 4")
        ax = fig.axes[0]
        labels = _legend(ax)
        assert "bound (assumptions hold)" in labels and not any("beyond" in lab for lab in labels)
        assert "exact (recursion)" in labels and "network term of the bound" in labels
        assert ax.get_xlabel() == "τ (period)" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "8"]
        assert ax.get_yscale() == "symlog"  # the network term is 0 at τ = 1 and stays on the figure
        assert fig._suptitle.get_text() == "local_sgd: m = 4"
        outside = [_row("a", 2, 0.1), _row("c", 8, 9.0, applies=False, exact=False)]
        ax = report.draw({"x": ("τ", [2, 8], outside)}).axes[0]
        assert ax.get_yscale() == "log" and "bound, η beyond its step-size condition" in _legend(ax)
        assert "exact (recursion)" in _legend(ax)  # one of the two rows has it

    def test_plot_file(self, tmp_path):
        rows = [_row("a", 1, 0.1), _row("b", 4, 0.3), _row("c", 8, 9.0, applies=False)]
        path = verify.plot({"τ": ("τ", [1, 4, 8], rows), "ζ": ("ζ", [0, 0.5, 0.5], rows)}, tmp_path / "x.png")
        assert os.path.getsize(path) > 1000

    def test_as_dict_is_json(self):
        d = _row("a", 2, 0.1).as_dict()
        json.dumps(d)
        assert set(d["bound"]) == {"optimization", "noise", "network", "total", "dissimilarity", "theorem"}
        assert d["violated"] is False and d["theorem"] == "cooperative" and d["constants"]["L"] == 1.0


class TestCLI:
    def test_table_exit_zero(self, capsys):
        code = main(["verify", "--algorithm", "local_sgd", "--workers", "4", "--tau", "1", "4",
                     "--lr", "0.1", "--steps", "40", "--seeds", "8", "--topology", "ring"])
        captured = capsys.readouterr()
        assert code == 0 and "2 of 2 rows hold" in captured.out
        assert captured.out.count("| local_sgd | 4 |") == 2
        assert "> problem: quadratic(d=10) — L = 1, σ² = 1" in captured.out
        assert "--topology is ignored for local_sgd" in captured.err

    def test_json(self, capsys):
        code = main(["verify", "--algorithm", "dpsgd", "--workers", "6", "--topology", "ring",
                     "--lr", "0.1", "--steps", "30", "--seeds", "4", "--json"])
        data = json.loads(capsys.readouterr().out)
        assert code == 0 and data["holds"] and data["violations"] == 0
        row = data["rows"][0]
        assert {"empirical", "stderr", "bound", "ratio", "holds", "decided_by", "theorem", "constants"} <= set(row)

    def test_exit_one_when_a_row_does_not_hold(self, capsys):
        code = main(["verify", "--algorithm", "fully_sync", "--workers", "2", "--lr", "3.0",
                     "--steps", "30", "--seeds", "4"])
        captured = capsys.readouterr()
        assert code == 1 and "exceed the bound outside its assumptions" in captured.out

    def test_the_edge_case_holds(self, capsys):
        code = main(["verify", "-a", "easgd", "-m", "1", "--easgd-alpha", "0.5", "--lr", "2", "-d", "1", "--mu", "1",
                     "--sigma2", "1", "-K", "300", "--seed", "0"])
        out = capsys.readouterr().out
        assert code == 0 and "VIOLATE" not in out and "| 0.9967 |" in out and "| exact | yes |" in out

    def test_heterogeneity_runs_under_koloskova(self, capsys, tmp_path):
        png = tmp_path / "tau.png"
        code = main(["verify", "-a", "local_sgd", "-m", "4", "--tau", "1", "4", "--heterogeneity", "3", "--lr", "0.05",
                     "-K", "60", "--seeds", "4", "-d", "4", "--plot", str(png)])
        out = capsys.readouterr().out
        assert code == 0 and "outside" not in out and "Koloskova" in out and "ζ̄² =" in out
        assert out.count("| exact | yes |") == 2 and png.exists()

    def test_noniid_logistic_is_decided_by_the_confidence_bound(self, capsys):
        code = main(["verify", "-a", "dpsgd", "-m", "4", "--topology", "ring", "--problem", "noniid_logistic",
                     "--lr", "0.05", "-K", "40", "--seeds", "8", "-d", "4"])
        out = capsys.readouterr().out
        assert code == 0 and "| Koloskova | MC 99.9% one-sided | yes |" in out

    def test_every_option_shows_its_default(self):
        from coopsgd.app.cli import build_parser

        parser, _ = build_parser(["verify"])
        sub = next(a for a in parser._actions if a.dest == "command").choices["verify"]
        helps = {a.option_strings[0]: a.help for a in sub._actions
                 if a.option_strings and a.help not in (None, "==SUPPRESS==") and a.dest != "help"}
        assert {"--easgd-alpha", "--plot", "--heterogeneity", "--confidence"} <= set(helps)
        missing = [opt for opt, text in helps.items() if "default" not in text and "required" not in text]
        assert not missing
        assert "x-axis" in helps["--plot"] and "swept" in helps["--plot"]

    @pytest.mark.parametrize(
        "argv, match",
        [
            (["--algorithm", "sgdd"], "valid algorithm names: fully_sync, local_sgd"),
            (["--algorithm", "dpsgd", "--topology", "moebius"], "valid topology names: ring"),
            (["--algorithm", "overlap_local_sgd", "--easgd-alpha", "0.5", "--tau", "2"], "symmetric"),
            (["--algorithm", "dpsgd", "--tau", "4"], "decentralized_periodic"),
            (["--algorithm", "local_sgd", "--seeds", "1"], "--seeds"),
            (["--algorithm", "local_sgd", "--lr", "-1"], "--lr"),
            (["--algorithm", "local_sgd", "--steps", "x"], "invalid int"),
            (["--algorithm", "easgd", "--easgd-alpha", "5"], "alpha"),
            (["--algorithm", "easgd", "--alpha", "0.5"], "--alpha was renamed: use --easgd-alpha"),
            (["--algorithm", "local_sgd", "--dim", "0"], "d must be"),
            (["--algorithm", "local_sgd", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
            (["--algorithm", "local_sgd", "--problem", "mnist"], "valid problem names: quadratic"),
            (["--algorithm", "local_sgd", "--confidence", "1.5"], "--confidence must lie in [0.5, 1)"),
            (["--algorithm", "local_sgd", "--hessian-spread", "1.2"], "--hessian-spread must lie in [0, 1)"),
            (["--algorithm", "local_sgd", "--problem", "logistic_regression", "--hessian-spread", "0.5"],
             "applies to --problem quadratic only"),
            (["--algorithm", "local_sgd", "--heterogeneity", "-1"], "--heterogeneity must be >= 0"),
            (["--algorithm", "local_sgd", "--problem", "linear_regression", "--heterogeneity", "1"],
             "not linear_regression"),
            (["--algorithm", "local_sgd", "--heterogeneity", "1", "-m", "2", "4"], "single --workers"),
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
