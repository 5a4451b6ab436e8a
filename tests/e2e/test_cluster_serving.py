"""Through Triton with ``num_instances=2``: two engine instances as Ray actors behind the
``llm`` model, requests moved live between them while they stream.

``migrate_out_threshold=-1e9`` makes every busy instance a source and every empty one a
destination, so a request in flight moves whenever the other instance is idle: streams
cross several migrations. Each test checks what a client sees (the text of an unmoved
run, exactly; errors where due) and what the model reports (its metrics).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from stream_client import StreamError, stream_generate
from test_serving import metric_values, post_json, sse_events, wait_until

from preemptserve.bench.server import write_repository
from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.iteration_stats import read_iteration_log
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.processes import descendants, is_alive, wait_gone
from preemptserve.triton_server import TritonServer, TritonServerError

pytest.importorskip("ray")

EXPLICIT = ("--model-control-mode=explicit", "--load-model=llm")
KV_BYTES = 64 * 2**20
PARAMETERS = {
    "num_instances": "2",
    "scheduler_policy": "fcfs",
    "kv_cache_bytes": str(KV_BYTES),
    "kv_cache_host_memory_bytes": "0",
    "dispatch_policy": "round_robin",
    "migrate_out_threshold": "-1e9",
    "migration_last_stage_max_blocks": "2",
}
PROMPT = "Once upon a time, in a land far away, there lived"


def reference(prompt: str, sampling: SamplingParams) -> str:
    """The text of an unmoved run: one engine in this process, the same model."""
    engine = LLMEngine(EngineConfig(device="cpu", scheduler=SchedulerConfig(policy="fcfs"),
                                    cache=CacheConfig(kv_cache_bytes=KV_BYTES)))
    try:
        return engine.generate([prompt], sampling)[0]
    finally:
        engine.shutdown()


def committed(server: TritonServer) -> float:
    samples = metric_values(server.metrics_url, "preemptserve_migrations_total")
    return sum(v for k, v in samples.items() if 'status="committed"' in k)


def instance_pids(log_file: Path) -> list[int]:
    match = re.search(r"engine instances \((.*?)\), policy", log_file.read_text())
    assert match, "the model did not log its instances"
    return [int(pid) for pid in re.findall(r"pid (\d+)", match.group(1))]


def ray_temp_dir() -> str:
    """A private Ray directory with a short path (Ray's socket paths must stay short)."""
    return tempfile.mkdtemp(prefix="psray", dir="/tmp")


def cluster(repo: Path, log_file: Path, extra_args=()) -> TritonServer:
    # Stopping a cluster takes a few seconds (the instances, then Ray): wait for it.
    return TritonServer(repo, log_file=log_file, extra_args=extra_args, ready_timeout_s=300,
                        exit_timeout_s=60)


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    ray_dir = ray_temp_dir()
    repo = write_repository(root, {**PARAMETERS, "ray_temp_dir": ray_dir,
                                   "iteration_stats_path": str(root / "iterations.jsonl")})
    try:
        with cluster(repo, root / "tritonserver.log") as server:
            server.iteration_logs = [root / f"iterations-instance{i}.jsonl" for i in range(2)]
            yield server
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def stream_text(server: TritonServer, prompt: str, max_tokens: int, **sampling) -> str:
    return "".join(stream_generate(server.grpc_url, "llm", prompt, max_tokens,
                                   exclude_input_in_output=True, **sampling))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 40, "random_seed": 7}],
                         ids=["greedy", "seeded"])
def test_grpc_streams_survive_migrations(cluster_server, sampling):
    before = committed(cluster_server)
    params = SamplingParams(max_tokens=120, min_length=120,
                            temperature=sampling.get("temperature", 0.0),
                            top_k=sampling.get("top_k", 0), seed=sampling.get("random_seed"))
    expected = reference(PROMPT, params)
    got = stream_text(cluster_server, PROMPT, 120, min_length=120, **sampling)
    assert got == expected
    assert committed(cluster_server) > before, "no migration happened during the stream"


