"""A real two-process run: 2 processes × 2 CPU devices, ``jax.distributed`` on 127.0.0.1; and its
faults — a coordinator port taken, a process missing, dying or stopped — each ending with one line
on every process there, in bounded time (``coopsgd.parallel.cluster``).

The example ``examples/multi_host.py`` launches the processes; here its result must equal the
same run on the simulate backend (local SGD, ring D-PSGD and EASGD, m = 8: two workers per device,
EASGD's anchor replicated on all four devices).
"""
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "multi_host.py"


def load_example():
    spec = importlib.util.spec_from_file_location("multi_host_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_equal_simulation():
    example = load_example()
    steps = 4
    multi = example.launch(steps, m=8, num_processes=2, local_devices=2)
    ref = example.simulate(steps, m=8)
    assert multi["devices"] == 4 and multi["local_devices"] == 2 and multi["process"] == 0
    for name in ("local_sgd", "ring_dpsgd", "easgd"):
        for key in ("w", "b", "loss"):
            np.testing.assert_allclose(multi[name][key], ref[name][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}/{key}")
    # EASGD keeps its anchor: 8 workers + 1 auxiliary column came back.
    assert len(multi["easgd"]["b"]) == 9
    # A 2-D mesh, one row per process: the workers span the processes, each model is sharded over
    # its process's 2 devices, and each process fed only its own 2 workers' batches.
    for name in ("grouped_local_sgd", "grouped_ring_dpsgd"):
        assert multi[name + "_fed_workers"] == [0, 1]
        assert multi[name + "_w1_spec"] == "P('workers', None, 'model')"
        for key in ("w1", "b1", "w2", "loss"):
            np.testing.assert_allclose(multi[name][key], ref[name][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}/{key}")


# -- faults: every process that is there ends with one line, in bounded time ------------------------

def _spawn(tmp_path, pid, n, port, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    log = open(tmp_path / f"p{pid}.log", "w")
    cmd = [sys.executable, str(EXAMPLE), "--worker", "--process-id", str(pid), "--num-processes", str(n),
           "--coordinator", f"127.0.0.1:{port}", "--local-devices", "1", "--m", str(2 * n),
           "--join-timeout", "3", "--peer-timeout", "3", "--out", str(tmp_path / "r.json"), *extra]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=90):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("a process hung instead of reporting the fault") from None


def _said(tmp_path, pid):
    lines = (tmp_path / f"p{pid}.log").read_text().splitlines()
    return [line for line in lines if line.startswith("coopsgd:")]


def test_a_taken_coordinator_port_is_refused(tmp_path):
    port = load_example().free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert _finish(_spawn(tmp_path, 0, 2, port)) == 2
    assert _said(tmp_path, 0) == [f"coopsgd: the coordinator port 127.0.0.1:{port} is taken (Address already in "
                                  "use): another run or service is using it; choose another coordinator port"]


def test_a_missing_process_is_named_on_the_ones_that_came(tmp_path):
    example = load_example()
    port = example.free_port()
    t0 = time.monotonic()
    assert _finish(_spawn(tmp_path, 0, 3, port)) == 2  # processes 1 and 2 never start
    assert time.monotonic() - t0 < 60
    assert _said(tmp_path, 0) == [f"coopsgd: process 0 of 3: process(es) 1, 2 did not join the run at "
                                  f"127.0.0.1:{port} within 3 s"]
    port = example.free_port()
    assert _finish(_spawn(tmp_path, 1, 2, port)) == 2  # no process 0
    assert _said(tmp_path, 1) == [f"coopsgd: process 1 of 2: no process 0 at 127.0.0.1:{port} within 3 s (is it "
                                  "running, with this coordinator address?)"]


def test_a_dying_process_is_reported_by_every_survivor(tmp_path):
    port = load_example().free_port()
    pace = ("--steps", "2000", "--round-sleep", "0.05")
    procs = [_spawn(tmp_path, 0, 3, port, *pace), _spawn(tmp_path, 1, 3, port, *pace),
             _spawn(tmp_path, 2, 3, port, *pace, "--die-at", "20")]
    codes = [_finish(p) for p in procs]
    assert codes == [1, 1, 9]
    assert _said(tmp_path, 0) == ["coopsgd: process 0 of 3: process 2 died (its connection closed); stopping the run"]
    assert _said(tmp_path, 1) == ["coopsgd: process 1 of 3: process 2 died or stopped answering (seen by "
                                  "process 0); stopping the run"]


def test_a_process_that_stops_answering_is_reported(tmp_path):
    port = load_example().free_port()
    pace = ("--steps", "4000", "--round-sleep", "0.05")
    procs = [_spawn(tmp_path, 0, 2, port, *pace), _spawn(tmp_path, 1, 2, port, *pace)]
    deadline = time.monotonic() + 90
    while "Gloo" not in (tmp_path / "p1.log").read_text():  # the run has started
        assert time.monotonic() < deadline and procs[1].poll() is None, (tmp_path / "p1.log").read_text()
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive, but silent
    t0 = time.monotonic()
    try:
        assert _finish(procs[0]) == 1
        assert time.monotonic() - t0 < 3 + 10  # the peer timeout and a margin
    finally:
        procs[1].kill()
        procs[1].wait()
    assert _said(tmp_path, 0) == ["coopsgd: process 0 of 2: process 1 stopped answering (no heartbeat for 3 s); "
                                  "stopping the run"]


def test_join_refuses_bad_arguments_before_any_network():
    import pytest

    from coopsgd.parallel import cluster

    for kwargs, message in [
        (dict(coordinator="localhost", num_processes=2, process_id=0), "must be HOST:PORT"),
        (dict(coordinator="127.0.0.1:65535", num_processes=2, process_id=0), "port in 1..65534"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "process_id = 2 must be < num_processes = 2"),
        (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), "num_processes"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=0, peer_timeout=0), "peer_timeout must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            cluster.join(**kwargs)
