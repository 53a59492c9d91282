"""Mixings beyond linear gossip, each against its paper's rule written out in NumPy here:
compressors and CHOCO-SGD (Koloskova, Stich & Jaggi 2019, Algorithm 1), push-sum / SGP (Assran et
al. 2019, Algorithm 1), gradient tracking (DSGT, Pu & Nedić 2021, eqs. 3–4), DiLoCo (Douillard et al.
2023, Algorithm 1) with AdamW inside and Nesterov outside, Streaming DiLoCo's fragments (Douillard
et al. 2025); and the bad inputs each refuses."""
import math

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest

import coopsgd
from coopsgd import compression

from conftest import INIT, LR, grad_np, loss_fn, make_batches, run_engine
from test_forms import metropolis_np


def _grads(w, b, batches, t):
    gw, gb = zip(*(grad_np(w[i], b[i], batches["x"][t, i].astype(np.float64),
                           batches["y"][t, i].astype(np.float64)) for i in range(len(b))))
    return np.array(gw), np.array(gb)


def _start(m):
    return np.tile(INIT["w"].astype(np.float64), (m, 1)), np.full(m, float(INIT["b"]))


def _close(got_w, got_b, ref_w, ref_b, tol=2e-5):
    np.testing.assert_allclose(got_w, ref_w, rtol=tol, atol=tol / 10)
    np.testing.assert_allclose(got_b, ref_b, rtol=tol, atol=tol / 10)


# ---------------------------------------------------------------------------- compressors
def _encode(compressor, x, seed=0):
    return compressor.encode(jnp.asarray(x, jnp.float32), jax.random.key(seed))


def _q(compressor, x, seed=0):
    return np.asarray(compressor.decode(_encode(compressor, x, seed), len(x)))


@pytest.mark.parametrize("fraction, d", [(0.05, 103), (0.01, 1000), (0.3, 3), (1.0, 7), (0.5, 1)])
def test_top_k_keeps_the_ceil_fraction_largest_entries(fraction, d):
    x = np.random.default_rng(d).normal(size=d)
    k = max(1, math.ceil(fraction * d - 1e-9))
    expected = np.zeros(d)
    largest = np.argsort(-np.abs(x))[:k]
    expected[largest] = x[largest]
    np.testing.assert_allclose(_q(compression.top_k(fraction), x), expected, rtol=1e-6)
    assert compression.payload_bytes(compression.top_k(fraction), np.zeros(d, np.float32)) == 8 * k  # value + int32 index


def test_random_k_keeps_k_true_entries_and_redraws_with_the_key():
    x = np.random.default_rng(1).normal(size=50) + 5.0  # no zeros
    first, second = _q(compression.random_k(0.1), x, 0), _q(compression.random_k(0.1), x, 1)
    for q in (first, second):
        kept = np.flatnonzero(q)
        assert len(kept) == 5
        np.testing.assert_allclose(q[kept], x[kept], rtol=1e-6)
    assert set(np.flatnonzero(first)) != set(np.flatnonzero(second))


def test_qsgd_is_unbiased_before_its_scaling_and_a_contraction_after():
    s, d = 4, 64
    x = np.random.default_rng(2).normal(size=d)
    tau = 1 + min(d / s**2, math.sqrt(d) / s)
    qs = np.array([_q(compression.qsgd(s), x, seed) for seed in range(4000)])
    levels = qs * tau * s / np.linalg.norm(x)  # back to the integer levels
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(levels).max() <= s + 1e-3
    # E[Q(x)] τ = x (QSGD, Alistarh et al. 2017, Lemma 3.1), to Monte-Carlo accuracy
    np.testing.assert_allclose(qs.mean(0) * tau, x, atol=4 * np.linalg.norm(x) / s / math.sqrt(4000))
    # E‖Q(x) − x‖² ≤ (1 − 1/τ)‖x‖² (Koloskova et al. 2019, §3)
    assert np.mean(np.sum((qs - x) ** 2, axis=1)) <= (1 - 1 / tau) * np.sum(x**2) * 1.02
    assert compression.payload_bytes(compression.qsgd(s), np.zeros(d, np.float32)) == 4 + d  # norm + int8 levels


