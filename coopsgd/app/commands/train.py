"""``coopsgd train [--config run.toml] [--set key=value …]``: one run from a TOML file (or the defaults).

Keys (every one optional; see ``coopsgd.app.config.DEFAULTS`` and docs/cli.md)::

    algorithm = "local_sgd"    # any name of the registry (coopsgd.app.registry; docs/algorithms.md)
    workers = 8
    tau = 8
    topology = "ring"          # for the graph algorithms
    weights = "metropolis"
    steps = 400
    batch_size = 16
    backend = "simulate"
    seed = 0
    out = "runs/train"

    [optimizer]
    name = "sgd"               # sgd, momentum, nesterov, adam
    lr = 0.1
    schedule = "constant"      # constant, cosine, step, warmup_cosine

    [runtime]
    compute = "shifted_exponential"
    latency = 0.001
    bandwidth = 2e6

Writes ``results.json``, ``results.csv``, ``history.csv`` and three PNG plots into the output
folder, all or nothing; with ``--checkpoint-every N`` also ``checkpoints/`` (orbax), from which
``--resume`` continues (from the previous checkpoint if the latest is damaged). The folder is
locked for the whole run: a second run into it is refused while the first lives.
"""

from __future__ import annotations

import os
import sys

from coopsgd.app.commands import COMMANDS, CommandError, add_metrics_option, warnings_printer

__all__ = ["build_config", "register", "run"]


def register(subparsers) -> None:
    """Add the ``train`` parser to ``subparsers``."""
    p = subparsers.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train one configuration (TOML file plus --set overrides); write results, plots "
        "and optional checkpoints into the output folder.",
    )
    p.add_argument("--config", "-c", metavar="TOML",
                   help="configuration file (default: none, every key at its default; with --resume the "
                   "checkpoint's configuration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optimizer.lr=0.05 --set topology=torus (repeatable)")
    p.add_argument("--out", "-o", metavar="DIR", help="output folder (overrides the config's out; default runs/train)")
    p.add_argument("--data", metavar="NPZ", help="your own .npz with arrays x and y (default: bundled digits)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint (orbax) into OUT/checkpoints every N steps and at the end "
                   "(default 0: none)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from the latest checkpoint in DIR (or DIR/checkpoints) (default: a fresh run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    add_metrics_option(p)


def build_config(config_path, overrides, out=None, data=None, base=None) -> dict:
    """The validated configuration: ``base`` (e.g. a checkpoint's), the TOML file, ``--set``
    overrides, then ``--out``/``--data``."""
    from coopsgd.app import config

    layers = []
    if base is not None:
        layers.append(base)
    if config_path:
        layers.append(config.load_toml(config_path))
    sets = {}
    for text in overrides:
        key, value = config.parse_override(text)
        sets[key] = value
    layers.append(sets)
    tail = {}
    if out is not None:
        tail["out"] = out
    if data is not None:
        tail["data"] = data
    layers.append(tail)
    return config.make_config(*layers, strict=True)


def run(args) -> int:
    """Run ``coopsgd train`` with the parsed ``args``; return the exit code."""
    from coopsgd.app import checkpoint as ckpt
    from coopsgd.app import config, models, registry, results
    from coopsgd.app import data as data_mod
    from coopsgd.app import experiment as ex

    if args.checkpoint_every < 0:
        raise CommandError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    note = warnings_printer()
    base = None
    resume_dir = None
    if args.resume:
        resume_dir = ckpt.find(args.resume)
        reader = ckpt.Checkpointer(resume_dir, note=lambda msg: None, read_only=True)  # ex.run reports it
        try:
            base = reader.read_host().get("config")
        finally:
            reader.close()
        if not isinstance(base, dict):
            raise CommandError(f"the checkpoint in {resume_dir!r} holds no run configuration")
        if args.out is None and not any(o.split("=", 1)[0].strip() == "out" for o in args.overrides):
            # Continue in the run's own folder unless told otherwise.
            parent = os.path.dirname(resume_dir)
            base = dict(base, out=parent if os.path.basename(resume_dir) == "checkpoints" else base["out"])
    cfg = build_config(args.config, args.overrides, args.out, args.data, base)
    dataset = data_mod.load(cfg["data"], cfg["test_fraction"], cfg["seed"])
    data_mod.split(dataset.y_train, cfg["workers"], cfg["split"], cfg["dirichlet_alpha"], cfg["seed"])
    model = models.make(cfg["model"], dataset.input_shape, max(dataset.num_classes, 2))
    config.check_fits(cfg, model, dataset.x_train[0].nbytes)
    registry.build(cfg)  # names and ranges checked before anything is written
    # The folder is locked for the whole run, its result files probed before training, and the
    # results written all or nothing.
    with results.output_folder(cfg["out"], note=note) as out:
        checkpoint_dir = os.path.join(out, "checkpoints") if (args.checkpoint_every or args.resume) else None
        result = ex.run(cfg, dataset=dataset, progress=not args.no_progress and sys.stderr.isatty(),
                        checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every,
                        resume=resume_dir, note=note, metrics_dir=os.path.join(out, "metrics"),
                        metrics=args.metrics)
        print(results.format_table([result]), flush=True)
        paths = results.write_results([result], out,
                                      title=f"{cfg['algorithm']} on {dataset.name}, m = {cfg['workers']}")
    print(f"\nwrote {', '.join(os.path.basename(p) for p in paths)} to {out}")
    return 0
