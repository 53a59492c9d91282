"""Experiments: a validated configuration, the training run it describes, and its results folder.

This is the runner behind ``coopsgd train`` and ``coopsgd compare``. A configuration is a flat
mapping of dotted keys (``"optimizer.lr"``), read from TOML tables and ``--set key=value``
overrides; :data:`DEFAULTS` lists every key. A run trains a Flax model on data split across
simulated workers with one algorithm A(τ, W, v) on :class:`coopsgd.engine.CooperativeSGD`, times
every iteration with :mod:`coopsgd.runtime`, evaluates every ``eval_every`` steps, and can save and
resume checkpoints (:mod:`coopsgd.checkpoint`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import tomllib
from collections.abc import Callable, Mapping

import numpy as np

from coopsgd.files import atomic_write, to_json, writable_folder

__all__ = [
    "DEFAULTS",
    "ALGORITHMS",
    "available_algorithms",
    "flatten",
    "parse_override",
    "make_config",
    "load_toml",
    "build_algorithm",
    "build_optimizer",
    "build_runtime",
    "RunResult",
    "run",
    "prepare_out",
    "write_results",
    "format_table",
]

# ------------------------------------------------------------------------------------ config

DEFAULTS: dict[str, object] = {
    "algorithm": "local_sgd",
    "workers": 8,
    "tau": 8,
    "topology": "ring",
    "weights": "metropolis",
    "mixing_alpha": None,  # EASGD's alpha (default 2/(m+2)), Overlap Local-SGD's alpha (default 0.5)
    "budget": 0.5,  # MATCHA's communication budget C_b
    "adacomm_tau0": None,  # default: 2 * tau
    "adacomm_interval": None,  # simulated seconds; default: a tenth of the estimated run time
    "steps": 400,
    "batch_size": 16,
    "backend": "simulate",
    "seed": 0,
    "model": "mlp",
    "data": "digits",
    "split": "iid",
    "dirichlet_alpha": 0.5,
    "test_fraction": 0.2,
    "eval_every": 16,
    "out": "runs/train",
    "optimizer.name": "sgd",
    "optimizer.lr": 0.1,
    "optimizer.momentum": 0.9,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "optimizer.decay_factor": 0.1,
    "optimizer.decay_every": 0,
    "runtime.compute": "shifted_exponential",
    "runtime.compute_time": 0.01,
    "runtime.compute_extra": 0.0025,
    "runtime.straggler_prob": 0.0,
    "runtime.straggler_slowdown": 5.0,
    "runtime.comm": "network",
    "runtime.comm_time": 0.02,
    "runtime.latency": 0.001,
    "runtime.bandwidth": 2.0e6,
}
"""Every configuration key with its default. Units: simulated seconds, bytes per second."""

_CHOICES = {
    "backend": ("simulate", "pmap", "shard_map"),
    "split": ("iid", "dirichlet"),
    "model": ("mlp", "cnn"),
    "optimizer.name": ("sgd", "momentum", "nesterov", "adam"),
    "optimizer.schedule": ("constant", "cosine", "step", "warmup_cosine"),
    "runtime.compute": ("constant", "exponential", "shifted_exponential"),
    "runtime.comm": ("network", "constant", "random"),
}
_INT32_MAX = 2**31 - 1
_INTS = {"workers": 1, "steps": 1, "batch_size": 1, "seed": 0, "eval_every": 1,
         "optimizer.warmup_steps": 0, "optimizer.decay_every": 0, "adacomm_tau0": 1}
_POSITIVE = {"optimizer.lr", "dirichlet_alpha", "runtime.compute_time", "runtime.straggler_slowdown",
             "runtime.bandwidth", "adacomm_interval", "budget"}
_NONNEG = {"runtime.compute_extra", "runtime.comm_time", "runtime.latency", "optimizer.momentum",
           "runtime.straggler_prob", "optimizer.decay_factor"}
_STRINGS = {"algorithm", "topology", "weights", "data", "out"}


def _algorithm_table() -> dict[str, str]:
    return {
        "fully_sync": "fully synchronous SGD (tau = 1, W = J)",
        "local_sgd": "local SGD / periodic averaging (tau steps, then W = J)",
        "easgd": "elastic averaging SGD with an anchor (v = 1), tau local steps",
        "dpsgd": "D-PSGD: neighbour averaging on the topology after every step",
        "decentralized_periodic": "tau local steps, then one neighbour averaging",
        "overlap_local_sgd": "Overlap Local-SGD: anchor pull-back, communication hidden behind compute",
        "matcha": "MATCHA: random matchings of the topology under a communication budget",
        "adacomm": "AdaComm: local SGD whose tau shrinks with the training loss (wall-clock intervals)",
    }


ALGORITHMS = _algorithm_table()
"""Algorithm names the command line knows, with a one-line description."""


def available_algorithms() -> list[str]:
    """The names in :data:`ALGORITHMS`."""
    return list(ALGORITHMS)


def flatten(table: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested TOML tables → dotted keys: ``{"optimizer": {"lr": 0.1}}`` → ``{"optimizer.lr": 0.1}``."""
    out: dict[str, object] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def parse_override(text: str) -> tuple[str, object]:
    """``"key=value"`` → ``(key, value)``; the value is read as a TOML value (``0.1``, ``true``,
    ``"x"``, ``[1, 2]``) and otherwise kept as a bare string (``ring``)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ValueError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_toml(path) -> dict[str, object]:
    """Read a TOML file into dotted keys (not yet validated)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            return flatten(tomllib.load(f))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path!r} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path!r} is not valid TOML: {err}") from None