def test_scaled_sign_and_its_packed_bytes():
    x = np.array([0.5, -2.0, 0.0, 1.5, -0.25, 3.0, -1.0, 0.75, 2.0])
    np.testing.assert_allclose(_q(compression.sign(), x), np.mean(np.abs(x)) * np.where(x >= 0, 1, -1), rtol=1e-6)
    assert compression.payload_bytes(compression.sign(), np.zeros(9, np.float32)) == 4 + 2  # scale + ⌈9/8⌉


def test_payload_bytes_compress_every_leaf_on_its_own():
    params = {"w": np.zeros((10, 100), np.float32), "b": np.zeros(10, np.float32)}
    assert compression.payload_bytes(compression.top_k(0.01), params) == 8 * 10 + 8 * 1
    assert compression.payload_bytes(compression.identity(), params) == 4 * 1010


@pytest.mark.parametrize("text, name", [("top_k:0.01", "top_k(0.01)"), ("random_k:0.1", "random_k(0.1)"),
                                        ("qsgd:16", "qsgd(16)"), ("sign", "sign"), ("identity", "identity")])
def test_compressors_by_name(text, name):
    assert compression.by_name(text).name == name


@pytest.mark.parametrize("make, bad", [(compression.top_k, 0.0), (compression.top_k, 1.5),
                                       (compression.random_k, -0.1), (compression.top_k, float("nan"))])
def test_a_fraction_outside_zero_one_is_refused(make, bad):
    with pytest.raises(ValueError, match=r"fraction .*\(0, 1\]"):
        make(bad)


def test_bad_compressor_names_and_levels():
    with pytest.raises(ValueError, match="unknown compressor 'topk:0.1'; valid: identity, top_k"):
        compression.by_name("topk:0.1")
    with pytest.raises(ValueError, match="levels"):
        compression.qsgd(200)


# ---------------------------------------------------------------------------- CHOCO-SGD
def top_k_rows_np(d, k):
    out = np.zeros_like(d)
    for i, row in enumerate(d):
        keep = np.argsort(-np.abs(row))[:k]
        out[i, keep] = row[keep]
    return out


def choco_np(W, gamma, k_w, batches, steps):
    """x^{t+½} = x − ηg;  q = Q(x^{t+½} − x̂);  x̂ ← x̂ + q;  x ← x^{t+½} + γ(W x̂ − x̂) (per leaf)."""
    w, b = _start(W.shape[0])
    hat_w, hat_b = np.zeros_like(w), np.zeros_like(b)
    for t in range(steps):
        gw, gb = _grads(w, b, batches, t)
        w, b = w - LR * gw, b - LR * gb
        hat_w = hat_w + top_k_rows_np(w - hat_w, k_w)
        hat_b = hat_b + (b - hat_b)  # a one-entry leaf keeps its entry
        w, b = w + gamma * (W @ hat_w - hat_w), b + gamma * (W @ hat_b - hat_b)
    return w, b


@pytest.mark.parametrize("graph", [nx.cycle_graph(6), nx.star_graph(4)], ids=["ring6", "star5"])
def test_choco_sgd_is_algorithm_1(graph):
    gamma, steps = 0.4, 8
    algo = coopsgd.choco_sgd(graph, gamma, compression.top_k(0.3))  # keeps 1 of the 3 weights
    batches = make_batches(steps, algo.m, seed=7)
    _, _, metrics, w, b = run_engine(algo, batches, steps)
    _close(w, b, *choco_np(metropolis_np(graph), gamma, 1, batches, steps))
    assert metrics.communicated.all()


def test_choco_top_k_selects_with_xlas_top_k_kernel():
    """The neighbour shifts of the payload stay outside top-k: folded into its sort, they stop
    XLA:CPU from selecting with its TopK kernel, and it sorts every row whole instead."""
    m = 8
    algo = coopsgd.choco_sgd(nx.cycle_graph(m), 0.5, compression.top_k(0.01))
    mixer = algo.mixer(algo, False)
    columns = {"w": jnp.ones((m, 2048)), "b": jnp.ones((m, 320))}
    state, round0 = mixer.init(columns), mixer.plan(0)

    def mix(cols, st, args):
        return mixer.apply(cols, st, coopsgd.MixRound(round0.static, args, jnp.asarray(True), jnp.asarray(1)),
                           coopsgd.WorkerAxis(m))

    compiled = jax.jit(mix).lower(columns, state, round0.args).compile().as_text()
    assert compiled.count('custom_call_target="TopK"') == 2 and " sort(" not in compiled


