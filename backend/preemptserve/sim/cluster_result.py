"""What a cluster simulation measured (``sim/cluster.py``'s module docstring defines each
metric): ``ClusterResult``, ``SimResult`` plus migrations, downtime, preemption loss,
fragmentation, scaling and cost."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..bench.metrics import distribution
from ..cluster.migration import MigrationStatus
from .cluster_moves import MigrationCost
from .simulator import SimResult


@dataclass
class ClusterResult(SimResult):
    num_instances: int = 1
    dispatch_policy: str = ""
    enable_migration: bool = False
    migration_cost: MigrationCost | None = None
    migrations_started: int = 0
    migrations_ended: Counter = field(default_factory=Counter)  # "status: reason" -> n
    migration_stages: int = 0
    migration_bytes: int = 0
    downtimes_s: list[float] = field(default_factory=list)  # of committed moves
    moved: list[str] = field(default_factory=list)  # request ids of committed moves
    preempted_s: float = 0.0  # summed over requests
    num_ticks: int = 0
    num_fragmented_ticks: int = 0
    fragmented_free_blocks: int = 0  # summed over fragmented ticks
    tick_blocks: int = 0  # the reporting instances' device blocks, summed over ticks
    dispatched: list[int] = field(default_factory=list)  # requests sent to each instance
    instance_seconds: float = 0.0  # each instance's time on, summed
    enable_scaling: bool = False
    # (time, "add" | "up" | "drain" | "stop", instance): the scaling timeline
    scale_events: list[tuple[float, str, int]] = field(default_factory=list)

    def counters(self) -> dict[str, Any]:
        return super().counters() | {
            "num_instances": self.num_instances,
            "instance_seconds": self.instance_seconds,
            "migrations_started": self.migrations_started,
            "migrations_committed": self.migrations_ended.get(
                MigrationStatus.COMMITTED.value, 0),
            "preempted_s": self.preempted_s,
        }

    def cluster_summary(self) -> dict[str, Any]:
        """Migrations, downtime, preemption loss, fragmentation and cost (the module
        docstring defines each)."""
        by_status: Counter = Counter()
        for key, n in self.migrations_ended.items():
            by_status[key.split(":", 1)[0]] += n
        num_finished = len(self.finish_s)
        ticks = self.num_ticks
        cost = self.migration_cost
        return {
            "num_instances": self.num_instances,
            "dispatch_policy": self.dispatch_policy,
            "enable_migration": self.enable_migration,
            "migration_cost": None if cost is None else {
                "fixed_s": cost.fixed_s, "bytes_per_s": cost.bytes_per_s, "source": cost.source},
            "instance_seconds": self.instance_seconds,
            "busy_share": self.busy_s / self.instance_seconds if self.instance_seconds else None,
            "migrations": {
                "started": self.migrations_started,
                "committed": by_status.get(MigrationStatus.COMMITTED.value, 0),
                "aborted_src": by_status.get(MigrationStatus.ABORTED_SRC.value, 0),
                "aborted_dst": by_status.get(MigrationStatus.ABORTED_DST.value, 0),
                "by_reason": dict(sorted(self.migrations_ended.items())),
                "per_s": self.migrations_started / self.end_s if self.end_s else None,
                "stages": self.migration_stages,
                "bytes": self.migration_bytes,
            },
            "downtime_s": {**distribution(self.downtimes_s),
                           "max": max(self.downtimes_s, default=None)},
            "preemption_loss": {
                "preempted_s_per_request": (self.preempted_s / num_finished
                                            if num_finished else None),
                "preempted_s_total": self.preempted_s,
                "recomputed_tokens": self.num_recomputed_tokens,
            },
            "fragmentation": {
                "ticks": ticks,
                "fragmented_tick_share": self.num_fragmented_ticks / ticks if ticks else None,
                "fragmented_free_block_share": (
                    self.fragmented_free_blocks / self.tick_blocks
                    if self.tick_blocks else None),
            },
            "dispatched": {"min": min(self.dispatched, default=0),
                           "max": max(self.dispatched, default=0)},
            "scaling": self.scaling_summary() if self.enable_scaling else None,
        }

    def scaling_summary(self) -> dict[str, Any]:
        """Scale events and the number of instances on (starting, up or draining)."""
        actions = Counter(action for _, action, _ in self.scale_events)
        on = self.num_instances
        low = high = on
        for _, action, _ in sorted(self.scale_events):
            on += {"add": 1, "stop": -1}.get(action, 0)
            low, high = min(low, on), max(high, on)
        return {
            "adds": actions["add"], "drains": actions["drain"], "stops": actions["stop"],
            "min_on": low, "max_on": high,
            "mean_on": self.instance_seconds / self.end_s if self.end_s else None,
        }
