"""Executors run a ``SchedulerOutput``: its swaps, then the forward pass, then sampling;
and read or write given KV blocks on every rank (moving a request between engines).

``LocalExecutor`` is one process holding the whole model (tensor_parallel_size 1, no
process group). ``tp_executor.TensorParallelExecutor`` drives several ranks; both build
each rank's share with ``build_shard``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..core.scheduler import SchedulerOutput
from ..model.args import LlamaArgs
from ..model.checkpoint import load_model
from ..model.llama import LlamaForCausalLM
from ..model.parallel import TensorParallel, shard_args
from .kv_cache import allocate_kv_caches
from .kv_swap import KVSwapper
from .model_runner import ModelRunner
from .sampler import SamplingState


class Executor(Protocol):
    """What the engine asks of the model side, whatever the number of ranks."""

    device: torch.device
    shard: Shard  # this process's (rank 0's) shard

    def execute(
        self, output: SchedulerOutput, states: Mapping[str, SamplingState]
    ) -> dict[str, int]:
        """Run the plan's swaps, then (if anything is scheduled) one forward and sampling.

        Returns the sampled token of every scheduled item with ``sample``.
        """
        ...

    def read_blocks(self, block_ids: Sequence[int], on_host: bool) -> list[torch.Tensor]:
        """The raw contents of the given blocks of the device pool (or with ``on_host`` the
        host pool), on every rank: one CPU tensor per rank, ``[num_layers, 2 (K, V), n,
        block_size, that rank's KV heads, head_dim]`` (hidden-mode blocks copy alike).

        Raises ``ValueError`` (nothing done) for an id outside the pool or given twice.
        """
        ...

    def write_blocks(
        self, block_ids: Sequence[int], on_host: bool, data: Sequence[torch.Tensor]
    ) -> None:
        """Overwrite the given blocks on every rank: rank ``r`` writes ``data[r]``, shaped
        as ``read_blocks`` returns it.

        Raises ``ValueError`` (nothing done) for a bad id or a tensor of the wrong shape.
        """
        ...

    @property
    def failure(self) -> str | None:
        """Why the executor can run no more steps (a rank died), or ``None``."""
        ...

    def shutdown(self) -> None:
        """Release what the executor started (worker processes, process group)."""
        ...


@dataclass
class Shard:
    """One rank's model shard with its slices of the device and host KV pools."""

    model: LlamaForCausalLM
    runner: ModelRunner
    swapper: KVSwapper


@dataclass(frozen=True)
class ShardSpec:
    """Everything a rank needs to build its shard (plain data: sent to worker processes).

    ``num_blocks`` and ``num_host_blocks`` are global: every rank holds every block, and
    of each block the K/V of its own KV heads.
    """

    model_dir: Path
    device: str
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    num_host_blocks: int


def build_shard(spec: ShardSpec, tp: TensorParallel) -> Shard:
    device = torch.device(spec.device)
    model = load_model(spec.model_dir, device, spec.dtype, tp)
    local_args = shard_args(LlamaArgs.from_model_dir(spec.model_dir), tp.world_size)
    kv_caches = allocate_kv_caches(local_args, spec.num_blocks, spec.block_size, device, spec.dtype)
    host_caches = allocate_kv_caches(
        local_args,
        spec.num_host_blocks,
        spec.block_size,
        torch.device("cpu"),
        spec.dtype,
        pin_memory=device.type == "cuda",
    )
    return Shard(
        model=model,
        runner=ModelRunner(model, kv_caches, spec.block_size, device),
        swapper=KVSwapper(kv_caches, host_caches, device),
    )


def run_step(
    shard: Shard, output: SchedulerOutput, states: Mapping[str, SamplingState] | None
) -> dict[str, int]:
    """One rank's share of a step; ``states=None`` (worker ranks) skips sampling."""
    shard.swapper.execute(output)
    if output.is_empty:
        return {}
    return shard.runner.execute(output, states)


class LocalExecutor:
    """The whole model in this process."""

    failure: str | None = None

    def __init__(self, spec: ShardSpec) -> None:
        self.shard = build_shard(spec, TensorParallel())
        self.device = self.shard.runner.device

    def execute(
        self, output: SchedulerOutput, states: Mapping[str, SamplingState]
    ) -> dict[str, int]:
        return run_step(self.shard, output, states)

    def read_blocks(self, block_ids: Sequence[int], on_host: bool) -> list[torch.Tensor]:
        return [self.shard.swapper.read_blocks(block_ids, on_host)]

    def write_blocks(
        self, block_ids: Sequence[int], on_host: bool, data: Sequence[torch.Tensor]
    ) -> None:
        if len(data) != 1:
            raise ValueError(f"one rank: need 1 tensor, got {len(data)}")
        self.shard.swapper.write_blocks(block_ids, on_host, data[0])

    def shutdown(self) -> None:
        pass
