"""The constants of the bounds against the inequalities of their derivation (docs/theory.md §2–3),
each recomputed here in plain NumPy from the update rule X ← (X − ηG)W_k, never from the code.

Notation: steps t = 1, 2, …; step t mixes iff t ≡ 0 (mod τ); Φ_{s,k} = Π_{t=s}^{k−1} (W_t − J) is
what step s's gradient has become in the consensus error Y_k = X_k (I − J) (docs/theory.md §2.2).
"""

import math

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd.analysis import consensus, koloskova, theory


def _mixings(s, k, tau):
    """c(s, k): the mixings among steps s..k−1."""
    return sum(1 for t in range(s, k) if t % tau == 0)


def brute_coefficient(tau, q, periods):
    """max_s Σ_{k>s} A_k q^{c(s,k)} with A_k = Σ_{s'<k} q^{c(s',k)}, all sums finite (K = periods·τ)."""
    K = periods * tau
    a = {k: sum(q ** _mixings(s, k, tau) for s in range(1, k)) for k in range(1, K + 1)}
    return max(sum(a[k] * q ** _mixings(s, k, tau) for k in range(s + 1, K + 1)) for s in range(1, K))


def phi_blocks(w, tau, K):
    """{(s, k): Φ_{s,k}} for 1 ≤ s < k ≤ K with a static W."""
    n = len(w)
    j = np.full((n, n), 1.0 / n)
    out = {}
    for s in range(1, K):
        prod = np.eye(n) - j
        for k in range(s + 1, K + 1):
            prod = prod @ ((w if (k - 1) % tau == 0 else np.eye(n)) - j)
            out[s, k] = prod.copy()
    return out


def ring(n):
    return np.asarray(coopsgd.dpsgd(nx.cycle_graph(n)).W)


class TestGamma:
    @pytest.mark.parametrize("tau", [1, 2, 3, 5, 8])
    def test_local_sgd_is_the_papers_condition(self, tau):
        # ζ = 0: Γ = τ(τ − 1), i.e. ηL + η²L²τ(τ − 1) ≤ 1 (Wang & Joshi, Theorem 1), and the
        # derivation's coefficient is exactly τ(τ − 1)/2 for any horizon
        assert consensus.gamma(tau, 0.0) == tau * (tau - 1)
        assert brute_coefficient(tau, 0.0, periods=3) == pytest.approx(tau * (tau - 1) / 2)

    @pytest.mark.parametrize("tau, q", [(1, 0.5), (2, 0.6), (3, 0.3), (4, 0.8), (2, 0.9)])
    def test_closed_form_is_the_limit_of_the_finite_sums(self, tau, q):
        periods = int(40 / (1 - q)) // tau + 10
        brute = brute_coefficient(tau, q, periods)
        assert brute <= consensus.gamma(tau, q) / 2 * (1 + 1e-12)  # a valid upper bound for every K
        assert brute >= consensus.gamma(tau, q) / 2 * 0.99  # and the limit: no slack left in this step

    @pytest.mark.parametrize("n, tau", [(5, 1), (5, 3), (6, 2), (4, 4)])
    def test_consensus_inequality_holds_for_the_worst_gradients(self, n, tau):
        # sup over gradients a_s (⊥ 1) of Σ_k ‖Σ_{s<k} a_s Φ_{s,k}‖² / Σ_s ‖a_s‖² is the squared
        # operator norm of the map; the derivation bounds it by Γ/2 (weighted Cauchy–Schwarz)
        w = ring(n)
        zeta = coopsgd.zeta(w)
        K = 8 * tau + 2
        blocks = phi_blocks(w, tau, K)
        basis = np.linalg.svd(np.eye(n) - 1.0 / n)[0][:, : n - 1]  # orthonormal basis of 1⊥
        big = np.zeros(((K - 1) * n, (K - 1) * (n - 1)))
        for (s, k), phi in blocks.items():
            big[(k - 2) * n:(k - 1) * n, (s - 1) * (n - 1):s * (n - 1)] = (basis.T @ phi).T
        worst = np.linalg.norm(big, 2) ** 2
        assert worst <= consensus.gamma(tau, zeta) / 2 * (1 + 1e-9)

    def test_dpsgd_constant_is_tight(self):
        # τ = 1: the map is Toeplitz with symbol Σ_l ζ^l e^{ilω}; its norm² tends to ζ²/(1 − ζ)² = Γ/2
        zeta, K = 0.5, 300
        toeplitz = np.array([[zeta ** (k - s) if k > s else 0.0 for s in range(K)] for k in range(K)])
        assert np.linalg.norm(toeplitz, 2) ** 2 >= 0.98 * consensus.gamma(1, zeta) / 2

    @pytest.mark.parametrize("n, tau, v", [(5, 1, 0), (6, 3, 0), (5, 2, 1)])
    def test_noise_factor_bounds_the_noise_part(self, n, tau, v):
        # (2/(mK)) Σ_k Σ_{s<k} tr(Φ_{s,k}ᵀ P Φ_{s,k}) ≤ N(τ, ζ²), P = diag(1_m, 0_v)
        w = ring(n)
        m = n - v
        p = np.diag([1.0] * m + [0.0] * v)
        K = 12 * tau
        blocks = phi_blocks(w, tau, K)
        total = sum(np.trace(phi.T @ p @ phi) for phi in blocks.values())
        assert 2 * total / (m * K) <= consensus.noise_factor(tau, coopsgd.zeta(w) ** 2) * (1 + 1e-12)

    @pytest.mark.parametrize("tau", [2, 4, 8, 16])
    @pytest.mark.parametrize("zeta", [0.6, 0.8, 0.9])
    def test_the_former_constant_was_too_small(self, tau, zeta):
        # the configurations: Γ_old = τ²/(1 − ζ)² − τ is 0.5–0.8 of what the derivation needs,
        # so η_max was up to √2 too large
        old = tau**2 / (1 - zeta) ** 2 - tau
        new = consensus.gamma(tau, zeta)
        assert 0.5 < old / new < 0.8
        new_max = theory.lr_condition(L=1.0, eta=1.0, tau=tau, zeta=zeta).eta_max
        old_max = 2.0 / (1 + math.sqrt(1 + 4 * old))
        assert 1.1 < old_max / new_max < math.sqrt(2)

    def test_hand_values(self):
        # τ = 2, q = 0.5: 2·1·(1 + 1)/0.5 + 2·4·0.25/0.25 = 8 + 8
        assert consensus.gamma(2, 0.5) == pytest.approx(16.0)
        assert consensus.noise_factor(3, 0.5) == pytest.approx(2 + 2 * 3 * 0.5 / 0.5)
        with pytest.raises(ValueError, match="q"):
            consensus.gamma(2, 1.0)


