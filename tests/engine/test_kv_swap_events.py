"""The swap copies' event bookkeeping (CUDA) checked on plain objects, on the CPU.

Every event a step issues must be waited for by the compute stream no later than the
start of the next step (before any forward can reuse a block), and nothing is kept
longer: checked over the plans of simulated runs, with prefetched swap-ins whose
requests are then aborted, recomputed or swapped out again.
"""

from __future__ import annotations

import itertools
import random

import pytest
from engine_helpers import swapping_simulation

from preemptserve.core.scheduler import BlockSwap, ScheduledRequest, SchedulerOutput
from preemptserve.engine.kv_swap import SwapEvents


class Streams:
    """Stands for the streams: which events the compute stream has waited for."""

    def __init__(self) -> None:
        self.issued: dict[int, int] = {}  # event -> step that issued it
        self.waited: dict[int, int] = {}  # event -> step whose execute waited for it
        self._ids = itertools.count()

    def event(self, step: int) -> int:
        event = next(self._ids)
        self.issued[event] = step
        return event

    def wait(self, events, step: int) -> None:
        for event in events:
            assert event not in self.waited, "an event waited for twice"
            self.waited[event] = step


def execute(events: SwapEvents, streams: Streams, output: SchedulerOutput, step: int,
            blocking_out: bool) -> set[int]:
    """``KVSwapper._execute_cuda``'s use of the book; returns the events it waited now."""
    before = set(streams.waited)
    streams.wait(events.take_deferred(), step)
    if output.swap_out:
        event = streams.event(step)
        if blocking_out:
            streams.wait([event], step)
        else:
            events.defer(event)
    swap_ins = {swap.request_id: streams.event(step) for swap in output.swap_in}
    streams.wait(events.due(swap_ins, (item.request_id for item in output.scheduled)), step)
    return set(streams.waited) - before


def test_a_prefetched_swap_in_of_an_aborted_request_is_waited_next_step():
    events, streams = SwapEvents(), Streams()
    prefetch = SchedulerOutput(
        1, (ScheduledRequest("b", (5,), 9, (3,), True),),
        swap_in=(BlockSwap("a", ((0, 7), (1, 8))),),
    )
    waited = execute(events, streams, prefetch, 1, blocking_out=False)
    assert waited == set() and events.num_deferred == 1  # "a" was not scheduled
    # "a" is aborted; its blocks 7 and 8 go to "c" in the next plan.
    reuse = SchedulerOutput(2, (ScheduledRequest("c", tuple(range(16)), 0, (7, 8), True),))
    waited = execute(events, streams, reuse, 2, blocking_out=False)
    assert waited == {0}, "the next forward must wait for the copy into blocks it reuses"
    assert events.num_deferred == 0


@pytest.mark.parametrize("policy", ["skip_join_mlfq", "apt"])  # the policies that swap
def test_no_event_outlives_the_next_step_on_simulated_plans(policy):
    sim = swapping_simulation(policy, seed=5)
    events, streams = SwapEvents(), Streams()
    rng = random.Random(0)
    schedule = sim.scheduler.schedule
    steps = itertools.count()
    max_deferred = 0

    def checked_schedule() -> SchedulerOutput:
        nonlocal max_deferred
        output = schedule()
        step = next(steps)
        execute(events, streams, output, step, blocking_out=rng.random() < 0.5)
        # Everything issued before this step has been waited for by now.
        late = [e for e, s in streams.issued.items() if s < step and e not in streams.waited]
        assert not late
        issued_now = sum(1 for s in streams.issued.values() if s == step)
        assert events.num_deferred <= issued_now
        max_deferred = max(max_deferred, events.num_deferred)
        return output

    sim.scheduler.schedule = checked_schedule
    sim.run()
    assert sim.scheduler.num_swap_ins > 0
    assert len(streams.waited) + events.num_deferred == len(streams.issued)
    assert max_deferred > 0  # some copies did overlap a forward
