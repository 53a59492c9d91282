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

from coopsgd.app.commands import CommandError, warnings_printer

__all__ = ["DEFAULT_OUT", "QUICK", "register", "run"]

DEFAULT_OUT = "runs/compare"

QUICK = {"steps": 96, "eval_every": 16}
"""What ``--quick`` changes (≤ 30 s on 2 CPU cores)."""

DEFAULT = {"steps": 800, "eval_every": 16, "tau": 8}
"""The default comparison's own settings (on top of ``experiment.DEFAULTS``)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several algorithms on the same data and compare loss, accuracy, communication and time",
        description="Train every chosen algorithm on the same data, model, workers and runtime model; "
        "print a comparison table and write results and plots into --out.",
    )
    p.add_argument("--algorithms", "-a", metavar="A,B,C",
                   help="comma-separated subset (default: all available)")
    p.add_argument("--quick", action="store_true", help=f"a short run ({QUICK['steps']} steps, <= 30 s)")
    p.add_argument("--out", "-o", metavar="DIR", help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--data", metavar="NPZ", help="your own .npz with arrays x and y (default: bundled digits)")
    p.add_argument("--workers", "-m", type=int, metavar="M", help="number of simulated workers (default 8)")
    p.add_argument("--steps", type=int, metavar="K", help=f"iterations per algorithm (default {DEFAULT['steps']})")
    p.add_argument("--tau", type=int, metavar="T", help="period of the local-update algorithms (default 8)")
    p.add_argument("--topology", metavar="NAME", help="graph of the decentralized algorithms (default ring)")
    p.add_argument("--weights", metavar="RULE", help="weight rule on that graph (default metropolis)")
    p.add_argument("--split", choices=("iid", "dirichlet"), help="how data is split across workers (default iid)")
    p.add_argument("--alpha", type=float, metavar="A",
                   help="Dirichlet concentration for a non-IID split (implies --split dirichlet)")
    p.add_argument("--model", choices=("mlp", "cnn"), help="model (default mlp)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, metavar="B", help="per-worker batch size (default 16)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key (as in coopsgd train), repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _base_config(args) -> dict:
    from coopsgd.app import config

    layer = dict(DEFAULT)
    if args.quick:
        layer.update(QUICK)
    flags = {"workers": args.workers, "steps": args.steps, "tau": args.tau, "topology": args.topology,
             "weights": args.weights, "split": args.split, "dirichlet_alpha": args.alpha,
             "model": args.model, "optimizer.lr": args.lr, "batch_size": args.batch_size,
             "seed": args.seed, "data": args.data}
    if args.alpha is not None and args.split is None:
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


def run(args) -> int:
    from coopsgd.app import config, models, registry, results
    from coopsgd.app import data as data_mod
    from coopsgd.app import experiment as ex

    names = _algorithms(args)
    base = _base_config(args)
    configs = [config.make_config(base, {"algorithm": a}) for a in names]
    dataset = data_mod.load(base["data"], base["test_fraction"], base["seed"])
    data_mod.split(dataset.y_train, base["workers"], base["split"], base["dirichlet_alpha"], base["seed"])
    model = models.make(base["model"], dataset.input_shape, max(dataset.num_classes, 2))
    config.check_fits(base, model, dataset.x_train[0].nbytes)
    for cfg in configs:  # every name and range checked before anything is written
        registry.build(cfg)
    # The folder is locked for the whole run, its result files probed before training, and the
    # results written all or nothing.
    with results.output_folder(base["out"], note=warnings_printer()) as out:
        split = base["split"] if base["split"] == "iid" else f"dirichlet alpha={base['dirichlet_alpha']:g}"
        print(f"coopsgd compare: {base['model']} on {dataset.name} ({len(dataset.y_train)} train / "
              f"{len(dataset.y_test)} test), m = {base['workers']} workers ({split}), {base['steps']} steps, "
              f"tau = {base['tau']}, topology {base['topology']}", flush=True)
        progress = not args.no_progress and sys.stderr.isatty()
        runs = []
        t0 = time.perf_counter()
        for cfg in configs:
            runs.append(ex.run(cfg, dataset=dataset, progress=progress))
            if not progress:
                s = runs[-1]["summary"]
                print(f"  {cfg['algorithm']:<24} loss {s['final_train_loss']:.4f}  ({s['real_time']:.1f} s)",
                      file=sys.stderr, flush=True)
        title = f"{base['model']} on {dataset.name}, m = {base['workers']}, {split}"
        paths = results.write_results(runs, out, title=title)
        print()
        print(results.format_table(runs))
        print(f"\ntotal real time {time.perf_counter() - t0:.1f} s; wrote "
              f"{', '.join(os.path.basename(p) for p in paths)} to {out}")
    return 0
