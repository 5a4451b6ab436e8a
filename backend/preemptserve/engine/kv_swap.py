"""Executes the scheduler's swap plans between the device pool and the host pool, and
reads and writes given blocks of either pool (moving a request to another engine).

On CUDA the host pool is pinned and copies run on a dedicated stream, overlapped with
the forward pass. The forward waits for the swap-ins of the requests it runs (an event
per request) and for swap-outs that vacate blocks it reuses (``blocking``). Every other
copy issued in a step (swap-ins of requests not scheduled in it, other swap-outs) is
waited for at the start of the next step, before any forward can reuse a block: by then
a prefetched request may have been aborted or recomputed and its blocks handed to
another, and a swap-out's blocks become allocatable (``SwapEvents``). Block reads and
writes first wait for every copy on the swap stream.

On the CPU the copies are plain synchronous ``index_copy_`` calls made before the
forward, so a step in flight never sees a half-copied block.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from ..core.scheduler import BlockSwap, SchedulerOutput
from ..model.llama import KVCache

E = TypeVar("E")


@dataclass
class SwapStats:
    """What this rank's copies moved (its slice of every block) and the time they took.

    How many swaps were planned is the scheduler's ``num_swap_outs`` / ``num_swap_ins``.
    """

    bytes_out: int = 0
    bytes_in: int = 0
    time_s: float = 0.0  # CPU time spent issuing (CUDA) or doing (CPU) the copies


class SwapEvents(Generic[E]):
    """Which swap-stream events the compute stream has yet to wait for (CUDA bookkeeping;
    plain Python, so that it can be checked without a GPU).

    Per step: ``take_deferred()`` first (wait for all of them: the previous step's copies
    nobody waited for), then ``defer`` what this step need not wait for, and
    ``due(swap_ins, scheduled_ids)`` for the swap-ins the forward waits for (the others are
    deferred). No event outlives the start of the step after the one that issued it.
    """

    def __init__(self) -> None:
        self._deferred: list[E] = []

    @property
    def num_deferred(self) -> int:
        return len(self._deferred)

    def take_deferred(self) -> list[E]:
        deferred, self._deferred = self._deferred, []
        return deferred

    def defer(self, event: E) -> None:
        self._deferred.append(event)

    def due(self, swap_ins: Mapping[str, E], scheduled_ids: Iterable[str]) -> list[E]:
        """The swap-in events of scheduled requests; defers the rest."""
        if not swap_ins:
            return []
        pending = dict(swap_ins)
        now = [event for rid in scheduled_ids if (event := pending.pop(rid, None)) is not None]
        self._deferred.extend(pending.values())
        return now


class KVSwapper:
    def __init__(
        self, device_caches: list[KVCache], host_caches: list[KVCache], device: torch.device
    ) -> None:
        self.device_caches = device_caches
        self.host_caches = host_caches
        self.device = device
        self.stats = SwapStats()
        self._block_bytes = sum(k[0].numel() * k.element_size() * 2 for k, _ in device_caches)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self.events: SwapEvents[torch.cuda.Event] = SwapEvents()

    @property
    def block_bytes(self) -> int:
        """K and V of one block on this rank (its KV heads), all layers."""
        return self._block_bytes

    def execute(self, output: SchedulerOutput) -> None:
        """Issue this iteration's copies; make the compute stream wait where it must."""
        if not output.swap_out and not output.swap_in and not self.events.num_deferred:
            return
        start = time.perf_counter()
        if self._cuda:
            self._execute_cuda(output)
        else:
            for swap in output.swap_out:
                self._copy(swap, self.device_caches, self.host_caches)
            for swap in output.swap_in:
                self._copy(swap, self.host_caches, self.device_caches)
        self.stats.time_s += time.perf_counter() - start
        self.stats.bytes_out += self._block_bytes * sum(s.num_blocks for s in output.swap_out)
        self.stats.bytes_in += self._block_bytes * sum(s.num_blocks for s in output.swap_in)

    @staticmethod
    def _copy(swap: BlockSwap, source: list[KVCache], destination: list[KVCache]) -> None:
        src = torch.tensor([s for s, _ in swap.block_pairs], device=source[0][0].device)
        dst = torch.tensor([d for _, d in swap.block_pairs], device=destination[0][0].device)
        for (src_k, src_v), (dst_k, dst_v) in zip(source, destination, strict=True):
            dst_k.index_copy_(0, dst, src_k.index_select(0, src).to(dst_k.device))
            dst_v.index_copy_(0, dst, src_v.index_select(0, src).to(dst_v.device))

    # -- given blocks, either tier ---------------------------------------------------------

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """``[num_layers, 2 (K, V), num_blocks, block_size, kv_heads (this rank's), head_dim]``."""
        _, block_size, num_kv_heads, head_dim = self.device_caches[0][0].shape
        return (len(self.device_caches), 2, num_blocks, block_size, num_kv_heads, head_dim)

    def check_block_ids(self, block_ids: Sequence[int], on_host: bool) -> None:
        """Raise ``ValueError`` unless every id names a block of the tier, none twice."""
        caches = self.host_caches if on_host else self.device_caches
        num_blocks = caches[0][0].shape[0] if caches else 0
        bad = [b for b in block_ids if not 0 <= b < num_blocks]
        if bad:
            tier = "host" if on_host else "device"
            raise ValueError(f"no {tier} blocks {bad[:8]} (the {tier} pool has {num_blocks})")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("a block id is given twice")

    def check_block_data(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``data`` is what ``read_blocks(block_ids)`` returns."""
        expected = self.block_shape(len(block_ids))
        dtype = self.device_caches[0][0].dtype
        if tuple(data.shape) != expected or data.dtype != dtype:
            raise ValueError(
                f"block data must be {dtype} of shape {list(expected)}, "
                f"got {data.dtype} of shape {list(data.shape)}"
            )

    def read_blocks(self, block_ids: Sequence[int], on_host: bool) -> torch.Tensor:
        """A CPU copy of the blocks' raw contents (K then V; hidden-mode blocks alike)."""
        self.check_block_ids(block_ids, on_host)
        caches = self.host_caches if on_host else self.device_caches
        self._settle(on_host)
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=caches[0][0].device)
        data = torch.stack(
            [torch.stack((k.index_select(0, index), v.index_select(0, index))) for k, v in caches]
        )
        return data.cpu()

    def write_blocks(self, block_ids: Sequence[int], on_host: bool, data: torch.Tensor) -> None:
        """Overwrite the blocks with ``data`` (as ``read_blocks`` returns it)."""
        self.check_block_ids(block_ids, on_host)
        self.check_block_data(block_ids, data)
        caches = self.host_caches if on_host else self.device_caches
        self._settle(on_host)
        device = caches[0][0].device
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=device)
        data = data.to(device)
        for layer, (k, v) in enumerate(caches):
            k.index_copy_(0, index, data[layer, 0])
            v.index_copy_(0, index, data[layer, 1])

    def _settle(self, on_host: bool) -> None:
        """Before touching blocks outside a step: no copy on the swap stream may still read
        or write them. Host blocks are touched by the CPU: wait for the stream here; device
        blocks by the compute stream: make it wait (reads then sync when copied out)."""
        if not self._cuda:
            return
        assert self._stream is not None
        compute = torch.cuda.current_stream(self.device)
        for event in self.events.take_deferred():  # the swap stream covers them all
            compute.wait_event(event)
        if on_host:
            self._stream.synchronize()
        else:
            compute.wait_stream(self._stream)

    # -- CUDA: written against torch's stream API; not executed on this project's machines.

    def _execute_cuda(self, output: SchedulerOutput) -> None:
        assert self._stream is not None
        compute = torch.cuda.current_stream(self.device)
        # The previous step's copies nobody waited for: their blocks may be reused now.
        for event in self.events.take_deferred():
            compute.wait_event(event)
        swap_ins: dict[str, torch.cuda.Event] = {}
        with torch.cuda.stream(self._stream):
            # The copies read blocks the previous forward may still be writing.
            self._stream.wait_stream(compute)
            if output.swap_out:
                self._copy_blocks(output.swap_out, to_host=True)
                event = torch.cuda.Event()
                event.record(self._stream)
                if any(s.blocking for s in output.swap_out):
                    compute.wait_event(event)
                else:
                    self.events.defer(event)
            for swap in output.swap_in:
                self._copy_blocks((swap,), to_host=False)
                event = torch.cuda.Event()
                event.record(self._stream)
                swap_ins[swap.request_id] = event
        for event in self.events.due(swap_ins, (item.request_id for item in output.scheduled)):
            compute.wait_event(event)

    def _copy_blocks(self, swaps: Sequence[BlockSwap], to_host: bool) -> None:
        for swap in swaps:
            for (dev_k, dev_v), (host_k, host_v) in zip(
                self.device_caches, self.host_caches, strict=True
            ):
                for src, dst in swap.block_pairs:
                    if to_host:
                        host_k[dst].copy_(dev_k[src], non_blocking=True)
                        host_v[dst].copy_(dev_v[src], non_blocking=True)
                    else:
                        dev_k[dst].copy_(host_k[src], non_blocking=True)
                        dev_v[dst].copy_(host_v[src], non_blocking=True)
