"""Writing result files safely: one file or a whole set atomically, the folder probed by really
writing into it before work starts, and one writer per folder (an ``fcntl`` lock).

A *set* (:func:`write_set`) is written into a staging folder inside the target folder (so on the
same file system) and moved into place only once every file is complete: a failure (a full disk)
or a kill while writing leaves the earlier set untouched. A kill during the final renames leaves a
staging folder marked complete, which :func:`clean_orphans` finishes moving on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

__all__ = ["LOCK_NAME", "STAGING_PREFIX", "FolderLock", "atomic_write", "clean_orphans", "make_folder",
           "probe_folder", "reason", "remove_folders", "to_json", "writable_folder", "write_set"]

LOCK_NAME = ".coopsgd.lock"
"""The lock file a run holds in its output folder (removed when the run ends)."""

STAGING_PREFIX = ".coopsgd-staging-"
"""Prefix of the staging folders :func:`write_set` writes a set into."""

_COMPLETE = ".complete"
_ORPHAN_TMP = re.compile(r"^\.tmp[a-z0-9_]{8}\.(json|csv|png)$")  # atomic_write's temporary files
_PROBE_BYTES = b"\0" * 4096


def _default_mode() -> int:
    """0o666 less the process umask: what a plain open() would have created (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def reason(err: BaseException) -> str:
    """What went wrong, in a few words: an OSError's ``strerror`` ("no space left on device"), the
    OS error a TensorStore message carries, or the first line of the innermost cause."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        return text[:1].lower() + text[1:]
    while err.__cause__ is not None:
        err = err.__cause__
    code = re.search(r"os_error_code='?(\d+)", str(err))
    if code:
        text = os.strerror(int(code.group(1)))
        return text[:1].lower() + text[1:]
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def atomic_write(path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails, so ``path`` is either the old file (or
    absent) or the complete new one. An OSError is raised again with ``path`` as its file name.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp", suffix=os.path.splitext(path)[1])
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename != path:
            raise OSError(err.errno, err.strerror or str(err), path) from None
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
        if os.path.islink(probe):
            raise ValueError(f"cannot create {what} {path!r}: {probe!r} is a symbolic link to "
                             f"{os.readlink(probe)!r}, which does not exist")
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


def make_folder(path, what: str = "output folder") -> list[str]:
    """Create the folder ``path`` and any missing parents; return the folders created, outermost
    first (for :func:`remove_folders`).

    Raises:
        ValueError: naming the folder and why it cannot be created — a part of the path that is a
            file or a dangling symbolic link, a name too long, a read-only or full file system.
    """
    path = os.fspath(path)
    full = os.path.abspath(path)
    missing, p = [], full
    while not os.path.isdir(p):
        if os.path.lexists(p):
            if os.path.islink(p):
                raise ValueError(f"cannot create {what} {path!r}: {p!r} is a symbolic link to "
                                 f"{os.readlink(p)!r}, which does not exist")
            if p == full:
                raise ValueError(f"{what} {path!r} exists and is not a folder")
            raise ValueError(f"cannot create {what} {path!r}: {p!r} is not a folder")
        missing.append(p)
        p = os.path.dirname(p)
    created: list[str] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if os.path.isdir(d):  # made meanwhile by someone else
                continue
            remove_folders(created)
            raise ValueError(f"cannot create {what} {path!r}: {d!r} is not a folder") from None
        except OSError as err:
            remove_folders(created)
            where = "" if d == full else f" (creating {d!r})"
            raise ValueError(f"cannot write {what} {path!r}: {reason(err)}{where}") from None
        created.append(d)
    return created


def remove_folders(created: Iterable[str]) -> None:
    """Remove the folders :func:`make_folder` created, innermost first, as long as they are empty."""
    for d in reversed(list(created)):
        try:
            os.rmdir(d)
        except OSError:
            return


def probe_folder(folder, names: Iterable[str], what: str = "output folder", reserve: int = 0) -> None:
    """Check that the files ``names`` can be written into the existing ``folder`` by writing them:
    each absent name is created there with a block of data and removed, a present one must not be a
    folder, and a staging folder (:func:`write_set`) is created with ``reserve`` bytes (at least a
    block) of data in it, synced to disk, and removed.

    Raises:
        ValueError: naming the path that cannot be written and why (e.g. no space left on device).
    """
    folder = os.fspath(folder)
    names = list(names)

    def write_block(p: str, size: int = len(_PROBE_BYTES)) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            left = size
            while left > 0:
                left -= os.write(fd, _PROBE_BYTES[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(p)

    doing = ""
    try:
        for name in names:
            target = os.path.join(folder, name)
            doing = f" writing {target!r}"
            if os.path.isdir(target):
                raise ValueError(f"cannot write {target!r}: it is a folder")
            if not os.path.lexists(target):
                write_block(target)
        doing = f" (probing for {max(reserve, len(_PROBE_BYTES)) // 1024} kB of free space)"
        staging = tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX)
        try:
            write_block(os.path.join(staging, names[0] if names else "probe"), max(reserve, len(_PROBE_BYTES)))
        finally:
            os.rmdir(staging)
    except OSError as err:
        raise ValueError(f"cannot write {what} {folder!r}: {reason(err)}{doing}") from None


def write_set(folder, writers: Mapping[str, Callable[[str], None]]) -> list[str]:
    """Write a set of files into the existing ``folder`` all-or-nothing; return their paths.

    ``writers`` maps each file name to ``write(path)``, called on a path in a fresh staging folder
    inside ``folder``; once all are written (and synced) the files are renamed into ``folder``. If
    any write fails the staging folder is removed and ``folder`` keeps its earlier files.

    Raises:
        ValueError: naming the file that could not be written and why.
    """
    folder = os.fspath(folder)
    staging = tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX)
    try:
        for name, write in writers.items():
            try:
                write(os.path.join(staging, name))
                _sync(os.path.join(staging, name))
            except OSError as err:
                raise ValueError(f"{reason(err)} writing {os.path.join(folder, name)!r}") from None
        try:
            open(os.path.join(staging, _COMPLETE), "w").close()
            _sync(staging)
        except OSError as err:
            raise ValueError(f"{reason(err)} writing {folder!r}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, folder)
    return [os.path.join(folder, name) for name in writers]


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: str, folder: str) -> None:
    for name in sorted(os.listdir(staging)):
        if name != _COMPLETE:
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    os.remove(os.path.join(staging, _COMPLETE))
    os.rmdir(staging)


def clean_orphans(folder) -> list[str]:
    """Tidy what killed runs left in ``folder`` (call it holding the folder's lock): a staging
    folder marked complete is moved into place, any other is removed, and so are
    :func:`atomic_write`'s temporary files. Returns the names handled."""
    folder = os.fspath(folder)
    done = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(full) and not os.path.islink(full):
            if os.path.exists(os.path.join(full, _COMPLETE)):
                _move_into_place(full, folder)
            else:
                shutil.rmtree(full, ignore_errors=True)
            done.append(name)
        elif _ORPHAN_TMP.match(name) and os.path.isfile(full):
            os.remove(full)
            done.append(name)
    return done


_HELD: dict[str, list] = {}  # real path of a locked folder -> [file descriptor, depth]


class FolderLock:
    """An exclusive ``fcntl.flock`` on the folder ``folder``, through its lock file :data:`LOCK_NAME`
    (which records the holder's pid, host and start time, and is removed on release).

    Re-entrant within a process. A lock file left by a run that was killed is taken over, and
    ``note`` (if given) is called with one line saying so.

    Example::

        with FolderLock("runs/x"):
            ...  # no other process can hold runs/x meanwhile

    Raises (on acquiring):
        ValueError: another live process holds the folder (naming it), or the folder cannot be locked.
    """

    def __init__(self, folder, note: Callable[[str], None] | None = None, what: str = "folder"):
        self.folder = os.fspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.note = note
        self._key = None

    def acquire(self) -> FolderLock:
        """Take the lock (a stale one from a killed run is taken over, with a note); ValueError if a
        live process holds it."""
        key = os.path.realpath(self.folder)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _default_mode())
            except OSError as err:
                raise ValueError(f"cannot lock {self.what} {self.folder!r}: {reason(err)} creating "
                                 f"{self.path!r}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ValueError(f"{self.what} {self.folder!r} is in use by another run ({holder}); wait "
                                     f"for it to end or choose another {self.what}") from None
                raise ValueError(f"cannot lock {self.what} {self.folder!r}: {reason(err)}") from None
            try:  # the file may have been removed by its last holder between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous != "unknown" and self.note is not None:
            self.note(f"taking over {self.what} {self.folder!r} from a run that did not finish ({previous})")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        with contextlib.suppress(OSError):  # on a full disk the lock holds without its record
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Give the lock back and remove the lock file."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(held[0])

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "unknown"


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
