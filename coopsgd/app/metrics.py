"""Metrics a user can watch while a run goes: a JSON-lines file and TensorBoard event files.

Each run writes into ``OUT/metrics/``:

- ``<run>.jsonl``: one JSON object per line, flushed as it is written — ``{"kind": "round", ...}``
  after every mixing round and ``{"kind": "eval", ...}`` after every evaluation, each with the step,
  the simulated time (s), the loss, the test accuracy (evaluations), the consensus distance
  (1/m) Σᵢ‖xᵢ − x̄‖² and the bytes communicated so far;
- ``tensorboard/<run>/``: the same scalars as TensorBoard event files (written by ``tensorboardX``,
  no TensorFlow needed), against the step: ``tensorboard --logdir OUT/metrics/tensorboard``;
  synced to disk at every evaluation and at the end (a round's record waits for the next one).

A record that cannot be written (a full disk) is reported once and the run goes on without
metrics: they are a view of the run, never a reason to lose it.

A resumed run keeps the records up to its checkpoint's step and drops the later ones (the run
writes them again); TensorBoard is told the same with ``purge_step``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable

__all__ = ["KINDS", "MetricsWriter"]

KINDS = ("both", "jsonl", "tensorboard", "none")
"""What a run writes: both formats, one of them, or nothing."""

_SCALARS = ("loss", "batch_loss", "test_accuracy", "consensus", "time", "bytes", "tau")
"""The record keys written to TensorBoard as scalars."""


def _finite(value):
    """JSON has no NaN or Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Writes one run's records as they come (see the module docstring).

    Args:
        folder: ``OUT/metrics``; created if missing.
        name: the run's name (file and TensorBoard run name).
        kind: one of :data:`KINDS`.
        resume_step: the step a resumed run continues from (records past it are dropped); ``None``
            for a fresh run, which replaces any earlier records of the same name.
        note: told once, in one line, if the records cannot be written (a full disk): the run goes
            on without them (default: a warning).

    Records are written synchronously in the caller's thread, so a failure is seen where it happens.
    """

    def __init__(self, folder, name: str, kind: str = "both", resume_step: int | None = None,
                 note: Callable[[str], None] | None = None):
        if kind not in KINDS:
            raise ValueError(f"metrics must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self._note = note if note is not None else (lambda msg: warnings.warn(msg, stacklevel=3))
        self._file = self._tb = None
        self.path = None
        if kind == "none":
            return
        folder = os.fspath(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            if kind in ("both", "jsonl"):
                self.path = os.path.join(folder, f"{name}.jsonl")
                kept = _records_through(self.path, resume_step) if resume_step is not None else []
                with open(self.path + ".tmp", "w", encoding="utf-8") as f:  # replaced whole: a kill keeps one
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
                self._file = open(self.path, "a", encoding="utf-8")
            if kind in ("both", "tensorboard"):
                self._tb = _events(os.path.join(folder, "tensorboard", name), resume_step)
        except OSError as err:
            self._failed(err)

    def _failed(self, err: OSError) -> None:
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        self._note(f"metrics not written from here on ({err.strerror or err}{where}); the run goes on")
        self.close(quiet=True)

    def write(self, kind: str, record: dict) -> None:
        """Append one record (``kind`` is ``"round"`` or ``"eval"``); ``record["step"]`` is required."""
        try:
            if self._file is not None:
                line = {"kind": kind, **{k: _finite(v) for k, v in record.items()}}
                self._file.write(json.dumps(line) + "\n")
                self._file.flush()
            if self._tb is not None:
                from tensorboardX.proto import event_pb2, summary_pb2  # loaded once, with the writer

                values = [summary_pb2.Summary.Value(tag=f"{kind}/{key}", simple_value=float(record[key]))
                          for key in _SCALARS if _finite(record.get(key)) is not None]
                self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(record["step"]),
                                                     summary=summary_pb2.Summary(value=values)))
                if kind == "eval":  # tensorboardX syncs the file to disk on each flush: once per evaluation
                    self._tb.flush()
        except OSError as err:
            self._failed(err)

    def close(self, quiet: bool = False) -> None:
        """Flush and close the files (the records written so far stay)."""
        for handle in (self._file, self._tb):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    if not quiet:
                        raise
        self._file = self._tb = None


def _events(logdir: str, resume_step: int | None):
    """A TensorBoard event file in ``logdir`` (tensorboardX's synchronous writer). A fresh run
    clears the folder; a resumed one starts with a session-start event at ``resume_step + 1``, which
    makes TensorBoard purge the steps the run will write again."""
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    if resume_step is None and os.path.isdir(logdir):
        shutil.rmtree(logdir)
    os.makedirs(logdir, exist_ok=True)
    writer = EventsWriter(os.path.join(logdir, "events"))
    if resume_step is not None:
        writer.write_event(event_pb2.Event(step=resume_step + 1, wall_time=time.time(),
                                           session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    writer.flush()
    return writer


def _records_through(path: str, step: int) -> list[str]:
    """The lines of ``path`` whose record is at or before ``step`` (none if there is no file; a
    damaged trailing line from a killed run is dropped)."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept
