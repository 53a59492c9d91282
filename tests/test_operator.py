"""W as an operator: structured storage that equals the dense matrix, spectral quantities from
structure that equal the dense eigensolver and the closed forms, and algorithms at 65,536 workers
without an m × m array."""
import math

import networkx as nx
import numpy as np
import optax
import pytest
import scipy.sparse as sp

import coopsgd
from coopsgd.algorithms.easgd import easgd_matrix
from coopsgd.algorithms.outer import global_momentum_matrix
from coopsgd.algorithms.overlap import overlap_m_matrix, overlap_matrix
from coopsgd.core import mixing, spectral
from coopsgd.core.operator import DENSE_LIMIT, as_operator
from coopsgd.parallel import plan as plans


def _column_stochastic(rng, n, density=1.0):
    w = rng.random((n, n)) * (rng.random((n, n)) < density) + np.eye(n)
    return w / w.sum(axis=0, keepdims=True)


OPERATORS = {
    "J": lambda: mixing.averaging(6),
    "ring": lambda: mixing.metropolis(nx.cycle_graph(7)),
    "torus": lambda: mixing.metropolis(nx.grid_2d_graph(3, 4, periodic=True)),
    "easgd": lambda: easgd_matrix(5, 0.2),
    "overlap": lambda: overlap_matrix(5, 0.6),
    "overlap_m": lambda: overlap_m_matrix(4, 0.6, 0.7),
    "global_momentum": lambda: global_momentum_matrix(4, 0.7, 0.9),
    "dense": lambda: as_operator(_column_stochastic(np.random.default_rng(0), 6)),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_structure_equals_the_dense_matrix(name):
    w = OPERATORS[name]()
    dense = np.asarray(w)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(w.n, 3))
    np.testing.assert_allclose(w @ x, dense @ x, atol=1e-12)
    np.testing.assert_allclose(x.T @ w, x.T @ dense, atol=1e-12)
    np.testing.assert_allclose(np.asarray(w.T), dense.T, atol=0)
    np.testing.assert_allclose(w.column_sums(), dense.sum(0), atol=1e-12)
    np.testing.assert_allclose(w.row_sums(), dense.sum(1), atol=1e-12)
    np.testing.assert_array_equal(w.diagonal(), np.diag(dense))
    assert w.is_symmetric() == bool(np.allclose(dense, dense.T, atol=1e-8))
    assert w.nnz == np.count_nonzero(dense)
    # the dense form read back is stored exactly, block by block
    np.testing.assert_array_equal(np.asarray(as_operator(dense, v=w.v)), dense)


def test_forms_chosen_by_structure():
    assert mixing.averaging(5).form == "mean"
    assert as_operator(np.full((5, 5), 0.2)).form == "mean"
    assert mixing.metropolis(nx.cycle_graph(9)).form == "sparse"
    assert as_operator(_column_stochastic(np.random.default_rng(2), 5)).form == "dense"
    assert easgd_matrix(4, 0.1).form == "sparse" and easgd_matrix(4, 0.1).v == 1
    assert global_momentum_matrix(4).form == "mean" and global_momentum_matrix(4).v == 2


def test_circulant_offsets():
    offsets = mixing.metropolis(nx.cycle_graph(8)).circulant_offsets()
    assert sorted(offsets) == [0, 1, 7] and offsets[0] == pytest.approx(1 / 3) and offsets[1] == 1 / 3
    assert mixing.metropolis(nx.path_graph(8)).circulant_offsets() is None  # end nodes differ
    ex = mixing.metropolis(coopsgd.topology.exponential(8))
    assert sorted(ex.circulant_offsets()) == [0, 1, 2, 4, 6, 7]


@pytest.mark.parametrize("name", OPERATORS)
def test_zeta_and_stationary_from_structure_equal_the_dense_solver(name):
    w = OPERATORS[name]()
    if name == "torus":  # a torus is not circulant in its numbering: the sparse Lanczos path
        assert w.circulant_offsets() is None
    assert spectral.zeta(w, method="structure") == pytest.approx(spectral.zeta(w, method="dense"), abs=1e-9)
    if spectral.zeta(w) < 1 - 1e-9:
        np.testing.assert_allclose(spectral.stationary(w, method="structure"),
                                   spectral.stationary(w, method="dense"), atol=1e-9)


def test_overlap_stationary_by_hand():
    # X π = (1 − α) x̄ + α z: (1 − α)/m per worker, α for the anchor (Wang, Liang & Joshi, §3)
    np.testing.assert_allclose(spectral.stationary(overlap_matrix(4, 0.6), method="structure"),
                               [0.1, 0.1, 0.1, 0.1, 0.6], atol=1e-12)


def test_sparse_nonsymmetric_zeta_by_arnoldi():
    rng = np.random.default_rng(3)
    dense = _column_stochastic(rng, 40, density=0.1)
    w = as_operator(sp.csr_array(dense))
    assert spectral.zeta(w, method="structure") == pytest.approx(spectral.zeta(dense, method="dense"), abs=1e-8)


def test_read_only_and_bad_input():
    w = mixing.averaging(3)
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0
    with pytest.raises(ValueError, match="complex"):
        as_operator(np.eye(2) * 1j)
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        as_operator(np.zeros((2, 3)))


# --------------------------------------------------------------------------------- at scale

M = 65536


