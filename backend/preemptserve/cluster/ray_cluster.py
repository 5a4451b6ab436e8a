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
poll), ``migration`` (moves out and in, and picking the request to move) and
``migration_in`` (a destination's side of gloo transfers: never queued behind the
instance's own moves out, which would leave the source's send waiting until its timeout).

``ClusterConfig.migration_transport`` chooses how a move's block data travels: through
the object store (numpy arrays in the stage call), or over a pairwise gloo group between
the two instance processes (``cluster/gloo_transport.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import ClusterConfig, EngineConfig
from ..engine.iteration_stats import instance_log_path
from .instance import EngineInstance, InstanceReport, Peer
from .migration import MigrationConfig

if TYPE_CHECKING:
    from .gloo_transport import PairGroups

logger = logging.getLogger(__name__)

_GROUPS = {"requests": 1, "poll": 1, "migration": 2, "migration_in": 2}
_GROUP_OF = {"add_request": "requests", "abort": "requests", "poll": "poll",
             "pick_request": "migration", "migrate_out": "migration",
             "stage_in": "migration", "release_reservation": "migration",
             "gloo_has": "migration_in", "gloo_join": "migration_in",
             "gloo_stage_in": "migration_in"}


def _on_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine's loopback interface."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handling across ``ray.init``, which makes SIGTERM exit
    the driver. In Triton's Python backend stub SIGTERM is ignored (the stub's own
    handler does nothing: tritonserver owns the shutdown and calls ``finalize``); with
    Ray's handler a SIGTERM sent to the server's process group (Ctrl-C, a process
    manager) raised ``SystemExit`` in the middle of ``finalize``, and the stub then
    crashed in Ray's failure-signal handler instead of stopping its instances."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        # None: a handler installed outside Python (the stub's, which does nothing).
        signal.signal(signal.SIGTERM, _ignore if previous is None else previous)


def _ignore(signum: int, frame: Any) -> None:
    """SIGTERM does nothing here (as in the stub before Ray came)."""


class InstanceDied(RuntimeError):
    """An instance actor is gone (its process died or it was killed)."""


class RayInstance(EngineInstance):
    """``EngineInstance`` as a Ray actor: its migration destinations are actor handles,
    its block data goes by ``migration_transport`` ("object_store" or "gloo")."""

    def __init__(self, instance_id: int, config: EngineConfig, *,
                 migration_transport: str = "object_store", **kwargs: Any) -> None:
        super().__init__(instance_id, config, **kwargs)
        self._transport = migration_transport
        self._gloo_groups: PairGroups | None = None
        self._gloo_lock = threading.Lock()

    def migrate_out(self, request_id: str, destination: Any,  # type: ignore[override]
                    config: MigrationConfig, timeout_s: float = 10.0,
                    destination_id: int | None = None):
        """Move a request to the instance of actor handle ``destination`` (numbered
        ``destination_id``: gloo's groups are by instance number; without it, the object
        store carries the data)."""
        return super().migrate_out(request_id, self._peer(destination, timeout_s,
                                                         destination_id), config)

    def _peer(self, destination: Any, timeout_s: float, destination_id: int | None) -> Peer:
        """The instance of actor handle ``destination`` as a migration destination, every
        call bounded by ``timeout_s``."""
        import ray

        def start(method: str, *args: Any):
            remote = getattr(destination, method).options(concurrency_group=_GROUP_OF[method])
            ref = remote.remote(*args)
            return lambda: ray.get(ref, timeout=timeout_s)

        def call(method: str, *args: Any) -> Any:
            return start(method, *args)()

        if self._transport == "gloo" and destination_id is not None:
            from .gloo_transport import GlooPeer

            return GlooPeer(call, start, self._gloo(), str(self.instance_id),
                            str(destination_id))
        return Peer(call)

    # -- a destination's side of gloo transfers (``cluster/gloo_transport.py``) -------------

    def gloo_has(self, source: str, group_id: str) -> bool:
        return self._gloo().has(source, group_id)

    def gloo_join(self, source: str, group_id: str, port: int) -> None:
        self._gloo().join(source, group_id, port)

    def gloo_stage_in(self, source: str, group_id: str, tag: int, specs: list, request_id: str,
                      on_host: bool, num_blocks: int, snapshot: Any) -> str:
        """Receive one stage's block data from ``source``, then ``stage_in`` it."""
        self._touched[request_id] = time.monotonic()  # a call of its source, as stage_in
        try:
            tensors, used_up = self._gloo().receive(source, group_id, tag, specs)
        except Exception as exc:
            return f"receiving over gloo failed: {type(exc).__name__}: {exc}"
        # If this raises (the engine thread late), the buffer is not reused: the engine
        # may still copy from it.
        reason = self.stage_in(request_id, on_host, tensors, num_blocks, snapshot)
        used_up()
        return reason

    def transport_info(self) -> dict[str, Any]:
        """The transport, and for gloo its groups and bytes moved so far."""
        info: dict[str, Any] = {"transport": self._transport}
        if self._gloo_groups is not None:
            info.update(self._gloo_groups.describe())
        return info

    def shutdown(self) -> None:
        super().shutdown()
        if self._gloo_groups is not None:
            self._gloo_groups.close()

    def _gloo(self) -> PairGroups:
        with self._gloo_lock:
            if self._gloo_groups is None:
                from .gloo_transport import PairGroups

                self._gloo_groups = PairGroups(self._reservation_timeout_s)
            return self._gloo_groups


