"""Compiled programs shared by every trainer with the same configuration.

A trainer's programs depend only on what its rounds trace — the loss, the optax optimizer, the
mixer's ``apply`` and ``direction``, the optimizer-state policy, m and the flags — on the backend's
layout, and on the round shape (rounds per call, steps per round, whether it mixes, the mixing's
static structure). :func:`program` keys a process-wide cache on exactly that, so a second trainer
built the same way (say, for another seed, or by another ``compare`` entry) reuses the first one's
compiled code instead of compiling again. The checks made before a first round (of the loss on
one worker's batch, of the mixer's output) are likewise made once per configuration
(:func:`check_once`).

"The same way" is decided by value, not identity, for the functions involved: two closures are
the same configuration when their code, captured values and the values of the globals they read
are (:func:`fingerprint`), so ``optax.sgd(0.1)`` built twice matches, ``optax.sgd(0.2)`` does not,
and neither does a loss whose global ``SCALE`` was rebound since. Values that are neither plain
numbers, strings, tuples, functions nor ``functools.partial`` objects (arrays, lists, dicts,
modules, modules' objects) count by identity: less often shared, and blind only to a change made
inside such an object (an array written in place), as ``jax.jit``'s own cache is.

Across processes, :func:`keep_in` names a folder where programs are kept as StableHLO
(:func:`persisted`, :mod:`jax.export`): a later process loads one instead of tracing and lowering
it again, and JAX's persistent compilation cache then finds its executable. A process's identity
of a closure does not survive it, so a trainer opts in with a ``program_key`` that names what its
rounds trace beyond coopsgd's own code (the command line uses a hash of the configuration); a
kept program is found under that key, the round shape, the inputs' types and layouts, and the
environment (coopsgd's source files, the versions of Python, JAX and the libraries the rounds
call, JAX's configuration, ``JAX_*``/``XLA_*`` variables and the devices), so a change to any of
them traces afresh.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
import sys
import tempfile
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import jax
import numpy as np

__all__ = ["avals", "check_once", "clear", "fingerprint", "keep_in", "kept_in", "layout", "persisted", "program",
           "spec_key", "stable_name"]

_CACHE: OrderedDict = OrderedDict()
_PASSED: OrderedDict = OrderedDict()
_LOCK = threading.RLock()
_CAPACITY = 64
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic, np.dtype)
_FOLDER: list[str | None] = [None]
_LIBRARIES = ("jax", "jaxlib", "numpy", "optax", "flax", "scipy", "networkx")
"""The distributions whose versions a kept program depends on (what the rounds call)."""


def _aside(name: str) -> bool:
    """JAX settings that change what is logged or cached, never a program."""
    return any(part in name.lower() for part in ("log", "cache"))


class _Same:
    """An object compared by identity (kept alive by the key, so its id stays unique)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj


