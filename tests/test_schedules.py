import networkx as nx
import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules, topology


def mixes(period, steps):
    return [k for k in range(steps) if period.communicates(k)]


class TestPeriodSchedules:
    def test_constant(self):
        period = schedules.constant(3)
        assert mixes(period, 10) == [2, 5, 8]
        assert [period.round_index(k) for k in range(7)] == [0, 0, 0, 1, 1, 1, 2]
        assert period.round_start(4) == 12 and period.constant_tau == 3

    def test_piecewise(self):
        # rounds [0,3) [3,6) [6,9) (starts before 7: tau 3), then [9,11) [11,13) with tau 2
        period = schedules.piecewise([(0, 3), (7, 2)])
        assert mixes(period, 14) == [2, 5, 8, 10, 12]
        assert [period.round_index(k) for k in (0, 2, 3, 8, 9, 11)] == [0, 0, 1, 2, 3, 4]
        assert period.round_start(3) == 9 and period.constant_tau is None

    def test_user_callable(self):
        # tau = 1 + start // 4: rounds [0,1) [1,2) [2,3) [3,4) [4,6) [6,8) [8,11) [11,14)
        algo = coopsgd.Algorithm(mixing.averaging(2), tau=lambda start: 1 + start // 4)
        assert mixes(algo.period, 14) == [0, 1, 2, 3, 5, 7, 10, 13]
        assert algo.period.round_start(6) == 8

    def test_communicates_in_any_order(self):
        period = schedules.as_period(lambda start: 2 + start % 3)
        late_first = [period.communicates(k) for k in reversed(range(30))][::-1]
        fresh = schedules.as_period(lambda start: 2 + start % 3)
        assert late_first == [fresh.communicates(k) for k in range(30)]

    def test_bad_callable_names_the_step(self):
        period = schedules.as_period(lambda start: 0 if start >= 4 else 2)
        with pytest.raises(ValueError, match="period at step 4 must be an integer >= 1, got 0"):
            mixes(period, 10)

    @pytest.mark.parametrize("segments,match", [([(1, 2)], "start at step 0"),
                                                ([(0, 2), (5, 3), (5, 1)], "increase"),
                                                ([(0, 0)], "segment tau")])
    def test_bad_piecewise(self, segments, match):
        with pytest.raises(ValueError, match=match):
            schedules.piecewise(segments)


class TestMixingSchedules:
    def test_cyclic(self):
        ws = [mixing.metropolis(nx.cycle_graph(5)), mixing.averaging(5), np.eye(5)]
        sched = schedules.cyclic(ws)
        for r in range(7):
            np.testing.assert_array_equal(sched.at(r), ws[r % 3])
        assert np.all(sched.support)  # J has full support

    def test_cyclic_sizes_must_agree(self):
        with pytest.raises(ValueError, match=r"W\[1\] must be 3 x 3"):
            schedules.cyclic([np.eye(3), np.eye(4)])
        with pytest.raises(ValueError, match="at least one"):
            schedules.cyclic([])

    def test_one_peer_exponential_by_hand(self):
        sched = schedules.one_peer_exponential(8)  # ⌈log2 8⌉ = 3 offsets: 1, 2, 4
        w0, w1, w2 = sched.at(0), sched.at(1), sched.at(2)
        np.testing.assert_allclose([w0[0, 1], w0[0, 7], w0[0, 0]], 1 / 3)
        np.testing.assert_allclose([w1[0, 2], w1[0, 6], w1[0, 0], w1[0, 1]], [1 / 3, 1 / 3, 1 / 3, 0])
        np.testing.assert_allclose([w2[0, 4], w2[0, 0]], 1 / 2)  # i + 4 = i - 4 (mod 8)
        np.testing.assert_array_equal(sched.at(3), w0)
        for w in sched.cycle:
            mixing.check(w, symmetric=True)
        union = mixing.support_graph(sched.support)
        assert {frozenset(e) for e in union.edges} == {frozenset(e) for e in topology.exponential(8).edges}

    def test_one_peer_exponential_odd(self):
        sched = schedules.one_peer_exponential(6)  # offsets 1, 2, 4 (4 = -2 mod 6)
        assert len(sched.cycle) == 3
        np.testing.assert_allclose([sched.at(2)[0, 4], sched.at(2)[0, 2]], 1 / 3)

    def test_contraction_of_static_symmetric_w_is_zeta_squared(self):
        w = mixing.metropolis(nx.cycle_graph(9))
        sched = schedules.static(w)
        assert sched.contraction() == pytest.approx(coopsgd.zeta(w) ** 2)
        assert sched.zeta == pytest.approx(coopsgd.zeta(w))

    def test_contraction_of_a_cycle_by_hand(self):
        # alternating J and I: E[WᵀW] - J = (J + I)/2 - J = (I - J)/2, norm 1/2
        sched = schedules.cyclic([mixing.averaging(4), np.eye(4)])
        assert sched.contraction() == pytest.approx(0.5)
        assert coopsgd.Algorithm(sched).zeta == pytest.approx(0.5**0.5)


class TestStructure:
    def test_cyclic_keeps_auxiliary_columns(self):
        easgd = coopsgd.easgd(3)
        algo = coopsgd.Algorithm(schedules.cyclic([np.asarray(easgd.W)] * 2), v=1)
        assert algo.mixing.v == 1 and algo.mixing_at(0).v == 1 and algo.mixing_at(0).m == 3

    def test_a_random_schedule_is_not_taken_as_symmetric(self):
        class Directed(schedules.MixingSchedule):
            n, support = 3, np.ones((3, 3))

            def at(self, r):
                return np.array([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])

        assert not Directed().symmetric

    def test_random_switch_between_averaging_and_identity_runs(self):
        # a full support is planned as the general (dense) mixing, whatever W each round draws
        import optax

        from coopsgd.parallel import plan as plans

        class Switch(schedules.MixingSchedule):
            n, support = 4, np.ones((4, 4))

            def at(self, r):
                return mixing.averaging(4) if r % 2 else np.eye(4)

        assert plans.plan_for_support(mixing.averaging(4), 4).kind == "dense"
        trainer = coopsgd.CooperativeSGD(coopsgd.Algorithm(Switch()), optax.sgd(0.1),
                                         lambda p, b: ((p - b) ** 2).sum())
        state, metrics = trainer.run(trainer.init(np.zeros(2, np.float32)),
                                     np.arange(8, dtype=np.float32).reshape(2, 4, 1) * np.ones(2), 2)
        assert np.asarray(metrics.communicated).tolist() == [False, True]
        # by hand: step 0 gives 0.2·b₀ = 0.2·i (W = I), step 1 gives 0.8·0.2·i + 0.2·(4 + i), then J
        np.testing.assert_allclose(np.asarray(state.params)[:, 0], 0.16 * 1.5 + 0.2 * 5.5, rtol=1e-6)


def test_a_users_adaptive_rule_restores_from_json():
    import json
    from typing import NamedTuple

    class GrowState(NamedTuple):
        tau: int
        seen: tuple = ()

    class Grow(schedules.AdaptivePeriod):
        def __init__(self):
            super().__init__("grow")

        def init(self):
            return GrowState(1)

        def tau(self, state, start, index):
            return state.tau

        def observe(self, state, **report):
            return GrowState(state.tau + 1, state.seen + ((report["start"], report["tau"]),))

    rule = Grow()
    state = rule.observe(rule.observe(rule.init(), start=0, tau=1), start=1, tau=2)
    assert rule.restore(json.loads(json.dumps(state._asdict()))) == state
