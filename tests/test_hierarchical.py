"""Hierarchical averaging: torch's HierarchicalModelAverager rule written out in NumPy against the
trainer on simulate, pmap and shard_map; the grouped all-reduce's bytes derived by hand; the
collectives in the compiled HLO; and bad input.

``tests/conftest.py`` forces 8 CPU devices before jax is imported.
"""
import re

import jax
import numpy as np
import optax
import pytest
from conftest import INIT, LR, local_sgd_np, loss_fn, make_batches

import coopsgd
from coopsgd.parallel import plan as plans

needs_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")


def torch_rule_np(batches, steps, m, levels):
    """torch's ``HierarchicalModelAverager.average_parameters`` after every optimizer step, in NumPy:
    for the largest period p of ``levels`` (``{period: group_size}``, increasing) that divides the
    step count, average the models within each contiguous group of ``levels[p]`` workers
    (``dist.new_subgroups``: ranks ``b·g … b·g + g − 1``); no period divides it: nothing. Between,
    plain SGD on each worker. The count is the number of steps taken (1-based); torch's own
    counter starts at 0 at the first call, one step earlier."""
    def average_groups(t, w, b):
        step = t + 1
        for period in reversed(list(levels)):  # torch's _find_process_group
            if step % period == 0:
                g = levels[period]
                for start in range(0, m, g):
                    w[start:start + g] = w[start:start + g].mean(axis=0)
                    b[start:start + g] = b[start:start + g].mean()
                break
        return w, b

    return local_sgd_np(batches, steps, m, 0, average_groups)


def run(backend, algo, batches, steps):
    t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, backend=backend, track_consensus=False)
    state, metrics = t.run(t.init(INIT), batches, steps)
    cols = t.columns(state)
    return np.asarray(cols["w"]), np.asarray(cols["b"]), np.asarray(metrics.communicated)


