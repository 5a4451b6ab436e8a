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

A pure function of the scheduler's state: the server reports it, the simulator and the
cluster policies compute it the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..request import RequestStatus
from .base import Scheduler


@dataclass(frozen=True)
class InstanceLoad:
    num_blocks: int
    num_used_blocks: int  # device blocks in use plus started requests' host-tier blocks
    num_running: int  # started requests (in the batch or preempted)
    num_waiting: int  # never scheduled
    head_of_line_blocks: int  # what the first waiting request needs to start
    waiting_blocks: int  # what all waiting requests need to start

    @property
    def available_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    @property
    def migration_freeness(self) -> float:
        """Freeness for migration pairing, with de-fragmentation (Llumnix's default)."""
        num_requests = self.num_running + (1 if self.num_waiting else 0)
        if not num_requests:
            return math.inf
        return (self.available_blocks - self.head_of_line_blocks) / num_requests

    @property
    def dispatch_freeness(self) -> float:
        """Freeness for dispatching new requests (and for scaling)."""
        num_requests = self.num_running + self.num_waiting
        if not num_requests:
            return math.inf
        return (self.available_blocks - self.waiting_blocks) / num_requests


def instance_load(scheduler: Scheduler) -> InstanceLoad:
    bm = scheduler.block_manager
    num_running = num_waiting = head_of_line = waiting_blocks = 0
    for request in scheduler.requests.values():
        if request.status is RequestStatus.WAITING:
            needed = bm.blocks_for_tokens(request.num_prompt_tokens + 1, request.hidden)
            if not num_waiting:
                head_of_line = needed
            num_waiting += 1
            waiting_blocks += needed
        else:
            num_running += 1
    return InstanceLoad(
        num_blocks=bm.num_blocks,
        # Blocks a swap-out vacated are free from the next step on.
        num_used_blocks=bm.num_used_blocks - bm.num_pending_blocks + bm.num_used_host_blocks,
        num_running=num_running,
        num_waiting=num_waiting,
        head_of_line_blocks=head_of_line,
        waiting_blocks=waiting_blocks,
    )
