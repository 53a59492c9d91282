"""The ``coopsgd`` command line: ``coopsgd {compare,train,topology,verify} …``.

Bad input anywhere (an unknown name, a bad or too large number, an unreadable file, an output folder
that cannot be written, a size this machine cannot hold) ends with one line on stderr and exit code 2,
with no traceback and nothing half-written; a run that diverges (a NaN or Inf loss) ends with one
line and exit code 1. Set ``COOPSGD_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from coopsgd.app.commands import COMMANDS, CommandError

__all__ = ["UsageError", "build_parser", "main"]

PROG = "coopsgd"


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
