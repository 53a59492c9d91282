"""AdaComm (Wang & Joshi, arXiv:1810.08313) and ADPSGD (Jiang & Agrawal, arXiv:2007.06134) periods.

Both are immutable rules with an explicit state (``state = rule.init()``,
``tau = rule.tau(state, start, index)``, ``state = rule.observe(state, ...)``); the trainer keeps
that state in ``EngineState.period`` and a hook feeds it with ``trainer.observe``.
"""

import copy
import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopsgd
from coopsgd import mixing, schedules
from coopsgd.algorithms.adaptive import (
    ADPSGD,
    AdaComm,
    AdaCommState,
    ADPSGDState,
    adacomm,
    adacomm_period,
    adpsgd,
    consensus_distance,
)

M, D_IN, B = 4, 3, 4  # workers, model size, samples per worker per step (as in test_engine.py)
INIT = {"w": np.array([0.5, -0.25, 1.0], np.float32), "b": np.float32(0.1)}


def loss_fn(params, batch):
    """Least squares on one worker's batch: mean((x w + b − y)²)."""
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def make_batches(steps, m=M, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(steps, m, B, D_IN)).astype(np.float32),
            "y": rng.normal(size=(steps, m, B)).astype(np.float32)}


def trainer_for(rule):
    algo = coopsgd.Algorithm(mixing.averaging(M), tau=rule)
    return algo, coopsgd.CooperativeSGD(algo, optax.sgd(0.05), loss_fn, track_consensus=True)


def mixing_steps(metrics):
    """The 0-based steps that ended with a mixing, as the trainer ran them."""
    return [int(k) for k in np.flatnonzero(np.asarray(metrics.communicated))]


def round_ends(taus, horizon):
    """The last step of each round laid end to end from 0, up to the horizon."""
    ends, step = [], 0
    for tau in taus:
        step += tau
        if step > horizon:
            break
        ends.append(step - 1)
    return ends


