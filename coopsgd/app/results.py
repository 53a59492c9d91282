"""A run's result files and table: ``results.json``, ``results.csv``, ``history.csv`` and the PNG
figures, written as one set, all or nothing, by one run at a time per folder; the comparison table
printed by ``compare`` and ``train``."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
from collections.abc import Callable

from coopsgd.app import files
from coopsgd.app.files import to_json

__all__ = ["HISTORY_KEYS", "SET_BYTES", "SUMMARY_COLUMNS", "format_table", "output_folder", "prepare_out",
           "result_files", "write_results"]

HISTORY_KEYS = ("step", "time", "loss", "batch_loss", "consensus", "test_accuracy", "tau")
"""Columns of a run's history, one row per evaluation (step 0, then after each block that crosses a
multiple of ``eval_every``, and at the end): ``time`` simulated seconds; ``loss`` the worker-averaged
loss on the whole training set (at most ``EVAL_MAX`` examples of it); ``batch_loss`` and ``consensus`` the means over the block's steps of
the mini-batch loss and of the consensus distance (1/m) Σ‖x_i − x̄‖² after each step; ``test_accuracy``
of the model ``X π`` the mixing preserves (the column average for a doubly stochastic W); ``tau``
the period in force."""


SET_BYTES = 256 * 1024
"""Free space the output folder is probed for before a run: about what a result set of a few runs
takes (three PNG figures of some 40 kB each, the tables)."""


FIGURES = {
    "loss_vs_step.png": ("step", "loss", "iteration", "training loss (worker average)"),
    "loss_vs_time.png": ("time", "loss", "simulated wall-clock time (s)", "training loss (worker average)"),
    "consensus.png": ("step", "consensus", "iteration", r"consensus distance $\frac{1}{m}\sum_i \|x_i - \bar{x}\|^2$"),
}
"""File name → (x key, y key, x label, y label) of the figures every result set has (drawn by
:func:`coopsgd.app.plotting.plot_curves`)."""


def result_files() -> tuple[str, ...]:
    """The names of a result set: ``results.json``, ``results.csv``, ``history.csv`` and the figures."""
    return ("results.json", "results.csv", "history.csv", *FIGURES)


def prepare_out(path) -> str:
    """Check, before any work, that a result set can be written into ``path``, and leave it as it
    was: the folder is created if missing (and removed again), refused while another run holds it,
    tidied of what killed runs left (:func:`coopsgd.app.files.clean_orphans`), and probed by
    creating and removing the real files. Raises ValueError naming the path if not.

    :func:`output_folder` does the same and holds the folder for a whole run."""
    created = files.make_folder(path)
    try:
        with files.FolderLock(path, what="output folder"):
            files.clean_orphans(path)
            files.probe_folder(path, result_files(), reserve=SET_BYTES)
    finally:
        files.remove_folders(created)
    return os.fspath(path)


@contextlib.contextmanager
def output_folder(path, note: Callable[[str], None] | None = None):
    """Hold the results folder ``path`` for a run's whole life: create it, take its lock (another
    run into it is refused with ValueError while this one lives; ``note`` hears of a lock taken over
    from a killed run), tidy orphans, probe the real files, and yield the path. On leaving, the lock
    is released, and a folder this created is removed if the run left nothing in it.

    Example::

        with output_folder("runs/x") as out:
            result = experiment.run(cfg)
            write_results([result], out)
    """
    path = os.fspath(path)
    created = files.make_folder(path)
    try:
        with files.FolderLock(path, note=note, what="output folder"):
            files.clean_orphans(path)
            files.probe_folder(path, result_files(), reserve=SET_BYTES)
            yield path
    finally:
        files.remove_folders(created)


def _text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", newline="") as f:
            f.write(text)

    return write


SUMMARY_COLUMNS = ("name", "final_train_loss", "test_accuracy", "comm_rounds", "bytes_communicated",
                   "simulated_time", "real_time", "final_consensus", "zeta", "steps")
"""The columns of ``results.csv``, one row per run."""


def write_results(results: list, out: str, title: str = "") -> list[str]:
    """Write ``results.json``, ``results.csv`` (one row per run), ``history.csv`` (one row per
    evaluation) and the PNG figures into ``out``, all or nothing (:func:`coopsgd.app.files.write_set`:
    a failure leaves the folder's earlier set as it was); returns the paths written.

    Raises:
        ValueError: another run holds ``out``, or a file cannot be written (naming it and why).
    """
    from coopsgd.app import plotting

    payload = {"runs": [{"name": r["name"], "config": r["config"], "summary": r["summary"],
                         "history": r["history"]} for r in results]}
    summary = io.StringIO()
    w = csv.writer(summary)
    w.writerow(SUMMARY_COLUMNS)
    for r in results:
        s = {**r["summary"], "name": r["name"]}
        w.writerow([s.get(c) for c in SUMMARY_COLUMNS])
    history = io.StringIO()
    w = csv.writer(history)
    w.writerow(("name",) + HISTORY_KEYS)
    for r in results:
        h = r["history"]
        for i in range(len(h["step"])):
            w.writerow([r["name"]] + [h[k][i] for k in HISTORY_KEYS])
    writers = {"results.json": _text(to_json(payload, indent=1) + "\n"),
               "results.csv": _text(summary.getvalue()),
               "history.csv": _text(history.getvalue())}
    histories = {r["name"]: r["history"] for r in results}
    for name, (x, y, xl, yl) in FIGURES.items():
        writers[name] = functools.partial(plotting.plot_curves, histories, x, y, xlabel=xl, ylabel=yl,
                                          title=title or None)
    created = files.make_folder(out)
    try:
        with files.FolderLock(out, what="output folder"):
            files.clean_orphans(out)
            return files.write_set(out, writers)
    except BaseException:
        files.remove_folders(created)
        raise


def _human_bytes(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return f"{b:.1f} TB"  # pragma: no cover


def format_table(results: list) -> str:
    """The comparison table: one line per run."""
    head = ("algorithm", "train loss", "test acc", "comm rounds", "bytes sent", "sim time (s)", "real time (s)")
    rows = []
    for r in results:
        s = r["summary"]
        rows.append((r["name"], f"{s['final_train_loss']:.4f}", f"{s['test_accuracy']:.3f}",
                     str(s["comm_rounds"]), _human_bytes(s["bytes_communicated"]),
                     f"{s['simulated_time']:.2f}", f"{s['real_time']:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
