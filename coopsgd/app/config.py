"""Run configurations: every key with its default, validation, TOML files and ``--set`` overrides,
and the optimizer, learning-rate schedule and runtime model a configuration describes.

A configuration is a flat mapping of dotted keys (``"optimizer.lr"``), read from TOML tables and
``--set key=value`` overrides; :data:`DEFAULTS` lists every key. The algorithm names come from
:mod:`coopsgd.app.registry`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping

import numpy as np
import optax

from coopsgd.algorithms import compression
from coopsgd.app import registry
from coopsgd.core import mixing, schedules, topology
from coopsgd.core.validate import (
    INT32_MAX,
    INT32_RULE,
    format_bytes,
    require_int,
    require_memory,
)
from coopsgd.parallel.backends import BACKENDS

__all__ = [
    "DEFAULTS",
    "build_lr_schedule",
    "build_optimizer",
    "build_runtime",
    "check_fits",
    "depends_on_steps",
    "expected_delay",
    "flatten",
    "load_toml",
    "make_config",
    "parse_override",
    "program_key",
    "require_tau_applies",
    "stretched_over_steps",
]

DEFAULTS: dict[str, object] = {
    "algorithm": "local_sgd",
    "workers": 8,
    "tau": 8,
    "topology": "ring",
    "weights": "metropolis",
    "mixing_alpha": None,  # EASGD's alpha (default 2/(m+2)), Overlap Local-SGD's alpha (default 0.5)
    "budget": 0.5,  # MATCHA's communication budget C_b
    "compressor": "top_k:0.01",  # CHOCO-SGD's compressor: identity, top_k:f, random_k:f, qsgd:s, sign
    "consensus_step": 0.05,  # CHOCO-SGD's gamma in (0, 1]; 0.2 diverges with top_k:0.01 on the 8-ring
    "outer.lr": 0.7,  # DiLoCo's outer learning rate (Nesterov SGD, as in the paper)
    "outer.momentum": 0.9,  # DiLoCo's outer momentum
    "fragments": 2,  # Streaming DiLoCo's P (tau is H, a multiple of P)
    "fragment_delay": 0,  # Streaming DiLoCo's overlap V: inner steps between a fragment's send and merge
    "adacomm_tau0": None,  # default: 2 * tau
    "adacomm_interval": None,  # simulated seconds; default: a tenth of the estimated run time
    "hierarchy": None,  # hierarchical averaging's [[period, group_size], ...]; default: halves every tau, all every 4 tau
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
    "optimizer.weight_decay": 0.0,  # adamw's and lion's decoupled decay; L2 for the SGD family
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
    "backend": BACKENDS,
    "split": ("iid", "dirichlet"),
    "model": ("mlp", "cnn"),
    "optimizer.name": ("sgd", "momentum", "nesterov", "adam", "adamw", "lion"),
    "optimizer.schedule": ("constant", "cosine", "step", "warmup_cosine"),
    "runtime.compute": ("constant", "exponential", "shifted_exponential"),
    "runtime.comm": ("network", "constant", "random"),
}
_INTS = {"workers": 1, "steps": 1, "batch_size": 1, "seed": 0, "eval_every": 1,
         "optimizer.warmup_steps": 0, "optimizer.decay_every": 0, "adacomm_tau0": 1, "fragments": 1,
         "fragment_delay": 0}
_POSITIVE = {"optimizer.lr", "dirichlet_alpha", "runtime.compute_time", "runtime.straggler_slowdown",
             "runtime.bandwidth", "adacomm_interval", "budget", "consensus_step", "outer.lr"}
_NONNEG = {"runtime.compute_extra", "runtime.comm_time", "runtime.latency", "optimizer.momentum",
           "optimizer.weight_decay",
           "runtime.straggler_prob", "optimizer.decay_factor", "outer.momentum"}
_STRINGS = {"algorithm", "topology", "weights", "data", "out", "compressor"}


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
    if os.path.isdir(path):
        raise ValueError(f"config file {path!r} is a folder, not a TOML file")
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
    """τ: an integer in [1, 2³¹ − 1], or piecewise ``[[start_step, tau], ...]`` starting at step 0."""
    if isinstance(value, list):
        try:
            pairs = [tuple(p) for p in value]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("each entry must be [start_step, tau]")
            schedules.piecewise(pairs)
            for start, tau in pairs:
                require_int("segment start", start, 0, INT32_MAX, rule=INT32_RULE)
                require_int("segment tau", tau, 1, INT32_MAX, rule=INT32_RULE)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tau as a schedule must be [[0, tau0], [start, tau], ...]: {err}") from None
        return [[int(a), int(b)] for a, b in pairs]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"tau must be an integer >= 1 or a list [[0, tau0], [start, tau], ...], got {value!r}")
    return require_int("tau", value, 1, INT32_MAX, rule=INT32_RULE)


def require_tau_applies(algorithm: str, tau, among=None) -> None:
    """ValueError if ``algorithm``'s period is fixed to 1 and ``tau`` is not 1 (it would be
    ignored), naming the algorithms with a period (those of ``among``, default all). A τ schedule
    (a list) is left to :func:`coopsgd.app.registry.build`, which refuses it for every algorithm
    whose period is not the ``tau`` key."""
    if registry.get(algorithm).period == "one" and not isinstance(tau, list) and tau != 1:
        periodic = [n for n in (among or registry.names()) if registry.get(n).period == "tau"]
        raise ValueError(f"{algorithm} has tau = 1 by definition, got tau = {tau!r}; for tau > 1 use one of "
                         f"{', '.join(periodic)}")


def _longest_period(cfg: Mapping) -> int:
    """The longest τ of a round that starts within the run."""
    tau = cfg["tau"]
    return max(t for s, t in tau if s < cfg["steps"]) if isinstance(tau, list) else tau


def _check_period(cfg: Mapping, tau_given: bool) -> None:
    """τ that the algorithm does not read, or that no round of the run would end, is refused; so
    is a clock round that cannot be held in memory."""
    entry = registry.get(cfg["algorithm"])
    if tau_given:
        require_tau_applies(entry.name, cfg["tau"])
    if entry.period != "tau":
        return
    longest = _longest_period(cfg)
    if longest > cfg["steps"]:
        raise ValueError(f"tau = {longest} is longer than the run (steps = {cfg['steps']}): no round would end, "
                         "so the workers would never communicate; use tau <= steps")
    require_memory(f"timing rounds of tau = {longest} steps on {cfg['workers']} workers",
                   24.0 * longest * cfg["workers"], "use a shorter tau or fewer workers")


def _check_hierarchy(value):
    """None, or a non-empty list of ``[period, group_size]`` pairs of integers (the rest of the
    rules — increasing, dividing — are :func:`coopsgd.hierarchical`'s, checked when it is built)."""
    if value is None:
        return None
    if not (isinstance(value, list) and value and all(
            isinstance(pair, list) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair) for pair in value)):
        raise ValueError(f"hierarchy must be a list of [period, group_size] pairs of integers, e.g. [[2, 4], [8, 8]] "
                         f"(groups of 4 every 2 steps, all 8 workers every 8), got {value!r}")
    return [list(pair) for pair in value]


