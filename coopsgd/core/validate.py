"""Argument validators shared by every layer: each returns the clean value or raises a ValueError
naming the argument, the rule it breaks and the value it got; and the machine's memory, against
which every size is checked before the work starts (:func:`require_memory`, with the estimate in
the message).

Plain Python and NumPy; nothing here is traced by JAX (validation happens at the door, never inside
compiled code).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable

import numpy as np

__all__ = [
    "INT32_MAX",
    "INT32_RULE",
    "MEMORY_FRACTION",
    "format_bytes",
    "machine_memory",
    "require_choice",
    "require_fraction",
    "require_int",
    "require_memory",
    "require_number",
    "require_proportion",
    "require_real_dtype",
]

INT32_MAX = 2**31 - 1
"""The largest step or round index the engine's int32 counters hold."""

INT32_RULE = "the engine counts steps in int32"
"""Why a count is bounded by :data:`INT32_MAX` (for messages)."""

MEMORY_FRACTION = 0.8
"""Share of :func:`machine_memory` one piece of work may plan to use (the rest is the process,
the libraries and everything else running)."""


def require_int(name: str, value, minimum: int, maximum: int | None = None, *, rule: str = "") -> int:
    """``value`` as an int if it is an integer in ``[minimum, maximum]`` (an integral float such as
    ``4.0`` is accepted); otherwise ValueError (``rule`` says why the maximum).

    Example:
        >>> require_int("tau", 4.0, 1)
        4
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}{f' ({rule})' if rule else ''}, got {value!r}")
    return int(value)


def _as_float(name: str, value, why: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number{why}, got {value!r}") from None


def require_number(name: str, value, *, positive: bool = False, rule: str = "") -> float:
    """``value`` as a finite float, ``> 0`` if ``positive`` else ``>= 0``; ``rule`` says what it is.

    Example:
        >>> require_number("latency", 0.0)
        0.0
    """
    why = f" ({rule})" if rule else ""
    x = _as_float(name, value, why)
    if isinstance(value, bool) or not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}{why}, got {value!r}")
    return x


def require_fraction(name: str, value, *, rule: str = "", open_low: bool = False) -> float:
    """``value`` in ``[0, 1)`` (``(0, 1)`` with ``open_low``) as a float.

    Example:
        >>> require_fraction("momentum", 0.9)
        0.9
    """
    why = f" ({rule})" if rule else ""
    x = _as_float(name, value, why)
    if not (0.0 <= x < 1.0) or (open_low and x == 0.0):
        raise ValueError(f"{name} must lie in {'(' if open_low else '['}0, 1){why}, got {name} = {value!r}")
    return x


def require_proportion(name: str, value, *, rule: str = "") -> float:
    """``value`` in ``(0, 1]`` as a float (a share of entries, a consensus step size).

    Example:
        >>> require_proportion("fraction", 0.01)
        0.01
    """
    why = f" ({rule})" if rule else ""
    x = _as_float(name, value, why)
    if isinstance(value, bool) or not (0.0 < x <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1]{why}, got {name} = {value!r}")
    return x


def require_choice(name: str, value, valid: Iterable[str], plural: str = "") -> str:
    """``value`` if it is one of ``valid``; otherwise ValueError listing them (as "valid
    ``plural``").

    Example:
        >>> require_choice("backend", "pmap", ("simulate", "pmap"), "backends")
        'pmap'
    """
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid {plural + ': ' if plural else ': '}{', '.join(valid)}")
    return value


def require_real_dtype(name: str, dtype, *, what: str = "a float array", fix: str = "") -> np.dtype:
    """``dtype`` unless it is complex (the imaginary part would be lost in float), boolean or
    integer (which hold no fractions): ValueError naming it, ``what`` it must be and ``fix``.
    Other dtypes (floats of any width, bfloat16, objects to convert) pass.

    Example:
        >>> require_real_dtype("W", np.float32)
        dtype('float32')
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"{name} must be {what}, got the complex dtype {dtype}"
                         f"{'; ' + fix if fix else ' (the imaginary part would be lost)'}")
    if dtype.kind in "biu":
        fix = fix or f"convert it first, e.g. np.asarray({name}, dtype=float)"
        raise ValueError(f"{name} must be {what}, got the {'boolean' if dtype.kind == 'b' else 'integer'} "
                         f"dtype {dtype}; {fix}")
    return dtype


@functools.lru_cache(maxsize=1)
def machine_memory() -> int:
    """Bytes of memory this process can use: the physical memory (psutil if installed, else
    ``os.sysconf``), or a smaller cgroup limit (containers); read once."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        total = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
    return total


def format_bytes(nbytes: float) -> str:
    """``7.2 GB``, ``310 MB`` (decimal units).

    Example:
        >>> format_bytes(30000**2 * 8)
        '7.2 GB'
    """
    nbytes = float(nbytes)
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def require_memory(what: str, nbytes: float, hint: str = "") -> None:
    """ValueError if ``what`` would need more than :data:`MEMORY_FRACTION` of
    :func:`machine_memory` (``nbytes``: an estimate of its peak), with the estimate and what to
    change (``hint``) in the message. Call it before the work starts.

    Example:
        >>> require_memory("a 10 x 10 array", 800)
    """
    limit = machine_memory()
    if nbytes > MEMORY_FRACTION * limit:
        raise ValueError(f"{what} would need about {format_bytes(nbytes)}, more than this machine can hold "
                         f"({format_bytes(limit)} of memory){'; ' + hint if hint else ''}")
