"""The global scheduler's policies: dispatch, migration pairing, request choice."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preemptserve.core.global_scheduler import (
    DISPATCH_POLICIES,
    Dispatcher,
    MigrationCandidate,
    NoInstanceError,
    choose_request,
    drain_pairs,
    pair_migrations,
)
from preemptserve.core.scheduler.load import InstanceLoad


def load(used: int, running: int, waiting: int = 0, hol: int = 0, waiting_blocks: int = 0,
         num_blocks: int = 100) -> InstanceLoad:
    return InstanceLoad(num_blocks=num_blocks, num_used_blocks=used, num_running=running,
                        num_waiting=waiting, head_of_line_blocks=hol,
                        waiting_blocks=waiting_blocks)


@st.composite
def loads(draw: st.DrawFn) -> InstanceLoad:
    num_blocks = draw(st.integers(1, 200))
    num_waiting = draw(st.integers(0, 10))
    hol = draw(st.integers(1, 60)) if num_waiting else 0
    rest = draw(st.integers(0, 60 * (num_waiting - 1))) if num_waiting > 1 else 0
    return InstanceLoad(
        num_blocks=num_blocks,
        num_used_blocks=draw(st.integers(0, 2 * num_blocks)),  # host-tier KV counts too
        num_running=draw(st.integers(0, 20)),
        num_waiting=num_waiting,
        head_of_line_blocks=hol,
        waiting_blocks=hol + rest,
    )


# ---------------------------------------------------------------------------- dispatch


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin.*balanced.*load"):
        Dispatcher("rr", 2)
    with pytest.raises(ValueError, match="at least 1"):
        Dispatcher("load", 0)


def test_no_alive_instance_raises() -> None:
    dispatcher = Dispatcher("load", 2)
    dispatcher.set_alive(0, False)
    dispatcher.set_alive(1, False)
    with pytest.raises(NoInstanceError):
        dispatcher.choose(1)
    assert issubclass(NoInstanceError, RuntimeError)
    dispatcher.set_alive(1, True)
    assert dispatcher.choose(1) == 1


def test_unknown_instance_is_rejected() -> None:
    dispatcher = Dispatcher("load", 2)
    with pytest.raises(ValueError, match="no instance 2"):
        dispatcher.update(2, load(0, 0))
    with pytest.raises(ValueError, match="no instance -1"):
        dispatcher.set_alive(-1, False)


def test_round_robin_cycles_over_alive_instances() -> None:
    dispatcher = Dispatcher("round_robin", 3)
    assert [dispatcher.choose(1) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    dispatcher.set_alive(2, False)
    assert [dispatcher.choose(1) for _ in range(4)] == [1, 0, 1, 0]
    dispatcher.set_alive(2, True)
    dispatcher.set_alive(0, False)
    assert [dispatcher.choose(1) for _ in range(4)] == [1, 2, 1, 2]


@given(st.integers(1, 8), st.lists(st.booleans(), min_size=8, max_size=8), st.integers(1, 5))
def test_round_robin_spreads_evenly(num_instances: int, alive: list[bool], rounds: int) -> None:
    dispatcher = Dispatcher("round_robin", num_instances)
    alive = alive[:num_instances]
    if not any(alive):
        alive[0] = True
    for i, is_alive in enumerate(alive):
        dispatcher.set_alive(i, is_alive)
    live = [i for i, is_alive in enumerate(alive) if is_alive]
    counts = Counter(dispatcher.choose(1) for _ in range(rounds * len(live)))
    assert counts == {i: rounds for i in live}


def test_load_picks_the_highest_dispatch_freeness() -> None:
    dispatcher = Dispatcher("load", 3)
    dispatcher.update(0, load(used=50, running=5))  # F = 50 / 5 = 10
    dispatcher.update(1, load(used=20, running=4, waiting=2, hol=10, waiting_blocks=20))
    dispatcher.update(2, load(used=80, running=1))  # F = 20
    # Instance 1: (80 - 20) / 6 = 10 < 20, although it uses the fewest blocks.
    assert dispatcher.choose(1) == 2


def test_balanced_is_blind_to_the_queue() -> None:
    dispatcher = Dispatcher("balanced", 3)
    dispatcher.update(0, load(used=50, running=5))
    dispatcher.update(1, load(used=40, running=2, waiting=9, hol=10, waiting_blocks=90))
    dispatcher.update(2, load(used=40, running=3))
    # 1 and 2 use 40 % of their blocks; 2 holds fewer requests (3 < 11).
    assert dispatcher.choose(1) == 2
    dispatcher.update(2, load(used=40, running=20))
    assert dispatcher.choose(1) == 1  # now holds 12 requests, counting the one just sent
    dispatcher.update(2, load(used=40, running=12))  # same share, same requests: lowest id
    assert dispatcher.choose(1) == 1
    assert dispatcher.choose(1) == 2


@pytest.mark.parametrize("policy", ["balanced", "load"])
def test_an_instance_without_report_counts_as_empty(policy: str) -> None:
    dispatcher = Dispatcher(policy, 3)
    dispatcher.update(0, load(used=1, running=1))
    dispatcher.update(2, load(used=1, running=1))
    assert dispatcher.choose(1) == 1
    assert dispatcher.load(1) is None


@pytest.mark.parametrize("policy", DISPATCH_POLICIES)
def test_a_burst_before_any_report_spreads(policy: str) -> None:
    dispatcher = Dispatcher(policy, 4)
    assert Counter(dispatcher.choose(3) for _ in range(8)) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_a_dispatched_request_waits_on_its_instance_until_the_next_report() -> None:
    dispatcher = Dispatcher("load", 1)
    dispatcher.update(0, load(used=10, running=2))
    dispatcher.choose(4)
    assert dispatcher.load(0) == load(used=10, running=2, waiting=1, hol=4, waiting_blocks=4)
    dispatcher.choose(6)  # the head of the line stays the first one
    assert dispatcher.load(0) == load(used=10, running=2, waiting=2, hol=4, waiting_blocks=10)
    dispatcher.update(0, load(used=20, running=4))
    assert dispatcher.load(0) == load(used=20, running=4)


def test_accounting_spreads_a_burst_across_equally_loaded_instances_under_load() -> None:
    dispatcher = Dispatcher("load", 4)
    for i in range(4):
        dispatcher.update(i, load(used=40, running=4, waiting=1, hol=5, waiting_blocks=5))
    chosen = [dispatcher.choose(5) for _ in range(8)]
    assert chosen == [0, 1, 2, 3, 0, 1, 2, 3]
    # Without accounting (a report in between), the lowest id would take them all.
    dispatcher.update(0, load(used=40, running=4, waiting=1, hol=5, waiting_blocks=5))
    assert dispatcher.choose(5) == 0


def test_accounting_spreads_a_burst_under_balanced_by_request_count() -> None:
    dispatcher = Dispatcher("balanced", 3)
    for i in range(3):
        dispatcher.update(i, load(used=30, running=3))
    assert [dispatcher.choose(2) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


@settings(max_examples=200)
@given(
    st.sampled_from(DISPATCH_POLICIES),
    st.integers(1, 6),
    st.lists(
        st.one_of(
            st.tuples(st.just("update"), st.integers(0, 5), st.one_of(st.none(), loads())),
            st.tuples(st.just("alive"), st.integers(0, 5), st.booleans()),
            st.tuples(st.just("choose"), st.integers(0, 30)),
        ),
        max_size=40,
    ),
)
def test_dispatch_never_picks_a_dead_instance(policy: str, num_instances: int,
                                              ops: list[tuple]) -> None:
    dispatcher = Dispatcher(policy, num_instances)
    alive = [True] * num_instances
    for op in ops:
        if op[0] == "update" and op[1] < num_instances:
            dispatcher.update(op[1], op[2])
        elif op[0] == "alive" and op[1] < num_instances:
            dispatcher.set_alive(op[1], op[2])
            alive[op[1]] = op[2]
        elif op[0] == "choose":
            if not any(alive):
                with pytest.raises(NoInstanceError):
                    dispatcher.choose(op[1])
            else:
                assert alive[dispatcher.choose(op[1])]


@pytest.mark.parametrize("policy", DISPATCH_POLICIES)
def test_an_added_instance_grows_the_numbers_and_takes_requests_once_alive(policy) -> None:
    dispatcher = Dispatcher(policy, 1)
    dispatcher.update(0, load(used=80, running=8))
    assert dispatcher.add_instance(alive=False) == 1 and dispatcher.num_instances == 2
    assert dispatcher.load(1) is None
    assert [dispatcher.choose(1) for _ in range(3)] == [0, 0, 0]  # starting: not yet
    dispatcher.set_alive(1, True)
    dispatcher.update(1, load(used=0, running=0))
    assert dispatcher.choose(1) == 1
    dispatcher.set_draining(1, True)
    assert dispatcher.choose(1) == 0
    assert dispatcher.add_instance() == 2  # alive at once, empty: the freest (and next)
    assert dispatcher.choose(1) == 2
    with pytest.raises(ValueError, match="0..2"):
        dispatcher.update(3, None)


@settings(max_examples=200)
@given(
    st.sampled_from(DISPATCH_POLICIES),
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.booleans()),
            st.tuples(st.just("update"), st.integers(0, 7), st.one_of(st.none(), loads())),
            st.tuples(st.just("alive"), st.integers(0, 7), st.booleans()),
            st.tuples(st.just("draining"), st.integers(0, 7), st.booleans()),
            st.tuples(st.just("choose"), st.integers(0, 30)),
        ),
        max_size=40,
    ),
)
def test_a_growing_dispatcher_picks_only_alive_instances_not_draining(
        policy: str, ops: list[tuple]) -> None:
    dispatcher = Dispatcher(policy, 1)
    takes = [True]
    alive, draining = [True], [False]
    for op in ops:
        n = dispatcher.num_instances
        if op[0] == "add":
            assert dispatcher.add_instance(op[1]) == n
            alive.append(op[1])
            draining.append(False)
        elif op[0] == "update" and op[1] < n:
            dispatcher.update(op[1], op[2])
        elif op[0] == "alive" and op[1] < n:
            dispatcher.set_alive(op[1], op[2])
            alive[op[1]] = op[2]
        elif op[0] == "draining" and op[1] < n:
            dispatcher.set_draining(op[1], op[2])
            draining[op[1]] = op[2]
        elif op[0] == "choose":
            takes = [a and not d for a, d in zip(alive, draining, strict=True)]
            if not any(takes):
                with pytest.raises(NoInstanceError):
                    dispatcher.choose(op[1])
            else:
                assert takes[dispatcher.choose(op[1])]


def dispatch_rank(report: InstanceLoad) -> float:
    """``load``'s rank: the dispatch freeness while the queue fits, else the deficit."""
    surplus = report.available_blocks - report.waiting_blocks
    empty = not (report.num_running or report.num_waiting)
    return report.dispatch_freeness if surplus >= 0 or empty else float(surplus)


