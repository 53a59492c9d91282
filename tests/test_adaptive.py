"""AdaComm (Wang & Joshi, arXiv:1810.08313) and ADPSGD (Jiang & Agrawal, arXiv:2007.06134) periods."""

import math

import numpy as np
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.adaptive import ADPSGD, AdaComm, adacomm, adacomm_period, adpsgd, consensus_distance


class TestAdaCommRule:
    @pytest.mark.parametrize(
        "args, expected",
        [
            ((10, 2.0, 0.5), 5),  # ceil(sqrt(0.25) * 10) = 5
            ((4, 1.0, 0.25), 2),  # exactly 2
            ((10, 1.0, 0.36), 6),  # sqrt(0.36) * 10 = 6 up to round-off: still 6
            ((5, 1.0, 1.0), 5),  # no progress: tau0
            ((5, 1.0, 2.0), 8),  # loss went up: ceil(1.4142 * 5) = ceil(7.07) = 8
            ((3, 1.0, 0.01), 1),  # ceil(0.3) = 1
            ((3, 1.0, 0.0), 1),  # never below 1
            ((16, 3.0, 1.0), 10),  # ceil(16 / sqrt(3)) = ceil(9.2376) = 10
        ],
    )
    def test_hand_computed(self, args, expected):
        assert adacomm_period(*args) == expected

    def test_learning_rate_factor(self):
        # ceil(sqrt((0.1/0.01) * 0.5/2.0) * 10) = ceil(sqrt(2.5) * 10) = ceil(15.811) = 16
        assert adacomm_period(10, 2.0, 0.5, lr0=0.1, lr=0.01) == 16
        # decayed lr by 4 and loss by 4 cancel: tau0
        assert adacomm_period(7, 1.0, 0.25, lr0=1.0, lr=0.25) == 7

    def test_same_function_via_schedules(self):
        assert schedules.adacomm_period is adacomm_period
        assert schedules.adacomm_period(10, 2.0, 0.5) == 5

    @pytest.mark.parametrize(
        "kwargs, word",
        [
            (dict(tau0=0, loss0=1.0, loss=1.0), "tau0"),
            (dict(tau0=1.5, loss0=1.0, loss=1.0), "tau0"),
            (dict(tau0=-2, loss0=1.0, loss=1.0), "tau0"),
            (dict(tau0=4, loss0=0.0, loss=1.0), "loss0"),
            (dict(tau0=4, loss0=1.0, loss=-1.0), "loss"),
            (dict(tau0=4, loss0=1.0, loss=float("nan")), "loss"),
            (dict(tau0=4, loss0=1.0, loss=1.0, lr=0.0), "lr"),
            (dict(tau0=4, loss0=1.0, loss=1.0, lr0=-1.0), "lr0"),
        ],
    )
    def test_bad_input(self, kwargs, word):
        with pytest.raises(ValueError, match=word):
            adacomm_period(**kwargs)


class TestAdaCommSchedule:
    @pytest.mark.parametrize("tau0, interval", [(0, 1.0), (2, 0.0), (2, -3.0), (2, float("inf"))])
    def test_bad_input(self, tau0, interval):
        with pytest.raises(ValueError):
            schedules.adacomm(tau0, interval)

    def test_updates_once_per_interval(self):
        sched = schedules.adacomm(16, 10.0)
        assert isinstance(sched, schedules.PeriodSchedule) and sched.constant_tau is None
        assert sched.tau_at(0) == 16
        assert sched.observe(loss=4.0, time=3.0) == 16  # loss0 = 4; no boundary yet
        assert sched.tau_at(16) == 16
        assert sched.observe(loss=1.0, time=10.5) == 8  # boundary 10: ceil(sqrt(1/4) * 16)
        assert sched.tau_at(32) == 8
        assert sched.observe(loss=0.25, time=15.0) == 8  # next boundary is 20
        assert sched.observe(loss=0.25, time=31.0) == 4  # ceil(sqrt(1/16) * 16); next is 40
        assert sched.observe(loss=0.01, time=39.9) == 4
        assert sched.next_update == 40.0
        assert [h["tau"] for h in sched.history] == [8, 4]
        # rounds keep the period they were given
        assert sched.tau_at(0) == 16 and sched.tau_at(16) == 16 and sched.tau_at(32) == 8

    def test_learning_rate_decay_lengthens_period(self):
        sched = adacomm(16, 10.0)
        sched.observe(loss=4.0, time=1.0, lr=0.1)
        assert sched.observe(loss=1.0, time=10.0, lr=0.1) == 8  # ceil(sqrt(1/4) 16)
        assert sched.observe(loss=1.0, time=20.0, lr=0.025) == 16  # ceil(sqrt(4/4) 16)

    def test_learning_rate_schedule_by_step(self):
        sched = adacomm(16, 10.0, loss0=4.0, lr_schedule=lambda step: 0.1 if step < 100 else 0.025)
        assert sched.observe(loss=1.0, time=10.0, step=50) == 8
        assert sched.observe(loss=1.0, time=20.0, step=150) == 16
        assert sched.lr0 == 0.1

    def test_tau_max_caps(self):
        sched = adacomm(4, 1.0, loss0=1.0, tau_max=6)
        assert sched.observe(loss=9.0, time=1.0) == 6  # rule says 12

    def test_time_must_not_go_back(self):
        sched = adacomm(4, 1.0)
        sched.observe(loss=1.0, time=5.0)
        with pytest.raises(ValueError, match="decrease"):
            sched.observe(loss=1.0, time=4.0)

    def test_training_loop_protocol_with_algorithm(self):
        # A loop in the engine's shape: ask tau_at(start) each round, run, observe.
        sched = adacomm(8, 20.0)
        algo = coopsgd.Algorithm(mixing.averaging(4), tau=sched)
        step, time, loss = 0, 0.0, 1.0
        starts, taus = [], []
        while step < 200:
            tau = sched.tau_at(step)
            starts.append(step)
            taus.append(tau)
            step += tau
            time += tau * 1.0 + 4.0  # Y = 1 per step, D = 4 per averaging
            loss *= 0.97**tau
            sched.observe(loss=loss, time=time)
        assert taus[0] == 8 and taus[-1] < taus[0]  # shrinks as the loss falls
        assert all(b <= a for a, b in zip(taus, taus[1:]))
        ends = {s + t - 1 for s, t in zip(starts, taus)}
        for k in range(step):
            assert algo.communicates(k) == (k in ends)
        assert algo.tau is sched


