"""A run's result files and table: ``results.json``, ``results.csv``, ``history.csv`` and the PNG
figures, written atomically; the comparison table printed by ``compare`` and ``train``."""

from __future__ import annotations

import csv
import io
import os

from coopsgd.app.files import atomic_write, to_json, writable_folder

__all__ = ["HISTORY_KEYS", "SUMMARY_COLUMNS", "format_table", "prepare_out", "write_results"]

HISTORY_KEYS = ("step", "time", "loss", "batch_loss", "consensus", "test_accuracy", "tau")
"""Columns of a run's history, one row per evaluation (step 0, then after each block that crosses a
multiple of ``eval_every``, and at the end): ``time`` simulated seconds; ``loss`` the worker-averaged
loss on the whole training set (at most ``EVAL_MAX`` examples of it); ``batch_loss`` and ``consensus`` the means over the block's steps of
the mini-batch loss and of the consensus distance (1/m) Σ‖x_i − x̄‖² after each step; ``test_accuracy``
of the model ``X π`` the mixing preserves (the column average for a doubly stochastic W); ``tau``
the period in force."""



def prepare_out(path) -> str:
    """Check that the results folder ``path`` can be created or written, without creating it (so
    a run that fails leaves nothing behind); :func:`write_results` creates it. Raises ValueError
    naming the folder if not."""
    return writable_folder(path)


def _atomic_write(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


SUMMARY_COLUMNS = ("name", "final_train_loss", "test_accuracy", "comm_rounds", "bytes_communicated",
                   "simulated_time", "real_time", "final_consensus", "zeta", "steps")


def write_results(results: list, out: str, title: str = "") -> list[str]:
    """Write ``results.json``, ``results.csv`` (one row per run), ``history.csv`` (one row per
    evaluation) and the PNG figures into ``out``; returns the paths written."""
    from coopsgd.app import plotting

    os.makedirs(out, exist_ok=True)
    payload = {"runs": [{"name": r["name"], "config": r["config"], "summary": r["summary"],
                         "history": r["history"]} for r in results]}
    paths = []
    p = os.path.join(out, "results.json")
    _atomic_write(p, to_json(payload, indent=1) + "\n")
    paths.append(p)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for r in results:
        s = {**r["summary"], "name": r["name"]}
        w.writerow([s.get(c) for c in SUMMARY_COLUMNS])
    p = os.path.join(out, "results.csv")
    _atomic_write(p, buf.getvalue())
    paths.append(p)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("name",) + HISTORY_KEYS)
    for r in results:
        h = r["history"]
        for i in range(len(h["step"])):
            w.writerow([r["name"]] + [h[k][i] for k in HISTORY_KEYS])
    p = os.path.join(out, "history.csv")
    _atomic_write(p, buf.getvalue())
    paths.append(p)
    histories = {r["name"]: r["history"] for r in results}
    paths += plotting.plot_run_figures(histories, out, title=title)
    return paths


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