@given(st.lists(loads(), min_size=1, max_size=8), st.integers(0, 30))
def test_load_policy_picks_the_max_freeness_lowest_id_on_ties(
    reports: list[InstanceLoad], prompt_blocks: int
) -> None:
    dispatcher = Dispatcher("load", len(reports))
    for i, report in enumerate(reports):
        dispatcher.update(i, report)
    chosen = dispatcher.choose(prompt_blocks)
    best = max(dispatch_rank(r) for r in reports)
    assert dispatch_rank(reports[chosen]) == best
    assert chosen == min(i for i, r in enumerate(reports) if dispatch_rank(r) == best)
    if best >= 0:  # some instance has room for its queue: Llumnix's choice exactly
        llumnix = Dispatcher("load_llumnix", len(reports))
        for i, report in enumerate(reports):
            llumnix.update(i, report)
        assert llumnix.choose(prompt_blocks) == chosen


@given(loads(), st.lists(st.integers(0, 30), min_size=1, max_size=10))
def test_a_dispatched_request_never_makes_its_instance_look_freer(
    report: InstanceLoad, prompt_blocks: list[int]
) -> None:
    dispatcher = Dispatcher("load", 1)
    dispatcher.update(0, report)
    ranks = [dispatcher._load_key(0)[0]]
    for blocks in prompt_blocks:
        dispatcher.choose(blocks)
        ranks.append(dispatcher._load_key(0)[0])
    assert ranks == sorted(ranks)  # the key (minus the rank) never goes down


