"""Compiled programs shared by every trainer with the same configuration.

A trainer's programs depend only on what its rounds trace — the loss, the optax optimizer, the
mixer's ``apply`` and ``direction``, the optimizer-state policy, m and the flags — on the backend's
layout, and on the round shape (rounds per call, steps per round, whether it mixes, the mixing's
static structure). :func:`program` keys a process-wide cache on exactly that, so a second trainer
built the same way (say, for another seed, or by another ``compare`` entry) reuses the first one's
compiled code instead of compiling again.

"The same way" is decided by value, not identity, for the functions involved: two closures are
the same configuration when their code, globals and captured values are (:func:`fingerprint`), so
``optax.sgd(0.1)`` built twice matches and ``optax.sgd(0.2)`` does not. Captured values that are
neither plain numbers, strings, tuples, functions nor ``functools.partial`` objects (arrays, lists,
dicts, modules' objects) count by identity, which is never wrong, only less often shared.
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable

import jax
import numpy as np

__all__ = ["clear", "fingerprint", "layout", "program", "spec_key"]

_CACHE: OrderedDict = OrderedDict()
_CAPACITY = 64
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic, np.dtype)


class _Same:
    """An object compared by identity (kept alive by the key, so its id stays unique)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj


def fingerprint(obj, depth: int = 0) -> Hashable:
    """A hashable stand-in for ``obj``, equal for objects that compute the same thing: numbers,
    strings and dtypes by value; tuples (NamedTuples: with their type) element by element;
    functions by code, globals, defaults and captured values; ``functools.partial`` and bound
    methods by their parts; anything else (and anything nested deeper than 12) by identity."""
    if depth > 12:
        return _Same(obj)
    deeper = functools.partial(fingerprint, depth=depth + 1)
    if isinstance(obj, _PLAIN):
        return type(obj), obj
    if type(obj) is tuple or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        return type(obj), tuple(deeper(x) for x in obj)
    if isinstance(obj, functools.partial):
        return functools.partial, deeper(obj.func), deeper(obj.args), deeper(tuple(sorted(obj.keywords.items())))
    if isinstance(obj, types.MethodType):
        return types.MethodType, deeper(obj.__func__), deeper(obj.__self__)
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(deeper(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append(None)
        return (types.FunctionType, obj.__code__, _Same(obj.__globals__), deeper(obj.__defaults__),
                deeper(tuple(sorted((obj.__kwdefaults__ or {}).items()))), tuple(cells))
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
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    fn = _CACHE[key] = build()
    while len(_CACHE) > _CAPACITY:
        _CACHE.popitem(last=False)
    return fn


def clear() -> None:
    """Forget every shared program (each trainer keeps the ones it has used)."""
    _CACHE.clear()
