"""Each algorithm's W against its own published update rule, written out by hand here.

Models are the columns of X (d × n), and one mixing is X ← X W (Wang & Joshi, Cooperative SGD).
"""

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules

RNG = np.random.default_rng(0)


def columns(d, n):
    return RNG.normal(size=(d, n))


class TestEASGD:
    @pytest.mark.parametrize("m,alpha", [(4, 0.1), (8, 0.2), (3, 2 / 5)])
    def test_elastic_equations(self, m, alpha):
        # Zhang et al. 2015, eqs. (5)-(6) with alpha = eta * rho:
        #   x_i <- x_i - alpha (x_i - z);   z <- z + alpha * sum_i (x_i - z)
        x = columns(5, m + 1)
        workers, anchor = x[:, :m], x[:, m]
        new_workers = workers - alpha * (workers - anchor[:, None])
        new_anchor = anchor + alpha * (workers - anchor[:, None]).sum(axis=1)
        algo = coopsgd.easgd(m, alpha=alpha)
        out = x @ algo.W
        np.testing.assert_allclose(out[:, :m], new_workers, atol=1e-12)
        np.testing.assert_allclose(out[:, m], new_anchor, atol=1e-12)
        assert (algo.m, algo.v, algo.n, algo.tau) == (m, 1, m + 1, 1)

    @pytest.mark.parametrize("m", [2, 4, 8, 16])
    def test_zeta_of_alpha_and_optimum(self, m):
        alphas = np.linspace(0.001, 2 / (m + 1) - 0.001, 400)
        zetas = [coopsgd.easgd(m, alpha=a).zeta for a in alphas]
        np.testing.assert_allclose(zetas, [max(abs(1 - a), abs(1 - (m + 1) * a)) for a in alphas], atol=1e-10)
        default = coopsgd.easgd(m)
        assert default.W[0, m] == pytest.approx(2 / (m + 2))  # alpha* = 2/(m+2)
        assert default.zeta == pytest.approx(m / (m + 2))
        assert default.zeta <= min(zetas) + 1e-12

    @pytest.mark.parametrize("alpha", [0.0, -0.1, 2 / 9, 0.5])
    def test_alpha_outside_range(self, alpha):
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 2/\(m\+1\)\)"):
            coopsgd.easgd(8, alpha=alpha)

    def test_local_steps(self):
        algo = coopsgd.easgd(4, tau=3)
        assert [algo.communicates(k) for k in range(6)] == [False, False, True, False, False, True]


class TestOverlapLocalSGD:
    @pytest.mark.parametrize("m,alpha", [(4, 0.6), (16, 0.5), (3, 0.0)])
    def test_pull_back_then_anchor_average(self, m, alpha):
        # Wang, Liang & Joshi 2020, Algorithm 1: x_i <- (1 - a) x_i + a z, then z <- mean_i x_i
        x = columns(6, m + 1)
        anchor = x[:, m]
        pulled = (1 - alpha) * x[:, :m] + alpha * anchor[:, None]
        new_anchor = pulled.mean(axis=1)
        out = x @ coopsgd.overlap_local_sgd(m, 2, alpha).W
        np.testing.assert_allclose(out[:, :m], pulled, atol=1e-12)
        np.testing.assert_allclose(out[:, m], new_anchor, atol=1e-12)

    def test_not_symmetric_and_its_zeta(self):
        algo = coopsgd.overlap_local_sgd(8, 2, 0.6)
        assert not algo.symmetric
        assert algo.zeta == pytest.approx(0.4)

    @pytest.mark.parametrize("alpha", [1.0, -0.01, 1.5])
    def test_alpha_outside_range(self, alpha):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
            coopsgd.overlap_local_sgd(4, 2, alpha)


