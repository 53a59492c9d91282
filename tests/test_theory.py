"""coopsgd.theory: every number below is derived by hand in the test, not read back from the code."""

import math
import warnings

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.analysis import theory, tradeoff

C = dict(L=2.0, sigma2=3.0, f_gap=5.0, K=200)


class TestCooperativeBound:
    def test_sync_sgd_is_minibatch_sgd_bound(self):
        # 2*5/(0.05*200) = 1.0 ; 0.05*2*3/4 = 0.075 ; tau = 1, zeta = 0 -> no network term
        b = theory.cooperative_bound(eta=0.05, m=4, tau=1, zeta=0.0, **C)
        assert b.optimization == pytest.approx(1.0)
        assert b.noise == pytest.approx(0.075)
        assert b.network == 0.0
        assert b.total == pytest.approx(1.075)

    def test_local_sgd_network_term_is_tau_minus_one(self):
        # eta^2 L^2 sigma^2 (tau - 1) = 0.0025 * 4 * 3 * 4 = 0.12
        b = theory.cooperative_bound(eta=0.05, m=4, tau=5, zeta=0.0, **C)
        assert b.network == pytest.approx(0.12)
        assert b.optimization == pytest.approx(1.0) and b.noise == pytest.approx(0.075)

    def test_dpsgd_network_term(self):
        # tau = 1: 2 zeta^2 / (1 - zeta^2) = 2 * 0.25 / 0.75 = 2/3 -> 0.0025 * 4 * 3 * 2/3 = 0.02
        b = theory.cooperative_bound(eta=0.05, m=4, tau=1, zeta=0.5, **C)
        assert b.network == pytest.approx(0.02)

    def test_periodic_decentralized(self):
        # (1 + 0.25)/(0.75) * 4 - 1 = 17/3 ; 0.0025 * 4 * 3 * 17/3 = 0.17
        b = theory.cooperative_bound(eta=0.05, m=4, tau=4, zeta=0.5, **C)
        assert b.network == pytest.approx(0.17)

    def test_auxiliary_variables_shrink_the_effective_step(self):
        # v = 1, m = 4: eta_eff = 0.04 -> 2*5/(0.04*200) = 1.25 ; 0.04*2*3/4 = 0.06
        b = theory.cooperative_bound(eta=0.05, m=4, tau=1, zeta=0.0, v=1, **C)
        assert b.optimization == pytest.approx(1.25)
        assert b.noise == pytest.approx(0.06)

    def test_bound_grows_with_tau_and_zeta(self):
        totals = [theory.cooperative_bound(eta=0.01, m=4, tau=t, zeta=0.0, **C).total for t in (1, 2, 8)]
        assert totals[0] < totals[1] < totals[2]
        totals = [theory.cooperative_bound(eta=0.01, m=4, tau=1, zeta=z, **C).total for z in (0, 0.5, 0.9)]
        assert totals[0] < totals[1] < totals[2]

    @pytest.mark.parametrize(
        "bad, match",
        [
            (dict(zeta=1.0), "zeta < 1"),
            (dict(zeta=1.5), "zeta"),
            (dict(L=0.0), "L must be"),
            (dict(L=-1.0), "L must be"),
            (dict(eta=0.0), "eta must be"),
            (dict(sigma2=-1.0), "sigma2"),
            (dict(f_gap=-0.1), "f_gap"),
            (dict(K=0), "K must be"),
            (dict(m=0), "m must be"),
            (dict(tau=0), "tau must be"),
            (dict(eta=float("nan")), "eta"),
        ],
    )
    def test_refuses_broken_assumptions(self, bad, match):
        args = dict(eta=0.05, m=4, tau=1, zeta=0.0, **C)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            theory.cooperative_bound(**args)

    def test_warns_outside_step_size_condition(self):
        with pytest.warns(theory.StepSizeWarning, match="step-size condition"):
            theory.cooperative_bound(eta=0.5, m=4, tau=4, zeta=0.0, **C)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            theory.cooperative_bound(eta=0.01, m=4, tau=4, zeta=0.0, **C)


