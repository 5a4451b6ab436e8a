"""The serving loop: every request gets exactly one final output, whatever happens."""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict

import pytest

from preemptserve.config import CacheConfig, EngineConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.engine.outputs import RequestOutput
from preemptserve.serving.engine_loop import EngineLoop


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[tuple[RequestOutput, str | None]]] = defaultdict(list)
        self.done = defaultdict(threading.Event)
        self.threads: set[str] = set()

    def callback(self, name: str, fail_after: int | None = None):
        def on_output(output: RequestOutput, error: str | None) -> None:
            self.threads.add(threading.current_thread().name)
            self.outputs[name].append((output, error))
            if output.finished:
                self.done[name].set()
            if fail_after is not None and len(self.outputs[name]) >= fail_after:
                raise ConnectionError("client went away")

        return on_output

    def wait(self, name: str, timeout_s: float = 60.0) -> list[tuple[RequestOutput, str | None]]:
        assert self.done[name].wait(timeout_s), f"{name} never finished"
        finals = [o for o, _ in self.outputs[name] if o.finished]
        assert len(finals) == 1, f"{name} got {len(finals)} final outputs"
        return self.outputs[name]


@pytest.fixture(scope="module")
def engine(default_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(default_model_dir), device="cpu",
                                  cache=CacheConfig(kv_cache_bytes=64 * 2**20)))


@pytest.fixture
def loop(engine):
    loop = EngineLoop(engine, cancellation_check_period_s=0.01)
    loop.start()
    yield loop
    loop.shutdown()
    assert loop.num_in_flight == 0  # every request left the table with its final output
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()


def test_results_errors_and_cancellation(loop):
    got = Collector()
    loop.submit("The value of", SamplingParams(max_tokens=5, min_length=5), got.callback("ok"))
    loop.submit("x", SamplingParams(max_tokens=10**6), got.callback("too_long"))
    cancelled = threading.Event()
    loop.submit("A long one", SamplingParams(max_tokens=1000, min_length=1000),
                got.callback("cancel"), is_cancelled=cancelled.is_set)
    outputs = got.wait("ok")
    assert sum(len(o.token_ids) for o, _ in outputs) == 5
    assert outputs[-1][0].finish_reason == "length"
    (output, error), = got.wait("too_long")
    assert output.finish_reason == "error" and "maximum context" in error
    cancelled.set()
    outputs = got.wait("cancel")
    assert outputs[-1][0].finish_reason == "abort"
    assert got.threads == {"response-sender"}


def test_failing_callback_cancels_its_request_only(loop):
    got = Collector()
    request_id = loop.submit("Broken pipe", SamplingParams(max_tokens=500, min_length=500),
                             got.callback("broken", fail_after=2))
    loop.submit("Fine", SamplingParams(max_tokens=4, min_length=4), got.callback("fine"))
    assert len(got.wait("fine")) == 4
    got.wait("broken")  # the abort after the failure still delivers the final output
    assert request_id


def test_cancel_after_the_final_output_does_nothing_and_leaks_nothing(loop):
    got = Collector()
    request_id = loop.submit("Short", SamplingParams(max_tokens=2, min_length=2),
                             got.callback("a"), is_cancelled=lambda: True)
    got.wait("a")  # ended one way or the other (the poll may have cancelled it)
    sent = len(got.outputs["a"])
    loop.cancel(request_id)
    loop.cancel(request_id)
    loop.cancel("never-submitted")
    # Cancels and submissions share one inbox: once this one ends, the cancels were seen.
    loop.submit("Next", SamplingParams(max_tokens=2, min_length=2), got.callback("b"))
    assert got.wait("b")[-1][0].finish_reason == "length"
    assert len(got.outputs["a"]) == sent
    assert loop.num_in_flight == 0


def test_cancelled_before_it_starts_ends_once_with_abort(loop):
    got = Collector()
    loop.submit("Already gone", SamplingParams(max_tokens=1000, min_length=1000),
                got.callback("a"), is_cancelled=lambda: True)
    assert got.wait("a")[-1][0].finish_reason == "abort"
    assert loop.num_in_flight == 0


