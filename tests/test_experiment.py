"""The experiment runner: configuration, builders, and runs checked against hand-derived figures."""

import jax
import numpy as np
import pytest

from coopsgd.app import config, data, models, registry, results
from coopsgd.app import experiment as ex


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


class TestConfig:
    def test_defaults_validate(self):
        cfg = config.make_config()
        assert cfg["algorithm"] == "local_sgd" and cfg["optimizer.lr"] == 0.1
        assert set(cfg) == set(config.DEFAULTS)

    def test_flatten_and_override(self):
        assert config.flatten({"a": 1, "optimizer": {"lr": 0.5, "x": {"y": 2}}}) == {
            "a": 1, "optimizer.lr": 0.5, "optimizer.x.y": 2}
        assert config.parse_override("optimizer.lr=0.05") == ("optimizer.lr", 0.05)
        assert config.parse_override("topology=torus") == ("topology", "torus")
        assert config.parse_override("workers = 4") == ("workers", 4)
        assert config.parse_override('data="my file.npz"') == ("data", "my file.npz")
        with pytest.raises(ValueError, match="key=value"):
            config.parse_override("lr")

    @pytest.mark.parametrize(
        "layer, match",
        [
            ({"lr": 0.1}, "unknown config key 'lr'; valid keys: algorithm, workers"),
            ({"algorithm": "sgdx"}, "valid algorithms: fully_sync, local_sgd"),
            ({"topology": "moebius"}, "valid names: ring, path"),
            ({"weights": "uniform"}, "valid rules: metropolis"),
            ({"steps": 0}, "steps must be an integer >= 1, got 0"),
            ({"workers": -2}, "workers must be an integer >= 1"),
            ({"workers": 2.5}, "workers must be an integer"),
            ({"optimizer.lr": 0}, "optimizer.lr must be > 0"),
            ({"optimizer.name": "rmsprop"}, "valid: sgd, momentum, nesterov, adam, adamw, lion"),
            ({"test_fraction": 1.0}, r"test_fraction must lie in \[0, 1\)"),
            ({"runtime.latency": -1.0}, "runtime.latency must be >= 0"),
        ],
    )
    def test_bad_values_name_the_key(self, layer, match):
        with pytest.raises(ValueError, match=match):
            config.make_config(layer)

    def test_load_toml(self, tmp_path):
        p = tmp_path / "run.toml"
        p.write_text('algorithm = "dpsgd"\nworkers = 4\n[optimizer]\nlr = 0.05\n')
        cfg = config.make_config(config.load_toml(p))
        assert (cfg["algorithm"], cfg["workers"], cfg["optimizer.lr"]) == ("dpsgd", 4, 0.05)
        p.write_text("algorithm = \n")
        with pytest.raises(ValueError, match="not valid TOML"):
            config.load_toml(p)


class TestBuilders:
    @pytest.mark.parametrize(
        "name, tau, v, overlap",
        [("fully_sync", 1, 0, False), ("local_sgd", 8, 0, False), ("easgd", 8, 1, False),
         ("dpsgd", 1, 0, False), ("decentralized_periodic", 8, 0, False),
         ("overlap_local_sgd", 8, 1, True), ("matcha", 1, 0, False)],
    )
    def test_each_algorithm(self, name, tau, v, overlap):
        algo, entry = registry.build(config.make_config({"algorithm": name}))
        assert (algo.m, algo.v, algo.tau, entry.overlap) == (8, v, tau, overlap)

    def test_dpsgd_uses_the_topology_and_rule(self):
        algo, _ = registry.build(config.make_config({"algorithm": "dpsgd", "topology": "ring"}))
        # Metropolis on a ring: 1/3 on self and both neighbours.
        np.testing.assert_allclose(algo.W[0, [0, 1, 7]], [1 / 3] * 3)
        assert algo.W[0, 2] == 0

    def test_adacomm_starts_at_tau0(self):
        algo, _ = registry.build(config.make_config({"algorithm": "adacomm", "tau": 4}), 100.0)
        assert algo.period.tau(algo.period.init(), 0, 0) == 8  # default tau0 = 2 * tau

    def test_tau_schedule(self):
        cfg = config.make_config({"tau": [[0, 8], [40, 2]]})
        algo, _ = registry.build(cfg)
        assert [algo.period.tau((), s, 0) for s in (0, 32, 40, 42)] == [8, 8, 2, 2]
        with pytest.raises(ValueError, match="must start at step 0"):
            config.make_config({"tau": [[1, 8]]})
        with pytest.raises(ValueError, match="does not apply to dpsgd"):
            registry.build(config.make_config({"tau": [[0, 2]], "algorithm": "dpsgd"}))

    def test_decentralized_needs_two_workers(self):
        with pytest.raises(ValueError, match="workers >= 2"):
            registry.build(config.make_config({"algorithm": "dpsgd", "workers": 1}))


