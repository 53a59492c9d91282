"""Fault injection: kills (SIGKILL, SIGINT) at chosen points, full disks, damaged checkpoints,
concurrent runs and bad output paths end in one line and an exit code, and never cost a complete
earlier result set or checkpoint."""

import errno
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import _cli, _final_arrays, _trainer

from coopsgd.app import checkpoint as ckpt
from coopsgd.app import cli, files, plotting, results

CONFIG = 'algorithm = "local_sgd"\nworkers = 2\ntau = 2\nsteps = 8\neval_every = 4\nbatch_size = 8\n'

# Runs the command line (or write_results) in a child process that kills itself at one chosen
# point: inside orbax's final rename of checkpoint k ("kill-save@k", "sigint-save@k"), while the
# second figure of a result set is drawn ("kill-figure"), or between the renames that move a
# complete set into place ("kill-move").
DRIVER = r'''
import os, signal, sys
mode, args = sys.argv[1], sys.argv[2:]
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even if launched in the background
if "-save@" in mode:
    from orbax.checkpoint._src.path import atomicity
    real = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if self.get_final().name == mode.split("@")[1]:
            os.kill(os.getpid(), signal.SIGKILL if mode.startswith("kill") else signal.SIGINT)
        return await real(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from coopsgd.app import cli
    sys.exit(cli.main(args))
import importlib.util, types  # the result files need neither JAX nor the engine: skip coopsgd/__init__
package = types.ModuleType("coopsgd")
package.__path__ = list(importlib.util.find_spec("coopsgd").submodule_search_locations)
sys.modules["coopsgd"] = package
from coopsgd.app import plotting, results
out = args[0]
if mode == "kill-figure":
    real_plot, calls = plotting.plot_curves, []
    def plot_curves(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_plot(*a, **k)
    plotting.plot_curves = plot_curves
else:
    real_replace, moved = os.replace, []
    def replace(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == os.path.abspath(out) and ".coopsgd-staging-" in src:
            moved.append(dst)
            if len(moved) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
results.write_results([RESULT("b")], out)
'''


def RESULT(name, loss=1.0):
    """A small run result, as experiment.run returns it."""
    hist = {"step": [0, 10], "time": [0.0, 1.0], "loss": [2.0, loss], "batch_loss": [None, 1.1],
            "consensus": [0.0, 0.5], "test_accuracy": [0.1, 0.9], "tau": [2, 2]}
    summary = {"final_train_loss": loss, "test_accuracy": 0.9, "comm_rounds": 5,
               "bytes_communicated": 2.5e6, "simulated_time": 1.0, "real_time": 0.3}
    return {"name": name, "config": {}, "summary": summary, "history": hist}


def _driver(tmp_path, mode, *args, wait=True):
    """Run the driver in a child process: its CompletedProcess, or with ``wait=False`` a
    ``finish()`` that waits for it and returns ``(returncode, stderr)``."""
    script = tmp_path / "driver.py"
    script.write_text(inspect.getsource(RESULT) + DRIVER)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(script), mode, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def finish():
        _, err = proc.communicate(timeout=240)
        return proc.returncode, err

    return finish() if wait else finish


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(capsys, cfg, out, *extra):
    return _run(capsys, "train", "--config", cfg, "--out", out, "--no-progress", *extra)


def _snapshot(folder):
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                found[os.path.relpath(p, folder)] = f.read()
    return found


def _result_names():
    return sorted(results.result_files())


