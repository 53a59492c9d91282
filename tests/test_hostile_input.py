"""Hostile input: sizes the machine cannot hold or finish, mixing matrices that cannot reach
consensus, losses jax.grad cannot differentiate, and malformed command-line values. Each is refused
before any work starts, with a ValueError (library) or one line on stderr and exit code 2 (CLI)."""

import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.app import cli, config
from coopsgd.core import validate
from coopsgd.core.operator import MixingMatrix
from coopsgd.sim import runtime

GB = 10**9


@pytest.fixture
def machine_16gb(monkeypatch):
    """A machine with 16 GB of memory, whatever this one has."""
    monkeypatch.setattr(validate, "machine_memory", lambda: 16 * GB)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv) -> str:
    """Run the CLI, expect one line on stderr and exit code 2, return that line."""
    code, _, err = _cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def base_toml(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text(f'algorithm = "local_sgd"\nworkers = 2\ntau = 2\nsteps = 8\neval_every = 4\n'
                    f'out = "{tmp_path / "out"}"\n')
    return path


# ------------------------------------------------------------------------------------ periods


class TestPeriod:
    def test_library_refuses_tau_beyond_int32(self):
        with pytest.raises(ValueError, match=r"tau must be an integer <= 2147483647 \(the engine counts steps in int32\)"):
            coopsgd.local_sgd(8, 2**40)
        with pytest.raises(ValueError, match="int32"):
            coopsgd.Algorithm(np.full((2, 2), 0.5), tau=2**31)
        assert coopsgd.local_sgd(8, 2**31 - 1).tau == 2**31 - 1

    @pytest.mark.parametrize("tau, rule", [
        ("2147483647", "tau = 2147483647 is longer than the run (steps = 8)"),
        ("1099511627776", "tau must be an integer <= 2147483647 (the engine counts steps in int32)"),
        ("[[0, 2], [4, 1099511627776]]", "segment tau must be an integer <= 2147483647"),
    ])
    def test_train_refuses_a_period_no_round_of_the_run_ends(self, capsys, base_toml, tau, rule):
        err = _refused(capsys, "train", "-c", str(base_toml), "--set", f"tau={tau}", "--no-progress")
        assert rule in err

    def test_a_round_that_cannot_be_timed_in_memory(self, machine_16gb):
        with pytest.raises(ValueError, match=r"timing rounds of tau = 2147483647 steps on 8 workers would need "
                                             r"about 412 GB, more than this machine can hold \(16 GB"):
            config.make_config({"steps": 2**31 - 1, "tau": 2**31 - 1})
        with pytest.raises(ValueError, match=r"timing 2147483647 steps on 8 workers would need about 412 GB"):
            runtime.RuntimeModel().step_times(0, 2**31 - 1, 8)

    def test_fully_sync_refuses_a_period_it_would_ignore(self, capsys):
        with pytest.raises(ValueError, match="fully_sync has tau = 1 by definition, got tau = 4; for tau > 1 "
                                             "use one of local_sgd"):
            config.make_config({"algorithm": "fully_sync", "tau": 4}, strict=True)
        err = _refused(capsys, "verify", "--algorithm", "fully_sync", "--tau", "4")
        assert "fully_sync has tau = 1 by definition, got tau = 4; for tau > 1 use one of local_sgd" in err
        assert config.make_config({"algorithm": "fully_sync", "tau": 1}, strict=True)["tau"] == 1

    def test_a_shared_or_saved_tau_is_not_a_request(self):
        # compare and sweeps: one configuration for every algorithm
        assert config.make_config({"algorithm": "fully_sync", "tau": 4})["tau"] == 4
        # resume: a checkpoint's complete configuration is a base, not a request
        saved = config.make_config({"algorithm": "dpsgd", "tau": 4, "steps": 16})
        assert config.make_config(saved, strict=True)["tau"] == 4
        with pytest.raises(ValueError, match="dpsgd has tau = 1 by definition"):
            config.make_config(saved, {"tau": 4}, strict=True)


# ----------------------------------------------------------------------------------- sizes


class TestSizes:
    def test_topology_draw_names_the_dense_layout(self, capsys, tmp_path):
        err = _refused(capsys, "topology", "ring", "--nodes", "30000", "--draw", str(tmp_path / "g.png"))
        assert ("topology ring --nodes 30000 --draw would need a dense 30000 x 30000 W (7.2 GB) and one line "
                "for each of 30000 edges; --draw takes at most 2000 nodes") in err
        assert not (tmp_path / "g.png").exists()

    def test_topology_matrix_is_bounded(self, capsys):
        err = _refused(capsys, "topology", "ring", "--nodes", "30000", "--matrix")
        assert "--matrix would print a dense 30000 x 30000 W (7.2 GB)" in err

    def test_topology_nodes_beyond_int_is_one_line(self, capsys):
        err = _refused(capsys, "topology", "ring", "--nodes", "99999999999999999999")
        assert "--nodes must be an integer <= 2147483647" in err

    def test_topology_graph_must_fit_and_finish(self, capsys, monkeypatch):
        monkeypatch.setattr(validate, "machine_memory", lambda: GB)
        err = _refused(capsys, "topology", "ring", "--nodes", "3000000")
        assert ("topology ring --nodes 3000000 (3000000 edges) would need about 2.4 GB, more than this machine "
                "can hold (1 GB of memory)") in err
        err = _refused(capsys, "topology", "complete", "--nodes", "5000")
        assert "has 12497500 edges, more than the 5000000 this command builds" in err

    def test_verify_seeds_must_fit(self, capsys, machine_16gb):
        err = _refused(capsys, "verify", "--algorithm", "local_sgd", "--seeds", "1000000000")
        assert "verify with 1000000000 seeds x 200 steps (n = 8, d = 10) would need about 9.93 TB" in err

    def test_verify_exact_recursion_must_finish(self):
        from coopsgd.analysis import problems, verify

        with pytest.raises(ValueError, match=r"exact recursion on n = 2000 .* --no-exact"):
            verify.check_bound(coopsgd.local_sgd(2000, 1), problems.quadratic(10), 0.1, 100, 4)

    def test_training_workers_times_model_must_fit(self, machine_16gb):
        cfg = config.make_config({"workers": 100_000, "optimizer.name": "adam"})
        with pytest.raises(ValueError, match=r"training 100000 workers of a 40 MB model \(7 copies each\) .* would "
                                             r"need about 28 TB"):
            config.check_fits(cfg, 40e6)
        config.check_fits(config.make_config({}), 40e3, 256.0)

    def test_cli_reports_overflow_in_one_line(self, capsys, monkeypatch):
        from coopsgd.app.commands import topology

        def overflow(args):
            raise OverflowError("Python int too large to convert to C ssize_t")

        monkeypatch.setattr(topology, "_check_size", overflow)
        assert "Python int too large" in _refused(capsys, "topology", "ring", "--nodes", "8")


# ------------------------------------------------------------------------------ mixing matrices


def _ring(n=8, rule="metropolis"):
    return mixing.from_graph(nx.cycle_graph(n), rule)


class TestMixingMatrix:
    def test_divergent_w_is_refused_at_the_door(self):
        w = np.array([[1.5, -0.5], [-0.5, 1.5]])
        with pytest.raises(ValueError, match=r"W has zeta = 2 > 1: an eigenvalue of modulus 2 .* "
                                             r"allow_nonconsensus=True"):
            coopsgd.Algorithm(w)
        assert coopsgd.Algorithm(w, allow_nonconsensus=True).zeta == pytest.approx(2.0)

    def test_divergent_w_beyond_the_dense_limit_by_closed_form(self):
        m, c = 4096, -0.001  # W = a I + c (11ᵀ − I), columns summing to 1: eigenvalue a − c > 1
        w = MixingMatrix.mean(np.full(m, 1.0 - c * (m - 1)), c)
        with pytest.raises(ValueError, match="zeta = 5.09"):
            coopsgd.Algorithm(w)

    def test_disconnected_w_is_refused(self):
        with pytest.raises(ValueError, match=r"W is disconnected: its support has 4 components of sizes "
                                             r"\[1, 1, 1, 1\]"):
            coopsgd.Algorithm(np.eye(4))
        two = mixing.metropolis(nx.disjoint_union(nx.cycle_graph(4), nx.cycle_graph(3)))
        with pytest.raises(ValueError, match=r"2 components of sizes \[4, 3\]"):
            coopsgd.Algorithm(two, tau=4)
        assert coopsgd.Algorithm(np.eye(4), allow_nonconsensus=True).m == 4

    def test_many_components_are_summarised(self):
        with pytest.raises(ValueError, match=r"100 components of sizes \[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, \.\.\.\]"):
            coopsgd.Algorithm(np.eye(100))

    def test_schedule_must_connect_over_its_rounds(self):
        left = mixing.metropolis(nx.Graph([(0, 1), (2, 3)]))
        again = mixing.metropolis(nx.Graph([(0, 1), (2, 3)]))
        with pytest.raises(ValueError, match=r"never connects its workers: the union of its supports has 2 "
                                             r"components of sizes \[2, 2\]"):
            coopsgd.Algorithm(schedules.cyclic([left, again]))
        right = mixing.metropolis(nx.Graph([(1, 2), (3, 0)]))
        assert coopsgd.Algorithm(schedules.cyclic([left, right])).n == 4  # each W alone disconnected

    def test_random_schedule_support_is_checked(self):
        class Split(schedules.MixingSchedule):
            n = 4
            support = np.kron(np.eye(2), np.ones((2, 2))).astype(bool)

            def at(self, r):
                return mixing.metropolis(nx.Graph([(0, 1), (2, 3)]))

        with pytest.raises(ValueError, match="never connects its workers"):
            coopsgd.Algorithm(Split())
        assert coopsgd.Algorithm(Split(), allow_nonconsensus=True).n == 4

    @pytest.mark.parametrize("build", [
        lambda: coopsgd.local_sgd(8, 4),
        lambda: coopsgd.fully_sync(1),
        lambda: coopsgd.easgd(4, 2),
        lambda: coopsgd.overlap_local_sgd(4, 2, 0.5),
        lambda: coopsgd.dpsgd(nx.cycle_graph(8)),
        lambda: coopsgd.dpsgd(nx.cycle_graph(8), weights="best_constant"),
        lambda: coopsgd.Algorithm(_ring(8, "max_degree"), tau=2),
        lambda: coopsgd.Algorithm(schedules.one_peer_exponential(8)),
        lambda: coopsgd.Algorithm(schedules.one_peer_directed_exponential(8)),
        lambda: coopsgd.Algorithm(_ring(65536)),
        lambda: coopsgd.Algorithm(np.array([[0.0, 1.0], [1.0, 0.0]])),  # zeta = 1 (bipartite): accepted
    ])
    def test_valid_mixings_are_accepted(self, build):
        assert build().n >= 1

    @pytest.mark.parametrize("make", [
        lambda: MixingMatrix.from_blocks(np.array([[0.5 + 1j, 0.5], [0.5 - 1j, 0.5]])),
        lambda: MixingMatrix.mean(np.array([0.5 + 1j, 0.5]), 0.5),
        lambda: MixingMatrix.from_blocks(np.eye(1), np.zeros((1, 1)), np.zeros((1, 1)), np.array([[1 + 0j]])),
        lambda: coopsgd.Algorithm(np.array([[0.5 + 1j, 0.5], [0.5 - 1j, 0.5]])),
    ])
    def test_complex_values_are_refused(self, make):
        with pytest.raises(ValueError, match="complex"):
            make()

    def test_integer_w_is_refused_suggesting_float(self):
        with pytest.raises(ValueError, match=r"W must be a float matrix, got the integer dtype int64; convert it "
                                             r"first, e.g. np.asarray\(W, dtype=float\)"):
            coopsgd.Algorithm(np.array([[0, 1], [1, 0]]))
        with pytest.raises(ValueError, match="boolean dtype"):
            mixing.check(np.eye(2, dtype=bool))
        assert coopsgd.Algorithm(np.array([[0, 1], [1, 0]], dtype=float)).n == 2


# ------------------------------------------------------------------------------------- the loss


class TestLossDtype:
    @pytest.mark.parametrize("loss, dtype", [
        (lambda p, b: jnp_sum(p["w"] * b["x"]).astype("int32"), "integer dtype int32"),
        (lambda p, b: jnp_sum(p["w"] * b["x"]) * (1 + 1j), "complex dtype complex64"),
    ])
    def test_loss_of_the_wrong_dtype_is_named_before_compiling(self, loss, dtype):
        import optax

        trainer = coopsgd.CooperativeSGD(coopsgd.local_sgd(2, 2), optax.sgd(0.1), loss)
        state = trainer.init({"w": np.ones(3, np.float32)})
        with pytest.raises(ValueError, match=f"loss_fn's output must be a real floating scalar .* got the {dtype}"):
            trainer.step(state, {"x": np.ones((2, 3), np.float32)})


def jnp_sum(x):
    import jax.numpy as jnp

    return jnp.sum(x)


# --------------------------------------------------------------------------- command-line values


class TestCommandLine:
    def test_empty_algorithm_lists(self, capsys):
        assert "--algorithms is empty" in _refused(capsys, "compare", "--algorithms", "")
        err = _refused(capsys, "compare", "--algorithms", "local_sgd,,easgd")
        assert "--algorithms 'local_sgd,,easgd' has an empty name" in err

    def test_bandwidth_too_small_for_a_finite_time(self, capsys, base_toml):
        err = _refused(capsys, "train", "-c", str(base_toml), "--set", "runtime.bandwidth=1e-320", "--no-progress")
        assert "bandwidth must be large enough for a byte to take a finite time, got 1e-320 B/s" in err
        with pytest.raises(ValueError, match="finite time"):
            runtime.network(0.001, 1e-320)

    def test_a_delay_that_overflows_is_refused(self):
        model = runtime.RuntimeModel(runtime.constant(1e308), runtime.constant_delay(1e308))
        with pytest.raises(ValueError, match="simulated time overflows"):
            model.clock(2).round(0, 2, None)

    def test_folders_are_named_as_folders(self, capsys, tmp_path, base_toml):
        assert f"config file '{tmp_path}' is a folder, not a TOML file" in _refused(
            capsys, "train", "--config", str(tmp_path))
        assert f"data '{tmp_path}' is a folder; pass a .npz file" in _refused(
            capsys, "train", "-c", str(base_toml), "--data", str(tmp_path), "--no-progress")
