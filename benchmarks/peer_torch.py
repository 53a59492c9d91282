"""The peer: torch's PeriodicModelAverager (post-local SGD on 4 gloo processes) against coopsgd. Prints JSON.

    python benchmarks/peer_torch.py              # the figures in docs/benchmarks.md (≈ 5 min)
    python benchmarks/peer_torch.py --quick      # a smoke run (16 steps, one repeat)
    python benchmarks/peer_torch.py --sizes 6k --steps 400 --repeats 7

Local SGD with periodic exact averaging, m = 4 workers, period τ, plain SGD (learning rate
``--lr``), the same MLP as the other benchmarks (``mlp_loss`` of ``benchmarks/engine.py``:
ReLU layers, mean squared error on the first output), 32 samples per worker per step:

- ``torch``: 4 processes (one per worker, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)
  joined by a gloo process group on 127.0.0.1; each trains its own ``nn.Sequential`` of
  ``nn.Linear`` / ``nn.ReLU`` with ``torch.optim.SGD`` and calls
  ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager(period=τ,
  warmup_steps=0).average_parameters(model.parameters())`` after every optimizer step (it
  all-reduces the flattened parameters, divided by the world size, every τ steps). The 4
  processes are started directly by this script (what ``torchrun`` does, without its agent).
- ``coopsgd``: one process, ``coopsgd.CooperativeSGD(coopsgd.local_sgd(4, τ), optax.sgd(lr),
  mlp_loss)`` with every default (simulate backend: the 4 workers a vmap axis on one device,
  XLA's default threads), ``trainer.run`` over all the steps; ``coopsgd_cached`` is the same
  with JAX's persistent compilation cache on, in a folder one untimed start has filled (the
  settings the ``coopsgd`` command uses: what a second run of the same job sees).

The initial weights (``N(0, 1/fan_in)``, zero biases) and all the batches are drawn once with
NumPy from ``--seed`` and written to one ``.npz`` that both contenders load (torch rank r takes
worker r's slice of every batch). Both average after steps τ, 2τ, …, so the final models agree
to float32 round-off (``max_abs_diff``; different matmul kernels and summation orders).

Every repeat is a fresh start of each contender, alternating: torch, coopsgd, coopsgd_cached,
torch, …
Per start it reports

- ``finish_s``: from just before the process(es) are launched to the result (the final averaged
  parameters and the final loss in memory: for torch on rank 0, after the last all-reduce), so
  interpreter start, imports, process-group set-up, data loading, compilation and the training
  run itself; with its parts (``phases_s``);
- ``ms_per_step``: afterwards, in the same process(es), ``--inner`` more runs of all the steps
  from the initial weights (steady state: warm caches, compiled program), each timed (torch:
  between two barriers, on rank 0), divided by the steps.

Figures are medians over the repeats (``ms_per_step`` pooled over repeats × inner runs); the
ratios are torch / coopsgd, of medians and as the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {"6k": [32, 64, 64, 1], "1m": [32, 1000, 1024, 1]}  # as benchmarks/overhead.py
M, SAMPLES = 4, 32
CONTENDERS = ("torch", "coopsgd", "coopsgd_cached")
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------ data


def make_data(path: str, sizes: list[int], steps: int, seed: int) -> None:
    """Initial weights and batches, drawn once with NumPy, for both contenders."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        arrays[f"w{i}"] = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        arrays[f"b{i}"] = np.zeros(b, np.float32)
    arrays["x"] = rng.normal(size=(steps, M, SAMPLES, sizes[0])).astype(np.float32)
    arrays["y"] = rng.normal(size=(steps, M, SAMPLES)).astype(np.float32)
    np.savez(path, **arrays)


def load_data(path: str):
    with np.load(path) as f:
        data = dict(f)
    layers = len([k for k in data if k.startswith("w")])
    params = [{"w": data[f"w{i}"], "b": data[f"b{i}"]} for i in range(layers)]
    return params, {"x": data["x"], "y": data["y"]}


# ----------------------------------------------------------------------------------- torch


