"""Through Triton: under skip_join_mlfq short requests overtake a burst of long ones.

A burst of long requests fills the batch; short requests arrive once the long ones are
streaming. Under ``fcfs`` the short ones wait for the head of the line; under
``skip_join_mlfq`` they run at the next iteration boundary, and the long jobs' KV is
offloaded to host memory to make room. Outputs are the same under both policies.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from stream_client import stream_generate

from preemptserve.bench.server import write_repository  # the other e2e tests import it here
from preemptserve.triton_server import TritonServer

NUM_LONG, LONG_TOKENS = 6, 240
NUM_SHORT, SHORT_TOKENS = 4, 8
MAX_BATCH = 4
# 64 blocks of 16 tokens (512 KiB each): a full batch of long jobs grows to 4 x 16 blocks,
# so the idle long jobs skip_join_mlfq keeps resident must move to host memory.
PARAMETERS = {
    "max_batch_size": str(MAX_BATCH),
    "kv_cache_bytes": str(64 * 2**19),
    "kv_cache_host_memory_bytes": str(128 * 2**19),
    "mlfq_base_quantum_ms": "20",
}


def metric_sum(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def run_burst(server: TritonServer) -> dict[str, tuple[float, str]]:
    """Long burst first; short ones once a full batch of long ones streams.

    Returns each request's finish time and text.
    """
    results: dict[str, tuple[float, str]] = {}
    lock = threading.Lock()
    num_streaming = 0
    batch_full = threading.Event()

    def run(name: str, prompt: str, num_tokens: int) -> None:
        nonlocal num_streaming
        text = ""
        stream = stream_generate(server.grpc_url, "llm", prompt, num_tokens,
                                 min_length=num_tokens, exclude_input_in_output=True)
        for index, delta in enumerate(stream):
            text += delta
            if index == 0 and name.startswith("long"):
                with lock:
                    num_streaming += 1
                    if num_streaming == MAX_BATCH:
                        batch_full.set()
        results[name] = (time.monotonic(), text)

    with ThreadPoolExecutor(NUM_LONG + NUM_SHORT) as pool:
        futures = [pool.submit(run, f"long{i}", f"Long story number {i}", LONG_TOKENS)
                   for i in range(NUM_LONG)]
        assert batch_full.wait(120), "the long requests never filled the batch"
        futures += [pool.submit(run, f"short{i}", f"Short {i}", SHORT_TOKENS)
                    for i in range(NUM_SHORT)]
        for future in futures:
            future.result()
    return results


@pytest.fixture(scope="module")
def burst_results(tmp_path_factory):
    results = {}
    for policy in ("fcfs", "skip_join_mlfq"):
        repo = write_repository(tmp_path_factory.mktemp(policy),
                                {**PARAMETERS, "scheduler_policy": policy})
        with TritonServer(repo, ready_timeout_s=300) as server:
            results[policy] = (run_burst(server),
                               metric_sum(server.metrics_url, "preemptserve_swaps_total"))
    return results


def finish_order(results: dict[str, tuple[float, str]]) -> tuple[float, float]:
    last_short = max(t for name, (t, _) in results.items() if name.startswith("short"))
    first_long = min(t for name, (t, _) in results.items() if name.startswith("long"))
    return last_short, first_long


def test_short_requests_overtake_long_ones_only_under_mlfq(burst_results):
    fcfs, _ = burst_results["fcfs"]
    mlfq, mlfq_swaps = burst_results["skip_join_mlfq"]
    last_short, first_long = finish_order(mlfq)
    assert last_short < first_long, "under skip_join_mlfq every short job ends first"
    last_short, first_long = finish_order(fcfs)
    assert last_short > first_long, "under fcfs short jobs wait behind the long burst"
    assert mlfq_swaps > 0


def test_outputs_do_not_depend_on_the_policy(burst_results):
    fcfs, _ = burst_results["fcfs"]
    mlfq, _ = burst_results["skip_join_mlfq"]
    assert {k: text for k, (_, text) in fcfs.items()} == {
        k: text for k, (_, text) in mlfq.items()}