def _check_tau(value):
    """τ: an integer >= 1, or piecewise ``[[start_step, tau], ...]`` starting at step 0."""
    if isinstance(value, list):
        from coopsgd import schedules

        try:
            pairs = [tuple(p) for p in value]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("each entry must be [start_step, tau]")
            schedules.piecewise(pairs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tau as a schedule must be [[0, tau0], [start, tau], ...]: {err}") from None
        return [[int(a), int(b)] for a, b in pairs]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"tau must be an integer >= 1 or a list [[0, tau0], [start, tau], ...], got {value!r}")
    return int(value)


def _check_value(key: str, value):
    if key == "tau":
        return _check_tau(value)
    if key in _INTS:
        if value is None and key == "adacomm_tau0":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < _INTS[key]:
            raise ValueError(f"{key} must be an integer >= {_INTS[key]}, got {value!r}")
        if value > _INT32_MAX:  # the engine's step counter is int32
            raise ValueError(f"{key} must be at most {_INT32_MAX}, got {value!r}")
        return int(value)
    if key in _POSITIVE or key in _NONNEG or key == "mixing_alpha" or key == "test_fraction":
        if value is None and key in ("mixing_alpha", "adacomm_interval"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        value = float(value)
        if key in _POSITIVE and value <= 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")
        if key in _NONNEG and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
        if key == "test_fraction" and not 0.0 <= value < 1.0:
            raise ValueError(f"test_fraction must lie in [0, 1), got {value!r}")
        return value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(_CHOICES[key])}")
        return value
    if key in _STRINGS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover


def make_config(*layers: Mapping) -> dict[str, object]:
    """Defaults overlaid by each layer of dotted keys in turn, every value validated.

    Raises:
        ValueError: an unknown key (listing the valid ones), a value of the wrong type or range, or
            an unknown algorithm / topology / weight rule name (listing the valid names).
    """
    cfg = dict(DEFAULTS)
    for layer in layers:
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(DEFAULTS)}")
            cfg[key] = value
    for key in DEFAULTS:
        cfg[key] = _check_value(key, cfg[key])
    valid = available_algorithms()
    if cfg["algorithm"] not in valid:
        raise ValueError(f"unknown algorithm {cfg['algorithm']!r}; valid algorithms: {', '.join(valid)}")
    from coopsgd import mixing, topology

    if cfg["topology"] not in topology.TOPOLOGIES:
        raise ValueError(f"unknown topology {cfg['topology']!r}; valid names: {', '.join(topology.TOPOLOGIES)}")
    rules = [*mixing.WEIGHT_RULES, *(f"lazy_{r}" for r in mixing.WEIGHT_RULES)]
    if cfg["weights"] not in rules:
        raise ValueError(f"unknown weight rule {cfg['weights']!r}; valid rules: {', '.join(rules)}")
    return cfg


