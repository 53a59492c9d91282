"""Exact averaging: fully synchronous SGD, local SGD (periodic averaging), W = J_m, and hierarchical
averaging (group means at short periods, the global mean at the longest).

References:
    Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.1; Stich, "Local SGD converges fast and
    communicates little", ICLR 2019; Lin, Stich, Patel & Jaggi, "Don't use large mini-batches, use
    local SGD", ICLR 2020 (hierarchical local SGD); torch.distributed.algorithms.model_averaging.
    hierarchical_model_averager (``HierarchicalModelAverager``).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise

from coopsgd.core import schedules
from coopsgd.core.algorithm import Algorithm
from coopsgd.core.mixing import group_averaging
from coopsgd.core.operator import averaging
from coopsgd.core.validate import require_int

__all__ = ["MAX_HIERARCHY_CYCLE", "fully_sync", "hierarchical", "local_sgd"]

MAX_HIERARCHY_CYCLE = 1 << 16
"""Most rounds (longest period / shortest period) in one cycle of :func:`hierarchical`: the cycle's
rounds are held in memory, one reference each."""


def fully_sync(m: int) -> Algorithm:
    """Fully synchronous (mini-batch) SGD: τ = 1, W = J_m, v = 0, ζ = 0."""
    m = require_int("m", m, 1)
    return Algorithm(averaging(m), tau=1, name="fully_sync")


def local_sgd(m: int, tau) -> Algorithm:
    """Local SGD / periodic averaging (PASGD): τ local steps, then exact averaging W = J_m.

    References:
        Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.1; Stich, "Local SGD converges fast
        and communicates little", ICLR 2019.
    """
    m = require_int("m", m, 1)
    return Algorithm(averaging(m), tau=tau, name="local_sgd")


def _levels(levels) -> list[tuple[int, int]]:
    """``(period, group size)`` pairs from a mapping or a sequence of pairs, in the given order."""
    if isinstance(levels, Mapping):
        pairs = list(levels.items())
    else:
        try:
            pairs = [tuple(p) for p in levels]
        except TypeError:
            pairs = None
        if pairs is None or any(len(p) != 2 for p in pairs):
            raise ValueError("hierarchical levels must be {period: group_size} or (period, group_size) pairs, "
                             f"got {levels!r}")
    if not pairs:
        raise ValueError("hierarchical levels must not be empty: give {period: group_size}, the last group "
                         "size the number of workers, e.g. {2: 4, 8: 8}")
    return [(require_int("hierarchical period", p, 1), require_int("hierarchical group size", g, 1))
            for p, g in pairs]


def hierarchical(m: int, levels) -> Algorithm:
    """Hierarchical averaging: local steps, the workers' means within contiguous groups at short
    periods, and the mean of all m workers at the longest period.

    After the k-th local step (k = 1, 2, …) the workers average within the groups of the level
    whose period is the largest one dividing k — workers ``b·g … b·g + g − 1`` form group b for
    group size g — and keep their models when no period divides k: torch's
    ``HierarchicalModelAverager`` rule. As A(τ, W, v): τ is the shortest period and the mixing
    schedule cycles through ``periods[-1] / periods[0]`` rounds, round r (ending at step
    ``k = (r + 1)·τ``) using ``I_{m/g} ⊗ J_g`` of its level (``J_m`` at the last). The group
    rounds are planned as a grouped all-reduce (:mod:`coopsgd.parallel.plan`, kind ``groups``):
    ``2(g − 1)/g · S`` bytes per worker for a model of S bytes, against ``2(m − 1)/m · S`` for the
    global mean.

    Args:
        m: the number of workers.
        levels: ``{period: group_size}``, or a sequence of ``(period, group_size)`` pairs — torch's
            ``period_group_size_dict`` — in increasing order, e.g. ``{2: 4, 8: 8}``: groups of 4
            every 2 steps, all 8 workers every 8 steps.

    Returns:
        The :class:`~coopsgd.core.algorithm.Algorithm` (named ``"hierarchical"``).

    Raises:
        ValueError: naming the value, when the levels are empty (torch's rule), a period is not an
            integer ≥ 1 (torch: the minimum period is positive), the periods do not increase
            strictly (torch reads the dict in order and takes the *last listed* period that divides
            the step as the largest, so only increasing periods mean what they say), a period is
            not a multiple of the one before (not asked by torch: here it makes every round τ
            steps long, so rounds fuse into one compiled call), a group size does not divide m
            (torch's ``dist.new_subgroups`` rule), the group sizes do not increase strictly with
            each dividing the next (each group a union of the level below's, as torch's docstring
            describes the hierarchy), the last group size is not m (torch's rule: the top level
            averages everyone), or the cycle ``periods[-1] / periods[0]`` exceeds
            :data:`MAX_HIERARCHY_CYCLE` rounds.

    The step count differs from torch's by one: torch's averager counts its calls from 0 and
    averages when ``step % period == 0`` — after the 1st, (p + 1)-th, … optimizer step, its
    ``warmup_steps`` aside — while here, as in :func:`local_sgd`, the k-th step mixes when p
    divides k (after steps p, 2p, …). There is no warm-up phase.

    Example:
        >>> import coopsgd
        >>> algo = coopsgd.hierarchical(8, {2: 4, 8: 8})
        >>> algo.tau, len(algo.mixing.cycle)
        (2, 4)
        >>> weight = lambda k, i: float(algo.mixing_at(k - 1)[i, 0])  # of worker i at worker 0 after step k
        >>> tuple(weight(k, 4) for k in (2, 4, 6, 8))  # worker 4 is in the other group
        (0.0, 0.0, 0.0, 0.125)
        >>> tuple(weight(k, 3) for k in (1, 2, 8))  # worker 3 is in the group of worker 0
        (0.0, 0.25, 0.125)

    References:
        torch.distributed.algorithms.model_averaging.hierarchical_model_averager
        (``HierarchicalModelAverager``, after Wang, Wang, Chen & Ji, "Demystifying why local
        aggregation helps: convergence analysis of hierarchical SGD", arXiv:2010.12998); Lin,
        Stich, Patel & Jaggi, "Don't use large mini-batches, use local SGD", ICLR 2020
        (hierarchical local SGD: local steps, block-level averaging, then global averaging).
    """
    m = require_int("m", m, 1)
    pairs = _levels(levels)
    periods = [p for p, _ in pairs]
    sizes = [g for _, g in pairs]
    for a, b in pairwise(periods):
        if b <= a:
            raise ValueError(f"hierarchical periods must increase strictly (the largest period that divides "
                             f"the step picks the level), got {b} after {a} in periods {periods}")
        if b % a:
            raise ValueError(f"each hierarchical period must be a multiple of the one before (every round is "
                             f"then tau = {periods[0]} steps), got {b} after {a} in periods {periods}")
    for g in sizes:
        if m % g:
            raise ValueError(f"hierarchical group size {g} must divide m = {m} (contiguous groups of equal "
                             f"size), got group sizes {sizes}")
    for a, b in pairwise(sizes):
        if b <= a or b % a:
            raise ValueError(f"hierarchical group sizes must increase strictly, each dividing the next (every "
                             f"group a union of the level below's), got {b} after {a} in group sizes {sizes}")
    if sizes[-1] != m:
        raise ValueError(f"the last hierarchical level must average all m = {m} workers (its group size is m), "
                         f"got group size {sizes[-1]}")
    length = periods[-1] // periods[0]
    if length > MAX_HIERARCHY_CYCLE:
        raise ValueError(f"the longest hierarchical period over the shortest, {periods[-1]} / {periods[0]} = "
                         f"{length} rounds, must be at most {MAX_HIERARCHY_CYCLE} (one cycle of rounds is held "
                         "in memory)")
    matrices = [group_averaging(m, g) for g in sizes]
    cycle = []
    for r in range(length):
        k = (r + 1) * periods[0]
        level = max(i for i, p in enumerate(periods) if k % p == 0)
        cycle.append(matrices[level])
    description = "hierarchical {" + ", ".join(f"{p}: {g}" for p, g in pairs) + "}"
    return Algorithm(schedules.cyclic(cycle, description=description), tau=periods[0], name="hierarchical")
