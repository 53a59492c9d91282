"""Writing result files atomically: a reader never sees half a file, a failure leaves none."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable

import numpy as np

__all__ = ["atomic_write", "to_json", "writable_folder"]


def _default_mode() -> int:
    """0o666 less the process umask: what a plain open() would have created (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails, so ``path`` is either the old file (or
    absent) or the complete new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def writable_folder(path, what: str = "output folder") -> str:
    """Check that the folder ``path`` exists and is writable, or can be created, without creating it.

    Probes by really creating (and at once removing) a temporary file in ``path`` or in its nearest
    existing ancestor, since permission bits say nothing for root or for special file systems.

    Raises:
        ValueError: naming the folder and why it cannot be written.
    """
    path = os.fspath(path)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        if probe == path:
            raise ValueError(f"{what} {path!r} exists and is not a folder")
        raise ValueError(f"cannot create {what} {path!r}: {probe!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {what} {path!r}: {err.strerror or err} in {probe!r}") from None
    return path


def to_json(obj, **kwargs) -> str:
    """``json.dumps`` that strict parsers accept: NumPy scalars and arrays become plain values and
    non-finite floats (NaN, ±Inf) become ``null``."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        if isinstance(x, np.generic):
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)
