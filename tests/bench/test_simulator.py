"""Short simulator runs per registered policy, block invariants checked every call."""

from __future__ import annotations

import os

import pytest

from preemptserve.bench.metrics import summarize
from preemptserve.bench.workload import RequestSpec, Workload, synthetic
from preemptserve.core.scheduler import available_policies
from preemptserve.sim.cost_model import IterationCostModel
from preemptserve.sim.simulator import SimConfig, Simulator

MIB = 2**20
COST = IterationCostModel(
    fixed_s=0.005,
    per_prefill_token_s=2e-4,
    per_decode_token_s=1e-3,
    per_decode_context_token_s=1e-6,
    per_prefill_attention_s=1e-8,
    per_sampled_token_s=1e-4,
    swap_fixed_s=1e-4,
    swap_bytes_per_s=5e9,
    kv_bytes_per_token=32768,
    max_model_len=2048,
    request_latency_s=0.001,
    response_latency_s=0.002,
)


def config(policy: str, kv_mib: float = 8, host_mib: float = 32) -> SimConfig:
    params = {
        "scheduler_policy": policy,
        "kv_cache_bytes": str(int(kv_mib * MIB)),
        "kv_cache_host_memory_bytes": str(int(host_mib * MIB)),
        "max_batch_size": "16",
        "max_num_tokens": "256",
    }
    return SimConfig.from_parameters(params, COST, check_invariants=True)


@pytest.mark.parametrize("policy", available_policies())
def test_every_policy_finishes_every_request_under_memory_pressure(policy: str) -> None:
    # 8 MiB = 16 blocks of 16 tokens: long outputs force preemption.
    w = synthetic("sharegpt", 60, rate_rps=20.0, seed=3, length_scale=0.3, max_context_tokens=256)
    sim = Simulator(config(policy), COST, w)
    result = sim.run()
    assert sim.block_manager.num_used_blocks == 0
    assert sim.block_manager.num_used_host_blocks == 0
    assert not sim.scheduler.has_unfinished()
    assert not result.rejected
    timelines = result.timelines()
    assert len(timelines) == len(w)
    for t, spec in zip(timelines, w.requests, strict=True):
        assert t.output_tokens == spec.output_tokens
        assert list(t.token_times_s) == sorted(t.token_times_s)
        assert t.ttft_s > COST.request_latency_s
    assert result.num_preemptions > 0  # the pool was too small for the burst
    summarize(timelines)


def test_a_lone_request_takes_exactly_the_modelled_iterations() -> None:
    w = Workload("one", (RequestSpec(0, 1.0, 100, 3),))
    result = Simulator(config("fcfs"), COST, w).run()
    (t,) = result.timelines()
    prefill = COST.fixed_s + 100 * 2e-4 + 100 * 100 * 1e-8 + 1e-4
    decode_101 = COST.fixed_s + 1e-3 + 101 * 1e-6 + 1e-4
    decode_102 = COST.fixed_s + 1e-3 + 102 * 1e-6 + 1e-4
    start = 1.0 + COST.request_latency_s
    expected = [
        start + prefill,
        start + prefill + decode_101,
        start + prefill + decode_101 + decode_102,
    ]
    assert list(t.token_times_s) == pytest.approx([e + COST.response_latency_s for e in expected])
    assert t.finish_s == t.token_times_s[-1]
    assert result.num_iterations == 3


def test_an_arrival_at_an_iteration_end_joins_the_next_iteration() -> None:
    prefill = COST.prefill_time_s(10)
    first = RequestSpec(0, 0.0, 10, 2)
    # arrives (after the request latency) exactly when the first prefill ends
    second = RequestSpec(1, prefill, 10, 1)
    result = Simulator(config("fcfs"), COST, Workload("tie", (first, second))).run()
    a, b = result.timelines()
    assert result.num_iterations == 2  # the second prefill rides with the first's decode
    assert b.token_times_s[0] == pytest.approx(a.token_times_s[1])


def test_too_long_requests_are_rejected_like_the_engine_does() -> None:
    w = Workload("big", (RequestSpec(0, 0.0, 200, 100), RequestSpec(1, 0.0, 10, 5)))
    result = Simulator(config("fcfs", kv_mib=4), COST, w).run()  # 8 blocks = 128 tokens
    assert result.rejected == [0]
    assert [t.request_id for t in result.timelines()] == ["1"]


def test_simulation_is_deterministic() -> None:
    w = synthetic("alpaca", 200, rate_rps=30.0, seed=9)
    runs = [Simulator(config("skip_join_mlfq"), COST, w).run() for _ in range(2)]
    assert [list(t.token_times_s) for t in runs[0].timelines()] == [
        list(t.token_times_s) for t in runs[1].timelines()
    ]


def test_measured_noise_is_seeded_and_scales_iterations() -> None:
    noisy = COST.with_coefficients(noise_quantiles=(2.0, 2.0))  # always twice the model
    w = Workload("one", (RequestSpec(0, 0.0, 100, 3),))
    plain = Simulator(config("fcfs"), COST, w).run().counters()["busy_s"]
    doubled = Simulator(config("fcfs"), noisy, w).run().counters()["busy_s"]
    assert doubled == pytest.approx(2 * plain)
    spread = COST.with_coefficients(noise_quantiles=(0.5, 1.0, 4.0))
    w = synthetic("alpaca", 100, rate_rps=30.0, seed=2)
    runs = [Simulator(config("fcfs"), spread, w).run().end_s for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_simulation_replays_identically_across_processes() -> None:
    """No hash-order dependence: string hashes differ between Python processes."""
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests/bench'); import test_simulator as t\n"
        "for policy in t.available_policies():\n"
        "    w = t.synthetic('sharegpt', 60, rate_rps=20.0, seed=3, length_scale=0.3,"
        " max_context_tokens=256)\n"
        "    r = t.Simulator(t.config(policy), t.COST, w).run()\n"
        "    print(policy, r.num_iterations, r.num_preemptions, r.num_swap_outs, r.end_s)\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1, outputs