SMALL = {"steps": 32, "eval_every": 16, "workers": 4, "batch_size": 8,
         "runtime.compute": "constant", "runtime.compute_time": 0.01,
         "runtime.comm": "constant", "runtime.comm_time": 0.05}


class TestRuns:
    def test_local_sgd_time_bytes_and_rounds_by_hand(self, digits):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd", "tau": 8})
        res = ex.run(cfg, dataset=digits)
        s, h = res["summary"], res["history"]
        # 32 steps, tau = 8: 4 averagings, each a ring all-reduce of the 64-32-10 MLP
        # (P = 4 * 2410 bytes): every worker sends 2 (m-1)/m P, so 2 (m-1) P in all.
        p = 4.0 * (64 * 32 + 32 + 32 * 10 + 10)
        assert s["param_bytes"] == p
        assert s["comm_rounds"] == 4
        assert s["bytes_communicated"] == pytest.approx(4 * 2 * 3 * p)
        # Each round: 8 steps of 0.01 s, then D = 0.05 s: 0.13 s a round.
        assert h["step"] == [0, 16, 32]
        np.testing.assert_allclose(h["time"], [0.0, 0.26, 0.52])
        assert h["loss"][-1] < h["loss"][0]
        # Right after exact averaging every worker holds the same model.
        cols = res.trainer.columns(res.state)
        for leaf in jax.tree.leaves(cols):
            np.testing.assert_allclose(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[0], leaf.shape), atol=1e-6)
        first = jax.tree.map(lambda leaf: np.asarray(leaf)[0], cols)
        assert s["test_accuracy"] == pytest.approx(
            models.accuracy(res.model, first, digits.x_test, digits.y_test), abs=1e-6)  # < one example

    @pytest.mark.parametrize("name", ["dpsgd", "choco_sgd"])
    def test_a_run_repeated_in_one_process_compiles_nothing(self, digits, name):
        """The model, loss, algorithm and optimizer are all built anew; the second run finds every
        program the first compiled (CHOCO-SGD's compressor key included) and computes the same."""
        seen = []

        def listener(event, secs, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                seen.append(secs)

        cfg = config.make_config(SMALL, {"algorithm": name, "compressor": "random_k:0.25"}
                                 if name == "choco_sgd" else {"algorithm": name})
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            first = ex.run(cfg, dataset=digits, metrics="none")
            compiled = len(seen)
            second = ex.run(cfg, dataset=digits, metrics="none")
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert compiled >= 1 and len(seen) == compiled
        assert second["history"]["loss"] == first["history"]["loss"]
        assert second.model is first.model  # one model per distinct make(...)

    def test_overlap_is_evaluated_at_the_preserved_combination(self, digits):
        # Overlap Local-SGD: the model the mixing preserves is (1 − α) x̄ + α z (math.md §6)
        alpha = 0.5
        # 30 steps with tau = 4 end two local steps after a sync, where z differs from the workers' x̄
        cfg = config.make_config(SMALL, {"algorithm": "overlap_local_sgd", "tau": 4, "mixing_alpha": alpha,
                                     "steps": 30, "optimizer.lr": 0.5})
        res = ex.run(cfg, dataset=digits)
        cols = res.trainer.columns(res.state)
        m = cfg["workers"]
        y = jax.tree.map(lambda a: (1 - alpha) * np.asarray(a)[:m].mean(0) + alpha * np.asarray(a)[m], cols)
        assert res["summary"]["test_accuracy"] == pytest.approx(
            models.accuracy(res.model, y, digits.x_test, digits.y_test), abs=1e-6)  # < one example

    def test_dpsgd_bytes_by_hand(self, digits):
        cfg = config.make_config(SMALL, {"algorithm": "dpsgd", "topology": "ring"})
        s = ex.run(cfg, dataset=digits)["summary"]
        # Ring of 4: every step each worker sends its model to 2 neighbours: 4 * 2 * P per step.
        p = s["param_bytes"]
        assert s["comm_rounds"] == 32
        assert s["bytes_communicated"] == pytest.approx(32 * 4 * 2 * p)
        assert s["simulated_time"] == pytest.approx(32 * (0.01 + 0.05))

    def test_resume_is_bitwise_identical(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "adacomm", "tau": 2, "steps": 48, "optimizer.lr": 0.5,
                                     "adacomm_interval": 0.05})
        full = ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path / "a", checkpoint_every=8)
        part = ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path / "b", checkpoint_every=8, stop_at=20)
        assert part["summary"]["steps"] < 48
        resumed = ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path / "b", checkpoint_every=8,
                         resume=tmp_path / "b")
        assert resumed["history"] == full["history"]
        assert resumed["summary"]["bytes_communicated"] == full["summary"]["bytes_communicated"]
        for a, b in zip(jax.tree.leaves((full.state.params, full.state.opt_state)),
                        jax.tree.leaves((resumed.state.params, resumed.state.opt_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # AdaComm changed its period along the way (so its state really was restored).
        assert len(set(full["history"]["tau"])) > 1

    def test_piecewise_period_run(self, digits):
        cfg = config.make_config(SMALL, {"tau": [[0, 8], [16, 2]], "steps": 24})
        res = ex.run(cfg, dataset=digits)
        # Rounds: 2 of 8 steps, then 4 of 2 steps: 6 averagings; time 6 * 0.05 + 24 * 0.01.
        assert res["summary"]["comm_rounds"] == 6
        assert res["summary"]["simulated_time"] == pytest.approx(6 * 0.05 + 24 * 0.01)
        assert res["history"]["tau"] == [8, 8, 2]

    def test_resume_rejects_another_config(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd", "steps": 16})
        ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path, checkpoint_every=8)
        other = config.make_config(cfg, {"optimizer.lr": 0.5})
        with pytest.raises(ValueError, match="optimizer.lr = 0.1 in the checkpoint but 0.5 now"):
            ex.run(other, dataset=digits, resume=tmp_path)


class TestOutput:
    def test_table_and_files(self, tmp_path):
        hist = {"step": [0, 10], "time": [0.0, 1.0], "loss": [2.0, 1.0], "batch_loss": [None, 1.1],
                "consensus": [0.0, 0.5], "test_accuracy": [0.1, 0.9], "tau": [2, 2]}
        summary = {"final_train_loss": 1.0, "test_accuracy": 0.9, "comm_rounds": 5,
                   "bytes_communicated": 2.5e6, "simulated_time": 1.0, "real_time": 0.3}
        res = [{"name": "a", "config": {}, "summary": summary, "history": hist}]
        table = results.format_table(res)
        assert "2.5 MB" in table and "1.0000" in table and table.splitlines()[2].startswith("a ")
        paths = results.write_results(res, str(tmp_path))
        names = sorted(p.split("/")[-1] for p in paths)
        assert names == ["consensus.png", "history.csv", "loss_vs_step.png", "loss_vs_time.png",
                         "results.csv", "results.json"]
        assert (tmp_path / "loss_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "history.csv").read_text().splitlines()[1] == "a,0,0.0,2.0,,0.0,0.1,2"

    def test_prepare_out_rejects_unwritable(self, tmp_path):
        f = tmp_path / "file"
        f.write_text("x")
        with pytest.raises(ValueError, match="cannot create output folder"):
            results.prepare_out(f / "sub")


@pytest.mark.parametrize("name, decay", [("adamw", 0.1), ("lion", 0.05), ("momentum", 0.01)])
def test_optimizers_by_their_optax_names(name, decay):
    """One update of the configuration's optimizer equals optax's own, weight decay included."""
    import jax.numpy as jnp
    import optax

    cfg = config.make_config({"optimizer.name": name, "optimizer.weight_decay": decay, "optimizer.lr": 0.05})
    tx = config.build_optimizer(cfg)
    p, g = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.1, -0.2])
    got, _ = tx.update(g, tx.init(p), p)
    if name == "momentum":  # first heavy-ball step on the L2-regularised gradient: −η (g + λ p)
        want = -0.05 * (np.asarray(g) + decay * np.asarray(p))
    else:
        expected = {"adamw": optax.adamw, "lion": optax.lion}[name](0.05, weight_decay=decay)
        want, _ = expected.update(g, expected.init(p), p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer.name 'adamax'; valid: sgd, momentum, nesterov, adam, adamw, lion"):
        config.make_config({"optimizer.name": "adamax"})
