"""Steps that decode the last plan's batch again: what the cluster simulator runs
without planning (``sim/repeat.py``). A policy states when its next plans will
(``repeated_batch``); the rest keeps the scheduler's state as planning every step would:
the blocks at each step, the step ids, the requests' tokens (applied in one go), and the
ends of the requests whose output the last step completes. No torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..block_manager import BlockManager
from ..request import Request, RequestStatus
from .output import SchedulerOutput


class RepeatedPlans:
    """``Scheduler``'s methods for repeated steps. A policy that keeps service accounts
    (``_account_service``) must not state repeats: nothing accounts for their steps."""

    block_manager: BlockManager
    _step_id: int
    _finished_ids: list[str]

    if TYPE_CHECKING:  # Scheduler's
        def _remove(self, request: Request) -> None: ...
        def _finish(self, request: Request, status: RequestStatus) -> None: ...
        @staticmethod
        def _finish_status(request: Request, token_id: int,
                           stop_hit: bool) -> RequestStatus | None: ...

    def repeated_batch(self, output: SchedulerOutput) -> list[Request] | None:
        """The policy's statement about its last plan, ``output``, asked before the next
        one: the next plans schedule the same requests in the same order, one token each
        (a decode: each sampled in ``output``), for as long as nothing arrives, leaves or
        finishes and the blocks the batch grows into are free. Returns the batch's
        requests, or None (no statement: every step is planned)."""
        return None

    def repeats_after_finish(self) -> bool:
        """The policy's statement after requests of a repeated batch finished (with
        nothing else changed): the next plans decode the rest of the batch, one token each,
        as before. Default: no statement."""
        return False

    @staticmethod
    def steps_to_finish(request: Request, token_id: int) -> int:
        """How many more steps, each sampling ``token_id`` with no stop word, the request
        runs up to the one that finishes it, that one included (``_finish_status``'s
        rule)."""
        sampling = request.sampling
        n = len(request.output_token_ids)  # the next step samples output token n
        last = sampling.max_tokens - 1  # the index of the token that finishes it
        if token_id == sampling.end_id:
            last = min(last, max(n, sampling.min_length))
        return last - n + 1

    def plan_repeated(self, growing: list[str]) -> bool:
        """Plan the next step as a repeat of the last one (``repeated_batch`` said it is):
        the requests ``growing`` start a new block with it. False, with nothing changed,
        if the blocks are not free (the step must be planned)."""
        if not self.block_manager.grow(growing):
            return False
        self._step_id += 1
        if self._finished_ids:  # handed out with this plan, as ``schedule`` does
            self._finished_ids = []
        return True

    def apply_repeated(self, requests: list[Request], num_steps: int, token_id: int) -> None:
        """The tokens of ``num_steps`` repeated steps: what ``update_from_output`` does
        step by step, but the ends of outputs (``finish_repeated``)."""
        tokens = [token_id] * num_steps
        for request in requests:
            request.num_computed_tokens += num_steps
            request.output_token_ids.extend(tokens)

    def finish_repeated(self, requests: list[Request], token_id: int) -> list[Request]:
        """End the requests (in batch order) whose output the last repeated step, applied,
        completed, as ``update_from_output`` would; returns them."""
        for request in requests:
            status = self._finish_status(request, token_id, False)
            if status is None:
                raise RuntimeError(f"{request.request_id!r} did not finish")
            self._remove(request)
            self._finish(request, status)
        return requests
