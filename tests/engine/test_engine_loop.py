"""The serving loop: every request gets exactly one final output, whatever happens."""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict

import pytest

from preemptserve.config import CacheConfig, EngineConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine, RequestOutput
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