def test_concurrent_streams_on_both_instances_survive_migrations(cluster_server):
    prompts = [f"{PROMPT} {i}" for i in range(3)]
    params = SamplingParams(max_tokens=80, min_length=80)
    expected = [reference(p, params) for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, stream_text(cluster_server, prompts[i], 80, min_length=80))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [results.get(i) for i in range(3)] == expected


def test_http_generate_stream_survives_migrations(cluster_server):
    before = committed(cluster_server)
    expected = reference(PROMPT, SamplingParams(max_tokens=100, min_length=100))
    status, body = post_json(
        f"{cluster_server.http_url}/v2/models/llm/generate_stream",
        {"text_input": PROMPT, "max_tokens": 100, "min_length": 100,
         "exclude_input_in_output": True})
    assert status == 200, body
    assert "".join(event["text_output"] for event in sse_events(body)) == expected
    assert committed(cluster_server) > before


def test_each_instance_logs_its_own_iterations(cluster_server):
    def sampled() -> list[int]:
        # (a log is flushed when its instance goes idle, also when a move emptied it)
        return [sum(r.num_sampled_tokens for r in read_iteration_log(path))
                if path.exists() else 0 for path in cluster_server.iteration_logs]

    before = sampled()
    assert stream_text(cluster_server, PROMPT, 60, min_length=60)
    wait_until(lambda: sum(sampled()) - sum(before) == 60, 30,
               "both instances' logs to hold the 60 tokens of the stream")
    # the stream moved between the instances: both logged some of its steps
    after = sampled()
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    for path in cluster_server.iteration_logs:
        records = list(read_iteration_log(path))
        assert [r.iteration for r in records] == list(range(len(records)))


def test_cancel_during_migrations_frees_every_block(cluster_server):
    stream = stream_generate(cluster_server.grpc_url, "llm", PROMPT, 400, min_length=400)
    before = committed(cluster_server)
    for _ in stream:
        if committed(cluster_server) > before:
            break  # cancels the request (the stream closes), moving or not
    stream.close()

    def idle() -> bool:
        used = metric_values(cluster_server.metrics_url, "preemptserve_kv_blocks")
        return next(v for k, v in used.items() if 'state="used"' in k) == 0

    wait_until(idle, 30, "every KV block back")
    assert stream_text(cluster_server, "still serving", 5)


@pytest.fixture
def explicit_cluster_server(tmp_path):
    ray_dir = ray_temp_dir()
    repo = write_repository(tmp_path, {**PARAMETERS, "enable_migration": "false",
                                       "ray_temp_dir": ray_dir})
    try:
        with cluster(repo, tmp_path / "tritonserver.log", EXPLICIT) as server:
            yield server
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_dead_instance_fails_its_requests_others_serve_and_unload_leaves_nothing(
        explicit_cluster_server, tmp_path):
    server = explicit_cluster_server
    everything = descendants(server.pid)
    pids = instance_pids(tmp_path / "tritonserver.log")
    assert len(pids) == 2 and all(pid in everything for pid in pids)
    # Round robin: the first request goes to instance 0, whose process dies mid-stream.
    stream = stream_generate(server.grpc_url, "llm", PROMPT, 400, min_length=400)
    with pytest.raises(StreamError, match=r"instance 0 failed"):
        for index, _ in enumerate(stream):
            if index == 3:
                os.kill(pids[0], signal.SIGKILL)
    for i in range(3):  # the other instance serves every later request
        assert stream_text(server, f"after the failure {i}", 8, min_length=8)
    alive_count = metric_values(server.metrics_url, "preemptserve_instances")
    assert next(v for k, v in alive_count.items() if 'state="alive"' in k) == 1
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready("llm")
        client.unload_model("llm")
    left = wait_gone(everything, timeout_s=60)
    assert left == set(), f"unloading left processes behind: {sorted(left)}"
    assert not is_alive(pids[1])


