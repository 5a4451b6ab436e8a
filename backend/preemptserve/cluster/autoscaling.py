"""Auto-scaling of a cluster's engine instances, as the frontend runs it
(``ClusterFrontend``'s module docstring says what it does; ``core/scaling.py`` decides).

``AutoScaling`` holds the frontend's scaling methods; they run on its control thread
(``_scale``) and on threads of their own (``_launch``, ``_stop_instance``), and touch
the frontend's state under its lock, as the rest of the frontend does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..core.global_scheduler import drain_pairs
from .stats import counters_only, sum_stats

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..core.global_scheduler import Dispatcher
    from ..core.scaling import ScalingPolicy
    from ..core.scheduler.load import InstanceLoad
    from ..engine.outputs import EngineStats
    from .stats import ClusterStats

logger = logging.getLogger(__name__)


class InstanceState(Enum):
    STARTING = "starting"  # up, not reported yet: takes no request
    ALIVE = "alive"
    DRAINING = "draining"  # takes no request; its requests move out; stopped once empty
    STOPPING = "stopping"  # drained and empty, being stopped
    STOPPED = "stopped"
    DEAD = "dead"


LIVE_STATES = frozenset({InstanceState.STARTING, InstanceState.ALIVE, InstanceState.DRAINING})
# A drain moves every request, those holding no cache (never started, or dropped for
# recomputation) first: they move in one stage with nothing to copy, their state (RNG,
# detokenizer, echo) with them, rather than start on an instance about to stop and then
# copy their KV. Re-dispatching them instead would race their start there (a first token
# may be out already) and need their prompts, which the frontend does not keep. As the
# cluster simulator drains (sim/cluster.py).
DRAIN_REQUEST_POLICY = "FCWSR"


class AutoScaling:
    """The frontend's auto-scaling (a mixin of ``ClusterFrontend``, whose attributes
    these are)."""

    config: ClusterConfig
    instances: Any
    stats: ClusterStats
    _scaling: ScalingPolicy | None
    _lock: threading.Lock
    _stop: threading.Event
    _failure: str | None
    _states: list[InstanceState | None]
    _loads: dict[int, InstanceLoad]
    _stats: dict[int, EngineStats]
    _moving: dict[str, tuple[int, int]]
    _requests: dict[str, Any]
    _dispatcher: Dispatcher
    _threads: list[threading.Thread]
    _num_launching: int
    _no_start_before: float

    def _scale(self) -> None:
        """One round: act on ``ScalingPolicy.decide``, move the draining instances'
        requests out, and stop those that are empty."""
        assert self._scaling is not None
        most = self.config.scaling_max_instances
        moves: list[tuple[int, int]] = []
        with self._lock:
            if self._failure is not None or self._stop.is_set():
                return
            loads = {i: load for i, load in self._loads.items()
                     if self._states[i] in (InstanceState.ALIVE, InstanceState.DRAINING)}
            count = Counter(self._states)
            # Not reporting yet (starting, or just up with the frontend): empty instances
            # to the policy, so that a first round before any report adds nothing.
            num_starting = self._num_launching + sum(
                1 for i, state in enumerate(self._states)
                if state in LIVE_STATES and i not in loads)
            now = time.monotonic()
            decision = self._scaling.decide(loads, now, num_starting)
            num_start = 0
            if decision.add:
                # A draining instance is there already: keep it rather than start one.
                kept = sorted(i for i in loads
                              if self._states[i] is InstanceState.DRAINING)[:decision.add]
                for i in kept:
                    self._set_draining(i, False)
                    self.stats.scaling_events["undrain"] += 1
                # Every instance holding resources counts towards max_instances.
                held = self._num_launching + sum(count[state] for state in (
                    *LIVE_STATES, InstanceState.STOPPING))
                num_start = max(0, min(decision.add - len(kept), most - held))
                if now < self._no_start_before:
                    num_start = 0
                self._num_launching += num_start
                self.stats.scaling_events["add"] += num_start
                if num_start:
                    logger.info("auto-scaling: starting %d instance(s) (cluster freeness %.1f)",
                                num_start, decision.freeness)
            elif (decision.drain is not None
                  and count[InstanceState.ALIVE] > self.config.min_instances):
                # (The policy counts starting instances as serving; they do not yet.)
                logger.info("auto-scaling: draining instance %d (cluster freeness %.1f)",
                            decision.drain, decision.freeness)
                self._set_draining(decision.drain, True)
                self.stats.scaling_events["drain"] += 1
            busy = {i for pair in self._moving.values() for i in pair}
            takers = {i: self._loads[i] for i in loads
                      if self._states[i] is InstanceState.ALIVE}
            for i in sorted(loads):
                if self._states[i] is not InstanceState.DRAINING:
                    continue
                if self._is_empty(i, busy):
                    self._retire(i)
                elif (destination := drain_pairs(i, takers, busy)) is not None:
                    moves.append((i, destination))
                    busy |= {i, destination}
            self._count_instances()
        for _ in range(num_start):
            threading.Thread(target=self._launch, name="start-instance", daemon=True).start()
        for source, destination in moves:
            self._move_one(source, destination, DRAIN_REQUEST_POLICY)

    def _set_draining(self, instance: int, draining: bool) -> None:
        """(Under the lock.) A draining instance takes no request and its load says so."""
        self._states[instance] = InstanceState.DRAINING if draining else InstanceState.ALIVE
        self._dispatcher.set_draining(instance, draining)
        if instance in self._loads:
            self._loads[instance] = replace(self._loads[instance], draining=draining)
            if not draining:  # its reports said draining: it takes requests again now
                self._dispatcher.update(instance, self._loads[instance])

    def _is_empty(self, instance: int, busy: set[int]) -> bool:
        """(Under the lock.) A draining instance holds nothing: no move in or out, no
        request of the frontend's on it (one still in its inbox, not in its report yet,
        counts), and its newest report says no request and no block."""
        load = self._loads.get(instance)
        return (load is not None and instance not in busy
                and not (load.num_running or load.num_waiting or load.num_used_blocks)
                and not any(routed.owner == instance or routed.moving_to == instance
                            for routed in self._requests.values() if not routed.ended))

    def _retire(self, instance: int) -> None:
        """(Under the lock.) Stop an empty drained instance: its counters stay in the
        sums (Prometheus counters never go down), its gauges and freeness drop."""
        logger.info("auto-scaling: instance %d is drained; stopping it", instance)
        self._states[instance] = InstanceState.STOPPING
        self._dispatcher.set_alive(instance, False)
        if instance in self._stats:
            self._stats[instance] = counters_only(self._stats[instance])
        self._loads.pop(instance, None)
        self.stats.freeness.pop(instance, None)
        self.stats.scaling_events["stop"] += 1
        threading.Thread(target=self._stop_instance, args=(instance,),
                         name=f"stop-instance-{instance}", daemon=True).start()

    def _stop_instance(self, instance: int) -> None:
        try:
            self.instances.stop_instance(instance)
        except Exception:
            logger.exception("stopping instance %d failed", instance)
        with self._lock:
            self._states[instance] = InstanceState.STOPPED
            self._count_instances()
            stats = sum_stats(self._stats.values())
        self._publish(stats)

    def _launch(self) -> None:
        """Start one instance (a thread of its own: it takes seconds); it takes requests
        from its first report on."""
        try:
            instance = self.instances.start_instance()
        except Exception as exc:
            logger.exception("auto-scaling: an instance could not start")
            with self._lock:
                self._num_launching -= 1
                self.stats.scaling_events["add_failed"] += 1
                self._no_start_before = time.monotonic() + self.config.scaling_interval_s
                if not self._any_live() and self._failure is None:
                    self._failure = ("every engine instance failed and a new one could not "
                                     f"start: {exc}")
                self._count_instances()
            self._report_failure()
            return
        with self._lock:
            self._num_launching -= 1
            stopping = self._stop.is_set()
            if not stopping:
                while len(self._states) <= instance:  # numbers of failed starts stay unused
                    self._states.append(None)
                    self._dispatcher.add_instance(alive=False)
                self._states[instance] = InstanceState.STARTING
                poller = self._poller(instance)
                self._threads.append(poller)
                poller.start()
                self._count_instances()
        if not stopping:
            logger.info("auto-scaling: instance %d is up", instance)
            return
        try:  # came up as the frontend stopped: nobody will serve with it
            self.instances.stop_instance(instance)
        except Exception:
            logger.exception("stopping instance %d failed", instance)