def test_choco_with_identity_and_gamma_one_is_dpsgd():
    graph, steps = nx.petersen_graph(), 6
    batches = make_batches(steps, 10, seed=8)
    *_, wc, bc = run_engine(coopsgd.choco_sgd(graph, 1.0, compression.identity()), batches, steps)
    *_, wd, bd = run_engine(coopsgd.dpsgd(graph), batches, steps)
    _close(wc, bc, wd, bd, tol=1e-5)


def test_choco_bytes_are_the_payloads():
    params = {"w": np.zeros(1000, np.float32), "b": np.zeros(10, np.float32)}
    model_bytes = 4 * 1010

    def loss(p, batch):
        return jnp.sum(p["w"]) + jnp.sum(p["b"])

    trainer = coopsgd.CooperativeSGD(coopsgd.choco_sgd(nx.cycle_graph(8), 0.5, compression.top_k(0.01)),
                                     optax.sgd(0.1), loss)
    with pytest.raises(ValueError, match="call trainer.init"):
        trainer.communication(model_bytes)
    trainer.init(params)
    sent = trainer.communication(model_bytes)
    assert sent.bytes_per_worker == pytest.approx(2 * (8 * 10 + 8 * 1))  # two neighbours, values + indices
    dpsgd = coopsgd.CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(8)), optax.sgd(0.1), loss)
    assert dpsgd.communication(model_bytes).bytes_per_worker / sent.bytes_per_worker == pytest.approx(4040 / 88)


@pytest.mark.parametrize("gamma", [0.0, 1.2, -0.5])
def test_choco_gamma_outside_zero_one_is_refused(gamma):
    with pytest.raises(ValueError, match=rf"gamma .*\(0, 1\].*{gamma:g}"):
        coopsgd.choco_sgd(nx.cycle_graph(4), gamma)


def test_choco_needs_a_compressor():
    with pytest.raises(ValueError, match="compressor must be a coopsgd.compression.Compressor"):
        coopsgd.choco_sgd(nx.cycle_graph(4), 0.5, "top_k:0.1")


# ---------------------------------------------------------------------------- push-sum
IRREGULAR = nx.DiGraph([(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (0, 3), (2, 0)])


def push_np(digraph):
    """P[i, j] = 1/(1 + outdeg j) for i = j and for every arc j → i."""
    n = digraph.number_of_nodes()
    P = np.zeros((n, n))
    for j in range(n):
        share = 1.0 / (1 + digraph.out_degree(j))
        P[j, j] = share
        for i in digraph.successors(j):
            P[i, j] = share
    return P


def sgp_np(Ps, batches, steps):
    """x ← P(x − η ∇f(z)),  w ← P w,  z = x / w, with P cycled (Assran et al. 2019, Algorithm 1)."""
    m = Ps[0].shape[0]
    xw, xb = _start(m)
    weight = np.ones(m)
    for t in range(steps):
        zw, zb = xw / weight[:, None], xb / weight
        gw, gb = _grads(zw, zb, batches, t)
        P = Ps[t % len(Ps)]
        xw, xb, weight = P @ (xw - LR * gw), P @ (xb - LR * gb), P @ weight
    return xw / weight[:, None], xb / weight, weight


def test_push_sum_is_stochastic_gradient_push_on_an_irregular_digraph():
    steps = 9
    algo = coopsgd.push_sum(IRREGULAR)
    batches = make_batches(steps, algo.m, seed=11)
    trainer, state, metrics, _, _ = run_engine(algo, batches, steps)
    ref_w, ref_b, weight = sgp_np([push_np(IRREGULAR)], batches, steps)
    workers = trainer.workers(state)  # the de-biased z = x / w
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b)
    np.testing.assert_allclose(np.asarray(trainer.backend.workers(state.mix_state.per_worker)["weight"]), weight,
                               rtol=1e-5)
    assert np.ptp(weight) > 0.1  # the weights are far from 1: de-biasing matters here


