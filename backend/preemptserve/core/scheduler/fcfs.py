"""``fcfs``: the continuous batching TensorRT-LLM and vLLM use by default.

Running requests keep their place in admission order; new requests are admitted in
arrival order while the batch size, the token budget and free blocks allow (long prompts
are chunked across iterations). When blocks run out, the most recently admitted running
request is preempted by recomputation and goes back to the head of the waiting queue.
This is the baseline every other policy is measured against.
"""

from __future__ import annotations

from collections import deque

from ..request import Request
from .base import Scheduler
from .output import ScheduledRequest, SchedulerOutput
from .registry import register_policy


@register_policy("fcfs")
class FCFSScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _enqueue_new(self, request: Request) -> None:
        self.waiting.append(request)

    def _remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests first, oldest admission first.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            item = self._try_schedule(request, num_tokens)
            while item is None:
                victim = self.running.pop()
                self._preempt_by_recompute(victim)
                preempted.append(victim)
                if victim is request:
                    break
                item = self._try_schedule(request, num_tokens)
            if item is None:
                break
            scheduled.append(item)
            budget -= num_tokens
            index += 1

        self.num_preemptions_total += len(preempted)
        # Earliest-admitted victim ends up first in line.
        for victim in preempted:
            self.waiting.appendleft(victim)

        # Admit in arrival order; not in a step that had to preempt (it would thrash).
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_batch_size
        ):
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            item = self._try_schedule(request, num_tokens)
            if item is None:
                break
            self.waiting.popleft()
            self.running.append(request)
            scheduled.append(item)
            budget -= num_tokens

        return SchedulerOutput(
            step_id=self._next_step_id(),
            scheduled=tuple(scheduled),
            preempted_ids=tuple(r.request_id for r in preempted),
        )