# --------------------------------------------------------------------------------- builders


def build_algorithm(cfg: Mapping, param_bytes: float = 0.0):
    """``(Algorithm, overlap)`` for the configuration; ``overlap`` says whether its communication
    runs behind computation in the runtime model (Overlap Local-SGD)."""
    import coopsgd
    from coopsgd import topology

    name, m, tau = cfg["algorithm"], cfg["workers"], cfg["tau"]
    if isinstance(tau, list):
        if name in ("fully_sync", "dpsgd", "matcha", "adacomm"):
            raise ValueError(f"a tau schedule does not apply to {name} (its period is fixed or adaptive)")
        tau = coopsgd.schedules.piecewise([tuple(p) for p in tau])
    graph = None
    if name in ("dpsgd", "decentralized_periodic", "matcha"):
        if m < 2:
            raise ValueError(f"{name} needs workers >= 2 to have a graph, got workers = {m} (pick other algorithms with --algorithms)")
        graph = topology.by_name(cfg["topology"], m)
    if name == "fully_sync":
        return coopsgd.fully_sync(m), False
    if name == "local_sgd":
        return coopsgd.local_sgd(m, tau), False
    if name == "easgd":
        return coopsgd.easgd(m, tau, cfg["mixing_alpha"]), False
    if name == "dpsgd":
        return coopsgd.dpsgd(graph, cfg["weights"]), False
    if name == "decentralized_periodic":
        return coopsgd.decentralized_periodic(graph, tau, cfg["weights"]), False
    if name == "overlap_local_sgd":
        alpha = 0.5 if cfg["mixing_alpha"] is None else cfg["mixing_alpha"]
        return coopsgd.overlap_local_sgd(m, tau, alpha), True
    if name == "matcha":
        return coopsgd.matcha(graph, cfg["budget"], seed=cfg["seed"]), False
    if name == "adacomm":
        from coopsgd import adaptive, runtime

        tau0 = cfg["adacomm_tau0"] or 2 * tau
        interval = cfg["adacomm_interval"]
        if interval is None:
            model = build_runtime(cfg)
            mean = model.compute.mean or cfg["runtime.compute_time"]
            d = _expected_delay(cfg, runtime.mixing_traffic(coopsgd.mixing.averaging(m), param_bytes))
            interval = cfg["steps"] * (mean + d / tau0) / 10.0
        schedule = adaptive.adacomm(tau0, interval, lr_schedule=build_lr_schedule(cfg))
        algo = coopsgd.Algorithm(coopsgd.mixing.averaging(m), tau=schedule, name="adacomm")
        return algo, False
    raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(available_algorithms())}")


def _expected_delay(cfg: Mapping, traffic) -> float:
    if cfg["runtime.comm"] == "network":
        return traffic.messages * cfg["runtime.latency"] + traffic.critical_bytes / cfg["runtime.bandwidth"]
    return cfg["runtime.comm_time"]


