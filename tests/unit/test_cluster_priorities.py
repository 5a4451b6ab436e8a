"""Priorities and memory-driven preemptions in the cluster policies: the high-priority
headroom in load reports, dispatch and pairing (core/scheduler/load.py,
core/global_scheduler.py), draining instances, the migration-source rule that counts
only preemptions forced by memory (no churn from MLFQ's preemptions by design), and
fcfs / MLFQ / apt putting high-priority requests first locally."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preemptserve.config import ClusterConfig, SchedulerConfig, serving_config_from_parameters
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.global_scheduler import (
    Dispatcher,
    MigrationCandidate,
    NoInstanceError,
    choose_request,
    drain_pairs,
    pair_migrations,
)
from preemptserve.core.request import Request, SamplingParams
from preemptserve.core.scheduler import create_scheduler
from preemptserve.core.scheduler.base import Scheduler
from preemptserve.core.scheduler.load import InstanceLoad, instance_load
from preemptserve.serving.protocol import InvalidRequest, parse_generate_request

# Prefill time = prompt tokens * 1 ms (MLFQ's queue placement).
PROFILE = PrefillProfile(((1, 0.001), (2, 0.002)))
STEP_S = 0.001


def load(used: int, running: int, waiting: int = 0, hol: int = 0, waiting_blocks: int = 0,
         *, num_blocks: int = 100, high_running: int = 0, high_waiting: int = 0,
         headroom: int = 0, killed: int = 0, draining: bool = False) -> InstanceLoad:
    return InstanceLoad(num_blocks=num_blocks, num_used_blocks=used, num_running=running,
                        num_waiting=waiting, head_of_line_blocks=hol,
                        waiting_blocks=waiting_blocks, num_memory_preempted=killed,
                        num_high_running=high_running, num_high_waiting=high_waiting,
                        priority_headroom_blocks=headroom, draining=draining)


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_scheduler(policy: str, num_blocks: int, *, num_host_blocks: int = 0,
                   max_batch_size: int = 4, **options) -> tuple[Scheduler, Clock]:
    config = SchedulerConfig(policy=policy, max_batch_size=max_batch_size,
                             max_num_batched_tokens=64, options=options)
    clock = Clock()
    scheduler = create_scheduler(config, BlockManager(num_blocks, 4, num_host_blocks), clock,
                                 PROFILE if policy != "fcfs" else None)
    return scheduler, clock


def mlfq(num_blocks: int, num_host_blocks: int = 0, max_batch_size: int = 1):
    return make_scheduler("skip_join_mlfq", num_blocks, num_host_blocks=num_host_blocks,
                          max_batch_size=max_batch_size, base_quantum_s=0.005,
                          kv_reserve_fraction=0.0, starvation_threshold_s=10.0,
                          max_started_factor=100.0)


def request(request_id: str, num_prompt_tokens: int = 4, max_tokens: int = 16,
            priority: str = "normal") -> Request:
    return Request(request_id, list(range(1, num_prompt_tokens + 1)),
                   SamplingParams(max_tokens=max_tokens), priority=priority)


def step(scheduler: Scheduler, clock: Clock) -> list[str]:
    """One iteration with a fabricated token for each request that samples."""
    output = scheduler.schedule()
    sampled = {item.request_id: 5 for item in output.scheduled if item.sample}
    scheduler.update_from_output(output, sampled, STEP_S)
    clock.now_s += STEP_S
    scheduler.block_manager.check_invariants()
    return [item.request_id for item in output.scheduled]


EMPTY = load(0, 0)  # an idle instance: infinitely free, the best destination


# ------------------------------------------------------ memory-driven preemptions


def test_fcfs_counts_a_recompute_for_memory_until_the_request_runs_again() -> None:
    sched, clock = make_scheduler("fcfs", num_blocks=6, max_batch_size=4)
    sched.add_request(request("a", 8, max_tokens=12))
    sched.add_request(request("b", 8, max_tokens=12))
    preempted_at = None
    for k in range(30):
        step(sched, clock)
        if sched.num_memory_preempted and preempted_at is None:
            preempted_at = k
            assert sched.num_memory_preemptions_total == 1
            assert sched.num_memory_preemptions_total == sched.num_recomputations_total
            assert instance_load(sched).num_memory_preempted == 1
        if preempted_at is not None and not sched.num_memory_preempted:
            break  # it runs again
    assert preempted_at is not None, "memory never ran out"
    assert sched.num_memory_preempted == 0
    assert sched.num_memory_preemptions_total >= 1


def test_mlfq_preempting_by_design_with_plenty_of_memory_is_never_a_source() -> None:
    """Quantum expiry and level order preempt all the time; memory is plentiful, so the
    instance never becomes a migration source (no churn)."""
    sched, clock = mlfq(num_blocks=64, max_batch_size=1)
    for i in range(3):
        sched.add_request(request(f"r{i}", 3, max_tokens=12))
    for _ in range(60):
        step(sched, clock)
        current = instance_load(sched)
        assert current.num_memory_preempted == 0
        assert pair_migrations({0: current, 1: EMPTY}) == []
        if not sched.has_unfinished():
            break
    assert sched.num_preemptions_total > 0, "no preemption by design happened"
    assert sched.num_memory_preemptions_total == 0


def test_mlfq_preempting_for_memory_is_a_source_until_the_request_is_back() -> None:
    """A started job growing into a full pool swaps an idle lower job out: that one is
    preempted for memory, and the instance is a source though its freeness is fine."""
    sched, clock = mlfq(num_blocks=8, num_host_blocks=16, max_batch_size=1)
    sched.add_request(request("long", 12, max_tokens=16))  # joins a lower queue
    for _ in range(3):
        step(sched, clock)
    sched.add_request(request("short", 3, max_tokens=16))  # Q0: runs, grows, evicts
    sources_while_killed = []
    for _ in range(60):
        step(sched, clock)
        current = instance_load(sched)
        pairs = pair_migrations({0: current, 1: EMPTY})
        if current.num_memory_preempted:
            assert sched.is_memory_preempted("long")
            assert current.migration_freeness >= -3  # not a source by freeness
            sources_while_killed.append(pairs == [(0, 1)])
            # Never a destination either.
            assert pair_migrations({0: current, 1: load(90, 4, 1, 20, 20)}) == []
        else:
            assert pairs == []
        if not sched.has_unfinished():
            break
    assert sources_while_killed and all(sources_while_killed)
    assert sched.num_memory_preemptions_total == 1 and sched.num_memory_preempted == 0


def test_a_proactive_offload_is_not_a_memory_preemption() -> None:
    sched, clock = make_scheduler("skip_join_mlfq", 20, num_host_blocks=20, max_batch_size=1,
                                  base_quantum_s=0.002, kv_reserve_fraction=0.5,
                                  starvation_threshold_s=10.0, max_started_factor=100.0)
    for i in range(4):
        sched.add_request(request(f"r{i}", 6, max_tokens=12))
    for _ in range(80):
        step(sched, clock)
        if not sched.has_unfinished():
            break
    assert sched.num_swap_outs > 0, "nothing was offloaded"
    assert sched.num_memory_preemptions_total == 0


def test_a_detached_memory_preempted_request_counts_again_if_its_move_fails() -> None:
    sched, clock = mlfq(num_blocks=8, num_host_blocks=16, max_batch_size=1)
    sched.add_request(request("long", 12, max_tokens=16))
    for _ in range(3):
        step(sched, clock)
    sched.add_request(request("short", 3, max_tokens=16))
    while not sched.num_memory_preempted:
        step(sched, clock)
    sched.detach("long")
    assert sched.num_memory_preempted == 0
    sched.reattach("long")
    assert sched.num_memory_preempted == 1
    sched.detach("long")
    sched.release_detached("long")
    assert sched.num_memory_preempted == 0 and not sched._memory_preempted_detached


def test_memory_sources_pair_with_free_instances_only() -> None:
    killed = load(50, 4, killed=1)  # F = 12.5: fine by freeness, but killed
    assert pair_migrations({0: killed, 1: load(10, 1)}) == [(0, 1)]
    assert pair_migrations({0: killed, 1: load(80, 4)}) == []  # not freer: no move
    assert pair_migrations({0: killed, 1: load(10, 1, killed=2)}) == []  # two sources


# ------------------------------------------------------------- high-priority headroom


def test_headroom_applies_only_while_the_instance_holds_a_high_priority_request() -> None:
    plain = load(20, 2, 1, 10, 10, headroom=40)
    assert plain.reserved_blocks == 0
    assert plain.dispatch_freeness == (100 - 20 - 10) / 3
    high = dataclasses.replace(plain, num_high_running=1)
    assert high.reserved_blocks == 40
    assert high.migration_freeness == (100 - 20 - 40 - 10) / 3
    assert high.dispatch_freeness == (100 - 20 - 40 - 10) / 3
    assert high.high_priority_dispatch_freeness == plain.dispatch_freeness
    assert high.physical_migration_freeness == plain.migration_freeness
    # Split among high-priority requests: the instance's sum is the headroom, whatever
    # their number.
    assert dataclasses.replace(high, num_high_running=2, num_high_waiting=1).reserved_blocks == 40


@st.composite
def reports(draw: st.DrawFn) -> InstanceLoad:
    num_blocks = draw(st.integers(1, 200))
    running = draw(st.integers(0, 20))
    waiting = draw(st.integers(0, 10))
    hol = draw(st.integers(1, 60)) if waiting else 0
    return load(draw(st.integers(0, 2 * num_blocks)), running, waiting, hol,
                hol + (draw(st.integers(0, 60 * (waiting - 1))) if waiting > 1 else 0),
                num_blocks=num_blocks, headroom=draw(st.integers(0, 300)),
                high_running=draw(st.integers(0, running)),
                high_waiting=draw(st.integers(0, waiting)))


@settings(max_examples=300, deadline=None)
@given(reports())
def test_headroom_lowers_freeness_by_exactly_the_headroom(report: InstanceLoad) -> None:
    if not report.num_high_priority:
        normal = dataclasses.replace(report, priority_headroom_blocks=0)
        assert report.migration_freeness == normal.migration_freeness
        assert report.dispatch_freeness == normal.dispatch_freeness
        return
    assert report.high_priority_dispatch_freeness >= report.dispatch_freeness
    assert report.physical_migration_freeness >= report.migration_freeness
    n = report.num_running + report.num_waiting
    if n:
        assert math.isclose(
            report.high_priority_dispatch_freeness - report.dispatch_freeness,
            report.priority_headroom_blocks / n, abs_tol=1e-9)


def test_normal_requests_avoid_the_high_priority_instance_and_high_ones_join_it() -> None:
    dispatcher = Dispatcher("load", 2)
    # Instance 0: one high-priority request, lightly used; 1: two normal ones, busier.
    dispatcher.update(0, load(10, 1, high_running=1, headroom=60))
    dispatcher.update(1, load(30, 2))
    assert dispatcher.choose(1) == 1  # (100-10-60)/1 = 30 < (100-30)/2 = 35
    assert dispatcher.choose(1, "high") == 0  # without the headroom: 90 > (100-30-1)/3
    with pytest.raises(ValueError, match="high.*normal"):
        dispatcher.choose(1, "urgent")


def test_a_high_priority_request_dispatched_brings_the_headroom_at_once() -> None:
    dispatcher = Dispatcher("load", 2)
    dispatcher.update(0, load(10, 2, headroom=50))
    dispatcher.update(1, load(20, 2, headroom=50))
    assert dispatcher.choose(2, "high") == 0
    accounted = dispatcher.load(0)
    assert accounted is not None and accounted.num_high_waiting == 1
    assert accounted.reserved_blocks == 50
    assert dispatcher.choose(2) == 1  # the normal one goes elsewhere before any report


def test_headroom_pushes_normal_requests_away_never_high_priority_ones() -> None:
    # Physically fine ((100-40)/4 = 15), below the threshold with the headroom.
    mixed = load(40, 4, high_running=1, headroom=60)
    assert mixed.migration_freeness == 0.0
    tight = load(40, 4, high_running=1, headroom=70)  # (100-40-70)/4 = -2.5
    tighter = load(40, 4, high_running=1, headroom=80)  # -5: a source by headroom
    assert pair_migrations({0: tight, 1: EMPTY}) == []
    assert pair_migrations({0: tighter, 1: EMPTY}) == [(0, 1)]
    # Only high-priority requests there: the headroom alone never moves them ...
    only_high = load(40, 4, high_running=4, headroom=80)
    assert pair_migrations({0: only_high, 1: EMPTY}) == []
    # ... though memory does.
    physically_full = load(115, 4, high_running=4, headroom=80)  # (100-115)/4 < -3
    assert pair_migrations({0: physically_full, 1: EMPTY}) == [(0, 1)]
    assert pair_migrations({0: dataclasses.replace(only_high, num_memory_preempted=1),
                            1: EMPTY}) == [(0, 1)]


def test_the_source_moves_normal_requests_before_high_priority_ones() -> None:
    candidates = [MigrationCandidate("h", 10, 1, False, 5.0, "high"),
                  MigrationCandidate("n", 90, 6, False, 1.0),
                  MigrationCandidate("m", 50, 4, False, 9.0, "normal")]
    assert choose_request(candidates, "SR").request_id == "m"
    assert choose_request(candidates, "LR").request_id == "n"
    assert choose_request(candidates, "LCR").request_id == "n"
    assert choose_request(candidates[:1], "SR").request_id == "h"


def test_instance_load_counts_high_priority_requests() -> None:
    sched, clock = make_scheduler("fcfs", num_blocks=40, max_batch_size=1)
    sched.add_request(request("n", 4))
    sched.add_request(request("h", 4, priority="high"))
    sched.add_request(request("w", 4))
    step(sched, clock)
    report = instance_load(sched, priority_headroom_blocks=10)
    assert (report.num_high_running, report.num_high_waiting) == (1, 0)
    assert report.reserved_blocks == 10 and report.num_running == 1


# -------------------------------------------------------------------- draining


def test_a_draining_instance_is_infinitely_loaded_and_takes_nothing() -> None:
    draining = load(0, 0, draining=True)
    assert draining.migration_freeness == -math.inf
    assert draining.dispatch_freeness == -math.inf
    dispatcher = Dispatcher("load", 2)
    dispatcher.update(0, draining)
    dispatcher.update(1, load(95, 10))
    assert [dispatcher.choose(1) for _ in range(3)] == [1, 1, 1]
    dispatcher.set_draining(1, True)
    with pytest.raises(NoInstanceError, match="draining"):
        dispatcher.choose(1)
    dispatcher.set_draining(1, False)
    rr = Dispatcher("round_robin", 3)
    rr.set_draining(1, True)
    assert [rr.choose(0) for _ in range(4)] == [0, 2, 0, 2]


def test_drain_pairs_skips_draining_destinations_and_pairing_skips_draining_sources() -> None:
    loads = {0: load(90, 9, draining=True), 1: load(10, 1, draining=True), 2: load(80, 8)}
    assert drain_pairs(0, loads) == 2
    assert pair_migrations(loads) == []


# ------------------------------------------------------------ local policies


def test_fcfs_admits_high_priority_first_and_preempts_normal_requests_first() -> None:
    sched, clock = make_scheduler("fcfs", num_blocks=40, max_batch_size=1)
    sched.add_request(request("n1", 4, max_tokens=2))
    sched.add_request(request("n2", 4, max_tokens=2))
    sched.add_request(request("h", 4, max_tokens=2, priority="high"))
    order = []
    for _ in range(10):
        for rid in step(sched, clock):
            if rid not in order:
                order.append(rid)
    assert order == ["h", "n1", "n2"]

    # Blocks run out: the normal request is preempted, though it was admitted first.
    sched, clock = make_scheduler("fcfs", num_blocks=6, max_batch_size=2)
    sched.add_request(request("n", 4, max_tokens=12))
    step(sched, clock)
    sched.add_request(request("h", 4, max_tokens=12, priority="high"))
    victims = []
    for _ in range(60):
        output = sched.schedule()
        victims += output.preempted_ids
        sched.update_from_output(output, {i.request_id: 5 for i in output.scheduled
                                          if i.sample}, STEP_S)
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert victims and set(victims) == {"n"}, victims


def test_mlfq_runs_high_priority_jobs_first_within_a_queue() -> None:
    sched, clock = mlfq(num_blocks=64, max_batch_size=1)
    sched.add_request(request("n", 3, max_tokens=2))
    sched.add_request(request("h", 3, max_tokens=2, priority="high"))
    assert sched.level_of("n") == sched.level_of("h")  # type: ignore[attr-defined]
    assert step(sched, clock) == ["h"]


def test_apt_weighs_waiting_high_priority_requests_first() -> None:
    sched, clock = make_scheduler("apt", num_blocks=64, max_batch_size=1)
    for i in range(10):
        sched.add_request(request(f"n{i}", 3))
    sched.add_request(request("h", 3, priority="high"))
    candidates = [r.request_id for r in sched._new_candidates(4)]  # type: ignore[attr-defined]
    assert candidates == ["h", "n0", "n1", "n2"]
    normal_only, _ = make_scheduler("apt", num_blocks=64, max_batch_size=1)
    for i in range(10):
        normal_only.add_request(request(f"n{i}", 3))
    assert [r.request_id for r in normal_only._new_candidates(4)] == [  # type: ignore[attr-defined]
        "n0", "n1", "n2", "n3"]


# ------------------------------------------------------ request parameter, config


def test_request_priority_parameter() -> None:
    import numpy as np

    inputs = {"text_input": np.array([b"hi"], dtype=np.object_),
              "max_tokens": np.array([4], dtype=np.int32)}
    parse = parse_generate_request
    assert parse(inputs, default_exclude_input=True).priority == "normal"
    assert parse(inputs, default_exclude_input=True,
                 parameters={"request_priority": "high"}).priority == "high"
    assert parse(inputs, default_exclude_input=True,
                 parameters={"request_priority": " Normal "}).priority == "normal"
    for bad in ("urgent", 1, True, ""):
        with pytest.raises(InvalidRequest, match="request_priority.*high.*normal"):
            parse(inputs, default_exclude_input=True, parameters={"request_priority": bad})
    # Triton's own integer ``priority`` is not ours (Triton keeps it from the model).
    assert parse(inputs, default_exclude_input=True,
                 parameters={"priority": 1}).priority == "normal"


def test_cluster_config_priority_and_scaling_parameters() -> None:
    config = serving_config_from_parameters({
        "num_instances": "4", "priority_headroom_blocks": "128", "enable_scaling": "true",
        "min_instances": "2", "max_instances": "16", "scale_up_threshold": "5",
        "scale_down_threshold": "55", "scaling_interval_s": "2.5"}).cluster
    assert (config.priority_headroom_blocks, config.enable_scaling) == (128, True)
    policy = config.scaling_policy()
    assert (policy.min_instances, policy.max_instances) == (2, 16)
    assert (policy.scale_up_threshold, policy.scale_down_threshold,
            policy.interval_s) == (5.0, 55.0, 2.5)
    default = ClusterConfig()
    assert not default.enable_scaling and default.priority_headroom_blocks == 0
    assert default.scaling_max_instances == default.num_instances
    for bad, match in (({"priority_headroom_blocks": -1}, "priority_headroom_blocks"),
                       ({"min_instances": 0}, "min_instances"),
                       ({"min_instances": 3, "max_instances": 2}, "max_instances"),
                       ({"enable_scaling": True, "num_instances": 4, "max_instances": 2,
                         "min_instances": 1}, "enable_scaling"),
                       ({"scale_up_threshold": 60.0, "scale_down_threshold": 10.0},
                        "scale_down_threshold"),
                       ({"scaling_interval_s": 0.0}, "scaling_interval_s")):
        with pytest.raises(ValueError, match=match):
            ClusterConfig(**bad)
    with pytest.raises(ValueError, match="parameter min_instances"):
        serving_config_from_parameters({"min_instances": "two"})
