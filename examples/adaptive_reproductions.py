"""The seed papers' headline comparisons, timed under each paper's system model, on 2 CPU cores.

Every run trains the bundled 8x8 digits MLP on simulated workers with coopsgd's engine and records
the full training loss of the workers' averaged model after every round; the rounds are then timed
by coopsgd.sim.runtime under the paper's cluster (model bytes, compute time per step, latency and
bandwidth, stragglers: examples/reproductions/systems.py), with every mixing charged what the
engine's account says it sends. Comparisons:

- adacomm:  AdaComm vs fully synchronous SGD vs fixed-tau local SGD; ratio sweep; stragglers
- adpsgd:   ADPSGD vs constant period (same budget) vs full communication at 100 and 10 Gbps
- coop:     EASGD with overlap and decentralized periodic averaging vs fully synchronous SGD
- overlap:  Overlap Local-SGD (and Overlap-M) vs local SGD, EASGD, sync SGD, with stragglers
- matcha:   MATCHA vs D-PSGD on the authors' 16-node graph; ratio sweep
- batch:    adaptive (norm test) vs fixed batch size local SGD, noise-dominated
- scaling:  docs/scaling.md's predictions for 8 to 4 096 accelerators

Usage::

    python examples/adaptive_reproductions.py --out docs/img                 # full: about 5.5 minutes
    python examples/adaptive_reproductions.py --quick --write-docs docs       # the tested tables

Prints one JSON object per comparison; ``--write-docs DIR`` rewrites the tables between
``<!-- repro:<mode>:<key> -->`` and ``<!-- /repro -->`` in DIR/reproductions.md and DIR/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from reproductions import scaling_report  # noqa: E402
from reproductions.experiments import EXPERIMENTS, Config  # noqa: E402

ALL = {**EXPERIMENTS, "scaling": scaling_report.exp_scaling}
MARK = re.compile(r"(<!-- repro:(\w+):(\w+) -->\n)(.*?)(<!-- /repro -->)", re.S)


def write_tables(path: pathlib.Path, mode: str, tables: dict) -> list[str]:
    """Replace every ``<!-- repro:<mode>:<key> -->`` block of ``path`` whose key is in ``tables``."""
    text = path.read_text()
    done = []

    def sub(match):
        if match.group(2) != mode or match.group(3) not in tables:
            return match.group(0)
        done.append(match.group(3))
        return match.group(1) + tables[match.group(3)] + "\n" + match.group(5)

    path.write_text(MARK.sub(sub, text))
    return done


def run(names, cfg: Config, out: str, emit=print) -> dict:
    """Run the named comparisons; return every table by key (and emit each result as JSON)."""
    tables, results = {}, {}
    for name in names:
        t0 = time.perf_counter()
        result = ALL[name](cfg, out, results) if name == "scaling" else ALL[name](cfg, out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        tables.update(result["tables"])
        emit(json.dumps({k: v for k, v in result.items() if k != "tables"}, default=str))
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs (default: docs/img)")
    parser.add_argument("--only", default=",".join(ALL),
                        help=f"comma-separated comparisons, from: {', '.join(ALL)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="the small configuration the tests check")
    parser.add_argument("--write-docs", metavar="DIR", default=None,
                        help="rewrite the marked tables of DIR/reproductions.md and DIR/scaling.md")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
        parser.error(f"--only: unknown comparison(s) {unknown or names}; choose from {', '.join(ALL)}")
    if args.write_docs is not None and not pathlib.Path(args.write_docs).is_dir():
        parser.error(f"--write-docs: {args.write_docs!r} is not a folder")
    os.makedirs(args.out, exist_ok=True)
    cfg = Config(quick=args.quick)
    tables = run(names, cfg, args.out)
    if args.write_docs is not None:
        for page in ("reproductions.md", "scaling.md"):
            path = pathlib.Path(args.write_docs) / page
            if path.is_file():
                done = write_tables(path, cfg.mode, tables)
                print(f"{path}: {len(done)} tables ({cfg.mode})", file=sys.stderr)
    return tables


if __name__ == "__main__":
    main()