def test_a_failing_cancellation_poll_leaves_the_request_running(loop):
    def broken() -> bool:
        raise ConnectionError("stub went away")

    got = Collector()
    loop.submit("Still served", SamplingParams(max_tokens=20, min_length=20),
                got.callback("a"), is_cancelled=broken)
    outputs = got.wait("a")
    assert sum(len(o.token_ids) for o, _ in outputs) == 20
    assert outputs[-1][0].finish_reason == "length"
    loop.submit("And the next", SamplingParams(max_tokens=2, min_length=2), got.callback("b"))
    assert got.wait("b")[-1][0].finish_reason == "length"


class GatedEngine:
    """The engine, whose steps wait for ``gate``: the loop thread can be held mid-step."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.stepping = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self):
        self.stepping.set()
        assert self.gate.wait(60)
        return self._engine.step()


def test_shutdown_ends_every_submission_exactly_once(engine):
    gated = GatedEngine(engine)
    loop = EngineLoop(gated)  # type: ignore[arg-type]
    loop.start()
    got = Collector()
    loop.submit("In the engine", SamplingParams(max_tokens=50, min_length=50), got.callback("a"))
    assert gated.stepping.wait(60)
    names = [f"r{i}" for i in range(5)]
    for name in names:  # the loop thread is held in its step: these stay in the inbox
        loop.submit(f"Request {name}", SamplingParams(max_tokens=5), got.callback(name))
    assert loop.num_in_flight == 6 and loop.num_queued == 6  # "a" is not scheduled yet
    stopper = threading.Thread(target=loop.shutdown)
    stopper.start()
    while not loop._stop.is_set():
        threading.Event().wait(0.001)
    gated.gate.set()
    stopper.join(60)
    for name in ["a", *names]:
        output, error = got.wait(name, timeout_s=0)[-1]
        assert output.finish_reason == "error" and "shutting down" in error, name
    assert all(len(got.outputs[name]) == 1 for name in names)  # never reached the engine
    assert loop.num_in_flight == 0
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


def test_a_broken_loop_fails_its_requests_and_reports_the_failure(engine):
    failures: list[str] = []

    def on_stats(stats) -> None:
        raise RuntimeError("metrics are broken")

    loop = EngineLoop(engine, on_stats=on_stats, on_failure=failures.append)
    loop.start()
    got = Collector()
    loop.submit("Doomed", SamplingParams(max_tokens=1000, min_length=1000), got.callback("a"))
    output, error = got.wait("a")[-1]
    assert output.finish_reason == "error" and "internal error in the serving loop" in error
    assert failures == ["internal error in the serving loop"]
    assert loop.failure == "internal error in the serving loop"
    loop.submit("Later", SamplingParams(max_tokens=2), got.callback("b"))
    output, error = got.wait("b")[-1]
    assert output.finish_reason == "error" and "unhealthy" in error
    loop.shutdown()
    assert loop.num_in_flight == 0
    assert engine.block_manager.num_used_blocks == 0


def test_shutdown_fails_requests_in_flight(engine):
    loop = EngineLoop(engine)
    loop.start()
    got = Collector()
    loop.submit("Never ends", SamplingParams(max_tokens=1500, min_length=1500), got.callback("a"))
    while not got.outputs["a"]:
        threading.Event().wait(0.01)
    loop.shutdown()
    output, error = got.wait("a")[-1]
    assert output.finish_reason == "error" and "shutting down" in error
    assert engine.block_manager.num_used_blocks == 0


def test_iteration_stats_log_has_one_line_per_step(engine, tmp_path):
    from preemptserve.engine.iteration_stats import read_iteration_log

    path = tmp_path / "iterations.jsonl"
    loop = EngineLoop(engine, iteration_stats_path=str(path))
    loop.start()
    got = Collector()
    loop.submit("Count the steps", SamplingParams(max_tokens=6, min_length=6), got.callback("a"))
    loop.submit("and these", SamplingParams(max_tokens=3, min_length=3), got.callback("b"))
    got.wait("a")
    got.wait("b")
    loop.shutdown()
    records = list(read_iteration_log(path))
    assert [r.iteration for r in records] == list(
        range(records[0].iteration, records[0].iteration + len(records)))
    assert sum(r.num_sampled_tokens for r in records) == 9
    assert sum(r.num_decode_tokens for r in records) == 9 - 2
    assert records[-1].num_unfinished == 0 and records[0].num_prefill_tokens > 0
    assert all(r.step_s > 0 for r in records)
    assert all(b.start_s >= a.start_s + a.step_s for a, b in itertools.pairwise(records))
