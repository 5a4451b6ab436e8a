"""The plain-data plan of one iteration: what the engine executes. No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of an iteration.

    The engine feeds ``token_ids`` at positions ``start_position ..`` and writes their K/V
    into the slots given by ``block_ids`` (the request's whole block table after this
    step's allocation). When ``sample`` is true (the last chunk of a prefill, or a decode)
    the engine samples one token from the last position.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_ids: tuple[int, ...]
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the cache after this step, this step's included."""
        return self.start_position + len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.start_position == 0 or len(self.token_ids) > 1


@dataclass(frozen=True)
class SchedulerOutput:
    """Which requests run this iteration and which lost their place."""

    step_id: int
    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
