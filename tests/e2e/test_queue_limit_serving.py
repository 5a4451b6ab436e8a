"""Through Triton: ``max_queue_size`` refuses requests beyond the queue at once.

Two long requests fill the batch (``max_batch_size`` 2, ``fcfs``: nothing preempts them),
then a burst of short ones arrives. ``max_queue_size`` of them are accepted and wait; the
rest get an error response at once, while the long ones still run, and are counted by
``preemptserve_requests_rejected_total{reason="queue_full"}``. Once the long ones are
cancelled the accepted ones run, and each output equals the same request run alone.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from stream_client import StreamError, stream_generate
from test_preemption import write_repository
from test_serving import metric_values, post_json, wait_until

from preemptserve.triton_server import TritonServer

MAX_BATCH, MAX_QUEUE, NUM_BURST, SHORT_TOKENS = 2, 2, 6, 8
LONG_TOKENS = 2000  # never reached: cancelled once the burst is checked
FULL_MESSAGE = f"request rejected: the queue is full (max_queue_size={MAX_QUEUE}); retry later"
PARAMETERS = {
    "scheduler_policy": "fcfs",
    "max_batch_size": str(MAX_BATCH),
    "max_queue_size": str(MAX_QUEUE),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = write_repository(tmp_path_factory.mktemp("queue_limit"), PARAMETERS)
    with TritonServer(repo, ready_timeout_s=300) as server:
        yield server


def gauge(server: TritonServer, name: str, label: str) -> float:
    return next(v for k, v in metric_values(server.metrics_url, name).items() if label in k)


def rejected_total(server: TritonServer) -> float:
    return gauge(server, "preemptserve_requests_rejected_total", 'reason="queue_full"')


def short(server: TritonServer, index: int) -> tuple[str, float, str | None]:
    """(text, seconds to the end or the error, error) of one short streamed request."""
    start = time.monotonic()
    stream = stream_generate(server.grpc_url, "llm", f"Burst request {index}", SHORT_TOKENS,
                             min_length=SHORT_TOKENS, exclude_input_in_output=True)
    try:
        text = "".join(stream)
    except StreamError as exc:
        return "", time.monotonic() - start, str(exc)
    return text, time.monotonic() - start, None


def test_a_burst_beyond_the_queue_is_refused_at_once(server):
    assert rejected_total(server) == 0  # registered before any rejection
    stop_long = threading.Event()
    started = [threading.Event() for _ in range(MAX_BATCH)]
    long_tokens = [0] * MAX_BATCH

    def run_long(i: int) -> None:
        stream = stream_generate(server.grpc_url, "llm", f"A long story {i}", LONG_TOKENS,
                                 min_length=LONG_TOKENS, exclude_input_in_output=True)
        for _ in stream:
            long_tokens[i] += 1
            started[i].set()
            if stop_long.is_set():
                stream.close()  # cancels the request
                break

    with ThreadPoolExecutor(MAX_BATCH + NUM_BURST) as pool:
        longs = [pool.submit(run_long, i) for i in range(MAX_BATCH)]
        try:
            for event in started:
                assert event.wait(60), "the long requests never started"
            wait_until(lambda: gauge(server, "preemptserve_requests", 'state="waiting"') == 0,
                       what="the long requests to leave the queue")
            burst = [pool.submit(short, server, i) for i in range(NUM_BURST)]
            num_refused = NUM_BURST - MAX_QUEUE
            wait_until(lambda: sum(f.done() for f in burst) >= num_refused, timeout_s=20,
                       what="the refusals")
            refused = [f.result() for f in burst if f.done()]
            assert len(refused) == num_refused, refused  # the others wait for room
            for text, seconds, error in refused:
                assert error is not None and FULL_MESSAGE in error, error
                assert text == "" and seconds < 10
            assert not any(f.done() for f in longs)  # refused while the batch was still busy
            # HTTP clients get the same refusal (Triton 24.10's generate endpoint answers
            # 400 whatever the error's code; the model says UNAVAILABLE).
            status, body = post_json(f"{server.http_url}/v2/models/llm/generate",
                                     {"text_input": "One more", "max_tokens": 4})
            assert status >= 400 and FULL_MESSAGE in json.loads(body)["error"], (status, body)
            wait_until(lambda: rejected_total(server) == num_refused + 1,
                       what="the rejection counter")
        finally:
            stop_long.set()
        for future in longs:
            future.result()
        assert all(0 < n < LONG_TOKENS for n in long_tokens)
        accepted = {i: f.result(timeout=60) for i, f in enumerate(burst)
                    if f.result(timeout=60)[2] is None}
    assert len(accepted) == MAX_QUEUE
    # The server keeps serving, and each accepted request equals its output alone.
    for i, (text, _, _) in accepted.items():
        alone, _, error = short(server, i)
        assert error is None and text == alone and text
    assert rejected_total(server) == NUM_BURST - MAX_QUEUE + 1
    wait_until(lambda: gauge(server, "preemptserve_kv_blocks", 'state="used"') == 0,
               what="every KV block to return")
