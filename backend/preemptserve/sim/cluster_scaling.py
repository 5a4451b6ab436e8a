"""Auto-scaling in the cluster simulator (``sim/cluster.py``, whose docstring describes
it): at each tick, drained instances stop or move a request out, then the server's
``ScalingPolicy`` decides on the tick's reports; added instances come up later."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.global_scheduler import Dispatcher, drain_pairs
from ..core.scaling import ScalingPolicy
from ..core.scheduler.load import InstanceLoad
from .events import EventKind, EventQueue

if TYPE_CHECKING:
    from .cluster import ClusterSimConfig
    from .cluster_result import ClusterResult
    from .simulator import SimInstance

# An instance's state (auto-scaling): off, starting (added, loading), up, draining.
_OFF, _STARTING, _UP, _DRAINING = "off", "starting", "up", "draining"


class _Scaling:
    """``ClusterSimulator``'s auto-scaling (its attributes, declared here)."""

    config: ClusterSimConfig
    now_s: float
    instances: list[SimInstance]
    dispatcher: Dispatcher
    scaling: ScalingPolicy | None
    _state: list[str]
    _on_since: list[float | None]
    _on_s: list[float]
    _moving: set[int]
    _inboxes: list[list]
    _events: EventQueue
    _result: ClusterResult

    def _start(self, source: int, destination: int, drain: bool = False) -> None:
        raise NotImplementedError  # ClusterSimulator's: a move

    def _scale(self, loads: dict[int, InstanceLoad]) -> None:
        """Drained instances: stop the empty ones, move a request out of the others;
        then the scaling policy's decision on this tick's reports."""
        assert self.scaling is not None
        now, state = self.now_s, self._state
        for i in list(loads):
            if state[i] is not _DRAINING or i in self._moving:
                continue
            inst = self.instances[i]
            if not inst.scheduler.has_unfinished() and not self._inboxes[i]:
                self._stop(i)
                del loads[i]
                continue
            if inst.scheduler.migration_candidates(include_waiting=True):
                destination = drain_pairs(i, loads, self._moving)
                if destination is not None:
                    self._start(i, destination, drain=True)
        starting = [i for i, s in enumerate(state) if s is _STARTING]
        decision = self.scaling.decide(loads, now, num_starting=len(starting))
        if decision.drain is not None:
            state[decision.drain] = _DRAINING
            self.dispatcher.set_draining(decision.drain, True)
            self._result.scale_events.append((now, "drain", decision.drain))
        for _ in range(decision.add):
            i = state.index(_OFF)  # decide never exceeds max_instances
            state[i] = _STARTING
            self._on_since[i] = now
            self._result.scale_events.append((now, "add", i))
            self._events.push(now + self.config.startup_s, EventKind.INSTANCE_UP, i)

    def _instance_up(self, instance: int) -> None:
        self._state[instance] = _UP
        self.dispatcher.update(instance, None)  # empty until its first report
        self.dispatcher.set_alive(instance, True)
        self._result.scale_events.append((self.now_s, "up", instance))

    def _stop(self, instance: int) -> None:
        since = self._on_since[instance]
        assert since is not None
        self._on_s[instance] += self.now_s - since
        self._on_since[instance] = None
        self._state[instance] = _OFF
        self.dispatcher.set_alive(instance, False)
        self.dispatcher.set_draining(instance, False)
        self._result.scale_events.append((self.now_s, "stop", instance))