def _check_value(key: str, value):
    if key == "tau":
        return _check_tau(value)
    if key == "hierarchy":
        return _check_hierarchy(value)
    if key in _INTS:
        if value is None and key == "adacomm_tau0":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < _INTS[key]:
            raise ValueError(f"{key} must be an integer >= {_INTS[key]}, got {value!r}")
        if value > INT32_MAX:  # the engine's step counter is int32
            raise ValueError(f"{key} must be at most {INT32_MAX}, got {value!r}")
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
        if key == "compressor":
            compression.by_name(value)
        if key == "data" and value != "digits" and os.path.isdir(value):
            raise ValueError(f"data {value!r} is a folder; pass a .npz file with arrays x and y")
        return value
    raise AssertionError(key)  # pragma: no cover


def make_config(*layers: Mapping, strict: bool = False) -> dict[str, object]:
    """Defaults overlaid by each layer of dotted keys in turn, every value validated.

    ``tau`` is a shared key: an algorithm whose period is fixed to 1 (``fully_sync``, ``dpsgd``, …)
    ignores it, so that one configuration serves every algorithm (``compare``, sweeps). With
    ``strict`` — for a command that runs the one algorithm its user named (``train``) — τ ≠ 1 set
    for such an algorithm is refused instead, unless it comes from a layer holding every key (a
    saved configuration, a checkpoint's), where it is the shared default.

    Raises:
        ValueError: an unknown key (listing the valid ones), a value of the wrong type or range, an
            unknown algorithm / topology / weight rule name (listing the valid names), τ longer
            than ``steps``, a runtime model that gives no finite time; with ``strict``, τ given to
            an algorithm with τ = 1.
    """
    cfg = dict(DEFAULTS)
    tau_given = False
    for layer in layers:
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(DEFAULTS)}")
            cfg[key] = value
        tau_given |= strict and "tau" in layer and not set(DEFAULTS) <= set(layer)
    for key in DEFAULTS:
        cfg[key] = _check_value(key, cfg[key])
    registry.get(cfg["algorithm"])
    if cfg["topology"] not in topology.TOPOLOGIES:
        raise ValueError(f"unknown topology {cfg['topology']!r}; valid names: {', '.join(topology.TOPOLOGIES)}")
    rules = mixing.weight_rule_names()
    if cfg["weights"] not in rules:
        raise ValueError(f"unknown weight rule {cfg['weights']!r}; valid rules: {', '.join(rules)}")
    _check_period(cfg, tau_given)
    build_runtime(cfg)  # the runtime model's own checks (a bandwidth too small for a finite time)
    return cfg


def _sgd(sched, cfg):
    return optax.sgd(sched)


def _momentum(sched, cfg):
    return optax.sgd(sched, momentum=cfg["optimizer.momentum"])


def _nesterov(sched, cfg):
    return optax.sgd(sched, momentum=cfg["optimizer.momentum"], nesterov=True)


def _adam(sched, cfg):
    return optax.adam(sched)