def build_lr_schedule(cfg: Mapping) -> Callable[[int], float]:
    """The learning-rate schedule ``step -> η`` (an optax schedule)."""
    import optax

    lr, steps, kind = cfg["optimizer.lr"], cfg["steps"], cfg["optimizer.schedule"]
    warm = cfg["optimizer.warmup_steps"]
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, max(steps, 1))
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(steps, warm + 1))
    every = cfg["optimizer.decay_every"] or max(steps // 3, 1)
    return optax.exponential_decay(lr, every, cfg["optimizer.decay_factor"], staircase=True)


def build_optimizer(cfg: Mapping):
    """The per-worker optax optimizer."""
    import optax

    sched = build_lr_schedule(cfg)
    name = cfg["optimizer.name"]
    if name == "sgd":
        return optax.sgd(sched)
    if name == "momentum":
        return optax.sgd(sched, momentum=cfg["optimizer.momentum"])
    if name == "nesterov":
        return optax.sgd(sched, momentum=cfg["optimizer.momentum"], nesterov=True)
    return optax.adam(sched)


def build_runtime(cfg: Mapping):
    """The :class:`coopsgd.runtime.RuntimeModel` of the configuration (seeded by ``seed``)."""
    from coopsgd import runtime as rt

    t = cfg["runtime.compute_time"]
    kind = cfg["runtime.compute"]
    if kind == "constant":
        compute = rt.constant(t)
    elif kind == "exponential":
        compute = rt.exponential(t)
    else:
        compute = rt.shifted_exponential(t, cfg["runtime.compute_extra"])
    if cfg["runtime.straggler_prob"] > 0:
        compute = rt.with_stragglers(compute, cfg["runtime.straggler_prob"], cfg["runtime.straggler_slowdown"])
    comm = cfg["runtime.comm"]
    if comm == "network":
        delay = rt.network(cfg["runtime.latency"], cfg["runtime.bandwidth"])
    elif comm == "constant":
        delay = rt.constant_delay(cfg["runtime.comm_time"])
    else:
        delay = rt.random_delay(cfg["runtime.comm_time"]) if cfg["runtime.comm_time"] > 0 else rt.constant_delay(0.0)
    return rt.RuntimeModel(compute, delay, seed=cfg["seed"])


# ------------------------------------------------------------------------------------ runs


class RunResult(dict):
    """One run: ``summary`` (final figures), ``history`` (evaluations), ``config``, ``state``.

    A dict with keys ``"name"``, ``"config"``, ``"summary"``, ``"history"``; the final engine state
    and trainer are attributes (not serialised).
    """

    state = None
    trainer = None


HISTORY_KEYS = ("step", "time", "loss", "batch_loss", "consensus", "test_accuracy", "tau")
"""Columns of a run's history, one row per evaluation (step 0, then after each block that crosses a
multiple of ``eval_every``, and at the end): ``time`` simulated seconds; ``loss`` the worker-averaged
loss on the whole training set (at most ``EVAL_MAX`` examples of it); ``batch_loss`` and ``consensus`` the means over the block's steps of
the mini-batch loss and of the consensus distance (1/m) Σ‖x_i − x̄‖² after each step; ``test_accuracy``
of the model ``X π`` the mixing preserves (the column average for a doubly stochastic W); ``tau``
the period in force."""


EVAL_MAX = 8192
"""Training examples the worker-averaged training loss is evaluated on (all of them up to this
many; beyond it a fixed seeded subset of this size)."""


def _param_bytes(params) -> float:
    import jax

    return float(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


class _Run:
    """The state of one run between evaluations (everything a checkpoint must hold)."""

    def __init__(self, cfg: Mapping, dataset=None, name: str | None = None):
        import jax

        from coopsgd import data as data_mod
        from coopsgd import models
        from coopsgd.engine import CooperativeSGD

        self.cfg = dict(cfg)
        self.name = name or cfg["algorithm"]
        ds = dataset if dataset is not None else data_mod.load(cfg["data"], cfg["test_fraction"], cfg["seed"])
        self.ds = ds
        m = cfg["workers"]
        shards = data_mod.split(ds.y_train, m, cfg["split"], cfg["dirichlet_alpha"], cfg["seed"])
        self.sampler = data_mod.WorkerSampler(ds.x_train, ds.y_train, shards, cfg["batch_size"], cfg["seed"])
        self.model = models.make(cfg["model"], ds.input_shape, max(ds.num_classes, 2))
        params0 = self.model.init(jax.random.key(cfg["seed"]))
        self.param_bytes = _param_bytes(params0)
        self.algorithm, self.overlap = build_algorithm(cfg, self.param_bytes)
        self.lr_schedule = build_lr_schedule(cfg)
        self.loss = models.loss_fn(self.model)
        self.trainer = CooperativeSGD(self.algorithm, build_optimizer(cfg), self.loss, backend=cfg["backend"])
        self.state = self.trainer.init(params0, seed=cfg["seed"])
        self.runtime = build_runtime(cfg)
        self.clock = self.runtime.clock(m)
        self.round_cache: dict = {"start": 0, "stamps": []}
        self.history: dict[str, list] = {k: [] for k in HISTORY_KEYS}
        self.mixings = 0
        self.bytes = 0.0
        self.real_time = 0.0
        self._last = (None, 0.0)
        keep = np.arange(len(ds.y_train))
        if len(keep) > EVAL_MAX:  # a fixed subset keeps evaluation cheap on large user data sets
            keep = np.sort(np.random.default_rng([cfg["seed"], 4]).permutation(len(keep))[:EVAL_MAX])
        self._x_train, self._y_train = jax.numpy.asarray(ds.x_train[keep]), jax.numpy.asarray(ds.y_train[keep])
        self._x_test, self._y_test = jax.numpy.asarray(ds.x_test), jax.numpy.asarray(ds.y_test)
        self._evaluator = _evaluator(self.model, self.algorithm.m)
        # the model the dynamics track: X π with W π = π (the column mean for a doubly stochastic
        # W, (1 − α) x̄ + α z for Overlap Local-SGD)
        from coopsgd import mixing

        n = self.algorithm.n
        pi = mixing.stationary(self.algorithm.W) if self.algorithm.is_static else np.full(n, 1.0 / n)
        self._weights = np.asarray(pi, np.float32)

    # -- simulated time ---------------------------------------------------------------------
    def _traffic(self, r: int):
        from coopsgd import runtime as rt

        return rt.traffic_from(self.trainer.communication(self.param_bytes, r), self.algorithm.m)

    def times(self, start: int, count: int) -> np.ndarray:
        """Simulated finishing time of steps ``start … start+count−1`` (rounds timed whole, in order)."""
        period = self.algorithm.period
        out = []
        k = start
        while k < start + count:
            cache = self.round_cache
            if not (cache["start"] <= k < cache["start"] + len(cache["stamps"])):
                r = period.round_index(k)
                s, e = period.round_start(r), period.round_start(r + 1)
                if s != cache["start"] + len(cache["stamps"]) or k != s:
                    raise AssertionError(f"rounds must be timed in order (step {k}, round start {s})")
                traffic = self._traffic(r) if self.algorithm.communicates(e - 1) else None
                stamps = self.clock.round(s, e - s, traffic, overlap=self.overlap, round_index=r)
                self.round_cache = cache = {"start": s, "stamps": [float(t) for t in stamps]}
            take = min(start + count - k, cache["start"] + len(cache["stamps"]) - k)
            out.extend(cache["stamps"][k - cache["start"]: k - cache["start"] + take])
            k += take
        return np.asarray(out)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, batch_loss: float | None, consensus: float) -> None:
        step = int(self.state.step)
        losses, acc = self._evaluator(self.trainer.columns(self.state), self._weights, self._x_train,
                                      self._y_train, self._x_test, self._y_test)
        losses = np.asarray(losses)
        acc = float(acc) if len(self.ds.y_test) else float("nan")
        period = self.algorithm.period
        tau = period.constant_tau or period.tau_at(period.round_start(period.round_index(max(step - 1, 0))))
        t = self.round_cache["stamps"][step - 1 - self.round_cache["start"]] if step else 0.0
        row = dict(step=step, time=float(t), loss=float(np.mean(losses)), batch_loss=None if batch_loss is None else float(batch_loss),
                   consensus=float(consensus), test_accuracy=float(acc), tau=int(tau))
        for k in HISTORY_KEYS:
            self.history[k].append(row[k])

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
            "schedule": _schedule_state(self.algorithm.period),
        }

    def restore_host(self, host: Mapping) -> None:
        self.clock.restore(host["clock"])
        self.round_cache = {"start": int(host["round_cache"]["start"]),
                            "stamps": [float(t) for t in host["round_cache"]["stamps"]]}
        self.history = {k: list(host["history"][k]) for k in HISTORY_KEYS}
        self.mixings = int(host["mixings"])
        self.bytes = float(host["bytes"])
        self.real_time = float(host["real_time"])
        _restore_schedule(self.algorithm.period, host["schedule"])


