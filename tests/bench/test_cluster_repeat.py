"""Repeated steps in the cluster simulator (``sim/repeat.py``): a run with them equals a
run that plans every step, event for event, for every registered policy, under memory
pressure with moves, with and without iteration noise, with auto-scaling."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_cluster_sim_scaling import scaling_config, waves
from test_cluster_simulator import COST, cluster_config

from preemptserve.bench.workload import synthetic
from preemptserve.core.scheduler.registry import available_policies
from preemptserve.sim.cluster import ClusterResult, ClusterSimConfig, ClusterSimulator
from preemptserve.sim.cost_model import IterationCostModel

NOISY = COST.with_coefficients(noise_quantiles=(0.8, 0.95, 1.0, 1.1, 1.6))


def outcome(result: ClusterResult) -> dict[str, Any]:
    """Everything a run reports, but its wall time."""
    counters = {k: v for k, v in result.counters().items() if k != "wall_s"}
    return {
        "times": [list(t.token_times_s) for t in result.timelines()],
        "finish": result.finish_s, "rejected": result.rejected, "counters": counters,
        "cluster": result.cluster_summary(), "moved": result.moved,
        "downtimes": result.downtimes_s, "dispatched": result.dispatched,
        "scale_events": result.scale_events,
    }


def both_ways(config: ClusterSimConfig, cost: IterationCostModel,
              workload: Any) -> tuple[ClusterSimulator, ClusterResult, ClusterResult]:
    repeated = ClusterSimulator(config, cost, workload)
    planned = ClusterSimulator(dataclasses.replace(config, repeated_steps=False), cost,
                               workload)
    return repeated, repeated.run(), planned.run()


@pytest.mark.parametrize("cost", [COST, NOISY], ids=["exact", "noisy"])
@pytest.mark.parametrize("policy", available_policies())
def test_repeated_steps_change_nothing_under_memory_pressure_and_moves(
        policy: str, cost: IterationCostModel) -> None:
    w = synthetic("sharegpt", 120, rate_rps=40.0, seed=3, length_scale=0.3,
                  max_context_tokens=256)
    config = cluster_config(policy, 4, max_batch_size="64")
    sim, repeated, planned = both_ways(config, cost, w)
    assert outcome(repeated) == outcome(planned)
    assert repeated.migrations_started > 0 and repeated.num_preemptions > 0
    if policy == "fcfs":  # it states its repeats: some steps ran without a plan
        assert sum(inst.num_repeated_steps for inst in sim.instances) > 0


@pytest.mark.parametrize("policy", available_policies())
def test_repeated_steps_change_nothing_with_priorities_and_a_queue_limit(policy: str) -> None:
    w = synthetic("sharegpt", 120, rate_rps=60.0, seed=4, length_scale=0.3,
                  max_context_tokens=256).with_priorities(0.3, seed=1)
    config = cluster_config(policy, 3, max_batch_size="64", max_queue_size="12")
    _, repeated, planned = both_ways(config, NOISY, w)
    assert outcome(repeated) == outcome(planned)
    assert repeated.num_queue_full > 0


@pytest.mark.parametrize("policy", available_policies())
def test_repeated_steps_change_nothing_with_auto_scaling(policy: str) -> None:
    w = waves(trickle_output=40)
    _, repeated, planned = both_ways(scaling_config(policy), NOISY, w)
    assert outcome(repeated) == outcome(planned)
    assert any(action == "stop" for _, action, _ in repeated.scale_events)


def test_long_decodes_run_mostly_as_repeated_steps() -> None:
    # Plenty of memory, long outputs: most steps decode the same batch one token further.
    w = synthetic("sharegpt", 60, rate_rps=10.0, seed=1, length_scale=0.3,
                  max_context_tokens=256)
    config = cluster_config("fcfs", 2, kv_mib=64, max_batch_size="64")
    sim, repeated, planned = both_ways(config, NOISY, w)
    assert outcome(repeated) == outcome(planned)
    num_repeated = sum(inst.num_repeated_steps for inst in sim.instances)
    assert num_repeated > repeated.num_iterations / 2