def test_one_peer_directed_exponential_sends_to_one_peer_and_is_sgp():
    graphs = coopsgd.topology.one_peer_exponential_digraphs(8)
    assert [sorted(g.successors(0)) for g in graphs] == [[1], [2], [4]]
    assert all(d == 1 for g in graphs for _, d in g.out_degree)
    steps = 7
    algo = coopsgd.push_sum(graphs)
    batches = make_batches(steps, 8, seed=12)
    trainer, state, *_ = run_engine(algo, batches, steps)
    ref_w, ref_b, _ = sgp_np([push_np(g) for g in graphs], batches, steps)
    workers = trainer.workers(state)
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b)
    sent = trainer.communication(16.0)
    assert sent.messages == 1 and sent.bytes_per_worker == pytest.approx(16.0 + 4.0)  # numerator and weight


def test_push_sum_reaches_the_true_average_where_plain_gossip_is_skewed():
    """With no gradient, z_i → (1/m) Σ_j x_j(0) on a directed graph whose P is not doubly stochastic
    (Kempe et al. 2003); P alone drifts to P's Perron vector instead."""
    algo = coopsgd.push_sum(IRREGULAR)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.0), loss_fn)
    start = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
    state = trainer.with_columns(trainer.init(INIT), {"w": start, "b": np.arange(5, dtype=np.float32)})
    state, _ = trainer.run(state, make_batches(80, 5, seed=1), 80)
    np.testing.assert_allclose(np.asarray(trainer.workers(state)["w"]), np.tile(start.mean(0), (5, 1)), atol=1e-5)
    skewed = np.linalg.matrix_power(push_np(IRREGULAR), 80) @ start
    assert np.abs(skewed - start.mean(0)).max() > 0.05


def test_push_sum_refuses_a_digraph_that_is_not_strongly_connected():
    with pytest.raises(ValueError, match=r"strongly connected.*2 strongly connected components: \[0, 1, 2\]; \[3\]"):
        coopsgd.push_sum(nx.DiGraph([(0, 1), (1, 2), (2, 0), (2, 3)]))


def test_push_sum_refuses_a_p_that_is_not_column_stochastic():
    P = push_np(IRREGULAR)
    P[0, 1] += 0.25
    with pytest.raises(ValueError, match="column-stochastic.*column 1 sums to 1.25"):
        coopsgd.push_sum(P)
    with pytest.raises(ValueError, match="needs a networkx.DiGraph"):
        coopsgd.push_sum(nx.cycle_graph(4))


# ---------------------------------------------------------------------------- gradient tracking
def dsgt_np(W, tau, batches, steps, momentum=0.0):
    """x^{k+1} = W_k(x^k − η d^k), y^{k+1} = W_k y^k + g(x^{k+1}) − g(x^k), y⁰ = g(x⁰), with
    W_k = W every τ-th step and I otherwise; d = y (SGD) or the heavy-ball buffer of y."""
    m = W.shape[0]
    w, b = _start(m)
    gw, gb = _grads(w, b, batches, 0)
    yw, yb = gw, gb
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    for t in range(steps):
        mw, mb = momentum * mw + yw, momentum * mb + yb
        Wk = W if (t + 1) % tau == 0 else np.eye(m)
        w, b = Wk @ (w - LR * mw), Wk @ (b - LR * mb)
        if t + 1 < steps:
            nw, nb = _grads(w, b, batches, t + 1)
            yw, yb = Wk @ yw + nw - gw, Wk @ yb + nb - gb
            gw, gb = nw, nb
    return w, b


@pytest.mark.parametrize("tau, momentum", [(1, 0.0), (2, 0.0), (1, 0.5)])
def test_gradient_tracking_is_dsgt(tau, momentum):
    graph, steps = nx.cycle_graph(5), 8
    algo = coopsgd.gradient_tracking(graph, tau=tau)
    batches = make_batches(steps, 5, seed=13)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR, momentum=momentum or None), loss_fn)
    state, _ = trainer.run(trainer.init(INIT), batches, steps)
    workers = trainer.workers(state)
    ref_w, ref_b = dsgt_np(metropolis_np(graph), tau, batches, steps, momentum)
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b)
    assert trainer.communication(16.0).bytes_per_worker == pytest.approx(2 * 2 * 16.0)  # x and y, two neighbours


def test_gradient_tracking_differs_from_dpsgd():
    batches = make_batches(4, 5, seed=14)
    *_, wt, _ = run_engine(coopsgd.gradient_tracking(nx.cycle_graph(5)), batches, 4)
    *_, wd, _ = run_engine(coopsgd.dpsgd(nx.cycle_graph(5), form="lian"), batches, 4)
    assert np.abs(wt - wd).max() > 1e-3


