"""Auto-scaling decisions (core/scaling.py) on hand-made load reports: the cluster
freeness from sums, the paper's [10, 60] band, hysteresis over the whole interval, how
many instances to add, which one to drain, and the min / max bounds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preemptserve.core.scaling import ScaleDecision, ScalingPolicy, cluster_freeness
from preemptserve.core.scheduler.load import InstanceLoad


def load(used: int, running: int, waiting: int = 0, waiting_blocks: int = 0, *,
         num_blocks: int = 100, draining: bool = False, headroom: int = 0,
         high: int = 0) -> InstanceLoad:
    return InstanceLoad(num_blocks=num_blocks, num_used_blocks=used, num_running=running,
                        num_waiting=waiting, head_of_line_blocks=min(waiting_blocks, 10),
                        waiting_blocks=waiting_blocks, draining=draining,
                        priority_headroom_blocks=headroom, num_high_running=high)


def policy(min_instances: int = 1, max_instances: int = 8, interval_s: float = 10.0,
           up: float = 10.0, down: float = 60.0) -> ScalingPolicy:
    return ScalingPolicy(min_instances, max_instances, up, down, interval_s)


BUSY = {0: load(95, 10), 1: load(90, 10)}  # F = (5 + 10) / 20 = 0.75 < 10
IDLE = {0: load(10, 1), 1: load(0, 0), 2: load(5, 1)}  # F without one: far above 60
MIDDLE = {0: load(40, 2), 1: load(40, 2)}  # F = 30; without one: (60 - 100) / 4 < 60


def test_cluster_freeness_sums_blocks_demand_and_requests() -> None:
    loads = {0: load(60, 4, 2, 30), 1: load(20, 2)}
    assert cluster_freeness(loads) == ((40 + 80) - 30) / (4 + 2 + 2)
    # An added empty instance brings capacity only; one taken out keeps its requests
    # and its blocks in use (they land elsewhere).
    assert cluster_freeness(loads, extra_blocks=100) == (220 - 30) / 8
    assert cluster_freeness(loads, without=1) == (40 - 20 - 30) / 8
    draining = {0: load(60, 4, 2, 30), 1: load(20, 2, draining=True)}
    assert cluster_freeness(draining) == cluster_freeness(loads, without=1)
    assert cluster_freeness({0: load(0, 0)}) == math.inf
    # Physical blocks: the high-priority headroom is not demand.
    with_headroom = {0: load(60, 4, 2, 30, headroom=50, high=1), 1: load(20, 2)}
    assert cluster_freeness(with_headroom) == cluster_freeness(loads)


def test_scale_up_only_after_the_condition_held_for_the_whole_interval() -> None:
    p = policy()
    assert p.decide(BUSY, 0.0).is_nothing
    assert p.decide(BUSY, 9.9).is_nothing
    decision = p.decide(BUSY, 10.0)
    assert decision.add >= 1 and decision.drain is None
    assert decision.freeness == cluster_freeness(BUSY)
    # The clock restarts at a decision.
    assert p.decide(BUSY, 19.9).is_nothing
    assert p.decide(BUSY, 20.0).add >= 1


def test_an_interruption_restarts_the_interval() -> None:
    p = policy()
    assert p.decide(BUSY, 0.0).is_nothing
    assert p.decide(MIDDLE, 5.0).is_nothing  # inside the band: nothing, and the clock resets
    assert p.decide(BUSY, 6.0).is_nothing
    assert p.decide(BUSY, 15.9).is_nothing
    assert p.decide(BUSY, 16.0).add >= 1


def test_scale_up_adds_the_fewest_instances_that_lift_freeness_to_the_threshold() -> None:
    p = policy(max_instances=10, interval_s=0.0)
    loads = {0: load(100, 10, 10, 100), 1: load(100, 10, 10, 100)}  # F = -200 / 40 = -5
    decision = p.decide(loads, 0.0)
    # k empty instances of 100 blocks: (100 k - 200) / 40 >= 10  <=>  k >= 6
    assert decision == ScaleDecision(add=6, freeness=-5.0)
    assert cluster_freeness(loads, extra_blocks=600) >= 10 > cluster_freeness(
        loads, extra_blocks=500)


def test_never_beyond_max_instances() -> None:
    p = policy(max_instances=4, interval_s=0.0)
    loads = {0: load(100, 10, 10, 100), 1: load(100, 10, 10, 100)}
    assert p.decide(loads, 0.0).add == 2  # 6 would be needed
    assert p.decide(loads, 1.0, num_starting=2).is_nothing  # at max with those starting
    full = {i: load(100, 10, 10, 100) for i in range(4)}
    assert p.decide(full, 2.0).is_nothing


def test_instances_starting_count_as_capacity() -> None:
    p = policy(max_instances=10, interval_s=0.0)
    loads = {0: load(100, 10, 10, 100), 1: load(100, 10, 10, 100)}
    assert p.decide(loads, 0.0, num_starting=6).is_nothing
    assert p.decide(loads, 1.0, num_starting=4).add == 2


def test_scale_down_drains_the_emptiest_instance_after_the_interval() -> None:
    p = policy()
    assert p.decide(IDLE, 0.0).is_nothing
    assert p.decide(IDLE, 9.0).is_nothing
    assert p.decide(IDLE, 10.0) == ScaleDecision(drain=1, freeness=cluster_freeness(IDLE))
    # Ties go to the highest id (Llumnix drains the last instance).
    tied = {0: load(10, 1, num_blocks=1000), 1: load(20, 2, num_blocks=1000),
            2: load(5, 1, num_blocks=1000)}
    assert policy(interval_s=0.0).decide(tied, 0.0).drain == 2


def test_no_scale_down_inside_the_band() -> None:
    p = policy(interval_s=0.0)
    assert cluster_freeness(MIDDLE) == 30.0
    assert p.decide(MIDDLE, 0.0).is_nothing
    assert p.decide(MIDDLE, 100.0).is_nothing


def test_never_below_min_instances_and_draining_ones_do_not_count() -> None:
    p = policy(min_instances=2, interval_s=0.0)
    two = {0: load(0, 0), 1: load(0, 0)}
    assert p.decide(two, 0.0).is_nothing
    draining = {0: load(0, 0), 1: load(0, 0), 2: load(10, 1, draining=True)}
    assert p.decide(draining, 1.0).is_nothing  # 2 active: the draining one is gone
    # Below min (an instance died): added at once, no interval.
    slow = policy(min_instances=2, interval_s=10.0)
    assert slow.decide({0: load(0, 0)}, 0.0) == ScaleDecision(add=1)
    assert slow.decide({0: load(0, 0)}, 0.0, num_starting=1).is_nothing


def test_an_idle_cluster_shrinks_to_min_one_instance_per_interval() -> None:
    p = policy(min_instances=1, interval_s=10.0)
    loads = {i: load(0, 0) for i in range(4)}
    drained = []
    now = 0.0
    while now < 100.0:
        decision = p.decide(loads, now)
        if decision.drain is not None:
            drained.append((now, decision.drain))
            loads[decision.drain] = load(0, 0, draining=True)
        now += 1.0
    assert drained == [(10.0, 3), (20.0, 2), (30.0, 1)]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_instances"):
        ScalingPolicy(0, 4)
    with pytest.raises(ValueError, match="max_instances"):
        ScalingPolicy(4, 2)
    with pytest.raises(ValueError, match="must exceed"):
        ScalingPolicy(1, 4, scale_up_threshold=-10, scale_down_threshold=-60)  # Llumnix code
    with pytest.raises(ValueError, match="finite"):
        ScalingPolicy(1, 4, scale_up_threshold=-math.inf)
    with pytest.raises(ValueError, match="interval_s"):
        ScalingPolicy(1, 4, interval_s=-1)
    with pytest.raises(ValueError, match="num_starting"):
        ScalingPolicy(1, 4).decide({}, 0.0, num_starting=-1)


@st.composite
def cluster(draw: st.DrawFn) -> dict[int, InstanceLoad]:
    loads = {}
    for i in range(draw(st.integers(1, 8))):
        running = draw(st.integers(0, 12))
        waiting = draw(st.integers(0, 6))
        loads[i] = load(draw(st.integers(0, 120)), running, waiting,
                        draw(st.integers(0, 30)) * waiting,
                        draining=draw(st.booleans()) and i > 0)
    return loads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cluster(), st.integers(0, 2)), min_size=1, max_size=12),
       st.integers(1, 4), st.integers(0, 6))
def test_decisions_stay_within_bounds(history, min_instances, extra) -> None:
    max_instances = min_instances + extra
    p = policy(min_instances=min_instances, max_instances=max_instances, interval_s=2.0)
    for now, (loads, starting) in enumerate(history):
        active = sum(not x.draining for x in loads.values()) + starting
        decision = p.decide(loads, float(now), num_starting=starting)
        assert decision.add == 0 or decision.drain is None
        if decision.add:
            if active >= min_instances:
                assert active + decision.add <= max_instances
                assert cluster_freeness(loads) < p.scale_up_threshold
            else:
                assert active + decision.add == min_instances
        if decision.drain is not None:
            assert active - 1 >= min_instances
            assert not loads[decision.drain].draining
            assert cluster_freeness(loads, without=decision.drain,
                                    extra_blocks=100 * starting) > p.scale_down_threshold
