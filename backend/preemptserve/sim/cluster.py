"""Discrete-event simulation of many engine instances behind one model (Llumnix-style).

N instances, each the real scheduler (any registered policy) and its own block manager
(``SimInstance``, the single-engine simulator's engine with its cost model and noise), on
one event queue and one virtual clock. The global policies are the server's own pure code
(``core/global_scheduler.py``), and a move is the server's ``StagedMigration``
(``cluster/migration.py``) over endpoints that are a scheduler and block manager with no
data. Events (``sim/events.py``; ties at one instant in this order):

* ``ITERATION_END`` / ``STEP`` of each instance, as in ``Simulator``: an instance's
  engine loop drains its inbox (requests dispatched to it, and calls: one half of a
  migration stage) between two steps, in the order they came, then plans the next step.
  Steps that decode the last plan's batch again, as the policy states, run without
  planning and apply their results later, with the same events (``sim/repeat.py``).
* ``STAGE_END``: a stage's copy is done; the destination's half (``stage_in``: reserve,
  and on the last stage adopt the request) then runs on the destination between two of
  its steps, and the next stage's source half on the source between two of its steps
  (the server's ``migrate_out`` loop, each call on that engine's thread).
* ``TICK`` every ``polling_interval_ms`` (50 ms): every instance reports its load
  (``instance_load``) to the ``Dispatcher`` (the server's reports are refreshed by each
  engine loop at most every 50 ms, so dispatch between two ticks sees the last report
  plus the requests dispatched since, as on the server); with migration on,
  ``pair_migrations`` on those reports (instances in a move are busy), and each source
  picks the request to move (``choose_request`` over ``migration_candidates()``) and
  starts the move between its next two steps.
* ``ARRIVAL``: a request reaches the frontend ``request_latency_s`` after it was sent; the
  frontend's queue limit (``max_queue_size``: requests without a first token yet, over
  the whole cluster), then ``Dispatcher.choose`` with the blocks of its prompt and first
  token, and the request's priority (``RequestSpec.priority``).
* **Auto-scaling** (``enable_scaling``; ``core/scaling.py``): at every tick, after the
  pairing, ``ScalingPolicy.decide`` on the reports of the instances that are up (the
  draining ones marked ``draining``), with the instances still starting as
  ``num_starting``. An added instance comes up ``startup_s`` later (``INSTANCE_UP``;
  the model's load) and takes requests from then on. A drained instance takes no new
  request (``Dispatcher.set_draining``); at each tick, if it is not in a move, its
  shortest started request moves to the freest other instance (``drain_pairs``, the
  server's move; a drain moves requests with ``enable_migration`` off too, it is how an
  instance empties), and its never-scheduled requests wait to start there first; once
  it holds no request it stops. Instances are ``0 .. max_instances - 1``; the first
  ``num_instances`` are up at 0, an added instance is the lowest-numbered one that is
  off.

A stage takes ``MigrationCost.stage_time_s(bytes)`` = ``fixed_s + bytes / bytes_per_s``
of virtual time (``bytes``: the stage's blocks x the block size in bytes). During a stage
before the last the source keeps stepping; the last stage stops the request (``detach`` +
``pin``), and its downtime is from then to its import on the destination: the stage's time
plus the wait for the destination's current step to end.

Metrics beyond ``SimResult``'s (``ClusterResult.cluster_summary``):

* migrations started, committed and aborted (by side and reason), stages, bytes; the
  downtime distribution of committed moves;
* **preemption loss**: the time started requests spent preempted (status ``PREEMPTED``:
  swapped out, dropped for recomputation, or passed over by the policy; counted as the
  preempted requests of each iteration times its duration), per finished request; the
  recomputed tokens are in ``num_recomputed_tokens``;
* **fragmentation**: at each tick, the cluster is fragmented when some instance's
  head-of-line waiting request does not fit in that instance's available blocks but fits
  in the sum of every instance's (available = the load report's: device blocks not in
  use, less host-tier blocks of started requests, floored at 0); reported as the share of
  ticks fragmented and the mean over ticks of the summed available blocks while
  fragmented, as a share of all blocks;
* **instance-seconds** (cost): the time each instance was on (starting, up or draining),
  summed, from 0 to the last event of work; without scaling, instances x that time;
  with scaling also the scale events and the mean number of instances on.

With one instance, ``round_robin`` and no migration, the run equals ``Simulator``'s
(same iterations, token times, counters; tested), given no ``max_queue_size``: the
single engine's limit counts its never-scheduled requests, the frontend's requests
without a first token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..bench.metrics import SLO
from ..cluster.migration import (
    MigrationConfig,
    MigrationResult,
    MigrationStatus,
    StagedMigration,
    reason_kind,
)
from ..config import ClusterConfig, serving_config_from_parameters
from ..core.global_scheduler import (
    WAITING_POLICIES,
    Dispatcher,
    choose_request,
    migration_candidates,
    pair_migrations,
)
from ..core.scheduler.load import InstanceLoad, instance_load
from .cluster_moves import (
    MigrationCost,
    _Call,
    _Destination,
    _Move,
    _Source,
    migration_cost,
)
from .cluster_result import ClusterResult
from .cluster_scaling import _DRAINING, _OFF, _UP, _Scaling
from .cost_model import IterationCostModel
from .events import EventKind, EventQueue
from .repeat import RepeatedSteps
from .simulator import SimConfig, SimInstance, _Tracked, new_request

if TYPE_CHECKING:  # annotations only: importing it needs torch
    from ..engine.migration import StageOut


@dataclass(frozen=True)
class ClusterSimConfig:
    instance: SimConfig  # every instance's engine (the same model, policy and sizes)
    cluster: ClusterConfig
    migration_cost: MigrationCost
    check_invariants: bool = False  # every block manager's check_invariants() after each event
    # Auto-scaling: the time from adding an instance to its taking requests (loading the
    # model). Assumed: 20 s, a 7B checkpoint (13.5 GB) read at ~1 GB/s plus start-up.
    startup_s: float = 20.0
    # Steps that decode the last plan's batch again run without planning, as the policy
    # states (``sim/repeat.py``); the results are the same with it off (every step planned).
    repeated_steps: bool = True

    @classmethod
    def from_parameters(
        cls,
        parameters: Mapping[str, str],
        cost_model: IterationCostModel,
        migration_cost_name: str = "auto",
        check_invariants: bool = False,
        startup_s: float = 20.0,
    ) -> ClusterSimConfig:
        """The same ``config.pbtxt`` parameters the server reads (``num_instances``,
        ``dispatch_policy``, ``enable_migration``, ``migrate_out_threshold``,
        ``enable_scaling``, ...)."""
        cluster = serving_config_from_parameters(parameters).cluster
        return cls(
            SimConfig.from_parameters(parameters, cost_model),
            cluster,
            migration_cost(migration_cost_name, cost_model, cluster.migration_transport),
            check_invariants,
            startup_s,
        )


def instance_noise_seed(noise_seed: int, instance: int) -> int:
    """Instance 0 draws as ``Simulator`` does; the others from seeds of their own."""
    return noise_seed if instance == 0 else (noise_seed << 16) ^ instance


class ClusterSimulator(_Scaling):
    def __init__(
        self,
        config: ClusterSimConfig,
        cost_model: IterationCostModel,
        workload: Any,
        slo: SLO | None = None,
    ) -> None:
        """``slo``: set on every request as its own objectives (see ``Simulator``)."""
        self.config = config
        self.cost_model = cost_model
        self.workload = workload
        self.slo = slo
        self.now_s = 0.0
        cluster = config.cluster
        n = cluster.num_instances
        # With auto-scaling every instance that may ever run exists from the start; the
        # ones beyond num_instances are off (never dispatched to) until added.
        n_max = cluster.scaling_max_instances if cluster.enable_scaling else n
        clock = self._clock
        self.instances = [
            SimInstance(config.instance, cost_model, clock,
                        instance_noise_seed(config.instance.noise_seed, i))
            for i in range(n_max)
        ]
        self.dispatcher = Dispatcher(cluster.dispatch_policy, n_max)
        for i in range(n, n_max):
            self.dispatcher.set_alive(i, False)
        self.scaling = cluster.scaling_policy() if cluster.enable_scaling else None
        self._state = [_UP] * n + [_OFF] * (n_max - n)
        self._on_since: list[float | None] = [0.0] * n + [None] * (n_max - n)
        self._on_s = [0.0] * n_max  # time on, summed over the instance's past periods
        block_bytes = config.instance.block_bytes
        self._sources = [_Source(inst, clock, block_bytes) for inst in self.instances]
        self._destinations = [_Destination(inst) for inst in self.instances]
        self._migration = MigrationConfig(config.cluster.migration_max_stages,
                                          config.cluster.migration_last_stage_max_blocks)

    def _clock(self) -> float:
        return self.now_s

    def run(self, on_finish: Callable[[int], None] | None = None) -> ClusterResult:
        """Simulate the whole workload; ``on_finish(n)`` after each ``n`` finishes."""
        wall_start = time.perf_counter()
        cfg, cost, cluster = self.config, self.cost_model, self.config.cluster
        n = len(self.instances)
        instances = self.instances
        events = self._events = EventQueue()
        specs = self.workload.requests
        if any(spec.index != i for i, spec in enumerate(specs)):
            raise ValueError("workload request indices must be 0, 1, 2, ... in order")
        for spec in specs:
            events.push(spec.arrival_time_s + cost.request_latency_s, EventKind.ARRIVAL, spec)
        tracked = [_Tracked(s.index, s.arrival_time_s, s.input_tokens) for s in specs]
        by_id: dict[str, _Tracked] = {}
        result = self._result = ClusterResult(
            cfg.instance.scheduler.policy, tracked, {}, [],
            num_instances=cluster.num_instances, dispatch_policy=cluster.dispatch_policy,
            enable_migration=cluster.enable_migration,
            migration_cost=(cfg.migration_cost
                            if cluster.enable_migration or cluster.enable_scaling else None),
            dispatched=[0] * n, enable_scaling=cluster.enable_scaling)
        self._inboxes: list[list[Any]] = [[] for _ in range(n)]
        self._busy = [False] * n  # an iteration is in flight or a STEP is queued
        self._moving: set[int] = set()  # instances in a move (Llumnix's one at a time)
        self._preempted_s = [0.0] * n
        # Each instance's run of repeated steps (None: it plans every step).
        runs: list[RepeatedSteps | None] = [None] * n
        self._runs, self._by_id = runs, by_id
        repeat = cfg.repeated_steps
        remaining = len(specs)  # requests not finished nor rejected
        max_queue_size = cfg.instance.max_queue_size
        waiting_first = 0  # admitted to the frontend, no first token yet
        block_size = cfg.instance.block_size
        tick_s = cluster.polling_interval_ms / 1000
        migrate = cluster.enable_migration and n > 1
        response_latency_s = cost.response_latency_s
        check = cfg.check_invariants
        last_work_s = 0.0
        if specs:
            events.push(0.0, EventKind.TICK)
        ITERATION_END, STEP, ARRIVAL = EventKind.ITERATION_END, EventKind.STEP, EventKind.ARRIVAL
        TICK = EventKind.TICK
        contention = cost.co_running_slowdown / (n - 1) if n > 1 else 0.0
        busy = self._busy
        while events:
            now, kind, payload = events.pop()
            self.now_s = now
            if kind is STEP and contention:
                # the machine's cores are shared: the other instances in a step slow it
                instances[payload].slowdown = 1 + contention * (
                    sum(busy) - busy[payload])
            if kind is STEP and runs[payload] is not None and self._repeat(payload):
                last_work_s = now  # the last plan again, one token further
            elif kind is STEP:
                last_work_s = now
                i = payload
                inst = instances[i]
                inbox = self._inboxes[i]
                if inbox:
                    self._inboxes[i] = []
                    for item in inbox:
                        if item.__class__ is _Call:
                            self._interrupt(item.args[0])
                            item.fn(*item.args)
                            continue
                        request = new_request(item, now, self.slo)
                        if inst.admit(request):
                            by_id[request.request_id] = tracked[item.index]
                        else:
                            result.rejected.append(item.index)
                            remaining -= 1
                            waiting_first -= 1
                if not inst.scheduler.has_unfinished():
                    self._busy[i] = False
                else:
                    output, duration_s = inst.plan()
                    self._preempted_s[i] += inst.scheduler.num_preempted * duration_s
                    events.push(now + duration_s, ITERATION_END, (i, output, duration_s))
                    if repeat:
                        runs[i] = RepeatedSteps(inst, output)
            elif (kind is ITERATION_END and payload[1] is None
                  and not runs[payload[0]].ends_output):  # type: ignore[union-attr]
                last_work_s = now  # a repeated step: its results are applied at catch-up
                runs[payload[0]].emitted_s.append(  # type: ignore[union-attr]
                    now + response_latency_s)
                events.push(now, STEP, payload[0])
            elif kind is ITERATION_END:
                last_work_s = now
                i, output, duration_s = payload
                emitted_s = now + response_latency_s
                if output is None:  # a run's last repeated step: requests finish
                    run = runs[i]
                    assert run is not None
                    finished, sampled = run.finish(emitted_s, by_id), {}  # tokens are in
                    if not run.goes_on:
                        runs[i] = None
                else:
                    sampled, finished = instances[i].finish(output, duration_s)
                if max_queue_size:
                    for request_id in sampled:
                        times = by_id[request_id].token_times_s
                        if not times:
                            waiting_first -= 1
                        times.append(emitted_s)
                else:
                    for request_id in sampled:
                        by_id[request_id].token_times_s.append(emitted_s)
                for request in finished:
                    result.max_recomputations_per_request = max(
                        result.max_recomputations_per_request, request.num_preemptions)
                    t = by_id.pop(request.request_id)
                    result.finish_s[t.index] = emitted_s
                    remaining -= 1
                    if on_finish is not None:
                        on_finish(1)
                events.push(now, STEP, i)
            elif kind is ARRIVAL:
                last_work_s = now
                spec = payload
                if max_queue_size and waiting_first >= max_queue_size:
                    result.rejected.append(spec.index)
                    result.num_queue_full += 1
                    remaining -= 1
                    continue
                waiting_first += 1
                i = self.dispatcher.choose(-(-(spec.input_tokens + 1) // block_size),
                                           spec.priority)
                result.dispatched[i] += 1
                self._queue(i, spec)
            elif kind is TICK:
                if remaining <= 0:
                    continue  # the last request finished: no more reports
                self._tick(migrate)
                events.push(now + tick_s, TICK)
            elif kind is EventKind.INSTANCE_UP:
                self._instance_up(payload)
            else:  # STAGE_END: the copy is done; the destination takes it between steps
                move, out = payload
                last_work_s = now
                self._queue(move.destination, _Call(self._end_stage, move, out))
            if check:
                for inst in instances:
                    inst.block_manager.check_invariants()
        for inst in instances:
            inst.add_counters(result)
        result.preempted_s = sum(self._preempted_s)
        result.end_s = last_work_s
        result.instance_seconds = sum(self._on_s) + sum(
            max(0.0, last_work_s - since) for since in self._on_since if since is not None)
        result.wall_s = time.perf_counter() - wall_start
        if by_id:
            raise RuntimeError(f"{len(by_id)} requests never finished")
        return result

    # -- instances' inboxes and runs of repeated steps ----------------------------------

    def _queue(self, instance: int, item: Any) -> None:
        """Into the instance's inbox, drained between two of its steps."""
        self._inboxes[instance].append(item)
        self._wake(instance)

    def _repeat(self, instance: int) -> bool:
        """Plan the instance's next step as a repeat of its last (``sim/repeat.py``); False
        if its run of repeated steps ends here (caught up): the step is planned."""
        run = self._runs[instance]
        assert run is not None
        duration_s = None if self._inboxes[instance] else run.plan()
        if duration_s is None:
            run.catch_up(self._by_id)
            self._runs[instance] = None
            return False
        self._preempted_s[instance] += (
            self.instances[instance].scheduler.num_preempted * duration_s)
        self._events.push(self.now_s + duration_s, EventKind.ITERATION_END,
                          (instance, None, duration_s))
        return True

    def _interrupt(self, move: _Move) -> None:
        """A move's call is about to read or change its two instances: their runs of
        repeated steps catch up, and end at their next step."""
        for i in (move.source, move.destination):
            run = self._runs[i]
            if run is not None:
                run.catch_up(self._by_id)
                run.interrupted = True

    def _wake(self, instance: int) -> None:
        if not self._busy[instance]:
            self._busy[instance] = True
            self._events.push(self.now_s, EventKind.STEP, instance)

    # -- reports, pairing and moves ------------------------------------------------------

    def _tick(self, migrate: bool) -> None:
        result = self._result
        loads: dict[int, InstanceLoad] = {}
        total_available = 0
        headroom = self.config.cluster.priority_headroom_blocks  # as the frontend adds it
        state = self._state
        for i, inst in enumerate(self.instances):
            if state[i] is _UP:
                load = instance_load(inst.scheduler, headroom)
                total_available += max(0, load.available_blocks)
                result.tick_blocks += load.num_blocks
            elif state[i] is _DRAINING:
                load = dataclasses.replace(instance_load(inst.scheduler, headroom),
                                           draining=True)
            else:
                continue
            loads[i] = load
            self.dispatcher.update(i, load)
        result.num_ticks += 1
        if any(load.num_waiting and max(0, load.available_blocks) < load.head_of_line_blocks
               <= total_available for load in loads.values() if not load.draining):
            result.num_fragmented_ticks += 1
            result.fragmented_free_blocks += total_available
        cluster = self.config.cluster
        if migrate:
            waiting_moves = cluster.migration_request_policy in WAITING_POLICIES
            for source, destination in pair_migrations(loads, cluster.migrate_out_threshold,
                                                       self._moving, waiting_moves,
                                                       cluster.migrate_into_waiting):
                self._start(source, destination)
        if self.scaling is not None:
            self._scale(loads)

    # -- moves ---------------------------------------------------------------------------

    def _start(self, source: int, destination: int, drain: bool = False) -> None:
        self._moving.update((source, destination))
        self._queue(source, _Call(self._start_move, _Move(source, destination, drain)))

    def _start_move(self, move: _Move) -> None:
        """On the source, between two steps: pick the request, run the first stage."""
        inst = self.instances[move.source]
        # A drain moves everything, the requests holding no cache first.
        policy = "FCWSR" if move.drain else self.config.cluster.migration_request_policy
        candidates = migration_candidates(inst.scheduler, self.now_s,
                                          include_waiting=policy in WAITING_POLICIES)
        chosen = choose_request(candidates, policy)
        if chosen is None:
            self._moving.difference_update((move.source, move.destination))
            return
        move.migration = StagedMigration(
            self._sources[move.source], self._destinations[move.destination],
            chosen.request_id, self._migration, clock=self._clock)
        self._result.migrations_started += 1
        self._begin_stage(move)

    def _begin_stage(self, move: _Move) -> None:
        """On the source, between two steps: its half of the next stage, then the copy."""
        assert move.migration is not None
        out = move.migration.begin_stage()
        if out is None:
            self._ended(move)
            return
        num_bytes = sum(data.nbytes for data in out.data)
        self._events.push(self.now_s + self.config.migration_cost.stage_time_s(num_bytes),
                          EventKind.STAGE_END, (move, out))

    def _end_stage(self, move: _Move, out: StageOut) -> None:
        """On the destination, between two steps: its half; then the next stage's source
        half on the source, or the end."""
        assert move.migration is not None
        if move.migration.end_stage(out) is None:
            self._queue(move.source, _Call(self._begin_stage, move))
            return
        self._ended(move)
        self._wake(move.source)  # a request stopped for the last stage may resume there

    def _ended(self, move: _Move) -> None:
        assert move.migration is not None and move.migration.result is not None
        r: MigrationResult = move.migration.result
        result = self._result
        key = r.status.value + (f": {reason_kind(r.reason)}" if r.reason else "")
        result.migrations_ended[key] += 1
        result.migration_stages += r.num_stages
        result.migration_bytes += r.num_bytes
        if r.status is MigrationStatus.COMMITTED:
            result.downtimes_s.append(r.downtime_s)
            result.moved.append(move.migration.request_id)
        self._moving.difference_update((move.source, move.destination))

