"""An instance's load as Llumnix defines it: *freeness*, from virtual usage. No torch.

Freeness ``F = (M - sum V) / B`` reads "how many more decode steps the batch can run
before memory runs out" (M: the device's blocks, V: each request's virtual usage, B: the
requests). As Llumnix's code computes it (``RemainingStepsLoad``):

* migration freeness (de-fragmentation on): ``(avail - blocks(head-of-line waiting)) /
  (running + [any waiting])``, so that a queue that cannot start counts as load and the
  cluster moves running requests away to make room for it;
* dispatch freeness: ``(avail - sum blocks(all waiting)) / (running + waiting)``;
* an instance with no requests is infinitely free.

``avail`` is the device pool minus the blocks in use (those a swap-out just vacated are
free). Beyond Llumnix, whose vLLM does not
keep swapped requests, the KV of started requests kept on the host tier counts as used:
those requests need their blocks on the device again to run. Running requests are the
started ones (in the batch or preempted); waiting ones have never been scheduled. A
waiting request needs the blocks of its prompt and first token.

Three more rules of Llumnix's virtual usage:

* **High-priority headroom** (``priority_headroom_blocks``, H): an instance holding any
  high-priority request (running or waiting) has H blocks fewer available. In the
  paper's terms each of its ``n`` high-priority requests has virtual usage ``physical +
  H / n`` (a priority's headroom is split among that priority's requests on the
  instance), so the instance's sum is ``physical + H`` whatever ``n`` is; an instance
  with none reserves nothing. Normal requests then see it as loaded: new ones are
  dispatched elsewhere and running ones migrate away, so the high-priority requests keep
  room to grow. High-priority requests themselves are dispatched by the freeness without
  the headroom (``high_priority_dispatch_freeness``), so they gather where high-priority
  requests already are. (Llumnix's artifact reserves ``total - 100`` blocks: the instance
  behaves as if it had 100.) The headroom is the global scheduler's setting: an instance
  reports 0 and the frontend (or the simulator) puts its own in.
* **Memory-driven preemptions** (``num_memory_preempted``): started requests that lost
  their device KV because another request needed the blocks, not yet back (Llumnix's
  killed requests, a migration trigger). A policy's preemptions by design do not count.
* **A draining instance** (being scaled in) has F = -inf for dispatch and migration:
  it takes nothing, and everything leaves it (``draining``, set by the global
  scheduler; Llumnix's terminating instance).

A pure function of the scheduler's state: the server reports it, the simulator and the
cluster policies compute it the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ..request import HIGH_PRIORITY, RequestStatus
from .base import Scheduler

_WAITING = RequestStatus.WAITING  # an Enum class attribute read is slow


@dataclass(frozen=True)
class InstanceLoad:
    num_blocks: int
    num_used_blocks: int  # device blocks in use plus started requests' host-tier blocks
    num_running: int  # started requests (in the batch or preempted)
    num_waiting: int  # never scheduled
    head_of_line_blocks: int  # what the first waiting request needs to start
    waiting_blocks: int  # what all waiting requests need to start
    # Started requests preempted because memory ran out, not back yet (Llumnix's killed).
    num_memory_preempted: int = 0
    # High-priority requests among the running and the waiting ones.
    num_high_running: int = 0
    num_high_waiting: int = 0
    # Blocks reserved while the instance holds a high-priority request (the global
    # scheduler's setting; 0: no headroom).
    priority_headroom_blocks: int = 0
    # Being drained (scaled in): infinitely loaded, takes nothing (the global scheduler's).
    draining: bool = False

    @property
    def num_high_priority(self) -> int:
        return self.num_high_running + self.num_high_waiting

    @property
    def reserved_blocks(self) -> int:
        """The high-priority headroom, if the instance holds a high-priority request."""
        return self.priority_headroom_blocks if self.num_high_priority else 0

    @property
    def physical_available_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    @property
    def available_blocks(self) -> int:
        """Free blocks by virtual usage: the high-priority headroom is not available."""
        return self.num_blocks - self.num_used_blocks - self.reserved_blocks

    @property
    def migration_freeness(self) -> float:
        """Freeness for migration pairing, with de-fragmentation (Llumnix's default)."""
        return self._migration_freeness(self.available_blocks)

    @property
    def physical_migration_freeness(self) -> float:
        """Migration freeness without the high-priority headroom."""
        return self._migration_freeness(self.physical_available_blocks)

    # Cached (a report never changes): the dispatcher reads every instance's for every
    # request it dispatches.
    @cached_property
    def dispatch_freeness(self) -> float:
        """Freeness for dispatching new (normal-priority) requests."""
        return self._dispatch_freeness(self.available_blocks)

    @cached_property
    def high_priority_dispatch_freeness(self) -> float:
        """Freeness for dispatching a high-priority request: without the headroom."""
        return self._dispatch_freeness(self.physical_available_blocks)

    def _migration_freeness(self, available: int) -> float:
        if self.draining:
            return -math.inf
        num_requests = self.num_running + (1 if self.num_waiting else 0)
        if not num_requests:
            return math.inf
        return (available - self.head_of_line_blocks) / num_requests

    def _dispatch_freeness(self, available: int) -> float:
        if self.draining:
            return -math.inf
        num_requests = self.num_running + self.num_waiting
        if not num_requests:
            return math.inf
        return (available - self.waiting_blocks) / num_requests


def instance_load(scheduler: Scheduler, priority_headroom_blocks: int = 0) -> InstanceLoad:
    bm = scheduler.block_manager
    num_waiting = scheduler.num_waiting
    head_of_line = waiting_blocks = num_high_waiting = 0
    # Waiting requests have never run, so they are mostly the newest ones, at the end of
    # the arrival-ordered table: it is read backwards until all of them are seen (this
    # runs for every instance at every polling tick).
    num_seen = 0
    requests = reversed(scheduler.requests.values()) if num_waiting else ()
    for request in requests:
        if request.status is _WAITING:
            needed = bm.blocks_for_tokens(request.num_prompt_tokens + 1, request.hidden)
            head_of_line = needed  # the last one seen is the first in arrival order
            waiting_blocks += needed
            num_high_waiting += request.priority == HIGH_PRIORITY
            num_seen += 1
            if num_seen == num_waiting:
                break
    return InstanceLoad(
        num_blocks=bm.num_blocks,
        # Blocks a swap-out vacated are free from the next step on.
        num_used_blocks=bm.num_used_blocks - bm.num_pending_blocks + bm.num_used_host_blocks,
        num_running=len(scheduler.requests) - num_waiting,
        num_waiting=num_waiting,
        head_of_line_blocks=head_of_line,
        waiting_blocks=waiting_blocks,
        num_memory_preempted=scheduler.num_memory_preempted,
        num_high_running=scheduler.num_high_priority - num_high_waiting,
        num_high_waiting=num_high_waiting,
        priority_headroom_blocks=priority_headroom_blocks,
    )
