"""The ``coopsgd`` command line: ``coopsgd {compare,train,topology,verify} …``.

Bad input anywhere (an unknown name, a bad or too large number, an unreadable file, an output folder
that cannot be written, a size this machine cannot hold) ends with one line on stderr and exit code 2,
with no traceback and nothing half-written; a run that diverges (a NaN or Inf loss) ends with one
line and exit code 1. Set ``COOPSGD_DEBUG=1`` to see the traceback instead.

The console script keeps JAX's compiled programs in a persistent cache
(:func:`compilation_cache_dir`; ``COOPSGD_COMPILATION_CACHE=0`` turns it off), and compiles a
``--quick`` run for compile time (:data:`QUICK_XLA_FLAGS`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from coopsgd.app.commands import COMMANDS, CommandError

__all__ = ["UsageError", "build_parser", "compilation_cache_dir", "entry", "main"]

PROG = "coopsgd"

COMPILING = ("compare", "train", "verify")
"""The commands that compile JAX programs (the ones the persistent compilation cache serves)."""


class UsageError(Exception):
    """An argparse error, reported on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage over several lines and sys.exit(2)
        raise UsageError(f"{self.prog}: error: {message}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _chosen(argv: list[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def build_parser(argv: list[str] | None = None):
    """The parser; only the chosen command's module is imported (the others get a stub parser).

    Returns ``(parser, modules)`` with ``modules`` mapping imported command names to modules, and
    ``None`` for a command whose module failed to import (with the error under ``"<name>!"``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    parser = _Parser(prog=PROG, description="Cooperative SGD on JAX: train, compare, inspect topologies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    modules: dict = {}
    for name, help_text in COMMANDS.items():
        if name == chosen:
            try:
                module = importlib.import_module(f"coopsgd.app.commands.{name}")
                module.register(sub)
                modules[name] = module
                continue
            except Exception as err:  # a broken module must not break the other commands
                if os.environ.get("COOPSGD_DEBUG"):
                    raise
                modules[name] = None
                modules[name + "!"] = f"{type(err).__name__}: {err}"
        if name not in sub.choices:
            stub = sub.add_parser(name, help=help_text, add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
    return parser, modules


def _version() -> str:
    from coopsgd import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, modules = build_parser(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help / --version
            return int(exit_.code or 0)
        if args.command is None:
            raise UsageError(f"{PROG}: error: choose a command: {', '.join(COMMANDS)} (see {PROG} --help)")
        module = modules.get(args.command)
        if module is None:
            reason = modules.get(args.command + "!", "module not loaded")
            print(_one_line(f"{PROG} {args.command}: unavailable ({reason})"), file=sys.stderr)
            return 1
        return int(module.run(args) or 0)
    except (UsageError, CommandError, ValueError, OSError, OverflowError) as err:
        if os.environ.get("COOPSGD_DEBUG"):
            raise
        msg = str(err) if isinstance(err, UsageError) else f"{PROG}: error: {err}"
        if isinstance(err, OSError) and err.filename and str(err.filename) not in msg:
            msg += f": {err.filename}"
        print(_one_line(msg), file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the engine's NonFiniteError: the run diverged
        if os.environ.get("COOPSGD_DEBUG"):
            raise
        print(_one_line(f"{PROG}: the run diverged: {err}"), file=sys.stderr)
        return 1
    except Exception as err:
        # Out of memory, on the host or in XLA: the configuration is too large for this machine.
        if os.environ.get("COOPSGD_DEBUG") or not (
                isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)):
            raise
        print(_one_line(f"{PROG}: error: not enough memory for this configuration ({err}); "
                        "use fewer workers, nodes, seeds or steps"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def compilation_cache_dir() -> str | None:
    """The folder of JAX's persistent compilation cache for the command line, or ``None`` when it
    is off: ``$COOPSGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/coopsgd/jax`` (``~/.cache/coopsgd/jax``);
    off with ``COOPSGD_COMPILATION_CACHE=0``, and left to JAX when ``JAX_COMPILATION_CACHE_DIR`` is
    set."""
    if os.environ.get("COOPSGD_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.environ.get("COOPSGD_CACHE_DIR"):
        return os.environ["COOPSGD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coopsgd", "jax")


def _enable_compilation_cache() -> None:
    """Compiled programs are kept across runs (a warm ``coopsgd compare --quick`` skips most of its
    compilation). The cache runs code it finds, so it lives in a folder only this user can write;
    one that cannot be made is skipped with a warning, never an error."""
    folder = compilation_cache_dir()
    if folder is None:
        return
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as err:
        print(_one_line(f"{PROG}: warning: no compilation cache ({folder}: {err.strerror})"), file=sys.stderr)
        return
    import jax

    from coopsgd.parallel import programs

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small programs add up
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:  # a trainer's rounds, kept whole: a later run skips tracing them too
        programs.keep_in(os.path.join(folder, "programs"))
    except OSError as err:
        print(_one_line(f"{PROG}: warning: compiled rounds are not kept ({folder}: {err.strerror})"), file=sys.stderr)


QUICK_XLA_FLAGS = {
    "xla_backend_optimization_level": ("0", None),  # LLVM's lowest optimisation level
    "xla_cpu_use_fusion_emitters": ("false", (0, 11)),  # XLA:CPU's elemental kernels, not its MLIR ones
    "xla_cpu_parallel_codegen_split_count": ("1", (0, 11)),  # one LLVM module per program, not split for threads
}
"""What a ``--quick`` run adds to ``XLA_FLAGS``: flag → (value, the jaxlib (major, minor) it is added
below). XLA ends the process on a flag it does not know, so a flag newer than XLA's oldest goes only
to the jaxlib releases it was checked in (0.7.0 and 0.10.2 ran with both; 0.8.0's library has them)."""


def _jaxlib_version() -> tuple[int, int]:
    """The installed jaxlib's (major, minor); one above every limit when it cannot be read."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = re.match(r"(\d+)\.(\d+)", version("jaxlib"))
    except PackageNotFoundError:
        found = None
    return (int(found[1]), int(found[2])) if found else (1 << 30, 0)


def _compile_for_speed() -> None:
    """A ``--quick`` run's programs run for milliseconds, so XLA compiles them for compile time
    (:data:`QUICK_XLA_FLAGS`: the 21 rounds of a ``compare --quick`` take 5.3 s of XLA:CPU's time,
    against 13.1 s at the lowest LLVM level alone and 23.8 s by default, and run about as fast; the
    matrix products are library calls either way; the results agree to float32 round-off; one LLVM
    module per program, not 32 compiled on threads, saves a tenth of a cold run's CPU time). A flag
    already in ``XLA_FLAGS`` keeps the user's value."""
    flags = os.environ.get("XLA_FLAGS", "")
    jaxlib = _jaxlib_version()
    added = [f"--{name}={value}" for name, (value, below) in QUICK_XLA_FLAGS.items()
             if name not in flags and (below is None or jaxlib < below)]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def _exit_now(code: int) -> None:
    """End the process without Python's teardown, whose JAX exit handler clears every backend and
    cache (0.4–0.8 s that a finished command has no use for): the command has closed what it
    wrote, and the streams and loggers are flushed here. Not after a multi-process run, whose
    shutdown the other processes wait for."""
    import logging

    if "jax" in sys.modules and sys.modules["jax"].process_count() > 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:  # pragma: no cover - the console script; tests call main()
    """The ``coopsgd`` console script: the process-wide set-up (the compilation cache; for a
    ``--quick`` run, compiling for compile time), then :func:`main`, then a quick exit."""
    argv = sys.argv[1:]
    compiling = _chosen(argv) in COMPILING
    if compiling:
        _enable_compilation_cache()
        if "--quick" in argv:
            _compile_for_speed()
    code = main()
    if compiling:
        _exit_now(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
