"""The classic forms of D-PSGD (Lian et al. 2017, Algorithm 1) and synchronous EASGD (Zhang,
Choromanska & LeCun 2015, eqs. 5–6), each against its paper's rule written out in NumPy here."""
import networkx as nx
import numpy as np
import pytest
from conftest import INIT, LR, grad_np, make_batches, run_engine

import coopsgd


def _grads(w, b, batches, t):
    gw, gb = zip(*(grad_np(w[i], b[i], batches["x"][t, i].astype(np.float64),
                           batches["y"][t, i].astype(np.float64)) for i in range(len(b))))
    return np.array(gw), np.array(gb)


def metropolis_np(graph):
    """W_ij = 1/(1 + max(deg i, deg j)) on edges, the rest on the diagonal."""
    nodes = sorted(graph.nodes)
    W = np.zeros((len(nodes), len(nodes)))
    for u, v in graph.edges:
        i, j = nodes.index(u), nodes.index(v)
        W[i, j] = W[j, i] = 1.0 / (1 + max(graph.degree[u], graph.degree[v]))
    return W + np.diag(1.0 - W.sum(1))


def lian_np(W, batches, steps):
    """x_i ← Σ_j W_ij x_j − η g_i(x_i)."""
    m = W.shape[0]
    w, b = np.tile(INIT["w"].astype(np.float64), (m, 1)), np.full(m, float(INIT["b"]))
    for t in range(steps):
        gw, gb = _grads(w, b, batches, t)
        w, b = W @ w - LR * gw, W @ b - LR * gb
    return w, b


def zhang_np(m, tau, alpha, batches, steps):
    """Every τ-th step: x_i ← x_i − η g_i(x_i) − α(x_i − z), z ← z + α Σ_i (x_i − z); other steps
    plain SGD."""
    w, b = np.tile(INIT["w"].astype(np.float64), (m, 1)), np.full(m, float(INIT["b"]))
    zw, zb = INIT["w"].astype(np.float64).copy(), float(INIT["b"])
    for t in range(steps):
        gw, gb = _grads(w, b, batches, t)
        if (t + 1) % tau == 0:
            ew, eb = alpha * (w - zw), alpha * (b - zb)
            zw, zb = zw + ew.sum(0), zb + eb.sum()
            w, b = w - LR * gw - ew, b - LR * gb - eb
        else:
            w, b = w - LR * gw, b - LR * gb
    return w, b, zw, zb


@pytest.mark.parametrize("graph", [nx.cycle_graph(6), nx.petersen_graph()], ids=["ring6", "petersen"])
def test_dpsgd_lian_is_lians_rule(graph):
    algo = coopsgd.dpsgd(graph, form="lian")
    steps = 7
    batches = make_batches(steps, algo.m, seed=3)
    _, _, metrics, w, b = run_engine(algo, batches, steps)
    ref_w, ref_b = lian_np(metropolis_np(graph), batches, steps)
    np.testing.assert_allclose(w, ref_w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(b, ref_b, rtol=2e-5, atol=2e-6)
    assert metrics.communicated.all()


def test_the_two_dpsgd_forms_differ_by_eta_times_g_minus_wg():
    algo_c, algo_l = coopsgd.dpsgd(nx.cycle_graph(5)), coopsgd.dpsgd(nx.cycle_graph(5), form="lian")
    batches = make_batches(1, 5, seed=9)
    *_, wc, bc = run_engine(algo_c, batches, 1)
    *_, wl, bl = run_engine(algo_l, batches, 1)
    W = metropolis_np(nx.cycle_graph(5))
    x0 = np.tile(INIT["w"].astype(np.float64), (5, 1))
    gw, _ = _grads(x0, np.full(5, float(INIT["b"])), batches, 0)
    np.testing.assert_allclose(wl - wc, LR * (W @ gw - gw), rtol=1e-4, atol=1e-6)  # (W(x−ηg)) − (Wx − ηg)
    assert np.abs(wl - wc).max() > 1e-3


@pytest.mark.parametrize("tau", [1, 3])
def test_easgd_zhang_is_the_synchronous_rule(tau):
    m, alpha, steps = 4, 0.15, 7
    algo = coopsgd.easgd(m, tau, alpha, form="zhang")
    batches = make_batches(steps, m, seed=5)
    _, _, _, w, b = run_engine(algo, batches, steps)
    ref_w, ref_b, zw, zb = zhang_np(m, tau, alpha, batches, steps)
    np.testing.assert_allclose(w[:m], ref_w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(b[:m], ref_b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(w[m], zw, rtol=2e-5, atol=2e-6)  # the anchor is column m + 1
    np.testing.assert_allclose(b[m], zb, rtol=2e-5, atol=2e-6)


def test_unknown_form_is_refused_naming_it():
    with pytest.raises(ValueError, match="unknown form 'zhang'; valid D-PSGD forms: cooperative, lian"):
        coopsgd.dpsgd(nx.cycle_graph(4), form="zhang")
    with pytest.raises(ValueError, match="unknown form 'lian'; valid EASGD forms"):
        coopsgd.easgd(4, 2, form="lian")
