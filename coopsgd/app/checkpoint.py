"""Checkpoints of a run with orbax-checkpoint: the engine state and the host's bookkeeping.

A checkpoint at step ``k`` is a folder ``<dir>/<k>/`` holding two orbax items:

- ``state``: the arrays of the :class:`coopsgd.EngineState` — the workers' models, every
  worker's optimizer state, the mixer's state (e.g. the auxiliary columns), the step and round
  counters, and the PRNG key (saved as its raw ``key_data``);
- ``host``: JSON — the period schedule's position and state (``EngineState.period``, by value),
  and the caller's own bookkeeping (for a run: the configuration, the runtime clock, the history
  so far and the communication counters).

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save (SIGKILL included) leaves the previous checkpoints intact, and the next checkpointer on
the folder removes the leftover. A save that fails (a full disk) removes its temporary folder and
raises one ValueError; Ctrl-C during a save is held back until the save is complete.
:meth:`Checkpointer.restore` reads the latest complete checkpoint, and falls back to the previous
one (saying so through ``note``) when the latest cannot be read (a truncated file, garbage JSON).
Orbax's own log lines and tracebacks are kept off the terminal.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable

import jax
import numpy as np

from coopsgd.app.files import reason
from coopsgd.parallel.state import PeriodState

__all__ = ["Checkpointer", "find", "latest_step"]

_ORBAX_LOGGERS = ("absl", "asyncio", "orbax")


@contextlib.contextmanager
def _silenced():
    """No log records from orbax (absl) and asyncio inside the block: its errors come back as one
    ValueError instead of tracebacks on the terminal."""
    loggers = [logging.getLogger(name) for name in _ORBAX_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    except BaseException:
        _drop_orbax_leftovers()
        gc.collect()  # futures whose exceptions nobody read log them when collected: do it here
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_HOOK: list = []  # the unraisable hook in place before _drop_orbax_leftovers wrapped it


def _drop_orbax_leftovers() -> None:
    """After an orbax operation failed, the coroutines and threads it abandoned report their own
    copies of the error when they are collected ("Exception ignored in ..."), long after the one
    ValueError was raised: keep those off the terminal, and pass every other report on."""
    if _HOOK and sys.unraisablehook is _HOOK[1]:
        return

    def hook(unraisable):
        if not _from_orbax(unraisable):
            previous(unraisable)

    previous = sys.unraisablehook
    _HOOK[:] = [previous, hook]
    sys.unraisablehook = hook


def _from_orbax(unraisable) -> bool:
    where = [getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")]
    tb = unraisable.exc_traceback
    while tb is not None:
        where.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
    return closed_loop or any(f"{os.sep}orbax{os.sep}" in f or "tensorstore" in f for f in where)


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C back until the block ends, then deliver it: a save is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, caught[0])
        else:
            raise KeyboardInterrupt


def find(path) -> str:
    """The checkpoint folder for ``path``: ``path`` itself, or ``path/checkpoints`` if that holds them.

    Raises:
        ValueError: if neither holds a complete checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(candidate) and latest_step(candidate) is not None:
            return candidate
    raise ValueError(f"no complete checkpoint found in {os.fspath(path)!r} (nor in its checkpoints/ folder)")


def latest_step(directory) -> int | None:
    """The largest step with a complete checkpoint in ``directory``, or None."""
    steps = _complete_steps(directory)
    return max(steps) if steps else None


def _complete_steps(directory) -> list[int]:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(full) and os.path.isdir(os.path.join(full, "state")):
            if os.path.exists(os.path.join(full, "_CHECKPOINT_METADATA")):
                steps.append(int(name))
    return steps


def _remove_tmp(directory: str, step: int | None = None) -> None:
    """Remove orbax's temporary folders (of ``step``, or of every step) in ``directory``: saves that
    failed or were killed."""
    pattern = f"{'*' if step is None else int(step)}.orbax-checkpoint-tmp*"
    for tmp in glob.glob(os.path.join(glob.escape(directory), pattern)):
        shutil.rmtree(tmp, ignore_errors=True)


def _mismatch(err: Exception) -> bool:
    """Whether a restore failed because the template differs from the checkpoint (another run's
    shapes or structure), not because the checkpoint is damaged."""
    if isinstance(err, (KeyError, TypeError)):
        return True
    text = str(err).lower()
    return (type(err) is ValueError and err.__cause__ is None and "os_error_code" not in text
            and any(w in text for w in ("do not match", "shape", "structure", "mismatch")))


def _to_saveable(state):
    key = state.key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        key = jax.random.key_data(key)
    else:
        impl = None
    tree = {"params": state.params, "opt_state": state.opt_state, "mix_state": state.mix_state,
            "step": state.step, "rounds": state.rounds, "key": key}
    return tree, impl


def _period_json(period) -> dict:
    rule = period.rule
    return {"start": int(period.start), "tau": int(period.tau),
            "rule": rule._asdict() if hasattr(rule, "_asdict") else None}