def test_overloaded_instances_share_a_burst_by_their_deficits() -> None:
    # Both short of blocks for their queues: F = (20 - 60) / 10 = -4 and (10 - 90) / 20
    # = -4; deficits 40 and 80 blocks.
    reports = [load(used=80, running=8, waiting=2, hol=30, waiting_blocks=60),
               load(used=90, running=10, waiting=10, hol=9, waiting_blocks=90)]
    dispatcher = Dispatcher("load", 2)
    for i, report in enumerate(reports):
        dispatcher.update(i, report)
    chosen = [dispatcher.choose(10) for _ in range(8)]
    # 0 takes requests until its deficit reaches 1's (4 of 10 blocks), then they alternate
    assert chosen == [0, 0, 0, 0, 1, 0, 1, 0]


def test_llumnix_freeness_sends_a_whole_tick_to_the_least_overloaded_instance() -> None:
    # F = -1 and -3: instance 0's F falls towards -2 with each 2-block request but never
    # to -3, so load_llumnix sends it the whole tick; load evens the deficits (10 and 30
    # blocks) and then alternates.
    reports = [load(used=90, running=9, waiting=1, hol=20, waiting_blocks=20),
               load(used=90, running=5, waiting=5, hol=8, waiting_blocks=40)]
    llumnix, ours = Dispatcher("load_llumnix", 2), Dispatcher("load", 2)
    for dispatcher in (llumnix, ours):
        for i, report in enumerate(reports):
            dispatcher.update(i, report)
    assert [llumnix.choose(2) for _ in range(20)] == [0] * 20
    assert [ours.choose(2) for _ in range(20)] == [0] * 10 + [1, 0] * 5


