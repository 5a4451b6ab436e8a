"""The cluster simulator: many instances (real schedulers and block managers) on one event
queue, dispatch and live migration as the server runs them (``sim/cluster.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_simulator import COST, MIB  # the same small cost model

from preemptserve.bench.cli import main
from preemptserve.bench.workload import RequestSpec, Workload, synthetic
from preemptserve.cluster.migration import MigrationStatus
from preemptserve.sim.cluster import ClusterResult, ClusterSimConfig, ClusterSimulator
from preemptserve.sim.cluster_moves import MIGRATION_COSTS, MigrationCost, migration_cost
from preemptserve.sim.simulator import SimConfig, Simulator

LOCAL_POLICIES = ("fcfs", "skip_join_mlfq", "apt")


def parameters(policy: str, instances: int, dispatch: str = "load", migration: bool = True,
               kv_mib: float = 16, host_mib: float = 32, **more: str) -> dict[str, str]:
    return {
        "scheduler_policy": policy,
        "kv_cache_bytes": str(int(kv_mib * MIB)),
        "kv_cache_host_memory_bytes": str(int(host_mib * MIB)),
        "max_batch_size": "16",
        "max_num_tokens": "256",
        "num_instances": str(instances),
        "dispatch_policy": dispatch,
        "enable_migration": "true" if migration else "false",
        **more,
    }


def cluster_config(policy: str, instances: int, **kwargs: Any) -> ClusterSimConfig:
    return ClusterSimConfig.from_parameters(parameters(policy, instances, **kwargs), COST,
                                            check_invariants=True)


def assert_all_served(sim: ClusterSimulator, result: ClusterResult, workload: Workload) -> None:
    timelines = result.timelines()
    assert not result.rejected
    assert len(timelines) == len(workload)
    for t, spec in zip(timelines, workload.requests, strict=True):
        assert t.output_tokens == spec.output_tokens
        assert list(t.token_times_s) == sorted(t.token_times_s)
        assert t.ttft_s > COST.request_latency_s
    for inst in sim.instances:
        bm = inst.block_manager
        bm.check_invariants()
        assert bm.num_used_blocks == 0 and bm.num_used_host_blocks == 0
        assert not bm.owners() and not bm._reserved and not bm._pins
        assert not inst.scheduler.has_unfinished() and not inst.scheduler.detached


@pytest.mark.parametrize("policy", LOCAL_POLICIES)
def test_four_instances_serve_every_request_with_block_invariants_after_each_event(
        policy: str) -> None:
    # 32 blocks of 16 tokens per instance, requests up to 16 blocks: preemption and moves.
    w = synthetic("sharegpt", 120, rate_rps=40.0, seed=3, length_scale=0.3,
                  max_context_tokens=256)
    sim = ClusterSimulator(cluster_config(policy, 4), COST, w)
    result = sim.run()
    assert_all_served(sim, result, w)
    assert result.num_ticks > 0
    assert sum(result.dispatched) == len(w) and min(result.dispatched) > 0
    summary = result.cluster_summary()
    assert summary["migrations"]["started"] == sum(result.migrations_ended.values())
    assert result.migrations_started > 0
    assert summary["instance_seconds"] == pytest.approx(4 * result.end_s)


def alternating(n: int) -> Workload:
    """Round robin over two instances sends every long request (7 blocks of prompt, up to
    16 with its output, in a pool of 32) to instance 0, every short one to instance 1."""
    return Workload("alternating", tuple(
        RequestSpec(i, 0.02 * i, 100 if i % 2 == 0 else 16, 150 if i % 2 == 0 else 4)
        for i in range(n)))


def overload_config(**kwargs: Any) -> ClusterSimConfig:
    # A source once it has less than one decode step of memory per request.
    return cluster_config("fcfs", 2, dispatch="round_robin", migrate_out_threshold="1",
                          **kwargs)


def test_a_forced_overload_moves_requests_that_then_finish_with_all_their_tokens() -> None:
    w = alternating(24)
    config = overload_config()
    sim = ClusterSimulator(config, COST, w)
    result = sim.run()
    assert_all_served(sim, result, w)
    committed = result.migrations_ended[MigrationStatus.COMMITTED.value]
    assert committed >= 3 and len(result.moved) == committed
    assert all(int(request_id) % 2 == 0 for request_id in result.moved)  # the long ones
    by_id = {t.request_id: t for t in result.timelines()}
    assert all(by_id[request_id].output_tokens == 150 for request_id in result.moved)
    # Each downtime is at least its last stage's copy.
    assert min(result.downtimes_s) >= config.migration_cost.fixed_s
    # Without migration the overload stays on instance 0: more preemption, a later end.
    still = ClusterSimulator(overload_config(migration=False), COST, w).run()
    assert still.migrations_started == 0
    assert result.preempted_s < still.preempted_s
    assert result.end_s < still.end_s


def test_downtime_is_the_last_stage_copy_plus_the_wait_for_the_destination() -> None:
    w = alternating(24)
    slow = MigrationCost(fixed_s=0.5, bytes_per_s=1e9)
    config = overload_config()
    config = ClusterSimConfig(config.instance, config.cluster, slow, check_invariants=True)
    sim = ClusterSimulator(config, COST, w)
    result = sim.run()
    assert_all_served(sim, result, w)
    assert result.downtimes_s
    step_bound = 0.2  # far above any iteration of these batches
    for downtime in result.downtimes_s:
        assert 0.5 <= downtime < 0.5 + 16 * 512 * 1024 / 1e9 + step_bound


@pytest.mark.parametrize("policy", LOCAL_POLICIES)
def test_one_instance_without_migration_reproduces_the_simulator(policy: str) -> None:
    w = synthetic("sharegpt", 60, rate_rps=20.0, seed=3, length_scale=0.3,
                  max_context_tokens=256)
    params = parameters(policy, 1, dispatch="round_robin", migration=False, kv_mib=8)
    alone = Simulator(SimConfig.from_parameters(params, COST), COST, w).run()
    cluster = ClusterSimulator(ClusterSimConfig.from_parameters(params, COST), COST, w).run()
    assert [list(t.token_times_s) for t in cluster.timelines()] == [
        list(t.token_times_s) for t in alone.timelines()]
    assert cluster.finish_s == alone.finish_s
    expected = {k: v for k, v in alone.counters().items() if k != "wall_s"}
    assert {k: cluster.counters()[k] for k in expected} == expected
    assert alone.num_preemptions > 0


REPLAY = """
import sys
sys.path.insert(0, 'tests/bench')
import hashlib, test_cluster_simulator as t
for policy in t.LOCAL_POLICIES:
    w = t.synthetic('sharegpt', 80, rate_rps=40.0, seed=5, length_scale=0.3,
                    max_context_tokens=256)
    config = t.ClusterSimConfig.from_parameters(t.parameters(policy, 4), t.COST)
    r = t.ClusterSimulator(config, t.COST, w).run()
    times = repr([list(x.token_times_s) for x in r.timelines()]).encode()
    print(policy, r.num_iterations, r.migrations_started, sorted(r.migrations_ended.items()),
          r.downtimes_s, r.preempted_s, r.end_s, hashlib.sha256(times).hexdigest())
