"""The statistics of a cluster of engine instances: the frontend's own (instances, their
freeness, the moves and their downtime) and the instances' engine statistics summed.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from ..engine.outputs import EngineStats
from .migration import MigrationResult, MigrationStatus, reason_kind

# Downtime histogram buckets (seconds), for the metrics.
DOWNTIME_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, math.inf)


@dataclass
class ClusterStats:
    """Cluster metrics: instances, their freeness, the moves and scaling actions so far."""

    num_instances: int = 0  # starting, alive or draining
    num_alive: int = 0  # serving, taking new requests
    num_starting: int = 0  # auto-scaling: being started, or not reported yet
    num_draining: int = 0  # auto-scaling: taking no request, emptied, then stopped
    # Auto-scaling actions so far: add (instances started), add_failed, drain, undrain (a
    # drain called off: instances were wanted again), stop (drained instances stopped).
    scaling_events: Counter = field(default_factory=Counter)
    freeness: dict[int, float] = field(default_factory=dict)  # migration freeness
    migrations_started: int = 0
    migrations_ended: Counter = field(default_factory=Counter)  # (status, reason) -> n
    migration_bytes: int = 0
    downtime_counts: list[int] = field(default_factory=lambda: [0] * len(DOWNTIME_BUCKETS_S))
    downtime_sum_s: float = 0.0
    num_downtimes: int = 0  # committed moves so far
    recent_downtimes_s: deque = field(default_factory=lambda: deque(maxlen=1024))

    def count_move(self, result: MigrationResult) -> None:
        """A move ended: its outcome, its bytes and, if it committed, its downtime."""
        self.migrations_ended[(result.status.value, reason_kind(result.reason))] += 1
        self.migration_bytes += result.num_bytes
        if result.status is not MigrationStatus.COMMITTED:
            return
        bucket = next(k for k, edge in enumerate(DOWNTIME_BUCKETS_S) if result.downtime_s <= edge)
        self.downtime_counts[bucket] += 1
        self.downtime_sum_s += result.downtime_s
        self.num_downtimes += 1
        self.recent_downtimes_s.append(result.downtime_s)


# Per-model constants and the last step time: the largest, not the sum.
_NOT_SUMMED = frozenset({"last_step_s", "kv_bytes_per_token", "hidden_bytes_per_token",
                         "hidden_mode_available"})
_GAUGES = frozenset({"num_blocks_total", "num_host_blocks_total"})


def sum_stats(per_instance: Iterable[EngineStats]) -> EngineStats:
    """The instances' statistics summed (a dead instance's counters stay in, through
    ``counters_only``: counters never go down)."""
    total = EngineStats()
    for stats in per_instance:
        for f in fields(EngineStats):
            value, so_far = getattr(stats, f.name), getattr(total, f.name)
            if f.name in _NOT_SUMMED:
                setattr(total, f.name, max(so_far, value))
            else:
                setattr(total, f.name, so_far + value)
    return total


def counters_only(stats: EngineStats) -> EngineStats:
    """``stats`` with every gauge zero: what a dead instance still adds to the sums."""
    return EngineStats(**{f.name: getattr(stats, f.name) for f in fields(EngineStats)
                          if f.name.endswith("_total") and f.name not in _GAUGES})
