"""Compiled rounds kept across processes (:func:`coopsgd.parallel.programs.keep_in`).

A kept round is loaded, not traced: the loss function (Python) runs only when JAX traces it, so
counting its calls shows whether a second trainer traced its rounds. What a kept round computes
is checked bitwise against a trainer that keeps nothing, and against the local-SGD rule by hand."""
import errno
import os
import subprocess
import sys

import jax
import networkx as nx
import numpy as np
import optax
import pytest
from conftest import INIT, LR, local_sgd_np, loss_fn, make_batches

import coopsgd
from coopsgd.parallel import programs

M, TAU, STEPS = 4, 2, 6
BATCHES = make_batches(STEPS, M, seed=3)
TRACES = []


def counted_loss(params, batch):
    TRACES.append(1)
    return loss_fn(params, batch)


@pytest.fixture
def kept(tmp_path):
    programs.keep_in(tmp_path / "programs")
    programs.clear()
    yield tmp_path / "programs"
    programs.keep_in(None)
    programs.clear()


def train(key="local-sgd-4-2", algorithm=None):
    """A fresh trainer (as a new process would build it): (traces of the loss, final workers)."""
    programs.clear()
    TRACES.clear()
    trainer = coopsgd.CooperativeSGD(algorithm or coopsgd.local_sgd(M, TAU), optax.sgd(LR), counted_loss,
                                     program_key=key)
    state, _ = trainer.run(trainer.init(INIT), BATCHES, STEPS)
    workers = jax.tree.map(np.asarray, trainer.workers(state))
    return len(TRACES), workers


def by_hand():
    def average_every_tau(t, w, b):
        if (t + 1) % TAU == 0:
            w[:], b[:] = w.mean(0), b.mean()
        return w, b

    return local_sgd_np(BATCHES, STEPS, M, 0, average_every_tau)


def test_a_kept_round_is_loaded_not_traced(kept):
    programs.keep_in(None)
    plain_traces, plain = train()
    programs.keep_in(kept)
    first_traces, first = train()
    assert len(list(kept.glob("*.jaxexport"))) == 1  # one round shape
    second_traces, second = train()
        # The batch check traces the loss once per trainer; the round traces it once more, unless loaded.
    assert plain_traces == first_traces == second_traces + 1
    for a, b, c in zip(jax.tree.leaves(plain), jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    w, b = by_hand()
    np.testing.assert_allclose(second["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second["b"], b, rtol=1e-5, atol=1e-6)


def test_another_key_or_algorithm_traces_again(kept):
    first, _ = train()
    loaded, _ = train()
    other_key, _ = train(key="something-else")
    assert other_key == first > loaded
    ring, workers = train(key="ring", algorithm=coopsgd.dpsgd(nx.cycle_graph(M)))
    assert ring == first
    assert len(list(kept.glob("*.jaxexport"))) == 3
    assert not np.allclose(workers["w"][0], workers["w"][1])  # a ring does not average exactly


def test_a_damaged_file_is_traced_again_and_replaced(kept):
    first, reference = train()
    (path,) = kept.glob("*.jaxexport")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 3])  # cut short, as by a crash mid-write
    again, workers = train()
    assert again == first
    assert path.stat().st_size == size
    np.testing.assert_array_equal(workers["w"], reference["w"])


def test_a_full_disk_keeps_nothing_and_trains(kept, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def full(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    _, workers = train()
    assert not list(kept.iterdir())
    w, b = by_hand()
    np.testing.assert_allclose(workers["w"], w, rtol=1e-5, atol=1e-6)


def test_the_key_must_be_a_string():
    with pytest.raises(ValueError, match="program_key must be a string"):
        coopsgd.CooperativeSGD(coopsgd.local_sgd(M, TAU), optax.sgd(LR), loss_fn, program_key=3)


SCRIPT = """
import sys, jax, numpy as np, optax
sys.path.insert(0, {tests!r})
from conftest import INIT, LR, loss_fn, make_batches
import coopsgd
from coopsgd.parallel import programs
programs.keep_in({folder!r})
traces = []
def counted(p, b):
    traces.append(1)
    return loss_fn(p, b)
t = coopsgd.CooperativeSGD(coopsgd.local_sgd(4, 2), optax.sgd(LR), counted, program_key="cross-process")
state, _ = t.run(t.init(INIT), make_batches(6, 4, seed=3), 6)
print(len(traces), np.asarray(t.workers(state)["w"]).tobytes().hex())
"""


def test_a_later_process_loads_what_an_earlier_one_kept(tmp_path):
    script = SCRIPT.format(tests=os.path.dirname(__file__), folder=str(tmp_path / "kept"))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    (first_traces, first_w), (second_traces, second_w) = (run.stdout.split() for run in runs)
    assert int(second_traces) < int(first_traces)
    assert second_w == first_w
    assert len(list((tmp_path / "kept").glob("*.jaxexport"))) == 1