# --------------------------------------------------------------------- migration pairing


def test_pairs_the_most_loaded_source_with_the_freest_destination() -> None:
    reports = {
        0: load(used=98, running=2),  # F = 1: neither source nor... a destination
        1: load(used=100, running=2, waiting=1, hol=10, waiting_blocks=10),  # -10 / 3
        2: load(used=100, running=1, waiting=1, hol=20, waiting_blocks=20),  # -20 / 2
        3: load(used=10, running=3),  # F = 30
        4: load(used=0, running=0),  # empty: infinitely free
        5: load(used=60, running=2),  # F = 20
    }
    assert reports[1].migration_freeness == pytest.approx(-10 / 3)
    assert reports[2].migration_freeness == -10
    assert reports[4].migration_freeness == math.inf
    assert pair_migrations(reports) == [(2, 4), (1, 3)]
    assert pair_migrations(reports, busy={4}) == [(2, 3), (1, 5)]
    assert pair_migrations(reports, busy={2, 3}) == [(1, 4)]
    assert pair_migrations(reports, threshold=5.0) == [(2, 4)]


def test_moves_go_into_a_queued_instance_only_when_asked() -> None:
    # 0 is out of memory (a request preempted); 1 has room by freeness (F = -2 >= -3) but
    # a request waiting; 2 has less room and no queue.
    killed = dataclasses.replace(load(used=100, running=4, waiting=1, hol=20,
                                      waiting_blocks=20), num_memory_preempted=1)  # F = -4
    queued = load(used=96, running=2, waiting=1, hol=10, waiting_blocks=10)  # (4-10)/3
    idle_queue = load(used=90, running=5)  # F = 2
    reports = {0: killed, 1: queued, 2: idle_queue}
    assert queued.migration_freeness == -2
    assert pair_migrations(reports) == [(0, 2)]  # into_waiting: True, Llumnix's
    assert pair_migrations({0: killed, 1: queued}) == [(0, 1)]
    assert pair_migrations({0: killed, 1: queued}, into_waiting=False) == []
    assert pair_migrations(reports, into_waiting=False) == [(0, 2)]


