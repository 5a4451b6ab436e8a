"""The global scheduler's policies for many engine instances (Llumnix). No torch, no Ray.

The global scheduler sees only each instance's load report (``InstanceLoad``, sent
about every 50 ms), never per-request state. Three decisions, all pure and
deterministic (no randomness: Llumnix's ``TOPK_RANDOM_DISPATCH = 1`` picks the top
one), so the Ray runtime and the cluster simulator call the very same functions:

* **Dispatch** (``Dispatcher``; llumnix.md 1.3): which instance takes a new request.
  ``load`` is Llumnix's (and the paper's INFaaS++ baseline's) rule, the highest
  dispatch freeness, as long as an instance has room for its queue; past that (F < 0)
  it ranks by the block deficit instead (``Dispatcher``'s docstring says why).
  ``load_llumnix`` keeps the freeness in overload too, as Llumnix does (it herds).
  ``balanced`` is our queue-blind baseline: the lowest share of KV blocks in use
  (Llumnix's ``balanced`` counts requests dispatched so far instead). ``round_robin``
  cycles. Beyond Llumnix, a dispatched request counts on its instance as one more
  waiting request until that instance's next report, so a burst that arrives between
  two reports spreads instead of landing on one instance.
* **Migration pairing** (``pair_migrations``; llumnix.md 1.4, policy ``defrag``): which
  overloaded instance moves a request to which freer one; ``drain_pairs`` for an
  instance being drained.
* **Request choice** on the source (``choose_request``): Llumnix's ``SR`` / ``LR`` /
  ``LCR`` among started requests, ``FCW`` (the first waiting request: no cache to copy)
  and ``FCWSR`` (the first waiting one, else the shortest running), normal-priority
  requests before high-priority ones.

Priorities (llumnix.md 1.2): the load reports carry the high-priority headroom
(``InstanceLoad.priority_headroom_blocks``); normal requests are dispatched and paired
by the freeness with it, high-priority requests are dispatched by the freeness without
it. Auto-scaling decisions are ``core/scaling.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from .request import HIGH_PRIORITY, NORMAL_PRIORITY, check_priority
from .scheduler.base import Scheduler
from .scheduler.load import InstanceLoad

DISPATCH_POLICIES = ("round_robin", "balanced", "load", "load_llumnix")
REQUEST_POLICIES = ("SR", "LR", "LCR", "FCW", "FCWSR")
WAITING_POLICIES = ("FCW", "FCWSR")  # request policies that move requests holding no cache
MIGRATE_OUT_THRESHOLD = 3.0  # decode steps of memory per request (llumnix.md 1.7)


class NoInstanceError(RuntimeError):
    """No instance is alive to take a request."""


class Dispatcher:
    """Chooses the instance of each new request from the instances' newest load reports.

    Instances are ``0 .. num_instances - 1``, all alive at first. An instance that has
    not reported yet counts as empty (infinitely free); among such instances the one
    sent the fewest requests since it last reported wins, then the lowest id.

    Llumnix's dispatch freeness ``F = (available - waiting blocks) / requests`` breaks
    down in overload: once the waiting requests need more blocks than are free (F < 0),
    one more waiting request with fewer blocks than ``-F`` *raises* F, so an overloaded
    instance draws a burst instead of shedding it. ``load`` therefore ranks an instance
    past that point by its block deficit ``available - waiting blocks`` (below every
    instance with F >= 0): each request dispatched to it lowers its rank by its own
    blocks, so the requests of one polling tick spread over the least short instances
    instead of herding onto one (the cluster simulator's 16-instance grid,
    docs/cluster-policies.md: P99 TTFT in overload 1.1-1.8x better than
    ``load_llumnix``'s, identical while no instance is short). ``load_llumnix`` keeps F
    throughout, except that a dispatched request never makes an instance look freer
    than its report (the lower of the two counts). Ties go to the instance sent fewer
    requests since its report, then the lowest id.

    A draining instance (``set_draining``, or a report with ``draining``) takes no new
    request, as a dead one (Llumnix's terminating instance, F = -inf).

    ``add_instance`` grows the instances by one (auto-scaling); numbers are never reused:
    an instance stopped for good stays, not alive.
    """

    def __init__(self, policy: str, num_instances: int) -> None:
        if policy not in DISPATCH_POLICIES:
            raise ValueError(
                f"unknown dispatch policy {policy!r}; choices: {list(DISPATCH_POLICIES)}"
            )
        if num_instances < 1:
            raise ValueError(f"num_instances must be at least 1, got {num_instances}")
        self.policy = policy
        self.num_instances = num_instances
        # The newest report plus the requests dispatched since it (None: no report yet).
        self._loads: list[InstanceLoad | None] = [None] * num_instances
        self._reported: list[InstanceLoad | None] = [None] * num_instances
        self._num_dispatched = [0] * num_instances  # since the instance's last report
        self._alive = [True] * num_instances
        self._draining = [False] * num_instances
        self._next = 0  # round_robin's next instance

    def add_instance(self, alive: bool = True) -> int:
        """One more instance, numbered ``num_instances`` (returned), without a report yet;
        ``alive=False``: it takes no request until ``set_alive`` (e.g. until it reports)."""
        instance = self.num_instances
        self.num_instances += 1
        self._loads.append(None)
        self._reported.append(None)
        self._num_dispatched.append(0)
        self._alive.append(alive)
        self._draining.append(False)
        return instance

    def update(self, instance: int, load: InstanceLoad | None) -> None:
        """The newest load report of ``instance``; drops the requests accounted on it."""
        self._check(instance)
        self._loads[instance] = self._reported[instance] = load
        self._num_dispatched[instance] = 0

    def set_alive(self, instance: int, alive: bool) -> None:
        """A dead or draining instance (``alive=False``) never receives requests."""
        self._check(instance)
        self._alive[instance] = alive

    def set_draining(self, instance: int, draining: bool) -> None:
        """A draining instance (being scaled in) receives no new request."""
        self._check(instance)
        self._draining[instance] = draining

    def load(self, instance: int) -> InstanceLoad | None:
        """The instance's newest report with the requests dispatched to it since."""
        self._check(instance)
        return self._loads[instance]

    def choose(self, prompt_blocks: int, priority: str = NORMAL_PRIORITY) -> int:
        """The instance for a new request whose prompt needs ``prompt_blocks`` KV blocks.

        ``priority`` "high": by the freeness without the high-priority headroom (``load``
        policies; the others ignore priorities). Raises ``NoInstanceError`` when no
        instance is alive and not draining.
        """
        if prompt_blocks < 0:
            raise ValueError(f"prompt_blocks must be non-negative, got {prompt_blocks}")
        high = check_priority(priority) == HIGH_PRIORITY
        takes = [self._takes_requests(i) for i in range(self.num_instances)]
        alive = [i for i in range(self.num_instances) if takes[i]]
        if not alive:
            raise NoInstanceError(f"none of the {self.num_instances} instances is alive "
                                  "and not draining")
        if self.policy == "round_robin":
            chosen = next(i % self.num_instances
                          for i in range(self._next, self._next + self.num_instances)
                          if takes[i % self.num_instances])
            self._next = (chosen + 1) % self.num_instances
        elif self.policy == "balanced":
            chosen = min(alive, key=self._balanced_key)
        elif self.policy == "load":
            chosen = min(alive, key=lambda i: self._load_key(i, high))
        else:
            chosen = min(alive, key=lambda i: self._llumnix_load_key(i, high))
        self._account(chosen, prompt_blocks, high)
        return chosen

    def _takes_requests(self, instance: int) -> bool:
        if not self._alive[instance] or self._draining[instance]:
            return False
        load = self._reported[instance]
        return load is None or not load.draining

    def _balanced_key(self, instance: int) -> tuple[float, int, int]:
        load = self._loads[instance]
        if load is None:
            return (0.0, self._num_dispatched[instance], instance)
        share = load.num_used_blocks / load.num_blocks if load.num_blocks else math.inf
        return (share, load.num_running + load.num_waiting, instance)

    def _load_key(self, instance: int, high: bool = False) -> tuple[float, int, int]:
        # The freeness while the instance has room for its queue; past that, the block
        # deficit (negative): every request dispatched to it lowers it either way.
        load = self._loads[instance]
        if load is None:
            return (-math.inf, self._num_dispatched[instance], instance)
        available = load.physical_available_blocks if high else load.available_blocks
        surplus = available - load.waiting_blocks
        num_requests = load.num_running + load.num_waiting
        if not num_requests:
            rank = math.inf  # an instance with no request is infinitely free (Llumnix)
        elif surplus < 0:
            rank = float(surplus)
        else:
            rank = surplus / num_requests
        return (-rank, self._num_dispatched[instance], instance)

    def _llumnix_load_key(self, instance: int, high: bool = False) -> tuple[float, int, int]:
        load = self._loads[instance]
        if load is None:
            return (-math.inf, self._num_dispatched[instance], instance)
        reported = self._reported[instance]
        assert reported is not None
        if high:
            freeness = min(load.high_priority_dispatch_freeness,
                           reported.high_priority_dispatch_freeness)
        else:
            freeness = min(load.dispatch_freeness, reported.dispatch_freeness)
        return (-freeness, self._num_dispatched[instance], instance)

    def _account(self, instance: int, prompt_blocks: int, high: bool = False) -> None:
        # The request waits on the instance until its next report says where it stands
        # (a high-priority one brings the headroom with it at once).
        self._num_dispatched[instance] += 1
        load = self._loads[instance]
        if load is None:
            return
        self._loads[instance] = dataclasses.replace(
            load,
            num_waiting=load.num_waiting + 1,
            waiting_blocks=load.waiting_blocks + prompt_blocks,
            head_of_line_blocks=load.head_of_line_blocks if load.num_waiting else prompt_blocks,
            num_high_waiting=load.num_high_waiting + high,
        )

    def _check(self, instance: int) -> None:
        if not 0 <= instance < self.num_instances:
            raise ValueError(f"no instance {instance}; instances are 0..{self.num_instances - 1}")


def pair_migrations(
    loads: Mapping[int, InstanceLoad],
    threshold: float = MIGRATE_OUT_THRESHOLD,
    busy: Collection[int] = (),
    waiting_moves: bool = False,
    into_waiting: bool = True,
) -> list[tuple[int, int]]:
    """(source, destination) pairs: each source moves one request to its destination.

    Llumnix's ``defrag`` pairing (llumnix.md 1.4), on migration freeness ``F``:

    * sources: at least one running request (only started requests are chosen to move;
      with ``waiting_moves``, the ``FCW`` request policies, a waiting request will do)
      and either ``F < -threshold`` (fewer than ``threshold`` decode steps of memory
      left per request; Llumnix's ``MIGRATE_OUT_THRESHOLD``) or requests preempted
      because memory ran out (``num_memory_preempted``, Llumnix's
      ``num_killed_requests > 0``). An instance below the threshold only because of its
      high-priority headroom is a source only if it runs a normal-priority request
      (the headroom pushes normal requests away, never high-priority ones);
    * destinations: ``F >= -threshold``, no memory-driven preemption, and ``F``
      strictly greater than the source's (no ping-pong between equally loaded
      instances); a source is never a destination. ``into_waiting=False`` (the
      server's ``migrate_into_waiting`` off) also needs the destination's queue empty:
      a moved request runs at once there, taking the blocks and the batch slot that
      the destination's own first waiting request was waiting for, so in deep overload
      every move trades a waiting request's first token for a running request's next
      ones (Llumnix allows it: ``True``);
    * an instance in ``busy`` (a migration in or out in flight; Llumnix's
      ``MAX_MIGRATION_CONCURRENCY = 1``), absent from ``loads`` (dead or no report
      yet) or draining (``drain_pairs`` empties it) is neither;
    * sources by ascending ``F``, destinations by descending ``F`` (ties by lowest id):
      the i-th source pairs with the i-th destination, so each instance is in at most
      one pair and the most loaded instance meets the freest one.

    Only preemptions forced by memory count, not all of them as in Llumnix: MLFQ and
    Apt preempt by design (quantum expiry, level order, batch choice) with plenty of
    memory, and that trigger would churn (llumnix.md 4.3). Memory also sees preemption:
    freeness counts started requests' host-tier KV as used.
    """
    sources: list[tuple[float, int]] = []
    destinations: list[tuple[float, int]] = []
    for instance, load in loads.items():
        if instance in busy or load.draining:
            continue
        freeness = load.migration_freeness
        killed = load.num_memory_preempted > 0
        if killed or freeness < -threshold:
            waiting = load.num_waiting if waiting_moves else 0
            high_waiting = load.num_high_waiting if waiting_moves else 0
            if (load.num_running or waiting) and (
                    killed or load.physical_migration_freeness < -threshold
                    or load.num_running > load.num_high_running
                    or waiting > high_waiting):
                sources.append((freeness, instance))
        elif into_waiting or not load.num_waiting:
            destinations.append((freeness, instance))
    sources.sort()
    destinations.sort(key=lambda d: (-d[0], d[1]))
    pairs = zip(sources, destinations, strict=False)  # the surplus stays unpaired
    return [(src, dst) for (src_f, src), (dst_f, dst) in pairs if dst_f > src_f]


def drain_pairs(
    draining: int, loads: Mapping[int, InstanceLoad], busy: Collection[int] = ()
) -> int | None:
    """Where the next request of the ``draining`` instance moves to, or None.

    The instance in ``loads`` other than ``draining``, not busy and not draining itself
    (``InstanceLoad.draining``; put only instances that may receive requests in
    ``loads``, or list the others in ``busy``), with the highest migration freeness
    (ties by lowest id), however loaded. None when there is none, or when ``draining``
    itself is busy (one migration at a time per instance). Llumnix spreads a
    terminating instance's requests round-robin; picking the freest instance fills the
    cluster evenly instead.
    """
    if draining in busy:
        return None
    candidates = [i for i, load in loads.items()
                  if i != draining and i not in busy and not load.draining]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (-loads[i].migration_freeness, i))


@dataclass(frozen=True)
class MigrationCandidate:
    """A request the source instance could move: started and not already migrating."""

    request_id: str
    num_tokens: int  # prompt plus generated tokens so far
    num_blocks: int  # KV blocks it holds (on its tier)
    on_host: bool  # its KV is on the host tier (preempted by a swap)
    age_s: float  # time since it arrived
    priority: str = NORMAL_PRIORITY
    # It holds no cache (never scheduled, or preempted by recomputation): moving it
    # copies nothing; only the FCW policies move such requests.
    waiting: bool = False


def migration_candidates(scheduler: Scheduler, now_s: float,
                         include_waiting: bool = False) -> list[MigrationCandidate]:
    """The requests ``scheduler`` could move out now, described for ``choose_request``
    (``now_s``: the clock of the requests' arrival times). ``include_waiting``: those
    holding no cache too."""
    bm = scheduler.block_manager
    candidates = []
    for request_id in scheduler.migration_candidates(include_waiting):
        request = scheduler.requests[request_id]
        on_host = bm.is_on_host(request_id)
        num_blocks = (bm.num_host_blocks_of(request_id) if on_host
                      else bm.num_device_blocks_of(request_id))
        candidates.append(MigrationCandidate(
            request_id, request.num_tokens, num_blocks, on_host,
            now_s - request.arrival_time_s, request.priority, waiting=not num_blocks))
    return candidates


def choose_request(
    candidates: Iterable[MigrationCandidate], policy: str = "SR"
) -> MigrationCandidate | None:
    """The request to migrate out of a source instance, or None if there is none.

    Llumnix's ``REQUEST_MIGRATION_POLICY`` (llumnix.md 1.4), ties by ``request_id``:
    ``SR`` the shortest running request (fewest tokens; the default, cheapest to copy),
    ``LR`` the longest, ``LCR`` the last come (smallest age), each among requests
    holding a cache; ``FCW`` the first-come request holding none (a waiting one: it
    moves with nothing to copy, and it is what a head-of-line block is made of),
    ``FCWSR`` that, else the shortest running (Llumnix's FCW takes a waiting request
    tried once; here any, and a request dropped for recomputation counts as waiting).
    Normal-priority requests
    come before high-priority ones (the paper's source prefers lower priority), so a
    high-priority request moves only from an instance running no normal one. The tier
    plays no part, as in Llumnix, though a host-tier request moves in one stage with
    no downtime.
    """
    if policy not in REQUEST_POLICIES:
        raise ValueError(
            f"unknown request migration policy {policy!r}; choices: {list(REQUEST_POLICIES)}"
        )
    keys = {
        "SR": lambda c: (c.priority == HIGH_PRIORITY, c.num_tokens, c.request_id),
        "LR": lambda c: (c.priority == HIGH_PRIORITY, -c.num_tokens, c.request_id),
        "LCR": lambda c: (c.priority == HIGH_PRIORITY, c.age_s, c.request_id),
        "FCW": lambda c: (c.priority == HIGH_PRIORITY, -c.age_s, c.request_id),
    }
    candidates = list(candidates)
    if policy in WAITING_POLICIES:
        first = min((c for c in candidates if c.waiting), key=keys["FCW"], default=None)
        if first is not None or policy == "FCW":
            return first
        policy = "SR"
    return min((c for c in candidates if not c.waiting), key=keys[policy], default=None)
