"""The device block pool: one K and one V tensor per layer, sized from a byte budget.

Also what each cache mode costs per token and whether hidden-cache mode is offered (the
layout it relies on is drawn in ``model/attention.py``).
"""

from __future__ import annotations

import torch

from ..model.args import LlamaArgs
from ..model.llama import KVCache


def bytes_per_block(args: LlamaArgs, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens across all layers."""
    return block_size * args.kv_bytes_per_token(torch.finfo(dtype).bits // 8)


def kv_bytes_per_token(args: LlamaArgs, dtype: torch.dtype, tp_size: int = 1) -> int:
    """K and V of one token across all layers, on one rank (each holds 1/TP of the heads)."""
    return args.kv_bytes_per_token(torch.finfo(dtype).bits // 8) // tp_size


def hidden_bytes_per_token(args: LlamaArgs, dtype: torch.dtype, tp_size: int = 1) -> int:
    """The normalised attention input of one token across all layers, on one rank.

    Not divided by ``tp_size``: every rank needs the whole hidden state to recompute its
    own heads' K/V (sharding it would cost an all-gather per layer per step).
    """
    return args.num_layers * args.hidden_size * (torch.finfo(dtype).bits // 8)


def hidden_tokens_per_block(args: LlamaArgs, block_size: int, tp_size: int = 1) -> tuple[int, str]:
    """Tokens of a hidden-mode request per block, and why it is 0 (mode refused) if so.

    A block holds ``block_size`` tokens' K and V; where ``num_kv_heads * head_dim ==
    hidden_size`` (multi-head attention) its K half and its V half each hold
    ``block_size`` hidden states, so ``2 * block_size`` tokens (see ``model/attention.py``).
    """
    kv_size = args.num_kv_heads * args.head_dim  # values per token in K (and in V)
    if tp_size > 1:
        return 0, (
            f"tensor parallelism (TP={tp_size}): each rank would hold the whole hidden state "
            f"({args.hidden_size} values per token and layer) to recompute its own heads' K/V, "
            f"against {2 * kv_size // tp_size} for its K/V shard: no memory saved")
    if args.hidden_size >= 2 * kv_size:
        return 0, (
            f"grouped-query attention: the hidden state ({args.hidden_size} values per token "
            f"and layer) is at least as large as K+V ({2 * kv_size}): no memory saved")
    if args.hidden_size != kv_size:
        return 0, (
            f"the hidden cache shares K/V blocks and needs num_kv_heads * head_dim "
            f"({kv_size}) == hidden_size ({args.hidden_size})")
    return 2 * block_size, ""


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