def test_the_threshold_itself_is_not_overloaded() -> None:
    reports = {0: load(used=100, running=1, waiting=1, hol=6, waiting_blocks=6),  # F = -3
               1: load(used=0, running=0)}
    assert reports[0].migration_freeness == -3
    assert pair_migrations(reports) == []
    assert pair_migrations(reports, threshold=2.9) == [(0, 1)]


def test_a_source_needs_a_running_request() -> None:
    # Only a huge head-of-line request waits: nothing started to move, nowhere to go.
    reports = {0: load(used=0, running=0, waiting=1, hol=500, waiting_blocks=500),
               1: load(used=0, running=0)}
    assert reports[0].migration_freeness < -3
    assert pair_migrations(reports) == []


def test_no_destination_no_pair() -> None:
    reports = {0: load(used=100, running=1, waiting=1, hol=20, waiting_blocks=20),
               1: load(used=100, running=1, waiting=1, hol=8, waiting_blocks=8)}
    assert pair_migrations(reports) == []


@settings(max_examples=300)
@given(
    st.dictionaries(st.integers(0, 15), loads(), max_size=16),
    st.floats(-5, 20),
    st.sets(st.integers(0, 15), max_size=6),
)
def test_pairing_invariants(reports: dict[int, InstanceLoad], threshold: float,
                            busy: set[int]) -> None:
    pairs = pair_migrations(reports, threshold, busy)
    instances = [i for pair in pairs for i in pair]
    assert len(instances) == len(set(instances))  # each instance in at most one pair
    for src, dst in pairs:
        assert src != dst and src not in busy and dst not in busy
        assert src in reports and dst in reports
        assert reports[src].migration_freeness < -threshold
        assert reports[src].num_running >= 1
        assert reports[dst].migration_freeness >= -threshold
        assert reports[dst].migration_freeness > reports[src].migration_freeness
    free = [i for i, r in reports.items() if i not in busy]
    num_sources = sum(1 for i in free if reports[i].migration_freeness < -threshold
                      and reports[i].num_running)
    num_destinations = sum(1 for i in free if reports[i].migration_freeness >= -threshold)
    assert len(pairs) == min(num_sources, num_destinations)
    # The most loaded source goes first, to the freest destination.
    if pairs:
        src, dst = pairs[0]
        assert reports[src].migration_freeness == min(
            reports[i].migration_freeness for i in free if reports[i].num_running)
        assert reports[dst].migration_freeness == max(reports[i].migration_freeness
                                                      for i in free)


def test_drain_picks_the_freest_other_instance() -> None:
    reports = {0: load(used=90, running=3), 1: load(used=50, running=2),
               2: load(used=20, running=4), 3: load(used=60, running=2)}  # F: 3.3, 25, 20, 20
    assert drain_pairs(0, reports, busy=()) == 1
    assert drain_pairs(1, reports, busy=()) == 2  # 2 and 3 tie: lowest id
    assert drain_pairs(0, reports, busy={1, 2}) == 3
    assert drain_pairs(0, reports, busy={0}) is None  # its one migration slot is taken
    assert drain_pairs(0, {0: reports[0]}, busy=()) is None
    # However loaded the destination: the draining instance must empty.
    overloaded = {0: reports[0], 1: load(used=100, running=1, waiting=1, hol=50,
                                         waiting_blocks=50)}
    assert drain_pairs(0, overloaded, busy=()) == 1