# ---------------------------------------------------------------------------- DiLoCo
def adamw_np(lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """optax.adamw's rule: bias-corrected Adam plus decoupled weight decay, lr(t) a function."""
    def update(p, g, s):
        mu, nu, t = s
        mu, nu, t = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g**2, t + 1
        step = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps) + wd * p
        return p - lr(t - 1) * step, (mu, nu, t)
    return update


def diloco_np(m, tau, steps, batches, inner, outer):
    """Inner: each worker's own optimizer state, kept across rounds. Every τ steps: Δ = θ − mean_i θ_i,
    θ ← outer(θ, Δ), θ_i ← θ (Douillard et al. 2023, Algorithm 1)."""
    w, b = _start(m)
    theta = np.concatenate([INIT["w"].astype(np.float64), [float(INIT["b"])]])
    xs = np.concatenate([w, b[:, None]], axis=1)
    states = [(np.zeros(4), np.zeros(4), 0) for _ in range(m)]
    outer_state = None
    for t in range(steps):
        gw, gb = _grads(xs[:, :3], xs[:, 3], batches, t)
        g = np.concatenate([gw, gb[:, None]], axis=1)
        for i in range(m):
            xs[i], states[i] = inner(xs[i], g[i], states[i])
        if (t + 1) % tau == 0:
            theta, outer_state = outer(theta, theta - xs.mean(0), outer_state)
            xs[:] = theta
    return xs[:, :3], xs[:, 3]


def nesterov_np(lr, beta):
    """optax.sgd(lr, momentum=β, nesterov=True): u = β u + Δ, θ ← θ − lr(c)(Δ + β u)."""
    def outer(theta, delta, state):
        u, c = state if state is not None else (np.zeros_like(theta), 0)
        u = beta * u + delta
        return theta - lr(c) * (delta + beta * u), (u, c + 1)
    return outer


def test_diloco_is_algorithm_1_with_adamw_inside_and_nesterov_outside():
    m, tau, steps = 3, 3, 9
    algo = coopsgd.diloco(m, tau)  # the paper's outer Nesterov, lr 0.7, momentum 0.9
    batches = make_batches(steps, m, seed=15)
    trainer = coopsgd.CooperativeSGD(algo, optax.adamw(0.05, weight_decay=0.1), loss_fn)
    state, metrics = trainer.run(trainer.init(INIT), batches, steps)
    workers = trainer.workers(state)
    ref_w, ref_b = diloco_np(m, tau, steps, batches, adamw_np(lambda t: 0.05, 0.1), nesterov_np(lambda c: 0.7, 0.9))
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b, tol=5e-5)
    assert np.asarray(metrics.communicated).tolist() == [False, False, True] * 3


def test_diloco_takes_a_schedule_on_either_side():
    m, tau, steps = 3, 2, 8
    inner_lr = optax.exponential_decay(0.1, 1, 0.9)  # by the inner step
    outer_lr = optax.linear_schedule(1.0, 0.4, 3)  # by the synchronisation
    algo = coopsgd.diloco(m, tau, optax.sgd(outer_lr, momentum=0.5, nesterov=True))
    batches = make_batches(steps, m, seed=16)
    trainer = coopsgd.CooperativeSGD(algo, optax.adamw(inner_lr, weight_decay=0.0), loss_fn)
    state, _ = trainer.run(trainer.init(INIT), batches, steps)
    workers = trainer.workers(state)
    ref_w, ref_b = diloco_np(m, tau, steps, batches, adamw_np(lambda t: 0.1 * 0.9**t, 0.0),
                             nesterov_np(lambda c: 1.0 - 0.2 * min(c, 3), 0.5))
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b, tol=5e-5)


def test_diloco_with_outer_sgd_of_one_is_local_sgd():
    batches = make_batches(8, 4, seed=17)
    *_, wd, bd = run_engine(coopsgd.diloco(4, 4, optax.sgd(1.0)), batches, 8)
    *_, wl, bl = run_engine(coopsgd.local_sgd(4, 4), batches, 8)
    _close(wd, bd, wl[:4], bl[:4], tol=1e-5)


