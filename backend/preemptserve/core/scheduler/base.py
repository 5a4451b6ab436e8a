"""The policy interface and the bookkeeping every policy shares. No torch, no Triton.

A step of the engine is three calls, as in vLLM v1::

    output = scheduler.schedule()                   # plain-data plan
    sampled = runner.execute(output)                # {request_id: token_id}
    finished = scheduler.update_from_output(output, sampled)

Subclasses own their queues and implement ``schedule``; this base keeps the request
table, the block manager and the stop conditions that do not need text.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

from ...config import SchedulerConfig
from ..block_manager import BlockManager
from ..cost_model import CostModel
from ..request import Request, RequestStatus
from .output import BlockSwap, ScheduledRequest, SchedulerOutput
from .service import OutputLengthHistory

Clock = Callable[[], float]


class Scheduler(ABC):
    """Decides, each iteration, which requests run and how many tokens each feeds."""

    policy_name: ClassVar[str] = ""
    # Policies that estimate prefill time get the engine's measured profile.
    requires_cost_model: ClassVar[bool] = False
    # Policies that weigh hidden-cache mode also need its profiled recompute cost.
    requires_recompute_cost: ClassVar[bool] = False

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        clock: Clock = time.monotonic,
        cost_model: CostModel | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.cost_model = cost_model
        self.requests: dict[str, Request] = {}
        # A running request that lost its place in the batch (any policy) ...
        self.num_preemptions_total = 0
        # ... and one whose KV was dropped, to be prefilled again (and the tokens whose
        # K/V were dropped: work done twice).
        self.num_recomputations_total = 0
        self.num_recomputed_tokens_total = 0
        # Requests and blocks moved between tiers by policies that swap.
        self.num_swap_outs = self.num_swap_ins = 0
        # Output lengths of recently finished requests (stopped or at max_tokens; not
        # cancelled): what policies may expect of a running request's remaining output.
        self.output_lengths = OutputLengthHistory()
        self.num_blocks_swapped_out = self.num_blocks_swapped_in = 0
        self._step_id = 0

    # -- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` if it could never fit in the pool."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        needed = self.block_manager.blocks_for_tokens(request.max_total_tokens)  # in KV mode
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs up to {needed} KV blocks "
                f"({request.max_total_tokens} tokens) but the cache has "
                f"{self.block_manager.num_blocks}; lower max_tokens or raise kv_cache_bytes"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._enqueue_new(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside (cancel, stop word, error): its blocks return."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        assert status.is_finished, status
        self._remove(request)
        self.block_manager.free(request_id)
        request.status = status
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.output_lengths.observe(request.num_output_tokens)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the policy ----------------------------------------------------------------------

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Plan one iteration: allocate blocks, pick requests, preempt if needed."""

    @abstractmethod
    def _enqueue_new(self, request: Request) -> None:
        """Put a newly added request into the policy's queues."""

    @abstractmethod
    def _remove(self, request: Request) -> None:
        """Take a request out of whatever queue holds it (it is finishing)."""

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    def num_preempted(self) -> int:
        return sum(1 for r in self.requests.values() if r.status == RequestStatus.PREEMPTED)

    # -- shared mechanics for policies ---------------------------------------------------

    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    def _try_schedule(self, request: Request, num_tokens: int) -> ScheduledRequest | None:
        """Allocate blocks for ``num_tokens`` more tokens and describe the work, or None."""
        request_id = request.request_id
        start = request.num_computed_tokens
        stop = start + num_tokens
        hidden = request.hidden
        if not self.block_manager.allocate(request_id, stop, hidden):
            return None
        if request.first_scheduled_time_s is None:
            request.first_scheduled_time_s = self.clock()
        request.status = RequestStatus.RUNNING
        num_total = request.num_tokens
        if num_tokens == 1 and stop == num_total and request.output_token_ids:
            token_ids: tuple[int, ...] = (request.output_token_ids[-1],)  # a decode
        else:
            token_ids = tuple(request.token_ids(start, stop))
        return ScheduledRequest(request_id, token_ids, start,
                                self.block_manager.block_ids(request_id), stop == num_total,
                                hidden)

    def _schedule_resident(self, request: Request, num_tokens: int) -> ScheduledRequest | None:
        """The common case of every step: a request holding device blocks that cover (or can
        grow to cover) ``num_tokens`` more tokens; None sends the caller down its slow path
        (eviction, swap-in)."""
        if not self.block_manager.has_blocks(request.request_id):
            return None
        return self._try_schedule(request, num_tokens)

    def _preempt_by_recompute(self, request: Request) -> None:
        """Drop a request's KV; it will prefill prompt + output again when resumed."""
        self.block_manager.free(request.request_id)
        self.num_recomputed_tokens_total += request.num_computed_tokens
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_recomputations_total += 1

    def _plan_swap_out(self, request: Request, reuse_now: bool) -> BlockSwap | None:
        """Move a request's KV to the host tier (it is preempted); None if it cannot."""
        pairs = self.block_manager.swap_out(request.request_id, reuse_now=reuse_now)
        if pairs is None:
            return None
        request.status = RequestStatus.PREEMPTED
        self.num_swap_outs += 1
        self.num_blocks_swapped_out += len(pairs)
        return BlockSwap(request.request_id, tuple(pairs), blocking=reuse_now)

    def _plan_swap_in(self, request: Request) -> BlockSwap:
        """Bring a request's KV back to the device; the caller checked there is room."""
        pairs = self.block_manager.swap_in(request.request_id)
        assert pairs is not None, "the caller checked for room"
        self.num_swap_ins += 1
        self.num_blocks_swapped_in += len(pairs)
        return BlockSwap(request.request_id, tuple(pairs))

    # -- results -------------------------------------------------------------------------

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Mapping[str, int],
        step_time_s: float | None = None,
    ) -> list[Request]:
        """Advance progress with the step's results; return requests that finished.

        ``step_time_s`` is the measured time of the iteration (policies that account
        service time use it). Finishing here covers ``max_tokens`` and ``end_id`` (after
        ``min_length``). Stop words need text and are applied by the engine via
        ``finish_request``.
        """
        finished: list[Request] = []
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:  # finished from outside during the step
                continue
            request.num_computed_tokens += item.num_tokens
            if not item.sample:
                continue
            token_id = sampled_token_ids[item.request_id]
            request.output_token_ids.append(token_id)
            status = self._stop_status(request, token_id)
            if status is not None:
                self.finish_request(request.request_id, status)
                finished.append(request)
        if step_time_s is not None:
            self._account_service(output, step_time_s)
        return finished

    def _account_service(self, output: SchedulerOutput, step_time_s: float) -> None:
        """Hook for policies that track service time; called after every step's results."""
        return None  # fcfs keeps no service accounts

    @staticmethod
    def _stop_status(request: Request, token_id: int) -> RequestStatus | None:
        sampling = request.sampling
        if (
            sampling.end_id is not None
            and token_id == sampling.end_id
            and request.num_output_tokens > sampling.min_length
        ):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
