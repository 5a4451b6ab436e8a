"""Auto-scaling and priorities in the cluster simulator (``sim/cluster.py``): instances
added after their start-up delay, drained through moves and stopped, with every block
manager's invariants checked after each event; high-priority requests dispatched and kept
apart by the headroom."""

from __future__ import annotations

import pytest
from test_cluster_simulator import (
    COST,
    LOCAL_POLICIES,
    assert_all_served,
    cluster_config,
)

from preemptserve.bench.workload import RequestSpec, Workload, synthetic
from preemptserve.sim.cluster import ClusterSimulator


def waves(trickle_output: int = 4) -> Workload:
    """A burst that overloads one instance, a quiet gap, then a trickle."""
    burst = synthetic("sharegpt", 80, rate_rps=80.0, seed=3, length_scale=0.3,
                      max_context_tokens=256).requests
    trickle = [RequestSpec(0, 12.0 + 0.5 * i, 16, trickle_output) for i in range(8)]
    return Workload("waves", tuple(
        RequestSpec(i, r.arrival_time_s, r.input_tokens, r.output_tokens)
        for i, r in enumerate(list(burst) + trickle)))


def scaling_config(policy: str, startup_s: float = 0.5, up: str = "10", down: str = "60",
                   instances: int = 1, **more: str):
    config = cluster_config(policy, instances, enable_scaling="true", min_instances="1",
                            max_instances="4", scale_up_threshold=up,
                            scale_down_threshold=down, scaling_interval_s="0.2", **more)
    return type(config)(config.instance, config.cluster, config.migration_cost,
                        config.check_invariants, startup_s)


@pytest.mark.parametrize("policy", LOCAL_POLICIES)
def test_scaling_adds_instances_under_load_then_drains_and_stops_them(policy: str) -> None:
    w = waves()
    sim = ClusterSimulator(scaling_config(policy), COST, w)
    result = sim.run()
    assert_all_served(sim, result, w)  # invariants after every event, every block back
    actions = [action for _, action, _ in result.scale_events]
    assert "add" in actions and "up" in actions and "drain" in actions and "stop" in actions
    summary = result.cluster_summary()["scaling"]
    assert summary["min_on"] == 1 and 1 < summary["max_on"] <= 4
    # An added instance takes requests only once up, start-up later than its addition.
    added = {i: t for t, action, i in result.scale_events if action == "add"}
    up = {i: t for t, action, i in result.scale_events if action == "up"}
    assert all(up[i] == pytest.approx(added[i] + 0.5) for i in up)
    assert all(result.dispatched[i] > 0 for i in up)
    # Cost: less than every instance on for the whole run, more than one.
    assert result.end_s < result.instance_seconds < 4 * result.end_s
    assert summary["mean_on"] == pytest.approx(result.instance_seconds / result.end_s)


def test_a_drained_instance_takes_no_new_request_and_moves_its_requests_out() -> None:
    # Four instances up, a light stream of long requests over them: instances are
    # drained while they serve some.
    w = Workload("stream", tuple(RequestSpec(i, 0.01 * i, 16, 150) for i in range(8)))
    sim = ClusterSimulator(scaling_config("fcfs", up="2", down="8", instances=4,
                                          dispatch="round_robin"), COST, w)
    dispatched_at: list[tuple[float, int]] = []
    choose = sim.dispatcher.choose

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        instance = choose(*args, **kwargs)
        dispatched_at.append((sim.now_s, instance))
        return instance

    sim.dispatcher.choose = recording  # type: ignore[method-assign]
    result = sim.run()
    assert_all_served(sim, result, w)
    periods: dict[int, list[tuple[float, float]]] = {}
    drained: dict[int, float] = {}
    for t, action, i in result.scale_events:
        if action == "drain":
            drained[i] = t
        elif action == "stop":
            periods.setdefault(i, []).append((drained.pop(i), t))
    assert periods
    for i, spans in periods.items():
        for start, end in spans:
            assert not any(start <= t < end and j == i for t, j in dispatched_at)
    # Drains moved requests out (nothing is overloaded here): each moved request was
    # sent to an instance drained later (requests are dispatched in index order).
    assert result.moved
    assert all(dispatched_at[int(r)][1] in periods for r in result.moved)


def test_with_the_start_up_delay_longer_than_the_run_no_added_instance_serves() -> None:
    w = waves()
    sim = ClusterSimulator(scaling_config("fcfs", startup_s=1e6), COST, w)
    result = sim.run()
    assert_all_served(sim, result, w)
    assert result.dispatched[0] == len(w) and sum(result.dispatched[1:]) == 0
    assert any(action == "add" for _, action, _ in result.scale_events)
    assert result.instance_seconds > result.end_s  # starting instances cost too


def test_high_priority_requests_are_dispatched_and_scheduled_as_such() -> None:
    w = synthetic("sharegpt", 120, rate_rps=60.0, seed=4, length_scale=0.3,
                  max_context_tokens=256).with_priorities(0.2, seed=1)
    high = {str(r.index) for r in w.requests if r.priority == "high"}
    assert 0 < len(high) < len(w)
    sim = ClusterSimulator(cluster_config("fcfs", 4, priority_headroom_blocks="24"), COST, w)
    priorities: list[str] = []
    choose = sim.dispatcher.choose

    def recording(prompt_blocks: int, priority: str = "normal") -> int:
        priorities.append(priority)
        return choose(prompt_blocks, priority)

    sim.dispatcher.choose = recording  # type: ignore[method-assign]
    result = sim.run()
    assert_all_served(sim, result, w)
    assert priorities == [r.priority for r in w.requests]
    # Each instance's fcfs runs high-priority requests first: under this overload they
    # wait far less for their first token.
    ttft = {t.request_id: t.ttft_s for t in result.timelines()}
    mean_high = sum(ttft[i] for i in high) / len(high)
    mean_normal = sum(v for i, v in ttft.items() if i not in high) / (len(w) - len(high))
    assert mean_high < mean_normal / 3


def test_with_priorities_marks_the_share_independently_of_the_lengths() -> None:
    w = synthetic("sharegpt", 2000, rate_rps=10.0, seed=2)
    marked = w.with_priorities(0.1, seed=7)
    share = sum(r.priority == "high" for r in marked.requests) / len(w)
    assert 0.08 < share < 0.12
    assert [(r.arrival_time_s, r.input_tokens, r.output_tokens) for r in marked.requests] == [
        (r.arrival_time_s, r.input_tokens, r.output_tokens) for r in w.requests]
    assert marked.with_priorities(0.1, seed=7) == marked.with_priorities(0.1, seed=7)
    with pytest.raises(ValueError):
        w.with_priorities(1.5)
