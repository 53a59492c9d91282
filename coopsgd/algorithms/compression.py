"""Compressors for compressed gossip: what a worker sends instead of a model-sized vector.

A :class:`Compressor` works on one flat vector (one leaf of one worker's model): ``encode(x, key)``
returns the *payload* — a pytree of fixed-shape arrays, exactly what goes on the wire — and
``decode(payload, size)`` the dense vector ``Q(x)`` the receiver reconstructs. The bytes a
mixing sends are the payload's (:func:`payload_bytes`, read from the shapes ``encode`` returns),
so the communication account counts values *and* indices.

CHOCO-SGD needs Q to be a δ-contraction, ``E‖Q(x) − x‖² ≤ (1 − δ)‖x‖²`` (Koloskova, Stich & Jaggi,
ICML 2019, Assumption 1). All of these are:

============== ===================================================== ==============================
compressor     Q(x)                                                  δ
============== ===================================================== ==============================
``identity``   x                                                     1
``top_k(f)``   the k = ⌈f·d⌉ largest-magnitude entries, the rest 0   k/d
``random_k(f)`` k = ⌈f·d⌉ entries chosen uniformly at random          k/d (in expectation)
``qsgd(s)``    ``‖x‖ sign(x) ξ/s`` / (1 + min(d/s², √d/s))           1 / (1 + min(d/s², √d/s))
``sign()``     ``(‖x‖₁/d) sign(x)``                                  ‖x‖₁² / (d‖x‖₂²)
============== ===================================================== ==============================

QSGD (Alistarh et al., NeurIPS 2017) rounds ``s|x_i|/‖x‖`` to a neighbouring integer level at
random (unbiased); scaled by ``1/(1 + min(d/s², √d/s))`` it is a contraction (Koloskova et al.
2019, §3). The scaled sign is Karimireddy et al., "Error feedback fixes SignSGD", ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.core.validate import require_int, require_proportion

__all__ = ["NAMES", "Compressor", "by_name", "identity", "kept", "payload_bytes", "qsgd", "random_k", "sign", "top_k"]


class Compressor(NamedTuple):
    """A compression operator Q on flat vectors, as pure functions (jittable, vmappable).

    Attributes:
        encode: ``encode(x, key) -> payload`` for a 1-D ``x`` (the key feeds random compressors).
        decode: ``decode(payload, size) -> Q(x)``, a 1-D array of ``size`` entries.
        name: shown in reprs and tables.
        random: whether ``encode`` reads its key.
    """

    encode: Callable[[jax.Array, jax.Array], Any]
    decode: Callable[[Any, int], jax.Array]
    name: str
    random: bool = False


def kept(fraction: float, size: int) -> int:
    """k = ⌈fraction · size⌉ entries (at least 1) of a leaf of ``size`` entries."""
    return max(1, min(size, math.ceil(fraction * size - 1e-9)))


def identity() -> Compressor:
    """No compression: the payload is x itself (CHOCO-SGD with it and γ = 1 is D-PSGD)."""
    return Compressor(lambda x, key: x, lambda payload, size: payload, "identity")


def _scatter(payload, size):
    values, index = payload
    return jnp.zeros(size, values.dtype).at[index].set(values)


def top_k(fraction: float) -> Compressor:
    """Keep the ⌈fraction·d⌉ largest-magnitude entries of each leaf; send their values and int32
    indices (Stich, Cordonnier & Jaggi, "Sparsified SGD with memory", NeurIPS 2018).

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    fraction = require_proportion("fraction", fraction, rule="the share of entries top_k keeps")

    def encode(x, key):
        _, index = jax.lax.top_k(jnp.abs(x), kept(fraction, x.shape[0]))
        return x[index], index.astype(jnp.int32)

    return Compressor(encode, _scatter, f"top_k({fraction:g})")