def _adamw(sched, cfg):
    return optax.adamw(sched, weight_decay=cfg["optimizer.weight_decay"])


def _lion(sched, cfg):
    return optax.lion(sched, weight_decay=cfg["optimizer.weight_decay"])


OPTIMIZERS = {"sgd": (_sgd, 0), "momentum": (_momentum, 1), "nesterov": (_nesterov, 1), "adam": (_adam, 2),
              "adamw": (_adamw, 2), "lion": (_lion, 1)}
"""The per-worker optimizers by their optax names: ``(build(schedule, cfg), model-sized buffers
of its state)``. ``optimizer.weight_decay`` is AdamW's and Lion's decoupled weight decay; the SGD
family adds it as ``optax.add_decayed_weights`` (L2) when it is above 0."""

OPTIMIZER_SLOTS = {name: slots for name, (_, slots) in OPTIMIZERS.items()}
"""Model-sized buffers of each optimizer's state per worker."""


def check_fits(cfg: Mapping, model, example_bytes: float = 0.0, steps_per_call: int = 256, runs: int = 1) -> None:
    """ValueError if training ``cfg`` would not fit in this machine's memory, before any work.

    ``model``: a :class:`coopsgd.app.models.Model` (its size is traced, nothing is allocated) or
    the bytes of one model. The estimate: ``workers`` columns of the model, about ``5 + s`` times
    over (parameters, gradients, the mixing's output, a mixer's copies, and the optimizer's ``s``
    model-sized slots, :data:`OPTIMIZER_SLOTS`), plus one fused call's batches
    (``steps_per_call × workers × batch_size`` examples of ``example_bytes``); ``runs`` such runs
    at once."""
    if hasattr(model, "init"):
        import jax

        shapes = jax.eval_shape(model.init, jax.random.key(0))
        param_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
    else:
        param_bytes = float(model)
    m = cfg["workers"]
    copies = 5 + OPTIMIZER_SLOTS[cfg["optimizer.name"]]
    batches = min(steps_per_call, cfg["steps"]) * m * cfg["batch_size"] * example_bytes
    need = runs * (copies * (m + 2) * float(param_bytes) + batches)
    at_once = f" ({runs} runs at once)" if runs > 1 else ""
    require_memory(f"training {m} workers of a {format_bytes(param_bytes)} model ({copies} copies each) "
                   f"with batches of {cfg['batch_size']}{at_once}", need,
                   "use fewer workers, a smaller model or batch" + (", or --jobs 1" if runs > 1 else ""))


# --------------------------------------------------------------------------------- builders


def expected_delay(cfg: Mapping, traffic) -> float:
    """The mean time of one mixing that sends ``traffic`` under the configured network."""
    if cfg["runtime.comm"] == "network":
        return traffic.messages * cfg["runtime.latency"] + traffic.bytes_per_worker / cfg["runtime.bandwidth"]
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

    name, decay = cfg["optimizer.name"], cfg["optimizer.weight_decay"]
    tx = OPTIMIZERS[name][0](build_lr_schedule(cfg), cfg)
    if decay and name in ("sgd", "momentum", "nesterov"):
        return optax.chain(optax.add_decayed_weights(decay), tx)
    return tx


def build_runtime(cfg: Mapping):
    """The :class:`coopsgd.sim.runtime.RuntimeModel` of the configuration (seeded by ``seed``)."""
    from coopsgd.sim import runtime as rt

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


def stretched_over_steps(cfg: Mapping) -> str | None:
    """What ``steps`` stretches beyond the stopping point, in words (``None`` when nothing): a
    learning-rate schedule spread over the run, or AdaComm's default interval."""
    kind = cfg["optimizer.schedule"]
    if kind in ("cosine", "warmup_cosine"):
        return f"optimizer.schedule = {kind!r} spreads the learning rate over steps"
    if kind != "constant" and not cfg["optimizer.decay_every"]:
        return f"optimizer.schedule = {kind!r} without optimizer.decay_every decays at thirds of steps"
    if cfg["algorithm"] == "adacomm" and cfg["adacomm_interval"] is None:
        return "adacomm without adacomm_interval takes its interval from the estimated run time of steps"
    return None


def depends_on_steps(cfg: Mapping) -> bool:
    """Whether anything but the stopping point depends on ``steps`` (:func:`stretched_over_steps`)."""
    return stretched_over_steps(cfg) is not None


def program_key(cfg: Mapping) -> str:
    """A name for what a configuration's trainer computes (its ``program_key``,
    :mod:`coopsgd.parallel.programs`): a hash of every key but ``out`` (and ``steps`` when nothing
    depends on it, :func:`depends_on_steps`), with the size and time of a data file."""
    import hashlib
    import json

    kept = {k: v for k, v in cfg.items() if k != "out" and not (k == "steps" and not depends_on_steps(cfg))}
    if kept.get("data") not in (None, "digits"):
        try:
            stat = os.stat(kept["data"])
            kept["data"] = [os.path.abspath(kept["data"]), stat.st_size, stat.st_mtime_ns]
        except OSError:
            pass
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=repr).encode()).hexdigest()