class Checkpointer:
    """Save and restore a run's state in ``directory`` (kept: the ``max_to_keep`` latest);
    ``note(message)`` hears of an unreadable checkpoint skipped (default: a warning). A writer
    removes the temporary folders of saves that were killed; a ``read_only`` one touches nothing.

    Example::

        ck = Checkpointer("runs/x/checkpoints")
        ck.save(100, state, {"history": ...})
        state, host = ck.restore(template_state)
    """

    def __init__(self, directory, max_to_keep: int = 2, note: Callable[[str], None] | None = None,
                 read_only: bool = False):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.fspath(directory))
        self.note = note if note is not None else (lambda msg: warnings.warn(msg, stacklevel=3))
        self._ocp = ocp
        self._failed = False
        if not read_only:
            _remove_tmp(self.directory)
        try:
            with _silenced():
                self._manager = ocp.CheckpointManager(
                    self.directory,
                    options=ocp.CheckpointManagerOptions(
                        max_to_keep=max_to_keep, enable_async_checkpointing=False, read_only=read_only,
                        create=not read_only),
                    item_names=("state", "host"),
                )
        except Exception as err:
            raise ValueError(f"cannot open the checkpoint folder {self.directory!r}: {reason(err)}") from None

    def save(self, step: int, state, host: dict) -> None:
        """Save the engine ``state`` and the JSON-able ``host`` dict as checkpoint ``step`` (replacing
        an unreadable checkpoint of that step that :meth:`restore` fell back from).

        Raises:
            ValueError: the save failed (e.g. no space left on device); its temporary folder is
                removed and the earlier checkpoints are intact.
        """
        ocp = self._ocp
        step = int(step)
        tree, impl = _to_saveable(state)
        host = dict(host, key_impl=impl, period=_period_json(state.period))
        with _sigint_held():
            try:
                with _silenced():
                    if step in self._manager.all_steps():
                        self._manager.delete(step)
                    self._manager.save(step, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(tree), host=ocp.args.JsonSave(host)), force=True)
                    self._manager.wait_until_finished()
            except Exception as err:
                self._failed = True
                _remove_tmp(self.directory, step)
                kept = latest_step(self.directory)
                kept = f"the checkpoints up to step {kept} are intact" if kept is not None else "no earlier checkpoint"
                raise ValueError(f"cannot save checkpoint {step} in {self.directory!r}: {reason(err)}; {kept}") from None

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when there is none."""
        with _silenced():
            return self._manager.latest_step()

    def _steps(self, step: int | None) -> list[int]:
        """The steps to try, newest first: ``[step]``, or every complete checkpoint."""
        if step is not None:
            return [int(step)]
        steps = _complete_steps(self.directory)
        if not steps:
            raise ValueError(f"no complete checkpoint in {self.directory!r}")
        return sorted(steps, reverse=True)

    def _unreadable(self, step: int, err: Exception) -> str:
        if isinstance(err, json.JSONDecodeError):
            host = os.path.join(self.directory, str(step), "host")
            name = next((os.path.join(host, f) for f in sorted(os.listdir(host)) if f != "commit_success.txt"),
                        host) if os.path.isdir(host) else host
            return f"checkpoint {step} in {self.directory!r} is unreadable: {name!r} is not valid JSON ({err})"
        return f"checkpoint {step} in {self.directory!r} is unreadable: {reason(err)}"

    def _first_readable(self, steps: list[int], read: Callable[[int], object]):
        """``(step, read(step))`` for the newest step that reads, noting the ones skipped.

        A checkpoint that does not match the template (another run's) fails at every step alike; a
        damaged one fails alone, and the previous one is used."""
        failures = []
        for k in steps:
            try:
                with _silenced():
                    out = read(k)
            except Exception as err:
                failures.append((k, err))
                continue
            for j, err in failures:
                self.note(f"{self._unreadable(j, err)}; using checkpoint {k}")
            return k, out
        k, err = failures[0]
        if _mismatch(err):
            raise ValueError(f"checkpoint {k} in {self.directory!r} does not match this run: {reason(err)}")
        more = " (and no earlier checkpoint can be read)" if len(failures) > 1 else ""
        raise ValueError(self._unreadable(k, err) + more)

    def restore(self, template, schedule=None, step: int | None = None):
        """``(state, host)`` of checkpoint ``step`` (default: the latest readable one, noting any
        newer one that cannot be read), shaped like ``template`` (an EngineState from
        ``trainer.init``, which fixes the structure, shapes and dtypes); ``schedule`` (the
        algorithm's period schedule) restores an adaptive period's state from its saved value.

        Raises:
            ValueError: no readable checkpoint (naming the damaged file or the reason), or one whose
                arrays do not match the template.
        """
        ocp = self._ocp
        tree, _ = _to_saveable(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

        def read(k):
            out = self._manager.restore(k, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
            if not isinstance(out.host, dict):
                raise json.JSONDecodeError("not a JSON object", "", 0)
            return out

        step, out = self._first_readable(self._steps(step), read)
        restored, host = out.state, out.host
        key = restored["key"]
        if host.get("key_impl") is not None:
            key = jax.random.wrap_key_data(np.asarray(key), impl=host["key_impl"])
        saved = host.get("period") or {"start": 0, "tau": 0, "rule": None}
        if saved["rule"] is not None and schedule is None:
            raise ValueError(f"checkpoint {step} holds an adaptive period's state: pass the schedule "
                             "(algorithm.period) to restore it")
        rule = schedule.restore(saved["rule"]) if saved["rule"] is not None else template.period.rule
        state = type(template)(params=restored["params"], opt_state=restored["opt_state"],
                               mix_state=restored["mix_state"], step=restored["step"],
                               rounds=restored["rounds"], key=key,
                               period=PeriodState(int(saved["start"]), int(saved["tau"]), rule))
        return state, host

    def read_host(self, step: int | None = None) -> dict:
        """The ``host`` JSON of checkpoint ``step`` (default: the latest readable one), without the
        arrays."""
        ocp = self._ocp

        def read(k):
            host = self._manager.restore(k, args=ocp.args.Composite(host=ocp.args.JsonRestore())).host
            if not isinstance(host, dict):
                raise json.JSONDecodeError("not a JSON object", "", 0)
            return dict(host)

        return self._first_readable(self._steps(step), read)[1]

    def close(self) -> None:
        """Release orbax's resources (a manager whose save failed is closed quietly)."""
        try:
            with _silenced():
                self._manager.close()
        except Exception:
            if not self._failed:  # after a failed save the manager may fail again: that was reported
                raise