def test_sigterm_to_the_server_group_stops_the_cluster_in_order(tmp_path):
    """TritonServer.stop() signals the whole process group, the stub included, as Ctrl-C
    or a process manager would. The stub ignores SIGTERM (tritonserver owns the
    shutdown); Ray's driver handler, installed by ray.init, must not change that, or
    ``finalize`` is cut short by SystemExit and the stub crashes in Ray's handler."""
    ray_dir = ray_temp_dir()
    log = tmp_path / "tritonserver.log"
    repo = write_repository(tmp_path, {**PARAMETERS, "enable_migration": "false",
                                       "ray_temp_dir": ray_dir})
    try:
        with cluster(repo, log) as server:
            everything = descendants(server.pid)
            assert stream_text(server, PROMPT, 4)
        text = log.read_text()
        assert "successfully unloaded 'llm'" in text
        assert "SystemExit" not in text and "AbslFailureSignalHandler" not in text, text[-3000:]
        assert wait_gone(everything, timeout_s=30) == set()
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def instances_by_state(server: TritonServer) -> dict[str, float]:
    samples = metric_values(server.metrics_url, "preemptserve_instances")
    return {re.search(r'state="(\w+)"', k).group(1): v for k, v in samples.items()}


def scaling_events(server: TritonServer) -> dict[str, float]:
    samples = metric_values(server.metrics_url, "preemptserve_scaling_events_total")
    return {re.search(r'action="(\w+)"', k).group(1): v for k, v in samples.items()}


@pytest.mark.slow
def test_auto_scaling_adds_an_instance_under_load_and_stops_it_when_idle(tmp_path):
    """enable_scaling from one instance, at most two: up while any request is in
    (freeness below 1e6), down once idle (infinite freeness), after 1 s each. A long
    stream is the load; a stream sent once the second instance serves (the freest: it
    takes it) gives the unmoved text; the metrics show the instances' states and the
    scaling actions; the stopped instance's freeness is NaN."""
    ray_dir = ray_temp_dir()
    repo = write_repository(tmp_path, {
        **PARAMETERS, "num_instances": "1", "dispatch_policy": "load",
        "migrate_out_threshold": "3", "enable_scaling": "true", "max_instances": "2",
        "scale_up_threshold": "1e6", "scale_down_threshold": "2e6",
        "scaling_interval_s": "1", "ray_temp_dir": ray_dir})
    # The reference first: the server's instances then have the machine's cores.
    expected = reference(PROMPT, SamplingParams(max_tokens=60, min_length=60))
    try:
        with cluster(repo, tmp_path / "tritonserver.log") as server:
            assert instances_by_state(server) == {"alive": 1, "starting": 0, "draining": 0,
                                                  "total": 1}
            texts: dict[str, str] = {}
            first = threading.Thread(target=lambda: texts.__setitem__(
                "first", stream_text(server, PROMPT, 300, min_length=300)))
            first.start()
            wait_until(lambda: instances_by_state(server)["alive"] == 2, 120,
                       "a second instance serving")
            assert scaling_events(server) == {"add": 1}
            assert stream_text(server, PROMPT, 60, min_length=60) == expected
            first.join(300)
            assert texts["first"]  # (its text is checked by the tests above)
            wait_until(lambda: scaling_events(server).get("stop") == 1, 60,
                       "the idle instance drained and stopped")
            assert instances_by_state(server) == {"alive": 1, "starting": 0, "draining": 0,
                                                  "total": 1}
            assert scaling_events(server) == {"add": 1, "drain": 1, "stop": 1}
            # The stopped instance's series cannot be deleted: NaN.
            freeness = metric_values(server.metrics_url, "preemptserve_instance_freeness")
            assert [math.isnan(v) for k, v in sorted(freeness.items())] == [False, True]
            assert stream_text(server, "still serving", 5)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_the_instance_count_and_its_limits_are_checked(tmp_path):
    repo = write_repository(tmp_path, {**PARAMETERS, "num_instances": "0"})
    server = TritonServer(repo, log_file=tmp_path / "log", ready_timeout_s=120)
    with pytest.raises(TritonServerError):
        with server:
            pass
    assert "num_instances must be >= 1" in (tmp_path / "log").read_text()

