"""Auto-scaling decisions (Llumnix's ``avg_load`` policy, llumnix.md 1.6). No torch, no Ray.

Pure: ``ScalingPolicy.decide(loads, now_s)`` reads the instances' load reports and says
whether to add instances, drain one, or do nothing; the caller (the cluster simulator;
later the Ray runtime) starts and stops instances, marks a drained instance
``InstanceLoad.draining`` (F = -inf: the dispatcher skips it, ``drain_pairs`` moves its
requests out) and stops it once it is empty.

**Cluster freeness.** As Llumnix's ``avg_load``, one freeness of the whole cluster from
sums (not an average of per-instance freeness), in the dispatch form of
``core/scheduler/load.py``::

    F = (sum of available blocks - sum of all waiting requests' blocks)
        / (sum of running + waiting requests)

over the instances not draining; a draining instance adds its requests, and its blocks
in use (they must land elsewhere), but no capacity. Available blocks are physical: the
high-priority headroom is a dispatch and migration preference, not demand (summed over
many instances it would buy capacity nobody uses). No request: F = +inf.

**Sign convention.** F is our freeness: decode steps of memory left per request, higher
is freer (``InstanceLoad``'s, the paper's). Llumnix v0.1.0 compares ``load = -F`` with
``SCALE_UP_THRESHOLD = 10`` / ``SCALE_DOWN_THRESHOLD = 60`` (HEAD: F itself with -10 /
-60), which reads "up when F < -10, down when F without one instance > -60": the
down band then covers (-60, -10), where the up rule fires again after the drain, so a
moderately loaded cluster would drain and re-add an instance every interval. We follow
the paper instead ("[10, 60] freeness thresholds": scale out below 10, in above 60), a
hysteresis band:

* **up** when ``F < scale_up_threshold`` (default 10): add the fewest empty instances
  (each with the largest instance's blocks) that lift ``F`` to the threshold, at most up
  to ``max_instances`` (Llumnix adds infinitely large empty instances, so always one);
* **down** when ``F_without > scale_down_threshold`` (default 60), ``F_without`` being
  the freeness with the instance to drain gone (its capacity removed, its requests and
  blocks in use kept, as Llumnix's ``compute_load_metric_down``): drain that one. It is
  the non-draining instance with the fewest requests (cheapest to empty), ties to the
  highest id (Llumnix drains the last instance). Never below ``min_instances``.
  ``scale_down_threshold`` must exceed ``scale_up_threshold``.

**Hysteresis.** A decision is made only when its condition held at every call for a
whole ``interval_s`` (Llumnix checks once every ``SCALING_INTERVAL = 10 s``; checking at
every call and requiring the whole interval ignores a moment's spike). After a
decision the clock restarts from it: the next one needs another whole interval. Below
``min_instances`` (instances died), instances are added at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .scheduler.load import InstanceLoad


@dataclass(frozen=True)
class ScaleDecision:
    """Add ``add`` instances, drain instance ``drain``, or nothing (both unset)."""

    add: int = 0
    drain: int | None = None
    freeness: float = math.nan  # the cluster freeness the decision was made at

    @property
    def is_nothing(self) -> bool:
        return not self.add and self.drain is None


NOTHING = ScaleDecision()


def cluster_freeness(loads: Mapping[int, InstanceLoad], *, extra_blocks: int = 0,
                     without: int | None = None) -> float:
    """The cluster's dispatch freeness (see the module's docstring).

    ``extra_blocks``: capacity of empty instances to add (starting or proposed).
    ``without``: an instance taken out as if drained (its capacity gone, its requests
    and blocks in use kept).
    """
    available = extra_blocks
    demand = 0
    num_requests = 0
    for instance, load in loads.items():
        if load.draining or instance == without:
            available -= load.num_used_blocks
        else:
            available += load.physical_available_blocks
        demand += load.waiting_blocks
        num_requests += load.num_running + load.num_waiting
    if not num_requests:
        return math.inf
    return (available - demand) / num_requests


class ScalingPolicy:
    def __init__(self, min_instances: int, max_instances: int,
                 scale_up_threshold: float = 10.0, scale_down_threshold: float = 60.0,
                 interval_s: float = 10.0) -> None:
        if min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {min_instances}")
        if max_instances < min_instances:
            raise ValueError(f"max_instances ({max_instances}) must be >= min_instances "
                             f"({min_instances})")
        if not (math.isfinite(scale_up_threshold) and math.isfinite(scale_down_threshold)):
            raise ValueError("scaling thresholds must be finite")
        if scale_down_threshold <= scale_up_threshold:
            raise ValueError(
                f"scale_down_threshold ({scale_down_threshold}) must exceed "
                f"scale_up_threshold ({scale_up_threshold}): freeness above the first "
                "drains an instance, below the second adds one")
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.min_instances = min_instances
        self.max_instances = max_instances
        self.scale_up_threshold = scale_up_threshold
        self.scale_down_threshold = scale_down_threshold
        self.interval_s = interval_s
        # When the up / down condition started to hold without a break (None: it does not).
        self._up_since: float | None = None
        self._down_since: float | None = None

    def reset(self) -> None:
        """Forget how long a condition has held (e.g. after the caller acted otherwise)."""
        self._up_since = self._down_since = None

    def decide(self, loads: Mapping[int, InstanceLoad], now_s: float,
               num_starting: int = 0) -> ScaleDecision:
        """What to do now, from the newest load report of every instance (draining ones
        included, with ``draining`` set).

        ``num_starting``: instances added and not reporting yet; they count as empty
        instances of the largest instance's size, towards ``max_instances`` and the
        freeness, so that a start-up delay does not add instances twice.
        """
        if num_starting < 0:
            raise ValueError(f"num_starting must be >= 0, got {num_starting}")
        active = sorted(i for i, load in loads.items() if not load.draining)
        num_active = len(active) + num_starting
        if num_active < self.min_instances:
            self.reset()
            return ScaleDecision(add=self.min_instances - num_active)
        if not loads:
            self.reset()
            return NOTHING
        size = max(load.num_blocks for load in loads.values())
        freeness = cluster_freeness(loads, extra_blocks=num_starting * size)

        if freeness < self.scale_up_threshold and num_active < self.max_instances:
            self._down_since = None
            if self._up_since is None:
                self._up_since = now_s
            if now_s - self._up_since < self.interval_s:
                return NOTHING
            self._up_since = now_s  # the next decision needs another whole interval
            room = self.max_instances - num_active
            add = next((k for k in range(1, room + 1) if cluster_freeness(
                loads, extra_blocks=(num_starting + k) * size) >= self.scale_up_threshold),
                room)
            return ScaleDecision(add=add, freeness=freeness)

        self._up_since = None
        victim = self._drain_candidate(loads, active)
        if (victim is None or num_active <= self.min_instances
                or cluster_freeness(loads, extra_blocks=num_starting * size, without=victim)
                <= self.scale_down_threshold):
            self._down_since = None
            return NOTHING
        if self._down_since is None:
            self._down_since = now_s
        if now_s - self._down_since < self.interval_s:
            return NOTHING
        self._down_since = now_s
        return ScaleDecision(drain=victim, freeness=freeness)

    @staticmethod
    def _drain_candidate(loads: Mapping[int, InstanceLoad], active: list[int]) -> int | None:
        if not active:
            return None
        return min(active, key=lambda i: (loads[i].num_running + loads[i].num_waiting, -i))