class TestBoundFor:
    def test_local_sgd(self):
        b = theory.bound_for(coopsgd.local_sgd(4, tau=5), eta=0.05, **C)
        assert b == theory.cooperative_bound(eta=0.05, m=4, tau=5, zeta=0.0, **C)

    def test_dpsgd_ring_reads_zeta(self):
        # ring of 8, weights 1/3: zeta = 1/3 + 2/3 cos(2 pi / 8)
        z = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8)
        b = theory.bound_for(coopsgd.dpsgd(nx.cycle_graph(8)), eta=0.02, **C)
        hand = 0.02**2 * 4 * 3 * (2 * z * z / (1 - z * z))
        assert b.network == pytest.approx(hand, rel=1e-9)

    def test_easgd_reads_v_and_zeta(self):
        m = 6
        algo = coopsgd.easgd(m, tau=2)  # alpha* = 2/(m+2): zeta* = m/(m+2) = 0.75
        b = theory.bound_for(algo, eta=0.02, **C)
        eta_eff = m * 0.02 / (m + 1)
        assert b.optimization == pytest.approx(2 * 5 / (eta_eff * 200))
        assert b.network == pytest.approx(0.02**2 * 4 * 3 * ((1 + 0.5625) / (1 - 0.5625) * 2 - 1))

    def test_overlap_local_sgd_is_refused(self):
        with pytest.raises(ValueError, match="symmetric"):
            theory.bound_for(coopsgd.overlap_local_sgd(4, tau=2, alpha=0.5), eta=0.05, **C)

    def test_varying_period_is_refused(self):
        algo = coopsgd.Algorithm(mixing.averaging(4), tau=schedules.piecewise([(0, 2), (10, 4)]))
        with pytest.raises(ValueError, match="constant period"):
            theory.bound_for(algo, eta=0.05, **C)

    def test_deterministic_cycle_uses_its_worst_mixing(self):
        # cycle [W_a, W_b] on n = 2 with ζ(W_a) = 0.5, ζ(W_b) = 0.2: rho = max ζ² = 0.25 (not the
        # cycle average of WᵀW, which is no rate for the window that uses W_a)
        wa = np.array([[0.75, 0.25], [0.25, 0.75]])
        wb = np.array([[0.6, 0.4], [0.4, 0.6]])
        algo = coopsgd.Algorithm(schedules.cyclic([wa, wb]), tau=1)
        b = theory.bound_for(algo, eta=0.02, **C)
        assert b.network == pytest.approx(0.02**2 * 4 * 3 * (2 * 0.25 / (1 - 0.25)))

    def test_cycle_with_a_non_contracting_mixing_is_refused(self):
        # cyclic [I, J]: the window that mixes with I does not contract
        algo = coopsgd.Algorithm(schedules.cyclic([np.eye(2), mixing.averaging(2)]), tau=1)
        with pytest.raises(ValueError, match="zeta = 1"):
            theory.bound_for(algo, eta=0.02, **C)

    def test_random_w_uses_expected_gram(self):
        # MATCHA: rho = |E[WᵀW] - J|_2, the network factor (1 + rho)/(1 - rho) tau - 1
        algo = coopsgd.matcha(nx.cycle_graph(6), 0.5)
        rho = theory.contraction(algo)
        b = theory.bound_for(algo, eta=0.01, **C)
        assert 0 < rho < 1 and b.network == pytest.approx(0.01**2 * 4 * 3 * (2 * rho / (1 - rho)))

    def test_heterogeneous_data_picks_koloskova(self):
        b = theory.bound_for(coopsgd.local_sgd(4, 2), eta=0.05, zeta2=1.0, **C)
        assert b.theorem == "koloskova" and b.dissimilarity > 0
        assert theory.bound_for(coopsgd.local_sgd(4, 2), eta=0.05, **C).theorem == "cooperative"
        with pytest.raises(ValueError, match="identical data"):
            theory.bound_for(coopsgd.local_sgd(4, 2), eta=0.05, zeta2=1.0, theorem="cooperative", **C)


