"""Structural checks every policy's plan must pass, shared by the scheduler tests."""

from __future__ import annotations

from preemptserve.core.request import RequestStatus
from preemptserve.core.scheduler import Scheduler, SchedulerOutput


def check_scheduled_items(scheduler: Scheduler, output: SchedulerOutput) -> list[str]:
    """Limits and per-item consistency of a plan, before results apply; the ids in order."""
    config, bm = scheduler.config, scheduler.block_manager
    ids = [item.request_id for item in output.scheduled]
    assert len(ids) == len(set(ids)), f"request scheduled twice: {ids}"
    assert len(ids) <= config.max_batch_size
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    for item in output.scheduled:
        request = scheduler.requests[item.request_id]
        assert request.status == RequestStatus.RUNNING
        assert item.num_tokens >= 1
        assert item.start_position == request.num_computed_tokens
        assert item.context_len <= request.num_tokens
        assert list(item.token_ids) == request.token_ids(item.start_position, item.context_len)
        assert item.sample == (item.context_len == request.num_tokens)
        assert list(item.block_ids) == list(bm.block_ids(item.request_id))
        assert len(item.block_ids) == bm.blocks_for_tokens(item.context_len, item.hidden)
        assert item.hidden == request.hidden == bm.is_hidden(item.request_id)
    return ids
