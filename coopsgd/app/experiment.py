"""Experiments: the training run a configuration describes, with simulated time, evaluation,
checkpoints and resumption.

This is the runner behind ``coopsgd train`` and ``coopsgd compare``. A run trains a Flax model on
data split across simulated workers with one registered algorithm (:mod:`coopsgd.app.registry`) on
:class:`coopsgd.CooperativeSGD`, times every round with :mod:`coopsgd.sim.runtime`, evaluates every
``eval_every`` steps, and can save and resume checkpoints (:mod:`coopsgd.app.checkpoint`) — all
from one round hook of the trainer, with no training loop of its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from coopsgd.app import config, registry
from coopsgd.app.results import HISTORY_KEYS
from coopsgd.parallel.hooks import Hook, RoundEnd, Stop

__all__ = ["EVAL_MAX", "RunResult", "check_resume", "run"]

EVAL_MAX = 8192
"""Training examples the worker-averaged training loss is evaluated on (all of them up to this
many; beyond it a fixed seeded subset of this size)."""


class RunResult(dict):
    """One run: ``summary`` (final figures), ``history`` (evaluations), ``config``, ``state``.

    A dict with keys ``"name"``, ``"config"``, ``"summary"``, ``"history"``; the final engine state
    and trainer are attributes (not serialised).
    """

    state = None
    trainer = None


class _Run:
    """The state of one run between evaluations (everything a checkpoint must hold)."""

    def __init__(self, cfg: Mapping, dataset=None, name: str | None = None):
        import jax

        from coopsgd.app import data as data_mod
        from coopsgd.app import models
        from coopsgd.core import spectral
        from coopsgd.parallel.plan import tree_bytes
        from coopsgd.parallel.trainer import CooperativeSGD

        self.cfg = dict(cfg)
        self.name = name or cfg["algorithm"]
        ds = dataset if dataset is not None else data_mod.load(cfg["data"], cfg["test_fraction"], cfg["seed"])
        self.ds = ds
        m = cfg["workers"]
        shards = data_mod.split(ds.y_train, m, cfg["split"], cfg["dirichlet_alpha"], cfg["seed"])
        self.sampler = data_mod.WorkerSampler(ds.x_train, ds.y_train, shards, cfg["batch_size"], cfg["seed"])
        self.model = models.make(cfg["model"], ds.input_shape, max(ds.num_classes, 2))
        params0 = _initial_params(self.model, cfg["seed"])
        self.param_bytes = float(tree_bytes(params0))
        self.algorithm, entry = registry.build(cfg, self.param_bytes)
        self.overlap = entry.overlap
        self.period = self.algorithm.period
        # Whole rounds of a constant period fuse into one call; other periods run step by step
        # (two compiled programs whatever the periods are).
        fused = self.period.constant_tau is not None
        self.trainer = CooperativeSGD(self.algorithm, config.build_optimizer(cfg), models.loss_fn(self.model),
                                      backend=cfg["backend"], steps_per_call=256 if fused else 1,
                                      track_consensus=True,  # the history and metrics report it
                                      program_key=config.program_key(cfg))
        self.state = self.trainer.init(params0, seed=cfg["seed"])
        self.clock = config.build_runtime(cfg).clock(m)
        self.round_cache: dict = {"start": 0, "stamps": []}
        self.history: dict[str, list] = {k: [] for k in HISTORY_KEYS}
        self.mixings = 0
        self.bytes = 0.0
        self.real_time = 0.0
        self.metrics = None  # a coopsgd.app.metrics.MetricsWriter, set by run()
        keep = np.arange(len(ds.y_train))
        if len(keep) > EVAL_MAX:  # a fixed subset keeps evaluation cheap on large user data sets
            keep = np.sort(np.random.default_rng([cfg["seed"], 4]).permutation(len(keep))[:EVAL_MAX])
        self._x_train, self._y_train = jax.numpy.asarray(ds.x_train[keep]), jax.numpy.asarray(ds.y_train[keep])
        self._x_test, self._y_test = jax.numpy.asarray(ds.x_test), jax.numpy.asarray(ds.y_test)
        self._evaluator = _evaluator(self.model, self.algorithm.m)
        # the model the dynamics track: X π with W π = π (the column mean for a doubly stochastic
        # W, (1 − α) x̄ + α z for Overlap Local-SGD)
        n = self.algorithm.n
        pi = spectral.stationary(self.algorithm.W) if self.algorithm.is_static else np.full(n, 1.0 / n)
        self._weights = np.asarray(pi, np.float32)

    # -- simulated time ---------------------------------------------------------------------
    def _traffic(self, r: int):
        return self.trainer.communication(self.param_bytes, r)

    def _round_of(self, step: int, state) -> tuple[int, int, int]:
        """(index, start, end) of the round containing ``step`` (a static period's rounds, or the
        trainer's current round for an adaptive one)."""
        if self.period.adaptive:
            p = state.period
            return int(state.rounds) - (1 if int(state.step) == p.end else 0), p.start, p.end
        r = self.period.round_index(step)
        return r, self.period.round_start(r), self.period.round_start(r + 1)

    def time_through(self, end: int, state) -> None:
        """Time every round up to the one holding step ``end − 1`` (rounds timed whole, in order)."""
        cache = self.round_cache
        while cache["start"] + len(cache["stamps"]) < end:
            s = cache["start"] + len(cache["stamps"])
            r, start, stop = self._round_of(s, state)
            if start != s:
                raise AssertionError(f"rounds must be timed in order (step {s}, round start {start})")
            stamps = self.clock.round(s, stop - s, self._traffic(r), overlap=self.overlap, round_index=r)
            self.round_cache = cache = {"start": s, "stamps": [float(t) for t in stamps]}

    def time_at(self, step: int) -> float:
        """Simulated time when step ``step − 1`` finished (0 before the first step)."""
        cache = self.round_cache
        return cache["stamps"][step - 1 - cache["start"]] if step else 0.0

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, batch_loss: float | None, consensus: float) -> None:
        step = int(self.state.step)
        losses, acc = self._evaluator(self.trainer.columns(self.state), self._weights, self._x_train,
                                      self._y_train, self._x_test, self._y_test)
        losses = np.asarray(losses)
        acc = float(acc) if len(self.ds.y_test) else float("nan")
        p = self.state.period
        tau = p.tau or self.period.tau(p.rule, 0, 0)
        row = dict(step=step, time=float(self.time_at(step)), loss=float(np.mean(losses)),
                   batch_loss=None if batch_loss is None else float(batch_loss),
                   consensus=float(consensus), test_accuracy=float(acc), tau=int(tau))
        for k in HISTORY_KEYS:
            self.history[k].append(row[k])
        if self.metrics is not None:
            self.metrics.write("eval", dict(row, bytes=self.bytes))

    # -- the round hook -----------------------------------------------------------------------
    def on_round(self, end: RoundEnd, *, steps: int, checkpoint_every: int, saver, bar, stop_at, cancel,
                 real0: float, t_start: float):
        """Between rounds: simulated time, traffic, the adaptive period's observation, evaluation,
        checkpoint, progress, and stopping at ``stop_at`` or when ``cancel`` is set."""
        state, k0, k = end.state, end.start, end.step
        loss, comm, cons = (np.asarray(end.metrics.loss), np.asarray(end.metrics.communicated),
                            np.asarray(end.metrics.consensus))
        for i in np.flatnonzero(comm):
            self.mixings += 1
            self.bytes += self._traffic(self._round_of(k0 + int(i), state)[0]).total_bytes
            if self.metrics is not None:
                at = k0 + int(i) + 1
                self.time_through(at, state)  # rounds are timed in order: this one is now the latest
                self.metrics.write("round", {"step": at, "time": self.time_at(at), "batch_loss": float(loss[i]),
                                             "consensus": float(cons[i]), "bytes": self.bytes,
                                             "round": self.mixings})
        self.time_through(k, state)
        if self.period.adaptive and end.mixed:
            state = self.trainer.observe(state, loss=float(np.mean(loss)), time=self.time_at(k), step=k,
                                         consensus=float(cons[-1]))
        self.state = state
        last = (float(np.mean(loss)), float(np.mean(cons)))
        if bar is not None:
            bar.update(k - k0)
            bar.set_postfix(loss=f"{loss[-1]:.4f}", sim=f"{self.time_at(k):.2f}s")
        every = self.cfg["eval_every"]
        if k == steps or k // every > k0 // every:
            self.evaluate(*last)
        self.real_time = real0 + time.perf_counter() - t_start
        ck = checkpoint_every
        if saver is not None and (k == steps or (ck and k // ck > k0 // ck)):
            saver.save(k, state, self.host_state())
        if (stop_at is not None and k >= stop_at) or (cancel is not None and cancel.is_set()):
            return Stop(state)
        return state

    # -- host state for checkpoints --------------------------------------------------------------
    def host_state(self) -> dict:
        return {
            "config": self.cfg,
            "name": self.name,
            "clock": self.clock.state(),
            "round_cache": self.round_cache,
            "history": self.history,
            "mixings": self.mixings,
            "bytes": self.bytes,
            "real_time": self.real_time,
        }

    def restore_host(self, host: Mapping) -> None:
        self.clock.restore(host["clock"])
        self.round_cache = {"start": int(host["round_cache"]["start"]),
                            "stamps": [float(t) for t in host["round_cache"]["stamps"]]}
        self.history = {k: list(host["history"][k]) for k in HISTORY_KEYS}
        self.mixings = int(host["mixings"])
        self.bytes = float(host["bytes"])
        self.real_time = float(host["real_time"])


def _initial_params(model, seed: int):
    """``model.init`` from ``seed``'s key, computed once per process for every run that starts
    from it (a compare's runs all do; the arrays are never written to)."""
    key = (model.name, model.input_shape, repr(model.module), seed)
    if key not in _INITIAL:
        import jax

        _INITIAL[key] = model.init(jax.random.key(seed))
        while len(_INITIAL) > 4:
            _INITIAL.pop(next(iter(_INITIAL)))
    return _INITIAL[key]


_INITIAL: dict = {}


def _evaluator(model, m: int):
    """A jitted ``(columns, weights, x, y, x_test, y_test) -> (each worker's training loss, test
    accuracy of the model Σ_j weights_j · column_j)``, shared by every run of the same model and m
    (compiled once, in the process-wide cache of :mod:`coopsgd.parallel.programs`)."""
    import jax
    import jax.numpy as jnp

    from coopsgd.app import models
    from coopsgd.parallel import programs

    def build():
        loss = models.loss_fn(model)

        def evaluate(columns, weights, x, y, x_test, y_test):
            workers = jax.tree.map(lambda a: a[:m], columns)
            losses = jax.vmap(lambda p: loss(p, {"x": x, "y": y}))(workers)
            avg = jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1), columns)
            if x_test.shape[0] == 0:
                return losses, jnp.float32(jnp.nan)
            acc = jnp.mean(jnp.argmax(model.apply(avg, x_test), -1) == y_test)
            return losses, acc

        return jax.jit(evaluate)

    return programs.program(("evaluator", model.name, model.input_shape, repr(model.module), m), build)


