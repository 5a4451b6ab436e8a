"""Through Triton under ``apt``: KV and hidden-cache requests in the same batches.

A small device pool and a burst of requests with long prompts: apt admits some in hidden
mode (half the blocks) next to KV-mode ones, and decode steps batch both. Every request's
greedy output equals its output when it runs alone (in KV mode, memory to spare).
Per-request SLOs arrive as request parameters.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from stream_client import StreamError, stream_generate
from test_preemption import metric_sum, write_repository

from preemptserve.core.cost_model import PrefillProfile
from preemptserve.triton_server import TritonServer

NUM_REQUESTS, NUM_TOKENS = 8, 32
# 16-token blocks of 512 KiB in KV mode: 24 blocks hold three ~100-token prompts in KV
# mode, or six in hidden mode (32 tokens per block).
PARAMETERS = {
    "scheduler_policy": "apt",
    "max_batch_size": "8",
    "kv_cache_bytes": str(24 * 2**19),
    "kv_cache_host_memory_bytes": str(96 * 2**19),
}


def prompt(i: int) -> str:
    return (f"Request {i} asks about the history of the library and its modules. "
            * 6).strip()


def complete(url: str, text: str, parameters: dict | None = None) -> str:
    stream = stream_generate(url, "llm", text, NUM_TOKENS, min_length=NUM_TOKENS,
                             exclude_input_in_output=True, parameters=parameters)
    return "".join(stream)


@pytest.fixture(scope="module")
def apt_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("apt")
    # A fixed profile, so that the modes apt picks do not depend on how busy the machine
    # is while the server measures itself.
    profile = root / "profile.json"
    PrefillProfile(((16, 0.01), (256, 0.1)), hidden_recompute_s_per_block=1e-4).save(profile)
    repo = write_repository(root, {**PARAMETERS, "prefill_profile_path": str(profile)})
    with TritonServer(repo, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def burst(apt_server):
    """Outputs of the concurrent burst, then of each request alone; metrics between."""
    url = apt_server.grpc_url
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        together = list(pool.map(lambda i: complete(url, prompt(i)), range(NUM_REQUESTS)))
    metrics = {name: metric_sum(apt_server.metrics_url, name) for name in (
        "preemptserve_cache_mode_tokens_total", "preemptserve_mixed_mode_iterations_total")}
    alone = [complete(url, prompt(i)) for i in range(NUM_REQUESTS)]
    return together, alone, metrics


def test_both_cache_modes_share_batches(burst):
    _, _, metrics = burst
    assert metrics["preemptserve_cache_mode_tokens_total"] > 0
    assert metrics["preemptserve_mixed_mode_iterations_total"] > 0


def test_outputs_match_each_request_run_alone(burst):
    together, alone, _ = burst
    assert all(len(text) > 0 for text in together)
    assert together == alone


def test_per_request_slo_parameters(apt_server):
    url = apt_server.grpc_url
    text = complete(url, prompt(0), parameters={"ttft_slo_ms": 100, "tbt_slo_ms": 20.5})
    assert text == complete(url, prompt(0))
    with pytest.raises(StreamError, match="ttft_slo_ms"):
        complete(url, prompt(0), parameters={"ttft_slo_ms": -1})
    # The server is unharmed.
    assert complete(url, prompt(1)) == complete(url, prompt(1))