class TestADPSGD:
    @pytest.mark.parametrize(
        "args, kwargs",
        [
            ((0, 100, 10), {}),
            ((2, 0, 10), {}),
            ((2, 100, 0), {}),
            ((2, 100, 10), dict(max_growth=0.5)),
            ((2, 100, 10), dict(target=0.0)),
            ((4, 100, 10), dict(tau_max=2)),
        ],
    )
    def test_bad_input(self, args, kwargs):
        with pytest.raises(ValueError):
            adpsgd(*args, **kwargs)

    def test_rule_hand_computed(self):
        big = 10**9
        sched = adpsgd(2, big, big)
        assert sched.tau_at(0) == 2
        assert sched.observe(consensus=4.0) == 2  # target 4, rate 2: floor(4/2) = 2
        assert sched.tau_at(2) == 2
        assert sched.observe(consensus=2.0) == 4  # rate 1: floor(4/1) = 4 <= 2 * 2
        assert sched.tau_at(4) == 4
        assert sched.observe(consensus=1.0) == 8  # rate 1/4: floor(16) capped at 2 * 4 = 8
        assert sched.tau_at(8) == 8
        assert sched.observe(consensus=2.0) == 16  # rate 1/4: floor(16) = 16 <= 16
        assert sched.tau_at(16) == 16
        assert sched.observe(consensus=64.0) == 16  # rate 4 wants 1: never shrinks
        assert [h["rate"] for h in sched.history] == [2.0, 1.0, 0.25, 0.25, 4.0]

    def test_constant_rate_keeps_period(self):
        sched = adpsgd(3, 10**6, 10**6)
        start = 0
        for _ in range(10):
            tau = sched.tau_at(start)
            assert tau == 3
            sched.observe(consensus=0.5 * tau)
            start += tau

    def test_period_grows_as_variance_falls(self):
        # Drift rate c(t) = 1 / (1 + t/50) per step: Delta = tau * c at the round's start.
        sched = ADPSGD(1, 10**6, 10**6, max_growth=1.5)
        step, taus, rates = 0, [], []
        while step < 2000:
            tau = sched.tau_at(step)
            rate = 1.0 / (1.0 + step / 50.0)
            sched.observe(consensus=tau * rate)
            taus.append(tau)
            rates.append(rate)
            step += tau
        assert all(b >= a for a, b in zip(taus, taus[1:]))
        assert taus[-1] >= 20 * taus[0]
        # the predicted disagreement tau * rate stays at the target (within one step's worth)
        assert all(t * r <= 1.0 + 1e-9 for t, r in zip(taus[1:], rates[:-1]))

    @pytest.mark.parametrize("tau0, total, budget", [(1, 200, 20), (3, 100, 7), (1, 1000, 1), (2, 50, 50)])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_budget_respected(self, tau0, total, budget, seed):
        rng = np.random.default_rng(seed)
        sched = adpsgd(tau0, total, budget, max_growth=3.0)
        step, averagings, taus = 0, 0, []
        while step < total:
            tau = sched.tau_at(step)
            taus.append(tau)
            step += tau
            averagings += 1
            sched.observe(consensus=float(rng.exponential()) * tau)
        assert averagings <= budget and sched.averagings == averagings
        assert step == total  # the last round ends exactly at the horizon
        assert all(b >= a for a, b in zip(taus[:-1], taus[1:-1]))  # only the last may be cut short

    def test_budget_floor_hand_values(self):
        sched = adpsgd(1, 100, 10, max_growth=1.0)
        assert sched.budget_floor(100, 10) == 10  # uniform spending: ceil(R / b)
        assert sched.budget_floor(95, 10) == 10
        sched = adpsgd(1, 100, 10, max_growth=2.0, front_load=None)
        assert sched.budget_floor(100, 1) == 100  # one averaging left: cover everything
        assert sched.budget_floor(100, 2) == 34  # ceil(100 / 3): tau + 2 tau >= 100
        assert sched.budget_floor(100, 3) == 15  # ceil(100 / 7)
        assert sched.budget_floor(100, 2000) == 1  # no constraint yet (g^b overflows)
        sched = adpsgd(1, 100, 10, max_growth=2.0, front_load=2.0)
        assert sched.budget_floor(100, 3) == 17  # pace: ceil(100 / (2 * 3)) beats 15
        assert sched.budget_floor(100, 10) == 5  # pace: ceil(100 / 20)
        assert sched.budget_floor(100, 2) == 34  # feasibility still wins near the end

    def test_frequent_early_then_floor_driven_growth(self):
        # The drift never falls, so the rule keeps tau0; the budget floor must take over near the
        # end, growing tau by at most the factor g per round (up to integer rounding).
        g = 1.25
        sched = adpsgd(4, 1000, 100, max_growth=g, front_load=None)
        step, taus = 0, []
        while step < 1000:
            taus.append(sched.tau_at(step))
            step += taus[-1]
            sched.observe(consensus=float(taus[-1]))
        assert step == 1000 and len(taus) <= 100
        assert taus[:50] == [4] * 50  # average often early
        assert taus[-1] > 50
        assert all(b <= math.ceil(g * a) for a, b in zip(taus, taus[1:]))

    def test_front_load_limits_early_spending(self):
        # Same constant drift with the default pace limit f = 2: averagings are never spent more
        # than twice as fast as the uniform pace R / b, so the first period is ceil(1000 / 200) and
        # the last rounds stay far shorter than without the limit.
        sched = adpsgd(4, 1000, 100, max_growth=1.25)
        step, taus = 0, []
        while step < 1000:
            taus.append(sched.tau_at(step))
            step += taus[-1]
            sched.observe(consensus=float(taus[-1]))
        assert taus[0] == 5 and step == 1000 and len(taus) <= 100
        assert all(b >= a for a, b in zip(taus[:-1], taus[1:-1]))
        assert max(taus) <= 70  # 134 without the pace limit (previous test)

    @pytest.mark.parametrize("front_load", [0.5, 0.0, -1.0])
    def test_bad_front_load(self, front_load):
        with pytest.raises(ValueError, match="front_load"):
            adpsgd(2, 100, 10, front_load=front_load)

    def test_budget_floor_with_algorithm(self):
        sched = adpsgd(1, 100, 10)
        algo = coopsgd.Algorithm(mixing.averaging(4), tau=sched)
        assert sum(algo.communicates(k) for k in range(100)) <= 10
        assert algo.communicates(99)

    def test_via_schedules(self):
        assert schedules.adpsgd is adpsgd and schedules.ADPSGD is ADPSGD
        assert schedules.AdaComm is AdaComm

    def test_partial_round_measurement(self):
        # Delta measured after tau - 1 = 3 of 4 steps: rate 1.5/3 = 0.5, target 0.5 * 4 = 2.
        sched = adpsgd(4, 10**6, 10**6)
        sched.tau_at(0)
        assert sched.observe(consensus=1.5, steps=3) == 4
        assert sched.target == pytest.approx(2.0)
        sched.tau_at(4)
        assert sched.observe(consensus=0.75, steps=3) == 8  # rate 0.25: floor(2 / 0.25) = 8

    def test_first_consensus_after_averaging_is_rejected(self):
        sched = adpsgd(4, 100, 50)
        sched.tau_at(0)
        with pytest.raises(ValueError, match="before the averaging"):
            sched.observe(consensus=0.0)

    def test_observe_needs_a_round(self):
        with pytest.raises(ValueError, match="before any round"):
            adpsgd(2, 10, 5).observe(consensus=1.0)


class TestConsensusDistance:
    def test_hand_value(self):
        params = {"a": np.array([[0.0, 0.0], [2.0, 0.0]]), "b": np.array([1.0, 3.0])}
        # a: mean (1, 0), squared distances 1 and 1 -> 1; b: mean 2, distances 1, 1 -> 1
        assert float(consensus_distance(params)) == pytest.approx(2.0)

    def test_drops_auxiliary_columns(self):
        x = np.array([[1.0], [3.0], [100.0]])
        assert float(consensus_distance(x, num_workers=2)) == pytest.approx(1.0)
        assert math.isclose(float(consensus_distance(x[:2])), 1.0)


def test_docstring_examples():
    import doctest

    from coopsgd import adaptive

    assert doctest.testmod(adaptive, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
