"""``coopsgd compare``: train several algorithms on the same data and compare them.

With no arguments: a small MLP on the bundled 8×8 digits, split IID across 8 simulated workers,
trained by every available algorithm under the same runtime model (compute time per step per
worker, communication from the bytes each W sends). Prints a table (final training loss, test
accuracy, communication rounds, bytes sent, simulated and real time) and writes into ``--out`` the
results (JSON, CSV) and PNG plots (loss against iterations and against simulated time, consensus
distance).
"""

from __future__ import annotations

import os
import sys
import time

from coopsgd.app.commands import COMMANDS, CommandError, add_metrics_option, renamed_option, warnings_printer

__all__ = ["DEFAULT_JOBS", "DEFAULT_OUT", "QUICK", "register", "run"]

DEFAULT_OUT = "runs/compare"
"""Where ``coopsgd compare`` writes without ``--out``."""

QUICK = {"steps": 96, "eval_every": 16}
"""What ``--quick`` changes (about 19 s on 2 CPU cores the first time, 9 s with the caches warm;
the console script also compiles it for compile time, ``coopsgd.app.cli.QUICK_XLA_FLAGS``)."""

DEFAULT_JOBS = min(2, os.cpu_count() or 1)
"""Algorithms ``compare`` trains at once without ``--jobs``: two (one's XLA compilation and run
overlap the other's tracing, which holds Python's lock), one on a single core."""

DEFAULT = {"steps": 800, "eval_every": 16, "tau": 8}
"""The default comparison's own settings (on top of ``experiment.DEFAULTS``)."""