class TestConsensusRate:
    def test_static_is_one_minus_zeta_squared(self):
        algo = coopsgd.decentralized_periodic(nx.cycle_graph(8), 4)
        r = consensus.consensus_rate(algo)
        assert r.kind == "static" and r.tau == 4 and r.p == pytest.approx(1 - algo.zeta**2)

    def test_local_sgd_averages_exactly(self):
        assert consensus.consensus_rate(coopsgd.local_sgd(5, 3)).p == pytest.approx(1.0)

    def test_matcha_from_the_expected_gram(self):
        algo = coopsgd.matcha(nx.cycle_graph(6), 0.5)
        sched = algo.mixing
        n = 6
        gram = np.zeros((n, n))  # E[WᵀW] by enumerating the activations
        for bits in range(2 ** sched.num_matchings):
            active = np.array([(bits >> j) & 1 for j in range(sched.num_matchings)], bool)
            prob = np.prod(np.where(active, sched.probabilities, 1 - sched.probabilities))
            w = np.eye(n) - sched.alpha * sched.laplacians[active].sum(axis=0)
            gram += prob * w.T @ w
        rho = np.linalg.norm(gram - 1.0 / n, 2)
        r = consensus.consensus_rate(algo)
        assert r.kind == "random" and r.rho == pytest.approx(rho)

    def test_overlap_is_refused(self):
        with pytest.raises(ValueError, match="symmetric"):
            consensus.consensus_rate(coopsgd.overlap_local_sgd(4, 2, 0.5))


C = dict(L=1.0, sigma2=0.0, zeta2=1.0, f_gap=0.0, m=4, K=10)


