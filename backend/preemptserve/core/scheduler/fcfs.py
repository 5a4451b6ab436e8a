"""``fcfs``: the continuous batching TensorRT-LLM and vLLM use by default.

Running requests keep their place in admission order; new requests are admitted in
arrival order while the batch size, the token budget and free blocks allow (long prompts
are chunked across iterations). When blocks run out, the most recently admitted running
request is preempted by recomputation and goes back to the head of the waiting queue.
This is the baseline every other policy is measured against.

Priorities: high-priority requests go first among equals. The running list keeps the
high-priority requests ahead of the normal ones (each in admission order), so they are
scheduled first and preempted last; a high-priority request queues ahead of every
normal one in the waiting queue (in arrival order among high-priority ones). With every
request normal, both orders are plain admission and arrival order.
"""

from __future__ import annotations

from collections import deque

from ..request import Request
from .base import Plan, PolicyState, Scheduler
from .output import SchedulerOutput
from .registry import register_policy


@register_policy("fcfs")
class FCFSScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # The last plan scheduled every running request and preempted none (then the next
        # ones may decode the same batch), and whether it spent the token budget.
        self._kept_batch = False
        self._spent_budget = False

    def _enqueue(self, request: Request, state: PolicyState | None) -> None:
        if self.block_manager.has_blocks(request.request_id):
            self._run(request)  # moved here from another engine, cache and all
        elif request.is_high_priority:
            # Ahead of every normal request, behind the high-priority ones.
            self.waiting.insert(self._first_normal_waiting(), request)
        else:
            self.waiting.append(request)

    def _first_normal_waiting(self) -> int:
        """Where the waiting queue's normal-priority requests begin (they follow the
        high-priority ones)."""
        return next((i for i, r in enumerate(self.waiting) if not r.is_high_priority),
                    len(self.waiting))

    def _run(self, request: Request) -> None:
        """Into the running list: high-priority requests ahead of the normal ones."""
        running = self.running
        if request.is_high_priority and running and not running[-1].is_high_priority:
            index = next(i for i, r in enumerate(running) if not r.is_high_priority)
            running.insert(index, request)
        else:
            running.append(request)

    def _remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _plan(self, plan: Plan) -> None:
        budget = self.config.max_num_batched_tokens
        preempted: list[Request] = []

        # Running requests first, oldest admission first.
        running = self.running
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            # min(request.num_uncomputed_tokens, budget), without the properties: this
            # runs for every running request every step.
            num_tokens = (len(request.prompt_token_ids) + len(request.output_token_ids)
                          - request.num_computed_tokens)
            if num_tokens > budget:
                num_tokens = budget
            item = self._try_schedule(request, num_tokens, plan)
            while item is None:
                victim = running.pop()
                self._preempt_by_recompute(victim)
                preempted.append(victim)
                if victim is request:
                    break
                item = self._try_schedule(request, num_tokens, plan)
            if item is None:
                break
            budget -= num_tokens
            index += 1

        kept_batch = not preempted and index == len(running)
        plan.preempted.extend(r.request_id for r in preempted)
        # Earliest-admitted victim ends up first in line (of its priority).
        for victim in preempted:
            if victim.is_high_priority:
                self.waiting.appendleft(victim)
            else:
                self.waiting.insert(self._first_normal_waiting(), victim)

        # Admit in arrival order; not in a step that had to preempt (it would thrash).
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_batch_size
        ):
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self._swap_in_to_admit(request, num_tokens, plan):
                break
            if self._try_schedule(request, num_tokens, plan) is None:
                break
            self.waiting.popleft()
            self._run(request)
            budget -= num_tokens
        self._kept_batch = kept_batch
        self._spent_budget = budget <= 0

    def repeated_batch(self, output: SchedulerOutput) -> list[Request] | None:
        """The next plans decode this plan's batch, one token per request, when it scheduled
        every running request, each to the end of its tokens (a decode, or a prefill's
        last chunk), and preempted and swapped nothing, and admission stopped for a reason
        that lasts while nothing arrives or finishes: no request waits, the batch is full,
        the first waiting request's blocks are not free (free blocks only shrink while the
        batch grows, and it would need more of them with the budget of a step of decodes),
        or the budget is spent by decodes alone."""
        if not self._kept_batch or output.swap_out or output.swap_in:
            return None
        spent = self._spent_budget
        running = self.running
        if len(running) != len(output.scheduled):
            return None
        for item, request in zip(output.scheduled, running, strict=True):
            if (not item.sample or item.hidden or item.request_id != request.request_id
                    or (spent and len(item.token_ids) != 1)):
                return None
        return list(running)

    def repeats_after_finish(self) -> bool:
        """With no request waiting nothing is admitted into the room the finished ones
        left: the rest of the batch decodes on."""
        return not self.waiting

    def _swap_in_to_admit(self, request: Request, num_tokens: int, plan: Plan) -> bool:
        """A request whose cache is on the host tier (it arrived from another engine that
        had swapped it) comes back first; False if its blocks and growth do not fit."""
        bm = self.block_manager
        request_id = request.request_id
        if not bm.is_on_host(request_id):
            return True
        needed = max(bm.num_host_blocks_of(request_id), bm.blocks_for_tokens(
            request.num_computed_tokens + num_tokens, request.hidden))
        if needed > bm.num_free_blocks:
            return False
        self._swap_in(request, plan)
        return True