class RayCluster:
    """Starts (or joins) Ray and ``num_instances`` instance actors; ``shutdown`` ends them,
    and the private cluster if this object started it. Construct it in the main thread.

    Auto-scaling: ``start_instance`` adds one actor (any thread; it blocks while the actor
    loads its model), ``stop_instance`` ends one and frees its resources. Instance numbers
    are never reused. A private cluster is sized for ``max_instances`` with scaling on.
    """

    def __init__(self, config: ClusterConfig, engine: EngineConfig, name: str = "llm",
                 iteration_stats_path: str = "") -> None:
        """``iteration_stats_path``: each instance logs its iterations to its own file,
        ``instance_log_path(iteration_stats_path, i)``; "": no log."""
        import ray

        self._ray = ray
        self.config = config
        private = not config.ray_address
        os.environ["RAY_AUTH_MODE"] = config.ray_auth_mode or ("disabled" if private
                                                               else "token")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Ray read RAY_AUTH_MODE when it was imported: make it read it again (as Ray
            # does itself when it turns token mode on), else a join in token mode fails.
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
            # Loopback only for a private cluster, and to join a head on loopback: Ray would
            # rewrite 127.0.0.1 to the machine's address, where that head does not listen,
            # and wait there forever.
            if private or _on_loopback(config.ray_address):
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
                # Ray reads that variable when it is imported: already done here.
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
            most = config.scaling_max_instances if config.enable_scaling \
                else config.num_instances
            with _sigterm_kept():
                if private:
                    ray.init(address="local", num_cpus=max(os.cpu_count() or 1,
                                                           most * config.cpus_per_instance),
                             include_dashboard=False, log_to_driver=False,
                             _temp_dir=config.ray_temp_dir or None, namespace="preemptserve")
                else:
                    ray.init(address=config.ray_address, log_to_driver=False,
                             namespace="preemptserve")
        self._actor = ray.remote(num_cpus=config.cpus_per_instance,
                                 concurrency_groups=_GROUPS, max_restarts=0)(RayInstance)
        self._engine = engine
        self._iteration_stats_path = iteration_stats_path
        self._lock = threading.Lock()
        self.handles = [self._new_actor(i) for i in range(config.num_instances)]
        try:
            # Each loads the model (seconds); a broken config fails here, loudly.
            self.infos: list[dict[str, Any]] = ray.get(
                [h.info.remote() for h in self.handles], timeout=600)
        except Exception:
            self.shutdown()
            raise

    def _new_actor(self, instance: int):
        config = self.config
        return self._actor.remote(instance, self._engine, torch_threads=config.cpus_per_instance,
                                  reservation_timeout_s=config.migration_timeout_s,
                                  migration_transport=config.migration_transport,
                                  stats_period_s=config.polling_interval_ms / 1000,
                                  iteration_stats_path=instance_log_path(
                                      self._iteration_stats_path, instance) or None)

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
                                                   config, self.config.migration_timeout_s,
                                                   destination)

    # -- scaling -------------------------------------------------------------------------------

    def start_instance(self, timeout_s: float = 600.0) -> int:
        """Start one more instance actor and wait until its model is loaded; returns its
        number. Raises if it does not come up (the actor is then killed)."""
        with self._lock:
            instance = len(self.handles)
            handle = self._new_actor(instance)
            self.handles.append(handle)
            self.infos.append({"instance_id": instance})  # until it answers
        try:
            info = self._ray.get(handle.info.remote(), timeout=timeout_s)
        except Exception:
            self._kill(handle)
            raise
        self.infos[instance] = info
        return instance

    def stop_instance(self, instance: int, timeout_s: float = 10.0) -> None:
        """End an instance actor (gracefully, then by force): its process and its Ray
        resources are freed. Its later calls fail as a dead actor's."""
        handle = self.handles[instance]
        try:
            self._ray.get(handle.shutdown.remote(), timeout=timeout_s)
        except Exception:
            logger.warning("instance %d did not stop gracefully", instance)
        self._kill(handle)

    def _kill(self, handle: Any) -> None:
        try:
            self._ray.kill(handle)
        except Exception:
            pass

    def _method(self, instance: int, name: str):
        return getattr(self.handles[instance], name).options(concurrency_group=_GROUP_OF[name])

    # -- the end -------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every instance (gracefully, then by force) and the private cluster."""
        ray = self._ray
        if not ray.is_initialized():
            return
        with self._lock:
            handles = list(self.handles)
        pending = [h.shutdown.remote() for h in handles]
        try:
            ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
        except Exception:
            logger.exception("stopping the instances failed")
        for handle in handles:
            self._kill(handle)
        if self._owns_ray:
            ray.shutdown()
