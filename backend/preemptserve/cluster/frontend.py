"""Many engine instances behind one model: the frontend and global scheduler (Llumnix's
manager and API server in one), with ``EngineLoop``'s interface so the Triton adapter
serves a cluster exactly as it serves one engine.

* **Dispatch**: each new request goes to the instance the ``Dispatcher`` chooses
  (``core/global_scheduler.py``: round robin, queue-blind balance, or Llumnix's
  freeness) from the instances' load reports, into which the frontend puts the
  high-priority headroom (``priority_headroom_blocks``) before anyone reads them.
* **Outputs**: one thread per instance long-polls it (``poll``: outputs since the last
  poll, its load and statistics, its finished moves). A request's outputs may come from
  two instances around a move, and the two polls race: outputs are delivered strictly
  in token order, each once (an output numbered ``n`` waits for ``n - 1``; a number
  seen already is dropped), as Llumnix's frontend does. A cancellation or an error
  ends a request at once. One sender thread runs the response callbacks, in order per
  request, and polls cancellation, as ``EngineLoop`` does.
* **Cancellation** goes to the request's owner, and to both instances while it moves.
  An output of a request that has ended here (cancelled while moving, or failed) makes
  the frontend cancel it on that instance.
* **Migration**: every polling interval the frontend pairs overloaded instances with
  free ones (``pair_migrations``, one move per instance at a time); the source picks
  its request (``SR``) and drives the move; the result comes back in its report, and a
  committed move makes the destination the owner.
* **Failures**: an instance whose poll fails is dead: its requests end with an error
  response, it gets no new ones, the others serve on. With none left the model fails
  (with auto-scaling: once no new instance can start either).
* **Auto-scaling** (``enable_scaling``): every polling interval ``ScalingPolicy.decide``
  (``core/scaling.py``) reads the newest reports. *Add*: a drain in progress is called
  off first (that instance is warm), then new instances start on threads of their own
  (``Instances.start_instance``: seconds of model load that block nothing else); a new
  instance takes requests from its first report on. *Drain*: the instance takes no new
  request, and every interval one of its started requests moves to the freest other
  instance (``drain_pairs``, the migration machinery, one move at a time; requests
  that never started first, see ``DRAIN_REQUEST_POLICY``); once it holds nothing it
  is stopped (``Instances.stop_instance``), its counters staying in the sums. Never
  more than ``max_instances`` instances exist (starting and draining ones included),
  nor fewer than ``min_instances`` serve: a dead one below it is replaced.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..config import ClusterConfig
from ..core.global_scheduler import (
    WAITING_POLICIES,
    Dispatcher,
    NoInstanceError,
    pair_migrations,
)
from ..core.request import SamplingParams
from ..core.scheduler.load import InstanceLoad
from ..engine.outputs import EngineStats, RequestOutput
from ..serving.engine_loop import OutputCallback, QueueFullError
from ..serving.sender import ResponseSender
from .autoscaling import LIVE_STATES, AutoScaling, InstanceState
from .instance import InstanceReport
from .migration import MigrationConfig, MigrationResult, MigrationStatus
from .stats import ClusterStats, counters_only, sum_stats

logger = logging.getLogger(__name__)


class Instances(Protocol):
    """The frontend's view of the instances (``RayCluster``, or in-process ones)."""

    num_instances: int

    def add_request(self, instance: int, request_id: str, prompt: str,
                    sampling: SamplingParams, **kwargs) -> None: ...

    def abort(self, instance: int, request_id: str) -> None: ...

    def poll(self, instance: int, max_wait_s: float) -> InstanceReport: ...

    def pick_request(self, instance: int, policy: str) -> str | None: ...

    def migrate_out(self, source: int, destination: int, request_id: str,
                    config: MigrationConfig) -> None: ...

    # Auto-scaling only:
    def start_instance(self) -> int:
        """Start one more instance; returns its number once it serves (blocks meanwhile)."""
        ...

    def stop_instance(self, instance: int) -> None:
        """Stop an instance (drained: it holds no request) and free its resources."""
        ...


@dataclass(eq=False)
class _Routed:
    request_id: str
    on_output: OutputCallback
    is_cancelled: Callable[[], bool] | None
    owner: int
    moving_to: int | None = None
    delivered: int = 0  # output tokens delivered
    held: dict[int, RequestOutput] = field(default_factory=dict)  # ahead of their turn
    ended: bool = False  # final output queued for the sender
    cancelled: bool = False
    polling: bool = False  # sender thread: is_cancelled() still asked

    def __post_init__(self) -> None:
        self.polling = self.is_cancelled is not None


