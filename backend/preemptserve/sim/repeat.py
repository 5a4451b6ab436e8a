"""Repeated steps: an instance's steps that decode its last plan's batch, run unplanned.

Most steps of a busy engine decode the same batch as the step before, each request one
token further. When the policy states that its next plans will (``Scheduler.
repeated_batch``), the cluster simulator runs those steps without ``schedule()`` and
``update_from_output``: each still has its two events (``ITERATION_END``, ``STEP``) at
the same times, in the same order, and draws its iteration noise as a planned one would,
but costs O(1) in the batch size:

* its plan: the requests whose next token starts a block get one (the blocks they would
  get, in the order they would get them: the block manager is exact after every step),
  and its duration, from the batch's shape (the contexts grow by the batch size per step);
* its end: the time its tokens are emitted, kept.

The requests' progress (computed tokens, output tokens, token times) is applied later, at
once (``catch_up``): when the run ends, and before a move's call reads or changes the
instance. Load reports read only what stays exact (the blocks, the requests' statuses),
so ticks need no catch-up. A run ends at its instance's next step when its inbox holds
something (a request, a move's call), when a move touched the instance (``interrupted``),
or when the blocks of the next step are not free: that step is then planned as usual.
The step in which a request's output ends is the run's last: at its end the run catches
up and those requests finish (``finish``), as ``update_from_output`` would have them.
"""

from __future__ import annotations

from array import array

from ..core.request import Request
from ..core.scheduler.output import BatchShape, SchedulerOutput
from .simulator import _TOKEN_ID, SimInstance, _Tracked


class RepeatedSteps:
    """One instance's run of repeated steps, after the planned step (step 0) whose batch
    it decodes. Made with each plan; its first repeated step asks the policy (so no
    work is spent on a run that ends before it starts)."""

    __slots__ = ("instance", "output", "requests", "request_ids", "growing", "ends",
                 "last_step", "planned", "shape", "emitted_s", "applied", "interrupted")

    def __init__(self, instance: SimInstance, output: SchedulerOutput) -> None:
        self.instance = instance
        self.output: SchedulerOutput | None = output  # step 0's plan, until the run starts
        self.requests: list[Request] = []
        self.request_ids: list[str] = []
        # By the step (modulo the block size) whose token starts a new block of each.
        self.growing: list[list[str]] = []
        self.ends: list[int] = []  # the step that ends each request's output
        self.last_step = 0  # the first of those
        self.planned = 0  # steps planned so far
        self.shape = (0, 0)  # decodes, the sum of their contexts
        self.emitted_s = array("d")  # when the tokens of each ended step were emitted
        self.applied = 0  # ended steps whose results the requests have
        self.interrupted = False

    def _start(self, output: SchedulerOutput) -> bool:
        """Before step 1, step 0's results in: whether the policy states that its next
        plans decode step 0's batch (then the run is set up)."""
        self.output = None
        instance = self.instance
        scheduler = instance.scheduler
        requests = scheduler.repeated_batch(output)
        if not requests:
            return False
        steps_to_finish = scheduler.steps_to_finish
        block_size = instance.block_manager.block_size
        growing: list[list[str]] = [[] for _ in range(block_size)]
        request_ids, ends = [], []
        context = 0
        for item, request in zip(output.scheduled, requests, strict=True):
            request_id, token_ids, start_position, block_ids, _, _ = item
            stop = start_position + len(token_ids)  # its tokens in the cache after step 0
            # Step s needs blocks for stop + s tokens: one more each block_size steps.
            first_growth = len(block_ids) * block_size - stop + 1
            if first_growth > block_size:
                return False  # more blocks than its tokens need: not the usual growth
            growing[first_growth % block_size].append(request_id)
            request_ids.append(request_id)
            context += stop
            ends.append(steps_to_finish(request, _TOKEN_ID))
        self.requests, self.request_ids, self.growing, self.ends = (
            requests, request_ids, growing, ends)
        self.last_step = min(ends)
        self.shape = (len(requests), context)
        return self.last_step >= 1

    def plan(self) -> float | None:
        """Plan the next step as a repeat; its duration, or None if it must be planned
        (the run ends; nothing changed)."""
        if self.interrupted:
            return None
        if self.output is not None and not self._start(self.output):
            return None
        if self.planned == self.last_step:
            return None
        instance = self.instance
        step = self.planned + 1
        if not instance.scheduler.plan_repeated(self.growing[step % len(self.growing)]):
            return None
        self.planned = step
        num_decodes, context = self.shape
        context += num_decodes
        self.shape = (num_decodes, context)
        return instance.repeated_step(BatchShape(0, num_decodes, context, 0, num_decodes))

    @property
    def ends_output(self) -> bool:
        """Whether the step in flight ends a request's output (the run's last)."""
        return self.planned == self.last_step

    def finish(self, emitted_s: float, tracked: dict[str, _Tracked]) -> list[Request]:
        """The end of the run's last step, its tokens emitted at ``emitted_s``: every
        step's results, and the requests whose output it ends finish (returned). Then
        the run goes on with the rest of the batch if the policy states so (``goes_on``)."""
        self.emitted_s.append(emitted_s)
        self.catch_up(tracked)
        last, ends = self.last_step, self.ends
        finishing = [r for r, end in zip(self.requests, ends, strict=True) if end == last]
        instance = self.instance
        finished = instance.scheduler.finish_repeated(finishing, _TOKEN_ID)
        if instance.config.check_invariants:
            instance.block_manager.check_invariants()
        if (len(finished) < len(ends) and not self.interrupted
                and instance.scheduler.repeats_after_finish()):
            self._drop(finished)
        return finished

    @property
    def goes_on(self) -> bool:
        """Whether the run goes on after its last step's end (``finish``)."""
        return self.planned < self.last_step

    def _drop(self, finished: list[Request]) -> None:
        """Go on without the requests that finished: the next step ending one is the last."""
        num_decodes, context = self.shape
        for request in finished:
            context -= request.num_computed_tokens  # its context at the last step
            for group in self.growing:
                if request.request_id in group:
                    group.remove(request.request_id)
                    break
        last, ends = self.last_step, self.ends
        keep = [k for k, end in enumerate(ends) if end != last]
        self.requests = [self.requests[k] for k in keep]
        self.request_ids = [self.request_ids[k] for k in keep]
        self.ends = [ends[k] for k in keep]
        self.last_step = min(self.ends)
        self.shape = (len(keep), context)

    def catch_up(self, tracked: dict[str, _Tracked]) -> None:
        """Give the requests the results of the steps that ended since the last catch-up
        (``tracked``: the simulator's record of each, by request id)."""
        ended = self.emitted_s[self.applied:]
        if not ended:
            return
        self.applied += len(ended)
        for request_id in self.request_ids:
            tracked[request_id].token_times_s.extend(ended)
        self.instance.scheduler.apply_repeated(self.requests, len(ended), _TOKEN_ID)