def test_global_momentum_with_a_schedule_equals_its_matrix_form_at_a_constant():
    batches = make_batches(8, 4, seed=18)
    *_, w_matrix, _ = run_engine(coopsgd.algorithms.outer.local_sgd_global_momentum(4, 2, 0.8, 0.5), batches, 8)
    *_, w_mixer, _ = run_engine(coopsgd.algorithms.outer.local_sgd_global_momentum(4, 2, lambda c: 0.8, 0.5),
                                batches, 8)
    np.testing.assert_allclose(w_mixer, w_matrix[:4], rtol=1e-5, atol=1e-6)


def streaming_np(m, H, P, alpha, steps, batches, delay=0):
    """Fragment p of the flat parameters (contiguous, equal sizes, in the pytree's leaf order: b
    then w) is synchronised at steps t ≡ (p + 1)H/P (mod H) by its own outer Nesterov step; workers
    take α·local + (1 − α)·global, ``delay`` steps after the synchronisation (the paper's overlap)."""
    w, b = _start(m)
    xs = np.concatenate([b[:, None], w], axis=1)
    theta = xs[0].copy()
    cuts = np.linspace(0, 4, P + 1).round().astype(int)
    outer = [nesterov_np(lambda c: 0.7, 0.9) for _ in range(P)]
    states, pending = [None] * P, {}
    for t in range(steps):
        gw, gb = _grads(xs[:, 1:], xs[:, 0], batches, t)
        xs = xs - LR * np.concatenate([gb[:, None], gw], axis=1)
        if (t + 1) % (H // P) == 0:
            p = ((t + 1) // (H // P) - 1) % P
            lo, hi = cuts[p], cuts[p + 1]
            theta[lo:hi], states[p] = outer[p](theta[lo:hi], theta[lo:hi] - xs[:, lo:hi].mean(0), states[p])
            pending[t + delay] = (lo, hi, theta[lo:hi].copy())
        if t in pending:
            lo, hi, fragment = pending.pop(t)
            xs[:, lo:hi] = alpha * xs[:, lo:hi] + (1 - alpha) * fragment
    return xs[:, 1:], xs[:, 0]


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_streaming_diloco_synchronises_fragments_in_turn(alpha):
    m, H, P, steps = 3, 4, 2, 12
    algo = coopsgd.streaming_diloco(m, H, fragments=P, alpha=alpha)
    batches = make_batches(steps, m, seed=19)
    trainer, state, metrics, _, _ = run_engine(algo, batches, steps)
    workers = trainer.workers(state)
    ref_w, ref_b = streaming_np(m, H, P, alpha, steps, batches)
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b, tol=5e-5)
    assert np.asarray(metrics.communicated).sum() == steps // (H // P)
    whole = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, H), optax.sgd(LR), loss_fn).communication(16.0)
    assert trainer.communication(16.0).bytes_per_worker == pytest.approx(whole.bytes_per_worker / P)


@pytest.mark.parametrize("delay", [1, 2])
def test_streaming_diloco_merges_each_fragment_delay_steps_late(delay):
    m, H, P, steps = 3, 6, 2, 17
    algo = coopsgd.streaming_diloco(m, H, fragments=P, alpha=0.5, delay=delay)
    batches = make_batches(steps, m, seed=20)
    trainer, state, metrics, _, _ = run_engine(algo, batches, steps)
    workers = trainer.workers(state)
    ref_w, ref_b = streaming_np(m, H, P, 0.5, steps, batches, delay)
    _close(np.asarray(workers["w"]), np.asarray(workers["b"]), ref_w, ref_b, tol=5e-5)
    # the all-reduces are at the synchronisations only; the merges send nothing
    assert np.flatnonzero(np.asarray(metrics.communicated)).tolist() == [2, 5, 8, 11, 14]
    assert trainer.communication(16.0, 1).bytes_per_worker == 0.0
    with pytest.raises(ValueError, match="delay V must be below H/P = 3 steps.*got delay = 3"):
        coopsgd.streaming_diloco(m, H, fragments=P, delay=3)


def test_outer_optimizers_must_be_optax():
    with pytest.raises(ValueError, match="outer_optimizer must be an optax GradientTransformation.*'nesterov'"):
        coopsgd.diloco(4, 8, "nesterov")
    with pytest.raises(ValueError, match="tau = 6, fragments = 4"):
        coopsgd.streaming_diloco(4, 6, fragments=4)
