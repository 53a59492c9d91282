"""Joining a multi-process run (``jax.distributed``) so that every fault ends with a message.

``jax.distributed.initialize`` alone reacts to a missing or dying process by aborting the others
from C++ after its own timeouts (minutes by default, with a stack trace), and a coordinator port
already in use crashes process 0. :func:`join` puts a small watch channel beside it — a TCP
connection from every process to process 0 on the port after the coordinator's — and so:

- a coordinator port (or the watch port) that is taken is refused on process 0 before anything
  starts, naming the port;
- processes meet on the watch channel first: one that is missing after ``join_timeout`` seconds is
  named on every process that came, each of which raises ``ValueError`` (nothing has started);
- while the run goes, every process sends a heartbeat; a process that dies (its connection closes)
  or stops answering for ``peer_timeout`` seconds is reported on every survivor in one line on
  stderr, which then exits with code 1 — JAX's own heartbeat is set well beyond ``peer_timeout``,
  so this message comes first;
- :meth:`Cluster.leave` (or leaving the ``with`` block) ends the run in order: a process that has
  said goodbye is never reported as dead.

Example (one line per process, ``I`` = 0 … N−1)::

    with cluster.join("127.0.0.1:12345", num_processes=N, process_id=I) as c:
        ...  # build the trainer with backend="shard_map" and run
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time

from coopsgd.core.validate import require_int

__all__ = ["Cluster", "EXIT_PEER_LOST", "join"]

EXIT_PEER_LOST = 1
"""The exit code of a process whose run lost a peer."""

_BEAT, _BYE, _GO, _MISSING, _LOST = b"h", b"b", b"g", b"m", b"x"


def _address(coordinator: str) -> tuple[str, int]:
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"coordinator {coordinator!r} must be HOST:PORT with a port in 1..65534 (the watch "
                         "channel uses PORT + 1)")
    return host, int(port)


def _bind(host: str, port: int, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; a listener is not
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"the {what} port {host}:{port} is taken ({err.strerror}): another run or service "
                         "is using it; choose another coordinator port") from None
    return sock


class Cluster:
    """One process's membership of a run joined by :func:`join`: its ``process_id`` among
    ``num_processes``, and the watch channel's heartbeat thread."""

    def __init__(self, process_id: int, num_processes: int, peers: dict, peer_timeout: float):
        self.process_id, self.num_processes = process_id, num_processes
        self._peers = peers  # process id -> socket (all peers on process 0; {0: socket} elsewhere)
        self._timeout = peer_timeout
        self._left: set[int] = set()
        self._leaving = False
        self.lost: str | None = None
        self._thread = threading.Thread(target=self._watch, name="coopsgd-cluster-watch", daemon=True)
        self._thread.start()

    def _report(self, message: str, lost: int | None = None) -> None:
        """Say on stderr which process was lost, tell the others (from process 0), and exit."""
        self.lost = message
        if lost is not None and self.process_id == 0:
            for pid, sock in self._peers.items():
                if pid != lost:
                    try:
                        sock.sendall(_LOST + f"{lost};".encode())
                    except OSError:
                        pass
        print(" ".join(f"coopsgd: process {self.process_id} of {self.num_processes}: {message}".split()),
              file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def _watch(self) -> None:
        sel = selectors.DefaultSelector()
        for pid, sock in self._peers.items():
            sel.register(sock, selectors.EVENT_READ, pid)
        heard = {pid: time.monotonic() for pid in self._peers}
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat and not self._leaving:
                for pid, sock in self._peers.items():
                    if pid not in self._left:
                        try:
                            sock.sendall(_BEAT)
                        except OSError:
                            pass  # the read side reports it
                next_beat = now + self._timeout / 4
            for key, _ in sel.select(timeout=self._timeout / 8):
                pid = key.data
                try:
                    data = key.fileobj.recv(64)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    if pid not in self._left and not self._leaving:
                        self._report(f"process {pid} died (its connection closed); stopping the run", pid)
                    self._left.add(pid)
                    continue
                heard[pid] = time.monotonic()
                if _LOST in data:  # process 0 saw another process go
                    lost = data.split(_LOST, 1)[1].split(b";", 1)[0].decode(errors="replace")
                    self._report(f"process {lost} died or stopped answering (seen by process 0); stopping the run")
                if _BYE in data:
                    self._left.add(pid)
            if self._leaving and len(self._left) == len(self._peers):
                return
            silent = [p for p, t in heard.items() if p not in self._left and time.monotonic() - t > self._timeout]
            if silent and not self._leaving:
                self._report(f"process {silent[0]} stopped answering (no heartbeat for {self._timeout:g} s); "
                             "stopping the run", silent[0])

    def leave(self, timeout: float = 60.0) -> None:
        """Say goodbye on the watch channel, wait (up to ``timeout`` s) for the others' goodbyes,
        and shut ``jax.distributed`` down."""
        import jax

        self._leaving = True
        for sock in self._peers.values():
            try:
                sock.sendall(_BYE)
            except OSError:
                pass
        self._thread.join(timeout)
        for sock in self._peers.values():
            sock.close()
        jax.distributed.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None and self.lost is None:
            time.sleep(min(2.0, self._timeout))  # a collective that failed because a peer died: say so
        self.leave()


def join(coordinator: str, num_processes: int, process_id: int, *, join_timeout: float = 60.0,
         peer_timeout: float = 10.0, local_device_ids=None) -> Cluster:
    """Meet the other processes, then ``jax.distributed.initialize`` (see the module docstring).

    Args:
        coordinator: ``HOST:PORT`` of process 0 (the watch channel uses ``PORT + 1``).
        num_processes, process_id: this run's size and this process's place in it.
        join_timeout: seconds to wait for every process to arrive.
        peer_timeout: seconds without a heartbeat after which a process counts as lost.
        local_device_ids: passed to ``jax.distributed.initialize``.

    Raises:
        ValueError: a bad argument, a port taken, or a process that did not arrive in time.
    """
    n = require_int("num_processes", num_processes, 1)
    pid = require_int("process_id", process_id, 0)
    if pid >= n:
        raise ValueError(f"process_id = {pid} must be < num_processes = {n}")
    for name, value in (("join_timeout", join_timeout), ("peer_timeout", peer_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    host, port = _address(coordinator)
    peers = _meet_as_coordinator(host, port, n, join_timeout) if pid == 0 else \
        _meet_as_peer(host, port, n, pid, join_timeout)
    import jax

    jax.distributed.initialize(f"{host}:{port}", n, pid, local_device_ids=local_device_ids,
                               initialization_timeout=int(join_timeout) + 30,
                               heartbeat_timeout_seconds=int(3 * peer_timeout) + 30)
    return Cluster(pid, n, peers, peer_timeout)


def _meet_as_coordinator(host: str, port: int, n: int, timeout: float) -> dict:
    _bind(host, port, "coordinator").close()  # free now; JAX's service binds it next
    server = _bind(host, port + 1, "watch channel")
    server.listen(n)
    server.settimeout(0.2)
    peers: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(peers) < n - 1:
            if time.monotonic() > deadline:
                missing = ", ".join(str(i) for i in range(1, n) if i not in peers)
                for conn in peers.values():
                    try:
                        conn.sendall(_MISSING + missing.encode())
                    except OSError:
                        pass
                raise ValueError(f"process 0 of {n}: process(es) {missing} did not join the run at {host}:{port} "
                                 f"within {timeout:g} s")
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                claimed = int(conn.recv(16).decode().strip() or -1)
            except (OSError, ValueError):
                conn.close()
                continue
            if not 0 < claimed < n or claimed in peers:
                conn.close()
                raise ValueError(f"process 0 of {n}: a process claims process_id {claimed}, which is "
                                 f"{'taken' if claimed in peers else f'not in 1..{n - 1}'}")
            conn.settimeout(None)
            peers[claimed] = conn
        for conn in peers.values():
            conn.sendall(_GO)
    except BaseException:
        for conn in peers.values():
            conn.close()
        raise
    finally:
        server.close()
    return peers


def _meet_as_peer(host: str, port: int, n: int, pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port + 1), timeout=1.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise ValueError(f"process {pid} of {n}: no process 0 at {host}:{port} within {timeout:g} s "
                                 "(is it running, with this coordinator address?)") from None
            time.sleep(0.2)
    sock.sendall(f"{pid}\n".encode())
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        go = sock.recv(1)
        if go == _MISSING:
            missing = sock.recv(256).decode(errors="replace")
            sock.close()
            raise ValueError(f"process {pid} of {n}: the run at {host}:{port} could not start: process(es) "
                             f"{missing} did not join within the coordinator's timeout")
    except OSError:
        go = b""
    if go != _GO:
        sock.close()
        raise ValueError(f"process {pid} of {n}: process 0 at {host}:{port} did not start the run within "
                         f"{timeout:g} s (another process may be missing, or this process_id is taken)")
    sock.settimeout(None)
    return {0: sock}