_EVALUATORS: dict = {}


def _evaluator(model, m: int):
    """A jitted ``(columns, weights, x, y, x_test, y_test) -> (each worker's training loss, test
    accuracy of the model Σ_j weights_j · column_j)``, shared by every run of the same model and m
    (compiled once)."""
    import jax
    import jax.numpy as jnp

    from coopsgd import models

    key = (model.name, model.input_shape, repr(model.module), m)
    if key not in _EVALUATORS:
        loss = models.loss_fn(model)

        def evaluate(columns, weights, x, y, x_test, y_test):
            workers = jax.tree.map(lambda a: a[:m], columns)
            losses = jax.vmap(lambda p: loss(p, {"x": x, "y": y}))(workers)
            avg = jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1), columns)
            if x_test.shape[0] == 0:
                return losses, jnp.float32(jnp.nan)
            acc = jnp.mean(jnp.argmax(model.apply(avg, x_test), -1) == y_test)
            return losses, acc

        _EVALUATORS[key] = jax.jit(evaluate)
    return _EVALUATORS[key]


def _schedule_state(period) -> dict:
    """What a period schedule has decided so far: its round ends and, for adaptive schedules, their
    JSON-able attributes (int-keyed dicts as pairs)."""
    state = {"ends": list(getattr(period, "_ends", []))}
    attrs = {}
    for key, value in vars(period).items():
        if key in ("_ends", "_tau_fn", "lr_schedule") or callable(value):
            continue
        if isinstance(value, dict):
            attrs[key] = {"__pairs__": [[k, v] for k, v in value.items()]}
        elif isinstance(value, (int, float, str, list, type(None), bool)):
            attrs[key] = value
    state["attrs"] = attrs
    return state


