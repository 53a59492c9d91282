"""A worker is a group of devices: a 2-D mesh ("workers", "model") on the 8 forced host devices,
each worker's model sharded over its group by ``param_specs``.

The reference is the simulate backend (one device, the whole model per worker), itself tested
against the papers' update rules elsewhere; here the layouts must agree with it, the parameters
must stay sharded as given, and the mixing's collectives must run along "workers" only (read
from the compiled HLO).
"""
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import coopsgd
from coopsgd.parallel import hlo

HIDDEN = 8
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}


def loss(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)


def problem(m, steps, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": (0.4 * rng.normal(size=(6, HIDDEN))).astype(np.float32), "b1": np.zeros(HIDDEN, np.float32),
              "w2": (0.4 * rng.normal(size=(HIDDEN, 1))).astype(np.float32)}
    batches = {"x": rng.normal(size=(steps, m, 5, 6)).astype(np.float32),
               "y": rng.normal(size=(steps, m, 5, 1)).astype(np.float32)}
    return params, batches


def mesh(workers, model):
    return jax.make_mesh((workers, model), ("workers", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def algorithms(m):
    return {
        "local_sgd": coopsgd.local_sgd(m, 2),
        "dpsgd": coopsgd.dpsgd(nx.cycle_graph(m)),
        "matcha": coopsgd.matcha(nx.cycle_graph(m), budget=0.5, seed=3),  # a time-varying W_k
    }


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)], ids=["4x2", "2x4"])
def test_sharded_workers_equal_the_simulation(shape):
    m, steps = 4, 6
    params, batches = problem(m, steps)
    for name, algo in algorithms(m).items():
        ref = coopsgd.CooperativeSGD(algo, optax.adam(0.05), loss)
        expected, ref_metrics = ref.run(ref.init(params), batches, steps)
        trainer = coopsgd.CooperativeSGD(algo, optax.adam(0.05), loss, backend="shard_map", mesh=mesh(*shape),
                                         param_specs=SPECS)
        state, metrics = trainer.run(trainer.init(params), batches, steps)
        for leaf, spec in SPECS.items():  # never silently replicated: the layout given, and Adam's moments too
            assert state.params[leaf].sharding.spec == P("workers", *spec), (name, leaf)
            assert state.opt_state[0].mu[leaf].sharding.spec == P("workers", *spec), (name, leaf)
            np.testing.assert_allclose(np.asarray(state.params[leaf]), np.asarray(expected.params[leaf]),
                                       rtol=2e-5, atol=2e-6, err_msg=f"{name} {leaf}")
        np.testing.assert_allclose(metrics.loss, ref_metrics.loss, rtol=2e-5)
        # each device holds its slice: w1 (m, 6, 8) split over the workers and over the model axis
        shard = state.params["w1"].addressable_shards[0].data.shape
        assert shard == (m // shape[0], 6, HIDDEN // shape[1]), shard


def test_collectives_are_read_by_the_axes_they_span():
    """The HLO reader on the three forms XLA prints, with the spans worked out by hand for a
    (workers 4 × model 2) mesh: device d sits at (d // 2, d % 2)."""
    shape = {"workers": 4, "model": 2}
    lines = [
        "%a = f32[4] all-reduce(%x), replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add",  # same model index
        "%b = f32[8] all-gather(%x), replica_groups=[4,2]<=[8], dimensions={0}",  # rows {0,1},{2,3},…: a group
        "%c = f32[8] all-gather(%x), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}",  # columns: {0,2,4,6},…
        "%d = f32[4] collective-permute(%x), source_target_pairs={{0,2},{2,4},{4,6},{6,0}}",
        "%e = f32[4] collective-permute(%x), source_target_pairs={{0,1},{1,0}}",
        "%f = f32[4] all-reduce(%x), replica_groups={}, to_apply=%add",  # every device
    ]
    assert hlo.collectives("\n".join(lines), shape) == [
        ("all-reduce", ("workers",)), ("all-gather", ("model",)), ("all-gather", ("workers",)),
        ("collective-permute", ("workers",)), ("collective-permute", ("model",)),
        ("all-reduce", ("workers", "model"))]


def test_the_mixing_communicates_along_workers_only():
    m, dims = 4, (4, 2)
    params, batches = problem(m, 1)
    batch = jax.tree.map(lambda b: b[0], batches)
    for name, algo in algorithms(m).items():
        trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), loss, backend="shard_map", mesh=mesh(*dims),
                                         param_specs=SPECS)
        state = trainer.init(params)
        r = next(r for r in range(8) if trainer.mix_round(r).moves)
        shape = {"workers": dims[0], "model": dims[1]}
        mixing = hlo.collectives(trainer.lower_step(state, batch, mixes=True, r=r).compile().as_text(), shape)
        local = hlo.collectives(trainer.lower_step(state, batch, mixes=False).compile().as_text(), shape)
        # The local step's collectives stay inside a worker's group (GSPMD's, for the sharded model) ...
        assert local and all(span == ("model",) for _, span in local), (name, local)
        # ... and the mixing adds collectives that run along "workers" alone.
        along = [c for c in mixing if c[1] == ("workers",)]
        assert along and all(span in {("model",), ("workers",)} for _, span in mixing), (name, mixing)
        kinds = {kind for kind, _ in along}
        assert kinds == ({"all-reduce"} if name == "local_sgd" else {"collective-permute"}), (name, kinds)