class TestStepSize:
    def test_local_sgd_condition_by_hand(self):
        # L = 1, tau = 3: eta + 6 eta^2 = 1 at eta = 1/3
        c = theory.lr_condition(L=1.0, eta=1 / 3, tau=3)
        assert c.ok and c.eta_max == pytest.approx(1 / 3) and c.value == pytest.approx(1.0)
        assert not theory.lr_condition(L=1.0, eta=0.34, tau=3).ok

    def test_sync_sgd_is_eta_l_le_one(self):
        assert theory.lr_condition(L=4.0, eta=0.25).eta_max == pytest.approx(0.25)

    def test_zeta_form(self):
        # tau = 1, zeta = 0.5: Gamma = 2 zeta^2/(1 - zeta)^2 = 2 -> eta + 2 eta^2 = 1 at eta = 1/2
        c = theory.lr_condition(L=1.0, eta=0.1, tau=1, zeta=0.5)
        assert c.eta_max == pytest.approx(0.5)
        # tau = 2, zeta = 0.5: Gamma = 2*1*(1 + 1)/0.5 + 2*4*0.25/0.25 = 8 + 8 = 16 -> eta + 16 eta^2 = 1
        assert theory.lr_condition(L=1.0, eta=0.1, tau=2, zeta=0.5).eta_max == pytest.approx((-1 + math.sqrt(65)) / 32)
        # v = 1, m = 3: linear term uses eta_eff = 3 eta / 4 ; tau = 1, zeta = 0 -> eta_max = 4/3
        assert theory.lr_condition(L=1.0, eta=0.1, m=3, v=1).eta_max == pytest.approx(4 / 3)

    def test_eta_max_shrinks_with_tau_and_zeta(self):
        e = [theory.lr_condition(L=1.0, eta=0.1, tau=t, zeta=z).eta_max for t, z in [(1, 0), (4, 0), (4, 0.5)]]
        assert e[0] > e[1] > e[2]

    def test_optimal_lr_unconstrained_by_hand(self):
        # tau = 1, zeta = 0: bound = a/eta + b eta with a = 2 f_gap / K = 0.05, b = L s2 / m = 1.5
        o = theory.optimal_lr(m=4, tau=1, zeta=0.0, **C)
        assert o.eta == pytest.approx(math.sqrt(0.05 / 1.5)) and not o.constrained
        assert o.rate == pytest.approx(2 * math.sqrt(0.05 * 1.5))

    def test_optimal_lr_is_a_minimum(self):
        k = dict(C, K=100_000)
        o = theory.optimal_lr(m=4, tau=8, zeta=0.3, **k)
        assert not o.constrained
        f = lambda e: theory.cooperative_bound(eta=e, m=4, tau=8, zeta=0.3, warn=False, **k).total
        assert f(o.eta) <= f(o.eta * 1.01) and f(o.eta) <= f(o.eta * 0.99)
        assert o.rate == pytest.approx(f(o.eta))

    def test_optimal_lr_constrained(self):
        o = theory.optimal_lr(L=1.0, sigma2=1e-6, f_gap=1e3, m=4, tau=4, zeta=0.0, K=10)
        assert o.constrained and o.eta == pytest.approx(theory.lr_condition(L=1.0, eta=1, tau=4).eta_max)

    def test_linear_speedup_rate(self):
        # [2 L f_gap + s2] / sqrt(mK) + (m/K) s2 (tau - 1) with L=2, s2=3, f_gap=5, m=4, K=200, tau=3
        o = theory.linear_speedup_lr(m=4, tau=3, zeta=0.0, **C)
        assert o.eta == pytest.approx(math.sqrt(4 / 200) / 2)
        assert o.rate == pytest.approx((2 * 2 * 5 + 3) / math.sqrt(800) + 4 / 200 * 3 * 2)


class TestRuntime:
    def test_speedup_by_hand(self):
        assert tradeoff.local_sgd_speedup(1, 5.0) == 1.0
        assert tradeoff.local_sgd_speedup(4, 2.0) == pytest.approx(3 / 1.5)
        assert tradeoff.local_sgd_speedup(10**9, 2.0) == pytest.approx(3.0)

    def test_speedup_is_ratio_of_iteration_times(self):
        r, tau = 3.0, 5
        t_sync = tradeoff.iteration_time(1, comm_time=r, step_time=1.0)
        t_local = tradeoff.iteration_time(tau, comm_time=r, step_time=1.0)
        assert t_sync / t_local == pytest.approx(tradeoff.local_sgd_speedup(tau, r))

    def test_random_step_times_max_of_two_exponentials(self):
        # E[max of two Exp(1)] = 1.5 ; tau = 1, D = 0
        t = tradeoff.iteration_time(1, comm_time=0.0, m=2, samples=200_000,
                                  step_time=lambda rng, shape: rng.exponential(1.0, shape))
        assert t == pytest.approx(1.5, abs=0.02)

    def test_stragglers_smooth_out_with_tau(self):
        exp = lambda rng, shape: rng.exponential(1.0, shape)
        t1 = tradeoff.iteration_time(1, comm_time=0.0, m=8, step_time=exp)
        t16 = tradeoff.iteration_time(16, comm_time=0.0, m=8, step_time=exp)
        assert t16 < t1

    def test_optimal_tau_minimises_runtime_bound(self):
        k = dict(L=1.0, sigma2=1.0, f_gap=2.0, eta=0.1, comm_time=3.0)
        tau = tradeoff.optimal_tau(wall_time=100.0, **k)
        # 2 * 2 * 3 / (1e-3 * 1 * 1 * 100) = 120
        assert tau == pytest.approx(math.sqrt(120.0))
        # the runtime bound is minimised over integers next to tau*
        f = lambda t: tradeoff.runtime_bound(m=4, tau=t, wall_time=100.0, step_time=1.0, **k)
        best = min(range(1, 40), key=f)
        assert best in (math.floor(tau), math.ceil(tau))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="comm_ratio"):
            tradeoff.local_sgd_speedup(2, -1.0)
        with pytest.raises(ValueError, match="tau"):
            tradeoff.local_sgd_speedup(0, 1.0)
        with pytest.raises(ValueError, match="sigma2"):
            tradeoff.optimal_tau(L=1, sigma2=0, f_gap=1, eta=0.1, comm_time=1, wall_time=1)


