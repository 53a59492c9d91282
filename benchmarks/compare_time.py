"""How long ``coopsgd compare --quick`` takes from the shell, cold and warm. Prints JSON.

    python benchmarks/compare_time.py              # the figures in docs/benchmarks.md (≈ 5 min)
    python benchmarks/compare_time.py --repeats 1  # one of each
    python benchmarks/compare_time.py --modes cold,warm  # without the two at XLA's default level
    python benchmarks/compare_time.py --command "coopsgd compare --quick" --command "OTHER/coopsgd compare --quick"

Each repeat runs the console script four times, in fresh processes, alternating:

- ``cold``: an empty compilation-cache folder (``COOPSGD_CACHE_DIR``), so every program is
  compiled; ``--quick`` compiles for compile time (``coopsgd.app.cli.QUICK_XLA_FLAGS``);
- ``warm``: the same command again, the folder ``cold`` filled;
- ``cold_optimized`` and ``warm_optimized``: the same pair with ``XLA_FLAGS`` asking for XLA's
  defaults (:data:`OPTIMIZED`), which the command keeps: what a ``--quick`` run cost before it
  compiled for compile time.

With several ``--command`` s (another checkout's console script, say) each mode runs every command
in turn before the next mode, so the commands see the same machine. A time is wall clock from just before the process starts to its exit (interpreter start, imports,
compilation, the runs, the result files); ``cpu_s`` is the process's user + system time (both cores
count). The figures are medians over the repeats; the machine's load average is recorded beside.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

OPTIMIZED = ("--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true "
             "--xla_cpu_parallel_codegen_split_count=32")
"""XLA:CPU's defaults, spelled out so that the command adds none of its ``--quick`` flags."""

MODES = {"cold": (True, None), "warm": (False, None),
         "cold_optimized": (True, OPTIMIZED), "warm_optimized": (False, OPTIMIZED)}
"""mode → (start from an empty cache, XLA_FLAGS)."""


def one(command: list[str], cache: str, out: str, xla_flags: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COOPSGD_", "JAX_COMPILATION", "XLA_FLAGS"))}
    env["COOPSGD_CACHE_DIR"] = cache
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([*command, "--out", out], env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command} exited with {done.returncode}: {done.stderr[-2000:]}")
    line = [t for t in done.stdout.splitlines() if t.startswith("total real time")]
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "reported": line[0] if line else None, "loadavg_after": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four modes (default 3)")
    p.add_argument("--command", action="append", default=None,
                   help="a command to time, repeatable (default: coopsgd compare --quick; e.g. "
                   "'coopsgd compare --quick --jobs 1' beside it)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated modes to run (default all: {', '.join(MODES)}); a warm mode needs its cold one")
    args = p.parse_args(argv)
    asked = [m.strip() for m in args.modes.split(",")]
    if any(m not in MODES for m in asked):
        p.error(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    modes = [m for m in MODES if m in asked]  # a cold mode before its warm one
    if any(m.startswith("warm") and m.replace("warm", "cold") not in modes for m in modes):
        p.error("a warm mode runs on the cache its cold mode filled: list both")
    commands = [c.split() for c in (args.command or ["coopsgd compare --quick"])]
    for command in commands:
        if shutil.which(command[0]) is None:
            p.error(f"{command[0]} is not on PATH (pip install -e . in this environment)")
    report = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg_start": os.getloadavg(),
              "commands": [{"command": " ".join(c), "runs": {m: [] for m in modes}} for c in commands]}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            caches = {}
            for mode in modes:
                cold, flags = MODES[mode]
                for i, (command, entry) in enumerate(zip(commands, report["commands"])):
                    key = (i, flags is not None)
                    if cold:
                        caches[key] = os.path.join(tmp, f"cache_{r}_{i}_{mode}")
                    out = os.path.join(tmp, f"out_{r}_{i}_{mode}")
                    entry["runs"][mode].append(one(command, caches[key], out, flags))
    report["loadavg_end"] = os.getloadavg()
    report["date_end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for entry in report["commands"]:
        runs = entry["runs"]
        entry["median_wall_s"] = {m: statistics.median(x["wall_s"] for x in v) for m, v in runs.items()}
        entry["median_cpu_s"] = {m: statistics.median(x["cpu_s"] for x in v) for m, v in runs.items()}
        if "warm" in modes:
            entry["target_met"] = {"warm_le_10s": entry["median_wall_s"]["warm"] <= 10,
                                   "cold_le_20s": entry["median_wall_s"]["cold"] <= 20}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
