"""Checkpoints of a run with orbax-checkpoint: the engine state and the host's bookkeeping.

A checkpoint at step ``k`` is a folder ``<dir>/<k>/`` holding two orbax items:

- ``state``: the arrays of the :class:`coopsgd.EngineState` — the workers' models, every
  worker's optimizer state, the mixer's state (e.g. the auxiliary columns), the step and round
  counters, and the PRNG key (saved as its raw ``key_data``);
- ``host``: JSON — the period schedule's position and state (``EngineState.period``, by value),
  and the caller's own bookkeeping (for a run: the configuration, the runtime clock, the history
  so far and the communication counters).

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save (SIGKILL included) leaves the previous checkpoints intact; :meth:`Checkpointer.restore`
reads the latest complete one.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from coopsgd.parallel.state import PeriodState

__all__ = ["Checkpointer", "find", "latest_step"]


def _quiet():
    logging.getLogger("absl").setLevel(logging.ERROR)


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
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = []
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(full) and os.path.isdir(os.path.join(full, "state")):
            if os.path.exists(os.path.join(full, "_CHECKPOINT_METADATA")):
                steps.append(int(name))
    return max(steps) if steps else None


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
    """Save and restore a run's state in ``directory`` (kept: the ``max_to_keep`` latest).

    Example::

        ck = Checkpointer("runs/x/checkpoints")
        ck.save(100, state, {"history": ...})
        state, host = ck.restore(template_state)
    """

    def __init__(self, directory, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        _quiet()
        self.directory = os.path.abspath(os.fspath(directory))
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                                 create=True),
            item_names=("state", "host"),
        )

    def save(self, step: int, state, host: dict) -> None:
        """Save the engine ``state`` and the JSON-able ``host`` dict as checkpoint ``step``."""
        ocp = self._ocp
        tree, impl = _to_saveable(state)
        host = dict(host, key_impl=impl, period=_period_json(state.period))
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), host=ocp.args.JsonSave(host)), force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, template, schedule=None, step: int | None = None):
        """``(state, host)`` of checkpoint ``step`` (default: the latest), shaped like ``template``
        (an EngineState from ``trainer.init``, which fixes the structure, shapes and dtypes);
        ``schedule`` (the algorithm's period schedule) restores an adaptive period's state from
        its saved value.

        Raises:
            ValueError: no checkpoint, or one whose arrays do not match the template.
        """
        ocp = self._ocp
        step = self._manager.latest_step() if step is None else int(step)
        if step is None:
            raise ValueError(f"no complete checkpoint in {self.directory!r}")
        tree, _ = _to_saveable(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            raise ValueError(f"checkpoint {step} in {self.directory!r} does not match this run: {err}") from None
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
        """The ``host`` JSON of checkpoint ``step`` (default: the latest), without the arrays."""
        ocp = self._ocp
        step = self._manager.latest_step() if step is None else int(step)
        if step is None:
            raise ValueError(f"no complete checkpoint in {self.directory!r}")
        return dict(self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore())).host)

    def close(self) -> None:
        self._manager.close()
