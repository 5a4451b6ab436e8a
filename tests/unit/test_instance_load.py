"""Llumnix's freeness, computed from the scheduler's state (core/scheduler/load.py)."""

from __future__ import annotations

import math

from preemptserve.config import SchedulerConfig
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.request import Request, SamplingParams
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