# ---------------------------------------------------------------------- request choice


CANDIDATES = [
    MigrationCandidate("b", num_tokens=40, num_blocks=3, on_host=False, age_s=5.0),
    MigrationCandidate("a", num_tokens=40, num_blocks=3, on_host=True, age_s=1.0),
    MigrationCandidate("c", num_tokens=900, num_blocks=57, on_host=False, age_s=9.0),
    MigrationCandidate("d", num_tokens=100, num_blocks=7, on_host=False, age_s=1.0),
    MigrationCandidate("e", num_tokens=900, num_blocks=57, on_host=True, age_s=0.5),
]


@pytest.mark.parametrize(("policy", "expected"), [("SR", "a"), ("LR", "c"), ("LCR", "e")])
def test_choose_request(policy: str, expected: str) -> None:
    chosen = choose_request(CANDIDATES, policy)
    assert chosen is not None and chosen.request_id == expected
    assert choose_request(reversed(CANDIDATES), policy) == chosen  # order does not matter


def test_choose_request_defaults_to_shortest_and_ignores_the_tier() -> None:
    host = MigrationCandidate("h", num_tokens=50, num_blocks=4, on_host=True, age_s=2.0)
    device = MigrationCandidate("z", num_tokens=49, num_blocks=4, on_host=False, age_s=2.0)
    assert choose_request([host, device]) == device


def test_choose_request_ties_by_id_for_lcr() -> None:
    chosen = choose_request([CANDIDATES[3], CANDIDATES[1]], "LCR")  # both 1.0 s old
    assert chosen is not None and chosen.request_id == "a"


def test_choose_request_without_candidates_or_with_a_bad_policy() -> None:
    assert choose_request([], "LR") is None
    assert choose_request([], "FCW") is None
    with pytest.raises(ValueError, match="SR.*LR.*LCR.*FCW"):
        choose_request([], "FIFO")


WAITING = [
    MigrationCandidate("w2", num_tokens=300, num_blocks=0, on_host=False, age_s=2.0,
                       waiting=True),
    MigrationCandidate("w1", num_tokens=900, num_blocks=0, on_host=False, age_s=3.0,
                       waiting=True),
    MigrationCandidate("wh", num_tokens=10, num_blocks=0, on_host=False, age_s=9.0,
                       priority="high", waiting=True),
]


def test_waiting_requests_move_only_by_the_first_waiting_policies() -> None:
    everything = CANDIDATES + WAITING
    for policy, expected in (("SR", "a"), ("LR", "c"), ("LCR", "e")):
        chosen = choose_request(everything, policy)
        assert chosen is not None and chosen.request_id == expected
    # FCW: the first come of the waiting ones, normal priority before high.
    for policy in ("FCW", "FCWSR"):
        chosen = choose_request(everything, policy)
        assert chosen is not None and chosen.request_id == "w1"
    assert choose_request(CANDIDATES, "FCW") is None
    chosen = choose_request(CANDIDATES, "FCWSR")  # no waiting one: the shortest running
    assert chosen is not None and chosen.request_id == "a"
    chosen = choose_request(WAITING[2:], "FCW")  # a high-priority one when alone
    assert chosen is not None and chosen.request_id == "wh"


def test_an_instance_with_only_waiting_requests_is_a_source_for_the_waiting_policies() -> None:
    # Instance 0: nothing running (its blocks held, e.g. by an incoming move), a queue
    # whose head does not fit; instance 1 is free.
    reports = {0: load(used=90, running=0, waiting=3, hol=30, waiting_blocks=50),
               1: load(used=10, running=2)}
    assert pair_migrations(reports, 3.0) == []
    assert pair_migrations(reports, 3.0, waiting_moves=True) == [(0, 1)]