class ClusterFrontend(AutoScaling):
    def __init__(self, instances: Instances, config: ClusterConfig, *,
                 prompt_blocks: Callable[[str], int] = lambda prompt: 0,
                 cancellation_check_period_s: float = 0.05,
                 on_stats: Callable[[EngineStats], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 max_queue_size: int = 0) -> None:
        """``prompt_blocks(prompt)``: KV blocks a prompt needs (for dispatch freeness).
        ``max_queue_size``: most requests without a first token yet before ``submit``
        refuses new ones (0: unbounded). ``on_stats`` (the instances' statistics summed,
        at most every polling interval) and ``on_failure`` run on the response sender's
        thread, as every response callback does."""
        self.instances = instances
        self.config = config
        self._n = instances.num_instances
        self._prompt_blocks = prompt_blocks
        self._dispatcher = Dispatcher(config.dispatch_policy, self._n)
        self._migration = MigrationConfig(config.migration_max_stages,
                                          config.migration_last_stage_max_blocks)
        self._interval_s = config.polling_interval_ms / 1000
        self._on_stats = on_stats
        self._stats_lock = threading.Lock()
        self._last_published = 0.0
        self._on_failure = on_failure
        self._max_queue_size = max_queue_size
        self._lock = threading.Lock()
        self._requests: dict[str, _Routed] = {}
        self._num_waiting_first = 0  # requests without their first output yet
        self._waiting_first: set[str] = set()
        self._num_rejected = 0
        # By instance number; grows as instances start (None: a number whose start failed).
        self._states: list[InstanceState | None] = [InstanceState.ALIVE] * self._n
        self._scaling = config.scaling_policy() if config.enable_scaling else None
        self._num_launching = 0  # starts in flight (their numbers come when they are up)
        self._no_start_before = 0.0  # monotonic time: a start failed, wait an interval
        self._loads: dict[int, InstanceLoad] = {}
        self._stats: dict[int, EngineStats] = {}
        self._moving: dict[str, tuple[int, int]] = {}  # request -> (source, destination)
        self.stats = ClusterStats(num_instances=self._n, num_alive=self._n)
        self._failure: str | None = None
        self._sender = ResponseSender(cancellation_check_period_s, self._pollable,
                                      self._forget, self.cancel)
        self._stop = threading.Event()
        self._threads = [self._poller(i) for i in range(self._n)]
        if config.enable_migration or config.enable_scaling:
            self._threads.append(threading.Thread(target=self._control, name="cluster-control",
                                                  daemon=True))

    def start(self) -> None:
        self._sender.start()
        for thread in self._threads:
            thread.start()

    def _poller(self, instance: int) -> threading.Thread:
        return threading.Thread(target=self._poll_instance, args=(instance,),
                                name=f"poll-instance-{instance}", daemon=True)

    # -- EngineLoop's interface ---------------------------------------------------------------

    def submit(self, prompt: str, sampling: SamplingParams, on_output: OutputCallback,
               is_cancelled: Callable[[], bool] | None = None, *,
               ttft_slo_s: float | None = None, tbt_slo_s: float | None = None,
               echo_prompt: bool = False, stream: bool = True,
               priority: str = "normal") -> str:
        request_id = uuid.uuid4().hex
        blocks = self._prompt_blocks(prompt)
        with self._lock:
            if self._failure is not None:
                self._sender.put(_Routed(request_id, on_output, None, -1, ended=True),
                                  _final(request_id, "error"),
                                  f"the model is unhealthy: {self._failure}")
                return request_id
            if self._max_queue_size and len(self._waiting_first) >= self._max_queue_size:
                self._num_rejected += 1
                raise QueueFullError(self._max_queue_size)
            try:
                instance = self._dispatcher.choose(blocks, priority)
            except (NoInstanceError, ValueError) as exc:  # ValueError: a bad priority
                self._sender.put(_Routed(request_id, on_output, None, -1, ended=True),
                                  _final(request_id, "error"), str(exc))
                return request_id
            self._requests[request_id] = _Routed(request_id, on_output, is_cancelled, instance)
            self._waiting_first.add(request_id)
        self.instances.add_request(instance, request_id, prompt, sampling,
                                   ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s,
                                   echo_prompt=echo_prompt, stream=stream, priority=priority)
        return request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            routed = self._requests.get(request_id)
            if routed is None or routed.ended:
                return
            routed.cancelled = True
            targets = {routed.owner} | ({routed.moving_to} - {None})
        for instance in targets:
            self._abort_on(instance, request_id)

    @property
    def num_queued(self) -> int:
        with self._lock:
            return len(self._waiting_first)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def num_rejected_total(self) -> int:
        return self._num_rejected

    @property
    def failure(self) -> str | None:
        return self._failure

    def migrate(self, request_id: str, destination: int,
                config: MigrationConfig | None = None) -> bool:
        """Start moving a request to ``destination`` now (operators, tests, benchmarks),
        in stages as ``config`` says (default: the cluster's); False if it is not served,
        or moving already, or the destination is its owner or not serving (dead,
        starting, draining)."""
        with self._lock:
            routed = self._requests.get(request_id)
            if (routed is None or routed.ended or routed.moving_to is not None
                    or routed.owner == destination
                    or self._state(destination) is not InstanceState.ALIVE):
                return False
            source = routed.owner
            self._start_move(request_id, source, destination)
        self.instances.migrate_out(source, destination, request_id,
                                   config or self._migration)
        return True

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the frontend's threads; requests in flight end with an error."""
        self._stop.set()
        with self._lock:
            if self._failure is None:
                self._failure = "the model is shutting down"
            pending = [r for r in self._requests.values() if not r.ended]
            for routed in pending:
                routed.ended = True
                self._sender.put(routed, _final(routed.request_id, "error"),
                                  "the model is shutting down")
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)
        self._sender.stop(timeout_s)

    def instance_states(self) -> dict[int, InstanceState]:
        """Each instance's state (instances that never came up are left out)."""
        with self._lock:
            return {i: state for i, state in enumerate(self._states) if state is not None}

    # -- reports -------------------------------------------------------------------------------

    def _poll_instance(self, instance: int) -> None:
        while not self._stop.is_set() and not self._stopped(instance):
            try:
                report = self.instances.poll(instance, self._interval_s)
            except Exception as exc:
                if not self._stop.is_set() and not self._stopped(instance):
                    self._instance_died(instance, str(exc))
                return
            self._on_report(report)

    def _on_report(self, report: InstanceReport) -> None:
        i = report.instance_id
        aborts: list[tuple[int, str]] = []
        if self.config.priority_headroom_blocks:
            report.load = replace(report.load,
                                  priority_headroom_blocks=self.config.priority_headroom_blocks)
        with self._lock:
            state = self._states[i]
            if state in (InstanceState.STOPPING, InstanceState.STOPPED):
                return  # drained: its counters are in the sums already
            if state is InstanceState.DRAINING:
                report.load = replace(report.load, draining=True)
            elif state is InstanceState.STARTING:  # its first report: it takes requests
                self._states[i] = state = InstanceState.ALIVE
                self._dispatcher.set_alive(i, True)
            self._loads[i] = report.load
            self._stats[i] = report.stats
            self.stats.freeness[i] = report.load.migration_freeness
            if state in LIVE_STATES:
                self._dispatcher.update(i, report.load)
                if report.failure is not None:  # its requests got errors from it
                    self._states[i] = InstanceState.DEAD
                    self._dispatcher.set_alive(i, False)
            for output, error in report.outputs:
                aborts.extend(self._route(i, output, error))
            for request_id, result in report.migrations:
                aborts.extend(self._end_move(request_id, result))
            self._count_instances()
            stats = sum_stats(self._stats.values())
        for instance, request_id in aborts:
            self._abort_on(instance, request_id)
        self._publish(stats)

    def _publish(self, stats: EngineStats) -> None:
        """``on_stats`` at most every polling interval, on the response sender's thread."""
        if self._on_stats is None:
            return
        with self._stats_lock:
            now = time.monotonic()
            if now - self._last_published < self._interval_s:
                return
            self._last_published = now
        on_stats = self._on_stats
        self._sender.call(lambda: on_stats(stats))

    def _route(self, instance: int, output: RequestOutput,
               error: str | None) -> list[tuple[int, str]]:
        """Deliver one output in order, once (under the lock); returns aborts to send."""
        routed = self._requests.get(output.request_id)
        if routed is None or routed.ended:
            return [] if output.finished else [(instance, output.request_id)]
        self._waiting_first.discard(output.request_id)
        if error is not None or output.finish_reason == "abort":
            self._end(routed, output, error)
            return []
        number = output.num_output_tokens
        if number <= routed.delivered:
            return []  # seen already
        routed.held[number] = output
        while (ready := routed.held.pop(routed.delivered + 1, None)) is not None:
            routed.delivered += 1
            if ready.finished:
                self._end(routed, ready, None)
                return []
            self._sender.put(routed, ready, None)
        return []

    def _end(self, routed: _Routed, output: RequestOutput, error: str | None) -> None:
        routed.ended = True
        routed.held.clear()
        self._waiting_first.discard(routed.request_id)
        self._sender.put(routed, output, error)

    def _instance_died(self, instance: int, reason: str) -> None:
        logger.error("engine instance %d failed: %s", instance, reason)
        with self._lock:
            self._states[instance] = InstanceState.DEAD
            self._dispatcher.set_alive(instance, False)
            self._count_instances()
            if instance in self._stats:  # its counters stay; its gauges drop to zero
                self._stats[instance] = counters_only(self._stats[instance])
            self._loads.pop(instance, None)
            for routed in list(self._requests.values()):
                if routed.ended:
                    continue
                if routed.owner == instance:
                    self._end(routed, _final(routed.request_id, "error"),
                              f"engine instance {instance} failed; the request was lost")
                elif routed.moving_to == instance:
                    routed.moving_to = None  # the move aborts on the source's side
            for request_id, (source, _) in list(self._moving.items()):
                if source == instance:  # its result never comes: its destination is free
                    del self._moving[request_id]
            # With auto-scaling the next round starts new instances (below min_instances
            # at once); the model fails only if they cannot start.
            if self._scaling is None and not self._any_live():
                self._failure = f"every engine instance failed (the last: {reason})"
        self._report_failure()

    def _report_failure(self) -> None:
        if self._failure is not None and self._on_failure is not None:
            on_failure, failure = self._on_failure, self._failure
            self._sender.call(lambda: on_failure(failure))

    # -- instance states (under the lock) --------------------------------------------------

    def _state(self, instance: int) -> InstanceState | None:
        """None: no such instance, or it never came up."""
        return self._states[instance] if 0 <= instance < len(self._states) else None

    def _stopped(self, instance: int) -> bool:
        return self._states[instance] in (InstanceState.STOPPING, InstanceState.STOPPED)

    def _any_live(self) -> bool:
        return self._num_launching > 0 or any(state in LIVE_STATES for state in self._states)

    def _count_instances(self) -> None:
        count = Counter(self._states)
        self.stats.num_alive = count[InstanceState.ALIVE]
        self.stats.num_starting = self._num_launching + count[InstanceState.STARTING]
        self.stats.num_draining = count[InstanceState.DRAINING]
        self.stats.num_instances = (self.stats.num_alive + self.stats.num_starting
                                    + self.stats.num_draining)

    # -- migration -----------------------------------------------------------------------------

    def _control(self) -> None:
        """Every polling interval: migration pairing, then auto-scaling."""
        while not self._stop.wait(self._interval_s):
            if self.config.enable_migration:
                self._pair()
            if self._scaling is not None:
                try:
                    self._scale()
                except Exception:  # a bug here must not end pairing or scaling for good
                    logger.exception("auto-scaling round failed")

    def _pair(self) -> None:
        with self._lock:
            busy = {i for pair in self._moving.values() for i in pair}
            loads = {i: load for i, load in self._loads.items() if self._states[i] in LIVE_STATES}
        # Draining instances' loads say so: pair_migrations leaves them to _scale.
        waiting_moves = self.config.migration_request_policy in WAITING_POLICIES
        for source, destination in pair_migrations(loads, self.config.migrate_out_threshold,
                                                   busy, waiting_moves,
                                                   self.config.migrate_into_waiting):
            self._move_one(source, destination)

    def _move_one(self, source: int, destination: int, policy: str | None = None) -> None:
        """The source picks its request (by ``policy``, default the cluster's request
        policy) and moves it."""
        try:
            request_id = self.instances.pick_request(
                source, policy or self.config.migration_request_policy)
        except Exception:
            logger.exception("instance %d could not pick a request to move", source)
            return
        if request_id is None:
            return
        with self._lock:
            routed = self._requests.get(request_id)
            if (routed is None or routed.ended or routed.moving_to is not None
                    or self._state(destination) is not InstanceState.ALIVE):
                return
            self._start_move(request_id, source, destination)
        self.instances.migrate_out(source, destination, request_id, self._migration)

    def _start_move(self, request_id: str, source: int, destination: int) -> None:
        self._requests[request_id].moving_to = destination
        self._moving[request_id] = (source, destination)
        self.stats.migrations_started += 1

    def _end_move(self, request_id: str, result: MigrationResult) -> list[tuple[int, str]]:
        """A move ended (under the lock): count it, and hand the request to its new owner."""
        source, destination = self._moving.pop(request_id, (None, None))
        self.stats.count_move(result)
        routed = self._requests.get(request_id)
        if routed is not None:
            routed.moving_to = None
        if result.status is not MigrationStatus.COMMITTED:
            return []
        if routed is None or destination is None:
            return []
        routed.owner = destination
        if self._states[destination] not in LIVE_STATES and not routed.ended:  # dead meanwhile
            self._end(routed, _final(request_id, "error"),
                      f"engine instance {destination} failed; the request was lost")
        return [(destination, request_id)] if routed.ended or routed.cancelled else []

    def _abort_on(self, instance: int, request_id: str) -> None:
        try:
            self.instances.abort(instance, request_id)
        except Exception:
            logger.warning("could not cancel %s on instance %d", request_id, instance)

    # -- for the sender thread -------------------------------------------------------------

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def _pollable(self) -> list[_Routed]:
        with self._lock:
            return [r for r in self._requests.values() if r.polling and not r.ended]


def _final(request_id: str, reason: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, text="", token_ids=[], finished=True,
                         finish_reason=reason)
