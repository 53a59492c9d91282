"""The search for counterexamples: the exact expected error never exceeds the bound inside its
assumptions, over random A(τ, W, v), identical and heterogeneous quadratics, random W (MATCHA, in
expectation over W) and the edge cases (σ² = 0, m = 1, weak-coupling EASGD, η at η_max). A failure
here is a finding (docs/theory.md §7), not a tolerance to loosen."""

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coopsgd
from coopsgd import mixing
from coopsgd.analysis import exact, problems, theory


def _graph(m, seed):
    g = nx.gnp_random_graph(m, 0.4, seed=seed)
    g.add_edges_from((i, i + 1) for i in range(m - 1))  # connected
    return g


def _algorithm(kind, m, tau, seed, alpha_frac):
    if kind == "local":
        return coopsgd.local_sgd(m, tau)
    if kind == "easgd":  # α anywhere in (0, 2/(m+1)): weak coupling near 0, negative self-weight past 1/m
        return coopsgd.easgd(m, tau, alpha_frac * 2 / (m + 1))
    m = max(m, 3)
    if kind == "graph":
        rule = ["metropolis", "max_degree", "best_constant"][seed % 3]
        return coopsgd.decentralized_periodic(_graph(m, seed), tau, rule)
    if kind == "auxiliary":  # a random symmetric doubly stochastic W on m + v columns, v = 1 or 2
        v = 1 + seed % 2
        return coopsgd.Algorithm(mixing.lazy(mixing.metropolis(_graph(m + v, seed))), tau, v=v)
    return coopsgd.matcha(nx.cycle_graph(m) if seed % 2 else _graph(m, seed), 0.2 + 0.8 * alpha_frac, seed, tau=tau)


def _problem(heterogeneous, d, m, L, mu_frac, sigma2, spread, hspread, seed):
    if heterogeneous:
        return problems.heterogeneous_quadratic(d, m, L, L * mu_frac, sigma2, seed, optima_spread=spread,
                                                hessian_spread=hspread, rotate=bool(seed % 2))
    return problems.quadratic(d, L, L * mu_frac, sigma2, seed, rotate=bool(seed % 2))


def _ratio(algo, p, frac, K):
    cond = theory.step_size_for(algo, L=p.L, eta=1.0, zeta2=p.zeta2, growth=p.growth)
    eta = frac * cond.eta_max
    assert theory.step_size_for(algo, L=p.L, eta=eta, zeta2=p.zeta2, growth=p.growth).ok
    value = exact.exact_expected_error(algo, p, eta, K)
    bound = theory.bound_for(algo, L=p.L, sigma2=p.sigma2, f_gap=p.f_gap, eta=eta, K=K, zeta2=p.zeta2,
                             growth=p.growth)
    assert bound.theorem == ("cooperative" if p.identical else "koloskova")
    return value, bound


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["local", "easgd", "graph", "auxiliary", "matcha"]),
    m=st.integers(1, 7), tau=st.sampled_from([1, 2, 3, 5, 8]), seed=st.integers(0, 10_000),
    alpha_frac=st.floats(0.01, 0.99), heterogeneous=st.booleans(), d=st.integers(1, 4),
    L=st.sampled_from([0.5, 1.0, 4.0]), mu_frac=st.sampled_from([0.01, 0.3, 1.0]),
    sigma2=st.sampled_from([0.0, 0.01, 1.0]), spread=st.sampled_from([0.0, 0.5, 3.0, 10.0]),
    hspread=st.sampled_from([0.0, 0.5, 0.95]), frac=st.sampled_from([0.2, 0.6, 0.9, 0.999]),
    K=st.sampled_from([1, 7, 40, 150]),
)
def test_exact_error_never_exceeds_the_bound(kind, m, tau, seed, alpha_frac, heterogeneous, d, L, mu_frac, sigma2,
                                             spread, hspread, frac, K):
    algo = _algorithm(kind, m, tau, seed, alpha_frac)
    p = _problem(heterogeneous, d, algo.m, L, mu_frac, sigma2, spread, hspread, seed)
    value, bound = _ratio(algo, p, frac, K)
    assert value <= bound.total * (1 + 1e-12), (algo, p, frac, K, value, bound)


class TestEdgeCases:
    def test_the_reported_easgd_edge_case(self):
        # coopsgd verify -a easgd -m 1 --easgd-alpha 0.5 --lr 2 -d 1 --mu 1 --sigma2 1 -K 300 --seed 0:
        # W = J_2 (ζ = 0), η_eff L = 1 exactly at the step-size limit; u_{k+1} − x* = −ξ_k so
        # E‖∇F(u_k)‖² = σ² = 1 for k ≥ 2 and (1/K)Σ = (2Δ + (K − 1))/K < bound = 2Δ/K + 1
        algo = coopsgd.easgd(1, 1, 0.5)
        p = problems.quadratic(1, 1.0, 1.0, 1.0, 0)
        value = exact.exact_expected_error(algo, p, 2.0, 300)
        bound = theory.bound_for(algo, L=1.0, sigma2=1.0, f_gap=p.f_gap, eta=2.0, K=300)
        assert value == pytest.approx((2 * p.f_gap + 299) / 300, rel=1e-12)
        assert value == pytest.approx(0.9967, abs=1e-4) and bound.total == pytest.approx(1.0, abs=1e-4)
        assert value <= bound.total and theory.step_size_for(algo, L=1.0, eta=2.0).ok

    @pytest.mark.parametrize("heterogeneous", [False, True])
    def test_no_noise(self, heterogeneous):
        algo = coopsgd.decentralized_periodic(nx.cycle_graph(5), 3)
        p = _problem(heterogeneous, 3, 5, 1.0, 0.3, 0.0, 3.0, 0.9, 1)
        value, bound = _ratio(algo, p, 0.999, 200)
        assert 0 < value <= bound.total

    def test_one_worker(self):
        # m = 1: no consensus error (Y ≡ 0), so the descent part alone must bound the error; the
        # network term of the formula, η²L²σ²(τ − 1), is pure slack here
        p = problems.quadratic(3, 1.0, 1.0, 0.5, 2)
        value, bound = _ratio(coopsgd.local_sgd(1, 4), p, 1.0, 100)
        assert value <= bound.optimization + bound.noise and bound.network > 0

    def test_weak_coupling_easgd(self):
        # α = 0.01·2/(m+1): ζ = 1 − α close to 1, η_max tiny, the bound still holds
        algo = coopsgd.easgd(4, 2, 0.004)
        assert algo.zeta > 0.99
        for heterogeneous in (False, True):
            value, bound = _ratio(algo, _problem(heterogeneous, 2, 4, 1.0, 0.3, 1.0, 3.0, 0.5, 0), 0.999, 150)
            assert value <= bound.total

    def test_the_grid_reaches_where_the_bounds_are_tight(self):
        """The search has teeth: on a fixed grid both bounds come within a factor 2 of the exact value."""
        best = {"cooperative": 0.0, "koloskova": 0.0}
        rng = np.random.default_rng(0)
        for i in range(40):
            algo = _algorithm(["local", "graph", "easgd"][i % 3], 4, [1, 2][i % 2], i, 0.9)
            p = _problem(i % 4 == 0, 2, algo.m, 1.0, 1.0, 1.0, 0.5, 0.0, i)
            value, bound = _ratio(algo, p, float(rng.choice([0.9, 0.999])), 150)
            assert value <= bound.total
            best[bound.theorem] = max(best[bound.theorem], value / bound.total)
        assert best["cooperative"] > 0.9 and best["koloskova"] > 0.5