def torch_child(args) -> None:
    t_python = time.time()
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    t_imported = time.time()
    torch.set_num_threads(1)
    rank = args.rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=M)
    t_group = time.time()

    params, batches = load_data(args.data)
    xs = torch.from_numpy(np.ascontiguousarray(batches["x"][:, rank]))  # (steps, samples, d_in)
    ys = torch.from_numpy(np.ascontiguousarray(batches["y"][:, rank]))
    layers = []
    for i, p in enumerate(params):
        lin = torch.nn.Linear(*p["w"].shape)
        layers += [lin] if i == len(params) - 1 else [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]

    def reset():
        with torch.no_grad():
            for lin, p in zip(linears, params):
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["w"].T)))  # Linear: x Wᵀ + b
                lin.bias.copy_(torch.from_numpy(p["b"]))

    def train(steps):
        reset()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        averager = PeriodicModelAverager(period=args.tau, warmup_steps=0)
        # Alignment: the averager counts its calls from 0 and averages when step % period == 0
        # (after warm-up), so called after every optimizer step it would average after steps
        # 1, τ + 1, 2τ + 1, … — a different algorithm from local_sgd(m, τ), whose rounds end after
        # steps τ, 2τ, …. Starting its counter at 1, the call after optimizer step k sees step = k
        # and averages after steps τ, 2τ, …: the two then do the same math.
        # (warmup_steps=τ − 1 with the counter at 0 would average at the same steps.)
        averager.step = 1
        loss = None
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = ((model(xs[k])[:, 0] - ys[k]) ** 2).mean()
            loss.backward()
            opt.step()
            averager.average_parameters(model.parameters())
        return loss.detach()

    t_setup = time.time()
    torch.optim.SGD(model.parameters(), lr=args.lr)  # the first optimizer built imports torch._dynamo
    t_optim = time.time()
    last = train(args.steps)
    dist.all_reduce(last)  # the mean of the workers' last-step losses
    final_loss = float(last) / M
    final = [{"w": lin.weight.detach().numpy().T.copy(), "b": lin.bias.detach().numpy().copy()} for lin in linears]
    t_result = time.time()

    step_s = []
    for _ in range(args.inner):
        dist.barrier()
        t0 = time.perf_counter()
        train(args.steps)
        dist.barrier()
        step_s.append((time.perf_counter() - t0) / args.steps)
    dist.destroy_process_group()
    if rank == 0:
        write_result(args.out, final, final_loss, step_s,
                     {"python_start": t_python, "imported": t_imported, "process_group": t_group,
                      "setup": t_setup, "optimizer": t_optim, "result": t_result},
                     {"torch": torch.__version__, "threads": torch.get_num_threads()})


# --------------------------------------------------------------------------------- coopsgd


def coopsgd_child(args) -> None:
    t_python = time.time()
    import jax
    import jax.numpy as jnp
    import optax

    import coopsgd

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    sys.path.insert(0, HERE)
    from engine import mlp_loss  # the same MLP as the engine benchmarks

    t_imported = time.time()
    params, batches = load_data(args.data)
    params = jax.tree.map(jnp.asarray, params)
    batches = jax.tree.map(jnp.asarray, batches)  # placed once, as torch.from_numpy
    trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(M, args.tau), optax.sgd(args.lr), mlp_loss)
    state0 = trainer.init(params)
    t_setup = time.time()

    state, metrics = trainer.run(state0, batches, args.steps)  # compiles on this first call
    workers = jax.tree.map(np.asarray, trainer.workers(state))  # (m, …) each: all rows equal here
    final_loss = float(metrics.loss[-1])  # mean of the workers' last-step losses
    final = [{"w": p["w"][0], "b": p["b"][0]} for p in workers]
    t_result = time.time()
    spread = max(float(np.max(np.abs(a - a[0]))) for a in jax.tree.leaves(workers))

    step_s = []
    for _ in range(args.inner):
        t0 = time.perf_counter()
        s, _ = trainer.run(state0, batches, args.steps)
        jax.block_until_ready(s.params)
        step_s.append((time.perf_counter() - t0) / args.steps)
    write_result(args.out, final, final_loss, step_s,
                 {"python_start": t_python, "imported": t_imported, "setup": t_setup, "result": t_result},
                 {"jax": jax.__version__, "backend": jax.default_backend(), "workers_spread": spread})


def write_result(out, final, final_loss, step_s, marks, extra) -> None:
    np.savez(out + ".npz", **{f"{k}{i}": layer[k] for i, layer in enumerate(final) for k in ("w", "b")})
    with open(out + ".json", "w") as f:
        json.dump({"final_loss": final_loss, "step_s": step_s, "marks": marks, **extra}, f)


# ---------------------------------------------------------------------------------- parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(contender: str, data: str, out: str, args) -> dict:
    """One fresh start of a contender: its process(es), timed from just before launching."""
    common = ["--data", data, "--out", out, "--steps", str(args.steps), "--tau", str(args.tau),
              "--lr", repr(args.lr), "--inner", str(args.inner)]
    env = dict(os.environ)
    if contender == "torch":
        env["OMP_NUM_THREADS"] = "1"
        if os.path.exists("/sys/class/net/lo"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        port = free_port()
        t0 = time.time()
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "torch", "--rank", str(r),
                                   "--port", str(port), *common], env=env) for r in range(M)]
    else:
        cache = ["--cache", args.cache] if contender == "coopsgd_cached" else []
        t0 = time.time()
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "coopsgd", *common, *cache], env=env)]
    for p in procs:
        if p.wait(timeout=1200) != 0:
            raise RuntimeError(f"{contender} child exited with {p.returncode}")
    with open(out + ".json") as f:
        res = json.load(f)
    marks = res.pop("marks")
    order = ["python_start", "imported", "process_group", "setup", "optimizer", "result"]
    names = {"python_start": "interpreter_start", "imported": "imports", "process_group": "process_group",
             "setup": "load_data_and_build", "optimizer": "first_torch_optim_SGD",
             "result": "first_run_to_result"}
    phases, prev = {}, t0
    for key in order:
        if key in marks:
            phases[names[key]] = marks[key] - prev
            prev = marks[key]
    with np.load(out + ".npz") as f:
        res["params"] = dict(f)
    res.update(finish_s=marks["result"] - t0, phases_s=phases)
    return res


