"""The load generator against a real ``tritonserver`` (e2e layer: starts a server)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from preemptserve.bench.loadgen import run_open_loop
from preemptserve.bench.metrics import summarize
from preemptserve.bench.prompts import PromptBuilder
from preemptserve.bench.server import policy_server, scrape_metrics, served_parameters
from preemptserve.bench.workload import RequestSpec, Workload
from preemptserve.engine.iteration_stats import read_log_when_idle

pytestmark = pytest.mark.e2e


def generated_tokens(metrics_url: str) -> float:
    metrics = scrape_metrics(metrics_url)
    return sum(v for k, v in metrics.items() if k.startswith("preemptserve_generated_tokens_total"))


def test_open_loop_requests_leave_on_time_with_exact_lengths(tmp_path: Path) -> None:
    # One long request first: later ones are scheduled while it still streams.
    specs = (
        RequestSpec(0, 0.0, 40, 60),
        RequestSpec(1, 0.3, 7, 5),
        RequestSpec(2, 0.6, 1, 3),
        RequestSpec(3, 0.6, 23, 1),
        RequestSpec(4, 0.9, 64, 9),
    )
    workload = Workload("e2e", specs)
    builder = PromptBuilder()
    prompts = builder.prompts([s.input_tokens for s in specs], seed=1)
    assert [len(builder.tokenizer.encode(p).ids) for p in prompts] == [40, 7, 1, 23, 64]
    log = tmp_path / "iterations.jsonl"
    params = {**served_parameters(), "scheduler_policy": "fcfs", "iteration_stats_path": str(log)}
    with policy_server(params, tmp_path, "fcfs") as server:
        timelines, facts = run_open_loop(server.grpc_url, workload, prompts, progress=False)
        # The engine publishes its counters when it goes idle, a moment after the last
        # response left: poll until they show every generated token.
        deadline = time.monotonic() + 10
        while generated_tokens(server.metrics_url) < 78 and time.monotonic() < deadline:
            time.sleep(0.1)
        # the server generated exactly the forced lengths (run_open_loop checks the stream too)
        assert generated_tokens(server.metrics_url) >= 60 + 5 + 3 + 1 + 9
    assert [t.output_tokens for t in timelines] == [60, 5, 3, 1, 9]
    for t, spec in zip(timelines, specs, strict=True):
        assert spec.arrival_time_s <= t.arrival_s < spec.arrival_time_s + 0.1  # open loop
        assert t.arrival_s < t.token_times_s[0] <= t.finish_s
        assert np.all(np.diff(t.token_times_s) >= 0) and t.finish_s == t.token_times_s[-1]
    assert timelines[1].finish_s < timelines[0].finish_s  # not held back by the long one
    assert facts["max_send_lag_s"] < 0.1
    assert summarize(timelines)["num_output_tokens"] == 78
    # the server logged every iteration it ran for these requests
    records = read_log_when_idle(log)
    assert sum(r.num_sampled_tokens for r in records) == 78
    assert sum(r.num_prefill_tokens for r in records) >= 40 + 7 + 1 + 23 + 64
    assert records[-1].num_unfinished == 0
    assert [r.iteration for r in records] == list(range(len(records)))