def drive_adpsgd(rule, drift, horizon):
    """The loop the trainer runs, by hand: ask each round's τ, run it, observe Δ = drift(r, τ, step)."""
    state, step, r, taus = rule.init(), 0, 0, []
    while step < horizon:
        tau = rule.tau(state, step, r)
        taus.append(tau)
        state = rule.observe(state, consensus=drift(r, tau, step), start=step, index=r, tau=tau)
        step += tau
        r += 1
    return state, step, taus


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

    def test_same_function_via_top_level(self):
        # the adaptive rules moved out of coopsgd.schedules (core) into coopsgd.algorithms.adaptive;
        # the public re-export is now the package's top level
        assert coopsgd.adacomm_period is adacomm_period
        assert coopsgd.adacomm_period(10, 2.0, 0.5) == 5

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
            adacomm(tau0, interval)

    def test_updates_once_per_interval(self):
        sched = adacomm(16, 10.0)
        assert isinstance(sched, schedules.PeriodSchedule) and sched.constant_tau is None
        assert sched.adaptive
        s0 = sched.init()
        assert isinstance(s0, AdaCommState)
        assert sched.tau(s0, 0, 0) == 16
        s1 = sched.observe(s0, loss=4.0, time=3.0)  # loss0 = 4; no boundary yet
        assert sched.tau(s1, 16, 1) == 16
        s2 = sched.observe(s1, loss=1.0, time=10.5)  # boundary 10: ceil(sqrt(1/4) * 16)
        assert sched.tau(s2, 32, 2) == 8
        s3 = sched.observe(s2, loss=0.25, time=15.0)  # next boundary is 20
        assert sched.tau(s3, 40, 3) == 8
        s4 = sched.observe(s3, loss=0.25, time=31.0)  # ceil(sqrt(1/16) * 16); next is 40
        assert sched.tau(s4, 48, 4) == 4
        s5 = sched.observe(s4, loss=0.01, time=39.9)
        assert sched.tau(s5, 52, 5) == 4
        assert s5.next_update == 40.0
        assert s5.loss0 == 4.0 and s5.last_time == 39.9
        assert [h.tau for h in s5.history] == [8, 4]
        assert [(h.time, h.loss) for h in s5.history] == [(10.5, 1.0), (31.0, 0.25)]
        # earlier states are values: they keep the period they gave their rounds
        assert sched.tau(s0, 0, 0) == 16 and sched.tau(s1, 16, 1) == 16 and sched.tau(s2, 32, 2) == 8
        assert s0 == sched.init() and s0.history == ()

    def test_learning_rate_decay_lengthens_period(self):
        sched = adacomm(16, 10.0)
        state = sched.observe(sched.init(), loss=4.0, time=1.0, lr=0.1)
        state = sched.observe(state, loss=1.0, time=10.0, lr=0.1)
        assert sched.tau(state, 32, 2) == 8  # ceil(sqrt(1/4) 16)
        state = sched.observe(state, loss=1.0, time=20.0, lr=0.025)
        assert sched.tau(state, 40, 3) == 16  # ceil(sqrt(4/4) 16)
        assert state.lr0 == 0.1

    def test_learning_rate_schedule_by_step(self):
        sched = adacomm(16, 10.0, loss0=4.0, lr_schedule=lambda step: 0.1 if step < 100 else 0.025)
        state = sched.observe(sched.init(), loss=1.0, time=10.0, step=50)
        assert sched.tau(state, 50, 1) == 8
        state = sched.observe(state, loss=1.0, time=20.0, step=150)
        assert sched.tau(state, 150, 2) == 16
        assert state.lr0 == 0.1
        assert [h.lr for h in state.history] == [0.1, 0.025]

    def test_tau_max_caps(self):
        sched = adacomm(4, 1.0, loss0=1.0, tau_max=6)
        state = sched.observe(sched.init(), loss=9.0, time=1.0)
        assert sched.tau(state, 4, 1) == 6  # rule says 12

    def test_time_must_not_go_back(self):
        sched = adacomm(4, 1.0)
        state = sched.observe(sched.init(), loss=1.0, time=5.0)
        with pytest.raises(ValueError, match="decrease"):
            sched.observe(state, loss=1.0, time=4.0)

    def test_training_loop_protocol_with_algorithm(self):
        # A real run: the trainer asks the rule for each round's τ when the round begins, and a
        # hook observes after every round. The loss and time models are the hand ones: F = 0.97^k
        # after k steps, Y = 1 per step and D = 4 per averaging.
        sched = adacomm(8, 20.0)
        algo, trainer = trainer_for(sched)
        assert algo.tau is sched and algo.period is sched
        with pytest.raises(ValueError, match="run time"):
            algo.communicates(0)  # adaptive rounds are not known ahead

        seen = []

        def hook(end):
            assert end.mixed
            seen.append((end.start, end.step, end.round, end.state.period.tau))
            return end.trainer.observe(end.state, loss=0.97**end.step, time=end.step + 4.0 * (end.round + 1))

        steps = 200
        state, metrics = trainer.run(trainer.init(INIT), make_batches(steps), steps, hooks=[hook])

        # By hand: loss0 = 0.97^8 (first round). Boundaries 20, 40, 60, 80 are crossed at
        #   time 24 (step 16): ceil(sqrt(0.97^16 / 0.97^8) 8) = ceil(0.97^4 8)  = ceil(7.08) = 8
        #   time 48 (step 32): ceil(0.97^12 8) = ceil(5.55) = 6
        #   time 68 (step 44): ceil(0.97^18 8) = ceil(4.62) = 5
        #   time 86 (step 54): ceil(0.97^23 8) = ceil(3.97) = 4
        taus = [sec[3] for sec in seen]
        assert taus[:10] == [8, 8, 8, 8, 6, 6, 5, 5, 4, 4]
        assert [h.tau for h in state.period.rule.history][:4] == [8, 6, 5, 4]
        # the rest of the rule, laid out independently with the pure formula
        step, time, tau, loss0, boundary, expected = 0, 0.0, 8, None, 20.0, []
        while step < steps:
            expected.append(tau)
            step += tau
            time += tau + 4.0
            loss = 0.97**step
            loss0 = loss if loss0 is None else loss0
            if time >= boundary:
                tau = adacomm_period(8, loss0, loss)
                boundary = (math.floor(time / 20.0) + 1) * 20.0
        assert taus == expected and step == steps
        assert taus[0] == 8 and taus[-1] < taus[0]  # shrinks as the loss falls
        assert all(b <= a for a, b in zip(taus, taus[1:]))
        # the rounds the trainer ran are exactly those
        assert mixing_steps(metrics) == round_ends(expected, steps)
        assert [(s, e) for s, e, _, _ in seen] == [(e - t, e) for e, t in
                                                  zip(np.cumsum(expected).tolist(), expected)]
        assert int(state.rounds) == len(expected) and int(state.step) == steps


