"""The one registry: every registered algorithm builds from a configuration, runs on every backend
with the same results, steps, and survives a checkpoint round trip; compare, train, verify and the
docs read the same names and defaults."""
import pathlib

import jax
import numpy as np
import optax
import pytest
from conftest import INIT, LR, loss_fn, make_batches

import coopsgd
from coopsgd.app import checkpoint as ckpt
from coopsgd.app import config, registry
from coopsgd.app.commands import verify as verify_command

NAMES = registry.names()
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_the_registry_holds_the_command_line_algorithms():
    linear = ["fully_sync", "local_sgd", "easgd", "dpsgd", "decentralized_periodic", "overlap_local_sgd", "matcha"]
    beyond = ["dpsgd_lian", "easgd_zhang", "choco_sgd", "push_sum", "gradient_tracking", "diloco",
              "streaming_diloco"]
    # hierarchical is linear too, but its W cycles (I ⊗ J_g, …, J_m): outside the static-W bound
    assert NAMES == linear + ["adacomm"] + beyond + ["hierarchical"]
    # AdaComm's period is decided at run time; the Cooperative SGD bound covers the linear (X + U)W only
    assert registry.names(theory=True) == linear
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'; valid algorithms: fully_sync"):
        registry.get("sgd")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.REGISTRY["local_sgd"])


def test_one_default_everywhere():
    # Overlap Local-SGD's alpha is 0.5 in compare, train and verify alike.
    algo, entry = registry.build(config.make_config({"algorithm": "overlap_local_sgd"}))
    assert entry.overlap and algo.W[0, 0] == pytest.approx(0.5)
    via_verify = verify_command.make_algorithm("overlap_local_sgd", 8, 8)
    np.testing.assert_array_equal(np.asarray(via_verify.W), np.asarray(algo.W))


def test_docs_table_is_the_registry():
    text = (DOCS / "algorithms.md").read_text()
    assert registry.markdown_table() in text


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_runs_steps_checkpoints_and_agrees_across_backends(name, tmp_path):
    m, steps = 8, 6
    cfg = config.make_config({"algorithm": name, "workers": m, "tau": 2})
    algo, _ = registry.build(cfg, param_bytes=16.0)
    batches = make_batches(steps, m, seed=41)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn)
    state = trainer.init(INIT)
    # step by step equals one run
    stepped = state
    for k in range(steps):
        stepped, _ = trainer.step(stepped, jax.tree.map(lambda x: x[k], batches))
    ran, metrics = trainer.run(state, batches, steps)
    for a, b in zip(jax.tree.leaves(trainer.columns(stepped)), jax.tree.leaves(trainer.columns(ran))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert bool(np.all(np.asarray(metrics.finite)))
    # checkpoint round trip (mid-round too: the period's position is saved by value)
    half, _ = trainer.run(state, batches, 3)
    saver = ckpt.Checkpointer(tmp_path / "ck")
    saver.save(3, half, {})
    back, _ = saver.restore(trainer.init(INIT), schedule=algo.period)
    saver.close()
    assert back.period == half.period
    resumed, _ = trainer.run(back, jax.tree.map(lambda x: x[3:], batches), 3)
    for a, b in zip(jax.tree.leaves(trainer.columns(resumed)), jax.tree.leaves(trainer.columns(ran))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every backend gives the same run
    if jax.device_count() >= 8:
        for backend in ("pmap", "shard_map"):
            dev = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, backend=backend)
            dev_state, dev_metrics = dev.run(dev.init(INIT), batches, steps)
            for a, b in zip(jax.tree.leaves(dev.columns(dev_state)), jax.tree.leaves(trainer.columns(ran))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
            assert np.asarray(dev_metrics.communicated).tolist() == np.asarray(metrics.communicated).tolist()


def test_an_algorithm_with_its_own_mixer_is_one_registration(monkeypatch, tmp_path):
    """A nonlinear algorithm reaches compare/train by one Entry: its Algorithm carries its mixer's
    factory, and nothing else in the application changes."""
    from test_protocol import momentum_mixer

    from coopsgd.app import experiment

    def factory(ctx):
        m = ctx.cfg["workers"]
        return coopsgd.Algorithm(coopsgd.mixing.averaging(m), tau=ctx.cfg["tau"], name="momentum",
                                 mixer=lambda algo, devices: momentum_mixer(algo.m))

    monkeypatch.setitem(registry.REGISTRY, "momentum",
                        registry.Entry("momentum", "global momentum on the average (a test mixer)", factory,
                                       {"tau": None}, theory=False))
    cfg = config.make_config({"algorithm": "momentum", "workers": 4, "tau": 4, "steps": 16, "eval_every": 8,
                              "out": str(tmp_path)})
    result = experiment.run(cfg)
    assert result.trainer.mixer.name == "test momentum"
    assert result["summary"]["comm_rounds"] == 4  # 16 steps, a mixing every 4
    assert result["summary"]["bytes_communicated"] > 0  # the mixer's own traffic account
    shared = result.trainer.backend.shared(result.state.mix_state.shared)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(shared["anchor"])[0]),
                               np.asarray(jax.tree.leaves(result.trainer.workers(result.state))[0])[0], rtol=1e-6)