def register(subparsers) -> None:
    """Add the ``compare`` parser to ``subparsers``."""
    p = subparsers.add_parser(
        "compare",
        help=COMMANDS["compare"],
        description="Train every chosen algorithm on the same data, model, workers and runtime model; "
        "print a comparison table and write results and plots into --out.",
    )
    from coopsgd.app import config

    d = {**config.DEFAULTS, **DEFAULT}
    p.add_argument("--algorithms", "-a", metavar="A,B,C",
                   help="comma-separated subset (default: all available)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run ({QUICK['steps']} steps, about 19 s the first time and 9 s after; "
                   f"default: {DEFAULT['steps']} steps)")
    p.add_argument("--out", "-o", metavar="DIR", help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--data", metavar="NPZ", help="your own .npz with arrays x and y (default: bundled digits)")
    p.add_argument("--workers", "-m", type=int, metavar="M", help=f"number of simulated workers (default {d['workers']})")
    p.add_argument("--steps", type=int, metavar="K", help=f"iterations per algorithm (default {d['steps']})")
    p.add_argument("--tau", type=int, metavar="T", help=f"period of the local-update algorithms (default {d['tau']})")
    p.add_argument("--topology", metavar="NAME", help=f"graph of the decentralized algorithms (default {d['topology']})")
    p.add_argument("--weights", metavar="RULE", help=f"weight rule on that graph (default {d['weights']})")
    p.add_argument("--split", choices=("iid", "dirichlet"),
                   help=f"how data is split across workers (default {d['split']})")
    p.add_argument("--dirichlet-alpha", type=float, metavar="A",
                   help="Dirichlet concentration for a non-IID split (implies --split dirichlet; default "
                   f"{d['dirichlet_alpha']})")
    renamed_option(p, "--alpha", "--dirichlet-alpha")
    p.add_argument("--model", choices=("mlp", "cnn"), help=f"model (default {d['model']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d['optimizer.lr']})")
    p.add_argument("--batch-size", type=int, metavar="B", help=f"per-worker batch size (default {d['batch_size']})")
    p.add_argument("--seed", type=int, help=f"seed (default {d['seed']})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key (as in coopsgd train), repeatable (default: none)")
    p.add_argument("--jobs", "-j", type=int, metavar="J",
                   help=f"algorithms trained at once, in threads (default {DEFAULT_JOBS}: one compiles while "
                   "another traces; 1 runs them one by one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    add_metrics_option(p)


def _base_config(args) -> dict:
    from coopsgd.app import config

    layer = dict(DEFAULT)
    if args.quick:
        layer.update(QUICK)
    flags = {"workers": args.workers, "steps": args.steps, "tau": args.tau, "topology": args.topology,
             "weights": args.weights, "split": args.split, "dirichlet_alpha": args.dirichlet_alpha,
             "model": args.model, "optimizer.lr": args.lr, "batch_size": args.batch_size,
             "seed": args.seed, "data": args.data}
    if args.dirichlet_alpha is not None and args.split is None:
        flags["split"] = "dirichlet"
    layer.update({k: v for k, v in flags.items() if v is not None})
    sets = dict(config.parse_override(t) for t in args.overrides)
    if "algorithm" in sets:
        raise CommandError("compare picks algorithms with --algorithms a,b,c, not --set algorithm=")
    out = args.out if args.out is not None else sets.pop("out", DEFAULT_OUT)
    return config.make_config(layer, sets, {"out": out})


def _algorithms(args) -> list[str]:
    from coopsgd.app import registry

    valid = registry.names()
    if args.algorithms is None:
        return valid
    names = [a.strip() for a in args.algorithms.split(",")]
    if not any(names):
        raise CommandError(f"--algorithms is empty; valid algorithms: {', '.join(valid)}")
    if not all(names):
        raise CommandError(f"--algorithms {args.algorithms!r} has an empty name (two commas or a comma at "
                           "an end); list names as a,b,c")
    unknown = [a for a in names if a not in valid]
    if unknown:
        raise CommandError(f"unknown algorithm {unknown[0]!r}; valid algorithms: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise CommandError(f"--algorithms lists a name twice: {args.algorithms!r}")
    return names


def _run_all(configs, jobs: int, run_one, report: bool) -> list:
    """``run_one(cfg, cancel, line)`` for every configuration, ``jobs`` at a time in threads (JAX
    compiles and runs without Python's lock, so one run's compilation overlaps another's tracing),
    the results in the configurations' order. ``line`` is a free progress-bar line; when one run
    fails or Ctrl-C comes, ``cancel`` stops the others at their next round end and the error is
    raised."""
    import queue
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    cancel, lines = threading.Event(), queue.SimpleQueue()
    for line in range(jobs):
        lines.put(line)

    def one(cfg):
        line = lines.get()
        try:
            result = run_one(cfg, cancel, line)
        finally:
            lines.put(line)
        if report and not cancel.is_set():
            s = result["summary"]
            print(f"  {cfg['algorithm']:<24} loss {s['final_train_loss']:.4f}  ({s['real_time']:.1f} s)",
                  file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(jobs, thread_name_prefix="coopsgd-compare") as pool:
        futures = [pool.submit(one, cfg) for cfg in configs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            return [f.result() for f in futures]  # the first failure, if any, is raised here
        except BaseException:  # a failed run or Ctrl-C: the others stop too, at their next round end
            cancel.set()
            for f in futures:
                f.cancel()
            while True:  # waited for through more Ctrl-Cs: a run left going inside XLA aborts the exit
                try:
                    wait(futures)
                    break
                except KeyboardInterrupt:
                    continue
            raise


def run(args) -> int:
    """Run ``coopsgd compare`` with the parsed ``args``; return the exit code."""
    from coopsgd.app import config, models, registry, results
    from coopsgd.app import data as data_mod
    from coopsgd.app import experiment as ex

    names = _algorithms(args)
    base = _base_config(args)
    jobs = DEFAULT_JOBS if args.jobs is None else args.jobs
    if jobs < 1:
        raise CommandError(f"--jobs must be an integer >= 1, got {args.jobs}")
    jobs = min(jobs, len(names))
    configs = [config.make_config(base, {"algorithm": a}) for a in names]
    dataset = data_mod.load(base["data"], base["test_fraction"], base["seed"])
    data_mod.split(dataset.y_train, base["workers"], base["split"], base["dirichlet_alpha"], base["seed"])
    model = models.make(base["model"], dataset.input_shape, max(dataset.num_classes, 2))
    config.check_fits(base, model, dataset.x_train[0].nbytes, runs=jobs)
    for cfg in configs:  # every name and range checked before anything is written
        registry.build(cfg)
    # The folder is locked for the whole run, its result files probed before training, and the
    # results written all or nothing.
    note = warnings_printer()
    with results.output_folder(base["out"], note=note) as out:
        split = base["split"] if base["split"] == "iid" else f"dirichlet alpha={base['dirichlet_alpha']:g}"
        print(f"coopsgd compare: {base['model']} on {dataset.name} ({len(dataset.y_train)} train / "
              f"{len(dataset.y_test)} test), m = {base['workers']} workers ({split}), {base['steps']} steps, "
              f"tau = {base['tau']}, topology {base['topology']}", flush=True)
        progress = not args.no_progress and sys.stderr.isatty()
        t0 = time.perf_counter()
        runs = _run_all(configs, jobs, lambda cfg, cancel, line: ex.run(
            cfg, dataset=dataset, progress=progress, metrics_dir=os.path.join(out, "metrics"), metrics=args.metrics,
            note=note, cancel=cancel, position=line), report=not progress)
        title = f"{base['model']} on {dataset.name}, m = {base['workers']}, {split}"
        paths = results.write_results(runs, out, title=title)
        print()
        print(results.format_table(runs))
        print(f"\ntotal real time {time.perf_counter() - t0:.1f} s; wrote "
              f"{', '.join(os.path.basename(p) for p in paths)} to {out}")
    return 0
