"""The skip_join_mlfq policy, driven by hand with a fake clock and a linear cost model.

Each step: ``schedule()``, fabricate a token for every request that samples, then
``update_from_output(output, sampled, step_time_s)`` and advance the clock by the step
time. Every step checks the plan's structure, the priority property and the block
manager's invariants in both tiers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plan_checks import check_scheduled_items

from preemptserve.config import SchedulerConfig
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.request import Request, RequestStatus, SamplingParams
from preemptserve.core.scheduler import SchedulerOutput, create_scheduler
from preemptserve.core.scheduler.mlfq import SkipJoinMLFQScheduler

# Prefill time = prompt tokens * 1 ms, so a prompt of n tokens joins the first queue
# whose quantum is at least n ms. Default quanta: 10, 20, 40, 80 ms.
PROFILE = PrefillProfile(((1, 0.001), (2, 0.002)))
STEP_S = 0.001

# -- factories ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make_request(request_id: str, num_prompt_tokens: int = 4, max_tokens: int = 4) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=[(7 * len(request_id) + i) % 97 for i in range(num_prompt_tokens)],
        sampling=SamplingParams(max_tokens=max_tokens),
    )


def sampled_token(request_id: str, index: int) -> int:
    # A fixed function of (request, position): recomputation must give the same tokens.
    return (sum(map(ord, request_id)) * 3 + index * 7) % 11


class Driver:
    """A scheduler, its fake clock, and the hand-driven step with all the checks."""

    def __init__(
        self,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        num_host_blocks: int = 0,
        max_batch_size: int = 8,
        max_num_batched_tokens: int = 64,
        base_quantum_s: float = 0.010,
        quantum_ratio: float = 2.0,
        num_queues: int = 4,
        starvation_threshold_s: float = 10.0,
        kv_reserve_fraction: float = 0.0,
        max_started_factor: float = 100.0,
        profile: PrefillProfile = PROFILE,
        checks_priority: bool = True,
        work_conserving: bool = False,
    ) -> None:
        config = SchedulerConfig(
            policy="skip_join_mlfq",
            max_batch_size=max_batch_size,
            max_num_batched_tokens=max_num_batched_tokens,
            options={
                "base_quantum_s": base_quantum_s,
                "quantum_ratio": quantum_ratio,
                "num_queues": num_queues,
                "starvation_threshold_s": starvation_threshold_s,
                "kv_reserve_fraction": kv_reserve_fraction,
                "max_started_factor": max_started_factor,
            },
        )
        self.clock = FakeClock()
        bm = BlockManager(num_blocks, block_size, num_host_blocks=num_host_blocks)
        scheduler = create_scheduler(config, bm, self.clock, profile)
        assert isinstance(scheduler, SkipJoinMLFQScheduler)
        self.scheduler = scheduler
        self.bm = bm
        self.checks_priority = checks_priority
        self.work_conserving = work_conserving
        self.running: set[str] = set()  # scheduled in the last step and not finished
        self.finished: list[Request] = []

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self, step_time_s: float = STEP_S) -> SchedulerOutput:
        scheduler = self.scheduler
        before = Snapshot.take(scheduler)
        output = scheduler.schedule()
        check_output(scheduler, output, before, self.running)
        if self.checks_priority:
            check_priority(scheduler, output, before, self.work_conserving)
        sampled = {
            item.request_id: sampled_token(
                item.request_id, scheduler.requests[item.request_id].num_output_tokens
            )
            for item in output.scheduled
            if item.sample
        }
        done = scheduler.update_from_output(output, sampled, step_time_s)
        self.clock.advance(step_time_s)
        for request in done:
            assert request.request_id not in scheduler.requests
            assert not self.bm.has_blocks(request.request_id)
            assert not self.bm.is_on_host(request.request_id)
        self.finished += done
        self.running = {item.request_id for item in output.scheduled} - {
            r.request_id for r in done
        }
        check_state(scheduler)
        return output

    def run(self, num_steps: int, step_time_s: float = STEP_S) -> list[SchedulerOutput]:
        return [self.step(step_time_s) for _ in range(num_steps)]

    def run_to_completion(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")

    def level(self, request_id: str) -> int:
        return self.scheduler.level_of(request_id)


def scheduled_ids(output: SchedulerOutput) -> list[str]:
    return [item.request_id for item in output.scheduled]


# -- the checks made every step ----------------------------------------------------------


@dataclass
class Snapshot:
    """What the scheduler sees when ``schedule()`` starts (after ``commit_pending``)."""

    tables: dict[str, list[int]]  # device block tables
    host_blocks: dict[str, int]
    computed: dict[str, int]
    uncomputed: dict[str, int]
    num_preemptions: dict[str, int]
    num_free_blocks: int
    num_free_host_blocks: int
    num_started_blocks: int  # blocks held in both tiers
    num_started_jobs: int  # jobs holding blocks in either tier

    @classmethod
    def take(cls, scheduler: SkipJoinMLFQScheduler) -> Snapshot:
        bm = scheduler.block_manager
        bm.commit_pending()  # schedule() starts with it; doing it first changes nothing
        requests = scheduler.requests.values()
        return cls(
            tables={r: list(bm.block_ids(r)) for r in bm.device_owners()},
            host_blocks={r: bm.num_host_blocks_of(r) for r in bm.host_owners()},
            computed={r.request_id: r.num_computed_tokens for r in requests},
            uncomputed={r.request_id: r.num_uncomputed_tokens for r in requests},
            num_preemptions={r.request_id: r.num_preemptions for r in requests},
            num_free_blocks=bm.num_free_blocks,
            num_free_host_blocks=bm.num_free_host_blocks,
            num_started_blocks=bm.num_used_blocks + bm.num_used_host_blocks,
            num_started_jobs=len(bm.device_owners()) + len(bm.host_owners()),
        )


def check_output(
    scheduler: SkipJoinMLFQScheduler,
    output: SchedulerOutput,
    before: Snapshot,
    running_before: set[str],
) -> None:
    """Structural checks on a plan, made before its results are applied."""
    bm = scheduler.block_manager
    ids = check_scheduled_items(scheduler, output)
    assert ids == scheduled_ids(output)
    for item in output.scheduled:
        # Its KV is on the device: swapped back in before it runs again.
        assert bm.has_blocks(item.request_id) and not bm.is_on_host(item.request_id)

    swapped_out = [swap.request_id for swap in output.swap_out]
    swapped_in = [swap.request_id for swap in output.swap_in]
    assert len(swapped_out) == len(set(swapped_out))
    assert len(swapped_in) == len(set(swapped_in))
    host_ids = [h for swap in output.swap_out for _, h in swap.block_pairs]
    assert len(host_ids) == len(set(host_ids))
    assert all(0 <= h < bm.num_host_blocks for h in host_ids)
    for swap in output.swap_out:
        assert [device for device, _ in swap.block_pairs] == before.tables[swap.request_id]
        assert swap.request_id in swapped_in or bm.is_on_host(swap.request_id)
    out_pairs = {swap.request_id: swap.block_pairs for swap in output.swap_out}
    for swap in output.swap_in:
        if swap.request_id in out_pairs:
            # Evicted and fitted again in the same plan: the engine copies out, then in.
            assert [h for h, _ in swap.block_pairs] == [h for _, h in out_pairs[swap.request_id]]
        else:
            assert before.host_blocks.get(swap.request_id) == swap.num_blocks
        assert [device for _, device in swap.block_pairs] == (
            list(bm.block_ids(swap.request_id))[: swap.num_blocks]
        )
        if swap.request_id not in ids:
            assert not output.swap_out, "prefetch in a round that swapped out"
    for request_id in set(ids) & set(swapped_out):
        assert request_id in swapped_in
    for request_id in before.host_blocks:
        if request_id in ids:
            assert request_id in swapped_in

    # Recomputation only when the host tier could not take the victim.
    host_room = before.num_free_host_blocks - sum(
        swap.num_blocks for swap in output.swap_out if swap.blocking
    )
    for request_id in recompute_victims(scheduler, before):
        num_blocks = len(before.tables[request_id])
        assert num_blocks > host_room, (
            f"{request_id} recomputed though the host had room for its {num_blocks} blocks"
        )
        if request_id in ids:  # evicted, then fitted again later in the same plan
            assert output.scheduled[ids.index(request_id)].start_position == 0
        else:
            assert not bm.has_blocks(request_id) and not bm.is_on_host(request_id)
            assert scheduler.requests[request_id].num_computed_tokens == 0

    # Proactive offload stops once free + pending blocks cover the reserve, or when the
    # host tier cannot take the next candidate.
    idle_resident = [r for r in bm.device_owners() if r not in ids]
    if bm.num_free_blocks + bm.num_pending_blocks < scheduler.reserve_blocks and idle_resident:
        assert any(bm.num_device_blocks_of(r) > bm.num_free_host_blocks for r in idle_resident)

    # Preempted: it ran in the last step and does not now; its KV stays (or moves tiers).
    assert set(output.preempted_ids) == running_before - set(ids)
    for request_id in output.preempted_ids:
        assert scheduler.requests[request_id].status == RequestStatus.PREEMPTED


def recompute_victims(scheduler: SkipJoinMLFQScheduler, before: Snapshot) -> set[str]:
    """Jobs that held device KV and lost it to recomputation in this plan."""
    return {
        request_id for request_id in before.tables
        if scheduler.requests[request_id].num_preemptions > before.num_preemptions[request_id]
    }


def check_priority(
    scheduler: SkipJoinMLFQScheduler,
    output: SchedulerOutput,
    before: Snapshot,
    work_conserving: bool = False,
) -> None:
    """No job that fit waits while a job of a strictly lower queue runs.

    What ``schedule()`` promises: phase 1 visits jobs in priority order and gives each
    its chunk if its blocks are free (evicting lower idle jobs if need be); it stops at
    the first job without device KV that cannot get blocks, after which only jobs that
    hold KV are tried, in priority order. So when a job ``W`` waits while a job of a
    lower queue runs:

    * ``W`` held device KV (and was not evicted this step): it was tried and its chunk
      needed blocks that were not free. Checked: its largest chunk's new blocks exceed
      the blocks free at the start minus everything the scheduled jobs took.
    * otherwise some job ``B`` at or ahead of ``W`` without device KV stopped phase 1: it
      was evicted this step, or the blocks it needs (its host blocks reused) exceed
      the blocks free at the start minus what the jobs ahead of it took, or it holds no
      KV at all and starting it would take the blocks of started jobs (both tiers) past
      the pool outside the reserve, or the jobs holding KV already number
      ``max_started_jobs``.

    Both bounds only err towards excusing a wait, never towards accusing one. With
    ``work_conserving`` the same explanation is also required of every waiting job when
    the plan left room in the batch and the budget (phase 1 then never stopped early).
    """
    bm, config = scheduler.block_manager, scheduler.config
    scheduled = {item.request_id: item for item in output.scheduled}
    has_room = (len(scheduled) < config.max_batch_size
                and output.num_batched_tokens < config.max_num_batched_tokens)
    if not scheduled and not (work_conserving and has_room):
        return
    # Levels do not change between the promotions at the start of schedule() and here.
    level = {request_id: scheduler.level_of(request_id) for request_id in scheduler.requests}
    rank = {job.request.request_id: i for i, job in enumerate(scheduler._priority_order())}
    lowest_running = max((level[r] for r in scheduled), default=-1)
    # Device blocks each scheduled job took (a recomputed victim fitted again may have
    # given back more than it took: counted as 0, which only excuses more).
    taken = {r: max(0, len(item.block_ids) - len(before.tables.get(r, ())))
             for r, item in scheduled.items()}
    evicted = {swap.request_id for swap in output.swap_out if swap.blocking}
    evicted |= recompute_victims(scheduler, before)

    def largest_chunk_end(request_id: str) -> int:
        chunk = min(before.uncomputed[request_id], config.max_num_batched_tokens)
        return before.computed[request_id] + chunk

    def surely_fit(request_id: str) -> bool:
        """A job without device KV whose blocks were free when phase 1 reached it."""
        if request_id in evicted:
            return False
        needed = max(before.host_blocks.get(request_id, 0),
                     bm.blocks_for_tokens(largest_chunk_end(request_id)))
        ahead = sum(taken[r] for r in scheduled if rank[r] < rank[request_id])
        if request_id not in before.host_blocks:
            if before.num_started_blocks + ahead + needed > (
                    bm.num_blocks - scheduler.reserve_blocks):
                return False  # the start gate: started work must fit the device pool
            started_ahead = sum(1 for r in scheduled if rank[r] < rank[request_id]
                                and r not in before.tables and r not in before.host_blocks)
            if before.num_started_jobs + started_ahead >= scheduler.max_started_jobs:
                return False  # the start gate: enough jobs hold KV
        return needed <= before.num_free_blocks - ahead

    waiting = [r for r in scheduler.requests if r not in scheduled]
    for request_id in waiting:
        if level[request_id] >= lowest_running and not (work_conserving and has_room):
            continue
        lower = [r for r in scheduled if level[r] > level[request_id]]
        if request_id in before.tables and request_id not in evicted:
            needed = bm.blocks_for_tokens(largest_chunk_end(request_id)) - len(
                before.tables[request_id])
            assert needed > before.num_free_blocks - sum(taken.values()), (
                f"{request_id} (Q{level[request_id]}) holds KV and its chunk needed "
                f"{needed} new blocks of {before.num_free_blocks} free, yet waits "
                f"(lower queues running: {lower})"
            )
        else:
            blockers = [r for r in waiting if rank[r] <= rank[request_id]
                        and (r not in before.tables or r in evicted)]
            assert not all(surely_fit(r) for r in blockers), (
                f"{request_id} (Q{level[request_id]}) waits (lower queues running: "
                f"{lower}), but every job without KV at or ahead of it ({blockers}) had "
                f"its blocks free"
            )


def check_state(scheduler: SkipJoinMLFQScheduler) -> None:
    """Invariants between steps: accounting, queues and requests agree."""
    bm = scheduler.block_manager
    bm.check_invariants()
    assert sum(scheduler.queue_lengths()) == len(scheduler.requests)
    assert (scheduler.num_running + scheduler.num_waiting + scheduler.num_preempted
            == len(scheduler.requests))
    assert scheduler.num_running <= scheduler.config.max_batch_size
    assert set(bm.owners()) <= set(scheduler.requests)
    for request_id, request in scheduler.requests.items():
        assert 0 <= scheduler.level_of(request_id) < scheduler.options.num_queues
        assert not request.is_finished
        assert request.num_output_tokens < request.sampling.max_tokens
        covered = request.num_computed_tokens
        if bm.has_blocks(request_id):
            assert bm.num_device_blocks_of(request_id) == bm.blocks_for_tokens(covered)
        elif bm.is_on_host(request_id):
            assert bm.num_host_blocks_of(request_id) == bm.blocks_for_tokens(covered)
        else:
            assert covered == 0


def check_finished(driver: Driver, requests: Iterable[Request]) -> None:
    """Every request finished once, with exactly ``max_tokens`` outputs; nothing leaked."""
    expected = sorted(r.request_id for r in requests)
    finished_ids = [r.request_id for r in driver.finished]
    assert len(finished_ids) == len(set(finished_ids)), "a request finished twice"
    assert sorted(finished_ids) == expected
    for request in driver.finished:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == [
            sampled_token(request.request_id, k) for k in range(request.sampling.max_tokens)
        ]
    bm = driver.bm
    bm.commit_pending()
    bm.check_invariants()
    assert bm.owners() == []
    assert bm.num_free_blocks == bm.num_blocks, "device blocks leaked"
    assert bm.num_free_host_blocks == bm.num_host_blocks, "host blocks leaked"
    assert driver.scheduler.queue_lengths() == [0] * driver.scheduler.options.num_queues


# -- construction ------------------------------------------------------------------------


def test_needs_a_cost_model() -> None:
    config = SchedulerConfig(policy="skip_join_mlfq")
    with pytest.raises(ValueError, match="cost model"):
        create_scheduler(config, BlockManager(8, 4))


def test_quanta_grow_geometrically() -> None:
    driver = Driver(base_quantum_s=0.01, quantum_ratio=3.0, num_queues=3)
    assert driver.scheduler.quanta_s == pytest.approx([0.01, 0.03, 0.09])
    assert driver.scheduler.policy_name == "skip_join_mlfq"


def test_empty_scheduler_plans_nothing() -> None:
    driver = Driver()
    output = driver.step()
    assert output.is_empty and not output.swap_out and not output.swap_in


# -- skip-join ---------------------------------------------------------------------------


def test_join_level_follows_the_estimated_prefill_time() -> None:
    driver = Driver()  # quanta 10, 20, 40, 80 ms
    driver.add(
        make_request("short", num_prompt_tokens=5),  # 5 ms
        make_request("medium", num_prompt_tokens=15),  # 15 ms
        make_request("long", num_prompt_tokens=30),  # 30 ms: skips Q0 and Q1
        make_request("huge", num_prompt_tokens=200, max_tokens=2),  # past every quantum
    )
    levels = [driver.level(r) for r in ("short", "medium", "long", "huge")]
    assert levels == [0, 1, 2, 3]
    assert driver.scheduler.queue_lengths() == [1, 1, 1, 1]


def test_short_prompt_runs_before_a_long_one_that_arrived_first() -> None:
    driver = Driver(max_batch_size=1)
    driver.add(make_request("long", 30, max_tokens=2), make_request("short", 5, max_tokens=2))
    assert scheduled_ids(driver.step()) == ["short"]
    assert scheduled_ids(driver.step()) == ["short"]
    assert scheduled_ids(driver.step()) == ["long"]
    driver.run_to_completion()
    assert [r.request_id for r in driver.finished] == ["short", "long"]


# -- demotion ----------------------------------------------------------------------------


def test_demotion_after_the_quantum_is_used_up() -> None:
    driver = Driver()  # quanta 10, 20, 40, 80 ms
    request = make_request("a", num_prompt_tokens=2, max_tokens=40)
    driver.add(request)
    levels = []
    for _ in range(30):
        driver.step(step_time_s=0.003)
        levels.append(driver.level("a"))
    # Attained service passes 10 ms after 4 steps of 3 ms, 20 ms after 7 more, 40 after 14.
    assert levels[:4] == [0, 0, 0, 1]
    assert levels[4:11] == [1] * 6 + [2]
    assert levels[11:25] == [2] * 13 + [3]
    assert levels[25:] == [3] * 5  # the last queue keeps it
    assert driver.scheduler.num_demotions == 3
    driver.run_to_completion()
    check_finished(driver, [request])


def test_no_demotion_without_a_measured_step_time() -> None:
    driver = Driver()
    driver.add(make_request("a", max_tokens=8))
    for _ in range(5):
        output = driver.scheduler.schedule()
        sampled = {item.request_id: 1 for item in output.scheduled}
        driver.scheduler.update_from_output(output, sampled)
    assert driver.level("a") == 0 and driver.scheduler.num_demotions == 0


def test_demoted_job_yields_to_a_job_of_the_higher_queue() -> None:
    driver = Driver(max_batch_size=1)  # Q0 quantum 10 ms
    first, second = make_request("first", 2, max_tokens=8), make_request("second", 2, 8)
    driver.add(first, second)
    outputs = driver.run(6, step_time_s=0.004)
    # first uses up 10 ms in 3 steps and drops to Q1; second (still Q0) takes over.
    assert [scheduled_ids(o) for o in outputs[:4]] == [["first"]] * 3 + [["second"]]
    assert outputs[3].preempted_ids == ("first",)
    # Preempted with its KV kept: no recomputation, no swap.
    assert driver.bm.has_blocks("first") and first.num_computed_tokens == 4
    assert first.num_preemptions == 0
    driver.run_to_completion()
    check_finished(driver, [first, second])


# -- starvation --------------------------------------------------------------------------


def test_starved_job_is_promoted_to_the_top_queue_and_runs() -> None:
    # Quanta 5, 50, 500 ms; the long job joins Q2 and the short one sinks to Q1.
    driver = Driver(num_blocks=128, max_batch_size=1, base_quantum_s=0.005,
                    quantum_ratio=10.0, num_queues=3, starvation_threshold_s=0.020)
    short, long = make_request("short", 3, max_tokens=60), make_request("long", 100, 2)
    driver.add(short, long)
    assert driver.level("long") == 2
    outputs = driver.run(20)  # t = 0 .. 19 ms
    assert all(scheduled_ids(o) == ["short"] for o in outputs)
    assert driver.level("short") == 1 and driver.scheduler.num_promotions == 0
    output = driver.step()  # t = 20 ms: long has waited the threshold
    assert driver.scheduler.num_promotions == 1
    assert scheduled_ids(output) == ["long"] and output.preempted_ids == ("short",)
    assert driver.bm.has_blocks("short")  # preempted, KV kept
    driver.run_to_completion()
    check_finished(driver, [short, long])


def test_a_promoted_job_is_promoted_once_and_keeps_its_place() -> None:
    # A long Q0 quantum keeps the short job ahead; the promoted job waits behind it in
    # Q0, keeping its place: it is not promoted again (a new place at the back of Q0
    # every threshold would let later arrivals pass it).
    driver = Driver(num_blocks=128, block_size=16, max_batch_size=1, base_quantum_s=0.050,
                    quantum_ratio=10.0, num_queues=3, starvation_threshold_s=0.010)
    short, long = make_request("short", 3, max_tokens=45), make_request("long", 600, 2)
    driver.add(short, long)
    assert driver.level("long") == 2
    promotions = []
    for _ in range(45):
        output = driver.step()
        promotions.append(driver.scheduler.num_promotions)
        assert scheduled_ids(output) == ["short"]
    # The step at t = 10 ms promotes (step k runs at t = k ms); none after.
    assert [k for k in range(1, 45) if promotions[k] > promotions[k - 1]] == [10]
    assert driver.level("long") == 0
    driver.run_to_completion()
    check_finished(driver, [short, long])


# -- preemption at iteration boundaries --------------------------------------------------


def test_short_arrival_preempts_a_long_job_at_the_next_iteration() -> None:
    driver = Driver(max_batch_size=2)
    long1, long2 = make_request("long1", 30, max_tokens=12), make_request("long2", 30, 12)
    driver.add(long1, long2)
    driver.run(4)  # both prefilled and decoding; the batch is full
    assert driver.running == {"long1", "long2"}
    computed, table = long2.num_computed_tokens, list(driver.bm.block_ids("long2"))
    short = make_request("short", 4, max_tokens=3)
    driver.add(short)
    output = driver.step()
    assert scheduled_ids(output) == ["short", "long1"]
    assert output.preempted_ids == ("long2",)
    # long2 keeps its KV where it is: no recomputation and no swap.
    assert long2.status == RequestStatus.PREEMPTED and long2.num_preemptions == 0
    assert list(driver.bm.block_ids("long2")) == table and not output.swap_out
    driver.run(2)
    assert short.is_finished
    output = driver.step()
    resumed = {item.request_id: item for item in output.scheduled}["long2"]
    assert resumed.start_position == computed and resumed.num_tokens == 1
    driver.run_to_completion()
    check_finished(driver, [long1, long2, short])


# -- two tiers: eviction, recompute, offload, prefetch ----------------------------------


def test_a_new_job_waits_for_free_blocks_instead_of_evicting_started_work() -> None:
    # FastServe would swap long out (blocking the forward) to start short at once; here
    # arrivals start only in free blocks, so started work is never moved or dropped
    # for them (the thrashing the A100-profile simulator showed in overload).
    driver = Driver(num_blocks=8, num_host_blocks=16, max_batch_size=1)
    long = make_request("long", 24, max_tokens=4)  # Q2; 7 of 8 blocks after a decode
    driver.add(long)
    driver.run(2)
    short = make_request("short", 8, max_tokens=2)  # Q0; needs 2 blocks, 1 is free
    driver.add(short)
    output = driver.step()
    assert scheduled_ids(output) == ["long"] and not output.swap_out
    driver.run_to_completion()
    check_finished(driver, [long, short])
    assert driver.scheduler.num_swap_outs == driver.scheduler.num_recomputations_total == 0


def test_an_arrival_never_recomputes_started_work() -> None:
    driver = Driver(num_blocks=8, num_host_blocks=4, max_batch_size=1)
    long = make_request("long", 24, max_tokens=4)  # 7 blocks: more than the host holds
    driver.add(long)
    driver.run(2)
    short = make_request("short", 8, max_tokens=2)
    driver.add(short)
    driver.run_to_completion()
    check_finished(driver, [long, short])
    assert long.num_preemptions == 0 and driver.scheduler.num_recomputed_tokens_total == 0


def test_started_work_must_fit_the_device_pool_for_a_new_job_to_start() -> None:
    # 16 blocks, reserve 4: started work may hold 12. a (Q2, 7 blocks) and b (Q0, 3)
    # hold 10; c (Q1) needs 3 and 6 are free, and it ranks above a, yet it waits: 13 > 12.
    driver = Driver(num_blocks=16, num_host_blocks=32, max_batch_size=2,
                    kv_reserve_fraction=0.25)
    a, b = make_request("a", 24, max_tokens=12), make_request("b", 8, max_tokens=12)
    driver.add(a, b)
    driver.run(2)
    bm = driver.bm
    assert (driver.level("a"), driver.level("b")) == (2, 0)
    assert bm.num_used_blocks + bm.num_used_host_blocks == 10 and bm.num_free_blocks == 6
    c = make_request("c", 12, max_tokens=2)
    driver.add(c)
    assert driver.level("c") == 1
    output = driver.step()
    assert scheduled_ids(output) == ["b", "a"] and not output.swap_out
    driver.run_to_completion()
    check_finished(driver, [a, b, c])


def test_proactive_offload_keeps_the_reserve_free() -> None:
    # 16 blocks, reserve 4: idle stays resident while busy grows into the reserve.
    driver = Driver(num_blocks=16, num_host_blocks=32, max_batch_size=1,
                    kv_reserve_fraction=0.25)
    assert driver.scheduler.reserve_blocks == 4
    idle = make_request("idle", 24, max_tokens=4)  # Q2, 6 blocks
    driver.add(idle)
    driver.step()
    busy = make_request("busy", 8, max_tokens=20)  # Q0, grows to 7 blocks
    driver.add(busy)
    for _ in range(20):
        output = driver.step()
        if output.swap_out:
            break
    assert scheduled_ids(output) == ["busy"]
    (swap,) = output.swap_out
    assert swap.request_id == "idle" and not swap.blocking  # may overlap the forward
    assert driver.bm.num_free_blocks < 4  # its blocks are pending during this step
    assert driver.bm.num_free_blocks + driver.bm.num_pending_blocks >= 4
    driver.step()
    assert driver.bm.num_free_blocks >= 4
    driver.run_to_completion()
    check_finished(driver, [idle, busy])
    assert idle.num_preemptions == 0


def test_offload_takes_the_largest_estimated_next_scheduled_time_first() -> None:
    # 10 ms per prompt token; quanta 15, 30, 60, 120 ms. 12 blocks of 2 tokens, reserve 3.
    driver = Driver(num_blocks=12, block_size=2, num_host_blocks=32, max_batch_size=1,
                    base_quantum_s=0.015, kv_reserve_fraction=0.25,
                    profile=PrefillProfile(((1, 0.01), (2, 0.02))))
    q3, q1, busy = make_request("q3", 8, 2), make_request("q1", 2, 3), make_request("busy", 1, 16)
    driver.add(q3)
    driver.step()
    driver.add(q1)
    driver.step()
    driver.add(busy)
    assert [driver.level(r) for r in ("q3", "q1", "busy")] == [3, 1, 0]
    # busy grows until fewer than 3 blocks are free. Both others are idle and resident;
    # with busy (Q0) and q1 (Q1) ahead, q3's next turn is the later one: it goes, alone.
    for _ in range(20):
        output = driver.step()
        if output.swap_out:
            break
    assert [(s.request_id, s.blocking) for s in output.swap_out] == [("q3", False)]
    assert scheduled_ids(output) == ["busy"] and driver.bm.has_blocks("q1")
    driver.run_to_completion()
    check_finished(driver, [q3, q1, busy])


def test_swapped_out_job_bigger_than_the_reserve_allows_is_not_stranded() -> None:
    # 4 device blocks, reserve 2. long (3 blocks) is offloaded while short runs. Prefetch
    # never brings it back (3 + 2 > 4); it must come back when it is selected.
    driver = Driver(num_blocks=4, num_host_blocks=4, max_batch_size=1,
                    base_quantum_s=0.005, quantum_ratio=10.0, num_queues=3,
                    kv_reserve_fraction=0.5)
    long, short = make_request("long", 9, max_tokens=3), make_request("short", 2, 2)
    driver.add(long)
    driver.step()
    driver.add(short)
    driver.run_to_completion(max_steps=30)
    check_finished(driver, [long, short])


def test_starvation_promotion_and_recompute_do_not_livelock() -> None:
    # No host tier; each job needs the whole pool at the end. Quantum 1 ms, two queues,
    # starvation after 5 ms, 3 ms steps. Once a and b recomputed each other forever: the
    # starvation-promoted one evicted the other, dropped back a queue after one step,
    # and its victim, now ahead in the same queue, evicted it in turn.
    driver = Driver(num_blocks=5, block_size=2, max_batch_size=1, max_num_batched_tokens=4,
                    base_quantum_s=0.001, quantum_ratio=1.0, num_queues=2,
                    starvation_threshold_s=0.005)
    a, b = make_request("a", 1, max_tokens=9), make_request("b", 1, max_tokens=9)
    driver.add(a, b)
    for _ in range(200):
        if not driver.scheduler.has_unfinished():
            break
        driver.step(step_time_s=0.003)
    check_finished(driver, [a, b])


# -- property tests ----------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(2, 12))
    capacity = block_size * num_blocks
    requests = []
    for i in range(draw(st.integers(1, 8))):
        num_prompt_tokens = draw(st.integers(1, max(1, capacity - 1)))
        requests.append({
            "request_id": f"r{i}",
            "num_prompt_tokens": num_prompt_tokens,
            "max_tokens": draw(st.integers(1, max(1, capacity - num_prompt_tokens))),
            "arrival_step": draw(st.integers(0, 10)),
        })
    return {
        "block_size": block_size,
        "num_blocks": num_blocks,
        "num_host_blocks": draw(st.integers(0, 16)),
        "max_batch_size": draw(st.integers(1, 4)),
        "max_num_batched_tokens": draw(st.integers(1, 16)),
        "base_quantum_s": draw(st.integers(1, 20)) / 1000,
        "quantum_ratio": draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])),
        "num_queues": draw(st.integers(1, 4)),
        "starvation_threshold_s": draw(st.integers(5, 200)) / 1000,
        "kv_reserve_fraction": draw(st.sampled_from([0.0, 0.1, 0.25, 0.5])),
        "max_started_factor": draw(st.sampled_from([1.0, 2.0, 100.0])),
        "step_times_s": draw(st.lists(st.integers(1, 20), min_size=1, max_size=8).map(
            lambda halves_ms: [n / 2000 for n in halves_ms])),
        "requests": requests,
    }


def run_workload(workload: dict) -> Driver:
    """Arrivals at their steps, then step until done within a bound; check every step
    (the priority property in its work-conserving form included) and the end state."""
    config = {k: v for k, v in workload.items() if k not in ("requests", "step_times_s")}
    driver = Driver(**config, work_conserving=True)
    specs, step_times_s = workload["requests"], workload["step_times_s"]
    last_arrival = max(spec["arrival_step"] for spec in specs)
    # Work lost to recomputation is redone, but not forever: each job's work can be lost
    # about once per turn of another job (with tiny pools, 1-token budgets and
    # starvation every few steps), so the bound is quadratic; a livelock still exceeds it.
    total_tokens = sum(s["num_prompt_tokens"] + s["max_tokens"] for s in specs)
    max_steps = 4 * (last_arrival + total_tokens) * len(specs) + 50
    requests: list[Request] = []
    num_steps = 0
    while num_steps <= last_arrival or driver.scheduler.has_unfinished():
        assert num_steps < max_steps, f"not finished after {num_steps} steps"
        for spec in specs:
            if spec["arrival_step"] == num_steps:
                request = make_request(spec["request_id"], spec["num_prompt_tokens"],
                                       spec["max_tokens"])
                requests.append(request)
                driver.add(request)
        driver.step(step_times_s[num_steps % len(step_times_s)])
        num_steps += 1
    check_finished(driver, requests)
    return driver


def _workload(requests: list[tuple[str, int, int, int]], **config: object) -> dict:
    workload: dict = {
        "block_size": 4, "num_blocks": 8, "num_host_blocks": 0, "max_batch_size": 1,
        "max_num_batched_tokens": 64, "base_quantum_s": 0.01, "quantum_ratio": 2.0,
        "num_queues": 4, "starvation_threshold_s": 0.2, "kv_reserve_fraction": 0.0,
        "max_started_factor": 100.0,
        "step_times_s": [0.001],
    }
    workload.update(config)
    workload["requests"] = [
        {"request_id": r, "num_prompt_tokens": p, "max_tokens": m, "arrival_step": a}
        for r, p, m, a in requests
    ]
    return workload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The scenarios of the fixed bugs above: a swapped-out job charged twice, the ping-pong.
@example(_workload([("long", 24, 4, 0), ("short", 8, 2, 2)], num_host_blocks=16))
@example(_workload([("long", 9, 3, 0), ("short", 2, 2, 1)], num_blocks=4, num_host_blocks=4,
                   base_quantum_s=0.005, quantum_ratio=10.0, num_queues=3,
                   kv_reserve_fraction=0.5))
@example(_workload([("a", 11, 5, 0), ("b", 15, 5, 1), ("c", 7, 5, 2)], num_blocks=7,
                   num_host_blocks=22, max_batch_size=2, base_quantum_s=0.005,
                   starvation_threshold_s=0.003))
@example(_workload([("a", 1, 9, 0), ("b", 1, 9, 0)], block_size=2, num_blocks=5,
                   max_num_batched_tokens=4, base_quantum_s=0.001, quantum_ratio=1.0,
                   num_queues=2, starvation_threshold_s=0.005, step_times_s=[0.003]))
@given(workload=workloads())
def test_random_workloads_finish_in_priority_order(workload: dict) -> None:
    run_workload(workload)


# -- demotion only where a job is expected to outlast a new one -------------------------


def test_residual_life_of_clustered_and_heavy_tailed_lengths() -> None:
    from preemptserve.core.scheduler.service import OutputLengthHistory

    clustered = OutputLengthHistory(min_samples=4)
    for n in (98, 100, 100, 102):
        clustered.observe(n)
    assert clustered.mean_residual_tokens(0) == 100
    assert clustered.mean_residual_tokens(50) == 50
    assert not clustered.expects_longer_than_new(50)
    assert clustered.expects_longer_than_new(200)  # longer than any seen
    heavy = OutputLengthHistory(min_samples=4)
    for n in (2, 2, 2, 400):
        heavy.observe(n)
    assert heavy.expects_longer_than_new(3)  # past the short ones: only the long remains
    assert OutputLengthHistory(min_samples=4).expects_longer_than_new(10)  # nothing known


@pytest.mark.parametrize("lengths, demoted", [([40] * 32, False), ([1] * 28 + [200] * 4, True)])
def test_demotion_follows_the_finished_lengths(lengths: list[int], demoted: bool) -> None:
    driver = Driver(max_batch_size=1)
    for n in lengths:
        driver.scheduler.output_lengths.observe(n)
    job = make_request("job", 12, max_tokens=30)  # Q1 (12 ms prefill): quantum 20 ms
    driver.add(job)
    assert driver.level("job") == 1
    driver.run(25)  # 25 ms of service, 24 tokens: past the quantum
    assert (driver.level("job") == 2) == demoted
    assert driver.scheduler.num_demotions_declined == (0 if demoted else 1)


def test_new_jobs_wait_once_enough_jobs_hold_kv() -> None:
    # Batch 1, factor 2: two jobs may hold KV; a third waits although blocks are free.
    driver = Driver(max_batch_size=1, max_started_factor=2.0)
    a, b, c = (make_request(r, 4, max_tokens=30) for r in "abc")
    driver.add(a)
    driver.run(3)
    driver.add(b, c)
    driver.run(30)
    assert driver.bm.has_blocks("a") and driver.bm.has_blocks("b")
    assert not driver.bm.has_blocks("c") and driver.bm.num_free_blocks > 8
    driver.run_to_completion()
    check_finished(driver, [a, b, c])
