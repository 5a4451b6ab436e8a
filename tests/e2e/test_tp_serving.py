"""Through Triton with tensor_parallel_size=2 on the CPU (gloo).

- A mixed workload that forces preemption and KV offload gives the same greedy text with
  TP=2 as with TP=1.
- Unloading the model, and stopping the server, leave no process of the model behind.
- A worker rank killed with SIGKILL ends the in-flight request with an error; under
  explicit model control with ``unload_model_on_failure`` the model then unloads itself,
  so its ready endpoint says no. (Without it the model stays loaded and rejects every
  request: tests/engine/test_tp_engine.py checks that part on the serving loop.)
- A head count that TP does not divide fails the load with a clear message.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from stream_client import StreamError, stream_generate
from test_preemption import metric_sum, write_repository

from preemptserve import processes
from preemptserve.triton_server import TritonServer, TritonServerError

EXPLICIT = ("--model-control-mode=explicit", "--load-model=llm")
MAX_BATCH = 3
NUM_LONG, LONG_TOKENS, NUM_SHORT, SHORT_TOKENS = 4, 64, 3, 8
# 12 blocks of 16 tokens (512 KiB each, summed over the ranks): long jobs outgrow them,
# so the short jobs that overtake them push their KV to host memory.
WORKLOAD_PARAMETERS = {
    "scheduler_policy": "skip_join_mlfq",
    "max_batch_size": str(MAX_BATCH),
    "kv_cache_bytes": str(12 * 2**19),
    "kv_cache_host_memory_bytes": str(64 * 2**19),
    "mlfq_base_quantum_ms": "10",
}


def wait_gone(pids: set[int], timeout_s: float = 20.0) -> set[int]:
    return processes.wait_gone(pids, timeout_s)


def model_processes(server: TritonServer) -> set[int]:
    """The Python stub of the model and everything it started (worker ranks)."""
    pids = processes.descendants(server.pid)
    assert len(pids) >= 2, "expected the stub and at least one worker rank"
    return pids


def worker_pids(server: TritonServer) -> list[int]:
    return [
        p
        for p in model_processes(server)
        if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]


def run_mixed(server: TritonServer) -> dict[str, str]:
    """Long requests fill the batch; short ones arrive while they stream."""
    results: dict[str, str] = {}
    num_streaming = 0
    lock = threading.Lock()
    batch_full = threading.Event()

    def run(name: str, prompt: str, num_tokens: int) -> None:
        nonlocal num_streaming
        text = ""
        stream = stream_generate(
            server.grpc_url,
            "llm",
            prompt,
            num_tokens,
            min_length=num_tokens,
            exclude_input_in_output=True,
        )
        for index, delta in enumerate(stream):
            text += delta
            if index == 0 and name.startswith("long"):
                with lock:
                    num_streaming += 1
                    if num_streaming == MAX_BATCH:
                        batch_full.set()
        results[name] = text

    with ThreadPoolExecutor(NUM_LONG + NUM_SHORT) as pool:
        futures = [
            pool.submit(run, f"long{i}", f"Long story number {i}", LONG_TOKENS)
            for i in range(NUM_LONG)
        ]
        assert batch_full.wait(120), "the long requests never filled the batch"
        futures += [
            pool.submit(run, f"short{i}", f"Short {i}", SHORT_TOKENS) for i in range(NUM_SHORT)
        ]
        for future in futures:
            future.result()
    return results


@pytest.fixture(scope="module")
def mixed_results(tmp_path_factory):
    results = {}
    for tp in (1, 2):
        repo = write_repository(
            tmp_path_factory.mktemp(f"tp{tp}"),
            {**WORKLOAD_PARAMETERS, "tensor_parallel_size": str(tp)},
        )
        with TritonServer(repo, ready_timeout_s=300) as server:
            texts = run_mixed(server)
            results[tp] = (
                texts,
                {
                    name: metric_sum(server.metrics_url, name)
                    for name in ("preemptserve_swaps_total", "preemptserve_preemptions_total")
                },
            )
    return results


def test_tp2_gives_tp1_greedy_text_under_preemption_and_offload(mixed_results):
    tp1, _ = mixed_results[1]
    tp2, metrics = mixed_results[2]
    assert metrics["preemptserve_preemptions_total"] > 0
    assert metrics["preemptserve_swaps_total"] > 0
    assert len(tp2) == NUM_LONG + NUM_SHORT and all(tp2.values())
    assert tp2 == tp1


@pytest.fixture
def explicit_tp2_server(tmp_path):
    repo = write_repository(
        tmp_path,
        {
            "tensor_parallel_size": "2",
            "kv_cache_bytes": str(64 * 2**19),
            "scheduler_policy": "fcfs",
            "unload_model_on_failure": "true",
        },
    )
    with TritonServer(repo, extra_args=EXPLICIT, ready_timeout_s=300) as server:
        yield server


def test_unload_and_server_stop_leave_no_model_processes(explicit_tp2_server):
    server = explicit_tp2_server
    first = model_processes(server)
    assert worker_pids(server)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.unload_model("llm")
        assert wait_gone(first) == set(), "unloading left processes behind"
        client.load_model("llm")
        assert client.is_model_ready("llm")
    second = model_processes(server)
    assert not second & first
    os.kill(server.pid, signal.SIGTERM)  # the server alone, as a supervisor would
    deadline = time.monotonic() + 60
    while server.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.is_running()
    assert wait_gone(second) == set(), "stopping the server left processes behind"


def test_dead_rank_fails_the_request_and_the_model_unloads_itself(explicit_tp2_server):
    server = explicit_tp2_server
    everything = model_processes(server)
    (worker,) = worker_pids(server)
    stream = stream_generate(server.grpc_url, "llm", "A long story", 400, min_length=400)
    with pytest.raises(StreamError, match=r"rank 1 .*SIGKILL"):
        for index, _ in enumerate(stream):
            if index == 2:
                os.kill(worker, signal.SIGKILL)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        deadline = time.monotonic() + 30
        while client.is_model_ready("llm") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.is_model_ready("llm"), "the model still says it is ready"
        assert client.is_server_live()
    assert wait_gone(everything) == set()


def test_head_count_not_divisible_fails_the_load_with_the_reason(tmp_path):
    repo = write_repository(tmp_path, {"tensor_parallel_size": "3"})
    with pytest.raises(TritonServerError, match=r"tensor_parallel_size=3 does not divide"):
        with TritonServer(repo, ready_timeout_s=120):
            pass
