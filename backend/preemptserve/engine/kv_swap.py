"""Executes the scheduler's swap plans between the device pool and the host pool.

On CUDA the host pool is pinned and copies run on a dedicated stream, overlapped with
the forward pass; the forward waits only for what it needs: swap-ins of the requests it
runs (an event per request), swap-outs that vacated blocks it reuses (``blocking``),
and the previous iteration's swap-outs (their blocks become allocatable now). On the
CPU the copies are plain synchronous ``index_copy_`` calls made before the forward, so
a step in flight never sees a half-copied block.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.scheduler import BlockSwap, SchedulerOutput
from ..model.llama import KVCache


@dataclass
class SwapStats:
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    time_s: float = 0.0  # CPU time spent issuing (CUDA) or doing (CPU) the copies


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
        self._swap_in_events: dict[str, torch.cuda.Event] = {}
        self._last_swap_out_event: torch.cuda.Event | None = None

    def execute(self, output: SchedulerOutput) -> None:
        """Issue this iteration's copies; make the compute stream wait where it must."""
        if not output.swap_out and not output.swap_in and self._last_swap_out_event is None:
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
        self.stats.num_swap_outs += len(output.swap_out)
        self.stats.num_swap_ins += len(output.swap_in)
        self.stats.bytes_out += self._block_bytes * sum(s.num_blocks for s in output.swap_out)
        self.stats.bytes_in += self._block_bytes * sum(s.num_blocks for s in output.swap_in)

    @staticmethod
    def _copy(swap: BlockSwap, source: list[KVCache], destination: list[KVCache]) -> None:
        src = torch.tensor([s for s, _ in swap.block_pairs], device=source[0][0].device)
        dst = torch.tensor([d for _, d in swap.block_pairs], device=destination[0][0].device)
        for (src_k, src_v), (dst_k, dst_v) in zip(source, destination, strict=True):
            dst_k.index_copy_(0, dst, src_k.index_select(0, src).to(dst_k.device))
            dst_v.index_copy_(0, dst, src_v.index_select(0, src).to(dst_v.device))

    # -- CUDA: written against torch's stream API; not executed on this project's machines.

    def _execute_cuda(self, output: SchedulerOutput) -> None:
        assert self._stream is not None
        compute = torch.cuda.current_stream(self.device)
        if self._last_swap_out_event is not None:
            compute.wait_event(self._last_swap_out_event)  # its blocks are reused from now
            self._last_swap_out_event = None
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
                    self._last_swap_out_event = event
            for swap in output.swap_in:
                self._copy_blocks((swap,), to_host=False)
                event = torch.cuda.Event()
                event.record(self._stream)
                self._swap_in_events[swap.request_id] = event
        for item in output.scheduled:
            event = self._swap_in_events.pop(item.request_id, None)
            if event is not None:
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