def test_ring_at_65536_workers_without_a_dense_w():
    algo = coopsgd.dpsgd(nx.cycle_graph(M))
    w = algo.W
    assert w.form == "sparse" and w.nnz == 3 * M
    # ζ of the Metropolis ring is 1/3 + (2/3) cos(2π/m) (even m: λ_{m/2} = −1/3 is smaller)
    assert algo.zeta == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / M), abs=1e-12)
    with pytest.raises(ValueError, match=f"dense {M} x {M} array .* more than the {DENSE_LIMIT}"):
        np.asarray(w)
    plan = plans.plan_for_matrix(w, M)
    assert plan.kind == "neighbour" and sorted(plan.shifts) == [1, M - 1]
    traffic = plans.communication(plan, 4000.0)
    assert (traffic.kind, traffic.bytes_per_worker, traffic.messages) == ("neighbour", 8000.0, 2)


def test_averaging_and_easgd_at_65536_workers():
    assert coopsgd.local_sgd(M, 4).zeta == 0.0
    alpha = 2.0 / (M + 2)
    easgd = coopsgd.easgd(M, 1)
    assert easgd.zeta == pytest.approx(max(abs(1 - alpha), abs(1 - (M + 1) * alpha)), abs=1e-12)
    assert easgd.W.nnz == 3 * M + 1  # (1 − α) I, the anchor's row and column, its self-weight
    assert plans.communication(plans.plan_for_matrix(easgd.W, M, 1), 100.0).all_reduces == 1


def test_trainer_at_65536_workers_is_the_ring_update():
    import jax.numpy as jnp

    def loss(p, b):
        return 0.5 * jnp.sum((p["w"] - b) ** 2)

    trainer = coopsgd.CooperativeSGD(coopsgd.dpsgd(nx.cycle_graph(M)), optax.sgd(0.5), loss,
                                     track_consensus=False)
    state = trainer.init({"w": jnp.zeros(2)})
    targets = np.arange(M, dtype=np.float32)
    state, _ = trainer.run(state, np.tile(targets[None, :, None], (1, 1, 2)), 1)
    # one SGD step x_i = 0.5 t_i, then the ring average of each worker with its two neighbours
    x = 0.5 * targets
    expect = (np.roll(x, 1) + x + np.roll(x, -1)) / 3
    np.testing.assert_allclose(np.asarray(state.params["w"])[:, 0], expect, rtol=1e-5)


def test_edges_of_the_operator():
    ring = mixing.metropolis(nx.cycle_graph(DENSE_LIMIT + 8))
    with pytest.raises(IndexError, match="out of bounds"):
        ring[0, DENSE_LIMIT + 8]
    assert ring[0, -1] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="v = 3 auxiliary columns do not fit a 2 x 2"):
        as_operator(np.eye(2), v=3)
    ov = overlap_matrix(3, 0.5)
    assert (ov @ ov).v == 1
    np.testing.assert_allclose(np.asarray(ov @ ov), np.asarray(ov) @ np.asarray(ov), atol=1e-12)
    eye = coopsgd.core.operator.identity(4)
    with pytest.raises(ValueError, match="read-only"):
        eye.worker_block().data[:] = 2.0  # the cached identity cannot be corrupted
    # small non-symmetric, non-circulant W: the structural path falls back to the exact solver
    w = np.array([[0.5, 0.2, 0.0, 0.1], [0.5, 0.6, 0.3, 0.0], [0.0, 0.2, 0.4, 0.2], [0.0, 0.0, 0.3, 0.7]])
    assert spectral.zeta(w, method="structure") == pytest.approx(spectral.zeta(w, method="dense"))


def test_cycle_contraction_in_closed_form():
    m = 64
    ring = mixing.metropolis(nx.cycle_graph(m))
    for cycle in ([ring, mixing.lazy(ring)], [mixing.averaging(m), np.eye(m)], [ring]):
        schedule = coopsgd.schedules.cyclic(cycle)
        assert spectral.cycle_contraction(schedule.cycle) == pytest.approx(
            spectral.norm_minus_averaging(schedule.expected_gram()), abs=1e-12)
    big = mixing.metropolis(nx.cycle_graph(M))
    algo = coopsgd.Algorithm(coopsgd.schedules.cyclic([big, mixing.lazy(big)]))
    # E|λ_k|² over the pair at k = 1: (λ² + ((1 + λ)/2)²)/2 with λ = 1/3 + (2/3) cos(2π/m)
    lam = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / M)
    assert algo.zeta == pytest.approx(math.sqrt((lam**2 + ((1 + lam) / 2) ** 2) / 2), abs=1e-12)


def test_a_sparse_w_given_with_duplicates_and_stored_zeros_is_read_as_its_sum():
    """Duplicate COO entries add up and stored zeros are no arcs, in the off-diagonal and in the
    coefficients a neighbour plan reads (both found without SciPy's indexing)."""
    rng = np.random.default_rng(3)
    n = 9
    rows, cols = rng.integers(0, n, 40), rng.integers(0, n, 40)
    vals = rng.uniform(0.01, 0.1, 40)
    vals[:5] = 0.0  # stored zeros
    raw = sp.coo_array((vals, (rows, cols)), shape=(n, n))  # duplicates summed only when converted
    dense = np.zeros((n, n))
    np.add.at(dense, (rows, cols), vals)
    off_np = dense - np.diag(np.diag(dense))
    w = as_operator(sp.csr_array(raw) + sp.diags_array(1.0 - dense.sum(0)))
    off = w.worker_offdiagonal()
    np.testing.assert_allclose(off.toarray(), off_np, atol=1e-15)
    assert off.nnz == np.count_nonzero(off_np) and off.has_canonical_format
    plan = plans.plan_for_matrix(w, n)
    assert plan.kind == "neighbour"
    slots = plans.coefficients(plan, w)["slots"]
    full = dense + np.diag(1.0 - dense.sum(0))
    for s in range(len(plan.shifts)):
        src = plan.source_array(s)
        expect = np.where(src != np.arange(n), full[src, np.arange(n)], 0.0)
        np.testing.assert_allclose(slots[s], expect, atol=1e-15)