@pytest.fixture(scope="module")
def budget_run():
    """One ADPSGD rule and one trainer for several runs: the rule is immutable (each run's state
    lives in its EngineState), and the trainer's compiled rounds are reused."""
    sched = adpsgd(1, 100, 10)
    return sched, *trainer_for(sched)


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
        s = sched.init()
        assert isinstance(s, ADPSGDState)
        assert sched.tau(s, 0, 0) == 2
        s = sched.observe(s, consensus=4.0, start=0, index=0, tau=2)
        assert sched.tau(s, 2, 1) == 2  # target 4, rate 2: floor(4/2) = 2
        s = sched.observe(s, consensus=2.0, start=2, index=1, tau=2)
        assert sched.tau(s, 4, 2) == 4  # rate 1: floor(4/1) = 4 <= 2 * 2
        s = sched.observe(s, consensus=1.0, start=4, index=2, tau=4)
        assert sched.tau(s, 8, 3) == 8  # rate 1/4: floor(16) capped at 2 * 4 = 8
        s = sched.observe(s, consensus=2.0, start=8, index=3, tau=8)
        assert sched.tau(s, 16, 4) == 16  # rate 1/4: floor(16) = 16 <= 16
        s = sched.observe(s, consensus=64.0, start=16, index=4, tau=16)
        assert sched.tau(s, 32, 5) == 16  # rate 4 wants 1: never shrinks
        assert [h.rate for h in s.history] == [2.0, 1.0, 0.25, 0.25, 4.0]
        assert [(h.start, h.tau) for h in s.history] == [(0, 2), (2, 2), (4, 4), (8, 8), (16, 16)]
        assert s.target == 4.0 and s.averagings == 5

    def test_constant_rate_keeps_period(self):
        sched = adpsgd(3, 10**6, 10**6)
        state, start = sched.init(), 0
        for r in range(10):
            tau = sched.tau(state, start, r)
            assert tau == 3
            state = sched.observe(state, consensus=0.5 * tau, start=start, index=r, tau=tau)
            start += tau

    def test_period_grows_as_variance_falls(self):
        # Drift rate c(t) = 1 / (1 + t/50) per step: Delta = tau * c at the round's start.
        sched = ADPSGD(1, 10**6, 10**6, max_growth=1.5)
        _, _, taus = drive_adpsgd(sched, lambda r, tau, step: tau / (1.0 + step / 50.0), 2000)
        starts = np.cumsum([0] + taus[:-1]).tolist()
        rates = [1.0 / (1.0 + s / 50.0) for s in starts]
        assert all(b >= a for a, b in zip(taus, taus[1:]))
        assert taus[-1] >= 20 * taus[0]
        # the predicted disagreement tau * rate stays at the target (within one step's worth)
        assert all(t * r <= 1.0 + 1e-9 for t, r in zip(taus[1:], rates[:-1]))

    @pytest.mark.parametrize("tau0, total, budget", [(1, 200, 20), (3, 100, 7), (1, 1000, 1), (2, 50, 50)])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_budget_respected(self, tau0, total, budget, seed):
        rng = np.random.default_rng(seed)
        sched = adpsgd(tau0, total, budget, max_growth=3.0)
        state, step, taus = drive_adpsgd(sched, lambda r, tau, step: float(rng.exponential()) * tau, total)
        averagings = len(taus)
        assert averagings <= budget and state.averagings == averagings
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
        _, step, taus = drive_adpsgd(sched, lambda r, tau, step: float(tau), 1000)
        assert step == 1000 and len(taus) <= 100
        assert taus[:50] == [4] * 50  # average often early
        assert taus[-1] > 50
        assert all(b <= math.ceil(g * a) for a, b in zip(taus, taus[1:]))

    def test_front_load_limits_early_spending(self):
        # Same constant drift with the default pace limit f = 2: averagings are never spent more
        # than twice as fast as the uniform pace R / b, so the first period is ceil(1000 / 200) and
        # the last rounds stay far shorter than without the limit.
        sched = adpsgd(4, 1000, 100, max_growth=1.25)
        _, step, taus = drive_adpsgd(sched, lambda r, tau, step: float(tau), 1000)
        assert taus[0] == 5 and step == 1000 and len(taus) <= 100
        assert all(b >= a for a, b in zip(taus[:-1], taus[1:-1]))
        assert max(taus) <= 70  # 134 without the pace limit (previous test)

    @pytest.mark.parametrize("front_load", [0.5, 0.0, -1.0])
    def test_bad_front_load(self, front_load):
        with pytest.raises(ValueError, match="front_load"):
            adpsgd(2, 100, 10, front_load=front_load)

    # By hand for adpsgd(1, 100, 10) (g = 2, f = 2) under a constant drift (the rule keeps τ, so
    # the budget floor alone sets it): R = steps left, b = averagings left,
    # floor = max(ceil(R / (2^b - 1)), ceil(R / (2 b))):
    #   R=100 b=10: 5 | R=95 b=9: ceil(95/18) = 6 | R=89 b=8: ceil(89/16) = 6 | R=83 b=7: ceil(83/14) = 6
    #   R=77 b=6: ceil(77/12) = 7 | R=70 b=5: ceil(70/10) = 7 | R=63 b=4: ceil(63/8) = 8
    #   R=55 b=3: ceil(55/6) = 10 | R=45 b=2: max(ceil(45/3), ceil(45/4)) = 15 | R=30 b=1: 30
    FLOOR_ROUNDS = [5, 6, 6, 6, 7, 7, 8, 10, 15, 30]

    @pytest.mark.parametrize("observe", ["constant drift", "measured", "never"])
    def test_budget_floor_with_algorithm(self, observe, budget_run):
        # A real run: at most `budget` mixings in `total_steps`, the last one at the horizon.
        sched, algo, trainer = budget_run
        with pytest.raises(ValueError, match="run time"):
            algo.communicates(99)
        reports = []

        def hook(end):
            tau = end.state.period.tau
            if observe == "constant drift":
                report = dict(consensus=float(tau))  # Δ = τ: drift rate 1 per step
            else:  # Δ before the averaging: after the round's second-to-last step (τ ≥ 5 here)
                report = dict(consensus=float(np.asarray(end.metrics.consensus)[-2]), steps=tau - 1)
            reports.append((end.state.period.start, tau, report))
            return end.trainer.observe(end.state, **report)

        hooks = [] if observe == "never" else [hook]
        state, metrics = trainer.run(trainer.init(INIT), make_batches(100), 100, hooks=hooks)
        ends = mixing_steps(metrics)
        assert len(ends) <= 10 and ends[-1] == 99
        assert int(state.rounds) == len(ends) and int(state.step) == 100
        taus = np.diff([-1] + ends).tolist()
        if observe != "measured":
            assert taus == self.FLOOR_ROUNDS
        else:
            # the trainer ran the rounds the rule gives for what the hook measured
            s, step = sched.init(), 0
            for r, (start, tau, report) in enumerate(reports):
                assert (start, tau) == (step, sched.tau(s, step, r)) == (step, taus[r])
                s = sched.observe(s, start=start, index=r, tau=tau, **report)
                step += tau
            assert step == 100 and state.period.rule == s
            assert all(rep["consensus"] > 0 for _, _, rep in reports)
        if observe != "never":
            assert state.period.rule.averagings == len(ends)
            assert [h.tau for h in state.period.rule.history] == taus

    def test_via_top_level(self):
        assert coopsgd.adpsgd is adpsgd and coopsgd.ADPSGD is ADPSGD
        assert coopsgd.AdaComm is AdaComm and coopsgd.adacomm is adacomm

    def test_partial_round_measurement(self):
        # Delta measured after tau - 1 = 3 of 4 steps: rate 1.5/3 = 0.5, target 0.5 * 4 = 2.
        sched = adpsgd(4, 10**6, 10**6)
        s = sched.init()
        assert sched.tau(s, 0, 0) == 4
        s = sched.observe(s, consensus=1.5, steps=3, start=0, index=0, tau=4)
        assert sched.tau(s, 4, 1) == 4
        assert s.target == pytest.approx(2.0)
        s = sched.observe(s, consensus=0.75, steps=3, start=4, index=1, tau=4)
        assert sched.tau(s, 8, 2) == 8  # rate 0.25: floor(2 / 0.25) = 8

    def test_first_consensus_after_averaging_is_rejected(self):
        sched = adpsgd(4, 100, 50)
        s = sched.init()
        tau = sched.tau(s, 0, 0)
        with pytest.raises(ValueError, match="before the averaging"):
            sched.observe(s, consensus=0.0, start=0, index=0, tau=tau)

    def test_observe_needs_a_round(self):
        sched = adpsgd(2, 10, 5)
        with pytest.raises(ValueError, match="before any round"):
            sched.observe(sched.init(), consensus=1.0)


