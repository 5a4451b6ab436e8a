"""Llumnix's freeness, computed from the scheduler's state (core/scheduler/load.py)."""

from __future__ import annotations

import math

from preemptserve.config import SchedulerConfig
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.request import Request, RequestStatus, SamplingParams
from preemptserve.core.scheduler import create_scheduler
from preemptserve.core.scheduler.load import instance_load


def scheduler(num_blocks: int = 20, num_host_blocks: int = 0, max_batch_size: int = 2):
    config = SchedulerConfig(policy="fcfs", max_batch_size=max_batch_size,
                             max_num_batched_tokens=64)
    return create_scheduler(config, BlockManager(num_blocks, 4, num_host_blocks))


def request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, list(range(1, num_prompt_tokens + 1)),
                   SamplingParams(max_tokens=8))


def test_an_empty_instance_is_infinitely_free() -> None:
    load = instance_load(scheduler())
    assert load.migration_freeness == math.inf and load.dispatch_freeness == math.inf


def test_freeness_counts_running_blocks_and_the_waiting_queue() -> None:
    sched = scheduler(num_blocks=20, max_batch_size=2)
    for request_id, prompt in (("a", 7), ("b", 3), ("c", 11), ("d", 5)):
        sched.add_request(request(request_id, prompt))
    sched.schedule()  # a (2 blocks) and b (1 block) start; c and d wait
    load = instance_load(sched)
    assert (load.num_running, load.num_waiting) == (2, 2)
    assert load.num_used_blocks == 3
    # c needs 11 + 1 tokens = 3 blocks to start, d 2 blocks.
    assert (load.head_of_line_blocks, load.waiting_blocks) == (3, 5)
    assert load.migration_freeness == (20 - 3 - 3) / (2 + 1)
    assert load.dispatch_freeness == (20 - 3 - 5) / (2 + 2)


def test_host_tier_blocks_of_started_requests_count_as_used() -> None:
    sched = scheduler(num_blocks=20, num_host_blocks=10)
    sched.add_request(request("a", 8))
    sched.schedule()
    assert sched.block_manager.swap_out("a") is not None
    load = instance_load(sched)
    assert load.num_used_blocks == 2 and load.num_running == 1
    assert load.migration_freeness == (20 - 2) / 1


def full_count(sched) -> tuple[int, int, int, int, int, int]:
    """The load's request counts by one pass over every request (the definition)."""
    bm = sched.block_manager
    running = waiting = head = blocks = high_running = high_waiting = 0
    for r in sched.requests.values():
        if r.status.name == "WAITING":
            needed = bm.blocks_for_tokens(r.num_prompt_tokens + 1, r.hidden)
            head = head if waiting else needed
            waiting, blocks, high_waiting = waiting + 1, blocks + needed, high_waiting + (
                r.priority == "high")
        else:
            running, high_running = running + 1, high_running + (r.priority == "high")
    return running, waiting, head, blocks, high_running, high_waiting


def test_counts_equal_a_pass_over_every_request_wherever_the_waiting_ones_are() -> None:
    # The report reads the table backwards until it has seen every waiting request: check
    # it against the full pass with waiting requests before, between and after started
    # ones (a reattached request goes to the end), high-priority ones among both.
    sched = scheduler(num_blocks=40, max_batch_size=2)
    for i, prompt in enumerate((7, 3, 11, 5, 2, 4)):
        r = request(str(i), prompt)
        r.priority = "high" if i % 3 == 0 else "normal"
        sched.add_request(r)
    loads = []
    for _ in range(3):
        sched.schedule()
        loads.append((instance_load(sched), full_count(sched)))
    started = next(rid for rid, r in sched.requests.items() if r.status.name != "WAITING")
    sched.detach(started)
    loads.append((instance_load(sched), full_count(sched)))
    sched.reattach(started)  # now after the waiting ones in the table
    loads.append((instance_load(sched), full_count(sched)))
    sched.finish_request(next(iter(sched.requests)), RequestStatus.FINISHED_ABORTED)
    loads.append((instance_load(sched), full_count(sched)))
    for load, expected in loads:
        assert (load.num_running, load.num_waiting, load.head_of_line_blocks,
                load.waiting_blocks, load.num_high_running, load.num_high_waiting) == expected
    assert any(expected[1] and expected[4] for _, expected in loads)  # both kinds present