class TestKoloskova:
    def test_dissimilarity_term_by_hand(self):
        # τ = 2, p = 1: Γ = 2, a = η²L²Γ = 0.02, network = 2aζ̄²/(1 − 2a) = 0.04/0.96
        b = koloskova.koloskova_bound(eta=0.1, tau=2, p=1.0, **C)
        assert b.network == pytest.approx(0.04 / 0.96) and b.dissimilarity == b.network
        assert b.theorem == "koloskova" and b.optimization == 0 and b.noise == 0

    def test_noise_part_and_growth_by_hand(self):
        # p = 0.75 (ρ = 0.25, q = 0.5), τ = 2: Γ = 16, a = 0.01·16 = 0.16, D = 0.68; N = 1 + 4·0.25/0.75 = 7/3
        # B = 0.5: θ = 2aB/D = 0.16/0.68; every term / (1 − θ)
        args = dict(C, sigma2=2.0, zeta2=0.0, f_gap=1.0, growth=0.5)
        b = koloskova.koloskova_bound(eta=0.1, tau=2, p=0.75, **args)
        scale = 1 / (1 - 0.16 / 0.68)
        assert b.network == pytest.approx(scale * 0.01 * 2.0 * (7 / 3) / 0.68)
        assert b.optimization == pytest.approx(scale * 2 * 1.0 / (0.1 * 10))
        assert b.noise == pytest.approx(scale * 0.1 * 2.0 / 4)

    def test_step_size_condition_by_hand(self):
        # v = 0: ηL ≤ 1 and 2a(1 + B) < 1; τ = 2, p = 1, B = 0: Γ = 2 -> η < 1/2
        c = koloskova.koloskova_lr_condition(L=1.0, eta=0.4, m=4, tau=2, p=1.0)
        assert c.ok and c.eta_max == pytest.approx(0.5)
        assert not koloskova.koloskova_lr_condition(L=1.0, eta=0.5, m=4, tau=2, p=1.0).ok
        # τ = 1, p = 1: no consensus error, only ηL ≤ 1
        assert koloskova.koloskova_lr_condition(L=2.0, eta=0.1, tau=1).eta_max == pytest.approx(0.5)

    def test_step_size_with_auxiliary_columns(self):
        # v = 1, m = 4 (EASGD-like): Lη·4/5 + (1/5)·a/(1 − 2a) = 1 at eta_max
        c = koloskova.koloskova_lr_condition(L=1.0, eta=0.01, m=4, tau=3, p=0.5, v=1)
        a = c.eta_max**2 * consensus.gamma(3, math.sqrt(0.5))
        assert 0.8 * c.eta_max + 0.2 * a / (1 - 2 * a) == pytest.approx(1.0, abs=1e-9) or 2 * a == pytest.approx(1.0)

    def test_network_grows_with_tau_and_one_over_p(self):
        f = lambda tau, p: koloskova.koloskova_bound(eta=1e-5, tau=tau, p=p, **C).network
        assert f(1, 1.0) == 0.0
        assert f(2, 1.0) < f(4, 1.0) < f(8, 1.0)
        assert f(2, 0.9) < f(2, 0.5) < f(2, 0.1)
        # the ζ̄² part scales like τ²/p² for small η: doubling τ at small p roughly quadruples it
        assert 3.0 < f(16, 0.05) / f(8, 0.05) < 4.5

    def test_reduces_to_theorem_one_form_without_dissimilarity(self):
        # ζ̄² = 0, B = 0: the same terms as Theorem 1 up to the factor 1/(1 − 2a) on the network term
        args = dict(L=1.0, sigma2=1.0, f_gap=2.0, eta=0.01, m=4, tau=3, K=100)
        k = koloskova.koloskova_bound(zeta2=0.0, p=1 - 0.5**2, **args)
        t = theory.cooperative_bound(zeta=0.5, **args)
        a = 0.01**2 * consensus.gamma(3, 0.5)
        assert k.optimization == pytest.approx(t.optimization) and k.noise == pytest.approx(t.noise)
        assert k.network == pytest.approx(t.network / (1 - 2 * a))

    def test_outside_the_condition_warns_and_is_infinite(self):
        with pytest.warns(theory.StepSizeWarning):
            b = koloskova.koloskova_bound(eta=0.6, tau=2, p=1.0, **C)
        assert b.total == math.inf

    @pytest.mark.parametrize("bad, match", [(dict(p=0.0), "p must"), (dict(p=1.5), "p must"),
                                            (dict(growth=-1.0), "growth"), (dict(zeta2=-1.0), "zeta2")])
    def test_bad_input(self, bad, match):
        args = dict(eta=0.1, tau=2, p=1.0, **C)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            koloskova.koloskova_bound(**args)