class TestDPSGD:
    def test_ring_neighbour_average(self):
        # Lian et al. 2017 with weights 1/3: x_i <- (x_{i-1} + x_i + x_{i+1}) / 3
        n = 7
        x = columns(4, n)
        expected = np.stack([(x[:, i - 1] + x[:, i] + x[:, (i + 1) % n]) / 3 for i in range(n)], axis=1)
        np.testing.assert_allclose(x @ coopsgd.dpsgd(nx.cycle_graph(n)).W, expected, atol=1e-12)

    def test_from_matrix_and_weights(self):
        w = mixing.max_degree(nx.cycle_graph(6))
        np.testing.assert_array_equal(coopsgd.dpsgd(w).W, w)
        np.testing.assert_array_equal(coopsgd.dpsgd(nx.cycle_graph(6), weights="max_degree").W, w)

    def test_disconnected_graph_names_components(self):
        graph = nx.disjoint_union(nx.cycle_graph(4), nx.cycle_graph(3))
        with pytest.raises(ValueError, match=r"D-PSGD needs a connected graph.*sizes \[4, 3\]"):
            coopsgd.dpsgd(graph)
        with pytest.raises(ValueError, match=r"sizes \[4, 3\]"):
            coopsgd.dpsgd(mixing.metropolis(graph))

    def test_non_symmetric_matrix(self):
        with pytest.raises(ValueError, match="symmetric"):
            coopsgd.dpsgd(np.array([[0.5, 1.0], [0.5, 0.0]]))

    def test_zeta_one_rejected(self):
        w = 0.5 * nx.to_numpy_array(nx.cycle_graph(4))
        with pytest.raises(ValueError, match="zeta < 1.*lazy"):
            coopsgd.dpsgd(w)

    def test_periodic_decentralized(self):
        algo = coopsgd.decentralized_periodic(nx.cycle_graph(5), tau=3)
        ring = coopsgd.dpsgd(nx.cycle_graph(5))
        for k in range(9):
            expected = ring.W if k % 3 == 2 else np.eye(5)
            np.testing.assert_array_equal(algo.mixing_at(k), expected)
        assert algo.zeta == pytest.approx(ring.zeta)


class TestAveraging:
    def test_fully_sync_mixes_every_step(self):
        algo = coopsgd.fully_sync(4)
        for k in range(5):
            np.testing.assert_allclose(algo.mixing_at(k), np.full((4, 4), 0.25))
        assert algo.zeta == 0.0

    def test_local_sgd_period_boundaries(self):
        algo = coopsgd.local_sgd(8, tau=4)
        mixes = [k for k in range(12) if algo.communicates(k)]
        assert mixes == [3, 7, 11]
        np.testing.assert_array_equal(algo.mixing_at(2), np.eye(8))
        np.testing.assert_allclose(algo.mixing_at(3), np.full((8, 8), 1 / 8))
        np.testing.assert_array_equal(algo.mixing_at(4), np.eye(8))

    def test_after_sync_all_equal_the_average(self):
        x = columns(3, 6)
        out = x @ coopsgd.local_sgd(6, 2).mixing_at(1)
        np.testing.assert_allclose(out, np.repeat(x.mean(axis=1, keepdims=True), 6, axis=1))


class TestAlgorithmValue:
    def test_repr_shows_triple_and_zeta(self):
        text = repr(coopsgd.easgd(8))
        assert "tau=1" in text and "v=1" in text and "9x9" in text and "zeta=0.8" in text

    def test_immutable(self):
        algo = coopsgd.local_sgd(4, 2)
        with pytest.raises(AttributeError, match="immutable"):
            algo.v = 3
        with pytest.raises(ValueError):
            algo.W[0, 0] = 2.0  # read-only array

    @pytest.mark.parametrize("tau", [0, -1, 2.5, "3", None])
    def test_bad_tau(self, tau):
        with pytest.raises(ValueError, match="integer >= 1"):
            coopsgd.local_sgd(4, tau)

    def test_bad_v(self):
        with pytest.raises(ValueError, match="v must be an integer >= 0"):
            coopsgd.Algorithm(np.eye(3), v=-1)
        with pytest.raises(ValueError, match="no workers"):
            coopsgd.Algorithm(np.eye(3), v=3)

    def test_size_not_m_plus_v(self):
        with pytest.raises(ValueError, match=r"W is 5 x 5 but m \+ v = 4 \+ 2 = 6"):
            coopsgd.Algorithm(np.eye(5), v=2, m=4)

    def test_bad_matrices(self):
        with pytest.raises(ValueError, match="square"):
            coopsgd.Algorithm(np.ones((2, 3)))
        with pytest.raises(ValueError, match="finite"):
            coopsgd.Algorithm(np.full((2, 2), np.inf))
        with pytest.raises(ValueError, match="sum to 1"):
            coopsgd.Algorithm(np.ones((2, 2)))

    def test_time_varying_w(self):
        w0 = mixing.metropolis(nx.cycle_graph(4))
        w1 = mixing.averaging(4)
        algo = coopsgd.Algorithm(schedules.cyclic([w0, w1]), tau=2)
        np.testing.assert_array_equal(algo.mixing_at(1), w0)
        np.testing.assert_array_equal(algo.mixing_at(3), w1)
        np.testing.assert_array_equal(algo.mixing_at(5), w0)
        np.testing.assert_array_equal(algo.mixing_at(4), np.eye(4))
        assert not algo.is_static and algo.symmetric

    def test_everything_importable_from_the_package(self):
        for name in ["Algorithm", "fully_sync", "local_sgd", "easgd", "dpsgd",
                     "decentralized_periodic", "overlap_local_sgd"]:
            assert hasattr(coopsgd, name)