@pytest.fixture()
def cfg(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(CONFIG)
    return p


# ------------------------------------------------------------------------------------- kills
def test_kills_inside_a_checkpoint_save(capsys, tmp_path, cfg):
    """SIGKILL inside the rename that completes checkpoint 8 of 12 steps: the resumed run ends
    bitwise-identical to an uninterrupted one. SIGINT inside the save of checkpoint 4: the save
    completes, then the run ends with one line and exit code 130."""
    from coopsgd.app import experiment
    from coopsgd.app.commands.train import build_config

    ref, cut, stopped = tmp_path / "ref", tmp_path / "cut", tmp_path / "stopped"
    killed = _driver(tmp_path, "kill-save@8", "train", "--config", cfg, "--out", cut, "--checkpoint-every", "4",
                     "--set", "steps=12", "--no-progress", wait=False)
    interrupted = _driver(tmp_path, "sigint-save@4", "train", "--config", cfg, "--out", stopped,
                          "--checkpoint-every", "4", "--no-progress", wait=False)
    full = experiment.run(build_config(cfg, ["steps=12"], out=str(ref)), checkpoint_dir=ref / "checkpoints",
                          checkpoint_every=4)

    code, err = interrupted()
    assert code == 130 and err == "coopsgd: interrupted\n", err
    assert sorted(os.listdir(stopped)) == ["checkpoints", "metrics"]  # nothing temporary is left, no lock
    assert sorted(os.listdir(stopped / "checkpoints")) == ["4"] and ckpt.latest_step(stopped / "checkpoints") == 4

    code, err = killed()
    assert code == -signal.SIGKILL, err
    names = os.listdir(cut / "checkpoints")
    assert ckpt.latest_step(cut / "checkpoints") == 4 and any(n.startswith("8.orbax-checkpoint-tmp") for n in names)
    assert (cut / files.LOCK_NAME).exists() and not (cut / "results.json").exists()
    code, _, err = _run(capsys, "train", "--resume", cut, "--no-progress")
    assert code == 0, err
    assert err.count("\n") == 1 and "taking over output folder" in err and "(pid " in err  # the stale lock
    left = os.listdir(cut / "checkpoints")
    assert "12" in left and not [n for n in left if "orbax-checkpoint-tmp" in n]  # the killed save's leftover is gone
    assert not (cut / files.LOCK_NAME).exists()
    for x, y in zip(_final_arrays(ref, 12), _final_arrays(cut, 12), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert json.loads((cut / "results.json").read_text())["runs"][0]["history"] == full["history"]


def test_sigkill_while_results_are_written_keeps_the_earlier_set(capsys, tmp_path):
    out = tmp_path / "o"
    results.write_results([RESULT("a")], str(out))
    (out / ".tmpab12cd34.png").write_bytes(b"left by an older version killed in atomic_write")
    before = {n: (out / n).read_bytes() for n in _result_names()}
    code, err = _driver(tmp_path, "kill-figure", out)
    assert code == -signal.SIGKILL, err
    assert {n: (out / n).read_bytes() for n in _result_names()} == before  # the earlier set, untouched
    orphans = [n for n in os.listdir(out) if n.startswith(files.STAGING_PREFIX)]
    assert len(orphans) == 1

    with results.output_folder(out):  # the next run tidies up
        pass
    assert sorted(os.listdir(out)) == _result_names()
    assert {n: (out / n).read_bytes() for n in _result_names()} == before


def test_sigkill_between_the_renames_is_rolled_forward_by_the_next_run(tmp_path):
    out, ref = tmp_path / "o", tmp_path / "ref"
    results.write_results([RESULT("a")], str(out))
    results.write_results([RESULT("b")], str(ref))
    code, err = _driver(tmp_path, "kill-move", out)
    assert code == -signal.SIGKILL, err
    assert any(n.startswith(files.STAGING_PREFIX) for n in os.listdir(out))
    results.prepare_out(out)  # the next run finishes the move of the complete set
    assert sorted(os.listdir(out)) == _result_names()
    assert _snapshot(out) == _snapshot(ref)


# ----------------------------------------------------------------------------- full disks
def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_in_a_result_file_names_it_and_keeps_the_earlier_set(monkeypatch, tmp_path):
    out = tmp_path / "o"
    results.write_results([RESULT("a")], str(out))
    before = _snapshot(out)
    real, calls = plotting.plot_curves, []

    def plot_curves(*a, **k):
        calls.append(1)
        return _enospc() if len(calls) == 2 else real(*a, **k)

    monkeypatch.setattr(plotting, "plot_curves", plot_curves)
    with pytest.raises(ValueError) as err:
        results.write_results([RESULT("b", 0.5)], str(out))
    assert str(err.value) == f"no space left on device writing {str(out / 'loss_vs_time.png')!r}"
    assert _snapshot(out) == before  # no file of the new set, no staging folder


def test_enospc_in_a_checkpoint_save_keeps_the_earlier_ones(monkeypatch, tmp_path, caplog):
    from orbax.checkpoint._src.path import atomicity

    tr = _trainer()
    state = tr.init({"w": jnp.zeros(2)})
    c = ckpt.Checkpointer(tmp_path / "ck")
    c.save(1, state, {"n": 1})

    async def finalize(self):
        _enospc()

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as err:
        c.save(2, state, {"n": 2})
    c.close()
    assert str(err.value) == (f"cannot save checkpoint 2 in {str(tmp_path / 'ck')!r}: no space left on device; "
                              "the checkpoints up to step 1 are intact")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no orbax tracebacks
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]
    monkeypatch.undo()
    assert ckpt.Checkpointer(tmp_path / "ck").read_host()["n"] == 1


@pytest.fixture()
def tmpfs(tmp_path):
    """A small tmpfs (root only): ``fill()`` takes all its free space, ``free()`` gives it back."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    class Disk:
        path = mnt
        filler = mnt / "filler"

        def fill(self):
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for size in (1 << 16, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
            finally:
                os.close(fd)

        def free(self):
            self.filler.unlink()

    yield Disk()
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _no_training(monkeypatch):
    from coopsgd.app import experiment

    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("the run trained before the refusal"))


def test_full_disk_is_found_before_training(capsys, monkeypatch, cfg, tmpfs):
    _no_training(monkeypatch)
    tmpfs.fill()
    code, out, err = _train(capsys, cfg, tmpfs.path / "o")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "cannot write output folder" in err and "no space left on device" in err
    assert sorted(os.listdir(tmpfs.path)) == ["filler"]


def test_disk_filling_up_during_training(capsys, monkeypatch, cfg, tmpfs, caplog):
    from coopsgd.app import experiment

    # the disk fills while the run trains: the result set cannot be written, the earlier one stays
    out = tmpfs.path / "o"
    results.write_results([RESULT("a")], str(out))
    before = _snapshot(out)
    monkeypatch.setattr(experiment, "run", lambda *a, **k: (tmpfs.fill(), RESULT("b", 0.5))[1])
    code, table, err = _train(capsys, cfg, out)
    assert code == 2 and err.count("\n") == 1 and "b " in table
    assert err.startswith("coopsgd: error: no space left on device writing ") and str(out) in err
    assert _snapshot(out) == before  # the earlier set whole; no staging folder, no lock left
    tmpfs.free()
    monkeypatch.undo()

    # a checkpoint save that meets the full disk: one line, the earlier checkpoint intact
    real_save = ckpt.Checkpointer.save

    def save_then_fill(self, step, *a):
        real_save(self, step, *a)
        if step == 4:
            tmpfs.fill()

    monkeypatch.setattr(ckpt.Checkpointer, "save", save_then_fill)
    with caplog.at_level(logging.INFO):
        code, _, err = _train(capsys, cfg, tmpfs.path / "c", "--checkpoint-every", "4")
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot save checkpoint 8" in err and "no space left on device; the checkpoints up to step 4 are intact" in err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sorted(os.listdir(tmpfs.path / "c" / "checkpoints")) == ["4"]  # no orbax temporary folder
    reader = ckpt.Checkpointer(tmpfs.path / "c" / "checkpoints", read_only=True)
    assert reader.read_host()["config"]["steps"] == 8
    reader.close()


# ------------------------------------------------------------------------ damaged checkpoints
def _truncate(checkpoints, step):
    """Cut every array file of checkpoint ``step`` to 10 bytes."""
    for root, _, names in os.walk(os.path.join(checkpoints, str(step), "state")):
        for n in names:
            if os.path.basename(root) == "d":
                os.truncate(os.path.join(root, n), 10)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(capsys, tmp_path, cfg):
    from coopsgd.app import experiment
    from coopsgd.app.commands.train import build_config

    cut = tmp_path / "cut"
    full = experiment.run(build_config(cfg, [], out=str(cut)), checkpoint_dir=cut / "checkpoints", checkpoint_every=4)
    final = _final_arrays(cut, 8)
    _truncate(cut / "checkpoints", 8)
    code, _, err = _run(capsys, "train", "--resume", cut, "--no-progress")
    assert code == 0 and err.count("\n") == 1, err
    assert err.startswith(f"coopsgd: warning: checkpoint 8 in {str(cut / 'checkpoints')!r} is unreadable: ")
    assert err.endswith("; using checkpoint 4\n")
    assert json.loads((cut / "results.json").read_text())["runs"][0]["history"] == full["history"]
    for x, y in zip(final, _final_arrays(cut, 8), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_garbage_host_json_names_the_file(tmp_path):
    tr = _trainer()
    state = tr.init({"w": jnp.zeros(2)})
    c = ckpt.Checkpointer(tmp_path / "ck")
    c.save(1, state, {"n": 1})
    c.save(2, state, {"n": 2})
    c.close()
    host = tmp_path / "ck" / "2" / "host" / "metadata"
    host.write_text("{not json")
    notes = []
    reader = ckpt.Checkpointer(tmp_path / "ck", note=notes.append, read_only=True)
    assert reader.read_host()["n"] == 1 and reader.restore(state)[1]["n"] == 1
    assert notes == 2 * [(f"checkpoint 2 in {str(tmp_path / 'ck')!r} is unreadable: {str(host)!r} is not valid "
                          "JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); using "
                          "checkpoint 1")]
    _truncate(tmp_path / "ck", 1)
    with pytest.raises(ValueError) as err:
        reader.restore(state)
    assert str(err.value).startswith(f"checkpoint 2 in {str(tmp_path / 'ck')!r} is unreadable: {str(host)!r} is not "
                                     "valid JSON")
    assert str(err.value).endswith("(and no earlier checkpoint can be read)")
    reader.close()


# ---------------------------------------------------------------------- one writer per folder
def test_a_second_run_into_a_live_runs_folder_is_refused(capsys, tmp_path, cfg):
    out = tmp_path / "o"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen(_cli("train", "--config", str(cfg), "--out", str(out), "--set", "steps=1000000",
                                  "--no-progress"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        records = out / "metrics" / "local_sgd.jsonl"
        while not (records.exists() and records.stat().st_size):  # the live run holds the folder and trains
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)

        def still(folder):  # everything but the live run's own records, which grow while it trains
            return {k: v for k, v in _snapshot(folder).items() if not k.startswith("metrics" + os.sep)}

        names, before = set(_snapshot(out)), still(out)
        for argv in (["train", "--config", cfg, "--set", "steps=4"],
                     ["compare", "--algorithms", "local_sgd", "--steps", "4", "--tau", "2"]):
            code, table, err = _run(capsys, *argv, "--out", out, "--no-progress")
            assert code == 2 and table == "" and err.count("\n") == 1
            assert f"output folder {str(out)!r} is in use by another run (pid {first.pid} " in err
        assert still(out) == before and set(_snapshot(out)) == names
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock is stale: taken over, with one line
    code, _, err = _train(capsys, cfg, out, "--set", "steps=4")
    assert code == 0 and err.count("\n") == 1 and f"taking over output folder {str(out)!r}" in err
    assert sorted(os.listdir(out)) == sorted(_result_names() + ["metrics"])


def test_folder_lock_is_reentrant_records_its_holder_and_leaves_nothing(tmp_path):
    lock = tmp_path / files.LOCK_NAME
    with files.FolderLock(tmp_path):
        with files.FolderLock(f"{tmp_path}/../{tmp_path.name}"):  # the same folder, another spelling
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert lock.exists()
    assert not lock.exists()
    lock.write_text('{"pid": 1, "host": "h", "started": "then"}')  # left by a killed run
    notes = []
    with files.FolderLock(tmp_path, note=notes.append):
        pass
    assert notes == [f"taking over folder {str(tmp_path)!r} from a run that did not finish (pid 1 on h, started then)"]
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------- bad output paths
@pytest.mark.parametrize("kind", ["dangling symlink", "long name"])
def test_unusable_output_path_is_refused_before_training(capsys, monkeypatch, tmp_path, cfg, kind):
    _no_training(monkeypatch)
    if kind == "dangling symlink":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "gone" / "target")
        message = f"{str(out)!r} is a symbolic link to {str(tmp_path / 'gone' / 'target')!r}, which does not exist"
    else:
        out = tmp_path / ("x" * 300)
        message = "file name too long"
    for argv in (["train", "--config", cfg], ["compare", "--algorithms", "local_sgd", "--steps", "4", "--tau", "2"]):
        code, table, err = _run(capsys, *argv, "--out", out, "--no-progress")
        assert code == 2 and table == "" and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(["run.toml"] + (["link"] if kind != "long name" else []))


def test_diverged_run_with_checkpoints_leaves_only_its_metrics(capsys, tmp_path, cfg):
    out = tmp_path / "nested" / "o"
    code, _, err = _train(capsys, cfg, out, "--checkpoint-every", "8", "--set", "optimizer.lr=1e12")
    assert code == 1 and "diverged" in err
    assert os.listdir(out) == ["metrics"]  # no empty checkpoints/, no result set: the record of the run
    code, _, err = _train(capsys, cfg, tmp_path / "quiet" / "o", "--checkpoint-every", "8", "--set",
                          "optimizer.lr=1e12", "--metrics", "none")
    assert code == 1 and not (tmp_path / "quiet").exists()