def _adacomm_rule():
    return adacomm(16, 10.0, lr_schedule=lambda step: 0.1 if step < 100 else 0.025)


def _adpsgd_rule():
    return adpsgd(2, 100, 10, max_growth=1.5)


def _observations(rule):
    """States after a few observed rounds (updates in the history, a floor-raised ADPSGD period)."""
    states = [rule.init()]
    if isinstance(rule, AdaComm):
        for loss, time, step in [(4.0, 3.0, 16), (1.0, 10.5, 32), (0.3, 31.0, 120), (0.2, 39.9, 130)]:
            states.append(rule.observe(states[-1], loss=loss, time=time, step=step))
        return states
    step = 0
    for r, delta in enumerate([4.0, 2.0, 1.0, 0.3, 7.0]):
        tau = rule.tau(states[-1], step, r)
        states.append(rule.observe(states[-1], consensus=delta, start=step, index=r, tau=tau))
        step += tau
    return states


def _next_report(rule, state):
    """What a loop would observe after the round that follows ``state``."""
    if isinstance(rule, AdaComm):
        return dict(loss=0.1, time=state.last_time + 12.0, step=200)
    start, index = sum(h.tau for h in state.history), len(state.history)
    return dict(consensus=1.5, start=start, index=index, tau=rule.tau(state, start, index))


