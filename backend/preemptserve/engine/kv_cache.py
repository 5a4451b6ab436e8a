"""The device block pool: one K and one V tensor per layer, sized from a byte budget."""

from __future__ import annotations

import torch

from ..model.args import LlamaArgs
from ..model.llama import KVCache


def bytes_per_block(args: LlamaArgs, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens across all layers."""
    return block_size * args.kv_bytes_per_token(torch.finfo(dtype).bits // 8)


def num_blocks_for_budget(
    args: LlamaArgs, block_size: int, dtype: torch.dtype, kv_cache_bytes: int
) -> int:
    num_blocks = kv_cache_bytes // bytes_per_block(args, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} is smaller than one KV block "
            f"({bytes_per_block(args, block_size, dtype)} bytes)"
        )
    return num_blocks


def allocate_kv_caches(
    args: LlamaArgs, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
    pin_memory: bool = False,
) -> list[KVCache]:
    """Per layer: (k, v), each [num_blocks, block_size, num_kv_heads, head_dim], zeroed.

    ``pin_memory`` (host pool beside a CUDA device) page-locks it for async copies.
    """
    shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
    return [
        (
            torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin_memory),
            torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin_memory),
        )
        for _ in range(args.num_layers)
    ]
