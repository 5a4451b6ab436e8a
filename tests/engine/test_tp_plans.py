"""Plans to tensor-parallel workers carry only what changed, and rebuild exactly.

The codec is checked on every plan of simulated runs of each policy (preemptions, swaps,
recomputations, requests leaving); the sizes on a real TP=2 engine.
"""

from __future__ import annotations

import pickle

import pytest
from engine_helpers import swapping_simulation
from test_tp_engine import assert_no_workers_left, make_engine

from preemptserve.core.request import SamplingParams
from preemptserve.core.scheduler import (
    BlockSwap,
    ScheduledRequest,
    SchedulerOutput,
    available_policies,
)
from preemptserve.engine.tp_plan import PlanDecoder, PlanEncoder


def send(encoder: PlanEncoder, decoder: PlanDecoder, output: SchedulerOutput) -> int:
    data = pickle.dumps(encoder.encode(output), protocol=pickle.HIGHEST_PROTOCOL)
    assert decoder.decode(pickle.loads(data)) == output
    assert decoder.tables == encoder.tables
    return len(data)


@pytest.mark.parametrize("policy", available_policies())
def test_every_plan_of_a_simulated_run_is_rebuilt_exactly(policy):
    sim = swapping_simulation(policy, seed=3)
    encoder, decoder = PlanEncoder(), PlanDecoder()
    seen = {"plans": 0, "preempted": 0, "finished": 0, "delta": 0, "whole": 0}
    schedule = sim.scheduler.schedule

    def checked_schedule() -> SchedulerOutput:
        output = schedule()
        delta_bytes = send(encoder, decoder, output)
        seen["plans"] += 1
        seen["preempted"] += len(output.preempted_ids)
        seen["finished"] += len(output.finished_ids)
        seen["delta"] += delta_bytes
        seen["whole"] += len(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
        return output

    sim.scheduler.schedule = checked_schedule
    result = sim.run()
    assert result.num_preemptions > 0 and seen["preempted"] > 0
    assert seen["finished"] > 0
    checked_schedule()  # one more plan tells of the last requests to finish
    assert not encoder.tables, "mirrors of requests that left were kept"
    assert seen["delta"] < seen["whole"] / 2


def item(request_id, tokens, start, table, sample=True, hidden=False) -> ScheduledRequest:
    return ScheduledRequest(request_id, tuple(tokens), start, tuple(table), sample, hidden)


def test_tables_replaced_shrunk_or_reused_are_sent_whole():
    encoder, decoder = PlanEncoder(), PlanDecoder()
    plans = [
        SchedulerOutput(0, (item("a", range(20), 0, [4, 5, 6], sample=False),
                            item("h", range(40), 0, [9, 10], hidden=True))),
        SchedulerOutput(1, (item("a", [7], 20, [4, 5, 6, 8]),
                            item("h", [3], 40, [9, 10], hidden=True))),
        # "a" swapped out: its mirror goes on both sides.
        SchedulerOutput(2, (item("h", [3], 41, [9, 10], hidden=True),),
                        preempted_ids=("a",), swap_out=(BlockSwap("a", ((4, 0), (5, 1))),)),
        # ... and comes back in other blocks, scheduled at once.
        SchedulerOutput(3, (item("a", [2], 21, [1, 2, 3, 0]),),
                        swap_in=(BlockSwap("a", ((0, 1), (1, 2))),)),
        # A table that changed without any id telling (an id used again): sent whole.
        SchedulerOutput(4, (item("h", [1], 0, [2], hidden=False),), finished_ids=("a",)),
        SchedulerOutput(5, (item("h", [1], 0, [2, 9]),)),
        SchedulerOutput(6, (), finished_ids=("h",)),
    ]
    for output in plans:
        send(encoder, decoder, output)
    assert not encoder.tables and not decoder.tables


def test_a_worker_without_the_mirror_refuses_a_delta():
    encoder = PlanEncoder()
    encoder.encode(SchedulerOutput(0, (item("a", range(8), 0, [1]),)))
    message = encoder.encode(SchedulerOutput(1, (item("a", [5], 8, [1, 2]),)))
    with pytest.raises(RuntimeError, match="mirrors diverged"):
        PlanDecoder().decode(message)


def test_decode_plan_bytes_do_not_grow_with_context(default_model_dir):
    """A TP=2 engine decoding a long request: each step's plan stays the same size while
    the request's block table grows from 8 to 64 blocks (the whole table would grow)."""
    engine = make_engine(default_model_dir, 2, "fcfs", num_blocks=80)
    plan_bytes: dict[int, int] = {}
    whole_bytes: dict[int, int] = {}
    schedule = engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        output = schedule()
        for it in output.scheduled:
            if not it.is_prefill:
                whole_bytes[it.context_len] = len(
                    pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
        return output

    engine.scheduler.schedule = recording_schedule
    try:
        prompt = [1] + [11 + i % 97 for i in range(55)]
        engine.add_request("long", prompt, SamplingParams(max_tokens=460, min_length=460))
        while engine.has_unfinished_requests():
            engine.step()
            request = engine.scheduler.requests.get("long")
            if request is not None and request.num_output_tokens > 1:
                plan_bytes[request.num_tokens - 1] = engine.executor.plan_stats.last_bytes
    finally:
        engine.shutdown()
    assert_no_workers_left()
    short, long = plan_bytes[64], plan_bytes[512]
    print(f"\nplan bytes at context 64 / 512: whole {whole_bytes[64]} / {whole_bytes[512]}, "
          f"delta {short} / {long}")  # docs/tensor_parallel.md quotes these (-s shows them)
    # Larger positions pickle in a byte or two more; the table adds nothing.
    assert long - short <= 4, (short, long)
    assert whole_bytes[512] - whole_bytes[64] >= 2 * (512 - 64) // 8  # what it was before
    steady = [plan_bytes[n] for n in range(60, 515) if n % 8 != 1 and n in plan_bytes]
    assert max(steady) - min(steady) <= 4