def run(cfg: Mapping, *, name: str | None = None, dataset=None, progress: bool = False,
        checkpoint_dir=None, checkpoint_every: int = 0, resume=None, stop_at: int | None = None,
        note: Callable[[str], None] | None = None, metrics_dir=None, metrics: str = "both",
        cancel: threading.Event | None = None, position: int | None = None) -> RunResult:
    """Train the configured run and return its :class:`RunResult`.

    Args:
        cfg: a configuration from :func:`coopsgd.app.config.make_config`.
        name: label (default: the algorithm's name).
        dataset: a :class:`coopsgd.app.data.Dataset` to share between runs (default: load ``cfg["data"]``).
        progress: show a tqdm progress bar (batch loss, simulated time, steps/s) on stderr.
        checkpoint_dir: where :mod:`coopsgd.app.checkpoint` saves, every ``checkpoint_every`` steps
            and at the end.
        resume: a checkpoint folder to continue from (its latest readable checkpoint).
        stop_at: stop after this many steps (for tests of resumption; the history is partial).
        cancel: stop at the next round end once this event is set (runs going at once in threads
            stop together); the history is partial.
        position: the progress bar's line among the bars of runs going at once.
        note: called with one line when resuming skips an unreadable checkpoint (default: a warning).
        metrics_dir: where :mod:`coopsgd.app.metrics` writes the run's records while it goes
            (``metrics`` picks the formats: ``both``, ``jsonl``, ``tensorboard`` or ``none``).

    A checkpoint that cannot be saved (a full disk) stops the run with ValueError, the earlier
    checkpoints intact; a checkpoint folder this run created and left empty (it failed before its
    first save) is removed.

    The trainer calls one hook on a grid fixed by the configuration alone: with a constant period τ
    every *block* of ``τ · max(1, round(eval_every / τ))`` steps (whole rounds, fused into one
    compiled call); otherwise after every round (run step by step), when an adaptive period also
    observes the round's loss and simulated time. After a block that crosses a multiple of
    ``eval_every`` (and after the last) the run evaluates the worker-averaged loss on the whole
    training set, the test accuracy of the model ``X π`` the mixing preserves (``W π = π``: the
    average ``X 1/n`` for a doubly stochastic W) and the consensus distance; checkpoints are saved
    likewise after blocks that cross a multiple of ``checkpoint_every``. Since a resumed run makes
    the same compiled calls on the same inputs as an uninterrupted one, it ends bitwise-identical on
    CPU.
    """
    from coopsgd.app import checkpoint as ckpt

    t_start = time.perf_counter()
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every needs a checkpoint folder")
    r = _Run(cfg, dataset, name)
    steps = cfg["steps"]
    if resume is not None:
        reader = ckpt.Checkpointer(ckpt.find(resume), note=note, read_only=True)
        try:
            state, host = reader.restore(r.state, schedule=r.period)
        finally:
            reader.close()
        try:
            check_resume(cfg, host["config"])
            if int(state.step) > steps:
                raise ValueError(f"cannot resume: the checkpoint is at step {int(state.step)}, past steps = {steps}")
            r.state = state
            r.restore_host(host)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cannot resume from {reader.directory!r}: the checkpoint's host data lacks "
                             f"{err}") from None
    elif checkpoint_dir and ckpt.latest_step(checkpoint_dir) is not None:
        raise ValueError(
            f"checkpoint folder {checkpoint_dir!r} already holds another run's checkpoints (up to step "
            f"{ckpt.latest_step(checkpoint_dir)}); continue it with --resume or choose another --out"
        )
    made = bool(checkpoint_dir) and not os.path.isdir(checkpoint_dir)
    saver = ckpt.Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if metrics_dir is not None:
        from coopsgd.app.metrics import MetricsWriter

        r.metrics = MetricsWriter(metrics_dir, r.name, metrics, None if resume is None else int(r.state.step),
                                  note=note)
    if int(r.state.step) == 0 and not r.history["step"]:
        r.evaluate(batch_loss=None, consensus=0.0)
    bar = _progress(progress, steps, int(r.state.step), r.name, position)
    tau = r.period.constant_tau
    block = tau * max(1, round(cfg["eval_every"] / tau)) if tau is not None else None
    real0 = r.real_time

    def hook(end: RoundEnd):
        return r.on_round(end, steps=steps, checkpoint_every=checkpoint_every, saver=saver, bar=bar,
                          stop_at=stop_at, cancel=cancel, real0=real0, t_start=t_start)

    try:
        todo = steps - int(r.state.step)
        if todo > 0 and (stop_at is None or int(r.state.step) < stop_at):
            r.trainer.run(r.state, lambda k: r.sampler.batch(k), todo, hooks=[Hook(hook, every=block)])
    finally:
        if bar is not None:
            bar.close()
        if r.metrics is not None:
            r.metrics.close()
        if saver is not None:
            saver.close()
            if made and not os.listdir(checkpoint_dir):
                os.rmdir(checkpoint_dir)
    result = RunResult(name=r.name, config=dict(cfg), summary=_summary(r), history=r.history)
    result.state, result.trainer, result.model = r.state, r.trainer, r.model
    return result


