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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from ..core.request import SamplingParams
from .instance import EngineInstance, InstanceReport, Peer
from .migration import MigrationConfig
from .ray_cluster import InstanceDied  # ray_cluster imports ray only when used

logger = logging.getLogger(__name__)


class LocalInstances:
    """``EngineInstance``s of this process as the frontend's ``Instances``; instance ``i``
    is ``instances[i]``. ``shutdown`` stops them all."""

    def __init__(self, instances: Sequence[EngineInstance]) -> None:
        self.instances = list(instances)
        self._killed: set[int] = set()
        self._moves: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    def add_request(self, instance: int, request_id: str, prompt: str,
                    sampling: SamplingParams, **kwargs: Any) -> None:
        if instance not in self._killed:
            self.instances[instance].add_request(request_id, prompt, sampling, **kwargs)

    def abort(self, instance: int, request_id: str) -> None:
        if instance not in self._killed:
            self.instances[instance].abort(request_id)

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

        thread = threading.Thread(target=self.instances[source].migrate_out,
                                  args=(request_id, Peer(call), config),
                                  name=f"migrate-{source}-to-{destination}", daemon=True)
        with self._lock:
            self._moves = [t for t in self._moves if t.is_alive()]
            self._moves.append(thread)
        thread.start()

    def kill(self, instance: int) -> None:
        """The instance dies: it stops, and the frontend learns it from its next poll."""
        with self._lock:
            if instance in self._killed:
                return
            self._killed.add(instance)
        self.instances[instance].shutdown()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every instance still running, and wait for the moves in flight."""
        for instance in range(self.num_instances):
            self.kill(instance)
        with self._lock:
            moves, self._moves = self._moves, []
        for thread in moves:
            thread.join(timeout_s)

    def _alive(self, instance: int) -> EngineInstance:
        if instance in self._killed:
            raise InstanceDied(f"engine instance {instance} died: it was killed")
        return self.instances[instance]
