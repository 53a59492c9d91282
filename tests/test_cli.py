"""The command line: topology, compare and train end to end, and bad input → one line, exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coopsgd.app import cli


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestTopology:
    def test_ring_summary(self, capsys):
        code, out, err = _run(capsys, "topology", "ring", "--nodes", "8")
        assert code == 0 and err == ""
        # Metropolis ring: eigenvalues 1/3 + 2/3 cos(2 pi k / 8); zeta = 1/3 + 2/3 cos(pi/4).
        zeta = 1 / 3 + 2 / 3 * np.cos(np.pi / 4)
        assert f"zeta          {zeta:.6f}" in out
        assert f"spectral gap  {1 - zeta:.6f}" in out
        assert "ring on 8 nodes, 8 edges, degree 2..2" in out

    def test_json_matrix_and_drawing(self, capsys, tmp_path):
        png = tmp_path / "g.png"
        code, out, _ = _run(capsys, "topology", "complete", "-n", "4", "--weights", "max_degree",
                            "--json", "--matrix", "--draw", str(png))
        facts = json.loads(out)
        assert code == 0 and facts["zeta"] == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(facts["W"], np.full((4, 4), 0.25))
        assert png.read_bytes()[:4] == b"\x89PNG"

    def test_help_exits_zero(self, capsys):
        assert cli.main(["--help"]) == 0
        assert "compare" in capsys.readouterr().out


BAD = [
    (["topology", "moebius", "-n", "4"], "unknown topology 'moebius'; valid names: ring, path, torus"),
    (["topology", "ring", "-n", "4", "--weights", "uniform"], "valid rules: metropolis, max_degree"),
    (["topology", "ring", "-n", "0"], "--nodes must be >= 1"),
    (["topology", "torus", "-n", "8"], "torus needs n = rows*cols"),
    (["topology", "torus", "-n", "14"], "rows, cols >= 3"),
    (["topology", "torus", "--shape", "2x6"], "sides must be >= 3"),
    (["topology", "torus", "--shape", "3x4", "-n", "13"], "disagrees with --shape"),
    (["topology", "ring", "--shape", "3x4"], "torus only"),
    (["topology", "ring"], "needs --nodes"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "choose a command: compare, train, topology, verify"),
    (["compare", "--algorithms", "local_sgd,sgdx"], "unknown algorithm 'sgdx'; valid algorithms: fully_sync"),
    (["compare", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["compare", "--workers", "0"], "workers must be an integer >= 1, got 0"),
    (["compare", "--topology", "moebius"], "unknown topology 'moebius'; valid names:"),
    (["compare", "--set", "bogus=1"], "unknown config key 'bogus'; valid keys:"),
    (["compare", "--workers", "5000"], "workers = 5000 exceeds the 1438 training examples"),
    (["compare", "--data", "/no/such/file.npz"], "data file '/no/such/file.npz' does not exist"),
    (["train", "--config", "/no/such/run.toml"], "config file '/no/such/run.toml' does not exist"),
    (["train", "--resume", "/no/such/dir"], "no complete checkpoint found"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "out"
    argv = list(argv)
    if argv and argv[0] in ("compare", "train") and "--out" not in argv:
        argv += ["--out", str(out_dir)]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not out_dir.exists()


class TestFilesAndConfigErrors:
    def _expect(self, capsys, tmp_path, argv, message):
        out_dir = tmp_path / "out"
        code, _, err = _run(capsys, *argv, "--out", str(out_dir))
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out_dir.exists()

    def test_invalid_toml_and_unknown_key(self, capsys, tmp_path):
        bad = tmp_path / "bad.toml"
        bad.write_text("workers = [\n")
        self._expect(capsys, tmp_path, ["train", "--config", str(bad)], "is not valid TOML")
        bad.write_text("wrokers = 4\n")
        self._expect(capsys, tmp_path, ["train", "--config", str(bad)], "unknown config key 'wrokers'")
        bad.write_text("steps = -3\n")
        self._expect(capsys, tmp_path, ["train", "--config", str(bad)], "steps must be an integer >= 1")

    def test_malformed_data_and_more_workers_than_examples(self, capsys, tmp_path):
        junk = tmp_path / "junk.npz"
        junk.write_bytes(b"definitely not a zip")
        self._expect(capsys, tmp_path, ["compare", "--data", str(junk)], "is not a valid .npz")
        small = tmp_path / "small.npz"
        np.savez(small, x=np.zeros((6, 3)), y=np.array([0, 1, 0, 1, 0, 1]))
        # 6 examples, a fifth held out for testing: 5 training examples for 8 workers.
        self._expect(capsys, tmp_path, ["compare", "--data", str(small)], "workers = 8 exceeds the 5 training examples")
        self._expect(capsys, tmp_path, ["compare", "--data", str(small), "--workers", "2", "--model", "cnn"],
                     "the cnn model needs image inputs")

    def test_unwritable_output_folder(self, capsys, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        code, _, err = _run(capsys, "compare", "--quick", "--out", str(blocker / "sub"))
        assert code == 2 and "cannot create output folder" in err and err.count("\n") == 1


def test_divergence_is_one_line_exit_1_and_writes_no_results(capsys, tmp_path):
    out_dir = tmp_path / "div"
    code, _, err = _run(capsys, "compare", "--algorithms", "local_sgd", "--steps", "16", "--lr", "1e6",
                        "--no-progress", "--out", str(out_dir))
    assert code == 1 and err.count("\n") == 1 and "diverged" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics"]  # no result set; the record of the run stays
    assert json.loads((out_dir / "metrics" / "local_sgd.jsonl").read_text().splitlines()[0])["step"] == 0
    code, _, err = _run(capsys, "compare", "--algorithms", "local_sgd", "--steps", "16", "--lr", "1e6",
                        "--no-progress", "--metrics", "none", "--out", str(tmp_path / "quiet"))
    assert code == 1 and not (tmp_path / "quiet").exists()


def test_compare_end_to_end(capsys, tmp_path):
    code, out, err = _run(capsys, "compare", "--algorithms", "local_sgd,dpsgd", "--steps", "32",
                          "--workers", "4", "--set", "eval_every=16", "--no-progress", "--out", str(tmp_path))
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("algorithm"))
    assert lines[header].split()[:3] == ["algorithm", "train", "loss"]
    assert lines[header + 2].split()[0] == "local_sgd" and lines[header + 3].split()[0] == "dpsgd"
    results = json.loads((tmp_path / "results.json").read_text())
    local, dpsgd = (r["summary"] for r in results["runs"])
    # tau = 8 over 32 steps: 4 all-reduces; D-PSGD mixes after each of the 32 steps.
    assert (local["comm_rounds"], dpsgd["comm_rounds"]) == (4, 32)
    for name in ("results.csv", "history.csv", "loss_vs_step.png", "loss_vs_time.png", "consensus.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("name,final_train_loss")


class TestJobs:
    """``compare --jobs``: algorithms trained at once in threads, with the results of one by one."""

    ARGS = ("compare", "--algorithms", "local_sgd,dpsgd,choco_sgd", "--steps", "16", "--workers", "4",
            "--set", "eval_every=8", "--no-progress", "--metrics", "none")

    @staticmethod
    def _runs(path):
        def strip(x):  # the run's own wall-clock time and output folder may differ
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k not in ("real_time", "out")}
            return [strip(v) for v in x] if isinstance(x, list) else x

        return strip(json.loads((path / "results.json").read_text())["runs"])

    def test_threads_give_the_results_of_one_by_one(self, capsys, tmp_path):
        for jobs in ("1", "3"):
            code, out, err = _run(capsys, *self.ARGS, "--jobs", jobs, "--out", str(tmp_path / jobs))
            assert code == 0, err
        one, three = self._runs(tmp_path / "1"), self._runs(tmp_path / "3")
        assert [r["name"] for r in three] == ["local_sgd", "dpsgd", "choco_sgd"]  # the order asked for
        assert one == three

    def test_a_diverging_run_stops_the_others_and_writes_no_results(self, capsys, tmp_path):
        code, _, err = _run(capsys, *self.ARGS, "--lr", "1e6", "--jobs", "2", "--out", str(tmp_path / "d"))
        assert code == 1 and err.count("\n") == 1 and "diverged" in err
        assert not (tmp_path / "d" / "results.json").exists()

    def test_jobs_must_be_positive(self, capsys, tmp_path):
        code, _, err = _run(capsys, *self.ARGS, "--jobs", "0", "--out", str(tmp_path / "z"))
        assert code == 2 and err.count("\n") == 1 and "--jobs must be an integer >= 1, got 0" in err

    def test_ctrl_c_stops_every_run_and_writes_no_results(self, tmp_path):
        import subprocess
        import sys

        # SIGINT (Ctrl-C) at every round end, from the worker threads: the first stops the runs,
        # the later ones come while they stop. No run may still be going when main returns (one
        # left inside XLA aborted the process as it exited).
        script = (
            "import os, signal, sys, threading\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from coopsgd.app import cli, experiment\n"
            "real, real_run, going = experiment._Run.on_round, experiment.run, []\n"
            "def on_round(self, *a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(self, *a, **k)\n"
            "def run(*a, **k):\n"
            "    going.append(1)\n"
            "    try:\n"
            "        return real_run(*a, **k)\n"
            "    finally:\n"
            "        going.pop()\n"
            "experiment._Run.on_round, experiment.run = on_round, run\n"
            f"code = cli.main({list(self.ARGS) + ['--jobs', '2', '--out', str(tmp_path / 'c')]!r})\n"
            "sys.exit(code if not going else 99)\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 130 and done.stderr == "coopsgd: interrupted\n", done.stderr
        assert not (tmp_path / "c" / "results.json").exists()


def test_train_with_overrides(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('algorithm = "easgd"\nworkers = 4\nsteps = 16\neval_every = 8\n[optimizer]\nlr = 0.05\n')
    code, out, err = _run(capsys, "train", "--config", str(cfg), "--set", "tau=4", "--set", "optimizer.name=momentum",
                          "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run["config"]["tau"] == 4 and run["config"]["optimizer.name"] == "momentum"
    assert run["config"]["optimizer.lr"] == 0.05
    assert run["summary"]["comm_rounds"] == 4 and run["history"]["step"] == [0, 8, 16]
    assert "easgd" in out


class TestReviewedEdges:
    """Inputs a demanding user tried: each ends in one line and exit 2, and nothing is written."""

    def test_output_folder_on_a_read_only_file_system_is_found_before_training(self, capsys):
        # /proc cannot hold new files, whatever the permission bits say (and root passes os.access)
        code, out, err = _run(capsys, "compare", "--quick", "--out", "/proc/coopsgd-test-out")
        assert code == 2 and err.count("\n") == 1 and "cannot write output folder" in err
        assert out == ""  # nothing trained, no table

    def test_npy_renamed_and_sparse_labels(self, capsys, tmp_path):
        npy = tmp_path / "arr.npz"
        with open(npy, "wb") as f:
            np.save(f, np.zeros((4, 3)))
        code, _, err = _run(capsys, "compare", "--data", str(npy), "--out", str(tmp_path / "o"))
        assert code == 2 and "single array" in err and err.count("\n") == 1
        big = tmp_path / "big.npz"
        np.savez(big, x=np.zeros((20, 3)), y=np.array([0, 1] * 9 + [1, 10**9]))
        code, _, err = _run(capsys, "compare", "--data", str(big), "--out", str(tmp_path / "o"))
        assert code == 2 and "got a label 1000000000" in err
        assert not (tmp_path / "o").exists()

    def test_png_paths(self, capsys, tmp_path):
        code, _, err = _run(capsys, "topology", "ring", "-n", "4", "--draw", str(tmp_path / "g.txt"))
        assert code == 2 and "must be a file name ending in .png" in err
        code, _, err = _run(capsys, "topology", "ring", "-n", "4", "--draw", "/proc/g.png")
        assert code == 2 and "cannot write --draw folder" in err

    def test_steps_beyond_the_int32_step_counter(self, capsys, tmp_path):
        code, _, err = _run(capsys, "compare", "--steps", str(2**31), "--out", str(tmp_path / "o"))
        assert code == 2 and f"steps must be at most {2**31 - 1}" in err


def _train(capsys, cfg, out, *extra):
    return _run(capsys, "train", "--config", str(cfg), "--out", str(out), "--no-progress", *extra)


class TestCheckpointSafety:
    def test_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(self, capsys, tmp_path):
        cfg = tmp_path / "run.toml"
        cfg.write_text('algorithm = "local_sgd"\nworkers = 2\ntau = 2\nsteps = 8\neval_every = 4\n')
        assert _train(capsys, cfg, tmp_path / "a", "--checkpoint-every", "4")[0] == 0
        before = (tmp_path / "a" / "results.json").read_text()
        code, _, err = _train(capsys, cfg, tmp_path / "a", "--checkpoint-every", "4", "--set", "steps=4")
        assert code == 2 and "already holds another run's checkpoints (up to step 8)" in err
        assert (tmp_path / "a" / "results.json").read_text() == before  # results untouched
        # resuming a checkpoint past the requested end is refused too
        code, _, err = _run(capsys, "train", "--resume", str(tmp_path / "a"), "--set", "steps=4", "--no-progress")
        assert code == 2 and "past steps = 4" in err

    def test_steps_may_change_on_resume_only_if_no_schedule_stretches_over_them(self, capsys, tmp_path):
        cfg = tmp_path / "cos.toml"
        cfg.write_text('algorithm = "local_sgd"\nworkers = 2\ntau = 2\nsteps = 8\neval_every = 4\n'
                       '[optimizer]\nschedule = "cosine"\n')
        assert _train(capsys, cfg, tmp_path / "c", "--checkpoint-every", "4")[0] == 0
        code, _, err = _run(capsys, "train", "--resume", str(tmp_path / "c"), "--set", "steps=16",
                            "--out", str(tmp_path / "c2"), "--no-progress")
        assert code == 2 and ("cannot resume with steps = 16: the checkpoint's run has steps = 8 and its "
                              "optimizer.schedule = 'cosine' spreads the learning rate over steps") in err
        assert "steps may change on resume only when nothing is stretched over the run" in err
        assert not (tmp_path / "c2").exists()  # a refused resume leaves no folder behind
        const = tmp_path / "const.toml"
        const.write_text('algorithm = "local_sgd"\nworkers = 2\ntau = 2\nsteps = 8\neval_every = 4\n')
        assert _train(capsys, const, tmp_path / "k", "--checkpoint-every", "4")[0] == 0
        code, _, err = _run(capsys, "train", "--resume", str(tmp_path / "k"), "--set", "steps=12", "--no-progress")
        assert code == 0, err
        run = json.loads((tmp_path / "k" / "results.json").read_text())["runs"][0]
        assert run["summary"]["steps"] == 12 and run["history"]["step"][-1] == 12


class TestCompilationCache:
    """The console script keeps compiled programs in a persistent cache (a fresh process each)."""

    @staticmethod
    def _train(tmp_path, **env):
        import os
        import subprocess
        import sys

        full = {k: v for k, v in os.environ.items() if not k.startswith(("COOPSGD_", "JAX_COMPILATION"))}
        full.update(env)
        done = subprocess.run([sys.executable, "-m", "coopsgd.app.cli", "train", "--set", "steps=4", "--set",
                               "workers=2", "--set", "tau=2", "--set", "eval_every=4", "--out",
                               str(tmp_path / "out"), "--no-progress", "--metrics", "none"],
                              env=full, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    def test_programs_are_cached_in_the_chosen_folder(self, tmp_path):
        self._train(tmp_path, COOPSGD_CACHE_DIR=str(tmp_path / "cache"))
        entries = list((tmp_path / "cache").iterdir())
        assert entries, "no compiled program was cached"
        assert (tmp_path / "cache").stat().st_mode & 0o077 == 0  # the cache runs code: this user's only

    def test_a_second_run_loads_the_rounds_the_first_kept(self, tmp_path):
        import json
        import shutil

        cache = tmp_path / "cache"
        first = self._train(tmp_path, COOPSGD_CACHE_DIR=str(cache))
        kept = {p.name: p.stat().st_mtime_ns for p in (cache / "programs").glob("*.jaxexport")}
        summary = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["history"]
        shutil.rmtree(tmp_path / "out")
        second = self._train(tmp_path, COOPSGD_CACHE_DIR=str(cache))
        assert kept, "no round was kept"
        # Every round was found under the same name (none written again) and computes the same.
        assert {p.name: p.stat().st_mtime_ns for p in (cache / "programs").glob("*.jaxexport")} == kept
        assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["history"] == summary
        assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]

    def test_the_cache_can_be_turned_off(self, tmp_path):
        self._train(tmp_path, COOPSGD_CACHE_DIR=str(tmp_path / "cache"), COOPSGD_COMPILATION_CACHE="0")
        assert not (tmp_path / "cache").exists()

    def test_quick_runs_compile_for_compile_time(self, monkeypatch):
        level, emitters = "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"
        split = "--xla_cpu_parallel_codegen_split_count=1"
        monkeypatch.setattr(cli, "_jaxlib_version", lambda: (0, 10))
        monkeypatch.delenv("XLA_FLAGS", raising=False)
        cli._compile_for_speed()
        assert os.environ["XLA_FLAGS"].split() == [level, emitters, split]
        monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        cli._compile_for_speed()  # added to the user's flags
        assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", level, emitters, split]
        chosen = "--xla_backend_optimization_level=2 --xla_cpu_use_fusion_emitters=true"
        monkeypatch.setenv("XLA_FLAGS", chosen)
        cli._compile_for_speed()  # what the user chose is kept
        assert os.environ["XLA_FLAGS"] == f"{chosen} {split}"
        # XLA ends the process on a flag it does not know: a jaxlib past the checked ones gets the level only
        monkeypatch.setattr(cli, "_jaxlib_version", lambda: (0, 11))
        monkeypatch.delenv("XLA_FLAGS")
        cli._compile_for_speed()
        assert os.environ["XLA_FLAGS"] == level

    def test_the_quick_flags_are_known_to_this_xla(self, tmp_path):
        """A process given the flags starts and computes (an unknown flag would end it with a fatal
        log line before any output)."""
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["XLA_FLAGS"] = " ".join(f"--{k}={v}" for k, (v, below) in cli.QUICK_XLA_FLAGS.items()
                                    if below is None or cli._jaxlib_version() < below)
        done = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float((jnp.arange(4.0) * 2).sum()))"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-500:]
        assert done.stdout.strip() == "12.0"

    def test_default_folder_follows_xdg(self, monkeypatch, tmp_path):
        for key in ("COOPSGD_CACHE_DIR", "COOPSGD_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert cli.compilation_cache_dir() == str(tmp_path / "coopsgd" / "jax")
        monkeypatch.setenv("COOPSGD_COMPILATION_CACHE", "off")
        assert cli.compilation_cache_dir() is None