RULES = pytest.mark.parametrize("make", [_adacomm_rule, _adpsgd_rule], ids=["AdaComm", "ADPSGD"])


def test_floor_raise_persists_without_observations():
    # adpsgd(3, 100, 7) with g = 1: the pace floor ceil(100 / (2·7)) = 8 and the feasibility floor
    # ceil(100 / 7) = 15 raise tau to 15 at round 0; the raise is recorded when the round begins,
    # so with nothing observed the rounds are 15 × 6, the last one cut to the horizon (10), and
    # rounds after the horizon keep 15.
    rule = adpsgd(3, 100, 7, max_growth=1.0)
    algo = coopsgd.Algorithm(mixing.averaging(2), tau=rule)
    trainer = coopsgd.CooperativeSGD(algo, optax.sgd(0.1), lambda p, b: jnp.sum((p["w"] - b) ** 2))
    state, metrics = trainer.run(trainer.init({"w": jnp.zeros(2)}), np.zeros((130, 2, 2), np.float32), 130)
    ends = np.flatnonzero(np.asarray(metrics.communicated)) + 1
    assert np.diff(np.concatenate([[0], ends])).tolist() == [15] * 6 + [10, 15, 15]
    assert state.period.rule.averagings == 7


class TestStateIsAValue:
    @RULES
    def test_json_round_trip(self, make):
        rule = make()
        states = _observations(rule)
        assert len(states[-1].history) >= 2
        for state in states:
            loaded = json.loads(json.dumps(state._asdict()))
            restored = rule.restore(loaded)
            assert restored == state and type(restored) is type(state)
            assert all(type(a) is type(b) for a, b in zip(restored.history, state.history))
            # and the restored state goes on exactly like the original
            start, index = sum(h.tau for h in state.history), len(state.history)
            assert rule.tau(restored, start, index) == rule.tau(state, start, index)
            report = _next_report(rule, state)
            assert rule.observe(restored, **report) == rule.observe(state, **report)

    def test_json_round_trip_without_learning_rate(self):
        rule = adacomm(4, 1.0)  # lr None in the history, lr0 None in the state
        state = rule.observe(rule.observe(rule.init(), loss=2.0, time=0.5), loss=1.0, time=2.0)
        assert state.lr0 is None and state.history[0].lr is None
        assert rule.restore(json.loads(json.dumps(state._asdict()))) == state

    @RULES
    def test_observe_does_not_mutate_the_rule(self, make):
        rule = make()
        before = copy.deepcopy(vars(rule))
        tau0 = rule.tau0
        states = _observations(rule)
        assert vars(rule) == before and rule.tau0 == tau0
        if isinstance(rule, AdaComm):
            assert rule.loss0 is None and rule.lr0 is None  # the observed F(x_0), η_0 live in the state
            assert states[-1].loss0 == 4.0 and states[-1].lr0 == 0.1
        else:
            assert rule.target is None  # the observed Δ* lives in the state
            assert states[-1].target == 4.0
        assert states[0] == rule.init() and rule.init() == make().init()
        # the same state observed twice gives equal results, and the state itself is unchanged
        for state in states:
            kept = copy.deepcopy(state)
            report = _next_report(rule, state)
            assert rule.observe(state, **report) == rule.observe(state, **report)
            assert state == kept
        # a fresh rule with the same configuration replays to the same states
        assert _observations(make()) == states
        assert vars(rule) == before


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

    from coopsgd.algorithms import adaptive

    assert doctest.testmod(adaptive, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
