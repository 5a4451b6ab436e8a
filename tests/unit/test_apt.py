"""The apt policy driven by hand with a fake clock: step types, modes, SLOs, termination.

Every step checks the plan's structure and the block manager's invariants; a request's
cache mode may change only while it holds no cache (after a preemption by recomputation).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_checks import check_scheduled_items

from preemptserve.config import SchedulerConfig
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.request import CacheMode, Request, SamplingParams
from preemptserve.core.scheduler import SchedulerOutput, create_scheduler
from preemptserve.core.scheduler.apt import AptScheduler

PROFILE = PrefillProfile(((1, 0.001), (2, 0.002)), hidden_recompute_s_per_block=1e-4)
STEP_S = 0.01


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_request(request_id: str, num_prompt_tokens: int = 8, max_tokens: int = 4,
                 ttft_slo_s: float | None = None) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=[(5 * i + len(request_id)) % 89 for i in range(num_prompt_tokens)],
        sampling=SamplingParams(max_tokens=max_tokens),
        ttft_slo_s=ttft_slo_s,
    )


class Driver:
    def __init__(self, *, num_blocks: int = 32, block_size: int = 4, num_host_blocks: int = 0,
                 hidden: bool = True, max_batch_size: int = 16,
                 max_num_batched_tokens: int = 64, ttft_slo_s: float = 1.0,
                 tbt_slo_s: float = 0.1) -> None:
        config = SchedulerConfig(policy="apt", max_batch_size=max_batch_size,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 options={"ttft_slo_s": ttft_slo_s, "tbt_slo_s": tbt_slo_s})
        self.clock = FakeClock()
        self.bm = BlockManager(num_blocks, block_size, num_host_blocks,
                               hidden_tokens_per_block=2 * block_size if hidden else 0)
        scheduler = create_scheduler(config, self.bm, self.clock, PROFILE)
        assert isinstance(scheduler, AptScheduler)
        self.scheduler = scheduler
        self.finished: list[Request] = []
        self.outputs: list[SchedulerOutput] = []

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> SchedulerOutput:
        scheduler = self.scheduler
        modes_before = {rid: (r.cache_mode, r.num_computed_tokens)
                        for rid, r in scheduler.requests.items()}
        output = scheduler.schedule()
        check_scheduled_items(scheduler, output)
        # A decode step has no prefills; a prefill step may carry resident decodes, but
        # only those whose blocks were on the device (nobody is swapped in for them).
        if any(item.is_prefill for item in output.scheduled):
            swapped_in = {swap.request_id for swap in output.swap_in}
            assert not any(not item.is_prefill and item.request_id in swapped_in
                           for item in output.scheduled), "a decode carried by a swap-in"
        for item in output.scheduled:
            mode, computed = modes_before[item.request_id]
            request = scheduler.requests[item.request_id]
            if request.cache_mode is not mode:
                assert request.num_computed_tokens == 0 and item.start_position == 0, (
                    "a mode changes only through recomputation")
            del computed
        sampled = {item.request_id: 3 for item in output.scheduled if item.sample}
        self.finished += scheduler.update_from_output(output, sampled, STEP_S)
        self.clock.now_s += STEP_S
        self.bm.check_invariants()
        self.outputs.append(output)
        return output

    def run_to_completion(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                self.bm.commit_pending()  # the last swap-ins' host blocks
                assert self.bm.num_used_blocks == 0 and self.bm.num_used_host_blocks == 0
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")


def test_needs_the_recompute_cost_when_hidden_mode_exists() -> None:
    bm = BlockManager(8, 4, hidden_tokens_per_block=8)
    with pytest.raises(ValueError, match="recompute cost"):
        create_scheduler(SchedulerConfig(policy="apt"), bm, cost_model=PrefillProfile(
            ((1, 0.001), (2, 0.002))))


def test_hidden_mode_admits_more_requests_when_memory_is_short() -> None:
    # 4 requests of 8 prompt tokens: 2 KV blocks each (+1 to grow) but 1 hidden block.
    def first_prefill_size(hidden: bool) -> int:
        driver = Driver(num_blocks=6, hidden=hidden)
        driver.add(*(make_request(f"r{i}") for i in range(4)))
        driver.clock.now_s += 0.5
        return len(driver.step().scheduled)

    assert first_prefill_size(hidden=True) > first_prefill_size(hidden=False)


def test_kv_mode_when_memory_is_plentiful() -> None:
    driver = Driver(num_blocks=64)
    driver.add(*(make_request(f"r{i}") for i in range(4)))
    driver.clock.now_s += 0.5
    output = driver.step()
    assert len(output.scheduled) == 4
    assert not any(item.hidden for item in output.scheduled)


def test_decode_step_when_running_requests_waited_longer() -> None:
    driver = Driver(num_blocks=64)
    driver.add(make_request("a"), make_request("b"))
    driver.clock.now_s += 0.1
    assert all(item.is_prefill for item in driver.step().scheduled)
    driver.clock.now_s += 0.5  # a and b wait 0.5 s for their next token
    driver.add(make_request("new"))  # pending 0 s
    output = driver.step()
    assert {item.request_id for item in output.scheduled} == {"a", "b"}
    assert not any(item.is_prefill for item in output.scheduled)


def test_prefill_step_when_waiting_requests_waited_longer() -> None:
    driver = Driver(num_blocks=64)
    driver.add(make_request("a"))
    driver.step()
    driver.add(make_request("b"), make_request("c"))
    driver.clock.now_s += 0.5  # b and c have waited as long as a, and there are two
    output = driver.step()
    # A prefill step: b and c prefill, a's decode rides along.
    assert {item.request_id for item in output.scheduled if item.is_prefill} == {"b", "c"}
    assert {item.request_id for item in output.scheduled} == {"a", "b", "c"}


def test_requests_past_their_ttft_slo_yield_to_those_that_can_meet_it() -> None:
    # Room for one prefill of 8 tokens at a time (2 blocks), no hidden mode.
    driver = Driver(num_blocks=3, hidden=False, max_num_batched_tokens=8)
    driver.add(make_request("late", ttft_slo_s=0.05))
    driver.clock.now_s += 0.1  # "late" has already missed its TTFT SLO
    driver.add(make_request("fresh", ttft_slo_s=10.0))
    driver.clock.now_s += 0.01
    output = driver.step()
    assert [item.request_id for item in output.scheduled] == ["fresh"]


def test_tight_memory_with_a_host_tier_swaps_instead_of_recomputing() -> None:
    driver = Driver(num_blocks=8, num_host_blocks=32, hidden=False)
    driver.add(*(make_request(f"r{i}", num_prompt_tokens=10, max_tokens=12) for i in range(6)))
    driver.run_to_completion()
    assert driver.scheduler.num_swap_outs > 0
    assert driver.scheduler.num_recomputations_total == 0
    assert len(driver.finished) == 6


def test_mode_switch_through_recomputation() -> None:
    # No host tier and a pool of 6 blocks: requests are dropped and come back; as memory
    # pressure changes between admissions, some return in the other mode.
    driver = Driver(num_blocks=6, max_num_batched_tokens=16)
    driver.add(*(make_request(f"r{i}", num_prompt_tokens=6, max_tokens=14) for i in range(8)))
    driver.run_to_completion()
    assert driver.scheduler.num_recomputations_total > 0
    assert driver.scheduler.num_mode_switches > 0
    assert len(driver.finished) == 8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1,
                     max_size=12),
    arrivals=st.lists(st.integers(0, 5), min_size=12, max_size=12),
    num_blocks=st.integers(8, 24),
    num_host_blocks=st.sampled_from([0, 16]),
    hidden=st.booleans(),
    max_batch_size=st.integers(1, 8),
)
def test_every_request_finishes_and_every_block_returns(
    lengths, arrivals, num_blocks, num_host_blocks, hidden, max_batch_size
) -> None:
    driver = Driver(num_blocks=num_blocks, num_host_blocks=num_host_blocks, hidden=hidden,
                    max_batch_size=max_batch_size, max_num_batched_tokens=16)
    pending = [(arrivals[i], make_request(f"r{i}", p, o)) for i, (p, o) in enumerate(lengths)]
    for step in range(3000):
        for _, request in [x for x in pending if x[0] <= step]:
            driver.add(request)
        pending = [x for x in pending if x[0] > step]
        if not pending and not driver.scheduler.has_unfinished():
            break
        driver.step()
    assert len(driver.finished) == len(lengths)
    driver.bm.commit_pending()
    assert driver.bm.num_used_blocks == 0 and driver.bm.num_used_host_blocks == 0
    if not hidden:
        assert all(r.cache_mode is CacheMode.KV for r in driver.finished)


def test_a_reservation_for_a_move_in_makes_a_lone_request_wait_not_fail() -> None:
    # 8 blocks of 4 tokens; the request needs 5 of them (16 prompt + 4 output tokens), but
    # a reservation for a request moving in holds 6 (cluster migration): it cannot start,
    # even alone, until the reservation ends. Before, apt's forced admission asserted.
    driver = Driver(num_blocks=8, block_size=4, hidden=False)
    assert driver.bm.reserve("moving-in", 6) is not None
    driver.add(make_request("r", num_prompt_tokens=16, max_tokens=4))
    for _ in range(3):
        assert not driver.step().scheduled
    driver.bm.release_reservation("moving-in")
    driver.run_to_completion()
    assert [r.request_id for r in driver.finished] == ["r"]
