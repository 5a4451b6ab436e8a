"""Megatron-style tensor parallelism: column- and row-parallel linear layers.

Each rank holds a slice of every attention head group and of the MLP's hidden units::

    qkv_proj  (column-parallel)  [Hq*hd + 2*Hkv*hd, D] -> rank r keeps rows of its heads:
                                 [q heads r*Hq/tp.. | k heads r*Hkv/tp.. | v heads ..]
    o_proj    (row-parallel)     [D, Hq*hd]        -> rank r keeps the columns of its heads,
                                 its output is a partial sum: all-reduced across ranks
    gate_up   (column-parallel)  [2F, D]           -> [gate rows r*F/tp.. | up rows ..]
    down_proj (row-parallel)     [D, F]            -> columns r*F/tp.., all-reduced

So attention and the MLP run on local heads / units with no communication in between,
and each layer costs two all-reduces of [T, D]. Embedding, norms and the LM head are
replicated (the LM head exists on rank 0 only: only rank 0 samples).

Every parallel weight loads from a full checkpoint tensor through ``load``, which reads
only this rank's slice (a safetensors slice object reads only those bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .args import LlamaArgs


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the tensor-parallel ranks (the default process group)."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` in place across ranks; a no-op with one rank."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x


SINGLE = TensorParallel()


def check_divisible(args: LlamaArgs, world_size: int) -> None:
    """Raise ``ValueError`` unless heads, KV heads and MLP units split evenly over ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    for name, value in (
        ("num_attention_heads", args.num_heads),
        ("num_key_value_heads", args.num_kv_heads),
        ("intermediate_size", args.intermediate_size),
    ):
        if value % world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} does not divide the model's "
                f"{name}={value}: each rank must hold the same number of them"
            )


def shard_args(args: LlamaArgs, world_size: int) -> LlamaArgs:
    """The hyper-parameters of one rank's shard (heads and MLP units divided)."""
    check_divisible(args, world_size)
    return replace(
        args,
        num_heads=args.num_heads // world_size,
        num_kv_heads=args.num_kv_heads // world_size,
        intermediate_size=args.intermediate_size // world_size,
    )


def source_shape(source: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a safetensors slice (which has ``get_shape()``)."""
    return tuple(source.get_shape() if hasattr(source, "get_shape") else source.shape)


class MergedColumnParallelLinear(nn.Module):
    """``y = x @ [W_0; W_1; ...].T`` with every ``W_i`` split by output rows over ranks.

    The output stays sharded: ``[T, sum(output_sizes) / world_size]``, laid out as this
    rank's slice of output 0, then of output 1, ... (``qkv``: q, k, v; ``gate_up``).
    """

    def __init__(
        self, input_size: int, output_sizes: Sequence[int], tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_sizes = tuple(output_sizes)
        self.local_sizes = tuple(size // tp.world_size for size in self.output_sizes)
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), input_size))

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def full_shape(self, shard_id: int) -> tuple[int, ...]:
        """Shape of the checkpoint tensor that fills output ``shard_id``."""
        return (self.output_sizes[shard_id], self.input_size)

    def load(self, source: Any, shard_id: int) -> None:
        """Copy this rank's rows of the full tensor ``source`` into output ``shard_id``."""
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        start = self.tp.rank * size
        self.weight.data[offset : offset + size].copy_(source[start : start + size])


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r.T)``: input features split over ranks, output full."""

    def __init__(self, input_size: int, output_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = output_size
        self.local_input_size = input_size // tp.world_size
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input_size))

    num_shards = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))

    def full_shape(self, shard_id: int = 0) -> tuple[int, ...]:
        return (self.output_size, self.input_size)

    def load(self, source: Any, shard_id: int = 0) -> None:
        start = self.tp.rank * self.local_input_size
        self.weight.data.copy_(source[:, start : start + self.local_input_size])


ParallelLinear = MergedColumnParallelLinear | RowParallelLinear
