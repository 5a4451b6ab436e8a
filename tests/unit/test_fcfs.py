"""The fcfs policy, driven by hand: schedule, fabricate sampled tokens, update, check.

Requests come from small factories and the "runner" is a function that returns a token
for each request that samples, as in vLLM's CPU-only scheduler tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_checks import check_scheduled_items

from preemptserve.config import SchedulerConfig
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.request import Request, RequestStatus, SamplingParams
from preemptserve.core.scheduler import (
    Scheduler,
    SchedulerOutput,
    available_policies,
    create_scheduler,
)

DEFAULT_TOKEN_ID = 7
Sampler = Callable[[Request], int]

# -- factories ---------------------------------------------------------------------------


def make_request(
    request_id: str,
    num_prompt_tokens: int = 4,
    max_tokens: int = 4,
    *,
    end_id: int | None = None,
    min_length: int = 0,
) -> Request:
    # Prompt token ids encode the request so mixed-up batches are visible.
    base = 1000 * (int(request_id[1:]) if request_id[1:].isdigit() else 0)
    return Request(
        request_id=request_id,
        prompt_token_ids=[base + i for i in range(num_prompt_tokens)],
        sampling=SamplingParams(max_tokens=max_tokens, end_id=end_id, min_length=min_length),
    )


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_batch_size: int = 8,
    max_num_batched_tokens: int = 64,
    clock: Callable[[], float] | None = None,
) -> Scheduler:
    config = SchedulerConfig(
        policy="fcfs",
        max_batch_size=max_batch_size,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return create_scheduler(config, BlockManager(num_blocks, block_size), clock)


def add(scheduler: Scheduler, *requests: Request) -> None:
    for request in requests:
        scheduler.add_request(request)


def constant_sampler(token_id: int = DEFAULT_TOKEN_ID) -> Sampler:
    return lambda request: token_id


# -- the hand-driven step ----------------------------------------------------------------


def check_output(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """Structural checks on a plan, made before results are applied."""
    bm = scheduler.block_manager
    ids = check_scheduled_items(scheduler, output)
    for request_id in output.preempted_ids:
        assert request_id not in ids
        request = scheduler.requests[request_id]
        assert request.status == RequestStatus.PREEMPTED
        assert request.num_computed_tokens == 0
        assert not bm.has_blocks(request_id)


def check_state(scheduler: Scheduler) -> None:
    """Invariants between steps: accounting and queues agree."""
    bm = scheduler.block_manager
    bm.check_invariants()
    running = scheduler.running  # type: ignore[attr-defined]
    waiting = scheduler.waiting  # type: ignore[attr-defined]
    assert len(running) <= scheduler.config.max_batch_size
    queued = [r.request_id for r in itertools.chain(running, waiting)]
    assert sorted(queued) == sorted(scheduler.requests), "a request is lost or duplicated"
    for request in running:
        assert request.status == RequestStatus.RUNNING
        assert len(list(bm.block_ids(request.request_id))) >= bm.blocks_for_tokens(
            request.num_computed_tokens
        )
    for request in waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0
        assert not bm.has_blocks(request.request_id)
    assert set(bm.owners()) <= {r.request_id for r in running}


def step(
    scheduler: Scheduler, sampler: Sampler | None = None
) -> tuple[SchedulerOutput, list[Request]]:
    """One iteration: plan, fabricate a token per sampling request, apply, check."""
    sampler = sampler or constant_sampler()
    output = scheduler.schedule()
    check_output(scheduler, output)
    sampled = {
        item.request_id: sampler(scheduler.requests[item.request_id])
        for item in output.scheduled
        if item.sample
    }
    finished = scheduler.update_from_output(output, sampled)
    for request in finished:
        assert request.is_finished
        assert request.request_id not in scheduler.requests
        assert not scheduler.block_manager.has_blocks(request.request_id)
    check_state(scheduler)
    return output, finished


def scheduled_ids(output: SchedulerOutput) -> list[str]:
    return [item.request_id for item in output.scheduled]


def tokens_by_id(output: SchedulerOutput) -> dict[str, int]:
    return {item.request_id: item.num_tokens for item in output.scheduled}


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> list[Request]:
    finished: list[Request] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return finished
        finished += step(scheduler)[1]
    raise AssertionError(f"not finished after {max_steps} steps")


# -- admission, batch size, budget -------------------------------------------------------


def test_empty_scheduler_plans_nothing() -> None:
    scheduler = make_scheduler()
    output, finished = step(scheduler)
    assert output.is_empty and finished == []
    assert not scheduler.has_unfinished()


def test_admission_in_arrival_order() -> None:
    scheduler = make_scheduler(max_batch_size=2)
    add(scheduler, *(make_request(f"r{i}", max_tokens=2 + i) for i in range(4)))
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0", "r1"]
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r3"]
    assert all(item.start_position == 0 and item.sample for item in output.scheduled)
    # r0 finishes after its 2nd token; r2 (not r3) takes its place the step after.
    _, finished = step(scheduler)
    assert [r.request_id for r in finished] == ["r0"]
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r1", "r2"]
    assert [r.request_id for r in scheduler.waiting] == ["r3"]


def test_max_batch_size_respected() -> None:
    scheduler = make_scheduler(max_batch_size=3, max_num_batched_tokens=1000)
    add(scheduler, *(make_request(f"r{i}") for i in range(10)))
    while scheduler.has_unfinished():
        output, _ = step(scheduler)
        assert len(output.scheduled) <= 3
        assert scheduler.num_running <= 3


def test_token_budget_chunks_the_last_admitted_prompt() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    add(scheduler, *(make_request(f"r{i}", num_prompt_tokens=4) for i in range(3)))
    output, _ = step(scheduler)
    assert tokens_by_id(output) == {"r0": 4, "r1": 4, "r2": 2}
    assert [item.sample for item in output.scheduled] == [True, True, False]
    assert scheduler.requests["r2"].num_output_tokens == 0
    output, _ = step(scheduler)
    assert tokens_by_id(output) == {"r0": 1, "r1": 1, "r2": 2}
    r2 = output.scheduled[2]
    assert (r2.start_position, r2.sample) == (2, True)
    assert scheduler.requests["r2"].num_output_tokens == 1


def test_long_prompt_is_chunked_and_samples_only_on_last_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = make_request("r0", num_prompt_tokens=25, max_tokens=3)
    add(scheduler, request)
    chunks = []
    for _ in range(4):
        output, _ = step(scheduler)
        (item,) = output.scheduled
        chunks.append((item.start_position, item.num_tokens, item.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 1, True)]
    assert request.num_output_tokens == 1
    assert request.num_computed_tokens == 25
    output, _ = step(scheduler)
    (item,) = output.scheduled
    assert (item.start_position, item.num_tokens, item.sample) == (25, 1, True)
    assert not item.is_prefill


def test_budget_never_exceeded_under_load() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=7, max_batch_size=5)
    add(scheduler, *(make_request(f"r{i}", num_prompt_tokens=3 + 2 * i) for i in range(6)))
    finished = []
    while scheduler.has_unfinished():
        output, done = step(scheduler)
        assert output.num_batched_tokens <= 7
        finished += done
    assert sorted(r.request_id for r in finished) == [f"r{i}" for i in range(6)]


def test_decode_requests_are_scheduled_before_new_prefills() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    add(scheduler, make_request("r0", num_prompt_tokens=2, max_tokens=10))
    step(scheduler)
    add(scheduler, make_request("r1", num_prompt_tokens=8), make_request("r2", 8))
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0", "r1"]
    assert tokens_by_id(output) == {"r0": 1, "r1": 3}
    # Both now running: r0 decodes first, r1's prefill continues with what is left.
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0", "r1"]
    assert tokens_by_id(output) == {"r0": 1, "r1": 3}


def test_first_scheduled_time_uses_the_clock() -> None:
    now = iter([5.0, 6.0, 7.0])
    scheduler = make_scheduler(max_batch_size=1, clock=lambda: next(now))
    add(scheduler, make_request("r0", max_tokens=1), make_request("r1", max_tokens=1))
    _, (r0,) = step(scheduler)
    _, (r1,) = step(scheduler)
    assert (r0.first_scheduled_time_s, r1.first_scheduled_time_s) == (5.0, 6.0)


# -- preemption --------------------------------------------------------------------------


def test_preemption_picks_most_recent_and_requeues_at_head() -> None:
    # Pool of 6 blocks of 2 tokens; three requests of 2 prompt tokens fill it by decoding.
    scheduler = make_scheduler(num_blocks=6, block_size=2, max_batch_size=3)
    sampler: Sampler = lambda r: 100 + r.num_output_tokens  # noqa: E731
    add(scheduler, *(make_request(f"r{i}", num_prompt_tokens=2, max_tokens=4) for i in range(4)))
    for _ in range(3):
        output, _ = step(scheduler, sampler)
        assert scheduled_ids(output) == ["r0", "r1", "r2"]
        assert output.preempted_ids == ()
    assert scheduler.block_manager.num_free_blocks == 0
    r2 = scheduler.requests["r2"]
    assert r2.output_token_ids == [100, 101, 102]

    # r0 needs a third block: r2 (the most recently admitted) loses its place.
    output, finished = step(scheduler, sampler)
    assert output.preempted_ids == ("r2",)
    assert scheduled_ids(output) == ["r0", "r1"]
    assert [r.request_id for r in finished] == ["r0", "r1"]
    assert r2.status == RequestStatus.PREEMPTED
    assert r2.num_preemptions == 1 and scheduler.num_preemptions_total == 1
    assert r2.num_computed_tokens == 0
    assert not scheduler.block_manager.has_blocks("r2")
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r3"]
    assert scheduler.num_preempted == 1

    # r2 resumes first by recomputing prompt + the outputs it already has.
    output, _ = step(scheduler, sampler)
    assert scheduled_ids(output) == ["r2", "r3"]
    item = output.scheduled[0]
    assert item.start_position == 0
    assert list(item.token_ids) == r2.prompt_token_ids + [100, 101, 102]
    assert item.sample
    assert r2.status == RequestStatus.FINISHED_LENGTH
    assert r2.output_token_ids == [100, 101, 102, 103]
    assert r2.num_preemptions == 1


def test_preempted_victims_are_requeued_earliest_admitted_first() -> None:
    # Four requests fill four 2-token blocks; each needs a 2nd block in the next step.
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_batch_size=4)
    add(scheduler, *(make_request(f"r{i}", num_prompt_tokens=2, max_tokens=2) for i in range(5)))
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0", "r1", "r2", "r3"]
    output, finished = step(scheduler)
    assert output.preempted_ids == ("r3", "r2")
    assert scheduled_ids(output) == ["r0", "r1"]
    assert [r.request_id for r in finished] == ["r0", "r1"]
    # No admission in a step that preempted; victims ahead of the never-run r4.
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r3", "r4"]
    output, done = step(scheduler)
    assert scheduled_ids(output) == ["r2", "r3"]  # r4 waits for blocks, in order
    assert all(item.start_position == 0 and item.num_tokens == 3 for item in output.scheduled)
    finished += done + run_to_completion(scheduler)
    assert [r.request_id for r in finished] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(r.num_output_tokens == 2 for r in finished)


def test_request_preempts_itself_when_it_is_the_last_running() -> None:
    # r0 holds 2 of 3 blocks; r1 needs a 2nd block and nobody after it can yield one.
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    add(
        scheduler,
        make_request("r0", num_prompt_tokens=3, max_tokens=3),  # up to 6 tokens: 3 blocks
        make_request("r1", num_prompt_tokens=2, max_tokens=2),
    )
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0", "r1"]  # r0: 2 blocks, r1: 1 block
    output, _ = step(scheduler)
    assert scheduled_ids(output) == ["r0"]
    assert output.preempted_ids == ("r1",)
    assert [r.request_id for r in scheduler.waiting] == ["r1"]
    finished = run_to_completion(scheduler)
    assert [r.request_id for r in finished] == ["r0", "r1"]


# -- finishing ---------------------------------------------------------------------------


def test_finish_by_max_tokens() -> None:
    scheduler = make_scheduler()
    request = make_request("r0", max_tokens=3, end_id=2)
    add(scheduler, request)
    finished = run_to_completion(scheduler)
    assert finished == [request]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [DEFAULT_TOKEN_ID] * 3
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


@pytest.mark.parametrize("min_length, expected_outputs", [(0, 1), (1, 2), (3, 4)])
def test_finish_by_end_id_after_min_length(min_length: int, expected_outputs: int) -> None:
    scheduler = make_scheduler()
    request = make_request("r0", max_tokens=10, end_id=2, min_length=min_length)
    add(scheduler, request)
    num_steps = 0
    while scheduler.has_unfinished():
        step(scheduler, constant_sampler(2))
        num_steps += 1
    assert num_steps == expected_outputs
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [2] * expected_outputs


def test_end_id_on_the_last_allowed_token_counts_as_stop() -> None:
    scheduler = make_scheduler()
    request = make_request("r0", max_tokens=2, end_id=2)
    add(scheduler, request)
    tokens = [DEFAULT_TOKEN_ID, 2]
    while scheduler.has_unfinished():
        step(scheduler, lambda r: tokens[r.num_output_tokens])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [DEFAULT_TOKEN_ID, 2]


def test_end_id_within_min_length_is_ignored_until_max_tokens() -> None:
    scheduler = make_scheduler()
    request = make_request("r0", max_tokens=3, end_id=2, min_length=5)
    add(scheduler, request)
    while scheduler.has_unfinished():
        step(scheduler, constant_sampler(2))
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.num_output_tokens == 3


# -- finish_request (abort) --------------------------------------------------------------


def _abort(scheduler: Scheduler, request_id: str) -> Request:
    request = scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
    assert request is not None
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert request_id not in scheduler.requests
    assert not scheduler.block_manager.has_blocks(request_id)
    check_state(scheduler)
    return request


def test_abort_waiting_request() -> None:
    scheduler = make_scheduler(max_batch_size=1)
    add(scheduler, make_request("r0"), make_request("r1"))
    step(scheduler)
    _abort(scheduler, "r1")
    assert scheduler.num_waiting == 0
    assert [r.request_id for r in run_to_completion(scheduler)] == ["r0"]


def test_abort_running_mid_prefill_and_decoding() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, make_request("r0", num_prompt_tokens=4), make_request("r1", 20))
    step(scheduler)
    assert scheduler.requests["r1"].num_computed_tokens == 4  # mid-prefill
    used = scheduler.block_manager.num_used_blocks
    _abort(scheduler, "r1")
    assert scheduler.block_manager.num_used_blocks == used - 1
    _abort(scheduler, "r0")  # decoding
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert scheduler.num_running == 0 and not scheduler.has_unfinished()


def test_abort_preempted_request() -> None:
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    add(scheduler, make_request("r0", 3, 3), make_request("r1", 2, 2))
    step(scheduler)
    output, _ = step(scheduler)
    assert output.preempted_ids == ("r1",)
    _abort(scheduler, "r1")
    assert scheduler.num_preempted == 0 and scheduler.num_waiting == 0
    assert [r.request_id for r in run_to_completion(scheduler)] == ["r0"]


def test_abort_during_a_step_skips_its_result() -> None:
    scheduler = make_scheduler()
    add(scheduler, make_request("r0"), make_request("r1"))
    output = scheduler.schedule()
    aborted = _abort(scheduler, "r0")
    finished = scheduler.update_from_output(output, {"r0": 5, "r1": 5})
    assert finished == []
    assert aborted.num_output_tokens == 0
    assert scheduler.requests["r1"].num_output_tokens == 1
    check_state(scheduler)


def test_abort_unknown_or_finished_returns_none() -> None:
    scheduler = make_scheduler()
    assert scheduler.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None
    add(scheduler, make_request("r0", max_tokens=1))
    run_to_completion(scheduler)
    assert scheduler.finish_request("r0", RequestStatus.FINISHED_ABORTED) is None


# -- add_request and policy lookup -------------------------------------------------------


def test_request_that_can_never_fit_is_rejected() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(make_request("big", num_prompt_tokens=10, max_tokens=7))
    assert not scheduler.has_unfinished()
    scheduler.add_request(make_request("fits", num_prompt_tokens=10, max_tokens=6))
    assert run_to_completion(scheduler)[0].num_output_tokens == 6


def test_duplicate_request_id_rejected() -> None:
    scheduler = make_scheduler()
    add(scheduler, make_request("r0"))
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.add_request(make_request("r0"))
    assert scheduler.num_waiting == 1


def test_unknown_policy_lists_available_ones() -> None:
    assert "fcfs" in available_policies()
    config = SchedulerConfig(policy="no-such-policy")
    with pytest.raises(ValueError, match="no-such-policy") as info:
        create_scheduler(config, BlockManager(4, 4))
    assert "fcfs" in str(info.value)


def test_policy_chosen_by_name() -> None:
    scheduler = make_scheduler()
    assert scheduler.policy_name == "fcfs"


# -- property test -----------------------------------------------------------------------


def _sampled_token(request_id: str, index: int) -> int:
    # A fixed function of (request, position), so recomputation yields the same tokens.
    return (int(request_id[1:]) * 3 + index * 7) % 5


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(2, 12))
    capacity = block_size * num_blocks
    requests = []
    for i in range(draw(st.integers(1, 8))):
        num_prompt_tokens = draw(st.integers(1, max(1, capacity - 1)))
        max_tokens = draw(st.integers(1, capacity - num_prompt_tokens))
        requests.append(
            {
                "request_id": f"r{i}",
                "num_prompt_tokens": num_prompt_tokens,
                "max_tokens": max_tokens,
                "end_id": draw(st.one_of(st.none(), st.integers(0, 4))),
                "min_length": draw(st.integers(0, 3)),
                "arrival_step": draw(st.integers(0, 10)),
            }
        )
    return {
        "block_size": block_size,
        "num_blocks": num_blocks,
        "max_batch_size": draw(st.integers(1, 4)),
        "max_num_batched_tokens": draw(st.integers(1, 16)),
        "requests": requests,
    }


def _check_tokens(request: Request) -> None:
    sampling = request.sampling
    outputs = request.output_token_ids
    assert outputs == [_sampled_token(request.request_id, k) for k in range(len(outputs))]
    stops = [
        k + 1
        for k, token in enumerate(outputs)
        if token == sampling.end_id and k + 1 > sampling.min_length
    ]
    if request.status == RequestStatus.FINISHED_STOPPED:
        assert stops == [len(outputs)] and len(outputs) <= sampling.max_tokens
    else:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert stops == [] and len(outputs) == sampling.max_tokens


def _arrivals(requests: Iterable[dict], at_step: int) -> list[Request]:
    return [
        make_request(
            spec["request_id"],
            spec["num_prompt_tokens"],
            spec["max_tokens"],
            end_id=spec["end_id"],
            min_length=spec["min_length"],
        )
        for spec in requests
        if spec["arrival_step"] == at_step
    ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads())
def test_every_request_finishes_exactly_once(workload: dict) -> None:
    scheduler = make_scheduler(
        num_blocks=workload["num_blocks"],
        block_size=workload["block_size"],
        max_batch_size=workload["max_batch_size"],
        max_num_batched_tokens=workload["max_num_batched_tokens"],
    )
    specs = workload["requests"]
    last_arrival = max(spec["arrival_step"] for spec in specs)
    # The oldest running request is never preempted and feeds >= 1 token per step.
    max_steps = last_arrival + sum(s["num_prompt_tokens"] + s["max_tokens"] for s in specs)
    max_steps += len(specs) + 1
    admitted_order: list[str] = []
    finished: list[Request] = []
    sampler: Sampler = lambda r: _sampled_token(r.request_id, r.num_output_tokens)  # noqa: E731

    num_steps = 0
    while num_steps <= last_arrival or scheduler.has_unfinished():
        assert num_steps < max_steps, "the scheduler does not make progress"
        add(scheduler, *_arrivals(specs, num_steps))
        running_before = [r.request_id for r in scheduler.running]  # type: ignore[attr-defined]
        output, done = step(scheduler, sampler)
        num_steps += 1
        finished += done
        for request_id in scheduled_ids(output):
            if request_id not in running_before and request_id not in admitted_order:
                admitted_order.append(request_id)
        if output.preempted_ids:
            # Victims are taken newest first and requeued oldest first, at the head.
            order = [running_before.index(v) for v in output.preempted_ids]
            assert order == sorted(order, reverse=True)
            waiting_ids = [r.request_id for r in scheduler.waiting]  # type: ignore[attr-defined]
            victims = list(reversed(output.preempted_ids))
            assert waiting_ids[: len(victims)] == victims
            assert not set(scheduled_ids(output)) - set(running_before)

    finished_ids = [r.request_id for r in finished]
    assert len(finished_ids) == len(set(finished_ids)), "a request finished twice"
    assert sorted(finished_ids) == sorted(s["request_id"] for s in specs)
    for request in finished:
        _check_tokens(request)
    bm = scheduler.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.owners() == []
