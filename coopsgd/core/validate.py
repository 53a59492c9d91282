"""Argument validators shared by every layer: each returns the clean value or raises a ValueError
naming the argument, the rule it breaks and the value it got.

Plain Python and NumPy; nothing here is traced by JAX (validation happens at the door, never inside
compiled code).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["INT32_MAX", "require_choice", "require_fraction", "require_int", "require_number", "require_proportion"]

INT32_MAX = 2**31 - 1
"""The largest step or round index the engine's int32 counters hold."""


def require_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``[minimum, maximum]`` (an integral float such as
    ``4.0`` is accepted); otherwise ValueError.

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
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
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