def test_groups_of_one_device_need_no_specs_beyond_the_worker_axis():
    # a ("workers", "model") mesh of model size 1 is the plain layout: P() everywhere is fine
    m = 4
    params, batches = problem(m, 2)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 2), optax.sgd(0.1), loss, backend="shard_map",
                                     mesh=mesh(4, 1), param_specs=jax.tree.map(lambda _: P(), params))
    state, _ = trainer.run(trainer.init(params), batches, 2)
    ref = coopsgd.CooperativeSGD(coopsgd.local_sgd(m, 2), optax.sgd(0.1), loss)
    expected, _ = ref.run(ref.init(params), batches, 2)
    np.testing.assert_allclose(np.asarray(state.params["w1"]), np.asarray(expected.params["w1"]), rtol=1e-5)


# ----------------------------------------------------------------------------------- bad input
def _build(**kw):
    params, _ = problem(4, 1)
    options = {"backend": "shard_map", "mesh": mesh(4, 2), "param_specs": SPECS} | kw
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(0.1), loss, **options)
    return trainer.init(params)


@pytest.mark.parametrize("kw, message", [
    ({"mesh": jax.make_mesh((4, 2), ("data", "model"))}, "needs an axis named 'workers'"),
    ({"param_specs": None}, "no param_specs say how a model is sharded"),
    ({"mesh": jax.make_mesh((8,), ("workers",))}, "the mesh has no other axis"),
    ({"param_specs": {"w1": P(None, "model"), "b1": P("model")}}, "must have the structure of the params"),
    ({"param_specs": {**SPECS, "w1": P(None, "tensor")}}, r"params\['w1'\] names mesh axis 'tensor'"),
    ({"param_specs": {**SPECS, "w1": P("workers", None)}}, r"params\['w1'\] names mesh axis 'workers'"),
    ({"param_specs": {**SPECS, "w2": P(None, "model")}}, r"params\[.w2.\] .*dimension 1 .* 1 entries, not a multiple of the 2"),
    ({"param_specs": {**SPECS, "b1": P(None, "model")}}, r"params\['b1'\] is .*2 entries for a leaf of shape \(8,\)"),
    ({"param_specs": {**SPECS, "b1": "model"}}, r"params\['b1'\] must be a PartitionSpec"),
    ({"backend": "simulate"}, "mesh is an option of backend='shard_map'"),
])
def test_bad_layouts_are_refused_before_compiling(kw, message):
    with pytest.raises(ValueError, match=message):
        _build(**kw)


def test_a_batch_whose_worker_axis_does_not_match_is_refused():
    params, batches = problem(4, 2)
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(0.1), loss, backend="shard_map",
                                     mesh=mesh(4, 2), param_specs=SPECS)
    state = trainer.init(params)
    bad = {"x": batches["x"][:, :3], "y": batches["y"][:, :3]}
    with pytest.raises(ValueError, match=r"batches\['x'\] has shape \(2, 3, 5, 6\).*m = 4"):
        trainer.run(state, bad, 2)
