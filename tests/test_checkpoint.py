"""Checkpoints: orbax round trip of the engine state, and a run killed with SIGKILL that resumes to
the bitwise-identical end of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopsgd
from coopsgd import CooperativeSGD
from coopsgd.app import checkpoint as ckpt


def _trainer():
    def loss(p, batch):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

    return CooperativeSGD(coopsgd.easgd(3, tau=2), optax.adam(0.1), loss)


class TestRoundTrip:
    def test_state_and_host_round_trip(self, tmp_path):
        tr = _trainer()
        state = tr.init({"w": jnp.zeros(2)}, seed=5)
        rng = np.random.default_rng(0)
        batches = {"x": rng.normal(size=(5, 3, 4, 2)).astype(np.float32),
                   "y": rng.normal(size=(5, 3, 4)).astype(np.float32)}
        state, _ = tr.run(state, batches, 5)
        c = ckpt.Checkpointer(tmp_path / "ck")
        c.save(5, state, {"note": "x", "values": [1.5, 2.25]})
        assert c.latest_step() == 5 and ckpt.latest_step(tmp_path / "ck") == 5
        fresh = tr.init({"w": jnp.zeros(2)}, seed=0)
        back, host = c.restore(fresh)
        c.close()
        assert host["values"] == [1.5, 2.25]
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(back.step) == 5 and int(back.rounds) == 2
        assert back.period == state.period  # the current round's position, by value

    def test_other_libraries_loggers_untouched(self, tmp_path):
        # orbax is silenced only inside each operation; the process's absl logger keeps its level
        import logging

        absl = logging.getLogger("absl")
        before = absl.level
        absl.setLevel(logging.INFO)
        try:
            tr = _trainer()
            c = ckpt.Checkpointer(tmp_path / "ck")
            c.save(1, tr.init({"w": jnp.zeros(2)}), {})
            c.restore(tr.init({"w": jnp.zeros(2)}))
            c.close()
            assert absl.level == logging.INFO
        finally:
            absl.setLevel(before)

    def test_find_and_errors(self, tmp_path):
        with pytest.raises(ValueError, match="no complete checkpoint"):
            ckpt.find(tmp_path)
        tr = _trainer()
        c = ckpt.Checkpointer(tmp_path / "checkpoints")
        c.save(1, tr.init({"w": jnp.zeros(2)}), {})
        c.close()
        assert ckpt.find(tmp_path) == str(tmp_path / "checkpoints")
        other = CooperativeSGD(coopsgd.local_sgd(3, 2), optax.sgd(0.1), lambda p, b: 0.0)
        with pytest.raises(ValueError, match="does not match this run"):
            ckpt.Checkpointer(tmp_path / "checkpoints").restore(other.init({"w": jnp.zeros(7)}))


CONFIG = """\
algorithm = "local_sgd"
workers = 4
tau = 4
steps = 160
eval_every = 8
batch_size = 8
"""


def _cli(*args):
    return [sys.executable, "-m", "coopsgd.app.cli", *args]


def _final_arrays(folder, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(folder, "checkpoints")) as m:
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.leaves(out.state)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    subprocess.run(_cli("train", "--config", str(cfg), "--out", ref, "--checkpoint-every", "8",
                        "--no-progress"), check=True, env=env, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cli("train", "--config", str(cfg), "--out", cut, "--checkpoint-every", "8",
                                 "--no-progress"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while ckpt.latest_step(os.path.join(cut, "checkpoints")) is None:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.latest_step(os.path.join(cut, "checkpoints"))
    assert killed_at < 160, "the run was not killed part-way"
    assert not os.path.exists(os.path.join(cut, "results.json"))

    done = subprocess.run(_cli("train", "--resume", cut, "--no-progress"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = _final_arrays(ref, 160), _final_arrays(cut, 160)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ra = json.load(open(os.path.join(ref, "results.json")))["runs"][0]
    rb = json.load(open(os.path.join(cut, "results.json")))["runs"][0]
    assert ra["history"] == rb["history"]
    for key in ("final_train_loss", "comm_rounds", "bytes_communicated", "simulated_time"):
        assert ra["summary"][key] == rb["summary"][key]
