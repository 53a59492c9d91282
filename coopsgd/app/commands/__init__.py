"""Subcommands of the ``coopsgd`` command line, one module each.

Each module ``coopsgd.app.commands.<name>`` exposes ``register(subparsers)`` (adds its parser, named
``<name>``) and ``run(args) -> int``. :data:`COMMANDS` lists them with a one-line help; the
dispatcher in :mod:`coopsgd.app.cli` imports only the module of the command being run, so a missing or
broken module breaks its own command and no other.
"""

from __future__ import annotations

__all__ = ["COMMANDS", "CommandError", "add_metrics_option", "check_png_path", "renamed_option", "warnings_printer"]

COMMANDS: dict[str, str] = {
    "compare": "train several algorithms on the same data and compare loss, accuracy, communication and time",
    "train": "one training run from a TOML configuration file (or the defaults)",
    "topology": "a named graph's mixing matrix W: summary, zeta, spectral gap, optional drawing",
    "verify": "run an algorithm beside its convergence bound",
}
"""Command name → one-line help."""


class CommandError(Exception):
    """Bad input found by a command: the CLI prints the message on one line and exits with 2."""


def check_png_path(option: str, path: str) -> None:
    """A PNG output path: it must end in .png and its folder must be writable (probed, not assumed)."""
    import os

    from coopsgd.app.files import writable_folder

    if not path.lower().endswith(".png") or os.path.isdir(path):
        raise CommandError(f"{option} {path!r} must be a file name ending in .png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {option} {path!r}: folder {folder!r} does not exist")
    try:
        writable_folder(folder, f"{option} folder")
    except ValueError as err:
        raise CommandError(str(err)) from None


def warnings_printer():
    """``note(message)``: one line ``coopsgd: warning: …`` on stderr per distinct message."""
    import sys

    said = set()

    def note(message: str) -> None:
        if message not in said:
            said.add(message)
            print(" ".join(f"coopsgd: warning: {message}".split()), file=sys.stderr, flush=True)

    return note


def renamed_option(parser, old: str, new: str) -> None:
    """Refuse the old spelling ``old`` of option ``new`` with a pointer to the new one (hidden from --help)."""
    import argparse

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            raise CommandError(f"{old} was renamed: use {new}")

    parser.add_argument(old, action=Renamed, nargs="?", help=argparse.SUPPRESS, dest=f"_renamed_{old.lstrip('-')}")


def add_metrics_option(parser) -> None:
    """``--metrics``: what a run writes into ``OUT/metrics/`` while it goes (:mod:`coopsgd.app.metrics`)."""
    from coopsgd.app.metrics import KINDS

    parser.add_argument("--metrics", choices=KINDS, default="both",
                        help="records written while each run goes, into OUT/metrics/ (default both: "
                        "<run>.jsonl and TensorBoard event files under OUT/metrics/tensorboard)")