def median(xs):
    return statistics.median(xs)


def measure(size: str, args, tmp: str) -> dict:
    shape = SIZES[size]
    data = os.path.join(tmp, f"data_{size}.npz")
    make_data(data, shape, args.steps, args.seed)
    runs = {name: [] for name in CONTENDERS}
    args.cache = os.path.join(tmp, f"jax_cache_{size}")
    launch("coopsgd_cached", data, os.path.join(tmp, f"warm_{size}"), args)  # fills the cache, untimed
    load = [os.getloadavg()]
    for r in range(args.repeats):
        for contender in CONTENDERS:
            runs[contender].append(launch(contender, data, os.path.join(tmp, f"{contender}_{size}_{r}"), args))
        load.append(os.getloadavg())
    diffs = []
    for t, *cs in zip(*runs.values()):
        diffs += [max(float(np.max(np.abs(t["params"][k] - c["params"][k]))) for k in t["params"]) for c in cs]
    scale = max(float(np.max(np.abs(v))) for v in runs["coopsgd"][0]["params"].values())
    out = {"mlp": shape, "param_count": int(sum(a * b + b for a, b in itertools.pairwise(shape))),
           "m": M, "tau": args.tau, "steps": args.steps, "lr": args.lr, "samples_per_worker": SAMPLES,
           "repeats": args.repeats, "inner_runs": args.inner, "loadavg_during": load,
           "max_abs_diff_params": max(diffs), "max_abs_final_param": scale}
    for name, rs in runs.items():
        out[name] = {
            "ms_per_step": 1e3 * median([s for r in rs for s in r["step_s"]]),
            "finish_s": median([r["finish_s"] for r in rs]),
            "finish_s_all": [round(r["finish_s"], 3) for r in rs],
            "phases_s": {k: median([r["phases_s"][k] for r in rs]) for k in rs[0]["phases_s"]},
            "final_loss": rs[0]["final_loss"],
            "final_loss_all_repeats_equal": all(r["final_loss"] == rs[0]["final_loss"] for r in rs),
            **{k: v for k, v in rs[0].items() if k in ("torch", "threads", "jax", "backend", "workers_spread")}}
    t = runs["torch"]
    for name in CONTENDERS[1:]:
        c = runs[name]
        ratio = out[f"ratio_torch_over_{name}"] = {
            "ms_per_step": out["torch"]["ms_per_step"] / out[name]["ms_per_step"],
            "ms_per_step_paired": median([median(a["step_s"]) / median(b["step_s"]) for a, b in zip(t, c)]),
            "finish_s": out["torch"]["finish_s"] / out[name]["finish_s"],
            "finish_s_paired": median([a["finish_s"] / b["finish_s"] for a, b in zip(t, c)])}
        out[f"target_5x_met_{name}"] = {k: v >= 5 for k, v in ratio.items() if not k.endswith("paired")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="6k,1m", help="model sizes (6k, 1m; comma-separated)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default 200; 16 with --quick)")
    p.add_argument("--tau", type=int, default=8, help="averaging period τ (default 8)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    p.add_argument("--repeats", type=int, default=0,
                   help="fresh starts per contender, alternating (default 5 at 6k and 3 at 1m; 1 with --quick)")
    p.add_argument("--inner", type=int, default=0, help="steady-state runs per start (default 3; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="NumPy seed of the weights and batches")
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--child", choices=["torch", "coopsgd"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (16 if args.quick else 200)
    args.inner = args.inner or (2 if args.quick else 3)
    if args.steps % args.tau:
        p.error("--steps must be a multiple of --tau (the run ends with an average)")
    if args.child == "torch":
        torch_child(args)
        return 0
    if args.child == "coopsgd":
        coopsgd_child(args)
        return 0
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "loadavg_start": os.getloadavg()}, "sizes": {}}
    repeats = args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            args.repeats = repeats or (1 if args.quick else (3 if size == "1m" else 5))
            report["sizes"][size] = measure(size, args, tmp)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["machine"]["date_end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
