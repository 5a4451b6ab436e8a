"""What rank 0 sends its tensor-parallel workers: plans as deltas, and block commands.

A plan carries only what changed since the previous one (vLLM v1's scheduler output does
the same with ``scheduled_new_reqs`` / ``scheduled_cached_reqs`` / ``finished_req_ids``).
Rank 0's ``PlanEncoder`` and each worker's ``PlanDecoder`` keep the same mirror: per
request, the device block table last sent. For each scheduled item a plan sends the
request id, the token ids, the start position, the sample and hidden flags and either

* the blocks appended since the mirror (the table extends the mirror: the usual case, a
  decode or a prefill chunk adding a block now and then, nothing at all most steps), or
* the whole table (no mirror, or the table is not an extension of it: a new request, a
  swap-in, a recomputation, a request id used again),

plus the swaps, the preempted ids and ``finished_ids`` in full. Before the items, both
sides drop the mirrors of requests that finished, were preempted (recomputed or swapped
out) or swapped in: a request absent from a plan keeps its mirror only while its table
stays as it was. Encoder and decoder apply the same steps in the same order, so their
mirrors stay equal and the worker rebuilds exactly the ``SchedulerOutput`` rank 0 runs.
The choice between appended and whole is made by comparing with the mirror, so a plan is
exact even where a table changed without any of those ids (the drops only keep the
mirrors small).

Messages are pickled tuples of plain values: ``(PLAN, ...)`` as above, ``(READ_BLOCKS,
block_ids, on_host)``, ``(WRITE_BLOCKS, block_ids, on_host, tensor)``, and ``None`` (stop).
A worker answers a block command with ``(OK, result)``; a failing worker sends
``("error", message)`` and exits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..core.scheduler import BlockSwap, ScheduledRequest, SchedulerOutput

PLAN = 0
READ_BLOCKS = 1
WRITE_BLOCKS = 2
OK = "ok"

_SAMPLE = 1
_HIDDEN = 2
_WHOLE_TABLE = 4

# (request_id, block_pairs, blocking)
_Swap = tuple[str, tuple[tuple[int, int], ...], bool]


def _dropped_ids(
    finished_ids: Iterable[str],
    preempted_ids: Iterable[str],
    swaps: Iterable[_Swap],
) -> Iterable[str]:
    yield from finished_ids
    yield from preempted_ids
    for request_id, _, _ in swaps:
        yield request_id


def _swap_tuples(swaps: Iterable[BlockSwap]) -> tuple[_Swap, ...]:
    return tuple((s.request_id, s.block_pairs, s.blocking) for s in swaps)


class PlanEncoder:
    """Rank 0's side: ``SchedulerOutput`` -> a plan message (a tuple to pickle)."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[int, ...]] = {}  # the mirror: table last sent

    def encode(self, output: SchedulerOutput) -> tuple:
        tables = self.tables
        swap_out = _swap_tuples(output.swap_out)
        swap_in = _swap_tuples(output.swap_in)
        for request_id in _dropped_ids(
            output.finished_ids, output.preempted_ids, swap_out + swap_in
        ):
            tables.pop(request_id, None)
        items = []
        for item in output.scheduled:
            request_id, table = item.request_id, tuple(item.block_ids)
            flags = _SAMPLE * item.sample | _HIDDEN * item.hidden
            known = tables.get(request_id)
            if known is not None and table[: len(known)] == known:
                blocks = table[len(known):]
            else:
                blocks = table
                flags |= _WHOLE_TABLE
            tables[request_id] = table
            items.append((request_id, item.token_ids, item.start_position, flags, blocks))
        return (
            PLAN,
            output.step_id,
            tuple(items),
            output.preempted_ids,
            swap_out,
            swap_in,
            output.finished_ids,
        )


class PlanDecoder:
    """A worker's side: a plan message -> the ``SchedulerOutput`` rank 0 encoded."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[int, ...]] = {}  # the same mirror as rank 0's

    def decode(self, message: tuple) -> SchedulerOutput:
        kind, step_id, items, preempted_ids, swap_out, swap_in, finished_ids = message
        if kind != PLAN:
            raise ValueError(f"not a plan message: kind {kind!r}")
        tables = self.tables
        for request_id in _dropped_ids(finished_ids, preempted_ids, swap_out + swap_in):
            tables.pop(request_id, None)
        scheduled = []
        for request_id, token_ids, start_position, flags, blocks in items:
            if flags & _WHOLE_TABLE:
                table = blocks
            else:
                known = tables.get(request_id)
                if known is None:
                    raise RuntimeError(
                        f"plan {step_id}: blocks appended to {request_id!r}, whose table "
                        f"this rank does not know (the mirrors diverged)"
                    )
                table = known + blocks
            tables[request_id] = table
            scheduled.append(
                ScheduledRequest(
                    request_id,
                    token_ids,
                    start_position,
                    table,
                    bool(flags & _SAMPLE),
                    bool(flags & _HIDDEN),
                )
            )
        return SchedulerOutput(
            step_id=step_id,
            scheduled=tuple(scheduled),
            preempted_ids=preempted_ids,
            swap_out=tuple(BlockSwap(r, pairs, blocking) for r, pairs, blocking in swap_out),
            swap_in=tuple(BlockSwap(r, pairs, blocking) for r, pairs, blocking in swap_in),
            finished_ids=finished_ids,
        )


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` alone in its storage (pickling a tensor sends its whole storage)."""
    if (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