def check_resume(cfg: Mapping, saved: Mapping) -> None:
    """Refuse to resume when the configuration differs from the checkpoint's (``steps`` may change
    unless a schedule is stretched over the run)."""
    stretched = config.stretched_over_steps(saved) or config.stretched_over_steps(cfg)
    if stretched and cfg.get("steps") != saved.get("steps"):
        raise ValueError(f"cannot resume with steps = {cfg.get('steps')!r}: the checkpoint's run has steps = "
                         f"{saved.get('steps')!r} and its {stretched}, so the steps already taken would change; "
                         "steps may change on resume only when nothing is stretched over the run (a constant "
                         "schedule, or a step schedule with optimizer.decay_every, and adacomm_interval set)")
    diff = [k for k in config.DEFAULTS if k != "out" and k != "steps" and cfg.get(k) != saved.get(k)]
    if diff:
        shown = ", ".join(f"{k} = {saved.get(k)!r} in the checkpoint but {cfg.get(k)!r} now" for k in diff[:3])
        raise ValueError(f"cannot resume: the configuration differs from the checkpoint's ({shown})")


def _progress(enabled: bool, total: int, initial: int, name: str, position: int | None = None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", leave=False, position=position)


def _summary(r: _Run) -> dict:
    h = r.history
    return {
        "algorithm": r.cfg["algorithm"],
        "steps": int(r.state.step),
        "final_train_loss": h["loss"][-1],
        "test_accuracy": h["test_accuracy"][-1],
        "comm_rounds": int(r.mixings),
        "bytes_communicated": float(r.bytes),
        "simulated_time": h["time"][-1],
        "real_time": float(r.real_time),
        "final_consensus": h["consensus"][-1],
        "zeta": _zeta(r.algorithm),
        "param_bytes": r.param_bytes,
    }


def _zeta(algorithm) -> float | None:
    try:
        return float(algorithm.zeta)
    except NotImplementedError:  # a schedule without a closed-form E[WᵀW]
        return None
