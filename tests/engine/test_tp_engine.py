"""Tensor parallelism on the CPU (gloo): TP=2 gives TP=1's tokens, faults end requests.

Every test that starts ranks checks that no worker process is left behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from engine_helpers import block_bytes, random_prompts, run_staggered

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.processes import is_alive
from preemptserve.serving.engine_loop import EngineLoop

BLOCK_SIZE = 8
MLFQ_OPTIONS = {"base_quantum_s": 0.005, "kv_reserve_fraction": 0.15}


def make_engine(
    model_dir,
    tp: int,
    policy: str,
    num_blocks: int,
    num_host_blocks: int = 0,
    max_batch_size: int = 3,
) -> LLMEngine:
    block = block_bytes(model_dir, BLOCK_SIZE)
    return LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            device="cpu",
            tensor_parallel_size=tp,
            scheduler=SchedulerConfig(
                policy=policy,
                max_batch_size=max_batch_size,
                max_num_batched_tokens=64,
                options=MLFQ_OPTIONS if policy == "skip_join_mlfq" else {},
            ),
            cache=CacheConfig(
                kv_cache_bytes=num_blocks * block,
                block_size=BLOCK_SIZE,
                host_kv_cache_bytes=num_host_blocks * block,
            ),
        )
    )


def assert_no_workers_left() -> None:
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "a worker rank outlived its engine"


def run_workload(
    model_dir,
    tp: int,
    policy: str,
    lengths=(30, 22, 45, 12, 37, 28, 9, 50),
    num_tokens: int = 24,
    **pools,
) -> tuple[dict, LLMEngine]:
    engine = make_engine(model_dir, tp, policy, **pools)
    try:
        prompts = random_prompts(1, list(lengths))
        return run_staggered(engine, prompts, num_tokens, arrive_every=2), engine
    finally:
        engine.shutdown()


def test_tp2_matches_tp1_with_preemption_and_offload(default_model_dir):
    tp1, _ = run_workload(default_model_dir, 1, "skip_join_mlfq", num_blocks=20, num_host_blocks=40)
    tp2, engine = run_workload(
        default_model_dir, 2, "skip_join_mlfq", num_blocks=20, num_host_blocks=40
    )
    assert engine.block_manager.num_blocks == 20, "the block count does not depend on TP"
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.scheduler.num_swap_outs > 0 and engine.scheduler.num_swap_ins > 0
    assert engine.swapper.stats.bytes_out > 0 and engine.swapper.stats.bytes_in > 0
    assert engine.executor.plan_stats.num_plans > 0
    assert tp2 == tp1
    assert_no_workers_left()


def test_gqa_tp2_matches_tp1_with_recomputation(gqa_model_dir):
    # 8 query heads and 2 KV heads: each rank holds 4 query heads sharing 1 KV head.
    workload = {"lengths": (30, 22, 45, 12, 37), "num_tokens": 16, "num_blocks": 10}
    tp1, _ = run_workload(gqa_model_dir, 1, "fcfs", **workload)
    tp2, engine = run_workload(gqa_model_dir, 2, "fcfs", **workload)
    assert engine.scheduler.num_recomputations_total > 0
    assert tp2 == tp1
    assert_no_workers_left()


def test_head_count_not_divisible_fails_before_starting_ranks(default_model_dir):
    with pytest.raises(
        ValueError,
        match=r"tensor_parallel_size=3 does not divide .*"
        r"num_attention_heads=8",
    ):
        make_engine(default_model_dir, 3, "fcfs", num_blocks=8)
    assert not multiprocessing.active_children()


def test_checkpoint_mismatch_fails_startup_and_stops_ranks(default_model_dir, tmp_path):
    for file in default_model_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] += 2  # still divisible by 2, no longer the weights' shape
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint does not match config.json: .*mlp"):
        make_engine(tmp_path, 2, "fcfs", num_blocks=8)
    assert_no_workers_left()


def test_dead_rank_fails_requests_then_rejects_new_ones(default_model_dir):
    engine = make_engine(default_model_dir, 2, "fcfs", num_blocks=64)
    (worker_pid,) = engine.executor.worker_pids
    failures: list[str] = []
    loop = EngineLoop(engine, on_failure=failures.append)
    loop.start()
    outputs: list[tuple[bool, str | None]] = []
    done = threading.Event()
    first_token = threading.Event()

    def on_output(output, error):
        outputs.append((output.finished, error))
        first_token.set()
        if output.finished:
            done.set()

    try:
        loop.submit(
            "Tell me a long story", SamplingParams(max_tokens=500, min_length=500), on_output
        )
        assert first_token.wait(60)
        os.kill(worker_pid, signal.SIGKILL)
        assert done.wait(30), "the in-flight request never ended"
        finished, error = outputs[-1]
        assert finished and error is not None and "rank 1" in error and "SIGKILL" in error
        assert failures and "rank 1" in failures[0]
        assert loop.failure is not None
        rejected = threading.Event()
        errors: list[str | None] = []
        loop.submit(
            "another",
            SamplingParams(max_tokens=4),
            lambda out, err: (errors.append(err), rejected.set()),
        )
        assert rejected.wait(10) and errors[0] and "unhealthy" in errors[0]
    finally:
        loop.shutdown()
    assert_no_workers_left()


WORKER_PIDS_OF_A_KILLED_DRIVER = """
import sys
from preemptserve.config import CacheConfig, EngineConfig
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.processes import is_alive
if __name__ == "__main__":
    engine = LLMEngine(EngineConfig(model_dir=sys.argv[1], device="cpu",
                                    tensor_parallel_size=2,
                                    cache=CacheConfig(kv_cache_bytes=8 * 2**20)))
    print(*engine.executor.worker_pids, flush=True)
    sys.stdin.read()  # until killed
"""


def test_workers_exit_when_the_driver_is_killed(default_model_dir, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(WORKER_PIDS_OF_A_KILLED_DRIVER)
    driver = subprocess.Popen(
        [sys.executable, str(script), str(default_model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        worker_pids = [int(pid) for pid in driver.stdout.readline().split()]
        assert worker_pids and all(is_alive(pid) for pid in worker_pids)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(pid) for pid in worker_pids), "a worker outlived its driver"


