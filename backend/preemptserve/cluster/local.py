"""Engine instances in this process behind a ``ClusterFrontend`` (no Ray): the frontend's
``Instances`` protocol over a list of ``EngineInstance`` objects, for tests and for
benchmarks on one process.

Calls go straight to the instance, as ``RayCluster``'s go to its actors: ``add_request``,
``abort`` and ``migrate_out`` return at once (a move runs in a thread of its own, the
source driving it as its actor would), ``poll`` and ``pick_request`` answer. A move's
destination is reached through ``Peer`` by plain method calls; its block data passes as
given (numpy arrays the source read for this move, nothing else holds them).

``kill(instance)`` stands for a dead instance process: the instance stops, its later
polls and picks raise ``InstanceDied`` (its pending outputs are lost with it, as with
Ray), calls to it as a move's destination fail, and requests sent to it vanish.

Auto-scaling: ``start_instance`` builds one more instance with the ``factory`` given
(blocking, as ``RayCluster``'s waits for its actor's model load) and ``stop_instance``
stops one as ``kill`` does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..core.request import SamplingParams
from .instance import EngineInstance, InstanceReport, Peer
from .migration import MigrationConfig
from .ray_cluster import InstanceDied  # ray_cluster imports ray only when used

logger = logging.getLogger(__name__)


class LocalInstances:
    """``EngineInstance``s of this process as the frontend's ``Instances``; instance ``i``
    is ``instances[i]`` (None while it starts, or if it could not). ``shutdown`` stops them
    all. ``factory(instance_id)`` builds the instances ``start_instance`` adds."""

    def __init__(self, instances: Sequence[EngineInstance],
                 factory: Callable[[int], EngineInstance] | None = None) -> None:
        self.instances: list[EngineInstance | None] = list(instances)
        self._factory = factory
        self._killed: set[int] = set()
        self._moves: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    def add_request(self, instance: int, request_id: str, prompt: str,
                    sampling: SamplingParams, **kwargs: Any) -> None:
        if (target := self._running(instance)) is not None:
            target.add_request(request_id, prompt, sampling, **kwargs)

    def abort(self, instance: int, request_id: str) -> None:
        if (target := self._running(instance)) is not None:
            target.abort(request_id)

    def poll(self, instance: int, max_wait_s: float) -> InstanceReport:
        """The instance's outputs since the last poll; ``InstanceDied`` once it is killed."""
        report = self._alive(instance).poll(max_wait_s)
        self._alive(instance)  # killed while waiting: what it said is lost
        return report

    def pick_request(self, instance: int, policy: str) -> str | None:
        return self._alive(instance).pick_request(policy)

    def migrate_out(self, source: int, destination: int, request_id: str,
                    config: MigrationConfig) -> None:
        """Start moving a request; its result comes in the source's next reports."""
        if source in self._killed:
            return

        def call(method: str, *args: Any) -> Any:
            return getattr(self._alive(destination), method)(*args)

        thread = threading.Thread(target=self._alive(source).migrate_out,
                                  args=(request_id, Peer(call), config),
                                  name=f"migrate-{source}-to-{destination}", daemon=True)
        with self._lock:
            self._moves = [t for t in self._moves if t.is_alive()]
            self._moves.append(thread)
        thread.start()

    def start_instance(self) -> int:
        """Build one more instance (blocks while its model loads); returns its number."""
        if self._factory is None:
            raise RuntimeError("these instances have no factory: none can be added")
        with self._lock:
            instance = len(self.instances)
            self.instances.append(None)  # the number is taken; calls to it fail until up
            self._killed.add(instance)
        built = self._factory(instance)  # raising: the number stays unused
        with self._lock:
            self.instances[instance] = built
            if not self._closed:
                self._killed.discard(instance)
                return instance
        built.shutdown()
        raise InstanceDied(f"engine instance {instance}: shut down while it started")

    def stop_instance(self, instance: int, timeout_s: float = 10.0) -> None:
        """Stop an instance (drained: it holds no request); its later polls raise."""
        self.kill(instance)

    def kill(self, instance: int) -> None:
        """The instance dies: it stops, and the frontend learns it from its next poll."""
        with self._lock:
            if instance in self._killed:
                return
            self._killed.add(instance)
            target = self.instances[instance]
        if target is not None:
            target.shutdown()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every instance still running, and wait for the moves in flight."""
        with self._lock:
            self._closed = True
        for instance in range(self.num_instances):
            self.kill(instance)
        with self._lock:
            moves, self._moves = self._moves, []
        for thread in moves:
            thread.join(timeout_s)

    def _running(self, instance: int) -> EngineInstance | None:
        return None if instance in self._killed else self.instances[instance]

    def _alive(self, instance: int) -> EngineInstance:
        if (target := self._running(instance)) is None:
            raise InstanceDied(f"engine instance {instance} died: it was killed")
        return target
