"""The Ray side of a cluster: Ray started (or joined), the instance actors, their calls.

Facts this module is built on (``../shared/design/llumnix.md`` section 3, measured here):

* Ray binds every interface unless told: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` pins a
  private cluster's node to 127.0.0.1 (GCS and raylet then listen on loopback only).
* Token authentication is on by default in Ray 2.6x: ``RAY_AUTH_MODE`` is always set
  explicitly (``disabled`` for the private loopback cluster, ``token`` when joining).
* ``ray.init`` must run in the process's main thread (Triton's ``initialize``): from a
  thread that exits, Ray's daemons die with the thread and the driver hangs.
* ``ray.shutdown()`` stops a private cluster's processes within seconds; never ``ray
  stop``, which kills every Ray process of the machine.

Each instance is an actor of ``EngineInstance`` (``cluster/instance.py``) in its own
process, with concurrency groups so that calls of one kind stay in order while others
proceed: ``requests`` (add, abort: one thread, in order), ``poll`` (the frontend's long
poll) and ``migration`` (moves out and in, and picking the request to move).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..config import ClusterConfig, EngineConfig
from .instance import EngineInstance, InstanceReport, Peer
from .migration import MigrationConfig

logger = logging.getLogger(__name__)

_GROUPS = {"requests": 1, "poll": 1, "migration": 2}
_GROUP_OF = {"add_request": "requests", "abort": "requests", "poll": "poll",
             "pick_request": "migration", "migrate_out": "migration",
             "stage_in": "migration", "release_reservation": "migration"}


class InstanceDied(RuntimeError):
    """An instance actor is gone (its process died or it was killed)."""


class RayInstance(EngineInstance):
    """``EngineInstance`` as a Ray actor: its migration destinations are actor handles."""

    def migrate_out(self, request_id: str, destination: Any,  # type: ignore[override]
                    config: MigrationConfig, timeout_s: float = 10.0):
        import ray

        def call(method: str, *args: Any) -> Any:
            remote = getattr(destination, method).options(concurrency_group=_GROUP_OF[method])
            return ray.get(remote.remote(*args), timeout=timeout_s)

        return super().migrate_out(request_id, Peer(call), config)


class RayCluster:
    """Starts (or joins) Ray and ``num_instances`` instance actors; ``shutdown`` ends them,
    and the private cluster if this object started it. Construct it in the main thread."""

    def __init__(self, config: ClusterConfig, engine: EngineConfig, name: str = "llm") -> None:
        import ray

        self._ray = ray
        self.config = config
        private = not config.ray_address
        os.environ["RAY_AUTH_MODE"] = config.ray_auth_mode or ("disabled" if private
                                                               else "token")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if private:
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1,
                                                       config.num_instances
                                                       * config.cpus_per_instance),
                         include_dashboard=False, log_to_driver=False,
                         _temp_dir=config.ray_temp_dir or None, namespace="preemptserve")
            else:
                ray.init(address=config.ray_address, log_to_driver=False,
                         namespace="preemptserve")
        actor = ray.remote(num_cpus=config.cpus_per_instance, concurrency_groups=_GROUPS,
                           max_restarts=0)(RayInstance)
        timeout = config.migration_timeout_s
        self.handles = [
            actor.remote(i, engine, torch_threads=config.cpus_per_instance,
                         reservation_timeout_s=timeout,
                         stats_period_s=config.polling_interval_ms / 1000)
            for i in range(config.num_instances)
        ]
        try:
            # Each loads the model (seconds); a broken config fails here, loudly.
            self.infos: list[dict[str, Any]] = ray.get(
                [h.info.remote() for h in self.handles], timeout=600)
        except Exception:
            self.shutdown()
            raise
        self._lock = threading.Lock()

    @property
    def num_instances(self) -> int:
        return len(self.handles)

    # -- calls, as the frontend makes them -------------------------------------------------

    def add_request(self, instance: int, request_id: str, prompt: str, sampling,
                    **kwargs: Any) -> None:
        self._method(instance, "add_request").remote(request_id, prompt, sampling, **kwargs)

    def abort(self, instance: int, request_id: str) -> None:
        self._method(instance, "abort").remote(request_id)

    def poll(self, instance: int, max_wait_s: float) -> InstanceReport:
        """The instance's outputs since the last poll; ``InstanceDied`` if it is gone."""
        ray = self._ray
        try:
            return ray.get(self._method(instance, "poll").remote(max_wait_s),
                           timeout=max_wait_s + self.config.migration_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
            raise InstanceDied(f"engine instance {instance} died: {exc}") from exc

    def pick_request(self, instance: int, policy: str) -> str | None:
        return self._ray.get(self._method(instance, "pick_request").remote(policy),
                             timeout=self.config.migration_timeout_s)

    def migrate_out(self, source: int, destination: int, request_id: str,
                    config: MigrationConfig) -> None:
        """Start moving a request; its result comes in the source's next reports."""
        self._method(source, "migrate_out").remote(request_id, self.handles[destination],
                                                   config, self.config.migration_timeout_s)

    def _method(self, instance: int, name: str):
        return getattr(self.handles[instance], name).options(concurrency_group=_GROUP_OF[name])

    # -- the end -------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every instance (gracefully, then by force) and the private cluster."""
        ray = self._ray
        if not ray.is_initialized():
            return
        pending = [h.shutdown.remote() for h in self.handles]
        try:
            ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
        except Exception:
            logger.exception("stopping the instances failed")
        for handle in self.handles:
            try:
                ray.kill(handle)
            except Exception:
                pass
        if self._owns_ray:
            ray.shutdown()