def _restore_schedule(period, state: Mapping) -> None:
    if hasattr(period, "_ends"):
        period._ends = [int(e) for e in state["ends"]]
    for key, value in state["attrs"].items():
        if isinstance(value, dict) and "__pairs__" in value:
            value = {int(k) if isinstance(k, (int, float)) else k: v for k, v in value["__pairs__"]}
        setattr(period, key, value)


def run(cfg: Mapping, *, name: str | None = None, dataset=None, progress: bool = False,
        checkpoint_dir=None, checkpoint_every: int = 0, resume=None, stop_at: int | None = None) -> RunResult:
    """Train the configured run and return its :class:`RunResult`.

    Args:
        cfg: a configuration from :func:`make_config`.
        name: label (default: the algorithm's name).
        dataset: a :class:`coopsgd.data.Dataset` to share between runs (default: load ``cfg["data"]``).
        progress: show a tqdm progress bar (loss, steps/s) on stderr.
        checkpoint_dir: where :mod:`coopsgd.checkpoint` saves, every ``checkpoint_every`` steps
            and at the end.
        resume: a checkpoint folder to continue from (its latest complete checkpoint).
        stop_at: stop after this many steps (for tests of resumption; the history is partial).

    Steps run in *blocks* on a grid fixed by the configuration alone: with a constant period τ a
    block is ``τ · max(1, round(eval_every / τ))`` steps (whole rounds, fused by the engine into one
    compiled call); with an adaptive period (AdaComm) a block is one round, run step by step, after
    which the schedule observes the round's loss and simulated time. After a block that crosses a
    multiple of ``eval_every`` (and after the last) the run evaluates the worker-averaged loss on
    the whole training set, the test accuracy of the model ``X π`` the mixing preserves (``W π = π``:
    the average ``X 1/n`` for a doubly stochastic W) and the consensus
    distance; checkpoints are saved likewise after blocks that cross a multiple of
    ``checkpoint_every``. Since a resumed run makes the same compiled calls on the same inputs as an
    uninterrupted one, it ends bitwise-identical on CPU.
    """
    from coopsgd import checkpoint as ckpt

    t_start = time.perf_counter()
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every needs a checkpoint folder")
    r = _Run(cfg, dataset, name)
    steps = cfg["steps"]
    if resume is not None:
        reader = ckpt.Checkpointer(ckpt.find(resume))
        try:
            state, host = reader.restore(r.state)
        finally:
            reader.close()
        _check_resume(cfg, host["config"])
        if int(state.step) > steps:
            raise ValueError(f"cannot resume: the checkpoint is at step {int(state.step)}, past steps = {steps}")
        r.state = state
        r.restore_host(host)
    elif checkpoint_dir and ckpt.latest_step(checkpoint_dir) is not None:
        raise ValueError(
            f"checkpoint folder {checkpoint_dir!r} already holds another run's checkpoints (up to step "
            f"{ckpt.latest_step(checkpoint_dir)}); continue it with --resume or choose another --out"
        )
    saver = ckpt.Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if int(r.state.step) == 0 and not r.history["step"]:
        r.evaluate(batch_loss=None, consensus=0.0)
    bar = _progress(progress, steps, int(r.state.step), r.name)
    period = r.algorithm.period
    tau = period.constant_tau
    block = tau * max(1, round(cfg["eval_every"] / tau)) if tau is not None else None
    every, ck = cfg["eval_every"], checkpoint_every
    real0 = r.real_time
    try:
        k = int(r.state.step)
        while k < steps and (stop_at is None or k < stop_at):
            if block is not None:  # whole rounds fused into one compiled call, on a fixed grid
                end = min((k // block + 1) * block, steps)
                r.times(k, end - k)
                r.state, metrics = r.trainer.run(r.state, r.sampler.batches(k, end - k), end - k)
                loss, comm, cons = (np.asarray(metrics.loss), np.asarray(metrics.communicated),
                                    np.asarray(metrics.consensus))
            else:  # a varying period: one round at a time, step by step (one compiled step)
                end = min(period.round_start(period.round_index(k) + 1), steps)
                r.times(k, end - k)
                parts = []
                for j in range(k, end):
                    r.state, met = r.trainer.run(r.state, r.sampler.batches(j, 1), 1)
                    parts.append((np.asarray(met.loss), np.asarray(met.communicated), np.asarray(met.consensus)))
                loss, comm, cons = (np.concatenate(x) for x in zip(*parts))
            for i in np.flatnonzero(comm):
                r.mixings += 1
                r.bytes += r._traffic(period.round_index(k + int(i))).total_bytes
            if block is None and hasattr(period, "observe") and period.communicates(end - 1):
                t_end = r.round_cache["stamps"][end - 1 - r.round_cache["start"]]
                period.observe(loss=float(np.mean(loss)), time=float(t_end), step=end,
                               consensus=float(cons[-1]))
            r._last = (float(np.mean(loss)), float(np.mean(cons)))
            if bar is not None:
                bar.update(end - k)
                bar.set_postfix(loss=f"{loss[-1]:.4f}")
            if end == steps or end // every > k // every:
                r.evaluate(*r._last)
            r.real_time = real0 + time.perf_counter() - t_start
            if saver is not None and (end == steps or (ck and end // ck > k // ck)):
                saver.save(end, r.state, r.host_state())
            k = end
    finally:
        if bar is not None:
            bar.close()
        if saver is not None:
            saver.close()
    result = RunResult(name=r.name, config=dict(cfg), summary=_summary(r), history=r.history)
    result.state, result.trainer, result.model = r.state, r.trainer, r.model
    return result


def _depends_on_steps(cfg: Mapping) -> bool:
    """Whether anything but the stopping point depends on ``steps`` (a learning-rate schedule
    stretched over the run, or AdaComm's default interval)."""
    kind = cfg["optimizer.schedule"]
    return (kind in ("cosine", "warmup_cosine")
            or (kind != "constant" and not cfg["optimizer.decay_every"])
            or (cfg["algorithm"] == "adacomm" and cfg["adacomm_interval"] is None))


def _check_resume(cfg: Mapping, saved: Mapping) -> None:
    # steps may change on resume (run longer or shorter) unless a schedule is stretched over it
    free = {"out"} if _depends_on_steps(cfg) or _depends_on_steps(saved) else {"out", "steps"}
    diff = [k for k in DEFAULTS if k not in free and cfg.get(k) != saved.get(k)]
    if diff:
        shown = ", ".join(f"{k} = {saved.get(k)!r} in the checkpoint but {cfg.get(k)!r} now" for k in diff[:3])
        raise ValueError(f"cannot resume: the configuration differs from the checkpoint's ({shown})")


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", leave=False)


def _summary(r: _Run) -> dict:
    h = r.history
    last = -1
    return {
        "algorithm": r.cfg["algorithm"],
        "steps": int(r.state.step),
        "final_train_loss": h["loss"][last],
        "test_accuracy": h["test_accuracy"][last],
        "comm_rounds": int(r.mixings),
        "bytes_communicated": float(r.bytes),
        "simulated_time": h["time"][last],
        "real_time": float(r.real_time),
        "final_consensus": h["consensus"][last],
        "zeta": float(r.algorithm.zeta) if r.algorithm.is_static or r.algorithm.mixing.cycle else _safe_zeta(r.algorithm),
        "param_bytes": r.param_bytes,
    }


def _safe_zeta(algorithm) -> float | None:
    try:
        return float(algorithm.zeta)
    except Exception:  # a schedule without a closed-form E[WᵀW]
        return None


# ---------------------------------------------------------------------------------- output


def prepare_out(path) -> str:
    """Check that the results folder ``path`` can be created or written, without creating it (so
    a run that fails leaves nothing behind); :func:`write_results` creates it. Raises ValueError
    naming the folder if not."""
    return writable_folder(path)


def _atomic_write(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


SUMMARY_COLUMNS = ("name", "final_train_loss", "test_accuracy", "comm_rounds", "bytes_communicated",
                   "simulated_time", "real_time", "final_consensus", "zeta", "steps")


def write_results(results: list, out: str, title: str = "") -> list[str]:
    """Write ``results.json``, ``results.csv`` (one row per run), ``history.csv`` (one row per
    evaluation) and the PNG figures into ``out``; returns the paths written."""
    from coopsgd import plotting

    os.makedirs(out, exist_ok=True)
    payload = {"runs": [{"name": r["name"], "config": r["config"], "summary": r["summary"],
                         "history": r["history"]} for r in results]}
    paths = []
    p = os.path.join(out, "results.json")
    _atomic_write(p, to_json(payload, indent=1) + "\n")
    paths.append(p)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for r in results:
        s = {**r["summary"], "name": r["name"]}
        w.writerow([s.get(c) for c in SUMMARY_COLUMNS])
    p = os.path.join(out, "results.csv")
    _atomic_write(p, buf.getvalue())
    paths.append(p)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("name",) + HISTORY_KEYS)
    for r in results:
        h = r["history"]
        for i in range(len(h["step"])):
            w.writerow([r["name"]] + [h[k][i] for k in HISTORY_KEYS])
    p = os.path.join(out, "history.csv")
    _atomic_write(p, buf.getvalue())
    paths.append(p)
    histories = {r["name"]: r["history"] for r in results}
    paths += plotting.plot_run_figures(histories, out, title=title)
    return paths


def _human_bytes(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return f"{b:.1f} TB"  # pragma: no cover


def format_table(results: list) -> str:
    """The comparison table: one line per run."""
    head = ("algorithm", "train loss", "test acc", "comm rounds", "bytes sent", "sim time (s)", "real time (s)")
    rows = []
    for r in results:
        s = r["summary"]
        rows.append((r["name"], f"{s['final_train_loss']:.4f}", f"{s['test_accuracy']:.3f}",
                     str(s["comm_rounds"]), _human_bytes(s["bytes_communicated"]),
                     f"{s['simulated_time']:.2f}", f"{s['real_time']:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