def _global_names(code: types.CodeType) -> set:
    """The names ``code`` (and the functions, lambdas and comprehensions inside it) may read as
    globals (attribute names too: a superset, which only shares less)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def fingerprint(obj, depth: int = 0, _seen: dict | None = None) -> Hashable:
    """A hashable stand-in for ``obj``, equal for objects that compute the same thing: numbers,
    strings and dtypes by value; tuples (NamedTuples: with their type) element by element;
    functions by code, defaults, captured values and the current values of the globals their
    code reads (so a loss that reads a global ``SCALE`` is another one once ``SCALE`` is
    rebound); ``functools.partial`` and bound methods by their parts; anything else (modules,
    arrays, mutable containers, and anything nested deeper than 12) by identity."""
    if depth > 12:
        return _Same(obj)
    seen = {} if _seen is None else _seen
    deeper = functools.partial(fingerprint, depth=depth + 1, _seen=seen)
    if isinstance(obj, _PLAIN):
        return type(obj), obj
    if type(obj) is tuple or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        return type(obj), tuple(deeper(x) for x in obj)
    if isinstance(obj, functools.partial):
        return functools.partial, deeper(obj.func), deeper(obj.args), deeper(tuple(sorted(obj.keywords.items())))
    if isinstance(obj, types.MethodType):
        return types.MethodType, deeper(obj.__func__), deeper(obj.__self__)
    if isinstance(obj, types.FunctionType):
        if id(obj) in seen:  # met again (shared, or a function that reaches itself): computed once
            return seen[id(obj)]
        seen[id(obj)] = _Same(obj)  # what a cycle back to this function sees
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(deeper(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append(None)
        read = tuple((name, deeper(obj.__globals__[name]))
                     for name in sorted(_global_names(obj.__code__)) if name in obj.__globals__)
        seen[id(obj)] = (types.FunctionType, obj.__code__, deeper(obj.__defaults__),
                         deeper(tuple(sorted((obj.__kwdefaults__ or {}).items()))), tuple(cells), read)
        return seen[id(obj)]
    return _Same(obj)


def spec_key(spec) -> Hashable:
    """What of an :class:`~coopsgd.parallel.engine.Spec` the compiled rounds depend on."""
    state_sync = None if spec.state_sync is None else (spec.state_sync.apply, spec.state_sync.identity)
    traced = (spec.loss_fn, spec.optimizer, spec.mixer.apply, spec.mixer.direction, spec.sync.apply,
              spec.sync.identity, state_sync)
    return fingerprint(traced), spec.m, spec.has_aux, spec.with_rng, spec.track_consensus, spec.has_state


def layout(tree) -> tuple:
    """``(shardings, key)``: the sharding of every leaf of ``tree`` (``None`` for a host array) and a
    hashable key of that layout, for programs compiled once per layout of their inputs."""
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return shardings, (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))


def program(key: Hashable, build: Callable[[], Callable]) -> Callable:
    """The compiled program for ``key`` (a spec key, the backend's layout and the round shape),
    built by ``build()`` the first time; the most recently used :data:`_CAPACITY` are kept."""
    with _LOCK:  # trainers may be built in several threads at once
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        fn = _CACHE[key] = build()
        while len(_CACHE) > _CAPACITY:
            _CACHE.popitem(last=False)
        return fn


def avals(tree) -> tuple:
    """A hashable signature of ``tree``: its structure and its leaves' shapes and dtypes."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def check_once(key: Hashable, check: Callable[[], None]) -> None:
    """``check()``, which raises when what it checks is wrong, unless a check under ``key`` (a
    :func:`fingerprint` of everything it looks at) passed before in this process: trainers of the
    same configuration trace the loss and the mixer for their checks once, not once each. A
    failure is not remembered; the most recent :data:`_CAPACITY` × 4 passes are."""
    with _LOCK:
        if key in _PASSED:
            _PASSED.move_to_end(key)
            return
    check()
    with _LOCK:
        _PASSED[key] = None
        while len(_PASSED) > 4 * _CAPACITY:
            _PASSED.popitem(last=False)


def clear() -> None:
    """Forget every shared program (each trainer keeps the ones it has used) and every check passed."""
    with _LOCK:
        _CACHE.clear()
        _PASSED.clear()


def keep_in(folder: str | os.PathLike | None) -> None:
    """Keep the compiled programs of trainers with a ``program_key`` in ``folder`` across
    processes (``None``: only in this process, the default). What the folder holds is unpickled
    and run, so it must be one only this user can write; it is made if missing (mode 0700)."""
    if folder is not None:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    _FOLDER[0] = None if folder is None else os.fspath(folder)


def kept_in() -> str | None:
    """The folder :func:`keep_in` set, or ``None``."""
    return _FOLDER[0]


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """Everything beside a program's own key that its compiled code depends on, as one digest."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    versions = []
    for name in _LIBRARIES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, None))
    config = sorted((k, repr(v)) for k, v in jax.config.values.items() if not _aside(k))
    variables = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")) and not _aside(k))
    devices = [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()]
    digest.update(repr((sys.version, versions, config, variables, devices)).encode())
    return digest.hexdigest()


def _signature(args) -> tuple:
    """The inputs' tree, types (with weak types) and layouts: what a compiled program is specialised on."""
    leaves, tree = jax.tree.flatten(args)
    return str(tree), tuple((str(jax.typeof(x)), repr(getattr(x, "sharding", None))) for x in leaves)


def _load(path: str) -> Callable | None:
    """The program kept in ``path``, or ``None`` when there is none that can be read (missing,
    cut short by a crash, or written by an incompatible build)."""
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return _calling(jax.export.deserialize(payload), in_tree, out_tree)
    except Exception:
        return None


def _calling(exported, in_tree, out_tree) -> Callable:
    """A function of the original inputs and results around ``exported`` (which takes leaves)."""
    # Inputs and results on the one device, committed or not: one compilation, not one per placement.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    call = jax.jit(exported.call, in_shardings=device, out_shardings=device)
    return lambda *args: jax.tree.unflatten(out_tree, call(*jax.tree.leaves(args)))


def _export(jitted, args, path: str) -> Callable | None:
    """``jitted`` for ``args`` as StableHLO (:func:`jax.export.export`, on the leaves), written to
    ``path`` all or nothing (a temporary file renamed into place; a folder that cannot take it,
    a full disk say, keeps nothing); ``None`` for a program JAX cannot export."""
    leaves, in_tree = jax.tree.flatten(args)
    trees = {}

    def flat(*leaves):
        out_leaves, trees["out"] = jax.tree.flatten(jitted(*jax.tree.unflatten(in_tree, leaves)))
        return out_leaves

    types = [jax.typeof(x) for x in leaves]
    try:
        exported = jax.export.export(jax.jit(flat))(
            *[jax.ShapeDtypeStruct(t.shape, t.dtype, weak_type=t.weak_type) for t in types])
        data = pickle.dumps((exported.serialize(), in_tree, trees["out"]))
    except (ValueError, TypeError, NotImplementedError, pickle.PicklingError):
        return None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return _calling(exported, in_tree, trees["out"])


def stable_name(key, *parts) -> str | None:
    """The name a program of a trainer with ``program_key`` ``key`` is kept under (``parts``: its
    flags, layout and round shape), or ``None`` when it is not kept: no key (``None``, ``False``
    off one device), or parts whose text shows an object's address (not the same in another
    process)."""
    name = repr((key, *parts))
    return None if not key or " at 0x" in name else name


def persisted(jitted, name: str) -> Callable:
    """``jitted`` (a ``jax.jit`` function of one device) kept in the :func:`keep_in` folder under
    ``name``, a stable string naming what it computes. Called with inputs of a signature it has not
    seen, it loads the StableHLO kept for (``name``, the signature, the environment), or exports
    ``jitted`` to it (:mod:`jax.export`) — either way the program runs through JAX's own
    compilation (and persistent cache), never tracing ``jitted`` again. Unchanged ``jitted`` when
    no folder is set or JAX runs in several processes; a program JAX cannot export runs as
    ``jitted``."""
    folder = kept_in()
    if folder is None or jax.process_count() > 1:
        return jitted
    programs: dict = {}

    def call(*args):
        signature = _signature(args)
        fn = programs.get(signature)
        if fn is None:
            key = hashlib.sha256(repr((name, signature, _environment())).encode()).hexdigest()
            path = os.path.join(folder, f"{key}.jaxexport")
            fn = programs[signature] = _load(path) or _export(jitted, args, path) or jitted
        return fn(*args)

    return call
