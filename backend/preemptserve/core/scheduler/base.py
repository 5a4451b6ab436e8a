"""The policy interface, and the one owner of every request's life. No torch, no Triton.

A step of the engine is three calls, as in vLLM v1::

    output = scheduler.schedule()                   # plain-data plan
    sampled = runner.execute(output)                # {request_id: token_id}
    finished = scheduler.update_from_output(output, sampled, step_s, stop_hits)

This base class owns a request from ``add_request`` to its end: its status (every change
goes through ``_set_status``), its blocks, the plan of every step (``schedule`` commits
the previous step's swaps, asks the policy to choose, and builds the plan once), the
rule that finishes it (``_finish_status``, the only place) and the freeing of its
blocks. A policy only chooses: subclasses implement ``_plan`` with the helpers here
(``_try_schedule``, ``_swap_out``, ``_swap_in``, ``_preempt_by_recompute``) and keep
their own queues through ``_enqueue`` / ``_remove``.

Requests move between engines through ``detach`` (the source: the request leaves the
policy, ``MIGRATING``, its blocks stay), ``reattach`` (the move failed: it resumes),
``release_detached`` (the move committed: its blocks are freed) and ``adopt`` (the
destination: with the state the source's policy exported).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...config import SchedulerConfig
from ..block_manager import BlockManager
from ..cost_model import CostModel
from ..request import CacheMode, Request, RequestStatus
from .output import BlockSwap, ScheduledRequest, SchedulerOutput
from .parameters import PolicyOptions
from .repeated import RepeatedPlans
from .service import OutputLengthHistory

Clock = Callable[[], float]
# Enum members read once: a class attribute read of an Enum is slow, and these are
# read for every scheduled request every step.
_RUNNING = RequestStatus.RUNNING
_HIDDEN = CacheMode.HIDDEN
# Builds a ScheduledRequest without the named tuple's Python-level __new__ (half its cost).
_new_tuple = tuple.__new__
# A policy's own state of one request, as plain data (what moves with it to another engine).
PolicyState = dict[str, Any]


@dataclass
class Plan:
    """One iteration being planned: what the policy chose so far."""

    selected: dict[str, ScheduledRequest] = field(default_factory=dict)
    # Requests that lost their place (the policy's definition; counted as preemptions).
    preempted: list[str] = field(default_factory=list)
    swap_out: list[BlockSwap] = field(default_factory=list)
    swap_in: list[BlockSwap] = field(default_factory=list)


class Scheduler(RepeatedPlans, ABC):
    """Decides, each iteration, which requests run and how many tokens each feeds."""

    policy_name: ClassVar[str] = ""
    # Policies that estimate prefill time get the engine's measured profile.
    requires_cost_model: ClassVar[bool] = False
    # Policies that weigh hidden-cache mode also need its profiled recompute cost.
    requires_recompute_cost: ClassVar[bool] = False
    # The policy's own settings and their config.pbtxt parameters (parameters.py).
    options_class: ClassVar[type[PolicyOptions]] = PolicyOptions

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        clock: Clock = time.monotonic,
        cost_model: CostModel | None = None,
    ) -> None:
        self.config = config
        self.options = self.options_class.from_mapping(config.options, self.policy_name)
        self.block_manager = block_manager
        self.clock = clock
        self.cost_model = cost_model
        # Unfinished requests the policy schedules, in arrival order.
        self.requests: dict[str, Request] = {}
        # Requests handed to another engine and not yet committed or taken back, with
        # what the policy exported of them.
        self.detached: dict[str, tuple[Request, PolicyState]] = {}
        self._num_by_status: Counter[RequestStatus] = Counter()
        self._num_high_priority = 0  # high-priority requests among ``requests``
        self._running_ids: KeysView[str] = {}.keys()
        self._finished_ids: list[str] = []  # left since the last plan
        # A running request that lost its place in the batch (any policy) ...
        self.num_preemptions_total = 0
        # ... and one whose KV was dropped, to be prefilled again (and the tokens whose
        # K/V were dropped: work done twice).
        self.num_recomputations_total = 0
        self.num_recomputed_tokens_total = 0
        # Preemptions forced by memory (a request lost its device KV, swapped out or
        # dropped for recomputation, because another request needed the blocks in the step
        # being planned), apart from those a policy makes by design (MLFQ's quantum and
        # level order, apt's batch choice, proactive offload): what Llumnix's
        # ``num_killed_requests`` means for vLLM, whose only preemptions are these.
        self.num_memory_preemptions_total = 0
        # Requests preempted that way and not scheduled (nor swapped back in) since, in
        # the order it happened; a dict for its order (the simulator replays identically).
        self._memory_preempted: dict[str, None] = {}
        # Detached requests that were among them (restored if their move fails).
        self._memory_preempted_detached: set[str] = set()
        # Requests and blocks moved between tiers (counted here only).
        self.num_swap_outs = self.num_swap_ins = 0
        self.num_blocks_swapped_out = self.num_blocks_swapped_in = 0
        # Output lengths of recently finished requests (stopped or at max_tokens; not
        # cancelled): what policies may expect of a running request's remaining output.
        self.output_lengths = OutputLengthHistory()
        self._step_id = 0

    # -- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` if it could never fit in the pool."""
        if request.request_id in self.requests or request.request_id in self.detached:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        needed = self.block_manager.blocks_for_tokens(request.max_total_tokens)  # in KV mode
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs up to {needed} KV blocks "
                f"({request.max_total_tokens} tokens) but the cache has "
                f"{self.block_manager.num_blocks}; lower max_tokens or raise kv_cache_bytes"
            )
        self._insert(request, RequestStatus.WAITING)
        self._enqueue(request, None)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside (cancel, error): its blocks return. None if unknown."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished status")
        request = self.requests.get(request_id)
        if request is None:
            detached = self.detached.pop(request_id, None)
            if detached is None:
                return None
            request = detached[0]
            self._memory_preempted_detached.discard(request_id)
            self._insert(request, RequestStatus.MIGRATING)  # finished like any other below
        else:
            self._remove(request)
        self._finish(request, status)
        return request

    def _insert(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._num_by_status[status] += 1
        self._num_high_priority += request.is_high_priority
        self.requests[request.request_id] = request

    def _set_status(self, request: Request, status: RequestStatus) -> None:
        """Every status change of a request in ``requests`` goes through here."""
        old = request.status
        if old is status:
            return
        self._num_by_status[old] -= 1
        self._num_by_status[status] += 1
        request.status = status

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """The end of every request: out of the table, blocks freed, status terminal."""
        request_id = request.request_id
        del self.requests[request_id]
        self._num_by_status[request.status] -= 1
        self._num_high_priority -= request.is_high_priority
        request.status = status
        self.block_manager.free(request_id)
        self._finished_ids.append(request_id)
        if self._memory_preempted:
            self._memory_preempted.pop(request_id, None)
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.output_lengths.observe(request.num_output_tokens)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Requests never scheduled yet (the queue ``max_queue_size`` bounds)."""
        return self._num_by_status[RequestStatus.WAITING]

    @property
    def num_high_priority(self) -> int:
        """High-priority requests among the unfinished ones (waiting, running, preempted)."""
        return self._num_high_priority

    @property
    def num_running(self) -> int:
        """Requests in the last planned batch."""
        return self._num_by_status[RequestStatus.RUNNING]

    @property
    def num_preempted(self) -> int:
        """Requests that have run and are not in the last planned batch."""
        return self._num_by_status[RequestStatus.PREEMPTED]

    @property
    def num_memory_preempted(self) -> int:
        """Requests preempted because device blocks ran out (``_swap_out`` with
        ``reuse_now``, ``_preempt_by_recompute``) and not scheduled or swapped in since:
        Llumnix's killed requests, the ones that make an instance a migration source."""
        return len(self._memory_preempted)

    def is_memory_preempted(self, request_id: str) -> bool:
        return request_id in self._memory_preempted

    # -- the policy ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one iteration: the policy chooses, this applies and describes it."""
        self.block_manager.commit_pending()
        plan = Plan()
        self._plan(plan)
        selected = plan.selected
        if not self._running_ids <= selected.keys():  # someone left the batch
            for request_id in self._running_ids - selected.keys():
                request = self.requests.get(request_id)
                if request is not None and request.status is _RUNNING:
                    self._set_status(request, RequestStatus.PREEMPTED)
        self._running_ids = selected.keys()
        self.num_preemptions_total += len(plan.preempted)
        finished, self._finished_ids = self._finished_ids, []
        self._step_id += 1
        return SchedulerOutput(
            step_id=self._step_id,
            scheduled=tuple(selected.values()),
            preempted_ids=tuple(plan.preempted),
            swap_out=tuple(plan.swap_out),
            swap_in=tuple(plan.swap_in),
            finished_ids=tuple(finished),
        )

    @abstractmethod
    def _plan(self, plan: Plan) -> None:
        """Choose this iteration's batch, preemptions and swaps into ``plan``."""

    @abstractmethod
    def _enqueue(self, request: Request, state: PolicyState | None) -> None:
        """Put a request into the policy's queues: a new one (``state`` None) or one
        arriving from another engine with what its policy exported."""

    @abstractmethod
    def _remove(self, request: Request) -> None:
        """Take a request out of whatever queue holds it (finishing or leaving)."""

    def _export_state(self, request: Request) -> PolicyState:
        """The policy's own state of ``request`` (called before ``_remove``)."""
        return {}

    # -- shared mechanics for policies ---------------------------------------------------

    def _try_schedule(self, request: Request, num_tokens: int,
                      plan: Plan) -> ScheduledRequest | None:
        """Allocate blocks for ``num_tokens`` more tokens and add the work to ``plan``;
        None (nothing changes) if the blocks are not free."""
        # Run for every scheduled request every step: plain attribute reads, no properties.
        request_id = request.request_id
        start = request.num_computed_tokens
        stop = start + num_tokens
        hidden = request.cache_mode is _HIDDEN
        block_manager = self.block_manager
        if not block_manager.allocate(request_id, stop, hidden):
            return None
        if request.first_scheduled_time_s is None:
            request.first_scheduled_time_s = self.clock()
        if self._memory_preempted:
            self._memory_preempted.pop(request_id, None)
        if request.status is not _RUNNING:
            self._set_status(request, _RUNNING)
        output_token_ids = request.output_token_ids
        num_total = len(request.prompt_token_ids) + len(output_token_ids)
        if num_tokens == 1 and stop == num_total and output_token_ids:
            token_ids: tuple[int, ...] = (output_token_ids[-1],)  # a decode
        else:
            token_ids = tuple(request.token_ids(start, stop))
        item = plan.selected[request_id] = _new_tuple(ScheduledRequest, (
            request_id, token_ids, start, block_manager.block_ids(request_id),
            stop == num_total, hidden))
        return item

    def _schedule_resident(self, request: Request, num_tokens: int,
                           plan: Plan) -> ScheduledRequest | None:
        """The common case of every step: a request holding device blocks that cover (or can
        grow to cover) ``num_tokens`` more tokens; None sends the caller down its slow path
        (eviction, swap-in)."""
        if not self.block_manager.has_blocks(request.request_id):
            return None
        return self._try_schedule(request, num_tokens, plan)

    def _preempt_by_recompute(self, request: Request) -> None:
        """Drop a request's KV; it will prefill prompt + output again when resumed.

        Every policy does this only when a request it schedules needs the blocks now,
        so it counts as a preemption forced by memory (``num_memory_preempted``).
        """
        self.block_manager.free(request.request_id)
        self.num_recomputed_tokens_total += request.num_computed_tokens
        request.num_computed_tokens = 0
        self._set_status(request, RequestStatus.PREEMPTED)
        request.num_preemptions += 1
        self.num_recomputations_total += 1
        self._memory_preempt(request.request_id)

    def _swap_out(self, request: Request, plan: Plan, reuse_now: bool) -> bool:
        """Move a request's KV to the host tier (it is preempted); False if it cannot.

        ``reuse_now``: its blocks are needed in the step being planned (another request
        is scheduled into them): a preemption forced by memory. Otherwise it is a policy's
        own choice (MLFQ's proactive offload keeping a reserve), not counted as one.
        """
        pairs = self.block_manager.swap_out(request.request_id, reuse_now=reuse_now)
        if pairs is None:
            return False
        self._set_status(request, RequestStatus.PREEMPTED)
        self.num_swap_outs += 1
        self.num_blocks_swapped_out += len(pairs)
        plan.swap_out.append(BlockSwap(request.request_id, tuple(pairs), blocking=reuse_now))
        if reuse_now:
            self._memory_preempt(request.request_id)
        return True

    def _memory_preempt(self, request_id: str) -> None:
        self.num_memory_preemptions_total += 1
        self._memory_preempted[request_id] = None

    def _swap_in(self, request: Request, plan: Plan) -> None:
        """Bring a request's KV back to the device; the caller checked there is room.
        It is no longer preempted for memory (memory has room for it again)."""
        pairs = self.block_manager.swap_in(request.request_id)
        if pairs is None:
            raise RuntimeError(f"swap-in of {request.request_id!r} found no room")
        if self._memory_preempted:
            self._memory_preempted.pop(request.request_id, None)
        self.num_swap_ins += 1
        self.num_blocks_swapped_in += len(pairs)
        plan.swap_in.append(BlockSwap(request.request_id, tuple(pairs)))

    def _holds_cache(self, request_id: str) -> bool:
        """Whether the request's KV (or hidden states) is in either tier."""
        bm = self.block_manager
        return bm.has_blocks(request_id) or bm.is_on_host(request_id)

    # -- results -------------------------------------------------------------------------

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Mapping[str, int],
        step_time_s: float | None = None,
        stop_hits: Collection[str] = (),
    ) -> list[Request]:
        """Advance progress with the step's results; return the requests that finished,
        each with its terminal status (why it finished).

        ``step_time_s`` is the measured time of the iteration (policies that account
        service time use it). ``stop_hits``: requests whose text ends in a stop word with
        this step's token (text is the engine's; the decision is ``_finish_status``'s).
        """
        finished: list[Request] = []
        requests, finish_status = self.requests, self._finish_status
        # Unpacked rather than read by name: this runs for every request every step.
        for request_id, token_ids, _, _, sample, _ in output.scheduled:
            request = requests.get(request_id)
            if request is None:  # finished or detached during the step
                continue
            request.num_computed_tokens += len(token_ids)
            if not sample:
                continue
            token_id = sampled_token_ids[request_id]
            request.output_token_ids.append(token_id)
            status = finish_status(request, token_id, request_id in stop_hits)
            if status is not None:
                self._remove(request)
                self._finish(request, status)
                finished.append(request)
        if step_time_s is not None:
            self._account_service(output, step_time_s)
        return finished

    def _account_service(self, output: SchedulerOutput, step_time_s: float) -> None:
        """Hook for policies that track service time; called after every step's results."""
        return None  # fcfs keeps no service accounts

    @staticmethod
    def _finish_status(request: Request, token_id: int, stop_hit: bool) -> RequestStatus | None:
        """The finishing rule, the only one: ``end_id`` or a stop word once ``min_length``
        tokens precede it, else ``max_tokens``. ``token_id`` was just appended."""
        sampling = request.sampling
        num_output_tokens = len(request.output_token_ids)
        if (stop_hit or token_id == sampling.end_id) and sampling.may_stop_at(
                num_output_tokens - 1):
            return RequestStatus.FINISHED_STOPPED
        if num_output_tokens >= sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- moving requests between engines -------------------------------------------------

    def migration_candidates(self, include_waiting: bool = False) -> list[str]:
        """Requests that may move to another engine: started ones holding their cache in
        either tier, in arrival order (the cluster policy chooses among them).
        ``include_waiting``: also those holding no cache (never scheduled, or preempted
        by recomputation), which move with nothing to copy."""
        return [rid for rid, r in self.requests.items() if include_waiting or (
            r.status is not RequestStatus.WAITING and self._holds_cache(rid))]

    def detach(self, request_id: str) -> PolicyState:
        """Take a request out of the policy for a move; it keeps its blocks, ``MIGRATING``.

        Returns the policy's state of it, for ``adopt`` on the destination. Raises
        ``KeyError`` if the request is not scheduled here.
        """
        request = self.requests[request_id]
        state = self._export_state(request)
        self._remove(request)
        del self.requests[request_id]
        if request_id in self._memory_preempted:
            del self._memory_preempted[request_id]
            self._memory_preempted_detached.add(request_id)
        self._num_by_status[request.status] -= 1
        self._num_high_priority -= request.is_high_priority
        request.status = RequestStatus.MIGRATING
        self.detached[request_id] = (request, state)
        return state

    def reattach(self, request_id: str) -> Request:
        """The move failed: the detached request resumes here with its state."""
        request, state = self.detached.pop(request_id)
        self._insert(request, self._resume_status(request))
        self._enqueue(request, state)
        if request_id in self._memory_preempted_detached:
            self._memory_preempted_detached.discard(request_id)
            self._memory_preempted[request_id] = None
        return request

    def release_detached(self, request_id: str) -> Request:
        """The move committed: the detached request's blocks are freed here."""
        request, _ = self.detached.pop(request_id)
        self._memory_preempted_detached.discard(request_id)
        self.block_manager.free(request_id)
        self._finished_ids.append(request_id)
        return request

    def adopt(self, request: Request, state: PolicyState | None) -> None:
        """Take in a request moved from another engine (its blocks, if any, adopted by the
        block manager already), with the state its policy exported."""
        if request.request_id in self.requests or request.request_id in self.detached:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self._insert(request, self._resume_status(request))
        self._enqueue(request, state)

    @staticmethod
    def _resume_status(request: Request) -> RequestStatus:
        started = request.first_scheduled_time_s is not None
        return RequestStatus.PREEMPTED if started else RequestStatus.WAITING