# m = 8 on 8 devices: groups of 4 span 4 devices (a grouped all-reduce); m = 16: groups of 2 lie
# inside one device (a local mean), groups of 4 span 2 devices; m = 24: groups of 4 split the
# 3 workers of a device unevenly (rotations within the groups).
CASES = {
    "m8_two_levels": (8, {2: 4, 8: 8}),
    "m16_three_levels": (16, {1: 2, 2: 4, 8: 16}),
    "m24_uneven_groups": (24, {2: 4, 4: 24}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_rule_on_every_backend(case):
    m, levels = CASES[case]
    steps = 2 * max(levels) if m == 8 else max(levels)
    batches = make_batches(steps, m, seed=7)
    ref_w, ref_b = torch_rule_np(batches, steps, m, levels)
    algo = coopsgd.hierarchical(m, levels)
    backends = ["simulate", "pmap", "shard_map"] if jax.device_count() >= 8 else ["simulate"]
    if case == "m24_uneven_groups" and len(backends) == 3:
        backends = ["shard_map"]  # the rotation path (the same code under pmap; simulated, a local mean)
    first = min(levels)
    for backend in backends:
        w, b, communicated = run(backend, algo, batches, steps)
        np.testing.assert_allclose(w, ref_w, rtol=2e-5, atol=2e-6, err_msg=backend)
        np.testing.assert_allclose(b, ref_b, rtol=2e-5, atol=2e-6, err_msg=backend)
        assert communicated.tolist() == [(k + 1) % first == 0 for k in range(steps)], backend


def test_the_reference_averages_groups_between_global_rounds():
    # The reference itself: after step 2 the two halves of m = 8 hold two different models (each
    # its group's mean), after step 8 all eight agree.
    batches = make_batches(8, 8, seed=3)
    w2, _ = torch_rule_np(batches, 2, 8, {2: 4, 8: 8})
    assert np.allclose(w2[:4], w2[0]) and np.allclose(w2[4:], w2[4]) and not np.allclose(w2[0], w2[4])
    w8, _ = torch_rule_np(batches, 8, 8, {2: 4, 8: 8})
    assert np.allclose(w8, w8[0])


def test_rounds_with_groups_of_one_send_nothing():
    # A level of group size 1 is W = I: planned as nothing, no data moves, no bytes charged.
    algo = coopsgd.hierarchical(8, {1: 1, 4: 8})
    t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn)
    assert [t.plan(r).kind for r in range(4)] == ["none", "none", "none", "mean"]
    assert [t.mix_round(r).moves for r in range(4)] == [False, False, False, True]
    assert [t.communication(4000.0, r).bytes_per_worker for r in range(4)] == [0.0, 0.0, 0.0, 7000.0]
    batches = make_batches(8, 8, seed=5)
    w, b, communicated = run("simulate", algo, batches, 8)
    assert communicated.tolist() == [False, False, False, True] * 2
    ref_w, ref_b = torch_rule_np(batches, 8, 8, {1: 1, 4: 8})
    np.testing.assert_allclose(w, ref_w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(b, ref_b, rtol=2e-5, atol=2e-6)


class TestBytes:
    """Ring all-reduce within a group of g: 2(g − 1)/g · S bytes and 2(g − 1) messages per worker."""

    def test_group_round_costs_less_than_the_global_round(self):
        t = coopsgd.CooperativeSGD(coopsgd.hierarchical(8, {2: 4, 8: 8}), optax.sgd(LR), loss_fn)
        group, whole = t.communication(4000.0, 0), t.communication(4000.0, 3)
        # S = 4000 B, g = 4: 2 · 3/4 · 4000 = 6000 B in 6 messages; m = 8: 2 · 7/8 · 4000 = 7000 B in 14.
        assert (group.kind, group.bytes_per_worker, group.messages, group.all_reduces) == ("all-reduce", 6000.0, 6, 1)
        assert (whole.kind, whole.bytes_per_worker, whole.messages, whole.all_reduces) == ("all-reduce", 7000.0, 14, 1)
        assert group.bytes_per_worker <= whole.bytes_per_worker
        # As three neighbour slots (what a block of J_4 was planned as before) it would be 3 · 4000.
        assert group.bytes_per_worker < 12000.0

    @pytest.mark.parametrize("m,g,expected", [(16, 2, 4000.0), (16, 4, 6000.0), (16, 8, 7000.0), (64, 8, 7000.0)])
    def test_ring_within_the_group(self, m, g, expected):
        # 2(g − 1)/g · 4000: g = 2 → 4000, g = 4 → 6000, g = 8 → 7000; the global round of m = 16 is
        # 2 · 15/16 · 4000 = 7500 and of m = 64 is 2 · 63/64 · 4000 = 7875.
        cost = coopsgd.mixing_traffic(coopsgd.mixing.group_averaging(m, g), 4000.0)
        assert (cost.kind, cost.bytes_per_worker, cost.messages) == ("all-reduce", expected, 2 * (g - 1))
        assert cost.bytes_per_worker <= coopsgd.mixing_traffic(coopsgd.mixing.averaging(m), 4000.0).bytes_per_worker

    def test_plan_kind_is_found_from_the_structure(self):
        p = plans.plan_for_matrix(coopsgd.mixing.group_averaging(8, 4), 8)
        assert (p.kind, p.group, p.self_weight) == ("groups", 4, False)
        # A lazy group mean: W = (I + I ⊗ J_4)/2, diagonal 1/2 + 1/8, within the groups 1/8.
        lazy = 0.5 * np.eye(8) + 0.5 * np.kron(np.eye(2), np.full((4, 4), 0.25))
        p = plans.plan_for_matrix(lazy, 8)
        assert (p.kind, p.group, p.self_weight) == ("groups", 4, True)
        coef = plans.coefficients(p, lazy)
        assert float(coef["c"]) == 0.125 and coef["d"].tolist() == [0.5] * 8
        # Not contiguous groups (pairs 0–4, 1–5, …), unequal weights within a group, or groups of
        # unequal sizes: another kind.
        strided = np.kron(np.full((2, 2), 0.5), np.eye(4))
        assert plans.plan_for_matrix(strided, 8).kind == "neighbour"
        skewed = np.kron(np.eye(2), np.array([[0.5, 0.2, 0.3], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]))
        assert plans.plan_for_matrix(skewed, 6).kind == "neighbour"
        uneven = np.zeros((6, 6))
        uneven[:2, :2] = 0.5
        uneven[2:, 2:] = 0.25
        assert plans.plan_for_matrix(uneven, 6).kind == "neighbour"

    def test_simulated_kernel_is_x_times_w(self):
        from coopsgd.parallel.collectives import WorkerAxis
        from coopsgd.parallel.linear import mix_local

        lazy = 0.5 * np.eye(8) + 0.5 * np.kron(np.eye(2), np.full((4, 4), 0.25))
        p = plans.plan_for_matrix(lazy, 8)
        x = np.arange(24.0, dtype=np.float32).reshape(8, 3)
        new, _ = mix_local(p, x, np.zeros((0, 3), np.float32), plans.coefficients(p, lazy), WorkerAxis(8))
        # new[j] = Σ_i W[i, j] x[i]: x_j/2 + (mean of j's group)/2; group means of rows 0–3 and 4–7.
        means = np.repeat([[4.5, 5.5, 6.5], [16.5, 17.5, 18.5]], 4, axis=0)
        np.testing.assert_allclose(np.asarray(new), x / 2 + means / 2, rtol=1e-6)


def collectives(text: str) -> dict[str, list[str]]:
    """The collective ops of compiled HLO text (sync and async '-start' forms), each with its
    replica groups ('' when it has none)."""
    out = {}
    for name in ["all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"]:
        lines = [line for line in text.splitlines() if re.search(rf"\b{name}(-start)?\(", line)]
        out[name] = [(re.search(r"replica_groups=(\{[^=]*?\}\})", line) or re.search(r"()", "")).group(1)
                     for line in lines]
    return out


@needs_devices
class TestCompiledCommunication:
    """The compiled program's collectives are the plan's: one all-reduce among each group's devices."""

    def hlo(self, backend, algo, r):
        t = coopsgd.CooperativeSGD(algo, optax.sgd(LR), loss_fn, backend=backend, track_consensus=False)
        batch = jax.tree.map(lambda x: x[0], make_batches(1, algo.m))
        return collectives(t.lower_step(t.init(INIT), batch, r=r).compile().as_text())

    @pytest.mark.parametrize("backend", ["pmap", "shard_map"])
    def test_groups_spanning_devices_are_one_grouped_all_reduce(self, backend):
        ops = self.hlo(backend, coopsgd.hierarchical(8, {2: 4, 8: 8}), r=0)
        assert ops["all-reduce"] == ["{{0,1,2,3},{4,5,6,7}}"]
        assert ops["collective-permute"] == ops["all-gather"] == ops["reduce-scatter"] == []

    def test_global_round_is_one_all_reduce_over_all_devices(self):
        ops = self.hlo("shard_map", coopsgd.hierarchical(8, {2: 4, 8: 8}), r=3)
        assert len(ops["all-reduce"]) == 1 and ops["all-reduce"][0] in ("", "{{0,1,2,3,4,5,6,7}}")
        assert ops["collective-permute"] == []

    def test_two_workers_per_device(self):
        algo = coopsgd.hierarchical(16, {1: 2, 2: 4, 8: 16})
        # groups of 2 are the two workers of one device: no collective at all
        assert sum(map(len, self.hlo("shard_map", algo, r=0).values())) == 0
        # groups of 4 are two devices each
        ops = self.hlo("shard_map", algo, r=1)
        assert ops["all-reduce"] == ["{{0,1},{2,3},{4,5},{6,7}}"] and ops["collective-permute"] == []


class TestBadInput:
    @pytest.mark.parametrize("m,levels,message", [
        (8, {}, r"must not be empty"),
        (8, [(2, 4, 1)], r"\{period: group_size\} or \(period, group_size\) pairs"),
        (8, {0: 8}, r"hierarchical period must be an integer >= 1, got 0"),
        (8, {8: 4, 2: 8}, r"periods must increase strictly .* got 2 after 8 in periods \[8, 2\]"),
        (8, [(2, 4), (2, 8)], r"got 2 after 2"),
        (8, {2: 2, 4: 4, 6: 8}, r"multiple of the one before .* got 6 after 4 in periods \[2, 4, 6\]"),
        (8, {2: 3, 8: 8}, r"group size 3 must divide m = 8"),
        (12, {2: 4, 4: 6, 8: 12}, r"group sizes must increase strictly, each dividing the next .* got 6 after 4"),
        (8, {2: 4, 4: 2, 8: 8}, r"got 2 after 4"),
        (8, {2: 2, 8: 4}, r"last hierarchical level must average all m = 8 workers .* got group size 4"),
        (8, {1: 4, 2 ** 17: 8}, r"131072 / 1 = 131072 rounds, must be at most 65536"),
        (8, {2: 0, 8: 8}, r"group size must be an integer >= 1, got 0"),
    ])
    def test_rejected_with_the_value_and_the_rule(self, m, levels, message):
        with pytest.raises(ValueError, match=message):
            coopsgd.hierarchical(m, levels)

    def test_pairs_and_mappings_are_the_same(self):
        a = coopsgd.hierarchical(8, [(2, 4), (8, 8)])
        b = coopsgd.hierarchical(8, {2: 4, 8: 8})
        assert a.tau == b.tau == 2
        assert [np.asarray(w).tolist() for w in a.mixing.cycle] == [np.asarray(w).tolist() for w in b.mixing.cycle]


def test_registry_builds_it_from_the_configuration():
    from coopsgd.app import config, registry

    algo, entry = registry.build(config.make_config({"algorithm": "hierarchical", "workers": 8, "tau": 2}))
    assert entry.name == "hierarchical" and algo.name == "hierarchical" and algo.tau == 2
    # groups of 4 every 2 steps, all 8 every 8: W after steps 2, 4, 6 is I ⊗ J_4, after step 8 J_8.
    assert [float(algo.mixing_at(k - 1)[3, 0]) for k in (2, 4, 6, 8)] == [0.25, 0.25, 0.25, 0.125]
    assert [float(algo.mixing_at(k - 1)[4, 0]) for k in (2, 4, 6, 8)] == [0.0, 0.0, 0.0, 0.125]
