"""The plain-data plan of one iteration: what the engine executes. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ScheduledRequest(NamedTuple):
    """One request's share of an iteration.

    The engine feeds ``token_ids`` at positions ``start_position ..`` and writes their K/V
    into the slots given by ``block_ids`` (the request's whole block table after this
    step's allocation). When ``sample`` is true (the last chunk of a prefill, or a decode)
    the engine samples one token from the last position. With ``hidden`` the request is in
    hidden-cache mode: its blocks hold normalised hidden states, twice as many tokens per
    block (see ``BlockManager``). (A named tuple: built for every running request every
    iteration, it must be cheap to create.)
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_ids: tuple[int, ...]
    sample: bool
    hidden: bool = False

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
class BlockSwap:
    """Copy one request's KV blocks between tiers: ``(source_id, destination_id)`` pairs.

    In ``swap_out`` the source is a device block and the destination a host block; in
    ``swap_in`` the reverse. ``blocking`` swap-outs vacate blocks that this iteration
    reuses: the forward pass must wait for them. Other swap-outs may overlap the forward.
    A swapped-in request that is also scheduled must wait for its own swap-in.
    """

    request_id: str
    block_pairs: tuple[tuple[int, int], ...]
    blocking: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.block_pairs)


@dataclass(frozen=True)
class SchedulerOutput:
    """Which requests run this iteration, which lost their place, and what moves tiers.

    ``finished_ids``: requests that left the scheduler since the previous plan (finished,
    aborted, handed to another engine): executors drop whatever they keep per request.
    """

    step_id: int
    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...] = ()
    swap_out: tuple[BlockSwap, ...] = ()
    swap_in: tuple[BlockSwap, ...] = ()
    finished_ids: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class BatchShape(NamedTuple):
    """What one iteration's time depends on: the simulator's regressors and the
    iteration-stats log's batch fields."""

    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    decode_context_tokens: int = 0
    prefill_attention_tokens: int = 0  # sum over prefill chunks of chunk tokens x context
    num_sampled_tokens: int = 0

    def features(self) -> tuple[float, ...]:
        """The regressors of ``sim.cost_model``, in the order of its ``COEFFICIENTS``."""
        return (
            1.0,
            self.num_prefill_tokens,
            self.num_decode_tokens,
            self.decode_context_tokens,
            self.prefill_attention_tokens,
            self.num_sampled_tokens,
        )


def batch_shape(output: SchedulerOutput) -> BatchShape:
    """The shape of one planned iteration (what its time depends on)."""
    prefill = decode = decode_ctx = prefill_attn = sampled = 0
    # Unpacked rather than read by name: the simulator runs this over every scheduled
    # request of every step.
    for _, token_ids, start_position, _, sample, _ in output.scheduled:
        n = len(token_ids)
        context = start_position + n
        if n == 1 and start_position > 0:
            decode += 1
            decode_ctx += context
        else:
            prefill += n
            prefill_attn += n * context
        sampled += sample
    return BatchShape(prefill, decode, decode_ctx, prefill_attn, sampled)


def hidden_recompute_blocks(output: SchedulerOutput, block_size: int) -> int:
    """KV-sized blocks of context whose K/V this iteration recomputes from hidden states
    (hidden-mode items past their first chunk)."""
    return sum(
        -(-item.context_len // block_size)
        for item in output.scheduled
        if item.hidden and item.start_position > 0
    )