def random_k(fraction: float) -> Compressor:
    """Keep ⌈fraction·d⌉ entries of each leaf chosen uniformly without replacement (a fresh
    choice per worker and mixing); send their values and int32 indices. Unscaled, so a
    contraction with δ = k/d in expectation (Koloskova et al. 2019, §3).

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    fraction = require_proportion("fraction", fraction, rule="the share of entries random_k keeps")

    def encode(x, key):
        index = jax.random.choice(key, x.shape[0], (kept(fraction, x.shape[0]),), replace=False)
        return x[index], index.astype(jnp.int32)

    return Compressor(encode, _scatter, f"random_k({fraction:g})", random=True)


def qsgd(levels: int = 16) -> Compressor:
    """QSGD with ``levels`` = s levels, scaled to a contraction: the payload is ‖x‖₂ (float32)
    and one int8 signed level per entry (so s ≤ 127).

    Raises:
        ValueError: ``levels`` not an integer in [1, 127].

    References:
        Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD", NeurIPS 2017, §3.1; Koloskova, Stich &
        Jaggi, ICML 2019, §3 (the scaling 1/τ, τ = 1 + min(d/s², √d/s)).
    """
    s = require_int("levels", levels, 1, 127)

    def encode(x, key):
        norm = jnp.linalg.norm(x.astype(jnp.float32))
        scaled = jnp.where(norm > 0, s * jnp.abs(x.astype(jnp.float32)) / jnp.where(norm > 0, norm, 1.0), 0.0)
        low = jnp.floor(scaled)
        level = low + (jax.random.uniform(key, x.shape) < scaled - low)
        return norm, (jnp.sign(x) * level).astype(jnp.int8)

    def decode(payload, size):
        norm, level = payload
        tau = 1.0 + min(size / s**2, math.sqrt(size) / s)
        return norm * level.astype(jnp.float32) / (s * tau)

    return Compressor(encode, decode, f"qsgd({s})", random=True)


def sign() -> Compressor:
    """The scaled sign ``(‖x‖₁/d) sign(x)``: the payload is the scale (float32) and one bit per
    entry (packed, ⌈d/8⌉ bytes); zero entries count as positive.

    References:
        Karimireddy, Rebjock, Stich & Jaggi, "Error feedback fixes SignSGD", ICML 2019, §3.
    """

    def encode(x, key):
        x = x.astype(jnp.float32)
        return jnp.mean(jnp.abs(x)), jnp.packbits(x >= 0)

    def decode(payload, size):
        scale, bits = payload
        return scale * (2.0 * jnp.unpackbits(bits, count=size).astype(jnp.float32) - 1.0)

    return Compressor(encode, decode, "sign")


def payload_bytes(compressor: Compressor, params) -> int:
    """Bytes of the payload one worker sends for a model shaped like ``params`` (a pytree of
    arrays or shape-dtype structs): every leaf compressed on its own, read from what ``encode``
    returns."""
    total = 0
    for leaf in jax.tree.leaves(params):
        flat = jax.ShapeDtypeStruct((int(np.prod(np.shape(leaf))),), jnp.result_type(leaf))
        out = jax.eval_shape(compressor.encode, flat, jax.random.key(0))
        total += sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(out))
    return total


NAMES = {"identity": identity, "top_k": top_k, "random_k": random_k, "qsgd": qsgd, "sign": sign}
"""The compressors by name (what :func:`by_name` reads)."""


def by_name(text: str) -> Compressor:
    """A compressor from its name and optional argument: ``"top_k:0.01"``, ``"random_k:0.1"``,
    ``"qsgd:16"``, ``"sign"``, ``"identity"`` (the configuration's ``compressor`` key).

    Raises:
        ValueError: an unknown name (listing the valid ones) or a bad argument.
    """
    name, _, arg = str(text).partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown compressor {text!r}; valid: {', '.join(NAMES)} (e.g. top_k:0.01, qsgd:16)")
    if name in ("identity", "sign"):
        if arg:
            raise ValueError(f"compressor {name!r} takes no argument, got {text!r}")
        return NAMES[name]()
    if not arg:
        return NAMES[name]() if name == "qsgd" else NAMES[name](0.01)
    try:
        value = int(arg) if name == "qsgd" else float(arg)
    except ValueError:
        raise ValueError(f"compressor {text!r}: {arg!r} is not a {'level count' if name == 'qsgd' else 'fraction'}") from None
    return NAMES[name](value)
