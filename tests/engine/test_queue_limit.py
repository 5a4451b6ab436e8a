"""Overload protection: ``max_queue_size`` bounds the requests waiting to start.

A request is waiting from the moment it is accepted until it is first scheduled
(``first_scheduled_time_s is None``); requests preempted after they started do not count.
``EngineLoop.submit`` refuses a request beyond the limit at once with ``QueueFullError``:
nothing of it reaches the engine, and every accepted request still finishes.
"""

from __future__ import annotations

import threading
import time

import pytest
from engine_helpers import make_engine
from test_engine_loop import Collector

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.serving.engine_loop import EngineLoop, QueueFullError

POLICIES = ("fcfs", "skip_join_mlfq", "apt")
LONG = 200  # tokens: long enough to keep the batch full while the test submits


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def assert_all_blocks_returned(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_used_host_blocks == 0
    bm.check_invariants()


@pytest.fixture(scope="module", params=POLICIES)
def policy_engine(request, default_model_dir, tmp_path_factory) -> LLMEngine:
    # A fixed profile: nothing to measure at startup for the policies that weigh costs.
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    PrefillProfile(((16, 0.01), (256, 0.1)), hidden_recompute_s_per_block=1e-4).save(profile)
    return LLMEngine(EngineConfig(
        model_dir=str(default_model_dir), device="cpu", prefill_profile_path=str(profile),
        scheduler=SchedulerConfig(policy=request.param, max_batch_size=2),
        cache=CacheConfig(kv_cache_bytes=32 * 2**20, host_kv_cache_bytes=32 * 2**20),
    ))


def test_a_burst_keeps_exactly_max_queue_size_and_every_accepted_request_finishes(
        policy_engine):
    engine = policy_engine
    loop = EngineLoop(engine, cancellation_check_period_s=0.01, max_queue_size=3)
    got = Collector()
    accepted, rejected = [], []
    # Submitted before the engine thread runs: all of them arrive while nothing started.
    for i in range(8):
        try:
            loop.submit(f"Burst request {i}", SamplingParams(max_tokens=6, min_length=6),
                        got.callback(f"r{i}"))
            accepted.append(f"r{i}")
        except QueueFullError as exc:
            assert str(exc) == ("request rejected: the queue is full (max_queue_size=3); "
                                "retry later")
            rejected.append(f"r{i}")
    assert accepted == ["r0", "r1", "r2"] and len(rejected) == 5
    assert loop.num_rejected_total == 5 and loop.num_queued == 3
    loop.start()
    try:
        for name in accepted:
            outputs = got.wait(name)
            assert [error for _, error in outputs] == [None] * 6
            assert sum(len(o.token_ids) for o, _ in outputs) == 6
            assert outputs[-1][0].finish_reason == "length"
        wait_for(lambda: loop.num_queued == 0, what="the queue to drain")
        assert not any(got.outputs[name] for name in rejected)  # never reached the engine
        # The server stays usable: the queue has room again.
        loop.submit("After the burst", SamplingParams(max_tokens=2, min_length=2),
                    got.callback("after"))
        assert got.wait("after")[-1][0].finish_reason == "length"
    finally:
        loop.shutdown()
    assert not engine.has_unfinished_requests()
    assert_all_blocks_returned(engine)


def test_running_requests_do_not_count_and_cancelled_ones_free_their_place(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64, max_batch_size=2)
    loop = EngineLoop(engine, cancellation_check_period_s=0.01, max_queue_size=2)
    loop.start()
    got = Collector()
    try:
        # Two long requests fill the batch (fcfs: nothing preempts them).
        for name in ("long0", "long1"):
            loop.submit(f"A long story {name}", SamplingParams(max_tokens=LONG, min_length=LONG),
                        got.callback(name))
        wait_for(lambda: got.outputs["long0"] and got.outputs["long1"], what="both to run")
        wait_for(lambda: loop.num_queued == 0, what="the started ones to leave the queue")
        cancelled = threading.Event()
        waiting_id = loop.submit("Waits 0", SamplingParams(max_tokens=3, min_length=3),
                                 got.callback("wait0"), is_cancelled=cancelled.is_set)
        loop.submit("Waits 1", SamplingParams(max_tokens=3, min_length=3), got.callback("wait1"))
        for i in range(3):
            with pytest.raises(QueueFullError, match=r"max_queue_size=2\)"):
                loop.submit(f"Over {i}", SamplingParams(max_tokens=3), got.callback(f"over{i}"))
        assert loop.num_rejected_total == 3
        assert not got.outputs["long0"][-1][0].finished  # still running: nothing drained
        # A waiting request that is cancelled gives its place back.
        loop.cancel(waiting_id)
        assert got.wait("wait0")[-1][0].finish_reason == "abort"
        wait_for(lambda: loop.num_queued == 1, what="the cancelled request to leave")
        loop.submit("Waits 2", SamplingParams(max_tokens=3, min_length=3), got.callback("wait2"))
        with pytest.raises(QueueFullError):
            loop.submit("Over again", SamplingParams(max_tokens=3), got.callback("over3"))
        for name in ("long0", "long1"):
            assert sum(len(o.token_ids) for o, _ in got.wait(name, 120)) == LONG
        for name in ("wait1", "wait2"):
            outputs = got.wait(name)
            assert sum(len(o.token_ids) for o, _ in outputs) == 3
            assert outputs[-1][0].finish_reason == "length"
        assert not any(got.outputs[f"over{i}"] for i in range(4))
        assert loop.num_rejected_total == 4
    finally:
        loop.shutdown()
    assert_all_blocks_returned(engine)


def test_preempted_requests_are_not_queued(default_model_dir):
    # 5 blocks of 16 tokens cannot hold two requests growing to ~35 tokens each: fcfs
    # preempts by recomputation, and the preempted request waits again in the scheduler.
    engine = make_engine(default_model_dir, num_blocks=5, max_batch_size=4)
    sampling = SamplingParams(max_tokens=30, min_length=30)
    for i in range(2):
        engine.add_request(str(i), f"Request number {i}", sampling)
    assert engine.num_queued_requests() == 2
    saw_preempted_waiting = False
    while engine.has_unfinished_requests():
        engine.step()
        engine.block_manager.check_invariants()
        requests = engine.scheduler.requests.values()
        assert engine.num_queued_requests() == sum(
            r.first_scheduled_time_s is None for r in requests)
        if engine.scheduler.num_preempted:
            saw_preempted_waiting = True  # it waits again, but not in the queue
    assert engine.scheduler.num_preemptions_total > 0
    assert saw_preempted_waiting, "no preempted request ever waited"
    assert engine.num_queued_requests() == 0
    assert_all_blocks_returned(engine)


def test_zero_is_unbounded_and_negative_is_rejected(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64, max_batch_size=2)
    with pytest.raises(ValueError, match="max_queue_size must be >= 0"):
        EngineLoop(engine, max_queue_size=-1)
    loop = EngineLoop(engine)
    got = Collector()
    for i in range(12):
        loop.submit(f"Unbounded {i}", SamplingParams(max_tokens=2, min_length=2),
                    got.callback(f"u{i}"))
    assert loop.num_queued == 12 and loop.num_rejected_total == 0
    loop.start()
    try:
        for i in range(12):
            assert got.wait(f"u{i}")[-1][0].finish_reason == "length"
    finally:
        loop.shutdown()
    assert_all_blocks_returned(engine)