class TestContraction:
    def test_static_symmetric_is_zeta_squared(self):
        w = mixing.metropolis(nx.cycle_graph(6))
        assert theory.contraction(w) == pytest.approx(coopsgd.zeta(w) ** 2)
        assert theory.effective_zeta(w) == pytest.approx(coopsgd.zeta(w))

    def test_cyclic_by_hand(self):
        assert theory.contraction(schedules.cyclic([np.eye(2), mixing.averaging(2)])) == pytest.approx(0.5)
        algo = coopsgd.Algorithm(schedules.cyclic([np.eye(2), mixing.averaging(2)]), tau=1)
        assert theory.contraction(algo) == pytest.approx(0.5)

    def test_matching_contraction_against_sampling(self):
        # ring of 4 = two matchings {01, 23} and {12, 30}; W = I - a (B1 L1 + B2 L2)
        def lap(edges):
            l = np.zeros((4, 4))
            for i, j in edges:
                l[[i, j], [i, j]] += 1
                l[i, j] = l[j, i] = -1
            return l

        laps = [lap([(0, 1), (2, 3)]), lap([(1, 2), (3, 0)])]
        p, a = np.array([0.3, 0.8]), 0.4
        exact = theory.matching_contraction(laps, p, a)
        # enumerate the four outcomes of (B1, B2) exactly
        gram = np.zeros((4, 4))
        for b1 in (0, 1):
            for b2 in (0, 1):
                w = np.eye(4) - a * (b1 * laps[0] + b2 * laps[1])
                prob = (p[0] if b1 else 1 - p[0]) * (p[1] if b2 else 1 - p[1])
                gram += prob * w.T @ w
        assert exact == pytest.approx(np.linalg.norm(gram - np.full((4, 4), 0.25), 2))

    def test_matcha_schedule_agrees(self):
        from coopsgd.algorithms.matcha import MatchaSchedule

        sched = MatchaSchedule(nx.cycle_graph(6), budget=0.5)
        mine = theory.matching_contraction(sched.laplacians, sched.probabilities, sched.alpha)
        assert mine == pytest.approx(theory.contraction(sched))

    def test_bad_probabilities(self):
        with pytest.raises(ValueError, match="probabilities"):
            theory.matching_contraction([np.zeros((2, 2))], [1.5], 0.1)


from hypothesis import given, settings
from hypothesis import strategies as st


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(
        L=st.floats(0.01, 100), m=st.integers(1, 64), v=st.integers(0, 2), tau=st.integers(1, 64),
        zeta=st.floats(0, 0.99),
    )
    def test_eta_max_solves_the_condition_with_equality(self, L, m, v, tau, zeta):
        c = theory.lr_condition(L=L, eta=1.0, m=m, v=v, tau=tau, zeta=zeta)
        at = theory.lr_condition(L=L, eta=c.eta_max, m=m, v=v, tau=tau, zeta=zeta)
        assert at.ok and at.value == pytest.approx(1.0, rel=1e-9)
        assert not theory.lr_condition(L=L, eta=c.eta_max * 1.001, m=m, v=v, tau=tau, zeta=zeta).ok

    @settings(max_examples=200, deadline=None)
    @given(
        L=st.floats(0.01, 10), s2=st.floats(0, 10), gap=st.floats(0, 10), eta=st.floats(1e-4, 1),
        m=st.integers(1, 32), tau=st.integers(1, 32), zeta=st.floats(0, 0.99), K=st.integers(1, 10_000),
    )
    def test_limits_hold_for_any_constants(self, L, s2, gap, eta, m, tau, zeta, K):
        args = dict(L=L, sigma2=s2, f_gap=gap, eta=eta, m=m, K=K, warn=False)
        local = theory.cooperative_bound(tau=tau, zeta=0.0, **args)
        assert local.network == pytest.approx(eta**2 * L**2 * s2 * (tau - 1), rel=1e-12, abs=1e-300)
        dpsgd = theory.cooperative_bound(tau=1, zeta=zeta, **args)
        assert dpsgd.network == pytest.approx(2 * eta**2 * L**2 * s2 * zeta**2 / (1 - zeta**2), rel=1e-9, abs=1e-300)
        b = theory.cooperative_bound(tau=tau, zeta=zeta, **args)
        assert b.total == pytest.approx(b.optimization + b.noise + b.network)
        assert b.network >= local.network - 1e-15  # ζ only adds to the network term