"""


def test_instances_sharing_a_machine_slow_each_other_while_both_step() -> None:
    # Two equal requests at once, one per instance (round robin), then one alone.
    w = Workload("pair", (RequestSpec(0, 0.0, 32, 40), RequestSpec(1, 0.0, 32, 40),
                          RequestSpec(2, 30.0, 32, 40)))
    config = cluster_config("fcfs", 2, dispatch="round_robin", migration=False)

    def jcts(slowdown: float) -> list[float]:
        cost = COST.with_coefficients(co_running_slowdown=slowdown)
        result = ClusterSimulator(config, cost, w).run()
        return [t.jct_s for t in result.timelines()]

    alone, shared = jcts(0.0), jcts(0.5)
    # side by side every step of both takes 1.5x (the first may start before the other
    # instance's: within one iteration); the lone request is as fast as without contention
    for together, apart in zip(shared[:2], alone[:2], strict=True):
        assert together - COST.request_latency_s == pytest.approx(
            1.5 * (apart - COST.request_latency_s), rel=0.03)
    assert shared[2] == pytest.approx(alone[2])


def test_a_cluster_simulation_replays_identically_across_processes() -> None:
    """String hashes (set and dict orders of request ids) differ between processes."""
    outputs = {
        subprocess.run([sys.executable, "-c", REPLAY], check=True, capture_output=True,
                       text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1, outputs
    assert "fcfs" in outputs.pop()


def test_stage_costs() -> None:
    assert MIGRATION_COSTS["object_store"].stage_time_s(16 * MIB) == pytest.approx(
        0.0146, abs=0.002)  # the measured 12.8-16.2 ms median range at 16 MiB
    gpu = COST.with_coefficients(swap_overlaps_compute=True)
    assert migration_cost("auto", gpu).bytes_per_s == COST.swap_bytes_per_s / 2
    assert migration_cost("auto", COST, "gloo") is MIGRATION_COSTS["gloo"]
    with pytest.raises(ValueError):
        migration_cost("carrier-pigeon", COST)


def test_simulate_cluster_command_writes_its_report(tmp_path: Path) -> None:
    profile = tmp_path / "cost.json"
    COST.save(profile)
    out = tmp_path / "cluster"
    args = ["simulate-cluster", "--profile", str(profile), "--workload", "sharegpt",
            "--num-requests", "40", "--rate", "30", "--length-scale", "0.3",
            "--max-context", "256", "--instances", "3", "--dispatch", "load",
            "--policies", "fcfs", "--no-progress", "--out", str(out)]
    for key, value in parameters("fcfs", 3, kv_mib=8).items():
        if key not in ("scheduler_policy", "num_instances", "dispatch_policy"):
            args += ["--param", f"{key}={value}"]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    run = result["runs"]["fcfs"]
    assert run["backend"] == "sim-cluster" and run["summary"]["num_requests"] == 40
    assert run["cluster"]["num_instances"] == 3
    assert run["cluster"]["migration_cost"]["fixed_s"] == MIGRATION_COSTS["object_store"].fixed_s
    assert "## Cluster" in out.with_suffix(".md").read_text()


def test_importing_the_cluster_simulator_loads_no_torch() -> None:
    code = ("import sys, preemptserve.sim.cluster\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
